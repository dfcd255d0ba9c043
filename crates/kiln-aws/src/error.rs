//! The one error type of this crate.

use crate::LockInfo;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with the S3 state or the DynamoDB lock.
///
/// No variant carries credentials: SDK failures are kept as the SDK's description of the
/// request that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An AWS call failed for a reason other than the conditions this crate checks (network,
    /// credentials, permissions, a missing bucket or table, throttling…).
    #[error(
        "{service} {operation} on {target} failed: {detail}; check the credentials (AWS_PROFILE or AWS_ACCESS_KEY_ID), the region, and that {target} exists and is reachable"
    )]
    Aws {
        /// The service: `S3`, `DynamoDB`, `EC2`, `AutoScaling`, `ELBv2`, `SSM`.
        service: &'static str,
        /// The API call, e.g. `PutObject`.
        operation: &'static str,
        /// What the call was about, e.g. `s3://bucket/key` or `launch template kiln-shop-web`.
        target: String,
        /// The SDK's description of the failure.
        detail: String,
    },

    /// [`crate::S3State::create`] found a state already there.
    #[error("state s3://{bucket}/{key} already exists; read it instead of creating it")]
    AlreadyExists {
        /// The bucket.
        bucket: String,
        /// The object key.
        key: String,
    },

    /// A write found no state to replace.
    #[error("state s3://{bucket}/{key} does not exist; create it first (kiln state migrate)")]
    Missing {
        /// The bucket.
        bucket: String,
        /// The object key.
        key: String,
    },

    /// The state changed since the writer read it: its ETag no longer matches (HTTP 412).
    #[error(
        "state changed since it was read: expected serial {expected_serial}, found {}; read it again and retry",
        found.map_or_else(|| "another version".to_owned(), |s| format!("serial {s}"))
    )]
    Stale {
        /// The serial the writer read.
        expected_serial: u64,
        /// The serial stored now, when it could be read.
        found: Option<u64>,
    },

    /// The stored state belongs to another history than the one the writer read.
    #[error(
        "state s3://{bucket}/{key} has lineage {found}, not {expected}: it is another state; check the backend's bucket and key"
    )]
    ForeignLineage {
        /// The bucket.
        bucket: String,
        /// The object key.
        key: String,
        /// The lineage the writer read.
        expected: String,
        /// The lineage stored.
        found: String,
    },

    /// The stored serial is lower than the one the writer read: the object was rolled back
    /// outside kiln.
    #[error(
        "state serial went backwards: read serial {expected_serial}, now {found}; someone restored an older version outside kiln, inspect it before writing"
    )]
    SerialRegressed {
        /// The serial the writer read.
        expected_serial: u64,
        /// The serial stored now.
        found: u64,
    },

    /// The writer's lease was taken over (or released): its fencing token is no longer the
    /// lock's.
    #[error(
        "state lock lease {lease_id} (fencing token {token}) is no longer held{}; stop: this process no longer owns the state",
        current.map_or_else(|| ", and nobody holds the lock now".to_owned(), |t| format!(": the lock's token is now {t}"))
    )]
    Fenced {
        /// The writer's lease.
        lease_id: String,
        /// The writer's fencing token.
        token: u64,
        /// The token of the lock's current holder, if any.
        current: Option<u64>,
    },

    /// Someone else holds the lock and its lease has not run out. Boxed to keep `Result` small.
    #[error(
        "state is locked by {} ({}) since {}, until {}, lease {}; wait, or if that process is gone run kiln state force-unlock {}",
        .0.operation, .0.who, .0.created, .0.expires, .0.id, .0.id
    )]
    Locked(Box<LockInfo>),

    /// Renew or release of a lease that no longer holds the lock.
    #[error(
        "state lock lease {lease_id} is no longer held{}",
        current.as_deref().map_or_else(|| ": the state is unlocked now".to_owned(), |id| format!(": lease {id} holds it now"))
    )]
    LockLost {
        /// The lease the caller thought it held.
        lease_id: String,
        /// The lease holding the lock now, if any.
        current: Option<String>,
    },

    /// `force-unlock` named a lease other than the one holding the lock.
    #[error("lock id {given} does not match the current lock {current}; nothing was unlocked")]
    LockIdMismatch {
        /// The id given.
        given: String,
        /// The id of the lease holding the lock.
        current: String,
    },

    /// `force-unlock` when nobody holds the lock.
    #[error("state is not locked; nothing to unlock for lock id {given}")]
    NotLocked {
        /// The id given.
        given: String,
    },

    /// The state bucket does not keep old versions.
    #[error(
        "bucket {bucket} does not have versioning enabled, so old state versions would be lost; run: aws s3api put-bucket-versioning --bucket {bucket} --versioning-configuration Status=Enabled"
    )]
    VersioningDisabled {
        /// The bucket.
        bucket: String,
    },

    /// Something stored is not what kiln writes.
    #[error("{what} is damaged: {detail}")]
    Damaged {
        /// What was read, e.g. `state s3://bucket/key`.
        what: String,
        /// What is wrong with it.
        detail: String,
    },

    /// The document to write could not be turned into JSON.
    #[error("cannot encode the state document as json: {0}")]
    Encode(#[source] serde_json::Error),

    /// kiln's AWS resources cannot be made what was asked: an instance that stopped or took
    /// too long while starting, a route the load balancer cannot express, a target without
    /// subnets, a resource being deleted.
    #[error("{what}: {detail}")]
    Fleet {
        /// The resource or request, e.g. `instance i-0abc (kiln instance web-3)`.
        what: String,
        /// What is wrong and what to do about it.
        detail: String,
    },

    /// The source AMI of a bake cannot be resolved to exactly one image: no such id, no image
    /// matches the filters, or several match and `most_recent` is off.
    #[error("source AMI: {detail}")]
    SourceAmi {
        /// What was looked for, what was found, and what to change.
        detail: String,
    },

    /// An AMI bake's inputs are unusable; nothing was created.
    #[error("AMI bake: {detail}")]
    AmiBake {
        /// Which input is wrong and how to fix it.
        detail: String,
    },

    /// A bake gave up waiting for AWS to reach a state.
    #[error(
        "gave up waiting for {what} after {polls} polls; last seen: {last}; raise max_polls or the poll interval if AWS is just slow"
    )]
    AmiWait {
        /// What was awaited, e.g. `builder instance i-0abc to be running`.
        what: String,
        /// How many times it was polled.
        polls: u32,
        /// What the last poll saw.
        last: String,
    },

    /// The install script failed on the builder instance.
    #[error(
        "install on builder instance {instance} ended {status} (SSM command {command_id}); {output}"
    )]
    AmiInstall {
        /// The builder instance.
        instance: String,
        /// The SSM Run Command id (`aws ssm get-command-invocation` shows the whole output).
        command_id: String,
        /// The command's final status, e.g. `Failed` or `TimedOut`.
        status: String,
        /// The end of its standard output and error.
        output: String,
    },

    /// The builder instance stopped or went away while it was needed.
    #[error("builder instance {instance}: {detail}")]
    AmiBuilder {
        /// The builder instance.
        instance: String,
        /// What happened to it.
        detail: String,
    },

    /// An AMI is missing, failed, or not kiln's to change.
    #[error("AMI {ami_id}: {detail}")]
    Ami {
        /// The AMI.
        ami_id: String,
        /// What is wrong with it and what to do.
        detail: String,
    },
}

/// An [`Error::Aws`] for a failed SDK call; `err` is described with its whole source chain.
pub(crate) fn aws<E: std::error::Error + 'static>(
    service: &'static str,
    operation: &'static str,
    target: impl Into<String>,
    err: &E,
) -> Error {
    Error::Aws {
        service,
        operation,
        target: target.into(),
        detail: aws_sdk_s3::error::DisplayErrorContext(err).to_string(),
    }
}
