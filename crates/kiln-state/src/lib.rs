//! kiln's state store: one SQLite file that holds the state document, every version of it, the
//! state lock and an event log.
//!
//! - **Versions.** The document is JSON, versioned like Terraform state: a `lineage` (a uuid
//!   chosen when the file is created) and a `serial` that grows by one with every write. A write
//!   is a compare-and-swap on the serial ([`StateStore::write`]), so two writers racing from the
//!   same serial cannot both win. Every version is kept, with who wrote it, why, and the sha256
//!   of its bytes, so [`StateStore::verify`] can tell when a version was edited outside kiln.
//! - **Lock.** One row, visible to every process on the file. It carries a lease: a holder that
//!   crashed stops blocking others once its lease runs out, or at once when it ran on this host
//!   and its process is gone. `kiln state force-unlock ID` removes any lock by naming its id.
//! - **Events.** An append-only log (rollout steps, health changes, decisions). Events passed to
//!   a write are stored in the same transaction, so a write that loses its race logs nothing.
//!
//! Everything is synchronous; async callers use `spawn_blocking`. Time is always an argument.
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//! use kiln_state::{Error, LockRequest, NewEvent, StateStore, WriteMeta};
//!
//! let dir = tempfile::tempdir()?;
//! let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
//! let store = StateStore::open(&kiln_state::default_path(dir.path()), now)?;
//!
//! let lock = store.lock(
//!     &LockRequest {
//!         operation: "apply".into(),
//!         who: "alice@build-1".into(),
//!         info: String::new(),
//!         lease: Duration::from_secs(60),
//!     },
//!     now,
//! )?;
//! let current = store.read::<serde_json::Value>()?;
//! assert_eq!(current.serial, 0);
//!
//! let meta = WriteMeta { actor: "alice".into(), operation: "apply".into() };
//! let event = NewEvent {
//!     service: Some("web".into()),
//!     kind: "release.created".into(),
//!     message: "web v1 created".into(),
//!     data: serde_json::json!({ "release": 1 }),
//! };
//! let doc = serde_json::json!({ "services": { "web": { "stable": 1 } } });
//! let serial = store.write(current.serial, &doc, &meta, &[event], now)?;
//! assert_eq!(serial, 1);
//!
//! // A writer that read serial 0 earlier loses: it must re-read and decide again.
//! let stale = store.write(0, &doc, &meta, &[], now);
//! assert!(matches!(stale, Err(Error::Conflict { expected: 0, found: 1 })));
//!
//! store.unlock(&lock.id)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod events;
mod lock;
mod store;
mod time;

use std::path::{Path, PathBuf};

pub use error::{Error, Result};
pub use events::{Event, NewEvent};
pub use lock::{LockInfo, LockRequest};
pub use store::{StateStore, VersionInfo, Versioned, WriteMeta};

/// Where the state database lives inside kiln's state directory: `state_dir/state.db`.
pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state.db")
}
