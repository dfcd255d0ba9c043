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
//! - **Audit log.** Every change and decision as an entry chained to the one before by hashes,
//!   with the state versions chained in, so that an edit of either the log or the state is
//!   found and named by [`StateStore::verify_audit`]. See [below](#the-audit-log).
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
//!
//! # The audit log
//!
//! The table `audit` holds one row per entry: `seq` (1, 2, 3, … without gaps), `time`, `actor`,
//! `kind`, `subject`, `git_commit`, `state_serial`, `state_hash`, `data` (JSON), `prev_hash` and
//! `hash`. Entries are only ever appended, each in a `BEGIN IMMEDIATE` transaction like a
//! write, so any number of processes appending to one file still make one chain.
//!
//! - [`StateStore::append_audit`] appends decisions (a plan approved, a rollout promoted, drift
//!   found). Each refers to the newest state version when it was appended: `state_serial` is
//!   its serial, `state_hash` the hash recorded when it was written.
//! - [`StateStore::write`] appends one entry of kind [`STATE_VERSION_KIND`] for the version it
//!   writes, in the same transaction: subject `serial N`, actor the writer, data
//!   `{"actor": …, "operation": …}`, `state_serial`/`state_hash` the new version and the
//!   sha256 of its JSON. [`StateStore::write_with_audit`] also appends the caller's entries
//!   after it, so a decision is logged if and only if the version it led to is written. A new
//!   file starts with the entry of version 0 (`init` by `kiln`). A file from before the audit
//!   log gets one entry per existing version when it is first opened, with the hash recorded
//!   at its write and data `{"actor", "operation", "written_at", "backfilled": true}`; entries
//!   are appended from then on.
//! - [`StateStore::audit`] reads the log, optionally since a time.
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//! use kiln_state::{AuditCheck, NewAuditEntry, StateStore, WriteMeta};
//!
//! let dir = tempfile::tempdir()?;
//! let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
//! let store = StateStore::open(&kiln_state::default_path(dir.path()), now)?;
//!
//! let approved = NewAuditEntry {
//!     actor: "alice@build-1".into(),
//!     kind: "plan.approved".into(),
//!     subject: "plan for web v2".into(),
//!     git_commit: Some("3f2a9c1".into()),
//!     data: serde_json::json!({ "changes": 1 }),
//! };
//! let meta = WriteMeta { actor: "alice".into(), operation: "apply".into() };
//! let (serial, logged) =
//!     store.write_with_audit(0, &serde_json::json!({ "web": 2 }), &meta, &[], &[approved], now)?;
//! assert_eq!(logged[0].subject, format!("serial {serial}"));
//! assert_eq!(logged[1].state_serial, Some(serial));
//!
//! // Entry 1 is version 0; then version 1 and the approval.
//! let AuditCheck::Ok { entries, head } = store.verify_audit()? else { panic!("tampered") };
//! assert_eq!((entries, head), (3, logged[1].hash.clone()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## The hash of an entry
//!
//! `hash` is `sha256:` followed by the lowercase hex SHA-256 of the UTF-8 bytes of this JSON
//! object, with exactly these keys in this order, no whitespace anywhere:
//!
//! ```text
//! {"actor":A,"data":D,"git_commit":G,"kind":K,"prev_hash":P,"seq":N,"state_hash":H,"state_serial":S,"subject":J,"time":T}
//! ```
//!
//! - `A`, `K`, `P`, `J`, `T` and (when present) `G` and `H` are JSON strings, escaped as RFC 8785
//!   does: `"` and `\` by a backslash, U+0008, U+0009, U+000A, U+000C and U+000D as `\b`,
//!   `\t`, `\n`, `\f`, `\r`, every other character below U+0020 as `\u00xx` (lowercase hex),
//!   everything else (non-ASCII included) as itself. `N` and `S` are decimal integers. An
//!   absent `G`, `H` or `S` is `null`.
//! - `D` is the `data` column's text, byte for byte. kiln writes it canonically (object keys
//!   sorted by UTF-16 code units as in RFC 8785, no whitespace, strings as above, numbers as
//!   `serde_json` writes them), but a verifier never re-encodes it: it splices in what is
//!   stored, so no JSON number formatting has to agree between tools.
//! - `prev_hash` of entry 1 is [`GENESIS_HASH`], `sha256:` followed by 64 zeros; of every other
//!   entry, the `hash` of the entry before.
//!
//! With these keys the object is RFC 8785 canonical JSON whenever `D` is. For example, in
//! Python, for a row `r` read from the `audit` table:
//!
//! ```python
//! s = lambda v: json.dumps(v, ensure_ascii=False)   # None -> null
//! text = ('{"actor":%s,"data":%s,"git_commit":%s,"kind":%s,"prev_hash":%s,"seq":%d,'
//!         '"state_hash":%s,"state_serial":%s,"subject":%s,"time":%s}') % (
//!     s(r.actor), r.data, s(r.git_commit), s(r.kind), s(r.prev_hash), r.seq,
//!     s(r.state_hash), s(r.state_serial), s(r.subject), s(r.time))
//! assert r.hash == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
//! ```
//!
//! ## What `verify_audit` guarantees, and what it does not
//!
//! [`StateStore::verify_audit`] reads the log and every version from one snapshot and reports
//! [`AuditCheck::Broken`] with the first entry that fails, and what differs:
//!
//! - an entry changed in any column (its content no longer hashes to its `hash`);
//! - an entry rewritten with a matching `hash`, or entries swapped (a `prev_hash` that is not
//!   the hash of the entry before);
//! - an entry deleted from the middle (a missing `seq`);
//! - a state version edited after it was logged, even when its recorded hash in `versions`
//!   was rewritten to match so that [`StateStore::verify`] passes (the `state_version` entry's
//!   `state_hash` differs from the version's JSON), or a logged version deleted;
//! - a state version written outside kiln, or whose entry was removed (no `state_version`
//!   entry covers its serial), and entries whose state reference is out of order.
//!
//! Otherwise it returns [`AuditCheck::Ok`] with the number of entries and the `head`, the
//! hash of the last entry. The log lives in the file it protects, so what it cannot see is
//! a consistent rewrite: someone who edits an entry and recomputes every hash after it, or
//! who cuts off entries at the end (after the last state version), or who replaces the whole
//! file, leaves a chain that checks out. Only a copy of an earlier head kept outside the file
//! catches that: an earlier head must still appear in the log (at the same `seq`), and the
//! current one must match the last copy taken. `kiln audit verify` prints the head for that
//! purpose; record it somewhere the state's writers cannot change (a CI log, a ticket, a
//! second machine). The hashes make tampering evident; they do not make it impossible, and
//! they say nothing about who made a change.

mod audit;
mod error;
mod events;
mod lock;
mod store;
mod time;

use std::path::{Path, PathBuf};

pub use audit::{AuditCheck, AuditEntry, GENESIS_HASH, NewAuditEntry, STATE_VERSION_KIND};
pub use error::{Error, Result};
pub use events::{Event, NewEvent};
pub use lock::{LockInfo, LockRequest};
pub use store::{StateStore, VersionInfo, Versioned, WriteMeta};

/// Where the state database lives inside kiln's state directory: `state_dir/state.db`.
pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state.db")
}
