//! The one error type of this crate.

use std::path::PathBuf;

use crate::LockInfo;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with the state store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The state file or its directory could not be created.
    #[error("cannot create state file {}: {source}", path.display())]
    Create {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },

    /// SQLite refused an operation (a corrupt file, a full disk, a lock held too long…).
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),

    /// The file was written by a newer kiln with a schema this one does not know.
    #[error(
        "state database has schema version {found}, newer than the {supported} this kiln knows; upgrade kiln"
    )]
    SchemaTooNew {
        /// The file's schema version.
        found: u32,
        /// The newest schema version this build knows.
        supported: u32,
    },

    /// The file is missing something every state file has (its lineage, version 0).
    #[error("state database is damaged: {0}")]
    Damaged(String),

    /// The document to write could not be turned into JSON.
    #[error("cannot encode the state document as json: {0}")]
    Encode(#[source] serde_json::Error),

    /// Stored JSON did not decode into the type asked for.
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// What was being decoded, e.g. `state version 3` or `event 12`.
        what: String,
        /// Why.
        source: serde_json::Error,
    },

    /// A compare-and-swap write started from a serial that is no longer the newest.
    #[error(
        "state changed since it was read: expected serial {expected}, found {found}; read it again and retry"
    )]
    Conflict {
        /// The serial the writer read.
        expected: u64,
        /// The serial the store holds.
        found: u64,
    },

    /// No version with that serial.
    #[error("no state version {serial}: the newest is {newest}")]
    NoSuchVersion {
        /// The serial asked for.
        serial: u64,
        /// The newest serial.
        newest: u64,
    },

    /// A stored version no longer matches what kiln wrote.
    #[error("state version {serial} was changed outside kiln: {detail}")]
    Tampered {
        /// The version that changed.
        serial: u64,
        /// What differs.
        detail: String,
    },

    /// An audit entry to append claims a kind only kiln itself may write.
    #[error("audit entries of kind {kind} are reserved for the state versions kiln records itself")]
    ReservedAuditKind {
        /// The kind given.
        kind: String,
    },

    /// A time given as text is not RFC 3339.
    #[error(
        "invalid time `{given}`: {source}; expected RFC 3339 in UTC, e.g. 2026-11-29T12:00:00Z"
    )]
    InvalidTime {
        /// The text given.
        given: String,
        /// Why it does not parse.
        source: humantime::TimestampError,
    },

    /// Someone else holds the state lock and it is not stale. Boxed to keep `Result` small.
    #[error(
        "state is locked by {} ({}, pid {}) since {}, lock id {}; if that process is gone, run kiln state force-unlock {}",
        .0.operation, .0.who, .0.pid, .0.created, .0.id, .0.id
    )]
    Locked(Box<LockInfo>),

    /// The caller's lock was removed (force-unlock) or taken over after its lease ran out.
    #[error("state lock {lock_id} is no longer held{}", held_by(.current.as_deref()))]
    LockLost {
        /// The lock the caller thought it held.
        lock_id: String,
        /// The lock held now, if any.
        current: Option<String>,
    },

    /// `force-unlock` named a lock other than the one held.
    #[error("lock id {given} does not match the current lock {current}; nothing was unlocked")]
    LockIdMismatch {
        /// The id given.
        given: String,
        /// The id of the lock held.
        current: String,
    },

    /// `force-unlock` when no lock is held.
    #[error("state is not locked; nothing to unlock for lock id {given}")]
    NotLocked {
        /// The id given.
        given: String,
    },
}

fn held_by(current: Option<&str>) -> String {
    match current {
        Some(id) => format!(": lock {id} holds the state now"),
        None => ": the state is unlocked now".to_owned(),
    }
}
