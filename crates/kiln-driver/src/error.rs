//! Driver errors say who is at fault and whether trying again may help.

use std::io;

/// Who is at fault for a [`DriverError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The instance spec or its image (a missing program, a bad id): fix the input.
    Spec,
    /// The runtime or the host (no sandbox tool, a failed spawn, a full disk), or the
    /// instance itself is no longer there to act on ([`DriverError::NotRunning`]).
    Runtime,
    /// kiln itself: a handle this driver did not make. A bug, never retried.
    Internal,
}

/// Why a driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The spec cannot be run as given.
    #[error("invalid spec for instance {id}: {reason}")]
    InvalidSpec {
        /// The instance id.
        id: String,
        /// What was expected and what was found.
        reason: String,
    },
    /// The runtime cannot run anything on this host until it is set up.
    #[error("the {driver} runtime is unavailable: {reason}")]
    Unavailable {
        /// The driver's name.
        driver: &'static str,
        /// What is missing.
        reason: String,
    },
    /// A system call or a spawned tool failed.
    #[error("{op} instance {id}: {source}")]
    Runtime {
        /// What was being done (`start`, `stop`, ...).
        op: &'static str,
        /// The instance id.
        id: String,
        /// The underlying failure.
        #[source]
        source: io::Error,
        /// Whether the same call may succeed later (a busy port, a slow kernel).
        retryable: bool,
    },
    /// The instance does not run (it exited, was stopped, or never existed), so there is
    /// nothing to look at. [`Driver::status`](crate::Driver::status) tells which. Never
    /// retryable: it will not run again by itself (kiln replaces, never restarts).
    #[error("instance {id} is not running")]
    NotRunning {
        /// The instance id.
        id: String,
    },
    /// The handle was not made by this driver, or its data is damaged.
    #[error("handle for instance {id} is not a {driver} handle: {reason}")]
    BadHandle {
        /// The driver's name.
        driver: &'static str,
        /// The instance id in the handle.
        id: String,
        /// What did not parse.
        reason: String,
    },
}

impl DriverError {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Self::InvalidSpec { .. } => Fault::Spec,
            Self::Unavailable { .. } | Self::Runtime { .. } | Self::NotRunning { .. } => {
                Fault::Runtime
            }
            Self::BadHandle { .. } => Fault::Internal,
        }
    }

    /// Whether the same call may succeed if tried again unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Runtime {
                retryable: true,
                ..
            }
        )
    }

    /// A runtime failure of `op` on instance `id`; retryable when the error kind suggests a
    /// transient condition.
    pub fn runtime(op: &'static str, id: &str, source: io::Error) -> Self {
        let retryable = matches!(
            source.kind(),
            io::ErrorKind::AddrInUse
                | io::ErrorKind::Interrupted
                | io::ErrorKind::TimedOut
                | io::ErrorKind::WouldBlock
                | io::ErrorKind::ResourceBusy
                | io::ErrorKind::OutOfMemory
        );
        Self::Runtime {
            op,
            id: id.to_owned(),
            source,
            retryable,
        }
    }
}
