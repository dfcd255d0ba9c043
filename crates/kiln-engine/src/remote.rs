//! A team state backend (the `backend "s3"` block): where a server keeps the state for
//! everyone who deploys the project, under a lease that makes it the project's only
//! controller while it runs.
//!
//! The server's own SQLite store stays its journal (every version, events, the audit log);
//! the backend holds the state document everyone shares:
//!
//! - at start the server takes the backend's lease (waiting for another holder to let go, up
//!   to a timeout) and adopts the backend's document when it differs from its own: whoever
//!   deployed last, from whichever machine, is where this server starts from;
//! - every state version the server writes is written to the backend too, under the lease
//!   (a conditional write: a writer whose lease was taken over, or that read an older
//!   version, is refused and the server stops rather than diverge);
//! - the lease is renewed while the server runs and released when it stops.
//!
//! Two servers never drive one project at once: the second waits for the lease.

use std::fmt;
use std::time::{Duration, SystemTime};

/// The state document as a backend holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteDoc {
    /// The backend's history id.
    pub lineage: String,
    /// The backend's version number.
    pub serial: u64,
    /// The state.
    pub doc: serde_json::Value,
}

/// A team state backend. Calls block; the engine makes them outside its world lock where it
/// can, and they are short (one request or two).
pub trait RemoteState: Send + Sync + fmt::Debug {
    /// Where it is, for messages: `s3://bucket/key (lock: dynamodb table)`.
    fn describe(&self) -> String;

    /// Takes the lease for `who`, waiting up to `wait` for another holder to let it go, and
    /// returns the backend's document, if there is one. Fails with the holder's name when
    /// the wait runs out.
    fn acquire(
        &self,
        who: &str,
        wait: Duration,
        now: SystemTime,
    ) -> Result<Option<RemoteDoc>, String>;

    /// Keeps the lease (call well before `lease` runs out).
    fn renew(&self, now: SystemTime) -> Result<(), String>;

    /// Writes a new version of the document under the lease; refused when the lease was
    /// lost or the backend changed since this holder last read or wrote it.
    fn write(
        &self,
        doc: &serde_json::Value,
        actor: &str,
        operation: &str,
        now: SystemTime,
    ) -> Result<RemoteDoc, String>;

    /// Lets the lease go.
    fn release(&self) -> Result<(), String>;
}

/// How often the server renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(15);
