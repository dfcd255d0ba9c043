//! The conformance suite every [`Driver`] passes.
//!
//! Each case is a function taking the driver under test and a [`Fixture`]: an image whose app
//! serves HTTP on `$PORT`. Cases panic on failure, so they are called from tests; the
//! [`conformance_tests!`](crate::conformance_tests) macro expands to one `#[test]` per case:
//!
//! ```no_run
//! fn setup() -> kiln_driver::conformance::Setup {
//!     unimplemented!("build a fixture image and the driver under test")
//! }
//!
//! mod conformance {
//!     kiln_driver::conformance_tests!(super::setup());
//! }
//! # fn main() {}
//! ```
//!
//! Every case stops what it started, also when it fails (a guard stops on drop), so a failing
//! run leaves no process behind.

use std::any::Any;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::{Driver, DriverError, Handle, InstanceSpec, Observed, Status, free_port};

/// A program that exists in no image.
pub const MISSING_PROGRAM: &str = "/kiln-missing/program";
/// The exit code of the fixture's [`Fixture::exit_args`].
pub const EXIT_CODE: i32 = 3;
/// How long the cases give a stop.
pub const GRACE: Duration = Duration::from_secs(5);

/// Polling: this many tries, [`POLL`] apart (10 s in all). No clock is read.
const TRIES: u32 = 200;
const POLL: Duration = Duration::from_millis(50);

/// The image the suite runs.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// The image's root filesystem.
    pub rootfs: PathBuf,
    /// Starts an app that serves HTTP on `$PORT`: `GET /` → 200; `GET /env` → its
    /// environment as `K=V` lines; `GET /write` → `ok` if creating `/probe-file` succeeded,
    /// else `read-only`. It writes a line to stdout or stderr at start and per request.
    pub args: Vec<String>,
    /// A command that exits at once with code [`EXIT_CODE`].
    pub exit_args: Vec<String>,
    /// Where the cases put log files.
    pub log_dir: PathBuf,
    /// Whether the test reaches the app on 127.0.0.1 at the spec's port. `false` for a
    /// runtime whose instances run elsewhere or nowhere (a cloud emulator boots nothing): the
    /// cases then check what the runtime's API reports, and leave out what needs the app to
    /// answer or to exit. Only [`lifecycle`], [`two_releases_at_once`],
    /// [`stop_is_idempotent`], [`readoption`] and [`observe_reports_what_runs`] apply then.
    pub reachable: bool,
    /// The release every spec belongs to (a cloud runtime finds the machine image of a
    /// release by its image digest).
    pub release_info: crate::ReleaseInfo,
}

impl Fixture {
    /// A spec for the fixture's app with a fresh port; `id` is made unique by the port.
    pub fn spec(&self, case: &str, release: u32) -> InstanceSpec {
        let port = free_port().expect("a free port");
        let id = format!("conf-{case}-v{release}-{port}");
        let mut spec = InstanceSpec::new(&id, "conformance", release, port)
            .with_rootfs(&self.rootfs)
            .with_args(self.args.iter().cloned())
            .with_env("KILN_CONFORMANCE", "yes")
            .with_log_path(self.log_dir.join(format!("{id}.log")));
        spec.release_info = self.release_info.clone();
        spec
    }

    /// Waits until the app answers `path` with 200, when the test can reach it.
    fn serves(&self, port: u16, path: &str) {
        if self.reachable {
            let (code, body) = wait_http(port, path);
            assert_eq!(code, 200, "GET {path}: {body}");
        }
    }

    /// Checks that nothing listens on `port` any more, when the test can reach it.
    fn closed(&self, port: u16) {
        if self.reachable {
            assert_port_closed(port);
        }
    }
}

/// What the [`conformance_tests!`](crate::conformance_tests) macro needs.
pub struct Setup {
    /// The driver under test.
    pub driver: Box<dyn Driver>,
    /// Builds another driver value over the same runtime, as a restarted kiln server would.
    pub reopen: Box<dyn Fn() -> Box<dyn Driver>>,
    /// The image.
    pub fixture: Fixture,
    /// Whatever must outlive the test (temporary directories); dropped last.
    pub keep: Vec<Box<dyn Any>>,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("driver", &self.driver.name())
            .field("fixture", &self.fixture)
            .finish_non_exhaustive()
    }
}

/// Expands to one `#[test]` per conformance case. The argument is an expression of type
/// [`Setup`], evaluated afresh by each test.
#[macro_export]
macro_rules! conformance_tests {
    ($setup:expr) => {
        #[test]
        fn conformance_lifecycle() {
            let s: $crate::conformance::Setup = $setup;
            $crate::conformance::lifecycle(&*s.driver, &s.fixture);
        }
        #[test]
        fn conformance_environment() {
            let s: $crate::conformance::Setup = $setup;
            $crate::conformance::environment(&*s.driver, &s.fixture);
        }
        #[test]
        fn conformance_two_releases_at_once() {
            let s: $crate::conformance::Setup = $setup;
            $crate::conformance::two_releases_at_once(&*s.driver, &s.fixture);
        }
        #[test]
        fn conformance_stop_is_idempotent() {
            let s: $crate::conformance::Setup = $setup;
            $crate::conformance::stop_is_idempotent(&*s.driver, &s.fixture);
        }
        #[test]
        fn conformance_exit_is_reported() {
            let s: $crate::conformance::Setup = $setup;
            $crate::conformance::exit_is_reported(&*s.driver, &s.fixture);
        }
        #[test]
        fn conformance_logs_are_captured() {
            let s: $crate::conformance::Setup = $setup;
            $crate::conformance::logs_are_captured(&*s.driver, &s.fixture);
        }
        #[test]
        fn conformance_readoption() {
            let s: $crate::conformance::Setup = $setup;
            $crate::conformance::readoption(&*s.driver, &*s.reopen, &s.fixture);
        }
        #[test]
        fn conformance_observe_reports_what_runs() {
            let s: $crate::conformance::Setup = $setup;
            $crate::conformance::observe_reports_what_runs(&*s.driver, &s.fixture);
        }
        #[test]
        fn conformance_missing_program() {
            let s: $crate::conformance::Setup = $setup;
            $crate::conformance::missing_program(&*s.driver, &s.fixture);
        }
    };
}

/// start → Running → HTTP 200 on the port → listed by `running()` → stop → Gone, port
/// closed, no longer listed.
pub fn lifecycle(driver: &dyn Driver, fixture: &Fixture) {
    let mut guard = StopGuard::new(driver);
    let spec = fixture.spec("lifecycle", 1);
    let handle = guard.start(&spec);
    assert_eq!(handle.id, spec.id);
    assert_eq!(status(driver, &handle), Status::Running);
    fixture.serves(spec.port, "/");
    let running = driver.running().expect("running()");
    assert!(
        running.contains(&handle),
        "running() lacks {handle:?}: {running:?}"
    );

    driver.stop(&handle, GRACE).expect("stop");
    assert_eq!(status(driver, &handle), Status::Gone);
    fixture.closed(spec.port);
    let running = driver.running().expect("running()");
    assert!(running.iter().all(|h| h.id != handle.id), "{running:?}");
}

/// The app sees `PORT` and `KILN_INSTANCE_ID` with the right values, the spec's other
/// variables, and nothing of the test process's environment.
pub fn environment(driver: &dyn Driver, fixture: &Fixture) {
    let mut guard = StopGuard::new(driver);
    let spec = fixture.spec("env", 1);
    guard.start(&spec);
    let (code, body) = wait_http(spec.port, "/env");
    assert_eq!(code, 200);
    let lines: Vec<&str> = body.lines().collect();
    for want in [
        format!("PORT={}", spec.port),
        format!("KILN_INSTANCE_ID={}", spec.id),
        "KILN_CONFORMANCE=yes".to_owned(),
    ] {
        assert!(lines.contains(&want.as_str()), "{want} not in {lines:?}");
    }
    // cargo sets CARGO_* for the test process; none may leak into an instance.
    assert!(
        lines.iter().all(|l| !l.starts_with("CARGO")),
        "host environment leaked: {lines:?}"
    );
}

/// Two releases of one service run side by side, each on its own port.
pub fn two_releases_at_once(driver: &dyn Driver, fixture: &Fixture) {
    let mut guard = StopGuard::new(driver);
    let v1 = fixture.spec("pair", 1);
    let v2 = fixture.spec("pair", 2);
    let h1 = guard.start(&v1);
    let h2 = guard.start(&v2);
    for spec in [&v1, &v2] {
        if fixture.reachable {
            let (code, body) = wait_http(spec.port, "/env");
            assert_eq!(code, 200);
            let want = format!("KILN_INSTANCE_ID={}", spec.id);
            assert!(body.lines().any(|l| l == want), "{want} not in {body}");
        }
    }
    assert_eq!(status(driver, &h1), Status::Running);
    assert_eq!(status(driver, &h2), Status::Running);
    driver.stop(&h1, GRACE).expect("stop v1");
    // Stopping one leaves the other alone.
    assert_eq!(status(driver, &h2), Status::Running);
    fixture.serves(v2.port, "/");
}

/// A second stop, and a stop of an exited instance, are `Ok`.
pub fn stop_is_idempotent(driver: &dyn Driver, fixture: &Fixture) {
    let mut guard = StopGuard::new(driver);
    let spec = fixture.spec("idem", 1);
    let handle = guard.start(&spec);
    fixture.serves(spec.port, "/");
    driver.stop(&handle, GRACE).expect("first stop");
    driver.stop(&handle, GRACE).expect("second stop");
    assert_eq!(status(driver, &handle), Status::Gone);
    if !fixture.reachable {
        // Nothing runs, so nothing exits by itself.
        return;
    }

    let exited = InstanceSpec {
        args: fixture.exit_args.clone(),
        ..fixture.spec("idem-exit", 1)
    };
    let handle = guard.start(&exited);
    wait_not_running(driver, &handle);
    driver
        .stop(&handle, GRACE)
        .expect("stop of an exited instance");
    driver.stop(&handle, GRACE).expect("stop again");
    assert_eq!(status(driver, &handle), Status::Gone);
}

/// A command that exits at once is reported `Exited` (with its code, when known), not
/// `Running` and not a hang.
pub fn exit_is_reported(driver: &dyn Driver, fixture: &Fixture) {
    let mut guard = StopGuard::new(driver);
    let spec = InstanceSpec {
        args: fixture.exit_args.clone(),
        ..fixture.spec("exit", 1)
    };
    let handle = guard.start(&spec);
    match wait_not_running(driver, &handle) {
        Status::Exited { code: None } => {}
        Status::Exited { code: Some(code) } => assert_eq!(code, EXIT_CODE),
        other => panic!("expected Exited, found {other:?}"),
    }
    let running = driver.running().expect("running()");
    assert!(running.iter().all(|h| h.id != handle.id), "{running:?}");
}

/// What the app writes lands in the log file, and keeps landing there.
pub fn logs_are_captured(driver: &dyn Driver, fixture: &Fixture) {
    let mut guard = StopGuard::new(driver);
    let spec = fixture.spec("logs", 1);
    guard.start(&spec);
    wait_http(spec.port, "/");
    let size = || std::fs::metadata(&spec.log_path).map_or(0, |m| m.len());
    let first = poll("the log file to fill", || (size() > 0).then(size));
    for _ in 0..3 {
        wait_http(spec.port, "/");
    }
    poll("the log file to grow", || (size() > first).then_some(()));
}

/// A second driver value over the same runtime finds the instance, reports it running and
/// stops it; the first then no longer sees it running (it may report the exit it saw).
pub fn readoption(driver: &dyn Driver, reopen: &dyn Fn() -> Box<dyn Driver>, fixture: &Fixture) {
    let mut guard = StopGuard::new(driver);
    let spec = fixture.spec("adopt", 1);
    let handle = guard.start(&spec);
    fixture.serves(spec.port, "/");

    let second = reopen();
    let found = second.running().expect("running() of the second driver");
    assert!(found.contains(&handle), "{handle:?} not in {found:?}");
    assert_eq!(status(&*second, &handle), Status::Running);
    second
        .stop(&handle, GRACE)
        .expect("stop by the second driver");
    assert_eq!(status(&*second, &handle), Status::Gone);
    assert_ne!(status(driver, &handle), Status::Running);
    assert!(driver.running().expect("running()").is_empty());
    fixture.closed(spec.port);
}

/// `observe` of a running instance reports the environment it was started with (every
/// variable of the spec, same value; a value holding `=` and spaces intact), a command line,
/// and — where the driver knows them — the spec's rootfs as the instance's root directory,
/// which it still is. Once the instance is stopped, or has exited, `observe` fails with
/// [`DriverError::NotRunning`].
pub fn observe_reports_what_runs(driver: &dyn Driver, fixture: &Fixture) {
    let mut guard = StopGuard::new(driver);
    let spec = fixture
        .spec("observe", 1)
        .with_env("KILN_OBSERVE", "a=b c  d");
    let handle = guard.start(&spec);
    // Serving HTTP: the app runs, not whatever set it up.
    fixture.serves(spec.port, "/");
    let seen = observe(driver, &handle);
    for (key, value) in &spec.env {
        assert_eq!(
            seen.env.get(key),
            Some(value),
            "{key} as observed differs from the spec: {seen:?}"
        );
    }
    assert!(
        seen.env.keys().all(|k| !k.starts_with("CARGO")),
        "observed the host's environment, not the app's: {seen:?}"
    );
    assert!(!seen.args.is_empty(), "no command line: {seen:?}");
    if let Some(rootfs) = &seen.rootfs {
        assert_eq!(rootfs, &spec.rootfs, "{seen:?}");
    }
    assert_ne!(
        seen.root_is_rootfs,
        Some(false),
        "an untouched instance runs from its rootfs: {seen:?}"
    );
    // Observing changes nothing.
    assert_eq!(status(driver, &handle), Status::Running);
    fixture.serves(spec.port, "/");

    driver.stop(&handle, GRACE).expect("stop");
    assert_not_running(driver.observe(&handle), &handle);
    if !fixture.reachable {
        return;
    }

    let exited = InstanceSpec {
        args: fixture.exit_args.clone(),
        ..fixture.spec("observe-exit", 1)
    };
    let handle = guard.start(&exited);
    wait_not_running(driver, &handle);
    assert_not_running(driver.observe(&handle), &handle);
}

fn observe(driver: &dyn Driver, handle: &Handle) -> Observed {
    // A driver may ask to be asked again while an instance is still being set up.
    poll(&format!("observe {}", handle.id), || {
        match driver.observe(handle) {
            Ok(seen) => Some(seen),
            Err(e) if e.is_retryable() => None,
            Err(e) => panic!("observe {}: {e}", handle.id),
        }
    })
}

fn assert_not_running(got: Result<Observed, DriverError>, handle: &Handle) {
    match got {
        Err(DriverError::NotRunning { id }) => assert_eq!(id, handle.id),
        Err(e) => panic!("expected NotRunning for {}, found {e}", handle.id),
        Ok(seen) => panic!("observed {} although it does not run: {seen:?}", handle.id),
    }
}

/// Starting a program the image lacks fails, or reports an exit: it never hangs or runs.
pub fn missing_program(driver: &dyn Driver, fixture: &Fixture) {
    let mut guard = StopGuard::new(driver);
    let spec = InstanceSpec {
        args: vec![MISSING_PROGRAM.to_owned()],
        ..fixture.spec("missing", 1)
    };
    match driver.start(&spec) {
        Err(e) => assert!(
            e.to_string().contains(&spec.id),
            "the error names the instance: {e}"
        ),
        Ok(handle) => {
            guard.handles.push(handle.clone());
            let end = wait_not_running(driver, &handle);
            assert!(
                matches!(end, Status::Exited { .. } | Status::Gone),
                "{end:?}"
            );
        }
    }
}

/// Stops every instance it started when dropped, so a failing case leaves nothing running.
struct StopGuard<'a> {
    driver: &'a dyn Driver,
    handles: Vec<Handle>,
}

impl<'a> StopGuard<'a> {
    fn new(driver: &'a dyn Driver) -> Self {
        Self {
            driver,
            handles: Vec::new(),
        }
    }

    fn start(&mut self, spec: &InstanceSpec) -> Handle {
        let handle = self
            .driver
            .start(spec)
            .unwrap_or_else(|e| panic!("start {}: {e}", spec.id));
        self.handles.push(handle.clone());
        handle
    }
}

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        for handle in &self.handles {
            if let Err(e) = self.driver.stop(handle, Duration::from_secs(1)) {
                tracing::warn!(instance = %handle.id, "conformance cleanup: {e}");
            }
        }
    }
}

fn status(driver: &dyn Driver, handle: &Handle) -> Status {
    driver
        .status(handle)
        .unwrap_or_else(|e| panic!("status of {}: {e}", handle.id))
}

/// Polls `status` until the instance no longer runs; panics after 10 s.
pub fn wait_not_running(driver: &dyn Driver, handle: &Handle) -> Status {
    poll("the instance to end", || match status(driver, handle) {
        Status::Running => None,
        other => Some(other),
    })
}

/// Calls `f` until it returns `Some`; panics after 10 s, naming what it waited for.
pub fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..TRIES {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(POLL);
    }
    panic!("timed out waiting for {what}");
}

/// `GET path` on 127.0.0.1:`port`, retried until the app answers (10 s at most).
pub fn wait_http(port: u16, path: &str) -> (u16, String) {
    poll(&format!("http://127.0.0.1:{port}{path}"), || {
        http_get(port, path).ok()
    })
}

/// One `GET path` on 127.0.0.1:`port` with `Connection: close`: the status code and body.
pub fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad response: {text:?}"),
        )
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, body.to_owned()))
}

/// Panics unless nothing accepts connections on 127.0.0.1:`port`.
pub fn assert_port_closed(port: u16) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    if let Ok(conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        panic!("port {port} still accepts connections: {conn:?}");
    }
}
