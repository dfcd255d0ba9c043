//! The instance runtime interface: how kiln starts, watches and stops instances.
//!
//! A runtime is a [`Driver`]: six calls (start, status, observe, stop, list what runs, and its
//! name). The engine holds a [`Handle`] per instance in its state and never looks inside it;
//! after a crash it calls [`Driver::running`] to re-adopt what still runs and to find orphans.
//! For drift detection it calls [`Driver::observe`]: what an instance really runs (its
//! environment, command line and root), read from the runtime, never from kiln's own records
//! of what it asked for.
//!
//! Every driver passes the same [`conformance`] suite; [`fake::FakeDriver`] is an in-process
//! driver that fails on cue, for deterministic engine tests.
//!
//! Drivers never touch state or the proxy, and never change a running instance: the only
//! things they do to one are start it and stop it (non-negotiable 1, "replace, never mutate");
//! `observe` only reads.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use kiln_core::clock::SystemClock;
//! use kiln_driver::fake::{FakeControl, FakeDriver};
//! use kiln_driver::{Driver, InstanceSpec, Status, free_port};
//!
//! let control = FakeControl::new();
//! let driver = FakeDriver::new(control.clone(), Arc::new(SystemClock));
//! let log_dir = std::env::temp_dir();
//! let spec = InstanceSpec::new("web-v1-doc", "web", 1, free_port()?)
//!     .with_args(["/app/web"])
//!     .with_log_path(log_dir.join("kiln-driver-doc-web-v1.log"));
//! let handle = driver.start(&spec)?;
//! assert_eq!(driver.status(&handle)?, Status::Running);
//! let seen = driver.observe(&handle)?;
//! assert_eq!(seen.env.get("PORT"), spec.env.get("PORT"));
//! driver.stop(&handle, Duration::from_secs(1))?;
//! assert_eq!(driver.status(&handle)?, Status::Gone);
//! assert!(driver.observe(&handle).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod conformance;
mod error;
pub mod fake;

pub use error::{DriverError, Fault};

/// Everything a driver needs to start one instance. Built by the engine from the release.
///
/// `Debug` does not print environment values: they may hold secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Unique instance id, e.g. `web-v2-3f9a1c`: ASCII letters, digits, `-`, `_` and `.`,
    /// not starting with `.` (drivers use it in file names).
    pub id: String,
    /// The service the instance belongs to.
    pub service: String,
    /// The release number (`v2` is 2).
    pub release: u32,
    /// A directory holding the image's root filesystem; mounted read-only.
    pub rootfs: PathBuf,
    /// Entrypoint + cmd; the first is the program, an absolute path inside the image (or a
    /// name looked up on the image's `PATH`).
    pub args: Vec<String>,
    /// The whole environment of the app. The engine already put `PORT` and
    /// `KILN_INSTANCE_ID` in here; drivers add nothing.
    pub env: BTreeMap<String, String>,
    /// The working directory inside the image; `/` when the image sets none.
    pub workdir: String,
    /// The host port kiln assigned. Instances share the host network and listen on
    /// 127.0.0.1 or 0.0.0.0 at this port.
    pub port: u16,
    /// stdout and stderr are appended here.
    pub log_path: PathBuf,
    /// The image's user, numeric (the engine resolves names against the image's
    /// `/etc/passwd`); `None` runs the app as root inside, without capabilities.
    pub user: Option<User>,
    /// The release the instance belongs to, for runtimes that group instances by release
    /// (an Auto Scaling group and a target group per release on AWS). The local runtime
    /// does not need it.
    pub release_info: ReleaseInfo,
}

/// What a runtime that groups instances by release needs to know of the release.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReleaseInfo {
    /// The image's digest (`sha256:…`), which names its machine image on a cloud.
    pub image_digest: String,
    /// The HTTP health check path, if the service has a health check.
    pub health_path: Option<String>,
    /// The most instances of the release that may run at once (the service's instances and
    /// the rollout's surge).
    pub max_instances: u32,
    /// The deployment (apply) that made the release.
    pub deployment_id: String,
    /// The git commit the release was made from, if known.
    pub commit: Option<String>,
}

/// A numeric user and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl InstanceSpec {
    /// A spec with `PORT` and `KILN_INSTANCE_ID` set, workdir `/`, and everything else empty;
    /// fill the rest with the `with_*` methods or field by field.
    pub fn new(id: &str, service: &str, release: u32, port: u16) -> Self {
        let env = BTreeMap::from([
            ("PORT".to_owned(), port.to_string()),
            ("KILN_INSTANCE_ID".to_owned(), id.to_owned()),
        ]);
        Self {
            id: id.to_owned(),
            service: service.to_owned(),
            release,
            rootfs: PathBuf::new(),
            args: Vec::new(),
            env,
            workdir: "/".to_owned(),
            port,
            log_path: PathBuf::new(),
            user: None,
            release_info: ReleaseInfo::default(),
        }
    }

    /// Sets the root filesystem directory.
    #[must_use]
    pub fn with_rootfs(mut self, rootfs: impl Into<PathBuf>) -> Self {
        self.rootfs = rootfs.into();
        self
    }

    /// Sets the command line.
    #[must_use]
    pub fn with_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the log file.
    #[must_use]
    pub fn with_log_path(mut self, log_path: impl Into<PathBuf>) -> Self {
        self.log_path = log_path.into();
        self
    }

    /// Adds one environment variable.
    #[must_use]
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Checks what every driver relies on; a failure is the spec's fault.
    pub fn validate(&self) -> Result<(), DriverError> {
        let bad = |reason: String| {
            Err(DriverError::InvalidSpec {
                id: self.id.clone(),
                reason,
            })
        };
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 128
            && !self.id.starts_with('.')
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !id_ok {
            return bad(format!(
                "expected an id of letters, digits, '-', '_' or '.', found {:?}",
                self.id
            ));
        }
        match self.args.first() {
            None => return bad("expected a command, found empty args".to_owned()),
            Some(p) if p.is_empty() => return bad("expected a program, found \"\"".to_owned()),
            Some(_) => {}
        }
        if !self.workdir.starts_with('/') {
            return bad(format!(
                "expected an absolute workdir, found {:?}",
                self.workdir
            ));
        }
        if let Some(k) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return bad(format!(
                "expected environment names without '=', found {k:?}"
            ));
        }
        if self.port == 0 {
            return bad("expected a host port, found 0".to_owned());
        }
        Ok(())
    }
}

impl fmt::Debug for InstanceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceSpec")
            .field("id", &self.id)
            .field("service", &self.service)
            .field("release", &self.release)
            .field("rootfs", &self.rootfs)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("workdir", &self.workdir)
            .field("port", &self.port)
            .field("log_path", &self.log_path)
            .field("user", &self.user)
            .finish()
    }
}

/// What a driver needs to find an instance again. The engine keeps it in state, opaque.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Handle {
    /// The instance id.
    pub id: String,
    /// Driver-specific data (for the local driver: its run record).
    pub data: serde_json::Value,
}

/// What an instance is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Status {
    /// Its process runs (healthy or not: health is the proxy's job).
    Running,
    /// It ended by itself or was killed; `code` is `None` when killed by a signal or when the
    /// driver could not learn it.
    Exited {
        /// The exit code, if known.
        code: Option<i32>,
    },
    /// Nothing of it runs and the driver knows nothing more (stopped, or never existed).
    Gone,
}

/// What an instance really runs, as its runtime sees it now.
///
/// Read from the runtime (for the local driver: `/proc`), not from what kiln asked for, so
/// that comparing it with the instance's spec finds drift. `Debug` prints environment keys
/// only: values may hold secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Observed {
    /// The app's environment as the kernel holds it (`/proc/<pid>/environ` of the app). May
    /// hold secrets: never log or print values. `Debug` prints keys only.
    pub env: BTreeMap<String, String>,
    /// The app's command line now (`/proc/<pid>/cmdline`).
    pub args: Vec<String>,
    /// The directory the instance's root filesystem is mounted from, on the host, if the
    /// runtime knows it.
    pub rootfs: Option<PathBuf>,
    /// Whether the instance's root is that very directory: `(st_dev, st_ino)` of the app's
    /// root (`/proc/<pid>/root`) equal those of `rootfs` now. `None` when it cannot be told
    /// (e.g. the sandbox root is a tmpfs holding binds, or no permission).
    pub root_is_rootfs: Option<bool>,
    /// The app's pid on the host, for messages.
    pub pid: Option<i32>,
    /// Differences the runtime itself sees between the instance and what it was started as
    /// (on AWS: the AMI it booted, its launch template version, kiln's tags on it). Empty
    /// when the runtime has nothing of the kind to compare.
    pub mismatches: Vec<Mismatch>,
}

/// One difference between an instance and what it was started as, seen by its runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Whether the instance runs another image, or is configured otherwise.
    pub kind: MismatchKind,
    /// What differs, e.g. `ami` or `tag kiln:release`.
    pub subject: String,
    /// What it was started as.
    pub expected: String,
    /// What it is now.
    pub found: String,
}

/// What a [`Mismatch`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MismatchKind {
    /// The instance runs another image (machine image, launch template version).
    Image,
    /// Its configuration differs (tags, settings).
    Config,
}

/// What the engine expects of one release's group of instances, for runtimes that keep
/// groups (an Auto Scaling group per release on AWS).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupExpectation {
    /// The service.
    pub service: String,
    /// The release.
    pub release: u32,
    /// Its instances, as the engine's state has them.
    pub instances: Vec<Handle>,
    /// The most instances the group may hold.
    pub max_instances: u32,
}

/// A group that differs from what the engine expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupFinding {
    /// The service.
    pub service: String,
    /// The release, when the group has one.
    pub release: Option<u32>,
    /// What differs, e.g. `group kiln-shop-web-v2 desired capacity`.
    pub subject: String,
    /// What the engine expects.
    pub expected: String,
    /// What the runtime has.
    pub found: String,
}

impl fmt::Debug for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("args", &self.args)
            .field("rootfs", &self.rootfs)
            .field("root_is_rootfs", &self.root_is_rootfs)
            .field("pid", &self.pid)
            .finish()
    }
}

/// An instance runtime. Implementations are cheap to call from several threads.
pub trait Driver: Send + Sync {
    /// A short name for logs and state, e.g. `local`.
    fn name(&self) -> &'static str;

    /// Starts an instance. Returns once its process is started, not once it is healthy:
    /// health is the proxy's job.
    fn start(&self, spec: &InstanceSpec) -> Result<Handle, DriverError>;

    /// What the instance is doing now.
    fn status(&self, handle: &Handle) -> Result<Status, DriverError>;

    /// What the instance really runs now, read from the runtime: the app's environment and
    /// command line, and whether its root is still the image root it was started from.
    /// Changes nothing.
    ///
    /// Fails with [`DriverError::NotRunning`] when the instance does not run (it exited, was
    /// stopped, or never existed): [`status`](Self::status) tells which. A retryable
    /// [`DriverError::Runtime`] when the instance is still being set up (its app not yet
    /// executed), a non-retryable one when the runtime will not tell (e.g. no permission to
    /// read the app's environment).
    fn observe(&self, handle: &Handle) -> Result<Observed, DriverError>;

    /// Sends SIGTERM to the whole instance, waits up to `grace`, then SIGKILLs it. Blocks until
    /// nothing of it runs. Idempotent: stopping a gone instance is `Ok`.
    fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), DriverError>;

    /// Every instance this driver's runtime knows that still runs (after a crash: to re-adopt
    /// them or to find orphans).
    fn running(&self) -> Result<Vec<Handle>, DriverError>;

    /// Whether instances share this host's network, so that each needs a free host port
    /// (the local runtime). A runtime whose instances have addresses of their own (virtual
    /// machines) returns `false`: the engine then gives every instance the service's port.
    fn host_ports(&self) -> bool {
        true
    }

    /// Compares the runtime's groups of instances with `expected` (one per release that
    /// has instances): sizes, limits and settings changed outside kiln, groups of releases
    /// kiln no longer runs. Instances in those groups that kiln did not start are not
    /// reported here: [`running`](Self::running) lists them. A runtime without groups has
    /// nothing to report.
    fn check_groups(
        &self,
        expected: &[GroupExpectation],
    ) -> Result<Vec<GroupFinding>, DriverError> {
        let _ = expected;
        Ok(Vec::new())
    }

    /// Makes a release's group match `expected` again (its size and settings), without
    /// touching the instances it expects. A runtime without groups has nothing to do.
    fn repair_group(&self, expected: &GroupExpectation) -> Result<(), DriverError> {
        let _ = expected;
        Ok(())
    }
}

/// A port that was free a moment ago: binds 127.0.0.1:0, reads the port, closes.
///
/// Racy by nature (another process may take it before the instance binds it); good enough for
/// assigning instance ports on one machine and for tests.
pub fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn debug_hides_environment_values() {
        let spec = InstanceSpec::new("a", "web", 1, 8080).with_env("DB_PASSWORD", "hunter2");
        let text = format!("{spec:?}");
        assert!(text.contains("DB_PASSWORD"));
        assert!(!text.contains("hunter2"));
    }

    #[test]
    fn observed_debug_hides_environment_values() {
        let seen = Observed {
            env: BTreeMap::from([("DB_PASSWORD".to_owned(), "hunter2".to_owned())]),
            args: vec!["/app/web".to_owned()],
            rootfs: Some("/images/web".into()),
            root_is_rootfs: Some(true),
            pid: Some(42),
            mismatches: Vec::new(),
        };
        let text = format!("{seen:?}");
        assert!(text.contains("DB_PASSWORD"), "{text}");
        assert!(text.contains("/app/web"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn not_running_is_nobodys_bug_and_final() {
        let err = DriverError::NotRunning {
            id: "web-v1-a".into(),
        };
        assert_eq!(err.fault(), Fault::Runtime);
        assert!(!err.is_retryable());
        assert_eq!(err.to_string(), "instance web-v1-a is not running");
    }

    #[test]
    fn validate_names_the_problem() {
        let ok = InstanceSpec::new("web-v1-abc", "web", 1, 8080).with_args(["/app"]);
        assert!(ok.validate().is_ok());
        let cases = [
            (ok.clone().with_args(Vec::<String>::new()), "empty args"),
            (
                InstanceSpec {
                    workdir: "app".into(),
                    ..ok.clone()
                },
                "absolute workdir",
            ),
            (ok.clone().with_env("A=B", "c"), "without '='"),
            (InstanceSpec { port: 0, ..ok }, "found 0"),
        ];
        for (spec, needle) in cases {
            let err = spec.validate().expect_err(needle);
            assert_eq!(err.fault(), Fault::Spec);
            assert!(!err.is_retryable());
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        }
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port().expect("free port");
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind the free port");
    }

    #[test]
    fn status_json_shape_is_stable() {
        let json = serde_json::to_string(&Status::Exited { code: Some(3) }).expect("json");
        assert_eq!(json, r#"{"state":"exited","code":3}"#);
        let json = serde_json::to_string(&Status::Gone).expect("json");
        assert_eq!(json, r#"{"state":"gone"}"#);
    }

    proptest! {
        // Ids become file names: an accepted id never walks out of a directory.
        #[test]
        fn accepted_ids_are_safe_file_names(id in "\\PC{0,20}") {
            let spec = InstanceSpec::new(&id, "web", 1, 8080).with_args(["/app"]);
            if spec.validate().is_ok() {
                prop_assert!(!id.contains('/') && !id.starts_with('.') && !id.is_empty());
            }
        }
    }
}
