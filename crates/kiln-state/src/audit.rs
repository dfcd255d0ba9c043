//! The audit log: every change and decision as an entry chained to the one before by hashes,
//! with the state versions chained in. See the crate docs for the hash encoding and for what
//! [`StateStore::verify_audit`] does and does not prove.

use std::collections::BTreeMap;
use std::time::SystemTime;

use kiln_core::Digest;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::time::{parse_since, rfc3339};
use crate::{Error, Result, StateStore, WriteMeta};

/// The kind of the entry kiln appends for every state version, in the same transaction as the
/// version. Reserved: [`StateStore::append_audit`] refuses entries of this kind.
pub const STATE_VERSION_KIND: &str = "state_version";

/// The `prev_hash` of the first entry: `sha256:` followed by 64 zeros.
pub const GENESIS_HASH: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// An entry to append to the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAuditEntry {
    /// Who did or decided it, e.g. `alice@build-1` or `kiln server`.
    pub actor: String,
    /// A stable kind for machines, e.g. `plan.approved` or `rollout.promoted`.
    /// [`STATE_VERSION_KIND`] is reserved.
    pub kind: String,
    /// What it concerns, e.g. `service web` or `release web v3`.
    pub subject: String,
    /// The git commit of the config it was decided from, when known.
    pub git_commit: Option<String>,
    /// Details; `null` when there are none.
    pub data: Value,
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log: 1, 2, 3, … without gaps.
    pub seq: u64,
    /// When it was appended (RFC 3339, UTC, whole seconds).
    pub time: String,
    /// Who did or decided it.
    pub actor: String,
    /// A stable kind for machines; [`STATE_VERSION_KIND`] for state versions.
    pub kind: String,
    /// What it concerns; `serial N` for state versions.
    pub subject: String,
    /// The git commit of the config it was decided from, when known.
    pub git_commit: Option<String>,
    /// For a state version, its serial; otherwise the newest state version when it was
    /// appended, the state the decision was made on.
    pub state_serial: Option<u64>,
    /// `sha256:<hex>` of the JSON of the version `state_serial`, as recorded when that version
    /// was written.
    pub state_hash: Option<String>,
    /// Details.
    pub data: Value,
    /// The `hash` of the entry before, or [`GENESIS_HASH`] for the first.
    pub prev_hash: String,
    /// `sha256:<hex>` of the entry's canonical encoding (see the crate docs).
    pub hash: String,
}

/// What [`StateStore::verify_audit`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AuditCheck {
    /// Every entry hashes to what it records, links to the one before, and every state version
    /// is in the log with the hash it still has.
    Ok {
        /// How many entries the log holds.
        entries: u64,
        /// The hash of the last entry. Keep a copy outside the state file: only that copy shows
        /// that the log was not rewritten as a whole or cut short.
        head: String,
    },
    /// The first entry that is wrong or missing.
    Broken {
        /// Its position: the entry that fails a check, or the one that should be there.
        seq: u64,
        /// What differs, with the expected and the found values.
        reason: String,
    },
}

impl AuditCheck {
    /// Whether nothing was found.
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok { .. })
    }
}

impl StateStore {
    /// Appends `entries` to the audit log in one transaction, all or none, each linked to the
    /// one before and to the newest state version; returns them as stored.
    ///
    /// Fails with [`Error::ReservedAuditKind`] for an entry of kind [`STATE_VERSION_KIND`]:
    /// only [`StateStore::write`] records state versions.
    pub fn append_audit(
        &self,
        entries: &[NewAuditEntry],
        now: SystemTime,
    ) -> Result<Vec<AuditEntry>> {
        check_kinds(entries)?;
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.immediate()?;
        let state = tx
            .query_row(
                "SELECT serial, hash FROM versions ORDER BY serial DESC LIMIT 1",
                [],
                |row| Ok((row.get::<_, u64>(0)?, row.get::<_, String>(1)?)),
            )
            .optional()?
            .ok_or_else(|| Error::Damaged("it has no versions".to_owned()))?;
        let mut log = Appender::new(&tx, now)?;
        let stored = entries
            .iter()
            .map(|e| log.append(&Entry::new(e, &state)))
            .collect::<Result<Vec<_>>>()?;
        tx.commit()?;
        Ok(stored)
    }

    /// The audit log, oldest first; with `since` (RFC 3339 in UTC, e.g.
    /// `2026-11-29T12:00:00Z`), only entries appended at or after that time.
    pub fn audit(&self, since: Option<&str>) -> Result<Vec<AuditEntry>> {
        let since = since.map(parse_since).transpose()?;
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM audit WHERE ?1 IS NULL OR time >= ?1 ORDER BY seq"
        ))?;
        let mut rows = stmt.query([since])?;
        let mut entries = Vec::new();
        while let Some(row) = rows.next()? {
            entries.push(Row::read(row)?.into_entry()?);
        }
        Ok(entries)
    }

    /// Checks the whole audit log against itself and against the state versions, from one
    /// consistent snapshot, and names the first entry that is wrong or missing:
    ///
    /// - an entry whose hash does not match its content (it was edited);
    /// - an entry whose `prev_hash` is not the hash of the entry before (one of them was
    ///   rewritten, or entries were reordered);
    /// - a missing `seq` (an entry was deleted);
    /// - a [`STATE_VERSION_KIND`] entry whose `state_hash` no longer matches its version's
    ///   JSON, or whose version is gone (the state was edited after it was logged);
    /// - a state version that no [`STATE_VERSION_KIND`] entry covers (a version written
    ///   outside kiln, or its entry removed), or an entry referring to a state version other
    ///   than the newest one logged before it.
    ///
    /// A log rewritten consistently from some entry on, or cut short after its last state
    /// version, passes: compare [`AuditCheck::Ok`]'s `head` with a copy kept elsewhere.
    pub fn verify_audit(&self) -> Result<AuditCheck> {
        let tx = self.conn.unchecked_transaction()?;
        let versions = version_hashes(&tx)?;
        let check = {
            let mut stmt =
                tx.prepare_cached(&format!("SELECT {COLUMNS} FROM audit ORDER BY seq"))?;
            let mut rows = stmt.query([])?;
            let mut walk = Walk::new(&versions);
            loop {
                let Some(row) = rows.next()? else {
                    break walk.finish();
                };
                if let Some(broken) = walk.step(&Row::read(row)?) {
                    break broken;
                }
            }
        };
        tx.finish()?;
        Ok(check)
    }
}

/// Refuses entries that claim to be state versions.
pub(crate) fn check_kinds(entries: &[NewAuditEntry]) -> Result<()> {
    match entries.iter().find(|e| e.kind == STATE_VERSION_KIND) {
        Some(e) => Err(Error::ReservedAuditKind {
            kind: e.kind.clone(),
        }),
        None => Ok(()),
    }
}

/// Inside the caller's write transaction: the entry for state version `serial` (its JSON
/// hashing to `hash`), then `entries`, which refer to that version.
pub(crate) fn record_version(
    conn: &Connection,
    serial: u64,
    hash: &str,
    meta: &WriteMeta,
    entries: &[NewAuditEntry],
    now: SystemTime,
) -> Result<Vec<AuditEntry>> {
    let state = (serial, hash.to_owned());
    let version = NewAuditEntry {
        actor: meta.actor.clone(),
        kind: STATE_VERSION_KIND.to_owned(),
        subject: format!("serial {serial}"),
        git_commit: None,
        data: serde_json::json!({ "operation": meta.operation, "actor": meta.actor }),
    };
    let mut log = Appender::new(conn, now)?;
    std::iter::once(&version)
        .chain(entries)
        .map(|e| log.append(&Entry::new(e, &state)))
        .collect()
}

/// Inside the migration that creates the log: one [`STATE_VERSION_KIND`] entry for every
/// version already in the file, oldest first, with the hash recorded when it was written
/// (so a version edited before the migration is still found). Their `data` says so:
/// `{operation, actor, written_at, backfilled: true}`.
pub(crate) fn backfill(conn: &Connection, now: SystemTime) -> Result<()> {
    let versions = {
        let mut stmt = conn.prepare(
            "SELECT serial, written_at, actor, operation, hash FROM versions ORDER BY serial",
        )?;
        stmt.query_map([], |row| {
            Ok((
                row.get::<_, u64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
    };
    let mut log = Appender::new(conn, now)?;
    for (serial, written_at, actor, operation, hash) in versions {
        let entry = NewAuditEntry {
            actor: actor.clone(),
            kind: STATE_VERSION_KIND.to_owned(),
            subject: format!("serial {serial}"),
            git_commit: None,
            data: serde_json::json!({
                "operation": operation,
                "actor": actor,
                "written_at": written_at,
                "backfilled": true,
            }),
        };
        log.append(&Entry::new(&entry, &(serial, hash)))?;
    }
    tracing::info!("audit log created for an existing state file");
    Ok(())
}

/// The columns of `audit`, in the order [`Row::read`] expects.
const COLUMNS: &str =
    "seq, time, actor, kind, subject, git_commit, state_serial, state_hash, data, prev_hash, hash";

/// An entry to store, before it has a place in the log.
struct Entry<'a> {
    new: &'a NewAuditEntry,
    state: &'a (u64, String),
}

impl<'a> Entry<'a> {
    fn new(new: &'a NewAuditEntry, state: &'a (u64, String)) -> Self {
        Self { new, state }
    }
}

/// Appends entries after the last one, inside a write transaction.
struct Appender<'c> {
    conn: &'c Connection,
    time: String,
    last_seq: u64,
    last_hash: String,
}

impl<'c> Appender<'c> {
    fn new(conn: &'c Connection, now: SystemTime) -> Result<Self> {
        let last = conn
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |row| Ok((row.get::<_, u64>(0)?, row.get::<_, String>(1)?)),
            )
            .optional()?;
        let (last_seq, last_hash) = last.unwrap_or_else(|| (0, GENESIS_HASH.to_owned()));
        Ok(Self {
            conn,
            time: rfc3339(now),
            last_seq,
            last_hash,
        })
    }

    fn append(&mut self, entry: &Entry<'_>) -> Result<AuditEntry> {
        let mut row = Row {
            seq: self.last_seq + 1,
            time: self.time.clone(),
            actor: entry.new.actor.clone(),
            kind: entry.new.kind.clone(),
            subject: entry.new.subject.clone(),
            git_commit: entry.new.git_commit.clone(),
            state_serial: Some(entry.state.0),
            state_hash: Some(entry.state.1.clone()),
            data: canonical_json(&entry.new.data),
            prev_hash: self.last_hash.clone(),
            hash: String::new(),
        };
        row.hash = row.content_hash();
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO audit ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))?
            .execute(params![
                row.seq,
                row.time,
                row.actor,
                row.kind,
                row.subject,
                row.git_commit,
                row.state_serial,
                row.state_hash,
                row.data,
                row.prev_hash,
                row.hash,
            ])?;
        self.last_seq = row.seq;
        self.last_hash.clone_from(&row.hash);
        Ok(AuditEntry {
            seq: row.seq,
            time: row.time,
            actor: row.actor,
            kind: row.kind,
            subject: row.subject,
            git_commit: row.git_commit,
            state_serial: row.state_serial,
            state_hash: row.state_hash,
            data: entry.new.data.clone(),
            prev_hash: row.prev_hash,
            hash: row.hash,
        })
    }
}

/// An `audit` row as stored, `data` as its exact text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    seq: u64,
    time: String,
    actor: String,
    kind: String,
    subject: String,
    git_commit: Option<String>,
    state_serial: Option<u64>,
    state_hash: Option<String>,
    data: String,
    prev_hash: String,
    hash: String,
}

impl Row {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: row.get(0)?,
            time: row.get(1)?,
            actor: row.get(2)?,
            kind: row.get(3)?,
            subject: row.get(4)?,
            git_commit: row.get(5)?,
            state_serial: row.get(6)?,
            state_hash: row.get(7)?,
            data: row.get(8)?,
            prev_hash: row.get(9)?,
            hash: row.get(10)?,
        })
    }

    fn into_entry(self) -> Result<AuditEntry> {
        let data = serde_json::from_str(&self.data).map_err(|source| Error::Decode {
            what: format!("audit entry {}", self.seq),
            source,
        })?;
        Ok(AuditEntry {
            seq: self.seq,
            time: self.time,
            actor: self.actor,
            kind: self.kind,
            subject: self.subject,
            git_commit: self.git_commit,
            state_serial: self.state_serial,
            state_hash: self.state_hash,
            data,
            prev_hash: self.prev_hash,
            hash: self.hash,
        })
    }

    /// The bytes that are hashed: a JSON object with the fields in sorted key order, no
    /// whitespace, strings as in RFC 8785, `null` for absent values, and `data` spliced in as
    /// the exact text stored.
    fn preimage(&self) -> String {
        let s = |v: &str| Value::from(v).to_string();
        let opt = |v: Option<&str>| v.map_or_else(|| "null".to_owned(), s);
        let serial = self
            .state_serial
            .map_or_else(|| "null".to_owned(), |n| n.to_string());
        format!(
            r#"{{"actor":{},"data":{},"git_commit":{},"kind":{},"prev_hash":{},"seq":{},"state_hash":{},"state_serial":{},"subject":{},"time":{}}}"#,
            s(&self.actor),
            self.data,
            opt(self.git_commit.as_deref()),
            s(&self.kind),
            s(&self.prev_hash),
            self.seq,
            opt(self.state_hash.as_deref()),
            serial,
            s(&self.subject),
            s(&self.time),
        )
    }

    /// `sha256:<hex>` of [`Row::preimage`].
    fn content_hash(&self) -> String {
        Digest::of(self.preimage().as_bytes()).to_string()
    }
}

/// `value` as canonical JSON: no whitespace, object keys sorted by their UTF-16 code units
/// (RFC 8785), strings escaped as RFC 8785 does, numbers as `serde_json` writes them.
pub(crate) fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::from(key.as_str()).to_string());
                out.push(':');
                if let Some(item) = map.get(key) {
                    write_canonical(item, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        // Null, booleans, numbers and strings have one compact form.
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `serial → sha256:<hex>` of every version's JSON as it is now.
fn version_hashes(conn: &Connection) -> Result<BTreeMap<u64, String>> {
    let mut stmt = conn.prepare_cached("SELECT serial, CAST(doc AS BLOB) FROM versions")?;
    let mut rows = stmt.query([])?;
    let mut hashes = BTreeMap::new();
    while let Some(row) = rows.next()? {
        let json: Vec<u8> = row.get(1)?;
        hashes.insert(row.get(0)?, Digest::of(&json).to_string());
    }
    Ok(hashes)
}

/// The checks of [`StateStore::verify_audit`], one entry at a time in `seq` order.
struct Walk<'v> {
    /// Every state version's hash as it is now.
    versions: &'v BTreeMap<u64, String>,
    /// The `seq` the next entry must have.
    next_seq: u64,
    /// The hash the next entry's `prev_hash` must be.
    prev_hash: String,
    /// The newest state version logged so far, with its logged hash.
    state: Option<(u64, String)>,
}

impl<'v> Walk<'v> {
    fn new(versions: &'v BTreeMap<u64, String>) -> Self {
        Self {
            versions,
            next_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            state: None,
        }
    }

    /// The serial the next [`STATE_VERSION_KIND`] entry must record.
    fn next_serial(&self) -> u64 {
        self.state.as_ref().map_or(0, |(serial, _)| serial + 1)
    }

    /// Checks `row`; `Some` when it is broken.
    fn step(&mut self, row: &Row) -> Option<AuditCheck> {
        let broken = |seq, reason: String| Some(AuditCheck::Broken { seq, reason });
        if row.seq != self.next_seq {
            let instead = match self.next_seq - 1 {
                0 => format!("the log starts with entry {}", row.seq),
                last => format!("entry {last} is followed by entry {}", row.seq),
            };
            return broken(
                self.next_seq,
                format!("entry {} is missing: {instead}", self.next_seq),
            );
        }
        let actual = row.content_hash();
        if actual != row.hash {
            return broken(
                row.seq,
                format!(
                    "its content hashes to {actual}, but it records {}: the entry was changed after it was written",
                    row.hash
                ),
            );
        }
        if row.prev_hash != self.prev_hash {
            let expected = match row.seq {
                1 => format!("the first entry's prev_hash must be {GENESIS_HASH}"),
                seq => format!("entry {} hashes to {}", seq - 1, self.prev_hash),
            };
            return broken(
                row.seq,
                format!(
                    "its prev_hash is {}, but {expected}: entries were rewritten or reordered",
                    row.prev_hash
                ),
            );
        }
        if let Some(reason) = self.check_state(row) {
            return broken(row.seq, reason);
        }
        self.next_seq += 1;
        self.prev_hash.clone_from(&row.hash);
        None
    }

    /// The state checks of `row`, which is otherwise intact.
    fn check_state(&mut self, row: &Row) -> Option<String> {
        let found = match (&row.state_serial, &row.state_hash) {
            (Some(serial), Some(hash)) => Some((*serial, hash.clone())),
            _ => None,
        };
        if row.kind != STATE_VERSION_KIND {
            if found == self.state {
                return None;
            }
            let refers = match &found {
                Some((serial, hash)) => format!("it refers to state version {serial} ({hash})"),
                None => "it refers to no state version".to_owned(),
            };
            let newest = match &self.state {
                Some((serial, hash)) => format!("is state version {serial} ({hash})"),
                None => "does not exist".to_owned(),
            };
            return Some(format!(
                "{refers}, but the newest state version logged before it {newest}"
            ));
        }
        let Some((serial, logged)) = found else {
            return Some("it is a state_version entry without a state serial and hash".to_owned());
        };
        let next = self.next_serial();
        if serial > next {
            return Some(format!(
                "state version {next} is not in the log: this entry records serial {serial}{}",
                if self.versions.contains_key(&next) {
                    ""
                } else {
                    ", and the state has no version {next} either"
                }
            ));
        }
        if serial < next {
            return Some(format!(
                "it records state version {serial} again: the log already covers serials up to {}",
                next - 1
            ));
        }
        match self.versions.get(&serial) {
            None => {
                return Some(format!(
                    "state version {serial}, which it records, is missing from the state"
                ));
            }
            Some(actual) if *actual != logged => {
                return Some(format!(
                    "state version {serial} now hashes to {actual}, but the log recorded {logged}: the state was changed after it was logged"
                ));
            }
            Some(_) => {}
        }
        self.state = Some((serial, logged));
        None
    }

    /// After the last entry: every state version must have been logged.
    fn finish(self) -> AuditCheck {
        let next = self.next_serial();
        match self.versions.range(next..).next() {
            Some((&serial, _)) => AuditCheck::Broken {
                seq: self.next_seq,
                reason: format!(
                    "state version {serial} is not in the log: the log ends at entry {}{}",
                    self.next_seq - 1,
                    match &self.state {
                        Some((last, _)) => format!(", which has state versions up to {last}"),
                        None => ", which has no state versions".to_owned(),
                    }
                ),
            },
            None => AuditCheck::Ok {
                entries: self.next_seq - 1,
                head: self.prev_hash,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let value: Value = serde_json::from_str(
            r#"{ "b": [1, 2.5, {"z": null, "a": true}], "a": "é\n\"\u0001", "\ud83d\ude00": 0, "\uffff": 1 }"#,
        )
        .unwrap();
        // U+1F600 is the surrogate pair D83D DE00, which sorts before U+FFFF in UTF-16.
        assert_eq!(
            canonical_json(&value),
            "{\"a\":\"é\\n\\\"\\u0001\",\"b\":[1,2.5,{\"a\":true,\"z\":null}],\"\u{1F600}\":0,\"\u{FFFF}\":1}"
        );
        assert_eq!(canonical_json(&Value::Null), "null");
    }

    #[test]
    fn the_genesis_hash_is_a_digest() {
        assert!(GENESIS_HASH.parse::<Digest>().is_ok());
    }
}
