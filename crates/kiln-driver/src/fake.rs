//! An in-process driver for deterministic engine tests, configured to fail on cue.
//!
//! Each instance is a small HTTP/1.1 server on a thread, bound to `127.0.0.1:PORT`. It answers
//! every request `200` with the body `release vN instance ID` and the header `X-Instance: ID`,
//! except:
//!
//! - the health path ([`DEFAULT_HEALTH_PATH`] unless [`FakeControl::health_path`] says
//!   otherwise) answers `200 ok`;
//! - `/env` answers the instance's environment as `K=V` lines, and `/write` answers
//!   `read-only` (as a real instance's read-only root would), so the fake passes the
//!   [`conformance`](crate::conformance) suite;
//! - a release marked [`FakeControl::unhealthy`] answers `503` to everything.
//!
//! [`Driver::observe`] reports the spec the instance was started with (its env, args and
//! rootfs; `root_is_rootfs: Some(true)`, no pid) until a test simulates drift with
//! [`FakeControl::tamper_env`] or [`FakeControl::swap_root`]. [`FakeControl::start_stray`]
//! runs an instance the engine never started, as an orphan left by someone else.
//!
//! The program in `args[0]` picks what runs: [`EXIT_PROGRAM`] `[CODE]` exits at once with
//! `CODE` (default 0); a program under [`MISSING_PREFIX`] does not exist, so `start` fails; any
//! other program is the HTTP server above.
//!
//! Faults are injected through a [`FakeControl`] shared by every [`FakeDriver`] built from it:
//! two drivers over one control see the same instances, as a restarted kiln server sees the
//! instances its predecessor started.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use kiln_core::clock::{Clock, SystemClock};

use crate::{Driver, DriverError, Handle, InstanceSpec, Observed, Status};

mod http;

/// The program that exits at once; its first argument, if any, is the exit code.
pub const EXIT_PROGRAM: &str = "/kiln-fake/exit";
/// Programs under this prefix do not exist in any fake image.
pub const MISSING_PREFIX: &str = "/kiln-missing/";
/// The health path unless configured otherwise.
pub const DEFAULT_HEALTH_PATH: &str = "/healthz";
/// The exit code reported for an instance ended by [`FakeControl::exit_after`].
pub const EXIT_AFTER_CODE: i32 = 1;

const DRIVER_NAME: &str = "fake";

/// The shared switchboard of fake instances and injected faults. Cheap to clone; clones share
/// everything.
#[derive(Clone, Debug, Default)]
pub struct FakeControl {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    fail_start: BTreeSet<u32>,
    unhealthy: BTreeSet<u32>,
    exit_after: BTreeMap<u32, Duration>,
    health_path: Option<String>,
    started: Vec<InstanceSpec>,
    instances: BTreeMap<String, Instance>,
}

#[derive(Debug)]
struct Instance {
    release: u32,
    /// `None` for a stray: [`FakeControl::exit_after`] does not apply to it.
    started_at: Option<SystemTime>,
    /// What `observe` reports while it runs.
    observed: Observed,
    /// `Some(code)` once it exited (`code` is `None` when killed).
    exited: Option<Option<i32>>,
    server: Option<Server>,
}

impl FakeControl {
    /// A control with no faults and no instances.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, starting an instance of `release` fails (retryable runtime error).
    pub fn fail_start(&self, release: u32) {
        self.lock().fail_start.insert(release);
    }

    /// Marks `release` unhealthy (every request answers 503) or healthy again.
    pub fn unhealthy(&self, release: u32, unhealthy: bool) {
        let mut state = self.lock();
        if unhealthy {
            state.unhealthy.insert(release);
        } else {
            state.unhealthy.remove(&release);
        }
    }

    /// Instances of `release` exit (code [`EXIT_AFTER_CODE`]) once the driver's clock has
    /// passed their start plus `after`: `status` reports it and the listener closes.
    pub fn exit_after(&self, release: u32, after: Duration) {
        self.lock().exit_after.insert(release, after);
    }

    /// Removes every fault configured for `release`.
    pub fn clear(&self, release: u32) {
        let mut state = self.lock();
        state.fail_start.remove(&release);
        state.unhealthy.remove(&release);
        state.exit_after.remove(&release);
    }

    /// Sets the path that answers `200 ok`.
    pub fn health_path(&self, path: &str) {
        self.lock().health_path = Some(path.to_owned());
    }

    /// The instance exits now, as if killed (status `Exited { code: None }`). Returns whether
    /// it was running.
    pub fn kill(&self, id: &str) -> bool {
        let server = {
            let mut state = self.lock();
            let Some(instance) = state.instances.get_mut(id) else {
                return false;
            };
            if instance.exited.is_some() {
                return false;
            }
            instance.exited = Some(None);
            instance.server.take()
        };
        if let Some(server) = server {
            server.shut_down();
        }
        true
    }

    /// Every spec started successfully so far, in order (strays excepted).
    pub fn started(&self) -> Vec<InstanceSpec> {
        self.lock().started.clone()
    }

    /// Drift: from now on instance `id` reports the environment variable `key` as `value`
    /// (`None`: unset) in [`Driver::observe`] and on `/env`. Returns whether the instance
    /// is known (started and not stopped).
    pub fn tamper_env(&self, id: &str, key: &str, value: Option<&str>) -> bool {
        let mut state = self.lock();
        let Some(instance) = state.instances.get_mut(id) else {
            return false;
        };
        let env = &mut instance.observed.env;
        match value {
            Some(value) => env.insert(key.to_owned(), value.to_owned()),
            None => env.remove(key),
        };
        true
    }

    /// Drift: from now on instance `id` reports `root_is_rootfs: Some(is_rootfs)` (`false`:
    /// its root is no longer the image directory it was started from). Returns whether the
    /// instance is known.
    pub fn swap_root(&self, id: &str, is_rootfs: bool) -> bool {
        let mut state = self.lock();
        let Some(instance) = state.instances.get_mut(id) else {
            return false;
        };
        instance.observed.root_is_rootfs = Some(is_rootfs);
        true
    }

    /// Runs an instance of `spec` that no driver started: it is not in
    /// [`started`](Self::started), but every driver over this control lists it in
    /// [`Driver::running`] and can observe and stop it, as a restarted server finds an orphan.
    /// It runs like any other (failure injections at start excepted) and never exits by
    /// [`exit_after`](Self::exit_after); [`kill`](Self::kill) ends it.
    pub fn start_stray(&self, spec: &InstanceSpec) -> Result<Handle, DriverError> {
        launch(self, Arc::new(SystemClock), None, spec)
    }

    /// Marks `id` exited if its [`exit_after`](Self::exit_after) time has passed at `now`;
    /// returns the server to shut down (outside the lock) and the instance's state.
    fn refresh(&self, id: &str, now: SystemTime) -> (Option<Server>, Option<Option<i32>>, bool) {
        let mut state = self.lock();
        let deadline = state.instances.get(id).and_then(|i| {
            let after = state.exit_after.get(&i.release)?;
            Some(i.started_at? + *after)
        });
        let Some(instance) = state.instances.get_mut(id) else {
            return (None, None, false);
        };
        let mut server = None;
        if instance.exited.is_none() && deadline.is_some_and(|d| now >= d) {
            instance.exited = Some(Some(EXIT_AFTER_CODE));
            server = instance.server.take();
        }
        (server, instance.exited, true)
    }
}

/// A [`Driver`] whose instances are threads in this process.
#[derive(Clone)]
pub struct FakeDriver {
    control: FakeControl,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for FakeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDriver")
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl FakeDriver {
    /// A driver over `control`'s instances, reading time from `clock`.
    pub fn new(control: FakeControl, clock: Arc<dyn Clock>) -> Self {
        Self { control, clock }
    }

    /// The control this driver was built from.
    pub fn control(&self) -> &FakeControl {
        &self.control
    }

    fn check_handle(handle: &Handle) -> Result<(), DriverError> {
        if handle.data.get("driver").and_then(|d| d.as_str()) == Some(DRIVER_NAME) {
            Ok(())
        } else {
            Err(DriverError::BadHandle {
                driver: DRIVER_NAME,
                id: handle.id.clone(),
                reason: format!("expected data with driver \"fake\", found {}", handle.data),
            })
        }
    }

    fn refresh(&self, id: &str) -> (Option<Option<i32>>, bool) {
        let (server, exited, known) = self.control.refresh(id, self.clock.now());
        if let Some(server) = server {
            server.shut_down();
        }
        (exited, known)
    }
}

impl Driver for FakeDriver {
    fn name(&self) -> &'static str {
        DRIVER_NAME
    }

    fn start(&self, spec: &InstanceSpec) -> Result<Handle, DriverError> {
        launch(
            &self.control,
            Arc::clone(&self.clock),
            Some(self.clock.now()),
            spec,
        )
    }

    fn status(&self, handle: &Handle) -> Result<Status, DriverError> {
        Self::check_handle(handle)?;
        Ok(match self.refresh(&handle.id) {
            (_, false) => Status::Gone,
            (Some(code), true) => Status::Exited { code },
            (None, true) => Status::Running,
        })
    }

    fn observe(&self, handle: &Handle) -> Result<Observed, DriverError> {
        Self::check_handle(handle)?;
        if !matches!(self.refresh(&handle.id), (None, true)) {
            return Err(DriverError::NotRunning {
                id: handle.id.clone(),
            });
        }
        let state = self.control.lock();
        match state.instances.get(&handle.id) {
            Some(i) if i.exited.is_none() => Ok(i.observed.clone()),
            _ => Err(DriverError::NotRunning {
                id: handle.id.clone(),
            }),
        }
    }

    fn stop(&self, handle: &Handle, _grace: Duration) -> Result<(), DriverError> {
        Self::check_handle(handle)?;
        let removed = self.control.lock().instances.remove(&handle.id);
        if let Some(server) = removed.and_then(|i| i.server) {
            server.shut_down();
        }
        Ok(())
    }

    fn running(&self) -> Result<Vec<Handle>, DriverError> {
        let candidates: Vec<(String, u32, u16)> = {
            let state = self.control.lock();
            state
                .instances
                .iter()
                .filter(|(_, i)| i.exited.is_none())
                .map(|(id, i)| {
                    (
                        id.clone(),
                        i.release,
                        i.server.as_ref().map_or(0, |s| s.port),
                    )
                })
                .collect()
        };
        Ok(candidates
            .into_iter()
            .filter(|(id, _, _)| matches!(self.refresh(id), (None, true)))
            .map(|(id, release, port)| Handle {
                id,
                data: serde_json::json!({ "driver": DRIVER_NAME, "release": release, "port": port }),
            })
            .collect())
    }
}

/// Starts `spec` over `control`: by a driver (`started_at` is its clock's now), or as a stray
/// (`started_at` `None`: not recorded in `started`, no injected start failure, no
/// `exit_after`).
fn launch(
    control: &FakeControl,
    clock: Arc<dyn Clock>,
    started_at: Option<SystemTime>,
    spec: &InstanceSpec,
) -> Result<Handle, DriverError> {
    spec.validate()?;
    let program = spec.args[0].as_str();
    if program.starts_with(MISSING_PREFIX) {
        return Err(DriverError::InvalidSpec {
            id: spec.id.clone(),
            reason: format!("expected a program in the image, found no {program}"),
        });
    }
    let exit_code = if program == EXIT_PROGRAM {
        let code = spec.args.get(1).map_or(Ok(0), |c| c.parse::<i32>());
        Some(code.map_err(|_| DriverError::InvalidSpec {
            id: spec.id.clone(),
            reason: format!("expected an exit code, found {:?}", spec.args[1]),
        })?)
    } else {
        None
    };
    {
        let state = control.lock();
        if started_at.is_some() && state.fail_start.contains(&spec.release) {
            return Err(DriverError::Runtime {
                op: "start",
                id: spec.id.clone(),
                source: io::Error::other(format!(
                    "injected start failure for release v{}",
                    spec.release
                )),
                retryable: true,
            });
        }
        if state.instances.contains_key(&spec.id) {
            return Err(DriverError::InvalidSpec {
                id: spec.id.clone(),
                reason: "expected a new instance id, found one already started".to_owned(),
            });
        }
    }
    let log = open_log(spec).map_err(|e| DriverError::runtime("start", &spec.id, e))?;
    let server = match exit_code {
        Some(_) => None,
        None => Some(
            Server::start(spec, log, control.clone(), clock)
                .map_err(|e| DriverError::runtime("start", &spec.id, e))?,
        ),
    };
    let mut state = control.lock();
    if started_at.is_some() {
        state.started.push(spec.clone());
    }
    state.instances.insert(
        spec.id.clone(),
        Instance {
            release: spec.release,
            started_at,
            observed: Observed {
                env: spec.env.clone(),
                args: spec.args.clone(),
                rootfs: Some(spec.rootfs.clone()),
                root_is_rootfs: Some(true),
                pid: None,
                mismatches: Vec::new(),
            },
            exited: exit_code.map(Some),
            server,
        },
    );
    Ok(Handle {
        id: spec.id.clone(),
        data: serde_json::json!({
            "driver": DRIVER_NAME,
            "release": spec.release,
            "port": spec.port,
        }),
    })
}

fn open_log(spec: &InstanceSpec) -> io::Result<Arc<Mutex<File>>> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_path)?;
    writeln!(
        file,
        "fake: release v{} instance {} starting {:?}",
        spec.release, spec.id, spec.args
    )?;
    Ok(Arc::new(Mutex::new(file)))
}

/// One fake instance's listener thread and its open connections.
#[derive(Debug)]
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<BTreeMap<u64, TcpStream>>>,
    thread: JoinHandle<()>,
}

/// What a connection thread needs to answer requests.
struct Responder {
    id: String,
    release: u32,
    control: FakeControl,
    clock: Arc<dyn Clock>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<File>>,
}

impl Server {
    fn start(
        spec: &InstanceSpec,
        log: Arc<Mutex<File>>,
        control: FakeControl,
        clock: Arc<dyn Clock>,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, spec.port))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<BTreeMap<u64, TcpStream>>> = Arc::default();
        let responder = Arc::new(Responder {
            id: spec.id.clone(),
            release: spec.release,
            control,
            clock,
            stop: Arc::clone(&stop),
            log,
        });
        let thread_conns = Arc::clone(&conns);
        let thread = std::thread::Builder::new()
            .name(format!("fake-{}", spec.id))
            .spawn(move || accept_loop(listener, &responder, &thread_conns))?;
        Ok(Self {
            port: spec.port,
            stop,
            conns,
            thread,
        })
    }

    /// Tells the listener to close and closes every open connection, without waiting.
    fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; it sees the flag and drops the listener. Fails harmlessly
        // when the listener already closed itself.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        for conn in lock(&self.conns).values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    /// Closes the listener and every open connection; returns once the port is closed.
    fn shut_down(self) {
        self.signal_stop();
        let _ = self.thread.join();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(
    listener: TcpListener,
    responder: &Arc<Responder>,
    conns: &Arc<Mutex<BTreeMap<u64, TcpStream>>>,
) {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(0);
    loop {
        let conn = listener.accept();
        if responder.stop.load(Ordering::SeqCst) || !responder.alive(false) {
            // Close the port before the connection that noticed the exit: whoever sees that
            // connection end then finds the port closed.
            drop(listener);
            drop(conn);
            return;
        }
        let Ok((conn, _)) = conn else { continue };
        let key = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = conn.try_clone() {
            lock(conns).insert(key, clone);
        }
        let (r, c) = (Arc::clone(responder), Arc::clone(conns));
        let spawned = std::thread::Builder::new()
            .name(format!("fake-{}-conn", responder.id))
            .spawn(move || {
                let _ = r.serve(conn);
                lock(&c).remove(&key);
            });
        if spawned.is_err() {
            lock(conns).remove(&key);
            tracing::warn!(instance = %responder.id, "fake: could not spawn a connection thread");
        }
    }
}

impl Responder {
    /// Whether the instance still runs; notices an [`FakeControl::exit_after`] deadline and
    /// then closes the server, waiting for it unless called from its own accept thread
    /// (`joinable` false).
    fn alive(&self, joinable: bool) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return false;
        }
        let (server, exited, known) = self.control.refresh(&self.id, self.clock.now());
        match server {
            Some(server) if joinable => server.shut_down(),
            Some(server) => server.signal_stop(),
            None => {}
        }
        known && exited.is_none()
    }

    fn serve(&self, conn: TcpStream) -> io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut reader = io::BufReader::new(conn.try_clone()?);
        let mut writer = conn;
        while let Some(request) = http::read_request(&mut reader)? {
            if !self.alive(true) {
                return Ok(());
            }
            let (status, body) = self.answer(&request.path);
            let keep_alive = request.keep_alive;
            http::write_response(&mut writer, status, &body, &self.id, keep_alive)?;
            let mut log = lock(&self.log);
            writeln!(
                log,
                "fake {}: {} {} -> {status}",
                self.id, request.method, request.path
            )?;
            if !keep_alive {
                return Ok(());
            }
        }
        Ok(())
    }

    fn answer(&self, path: &str) -> (u16, String) {
        let (unhealthy, health_path, env) = {
            let state = self.control.lock();
            (
                state.unhealthy.contains(&self.release),
                state.health_path.clone(),
                // As observed: tampering shows here too.
                state
                    .instances
                    .get(&self.id)
                    .map(|i| i.observed.env.clone())
                    .unwrap_or_default(),
            )
        };
        let health_path = health_path.as_deref().unwrap_or(DEFAULT_HEALTH_PATH);
        let path = path.split('?').next().unwrap_or(path);
        if unhealthy {
            (503, "unhealthy".to_owned())
        } else if path == health_path {
            (200, "ok".to_owned())
        } else if path == "/env" {
            let lines: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            (200, lines)
        } else if path == "/write" {
            (200, "read-only".to_owned())
        } else {
            (
                200,
                format!("release v{} instance {}", self.release, self.id),
            )
        }
    }
}
