//! kiln on AWS. This first slice is the team state backend: the state document in S3, the
//! state lock in DynamoDB. It mirrors the semantics of `kiln-state`'s SQLite store:
//!
//! - **Versions.** The state is one JSON object in S3,
//!   `{"lineage", "serial", "written_at", "actor", "operation", "doc"}`. Creating it uses
//!   `If-None-Match: *`, so two creators cannot both win ([`Error::AlreadyExists`]); every write
//!   is a compare-and-swap on the object's ETag (`If-Match`), so a writer that read an older
//!   version loses ([`Error::Stale`]) instead of overwriting. Bucket versioning keeps every
//!   version; [`S3State::versions`] lists them, oldest first.
//! - **Lock.** One DynamoDB item per state (`LockID` = `<bucket>/<key>`) with a lease and a
//!   *fencing token* that grows by one whenever the lock is taken. Taking it is one conditional
//!   write: it succeeds when nobody holds the lock or the holder's lease ran out. Before writing
//!   the state, [`S3State::write`] checks (consistent read) that the token is still the writer's,
//!   so a holder whose lease was taken over is refused ([`Error::Fenced`]) instead of
//!   overwriting the new holder's work. The item outlives [`DynamoLock::release`] (only the
//!   holder's fields go), so the token never goes back.
//!
//! Time is always an argument: nothing here reads the clock.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kiln_aws::Error> {
//! use std::time::{Duration, SystemTime, UNIX_EPOCH};
//! use kiln_aws::{AwsSettings, LockRequest, S3State, WriteMeta, sdk_config};
//!
//! let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
//! let conf = sdk_config(&AwsSettings { region: "eu-west-1".into(), endpoint_url: None }).await;
//! let state = S3State::new(&conf, "acme-kiln-state", "prod/kiln.json", "kiln-locks");
//! let lease = state
//!     .lock()
//!     .acquire(
//!         &LockRequest { operation: "apply".into(), who: "alice@build-1".into(), info: String::new() },
//!         Duration::from_secs(60),
//!         now,
//!     )
//!     .await?;
//! let current = state.read().await?.expect("state created by kiln state migrate");
//! let meta = WriteMeta { actor: "alice".into(), operation: "apply".into() };
//! let doc = serde_json::json!({ "services": {} });
//! let written = state.write(&current, &doc, &meta, &lease, now).await?;
//! assert_eq!(written.serial, current.serial + 1);
//! state.lock().release(&lease).await?;
//! # Ok(()) }
//! ```

mod ami;
mod blocker;
mod config;
mod error;
mod fleet;
mod lock;
mod meta;
mod runtime;
mod state;
/// Helpers for tests against an AWS emulator such as moto: the SDK configured for it, and the
/// VPC, subnets, security group, buckets and lock tables the tests need.
pub mod testing;
mod time;

pub use ami::{
    AmiBake, BakedAmi, INSTALL_SCRIPT_VERSION, ResolvedAmi, SourceAmi, bake, deregister,
    find_baked, inputs_hash, install_script, resolve_source,
};
pub use blocker::Blocker;
pub use config::{AwsSettings, sdk_config};
pub use error::{Error, Result};
pub use fleet::{
    AwsTarget, Balancer, Fleet, GroupView, InstanceState, InstanceView, MANAGED_BY, PREVIEW_HEADER,
    ReleaseResources, ReleaseSpec, RouteSpec, SUSPENDED_PROCESSES, TAG_BALANCER, TAG_COMMIT,
    TAG_DEPLOYMENT, TAG_INSTANCE, TAG_MANAGED_BY, TAG_PROJECT, TAG_RELEASE, TAG_SERVICE,
    TargetHealth,
};
pub use lock::{DynamoLock, Lease, LockInfo, LockRequest};
pub use runtime::{AlbTraffic, AwsDriver, AwsRuntime, user_data};
pub use state::{Current, S3State, VersionInfo, WriteMeta};
