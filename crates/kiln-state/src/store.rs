//! The store itself: opening the file, the schema, and the versioned document.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kiln_core::Digest;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::time::rfc3339;
use crate::{AuditEntry, Error, NewAuditEntry, NewEvent, Result, audit, events};

/// How long a call waits for another process's write transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one migration per entry; `PRAGMA user_version` counts those applied.
/// Append new entries; never edit an old one.
const MIGRATIONS: &[&str] = &[
    r"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;

    CREATE TABLE versions (
        serial     INTEGER PRIMARY KEY CHECK (serial >= 0),
        written_at TEXT NOT NULL,
        actor      TEXT NOT NULL,
        operation  TEXT NOT NULL,
        hash       TEXT NOT NULL,
        doc        TEXT NOT NULL
    ) STRICT;

    CREATE TABLE events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        time    TEXT NOT NULL,
        service TEXT,
        kind    TEXT NOT NULL,
        message TEXT NOT NULL,
        data    TEXT NOT NULL
    ) STRICT;

    -- At most one row: the lock, if held.
    CREATE TABLE lock (
        slot       INTEGER PRIMARY KEY CHECK (slot = 1),
        id         TEXT NOT NULL,
        operation  TEXT NOT NULL,
        who        TEXT NOT NULL,
        info       TEXT NOT NULL,
        host       TEXT NOT NULL,
        boot_id    TEXT,
        pid        INTEGER NOT NULL,
        pid_start  INTEGER,
        created    TEXT NOT NULL,
        expires    TEXT NOT NULL,
        expires_ms INTEGER NOT NULL
    ) STRICT;
",
    r"
    -- The audit log: a hash chain, see audit.rs. Rows are only ever appended.
    CREATE TABLE audit (
        seq          INTEGER PRIMARY KEY CHECK (seq >= 1),
        time         TEXT NOT NULL,
        actor        TEXT NOT NULL,
        kind         TEXT NOT NULL,
        subject      TEXT NOT NULL,
        git_commit   TEXT,
        state_serial INTEGER CHECK (state_serial >= 0),
        state_hash   TEXT,
        data         TEXT NOT NULL,
        prev_hash    TEXT NOT NULL,
        hash         TEXT NOT NULL
    ) STRICT;

    CREATE INDEX audit_time ON audit (time);
",
];

/// How many migrations a file has had once it has the audit log.
const AUDIT_SCHEMA: u32 = 2;

/// The state store: one SQLite connection to the state file.
///
/// `Send` but not `Sync`: give each thread (or each `spawn_blocking` call) its own store, or
/// guard one with a mutex. Any number of stores, in any number of processes, may share a file.
#[derive(Debug)]
pub struct StateStore {
    pub(crate) conn: Connection,
    path: PathBuf,
}

/// A version of the state document with its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned<T> {
    /// The uuid of this state's history, fixed when the file was created.
    pub lineage: String,
    /// The version number: 0 for the empty document written at creation, then +1 per write.
    pub serial: u64,
    /// When the version was written (RFC 3339).
    pub written_at: String,
    /// The document.
    pub doc: T,
    /// `sha256:<hex>` of the JSON bytes read from the store (recomputed on every read, so it
    /// always describes `doc`; [`StateStore::verify`] compares it with the hash recorded at
    /// write time).
    pub hash: String,
}

/// Who writes a version and why, recorded with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteMeta {
    /// The person or system writing, e.g. `alice@build-1` or `kiln server`.
    pub actor: String,
    /// The command or step, e.g. `apply` or `drift --remediate`.
    pub operation: String,
}

/// One stored version, without its document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version number.
    pub serial: u64,
    /// When it was written (RFC 3339).
    pub written_at: String,
    /// Who wrote it.
    pub actor: String,
    /// Why.
    pub operation: String,
    /// `sha256:<hex>` of its JSON bytes, as recorded when it was written.
    pub hash: String,
    /// Size of its JSON in bytes.
    pub size: u64,
}

impl StateStore {
    /// Opens the state file at `path`, creating it (mode 0600, and its directory, mode 0700) if
    /// missing. A new file gets a fresh lineage and version 0, the empty document `{}`.
    pub fn open(path: &Path, now: SystemTime) -> Result<Self> {
        create_private(path).map_err(|source| Error::Create {
            path: path.to_owned(),
            source,
        })?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Some file systems cannot hold WAL's shared memory; the rollback journal is just
            // as safe, readers merely wait for writers.
            tracing::warn!(path = %path.display(), mode, "state database is not in WAL mode");
        }
        // FULL: a committed write survives power loss, not only a crash of kiln.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        let store = Self {
            conn,
            path: path.to_owned(),
        };
        store.init(now)?;
        Ok(store)
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Brings the schema up to date and writes the lineage and version 0 if missing, in one
    /// transaction, so two processes creating the same file cannot both initialise it.
    fn init(&self, now: SystemTime) -> Result<()> {
        let tx = self.immediate()?;
        let applied: u32 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let known = u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX);
        if applied > known {
            return Err(Error::SchemaTooNew {
                found: applied,
                supported: known,
            });
        }
        for step in MIGRATIONS.iter().skip(applied as usize) {
            tx.execute_batch(step)?;
        }
        if applied != known {
            tx.pragma_update(None, "user_version", known)?;
        }
        let lineage: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'lineage'", [], |row| {
                row.get(0)
            })
            .optional()?;
        if lineage.is_some() && applied < AUDIT_SCHEMA {
            // A file from before the audit log: its versions enter the log now.
            audit::backfill(&tx, now)?;
        }
        if lineage.is_none() {
            let lineage = uuid::Uuid::new_v4().to_string();
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('lineage', ?1)",
                [&lineage],
            )?;
            let meta = WriteMeta {
                actor: "kiln".to_owned(),
                operation: "init".to_owned(),
            };
            let hash = insert_version(&tx, 0, "{}", &meta, now)?;
            audit::record_version(&tx, 0, &hash, &meta, &[], now)?;
            tracing::info!(path = %self.path.display(), lineage, "created state");
        }
        tx.commit()?;
        Ok(())
    }

    /// A write transaction that takes SQLite's write lock up front (`BEGIN IMMEDIATE`), waiting
    /// up to the busy timeout for other writers. Deciding inside it is race-free: nobody can
    /// change what was read before it commits.
    pub(crate) fn immediate(&self) -> Result<Transaction<'_>> {
        Ok(Transaction::new_unchecked(
            &self.conn,
            TransactionBehavior::Immediate,
        )?)
    }

    /// The uuid that names this state's history.
    pub fn lineage(&self) -> Result<String> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'lineage'", [], |row| {
                row.get(0)
            })
            .optional()?
            .ok_or_else(|| Error::Damaged("it has no lineage".to_owned()))
    }

    /// The newest version of the document.
    pub fn read<T: DeserializeOwned>(&self) -> Result<Versioned<T>> {
        let tx = self.conn.unchecked_transaction()?;
        let newest = newest_serial(&tx)?;
        let version = load(self, &tx, newest)?;
        tx.finish()?;
        version.ok_or_else(|| Error::Damaged(format!("state version {newest} vanished")))
    }

    /// The version with `serial`.
    pub fn read_version<T: DeserializeOwned>(&self, serial: u64) -> Result<Versioned<T>> {
        let tx = self.conn.unchecked_transaction()?;
        let version = load(self, &tx, serial)?;
        let newest = newest_serial(&tx)?;
        tx.finish()?;
        version.ok_or(Error::NoSuchVersion { serial, newest })
    }

    /// Stores `doc` as version `expected_serial + 1` if `expected_serial` is still the newest,
    /// together with `events` and its [`crate::STATE_VERSION_KIND`] audit entry, in one
    /// transaction; returns the new serial.
    ///
    /// Fails with [`Error::Conflict`] and changes nothing when another write came first.
    pub fn write<T: Serialize>(
        &self,
        expected_serial: u64,
        doc: &T,
        meta: &WriteMeta,
        events: &[NewEvent],
        now: SystemTime,
    ) -> Result<u64> {
        let (serial, _) = self.write_with_audit(expected_serial, doc, meta, events, &[], now)?;
        Ok(serial)
    }

    /// [`StateStore::write`], also appending `audit` to the audit log in the same
    /// transaction, after the version's own entry: the decisions that led to this version
    /// are logged if and only if it is written. Returns the new serial and every audit entry
    /// appended, the version's first.
    ///
    /// Fails with [`Error::ReservedAuditKind`] for an entry of kind
    /// [`crate::STATE_VERSION_KIND`], and with [`Error::Conflict`] like `write`.
    pub fn write_with_audit<T: Serialize>(
        &self,
        expected_serial: u64,
        doc: &T,
        meta: &WriteMeta,
        events: &[NewEvent],
        audit: &[NewAuditEntry],
        now: SystemTime,
    ) -> Result<(u64, Vec<AuditEntry>)> {
        audit::check_kinds(audit)?;
        let json = serde_json::to_string(doc).map_err(Error::Encode)?;
        let tx = self.immediate()?;
        let found = newest_serial(&tx)?;
        if found != expected_serial {
            return Err(Error::Conflict {
                expected: expected_serial,
                found,
            });
        }
        let serial = found + 1;
        let hash = insert_version(&tx, serial, &json, meta, now)?;
        events::insert(&tx, events, now)?;
        let logged = audit::record_version(&tx, serial, &hash, meta, audit, now)?;
        tx.commit()?;
        tracing::debug!(
            serial,
            actor = meta.actor,
            operation = meta.operation,
            "state written"
        );
        Ok((serial, logged))
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> Result<Vec<VersionInfo>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT serial, written_at, actor, operation, hash, length(CAST(doc AS BLOB))
             FROM versions ORDER BY serial",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok(VersionInfo {
                serial: row.get(0)?,
                written_at: row.get(1)?,
                actor: row.get(2)?,
                operation: row.get(3)?,
                hash: row.get(4)?,
                size: row.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Checks that every version from 0 to the newest is present and still hashes to what was
    /// recorded when it was written. Finds versions edited or deleted outside kiln.
    pub fn verify(&self) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "SELECT serial, hash, CAST(doc AS BLOB) FROM versions ORDER BY serial",
            )?;
            let mut rows = stmt.query([])?;
            let mut next = 0u64;
            while let Some(row) = rows.next()? {
                let serial: u64 = row.get(0)?;
                if serial != next {
                    return Err(Error::Tampered {
                        serial: next,
                        detail: "the version is missing".to_owned(),
                    });
                }
                let recorded: String = row.get(1)?;
                let json: Vec<u8> = row.get(2)?;
                let actual = Digest::of(&json).to_string();
                if actual != recorded {
                    return Err(Error::Tampered {
                        serial,
                        detail: format!("its json hashes to {actual}, but kiln wrote {recorded}"),
                    });
                }
                next += 1;
            }
        }
        tx.finish()?;
        Ok(())
    }
}

/// Creates `path` with mode 0600 (and its directory with 0700) unless it exists, so that the
/// state, which names every instance and secret version, is private from the first byte.
fn create_private(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    Ok(())
}

fn newest_serial(conn: &Connection) -> Result<u64> {
    conn.query_row("SELECT max(serial) FROM versions", [], |row| {
        row.get::<_, Option<u64>>(0)
    })?
    .ok_or_else(|| Error::Damaged("it has no versions".to_owned()))
}

fn insert_version(
    conn: &Connection,
    serial: u64,
    json: &str,
    meta: &WriteMeta,
    now: SystemTime,
) -> Result<String> {
    let hash = Digest::of(json.as_bytes()).to_string();
    conn.prepare_cached(
        "INSERT INTO versions (serial, written_at, actor, operation, hash, doc)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        serial,
        rfc3339(now),
        meta.actor,
        meta.operation,
        hash,
        json
    ])?;
    Ok(hash)
}

fn load<T: DeserializeOwned>(
    store: &StateStore,
    conn: &Connection,
    serial: u64,
) -> Result<Option<Versioned<T>>> {
    let row = conn
        .prepare_cached("SELECT written_at, CAST(doc AS BLOB) FROM versions WHERE serial = ?1")?
        .query_row([serial], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?))
        })
        .optional()?;
    let Some((written_at, json)) = row else {
        return Ok(None);
    };
    let doc = serde_json::from_slice(&json).map_err(|source| Error::Decode {
        what: format!("state version {serial}"),
        source,
    })?;
    Ok(Some(Versioned {
        lineage: store.lineage()?,
        serial,
        written_at,
        doc,
        hash: Digest::of(&json).to_string(),
    }))
}
