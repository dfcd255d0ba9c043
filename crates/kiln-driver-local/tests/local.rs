//! What only the local runtime promises: a read-only root, the host's files out of sight, no
//! capabilities, instances that outlive kiln, and stops that leave nothing behind.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Scratch, assert_no_process_left, bubblewrap, pgrep, record};
use kiln_core::clock::SystemClock;
use kiln_driver::conformance::{GRACE, poll, wait_http, wait_not_running};
use kiln_driver::{
    Driver, DriverError, Fault, Handle, InstanceSpec, Observed, Status, User, free_port,
};
use kiln_driver_local::{LocalDriver, Proc, Record, RootMount, Sandbox, SandboxKind};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Stops what a test started, also when it fails.
struct Started<'a>(&'a dyn Driver, Vec<Handle>);

impl Drop for Started<'_> {
    fn drop(&mut self) {
        for h in &self.1 {
            let _ = self.0.stop(h, Duration::from_secs(1));
        }
    }
}

fn spec(scratch: &Scratch, name: &str, args: &[&str]) -> InstanceSpec {
    let port = free_port().expect("port");
    let id = format!("local-{name}-{port}");
    InstanceSpec::new(&id, "local", 1, port)
        .with_rootfs(scratch.rootfs())
        .with_args(args.iter().copied())
        .with_log_path(scratch.dir.path().join("logs").join(format!("{id}.log")))
}

/// Runs a one-shot shell command in a sandbox and returns what it printed.
fn run_once(driver: &LocalDriver, scratch: &Scratch, script: &str, user: Option<User>) -> String {
    let mut spec = spec(scratch, "once", &["/bin/sh", "-c", script]);
    spec.user = user;
    let handle = driver.start(&spec).expect("start");
    let end = wait_not_running(driver, &handle);
    assert_eq!(end, Status::Exited { code: Some(0) }, "{script}");
    driver.stop(&handle, GRACE).expect("stop");
    fs::read_to_string(&spec.log_path).expect("log")
}

#[test]
fn the_root_is_read_only_and_the_host_is_out_of_sight() {
    let scratch = Scratch::new(true);
    let driver = scratch.driver(Some(bubblewrap()));
    let app = spec(&scratch, "ro", &["/app/start"]);
    let mut started = Started(&driver, vec![driver.start(&app).expect("start")]);
    assert_eq!(wait_http(app.port, "/write"), (200, "read-only".to_owned()));
    driver.stop(&started.1[0], GRACE).expect("stop");
    started.1.clear();

    // A host file, and this test binary, exist on the host but not inside.
    let secret = scratch.dir.path().join("host-secret");
    fs::write(&secret, "x").expect("host file");
    let exe = std::env::current_exe().expect("exe");
    let script = format!(
        "for f in /etc/hostname {} {}; do if [ -e $f ]; then echo VISIBLE $f; fi; done; \
         touch /tmp/scratch && echo tmp-writable; touch /run/x && echo run-writable; \
         touch /bin/x 2>/dev/null || echo bin-read-only",
        secret.display(),
        exe.display()
    );
    let out = run_once(&driver, &scratch, &script, None);
    assert!(!out.contains("VISIBLE"), "{out}");
    for want in ["tmp-writable", "run-writable", "bin-read-only"] {
        assert!(out.contains(want), "{want} not in {out}");
    }
    assert!(!scratch.rootfs().join("probe-file").exists());
}

#[test]
fn a_scratch_image_without_mount_points_runs_read_only() {
    let scratch = Scratch::new(false);
    let driver = scratch.driver(Some(bubblewrap()));
    let app = spec(&scratch, "scratch", &["/app/start"]);
    let _started = Started(&driver, vec![driver.start(&app).expect("start")]);
    assert_eq!(wait_http(app.port, "/write"), (200, "read-only".to_owned()));
    let out = run_once(
        &driver,
        &scratch,
        "touch /x 2>/dev/null || echo root-read-only; ls /",
        None,
    );
    assert!(out.contains("root-read-only"), "{out}");
    // The image was not changed to make mount points.
    assert!(!scratch.rootfs().join("proc").exists());
}

#[test]
fn root_drops_capabilities_and_runs_as_the_image_user() {
    let scratch = Scratch::new(true);
    let driver = scratch.driver(Some(bubblewrap()));
    let script =
        "grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status; echo uid=$(id -u) gid=$(id -g)";
    let out = run_once(&driver, &scratch, script, None);
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapPrm:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    let user = Some(User {
        uid: 1000,
        gid: 1001,
    });
    let out = run_once(&driver, &scratch, script, user);
    assert!(out.contains("uid=1000 gid=1001"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
}

#[test]
fn an_instance_outlives_its_driver_and_is_found_by_a_new_one() {
    let scratch = Scratch::new(true);
    let app = spec(&scratch, "outlive", &["/app/start"]);
    let handle = {
        let first = scratch.driver(Some(bubblewrap()));
        first.start(&app).expect("start")
    };
    let second = scratch.driver(Some(bubblewrap()));
    let _started = Started(&second, vec![handle.clone()]);
    assert_eq!(wait_http(app.port, "/").0, 200);
    assert_eq!(second.running().expect("running"), vec![handle.clone()]);
    assert_eq!(second.status(&handle).expect("status"), Status::Running);
    // bubblewrap's own environment names the instance.
    let environ =
        fs::read(format!("/proc/{}/environ", record(&handle).leader.pid)).expect("environ");
    assert!(String::from_utf8_lossy(&environ).contains(&format!("KILN_INSTANCE_ID={}", app.id)));
    second.stop(&handle, GRACE).expect("stop");
    assert_no_process_left(&record(&handle));
    assert!(second.running().expect("running").is_empty());
}

/// Run only as a child of `an_instance_survives_a_killed_server`: starts an instance, writes
/// its handle to `$KILN_TEST_HANDLE`, and waits to be killed.
#[test]
#[ignore = "helper process for an_instance_survives_a_killed_server"]
fn helper_server_that_gets_killed() {
    let (Some(run), Some(out), Some(spec)) = (
        std::env::var_os("KILN_TEST_RUN_DIR"),
        std::env::var_os("KILN_TEST_HANDLE"),
        std::env::var("KILN_TEST_SPEC").ok(),
    ) else {
        return;
    };
    let parts: Vec<&str> = spec.split('\n').collect();
    let port: u16 = parts[1].parse().expect("port");
    let spec = InstanceSpec::new(parts[0], "local", 1, port)
        .with_rootfs(parts[2])
        .with_args(["/app/start"])
        .with_log_path(parts[3]);
    let driver = LocalDriver::new(run.into(), Arc::new(SystemClock));
    let handle = driver.start(&spec).expect("start");
    fs::write(out, serde_json::to_vec(&handle).expect("json")).expect("write handle");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn an_instance_survives_a_killed_server() {
    let scratch = Scratch::new(true);
    let app = spec(&scratch, "killed-server", &["/app/start"]);
    let handle_file = scratch.dir.path().join("handle.json");
    let mut server = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "helper_server_that_gets_killed",
            "--ignored",
            "--test-threads=1",
        ])
        .env("KILN_TEST_RUN_DIR", scratch.run_dir())
        .env("KILN_TEST_HANDLE", &handle_file)
        .env(
            "KILN_TEST_SPEC",
            format!(
                "{}\n{}\n{}\n{}",
                app.id,
                app.port,
                app.rootfs.display(),
                app.log_path.display()
            ),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the helper server");
    let handle: Handle = poll("the helper to start an instance", || {
        serde_json::from_slice(&fs::read(&handle_file).ok()?).ok()
    });
    // kill -9 the "server": its reaper thread dies with it.
    server.kill().expect("kill the helper");
    server.wait().expect("reap the helper");

    let restarted = scratch.driver(Some(bubblewrap()));
    let _started = Started(&restarted, vec![handle.clone()]);
    assert_eq!(wait_http(app.port, "/").0, 200, "the instance still serves");
    assert_eq!(restarted.running().expect("running"), vec![handle.clone()]);
    assert_eq!(restarted.status(&handle).expect("status"), Status::Running);
    restarted.stop(&handle, GRACE).expect("stop");
    assert_eq!(restarted.status(&handle).expect("status"), Status::Gone);
    assert_no_process_left(&record(&handle));
}

#[test]
fn kill_9_of_the_app_ends_the_instance() {
    let scratch = Scratch::new(true);
    let driver = scratch.driver(Some(bubblewrap()));
    let app = spec(&scratch, "kill9", &["/app/start"]);
    let handle = driver.start(&app).expect("start");
    let _started = Started(&driver, vec![handle.clone()]);
    wait_http(app.port, "/");
    let rec = record(&handle);
    let init = rec.init.clone().expect("a namespace init");
    // The app is the init's child (nc, after /app/start exec'd it).
    let app_pid = poll("the app process", || {
        pids_with_parent(init.proc.pid).first().copied()
    });
    kill(Pid::from_raw(app_pid), Signal::SIGKILL).expect("kill -9");
    match wait_not_running(&driver, &handle) {
        Status::Exited { .. } | Status::Gone => {}
        Status::Running => unreachable!(),
    }
    driver.stop(&handle, GRACE).expect("stop");
    assert_no_process_left(&rec);
}

fn pids_with_parent(ppid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        if parent == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn stop_kills_every_process_of_the_instance() {
    for sandbox in [Some(bubblewrap()), Sandbox::chroot_fallback()] {
        let Some(sandbox) = sandbox else { continue };
        let scratch = Scratch::new(true);
        if let Sandbox::Chroot { .. } = sandbox {
            // Nothing mounts /dev under chroot, and the shell's `&` needs /dev/null.
            let null = scratch.rootfs().join("dev/null");
            let made = Command::new("mknod")
                .arg(&null)
                .args(["-m", "666", "c", "1", "3"])
                .status();
            assert!(made.is_ok_and(|s| s.success()), "mknod {}", null.display());
        }
        let driver = scratch.driver(Some(sandbox.clone()));
        let marker = format!("kiln-test-marker-{}", free_port().expect("port"));
        // A child in the app's group, and one that left it with setsid.
        let script = format!(
            "sleep 3600 & setsid /bin/sh -c 'sleep 3600; : {marker}-escaped' & \
             /bin/sh -c 'sleep 3600; : {marker}-child' & exec /app/start"
        );
        let app = spec(&scratch, "group", &["/bin/sh", "-c", &script]);
        let handle = driver.start(&app).expect("start");
        let _started = Started(&driver, vec![handle.clone()]);
        wait_http(app.port, "/");
        let escaped = poll("the children to start", || {
            let p = pgrep(&format!("{marker}-escaped"));
            (!p.is_empty() && !pgrep(&format!("{marker}-child")).is_empty()).then_some(p)
        });
        let chroot = record(&handle).sandbox == SandboxKind::Chroot;
        if chroot {
            // Under chroot only the process group is the instance: an escapee (the leader of
            // its own group after setsid) is not found. Clean it up here.
            for pid in escaped {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        driver.stop(&handle, GRACE).expect("stop");
        assert_eq!(
            pgrep(&marker),
            Vec::<i32>::new(),
            "{sandbox:?} left processes behind"
        );
        assert_no_process_left(&record(&handle));
        if chroot {
            // The `sleep`s carry no marker; under chroot they show their root.
            let root = scratch.rootfs();
            poll("chrooted processes to end", || {
                common::pids_rooted_at(&root).is_empty().then_some(())
            });
        }
    }
}

#[test]
fn stop_sends_sigterm_first_then_sigkill_after_the_grace() {
    let scratch = Scratch::new(true);
    let driver = scratch.driver(Some(bubblewrap()));
    let polite = spec(
        &scratch,
        "polite",
        &[
            "/bin/sh",
            "-c",
            "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.05; done",
        ],
    );
    let stubborn = spec(
        &scratch,
        "stubborn",
        &[
            "/bin/sh",
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 0.05; done",
        ],
    );
    let hp = driver.start(&polite).expect("start polite");
    let hs = driver.start(&stubborn).expect("start stubborn");
    let _started = Started(&driver, vec![hp.clone(), hs.clone()]);
    for s in [&polite, &stubborn] {
        poll("the app to be ready", || {
            fs::read_to_string(&s.log_path)
                .ok()
                .filter(|l| l.contains("ready"))
        });
    }
    driver.stop(&hp, GRACE).expect("stop polite");
    let log = fs::read_to_string(&polite.log_path).expect("log");
    assert!(log.contains("got-term"), "{log}");
    // Ignores SIGTERM: stop returns after the grace period, by SIGKILL.
    driver
        .stop(&hs, Duration::from_millis(200))
        .expect("stop stubborn");
    assert_eq!(driver.status(&hs).expect("status"), Status::Gone);
    assert_no_process_left(&record(&hs));
}

#[test]
fn running_forgets_records_of_gone_instances() {
    let scratch = Scratch::new(true);
    let driver = scratch.driver(Some(bubblewrap()));
    let me = i32::try_from(std::process::id()).expect("pid");
    let stat = fs::read_to_string(format!("/proc/{me}/stat")).expect("stat");
    let start: u64 = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().nth(19)?.parse().ok())
        .expect("start");
    // Our own pid with another start time: a reused pid, not the instance.
    let stale = Record {
        version: 1,
        id: "stale-v1".into(),
        service: "stale".into(),
        release: 1,
        port: 1,
        program: "/app".into(),
        rootfs: scratch.rootfs(),
        log_path: "/dev/null".into(),
        sandbox: SandboxKind::Bubblewrap,
        leader: Proc {
            pid: me,
            start: start + 1,
        },
        init: None,
        started_at: "2025-01-01T00:00:00Z".into(),
        root: None,
    };
    fs::create_dir_all(scratch.run_dir()).expect("run dir");
    fs::write(
        scratch.run_dir().join("stale-v1.json"),
        serde_json::to_vec(&stale).expect("json"),
    )
    .expect("write");
    fs::write(scratch.run_dir().join("garbage.json"), "{").expect("write");
    assert!(driver.running().expect("running").is_empty());
    assert!(!scratch.run_dir().join("stale-v1.json").exists());
    assert!(
        scratch.run_dir().join("garbage.json").exists(),
        "unreadable records are kept"
    );
    let handle = Handle {
        id: "stale-v1".into(),
        data: serde_json::to_value(&stale).expect("json"),
    };
    assert_eq!(driver.status(&handle).expect("status"), Status::Gone);
    driver
        .stop(&handle, GRACE)
        .expect("stopping a gone instance is fine");
}

#[test]
fn clear_errors_for_what_cannot_run() {
    let scratch = Scratch::new(true);
    let none = scratch.driver(None);
    let app = spec(&scratch, "none", &["/app/start"]);
    let err = none.start(&app).expect_err("no sandbox");
    assert!(matches!(err, DriverError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("bubblewrap"), "{err}");

    let driver = scratch.driver(Some(bubblewrap()));
    let handle = driver.start(&app).expect("start");
    let _started = Started(&driver, vec![handle]);
    let dup = driver.start(&app).expect_err("duplicate id");
    assert_eq!(dup.fault(), Fault::Spec);

    let mut no_log = spec(&scratch, "nolog", &["/app/start"]);
    no_log.log_path = scratch.dir.path().join("missing-dir/x.log");
    let err = driver.start(&no_log).expect_err("log dir missing");
    assert_eq!(err.fault(), Fault::Runtime);
    assert!(err.to_string().contains("missing-dir"), "{err}");
    assert!(
        !scratch
            .run_dir()
            .join(format!("{}.json", no_log.id))
            .exists()
    );

    let foreign = Handle {
        id: "x".into(),
        data: serde_json::json!({"driver": "fake"}),
    };
    assert_eq!(
        driver.status(&foreign).expect_err("foreign").fault(),
        Fault::Internal
    );
}

/// `observe`, asked again while the driver says the instance is still being set up.
fn observe(driver: &dyn Driver, handle: &Handle) -> Observed {
    poll("observe", || match driver.observe(handle) {
        Ok(seen) => Some(seen),
        Err(e) if e.is_retryable() => None,
        Err(e) => panic!("observe {}: {e}", handle.id),
    })
}

/// The start time of `pid` (field 22 of its stat).
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// bubblewrap, and the chroot fallback when this process is root.
fn sandboxes() -> Vec<Sandbox> {
    let mut out = vec![bubblewrap()];
    out.extend(Sandbox::chroot_fallback());
    out
}

#[test]
fn observe_tells_when_the_rootfs_directory_was_replaced() {
    for sandbox in sandboxes() {
        let scratch = Scratch::new(true);
        let driver = scratch.driver(Some(sandbox.clone()));
        let app = spec(&scratch, "swap", &["/app/start"]).with_env("DB_PASSWORD", "hunter2");
        let handle = driver.start(&app).expect("start");
        let _started = Started(&driver, vec![handle.clone()]);
        assert_eq!(record(&handle).root, Some(RootMount::Rootfs));
        wait_http(app.port, "/");
        let seen = observe(&driver, &handle);
        assert_eq!(seen.root_is_rootfs, Some(true), "{sandbox:?}: {seen:?}");
        assert_eq!(seen.rootfs.as_deref(), Some(scratch.rootfs().as_path()));
        assert_eq!(
            seen.env.get("DB_PASSWORD").map(String::as_str),
            Some("hunter2")
        );
        // The app is nc, which /app/start exec'd; its pid is a live process of the host.
        assert_eq!(
            seen.args.first().map(String::as_str),
            Some("nc"),
            "{seen:?}"
        );
        let pid = seen.pid.expect("a pid");
        assert!(start_time(pid).is_some(), "pid {pid} runs");
        // Debug never shows environment values.
        let text = format!("{seen:?}");
        assert!(text.contains("DB_PASSWORD"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");

        // The directory moved aside: nothing is at the path any more.
        let aside = scratch.dir.path().join("rootfs-aside");
        fs::rename(scratch.rootfs(), &aside).expect("rename the rootfs aside");
        let seen = observe(&driver, &handle);
        assert_eq!(seen.root_is_rootfs, Some(false), "{sandbox:?}: {seen:?}");
        // Another directory at the same path is not the instance's root either.
        common::busybox_rootfs(&scratch.rootfs(), true);
        let seen = observe(&driver, &handle);
        assert_eq!(seen.root_is_rootfs, Some(false), "{sandbox:?}: {seen:?}");
        // It is the directory that counts, not its path: put back, it is the root again.
        fs::rename(scratch.rootfs(), scratch.dir.path().join("rootfs-new")).expect("rename");
        fs::rename(&aside, scratch.rootfs()).expect("rename back");
        let seen = observe(&driver, &handle);
        assert_eq!(seen.root_is_rootfs, Some(true), "{sandbox:?}: {seen:?}");
        // Observing changed nothing.
        assert_eq!(wait_http(app.port, "/").0, 200);
    }
}

#[test]
fn observe_cannot_tell_the_root_of_a_composed_image() {
    let scratch = Scratch::new(false);
    let driver = scratch.driver(Some(bubblewrap()));
    let app = spec(&scratch, "composed", &["/app/start"]);
    let handle = driver.start(&app).expect("start");
    let _started = Started(&driver, vec![handle.clone()]);
    assert_eq!(record(&handle).root, Some(RootMount::Composed));
    wait_http(app.port, "/");
    let seen = observe(&driver, &handle);
    assert_eq!(seen.root_is_rootfs, None, "{seen:?}");
    assert_eq!(seen.env.get("KILN_INSTANCE_ID"), Some(&app.id), "{seen:?}");
    // A handle from before kiln recorded the mount tells only a match, never a mismatch.
    let mut old = handle;
    old.data.as_object_mut().expect("object").remove("root");
    assert_eq!(observe(&driver, &old).root_is_rootfs, None);
}

#[test]
fn observe_finds_the_app_not_its_children_nor_bubblewrap() {
    let scratch = Scratch::new(true);
    let driver = scratch.driver(Some(bubblewrap()));
    let script = "sleep 3600 & setsid sleep 3601 & exec /app/start";
    let app = spec(&scratch, "kids", &["/bin/sh", "-c", script]);
    let handle = driver.start(&app).expect("start");
    let _started = Started(&driver, vec![handle.clone()]);
    wait_http(app.port, "/");
    let rec = record(&handle);
    let init = rec.init.clone().expect("a namespace init");
    let seen = observe(&driver, &handle);
    assert_eq!(
        seen.args.first().map(String::as_str),
        Some("nc"),
        "{seen:?}"
    );
    let pid = seen.pid.expect("pid");
    assert_ne!(pid, init.proc.pid);
    assert_ne!(pid, rec.leader.pid);
    let ppid = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        });
    assert_eq!(ppid, Some(init.proc.pid), "the app is the init's child");
    // bubblewrap runs without the app's environment; the app has exactly the spec's and what
    // the sandbox adds (bubblewrap's PWD; busybox sh may export more, never a value of ours
    // changed).
    for (k, v) in &app.env {
        assert_eq!(seen.env.get(k), Some(v), "{seen:?}");
    }
    assert_eq!(
        seen.env.get("PWD").map(String::as_str),
        Some("/"),
        "{seen:?}"
    );
}

#[test]
fn observe_right_after_start_sees_the_app_not_the_sandbox_being_set_up() {
    let scratch = Scratch::new(true);
    for sandbox in sandboxes() {
        let driver = scratch.driver(Some(sandbox.clone()));
        for i in 0..5 {
            let app = spec(&scratch, &format!("early{i}"), &["/app/start"]);
            let handle = driver.start(&app).expect("start");
            let _started = Started(&driver, vec![handle.clone()]);
            let seen = observe(&driver, &handle);
            assert_eq!(
                seen.env.get("PORT"),
                app.env.get("PORT"),
                "{sandbox:?}: {seen:?}"
            );
            let first = seen.args.first().map(String::as_str).unwrap_or_default();
            assert!(
                !first.ends_with("bwrap") && !first.ends_with("chroot"),
                "{sandbox:?}: {seen:?}"
            );
        }
    }
}

#[test]
fn observe_works_for_an_image_user() {
    let scratch = Scratch::new(true);
    let driver = scratch.driver(Some(bubblewrap()));
    let mut app = spec(&scratch, "user", &["/app/start"]);
    app.user = Some(User {
        uid: 1000,
        gid: 1001,
    });
    let handle = driver.start(&app).expect("start");
    let _started = Started(&driver, vec![handle.clone()]);
    wait_http(app.port, "/");
    let seen = observe(&driver, &handle);
    assert_eq!(seen.env.get("KILN_INSTANCE_ID"), Some(&app.id), "{seen:?}");
    assert_eq!(seen.root_is_rootfs, Some(true), "{seen:?}");
}

#[test]
fn observe_errors_once_the_app_is_gone() {
    let scratch = Scratch::new(true);
    let driver = scratch.driver(Some(bubblewrap()));
    // The app exits; a child it left behind keeps the sandbox alive.
    let app = spec(
        &scratch,
        "gone",
        &["/bin/sh", "-c", "sleep 3600 & echo ready; sleep 0.2"],
    );
    let handle = driver.start(&app).expect("start");
    let _started = Started(&driver, vec![handle.clone()]);
    match wait_not_running(&driver, &handle) {
        Status::Exited { .. } => {}
        other => panic!("expected Exited, found {other:?}"),
    }
    let err = driver.observe(&handle).expect_err("the app exited");
    assert!(matches!(err, DriverError::NotRunning { .. }), "{err}");
    assert!(err.to_string().contains(&app.id), "{err}");
    let foreign = Handle {
        id: "x".into(),
        data: serde_json::json!({"driver": "fake"}),
    };
    assert_eq!(
        driver.observe(&foreign).expect_err("foreign").fault(),
        Fault::Internal
    );
}
