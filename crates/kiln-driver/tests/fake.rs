//! The fake driver passes the conformance suite and fails on cue.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiln_core::clock::{ManualClock, SystemClock};
use kiln_driver::conformance::{self, Fixture, Setup, assert_port_closed, http_get, wait_http};
use kiln_driver::fake::{self, FakeControl, FakeDriver};
use kiln_driver::{Driver, DriverError, Fault, InstanceSpec, Status};

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = FakeControl::new();
    let clock: Arc<dyn kiln_core::clock::Clock> = Arc::new(SystemClock);
    let reopen = {
        let (control, clock) = (control.clone(), Arc::clone(&clock));
        Box::new(move || Box::new(FakeDriver::new(control.clone(), Arc::clone(&clock))) as _)
    };
    Setup {
        driver: Box::new(FakeDriver::new(control, clock)),
        reopen,
        fixture: Fixture {
            rootfs: "/nonexistent".into(),
            args: vec!["/app/server".to_owned()],
            exit_args: vec![
                fake::EXIT_PROGRAM.to_owned(),
                conformance::EXIT_CODE.to_string(),
            ],
            log_dir: dir.path().to_owned(),
            reachable: true,
            release_info: kiln_driver::ReleaseInfo::default(),
        },
        keep: vec![Box::new(dir)],
    }
}

mod suite {
    kiln_driver::conformance_tests!(super::setup());
}

/// A fake driver on a manual clock, a spec factory and the temp dir keeping its logs.
struct Bench {
    control: FakeControl,
    clock: Arc<ManualClock>,
    driver: FakeDriver,
    dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Self {
        let control = FakeControl::new();
        let clock = Arc::new(ManualClock::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        ));
        let driver = FakeDriver::new(control.clone(), clock.clone());
        let dir = tempfile::tempdir().expect("temp dir");
        Self {
            control,
            clock,
            driver,
            dir,
        }
    }

    fn spec(&self, id: &str, release: u32) -> InstanceSpec {
        let port = kiln_driver::free_port().expect("port");
        InstanceSpec::new(id, "web", release, port)
            .with_args(["/app/web"])
            .with_log_path(self.dir.path().join(format!("{id}.log")))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for h in self.driver.running().unwrap_or_default() {
            let _ = self.driver.stop(&h, Duration::ZERO);
        }
    }
}

#[test]
fn answers_with_release_and_instance() {
    let b = Bench::new();
    let spec = b.spec("web-v7-a", 7);
    b.driver.start(&spec).expect("start");
    assert_eq!(
        wait_http(spec.port, "/anything"),
        (200, "release v7 instance web-v7-a".to_owned())
    );
    assert_eq!(wait_http(spec.port, "/healthz"), (200, "ok".to_owned()));
    b.control.health_path("/ready");
    assert_eq!(wait_http(spec.port, "/ready"), (200, "ok".to_owned()));
    assert_eq!(
        wait_http(spec.port, "/write"),
        (200, "read-only".to_owned())
    );
}

#[test]
fn sends_the_instance_header_and_keeps_connections_alive() {
    use std::io::{BufRead, BufReader, Read, Write};
    let b = Bench::new();
    let spec = b.spec("web-v1-ka", 1);
    b.driver.start(&spec).expect("start");
    wait_http(spec.port, "/");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", spec.port)).expect("connect");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    for _ in 0..2 {
        write!(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_owned());
        }
        assert_eq!(head[0], "HTTP/1.1 200 OK");
        assert!(
            head.contains(&"X-Instance: web-v1-ka".to_owned()),
            "{head:?}"
        );
        let mut body = vec![0; "release v1 instance web-v1-ka".len()];
        reader.read_exact(&mut body).expect("body");
    }
}

#[test]
fn fail_start_fails_only_that_release() {
    let b = Bench::new();
    b.control.fail_start(2);
    let err = b
        .driver
        .start(&b.spec("web-v2-a", 2))
        .expect_err("injected failure");
    assert_eq!(err.fault(), Fault::Runtime);
    assert!(err.is_retryable());
    assert!(err.to_string().contains("web-v2-a"), "{err}");
    b.driver.start(&b.spec("web-v1-a", 1)).expect("v1 starts");
    b.control.clear(2);
    b.driver
        .start(&b.spec("web-v2-b", 2))
        .expect("v2 starts once cleared");
    let started: Vec<String> = b.control.started().into_iter().map(|s| s.id).collect();
    assert_eq!(started, ["web-v1-a", "web-v2-b"]);
}

#[test]
fn unhealthy_release_answers_503_until_healed() {
    let b = Bench::new();
    let v1 = b.spec("web-v1-h", 1);
    let v2 = b.spec("web-v2-h", 2);
    b.driver.start(&v1).expect("v1");
    b.driver.start(&v2).expect("v2");
    b.control.unhealthy(2, true);
    assert_eq!(wait_http(v2.port, "/healthz").0, 503);
    assert_eq!(wait_http(v2.port, "/").0, 503);
    assert_eq!(wait_http(v1.port, "/healthz").0, 200);
    // Unhealthy is not exited: the process still runs.
    assert_eq!(
        b.driver.status(&handle(&b, &v2)).expect("status"),
        Status::Running
    );
    b.control.unhealthy(2, false);
    assert_eq!(wait_http(v2.port, "/healthz").0, 200);
}

fn handle(b: &Bench, spec: &InstanceSpec) -> kiln_driver::Handle {
    b.driver
        .running()
        .expect("running")
        .into_iter()
        .find(|h| h.id == spec.id)
        .expect("listed")
}

#[test]
fn exit_after_follows_the_injected_clock() {
    let b = Bench::new();
    b.control.exit_after(3, Duration::from_secs(30));
    let spec = b.spec("web-v3-x", 3);
    let h = b.driver.start(&spec).expect("start");
    wait_http(spec.port, "/");
    b.clock.advance(Duration::from_secs(29));
    assert_eq!(b.driver.status(&h).expect("status"), Status::Running);
    b.clock.advance(Duration::from_secs(1));
    // The listener notices on the next connection, and status on the next call.
    assert!(http_get(spec.port, "/").is_err());
    assert_port_closed(spec.port);
    assert_eq!(
        b.driver.status(&h).expect("status"),
        Status::Exited {
            code: Some(fake::EXIT_AFTER_CODE)
        }
    );
    assert!(b.driver.running().expect("running").is_empty());
}

#[test]
fn exit_after_is_seen_by_status_without_traffic() {
    let b = Bench::new();
    b.control.exit_after(1, Duration::from_secs(5));
    let spec = b.spec("web-v1-y", 1);
    let h = b.driver.start(&spec).expect("start");
    b.clock.advance(Duration::from_secs(6));
    assert!(matches!(
        b.driver.status(&h).expect("status"),
        Status::Exited { .. }
    ));
    assert_port_closed(spec.port);
}

#[test]
fn kill_exits_now_and_stop_forgets() {
    let b = Bench::new();
    let spec = b.spec("web-v1-k", 1);
    let h = b.driver.start(&spec).expect("start");
    wait_http(spec.port, "/");
    assert!(b.control.kill("web-v1-k"));
    assert!(!b.control.kill("web-v1-k"), "already dead");
    assert_port_closed(spec.port);
    assert_eq!(
        b.driver.status(&h).expect("status"),
        Status::Exited { code: None }
    );
    b.driver.stop(&h, Duration::ZERO).expect("stop");
    assert_eq!(b.driver.status(&h).expect("status"), Status::Gone);
}

#[test]
fn drivers_over_one_control_share_instances() {
    let b = Bench::new();
    let spec = b.spec("web-v1-s", 1);
    let h = b.driver.start(&spec).expect("start");
    let restarted = FakeDriver::new(b.control.clone(), b.clock.clone());
    assert_eq!(restarted.running().expect("running"), vec![h.clone()]);
    // Another control is another world.
    let other = FakeDriver::new(FakeControl::new(), b.clock.clone());
    assert!(other.running().expect("running").is_empty());
    assert_eq!(other.status(&h).expect("status"), Status::Gone);
}

#[test]
fn rejects_duplicates_foreign_handles_and_bad_specs() {
    let b = Bench::new();
    let spec = b.spec("web-v1-d", 1);
    b.driver.start(&spec).expect("start");
    let dup = b.driver.start(&spec).expect_err("duplicate id");
    assert_eq!(dup.fault(), Fault::Spec);
    let foreign = kiln_driver::Handle {
        id: "x".into(),
        data: serde_json::json!({"pid": 1}),
    };
    let err = b.driver.status(&foreign).expect_err("foreign handle");
    assert!(matches!(err, DriverError::BadHandle { .. }), "{err}");
    assert_eq!(err.fault(), Fault::Internal);
    let busy = InstanceSpec {
        id: "web-v1-e".into(),
        ..spec
    };
    let err = b.driver.start(&busy).expect_err("port in use");
    assert_eq!(err.fault(), Fault::Runtime);
    assert!(err.is_retryable(), "{err}");
}

#[test]
fn observe_reports_the_spec_until_drift_is_simulated() {
    let b = Bench::new();
    let spec = b
        .spec("web-v1-o", 1)
        .with_rootfs("/images/web-v1")
        .with_env("DB_PASSWORD", "hunter2");
    let h = b.driver.start(&spec).expect("start");
    let seen = b.driver.observe(&h).expect("observe");
    assert_eq!(seen.env, spec.env);
    assert_eq!(seen.args, spec.args);
    assert_eq!(seen.rootfs.as_deref(), Some(spec.rootfs.as_path()));
    assert_eq!(seen.root_is_rootfs, Some(true));
    assert_eq!(seen.pid, None);

    assert!(
        b.control
            .tamper_env("web-v1-o", "DB_PASSWORD", Some("changed"))
    );
    assert!(b.control.tamper_env("web-v1-o", "PORT", None));
    assert!(b.control.tamper_env("web-v1-o", "EXTRA", Some("1")));
    assert!(b.control.swap_root("web-v1-o", false));
    assert!(!b.control.tamper_env("nope", "A", Some("b")), "unknown id");
    assert!(!b.control.swap_root("nope", false), "unknown id");
    let seen = b.driver.observe(&h).expect("observe");
    assert_eq!(
        seen.env.get("DB_PASSWORD").map(String::as_str),
        Some("changed")
    );
    assert!(!seen.env.contains_key("PORT"));
    assert_eq!(seen.env.get("EXTRA").map(String::as_str), Some("1"));
    assert_eq!(seen.root_is_rootfs, Some(false));
    // The instance's own /env agrees with what is observed.
    let (_, body) = wait_http(spec.port, "/env");
    assert!(body.lines().any(|l| l == "EXTRA=1"), "{body}");
    assert!(!body.lines().any(|l| l.starts_with("PORT=")), "{body}");
    // The spec kiln keeps is untouched: the drift is in the running instance only.
    assert_eq!(b.control.started()[0].env, spec.env);

    // Exited or stopped: nothing to observe.
    assert!(b.control.kill("web-v1-o"));
    let err = b.driver.observe(&h).expect_err("killed");
    assert!(matches!(err, DriverError::NotRunning { .. }), "{err}");
    assert!(!err.is_retryable());
    b.driver.stop(&h, Duration::ZERO).expect("stop");
    let err = b.driver.observe(&h).expect_err("stopped");
    assert!(matches!(err, DriverError::NotRunning { .. }), "{err}");
}

#[test]
fn observe_sees_exit_after() {
    let b = Bench::new();
    b.control.exit_after(1, Duration::from_secs(5));
    let h = b.driver.start(&b.spec("web-v1-oe", 1)).expect("start");
    b.driver.observe(&h).expect("running");
    b.clock.advance(Duration::from_secs(5));
    let err = b.driver.observe(&h).expect_err("exited");
    assert!(matches!(err, DriverError::NotRunning { .. }), "{err}");
}

#[test]
fn a_stray_runs_unstarted_and_is_found() {
    let b = Bench::new();
    // Strays ignore injected start failures and exit_after: the engine did not start them.
    b.control.fail_start(4);
    b.control.exit_after(4, Duration::from_secs(1));
    let spec = b.spec("web-v4-stray", 4);
    let stray = b.control.start_stray(&spec).expect("stray");
    assert!(b.control.started().is_empty(), "no driver started it");
    assert_eq!(wait_http(spec.port, "/").0, 200);
    b.clock.advance(Duration::from_secs(60));
    assert_eq!(b.driver.running().expect("running"), vec![stray.clone()]);
    assert_eq!(b.driver.status(&stray).expect("status"), Status::Running);
    assert_eq!(b.driver.observe(&stray).expect("observe").env, spec.env);
    let dup = b.control.start_stray(&spec).expect_err("duplicate id");
    assert_eq!(dup.fault(), Fault::Spec);
    b.driver.stop(&stray, Duration::ZERO).expect("stop");
    assert_port_closed(spec.port);
    assert!(b.driver.running().expect("running").is_empty());
}
