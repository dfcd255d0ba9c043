//! The local runtime: each instance is a sandboxed process on this machine, started from its
//! image's root filesystem mounted read-only.
//!
//! With bubblewrap (`bwrap` on `PATH`, or `$KILN_BWRAP`) an instance runs as
//!
//! ```text
//! bwrap --ro-bind ROOTFS / --dev /dev --proc /proc --tmpfs /tmp --tmpfs /run \
//!       --unshare-pid --unshare-ipc --unshare-uts --unshare-cgroup-try --new-session \
//!       [--unshare-user --uid U --gid G] [--cap-drop ALL] --clearenv --setenv K V… \
//!       --chdir WORKDIR -- ARGS…
//! ```
//!
//! The root is read-only and nothing of the host's file system is visible; the network is the
//! host's, so kiln's proxy reaches the app on its `PORT`. An image without `/dev`, `/proc`,
//! `/tmp` and `/run` directories gets a tmpfs root holding read-only binds of its top-level
//! entries, remounted read-only. Run by root, the app keeps no capabilities (`--cap-drop
//! ALL`; bubblewrap also sets no_new_privs) and runs as the image's user when the spec names
//! one (inside a user namespace: that is the only way bubblewrap changes the uid).
//!
//! There is deliberately no `--die-with-parent`: instances outlive a killed kiln server, which
//! re-adopts them from the runtime directory on restart. bubblewrap is spawned in its own
//! process group with stdin from `/dev/null` and stdout and stderr appended to the log file,
//! and reaped by a background thread, so no zombie lingers while the server lives.
//!
//! Without bubblewrap, root runs the app with `chroot ROOTFS ARGS…` and a loud warning: the
//! root is then **not** read-only and the app is not isolated beyond its file system view.
//! Otherwise `start` fails with [`DriverError::Unavailable`].
//!
//! # Identity and stopping
//!
//! The runtime directory holds one [`Record`] per instance (`<id>.json`, written atomically).
//! Processes are named by pid *and* start time (field 22 of `/proc/<pid>/stat`), so a reused
//! pid is never mistaken for an instance. Under bubblewrap the instance is its pid namespace:
//! `stop` sends SIGTERM to every process in it (also those that left the app's process group),
//! waits up to the grace period, then SIGKILLs the namespace's init, which makes the kernel
//! kill everything in it. Under `chroot` the instance is its process group.
//!
//! Exit codes are what bubblewrap reports: an app killed by signal N exits with 128 + N. An
//! exit is known only to the driver value that spawned the instance (its reaper thread saw
//! it); a driver that re-adopted an instance reports `Gone` once nothing of it runs. The
//! chroot fallback mounts nothing: the app gets no `/dev` or `/proc` unless the image ships
//! them.
//!
//! # Observing
//!
//! [`Driver::observe`] reads what the app really runs from `/proc`, never from the record:
//! its environment (`/proc/<pid>/environ`, what it was executed with), its command line, and whether its root (`stat` of `/proc/<pid>/root`) is
//! still the very directory (`st_dev`, `st_ino`) at the recorded rootfs path. The app is, under
//! bubblewrap, the oldest process of the sandbox's pid namespace besides bubblewrap's init
//! (the process bubblewrap executed; its children are younger), under `chroot` the leader. It
//! is named by pid and start time like every process here: what was read counts only if that
//! very process still runs afterwards. Until the app is executed (bubblewrap still setting up,
//! for a few milliseconds after `start`) `observe` waits briefly, then fails retryably. An
//! image composed on a tmpfs root ([`RootMount::Composed`]) has no single root directory, so
//! whether it is the rootfs cannot be told (`None`). The environment holds what the sandbox
//! adds: bubblewrap sets `PWD` (the workdir), and a shell in the image may export more.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use kiln_core::clock::SystemClock;
//! use kiln_driver::{Driver, InstanceSpec};
//! use kiln_driver_local::LocalDriver;
//!
//! let driver = LocalDriver::new(".kiln/run".into(), Arc::new(SystemClock));
//! let spec = InstanceSpec::new("web-v1-3f9a1c", "web", 1, 41001)
//!     .with_rootfs(".kiln/rootfs/web-v1")
//!     .with_args(["/app/web"])
//!     .with_log_path(".kiln/logs/web-v1-3f9a1c.log");
//! let handle = driver.start(&spec)?;
//! // ... after a restart, a new driver over the same directory finds it again:
//! let again = LocalDriver::new(".kiln/run".into(), Arc::new(SystemClock));
//! for handle in again.running()? {
//!     again.stop(&handle, Duration::from_secs(10))?;
//! }
//! # Ok::<(), kiln_driver::DriverError>(())
//! ```

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kiln_core::clock::Clock;
use kiln_driver::{Driver, DriverError, Handle, InstanceSpec, Observed, Status};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

mod procfs;
mod record;
mod sandbox;

pub use record::{NsInit, Proc, Record, RootMount, SandboxKind};
pub use sandbox::Sandbox;

const NAME: &str = "local";

/// How often `stop` and `start` look at `/proc`.
const POLL: Duration = Duration::from_millis(10);
/// How long `start` waits for bubblewrap to create the sandbox.
const SANDBOX_SETUP: Duration = Duration::from_secs(5);
/// How long a SIGKILLed instance may take to disappear before `stop` reports an error.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long `status` and `stop` wait for the reaper thread to collect an exit it is about to
/// see.
const REAP_WAIT: Duration = Duration::from_secs(2);
/// How long `observe` waits for a starting instance's app to be executed.
const EXEC_WAIT: Duration = Duration::from_secs(2);

/// The local runtime driver. See the [crate docs](crate).
pub struct LocalDriver {
    runtime_dir: PathBuf,
    clock: Arc<dyn Clock>,
    sandbox: Option<Sandbox>,
    children: Arc<Children>,
}

impl std::fmt::Debug for LocalDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDriver")
            .field("runtime_dir", &self.runtime_dir)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

/// Exits of the instances this driver value spawned, as its reaper threads see them.
#[derive(Debug, Default)]
struct Children {
    exits: Mutex<HashMap<String, Reaped>>,
    changed: Condvar,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reaped {
    /// The reaper is still waiting.
    Live,
    /// It exited with this code (`None`: killed by a signal).
    Exited(Option<i32>),
}

impl Children {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Reaped>> {
        self.exits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exit of `id` if this driver spawned it, waiting briefly when its process is already
    /// gone but the reaper has not recorded it yet.
    fn exit(&self, id: &str) -> Option<Option<i32>> {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, REAP_WAIT, |m| m.get(id) == Some(&Reaped::Live))
            .unwrap_or_else(|e| e.into_inner());
        match guard.get(id) {
            Some(Reaped::Exited(code)) => Some(*code),
            _ => None,
        }
    }

    fn reap(&self, id: &str, mut child: Child) {
        let code = match child.wait() {
            Ok(status) => status.code(),
            Err(e) => {
                tracing::warn!(instance = %id, "waiting for the instance failed: {e}");
                None
            }
        };
        tracing::info!(instance = %id, ?code, "instance exited");
        if let Some(state) = self.lock().get_mut(id) {
            *state = Reaped::Exited(code);
        }
        self.changed.notify_all();
    }
}

impl LocalDriver {
    /// A driver keeping its records in `runtime_dir` (e.g. `.kiln/run`), sandboxing with what
    /// [`Sandbox::detect`] finds.
    pub fn new(runtime_dir: PathBuf, clock: Arc<dyn Clock>) -> Self {
        let sandbox = Sandbox::detect();
        match &sandbox {
            Some(Sandbox::Chroot { .. }) => tracing::warn!(
                "bubblewrap not found: instances will run with chroot, their root NOT \
                 read-only and NOT isolated; install bubblewrap"
            ),
            None => tracing::warn!(
                "neither bubblewrap nor root for chroot: the local runtime cannot start \
                 instances"
            ),
            Some(Sandbox::Bubblewrap { .. }) => {}
        }
        Self::with_sandbox(runtime_dir, clock, sandbox)
    }

    /// A driver with an explicit sandbox choice (`None`: every start fails).
    pub fn with_sandbox(
        runtime_dir: PathBuf,
        clock: Arc<dyn Clock>,
        sandbox: Option<Sandbox>,
    ) -> Self {
        Self {
            runtime_dir,
            clock,
            sandbox,
            children: Arc::default(),
        }
    }

    /// The sandbox instances run in.
    pub fn sandbox(&self) -> Option<&Sandbox> {
        self.sandbox.as_ref()
    }

    fn record(handle: &Handle) -> Result<Record, DriverError> {
        let record: Record =
            serde_json::from_value(handle.data.clone()).map_err(|e| DriverError::BadHandle {
                driver: NAME,
                id: handle.id.clone(),
                reason: e.to_string(),
            })?;
        if record.id != handle.id || record.version != record::VERSION {
            return Err(DriverError::BadHandle {
                driver: NAME,
                id: handle.id.clone(),
                reason: format!(
                    "expected a version {} record for {}, found version {} for {}",
                    record::VERSION,
                    handle.id,
                    record.version,
                    record.id
                ),
            });
        }
        Ok(record)
    }

    fn handle(record: &Record) -> Result<Handle, DriverError> {
        let data = serde_json::to_value(record)
            .map_err(|e| DriverError::runtime("record", &record.id, e.into()))?;
        Ok(Handle {
            id: record.id.clone(),
            data,
        })
    }

    fn spawn(&self, spec: &InstanceSpec, sandbox: &Sandbox) -> Result<Record, DriverError> {
        let rt = |e: io::Error| DriverError::runtime("start", &spec.id, e);
        let (cmd, root) = sandbox.command(spec)?;
        let mut cmd = gated(&cmd);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .map_err(|e| {
                rt(io::Error::new(
                    e.kind(),
                    format!("open log {}: {e}", spec.log_path.display()),
                ))
            })?;
        cmd.stdin(Stdio::piped())
            .stdout(log.try_clone().map_err(rt)?)
            .stderr(log)
            .process_group(0);
        if let Sandbox::Chroot { .. } = sandbox {
            tracing::warn!(
                instance = %spec.id,
                "bubblewrap not found: running under chroot; the root is NOT read-only and the \
                 instance is NOT isolated"
            );
        }
        let mut child = cmd.spawn().map_err(rt)?;
        let gate = child.stdin.take();
        let pid = i32::try_from(child.id()).map_err(|e| rt(io::Error::other(e)))?;
        // Not reaped yet, so the pid (maybe a zombie) still names our child.
        let leader = procfs::stat(pid)
            .map(|s| Proc {
                pid,
                start: s.start,
            })
            .ok_or_else(|| rt(io::Error::other("the spawned process has no /proc entry")));
        let leader = match leader {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        // A first record as soon as the process exists: if kiln is killed while the sandbox is
        // still setting up, a restarted server finds the instance in the run records instead
        // of leaving it running unknown. The init is looked up from the monitor when needed.
        let provisional = Record {
            version: record::VERSION,
            id: spec.id.clone(),
            service: spec.service.clone(),
            release: spec.release,
            port: spec.port,
            program: spec.args[0].clone(),
            rootfs: spec.rootfs.clone(),
            log_path: spec.log_path.clone(),
            sandbox: sandbox.kind(),
            leader,
            init: None,
            started_at: humantime::format_rfc3339_seconds(self.clock.now()).to_string(),
            root: Some(root),
        };
        if let Err(e) = provisional.write(&self.runtime_dir) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(rt(e));
        }
        // Only now may the sandbox start: a kiln killed before this point leaves a gate that
        // reads end-of-file and exits, never an instance that no record names.
        let opened = gate.map_or(Err(io::Error::other("no gate pipe")), |mut g| {
            io::Write::write_all(&mut g, b"go\n")
        });
        if let Err(e) = opened {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Record::remove(&self.runtime_dir, &spec.id);
            return Err(rt(e));
        }
        let init = match sandbox {
            Sandbox::Bubblewrap { .. } => match find_init(&mut child, leader) {
                Ok(init) => init,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(rt(e));
                }
            },
            Sandbox::Chroot { .. } => None,
        };
        let record = Record {
            init,
            ..provisional
        };
        if let Err(e) = record.write(&self.runtime_dir) {
            // No record, no instance: an untracked process would be an orphan.
            let _ = kill_all(&record, Signal::SIGKILL);
            let _ = child.wait();
            return Err(rt(e));
        }
        self.children.lock().insert(spec.id.clone(), Reaped::Live);
        let children = Arc::clone(&self.children);
        let id = spec.id.clone();
        let reaper = std::thread::Builder::new()
            .name(format!("kiln-reap-{id}"))
            .spawn(move || children.reap(&id, child));
        if let Err(e) = reaper {
            // The child is dropped unreaped: it becomes a zombie until kiln exits, but runs.
            tracing::warn!(instance = %spec.id, "could not start the reaper thread: {e}");
        }
        Ok(record)
    }
}

/// Waits for bubblewrap's child, the init of the sandbox's pid namespace. `None` if the app
/// already exited.
fn find_init(child: &mut Child, leader: Proc) -> io::Result<Option<NsInit>> {
    let tries = SANDBOX_SETUP.as_millis() / POLL.as_millis();
    for _ in 0..tries {
        if let Some(init) = init_of(leader) {
            return Ok(Some(init));
        }
        if child.try_wait()?.is_some() || !leader.alive() {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "bubblewrap did not create its sandbox within {}",
            humantime::format_duration(SANDBOX_SETUP)
        ),
    ))
}

/// The child of bubblewrap's monitor `leader` that lives in another pid namespace.
fn init_of(leader: Proc) -> Option<NsInit> {
    if !leader.alive() {
        return None;
    }
    let own_ns = procfs::pid_ns(leader.pid)?;
    procfs::find(|_, s| s.ppid == leader.pid)
        .into_iter()
        .find_map(|(pid, s)| {
            let ns = procfs::pid_ns(pid)?;
            (ns != own_ns).then_some(NsInit {
                proc: Proc {
                    pid,
                    start: s.start,
                },
                ns,
            })
        })
}

/// Every running process of the instance except the namespace init: what gets SIGTERM.
fn members(record: &Record) -> Vec<i32> {
    match (&record.sandbox, &resolved_init(record)) {
        (SandboxKind::Bubblewrap, Some(init)) if init.proc.alive() => {
            procfs::find(|pid, _| pid != init.proc.pid)
                .into_iter()
                .filter(|(pid, _)| procfs::pid_ns(*pid).as_deref() == Some(init.ns.as_str()))
                .map(|(pid, _)| pid)
                .collect()
        }
        (SandboxKind::Bubblewrap, _) => Vec::new(),
        (SandboxKind::Chroot, _) => procfs::find(|_, s| s.pgrp == record.leader.pid)
            .into_iter()
            .map(|(pid, _)| pid)
            .collect(),
    }
}

/// The sandbox's namespace init: as recorded, or — for a record written before the init was
/// seen (kiln may have been killed in between) — looked up now from bubblewrap's monitor.
fn resolved_init(record: &Record) -> Option<NsInit> {
    match (&record.sandbox, &record.init) {
        (_, Some(init)) => Some(init.clone()),
        (SandboxKind::Bubblewrap, None) => init_of(record.leader),
        (SandboxKind::Chroot, None) => None,
    }
}

/// The app of a running instance, with the sandbox's init under bubblewrap: the oldest process
/// in the init's pid namespace besides the init (of two started in the same clock tick, the
/// init's child); under chroot the leader. `None` while bubblewrap is still setting up.
fn app_of(record: &Record) -> Option<(Proc, Option<NsInit>)> {
    match record.sandbox {
        SandboxKind::Chroot => Some((record.leader, None)),
        SandboxKind::Bubblewrap => {
            let init = resolved_init(record).filter(|i| i.proc.alive())?;
            let app = procfs::find(|pid, _| pid != init.proc.pid)
                .into_iter()
                .filter(|(pid, _)| procfs::pid_ns(*pid).as_deref() == Some(init.ns.as_str()))
                .min_by_key(|(pid, s)| (s.start, s.ppid != init.proc.pid, *pid))
                .map(|(pid, s)| Proc {
                    pid,
                    start: s.start,
                })?;
            Some((app, Some(init)))
        }
    }
}

/// Whether `args` are still those of the sandbox launching the app rather than the app's:
/// under bubblewrap the app is forked from bubblewrap's init and shows its command line until
/// it execs; under chroot the leader is `chroot ROOTFS …`, then the shell that changes to the
/// workdir, before it is the app.
fn still_launching(record: &Record, init: Option<&NsInit>, args: &[String]) -> bool {
    // Between exec calls the command line reads empty; before the gate opens it is the gate's.
    let gate = args.len() > 2 && args[0] == "/bin/sh" && args[1] == "-c" && args[2] == GATE;
    if args.is_empty() || gate {
        return true;
    }
    match init {
        Some(init) => procfs::cmdline(init.proc.pid).is_ok_and(|own| own == args),
        None => {
            let chroot = args
                .first()
                .is_some_and(|a| Path::new(a).file_name() == Some(OsStr::new("chroot")))
                && args
                    .iter()
                    .skip(1)
                    .take(2)
                    .any(|a| Path::new(a) == record.rootfs);
            let cd = args.len() > 2
                && args[0] == "/bin/sh"
                && args[1] == "-c"
                && args[2] == sandbox::CHROOT_CD;
            chroot || cd
        }
    }
}

/// Whether the root of process `pid` is the directory now at the record's rootfs path. `None`
/// when it cannot be told: a composed (tmpfs) root, no permission to look, or — for a record
/// from before kiln recorded how the root was mounted — a mismatch, which may be a composed
/// root. A rootfs path where nothing is any more is `Some(false)`.
fn root_is_rootfs(record: &Record, pid: i32) -> Option<bool> {
    if record.root == Some(RootMount::Composed) {
        return None;
    }
    let app_root = procfs::root_id(pid).ok()?;
    let same = match procfs::file_id(&record.rootfs) {
        Ok(id) => id == app_root,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(_) => return None,
    };
    (same || record.root.is_some()).then_some(same)
}

/// One look at a running instance's app; `None` when it should be looked at again (the app
/// not executed yet, or it changed while being read).
fn observe_once(record: &Record) -> Result<Option<Observed>, DriverError> {
    let Some((app, init)) = app_of(record) else {
        return Ok(None);
    };
    // The command line is read before and after the environment: an app that exec'd in
    // between may have shown the launcher's environment.
    let before = procfs::cmdline(app.pid);
    let (env, args) = match (procfs::environ(app.pid), procfs::cmdline(app.pid)) {
        (Ok(env), Ok(args)) => (env, args),
        (Err(_), _) | (_, Err(_)) if !app.alive() => return Ok(None),
        (Err(e), _) | (_, Err(e)) => {
            let e = io::Error::new(e.kind(), format!("read /proc/{} of the app: {e}", app.pid));
            return Err(DriverError::runtime("observe", &record.id, e));
        }
    };
    if still_launching(record, init.as_ref(), &args) {
        return Ok(None);
    }
    if before.ok().as_ref() != Some(&args) {
        return Ok(None);
    }
    let root_is_rootfs = root_is_rootfs(record, app.pid);
    // What was read is the app's only if that very process still runs: a pid is reused only
    // once its process is gone.
    if !app.alive() {
        return Ok(None);
    }
    Ok(Some(Observed {
        env,
        args,
        rootfs: Some(record.rootfs.clone()),
        root_is_rootfs,
        pid: Some(app.pid),
        mismatches: Vec::new(),
    }))
}

/// Sends `signal` to the whole instance. SIGTERM goes to each of its processes; SIGKILL to
/// the namespace init (the kernel then kills the rest) and bubblewrap's monitor, or to the
/// process group under chroot.
fn kill_all(record: &Record, signal: Signal) -> nix::Result<()> {
    let send = |pid: i32| match kill(Pid::from_raw(pid), signal) {
        // Gone meanwhile: nothing to signal.
        Err(nix::errno::Errno::ESRCH) => Ok(()),
        other => other,
    };
    match record.sandbox {
        SandboxKind::Chroot => match killpg(Pid::from_raw(record.leader.pid), signal) {
            Err(nix::errno::Errno::ESRCH) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        },
        SandboxKind::Bubblewrap if signal == Signal::SIGKILL => {
            if let Some(init) = resolved_init(record).filter(|i| i.proc.alive()) {
                send(init.proc.pid)?;
            }
            if record.leader.alive() {
                send(record.leader.pid)?;
            }
            Ok(())
        }
        SandboxKind::Bubblewrap => members(record).into_iter().try_for_each(send),
    }
}

/// Polls until nothing of the instance runs; `false` if it still does after `within`.
fn wait_gone(record: &Record, within: Duration) -> bool {
    let tries = within.as_millis().div_ceil(POLL.as_millis()).max(1);
    for _ in 0..tries {
        if !record.anything_alive() {
            return true;
        }
        std::thread::sleep(POLL);
    }
    !record.anything_alive()
}

impl Driver for LocalDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(&self, spec: &InstanceSpec) -> Result<Handle, DriverError> {
        spec.validate()?;
        let Some(sandbox) = &self.sandbox else {
            return Err(DriverError::Unavailable {
                driver: NAME,
                reason: "expected bubblewrap (bwrap on PATH or $KILN_BWRAP), or root for the \
                         chroot fallback; found neither (install bubblewrap)"
                    .to_owned(),
            });
        };
        fs::create_dir_all(&self.runtime_dir)
            .map_err(|e| DriverError::runtime("start", &spec.id, e))?;
        let path = Record::path(&self.runtime_dir, &spec.id);
        if let Ok(bytes) = fs::read(&path)
            && let Ok(old) = serde_json::from_slice::<Record>(&bytes)
            && old.anything_alive()
        {
            return Err(DriverError::InvalidSpec {
                id: spec.id.clone(),
                reason: "expected a new instance id, found a running instance with it".into(),
            });
        }
        let record = self.spawn(spec, sandbox)?;
        tracing::info!(
            instance = %spec.id,
            pid = record.leader.pid,
            sandbox = ?record.sandbox,
            port = spec.port,
            "instance started"
        );
        Self::handle(&record)
    }

    fn status(&self, handle: &Handle) -> Result<Status, DriverError> {
        let record = Self::record(handle)?;
        if record.leader.alive() {
            return Ok(Status::Running);
        }
        if let Some(code) = self.children.exit(&record.id) {
            return Ok(Status::Exited { code });
        }
        // The app is gone but something it started still runs in its sandbox: the instance
        // ended, and `stop` will clean up.
        if record.anything_alive() {
            return Ok(Status::Exited { code: None });
        }
        Ok(Status::Gone)
    }

    fn observe(&self, handle: &Handle) -> Result<Observed, DriverError> {
        let record = Self::record(handle)?;
        let not_running = || DriverError::NotRunning {
            id: record.id.clone(),
        };
        let tries = EXEC_WAIT.as_millis().div_ceil(POLL.as_millis()).max(1);
        for _ in 0..tries {
            // As for `status`: the leader lives exactly as long as the app.
            if !record.leader.alive() {
                return Err(not_running());
            }
            if let Some(seen) = observe_once(&record)? {
                return Ok(seen);
            }
            std::thread::sleep(POLL);
        }
        if !record.leader.alive() {
            return Err(not_running());
        }
        Err(DriverError::Runtime {
            op: "observe",
            id: record.id.clone(),
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the app was not executed within {}: the sandbox is still setting up",
                    humantime::format_duration(EXEC_WAIT)
                ),
            ),
            retryable: true,
        })
    }

    fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), DriverError> {
        let mut record = Self::record(handle)?;
        let err = |e: io::Error, retryable| DriverError::Runtime {
            op: "stop",
            id: record.id.clone(),
            source: e,
            retryable,
        };
        if record.sandbox == SandboxKind::Bubblewrap && record.init.is_none() {
            // Started before its namespace init was seen (it exited at once); look again.
            record.init = init_of(record.leader);
        }
        if record.anything_alive() {
            kill_all(&record, Signal::SIGTERM).map_err(|e| err(e.into(), true))?;
            if !wait_gone(&record, grace) {
                tracing::info!(instance = %record.id, "grace period over: SIGKILL");
                kill_all(&record, Signal::SIGKILL).map_err(|e| err(e.into(), true))?;
                if !wait_gone(&record, KILL_WAIT) {
                    return Err(err(
                        io::Error::new(io::ErrorKind::TimedOut, "still running after SIGKILL"),
                        true,
                    ));
                }
            }
        }
        // Our own child: wait until the reaper collected it, so no zombie is left.
        let _ = self.children.exit(&record.id);
        self.children.lock().remove(&record.id);
        self.children.changed.notify_all();
        Record::remove(&self.runtime_dir, &record.id).map_err(|e| err(e, true))?;
        tracing::info!(instance = %record.id, "instance stopped");
        Ok(())
    }

    fn running(&self) -> Result<Vec<Handle>, DriverError> {
        let records = Record::read_all(&self.runtime_dir)
            .map_err(|e| DriverError::runtime("list", "*", e))?;
        let mut out = Vec::new();
        for (path, record) in records {
            match record {
                Ok(record) if record.anything_alive() => out.push(Self::handle(&record)?),
                Ok(record) => {
                    tracing::debug!(instance = %record.id, "removing the record of a gone instance");
                    if let Err(e) = Record::remove(&self.runtime_dir, &record.id) {
                        tracing::warn!(instance = %record.id, "removing a stale record: {e}");
                    }
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), "skipping an unreadable run record: {e}");
                }
            }
        }
        Ok(out)
    }
}

/// The shell script that holds a new instance until kiln says go: it reads one line from its
/// stdin (a pipe from kiln) and only on `go` becomes the sandbox (same pid, same start time, so
/// the run record written before names it). If kiln dies first, the pipe closes, the read ends
/// and nothing starts.
const GATE: &str = r#"IFS= read -r go && [ "$go" = go ] && exec "$@"; exit 125"#;

/// `cmd` behind [`GATE`]: the same program, arguments and environment, started by `/bin/sh`.
fn gated(cmd: &std::process::Command) -> std::process::Command {
    let mut gated = std::process::Command::new("/bin/sh");
    gated
        .arg("-c")
        .arg(GATE)
        .arg("kiln-instance")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        // The sandbox commands start from an empty environment and set what they pass on.
        .env_clear();
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => {
                gated.env(key, v);
            }
            None => {
                gated.env_remove(key);
            }
        }
    }
    if let Some(dir) = cmd.get_current_dir() {
        gated.current_dir(dir);
    }
    gated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sandbox: SandboxKind) -> Record {
        Record {
            version: record::VERSION,
            id: "web-v1-a".into(),
            service: "web".into(),
            release: 1,
            port: 41000,
            program: "/app/web".into(),
            rootfs: "/images/web".into(),
            log_path: "/dev/null".into(),
            sandbox,
            leader: Proc { pid: 1, start: 1 },
            init: None,
            started_at: "2025-01-01T00:00:00Z".into(),
            root: Some(RootMount::Rootfs),
        }
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_gate_starts_nothing_unless_kiln_says_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = |say: Option<&[u8]>| {
            let marker = dir.path().join("started");
            let _ = fs::remove_file(&marker);
            let mut inner = std::process::Command::new("/bin/sh");
            inner.arg("-c").arg(format!("echo > {}", marker.display()));
            let mut child = gated(&inner).stdin(Stdio::piped()).spawn().expect("spawn");
            let mut gate = child.stdin.take().expect("gate");
            if let Some(line) = say {
                io::Write::write_all(&mut gate, line).expect("write");
            }
            // Dropping the pipe is what kiln dying does.
            drop(gate);
            let status = child.wait().expect("wait");
            (status.code(), marker.exists())
        };
        assert_eq!(run(None), (Some(125), false), "kiln gone: nothing starts");
        assert_eq!(run(Some(b"no\n")), (Some(125), false));
        assert_eq!(run(Some(b"go\n")), (Some(0), true));
    }

    #[test]
    fn tells_a_launching_sandbox_from_the_app() {
        // bubblewrap: the app still shows its init's (bubblewrap's) command line. This test
        // process plays the init.
        let me = i32::try_from(std::process::id()).expect("pid");
        let init = NsInit {
            proc: Proc {
                pid: me,
                start: procfs::stat(me).expect("stat").start,
            },
            ns: procfs::pid_ns(me).expect("ns"),
        };
        let own = procfs::cmdline(me).expect("cmdline");
        let bwrap = record(SandboxKind::Bubblewrap);
        assert!(still_launching(&bwrap, Some(&init), &own));
        assert!(!still_launching(&bwrap, Some(&init), &args(&["/app/web"])));

        let chroot = record(SandboxKind::Chroot);
        for launching in [
            args(&["/usr/sbin/chroot", "/images/web", "/app/web"]),
            args(&["chroot", "--userspec=1:1", "/images/web", "/app/web"]),
            args(&["/bin/sh", "-c", sandbox::CHROOT_CD, "/srv", "/app/web"]),
            // Waiting at the gate, and between two execs (the command line reads empty).
            args(&[
                "/bin/sh",
                "-c",
                GATE,
                "kiln-instance",
                "/usr/sbin/chroot",
                "/x",
            ]),
            Vec::new(),
        ] {
            assert!(still_launching(&chroot, None, &launching), "{launching:?}");
        }
        for app in [
            args(&["/app/web", "/images/web"]),
            args(&["/bin/sh", "-c", "echo hi"]),
            args(&["/usr/sbin/chroot", "/elsewhere", "/x"]),
        ] {
            assert!(!still_launching(&chroot, None, &app), "{app:?}");
        }
    }
}
