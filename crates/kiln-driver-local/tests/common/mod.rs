//! A busybox image built at test time, and helpers shared by the local driver's tests.
#![allow(dead_code)] // Each test file uses a different part.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::clock::SystemClock;
use kiln_driver::conformance::{self, Fixture, Setup};
use kiln_driver::{Driver, Handle};
use kiln_driver_local::{LocalDriver, Record, Sandbox};

const APPLETS: [&str; 16] = [
    "sh", "nc", "env", "tr", "touch", "cat", "sleep", "setsid", "id", "grep", "ls", "printf",
    "echo", "test", "[", "true",
];

/// The app: `nc` runs `/app/handler` per connection (busybox `httpd` cannot route `/env` to a
/// CGI script, so a tiny shell responder plays the server).
const START: &str = r#"#!/bin/sh
echo "starting $KILN_INSTANCE_ID on port $PORT"
exec nc -ll -p "$PORT" -e /app/handler
"#;

const HANDLER: &str = r#"#!/bin/sh
read -r method path proto
while read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
done
echo "$method $path" >&2
case "$path" in
  /env) body=$(env) ;;
  /write) if touch /probe-file 2>/dev/null; then body=ok; else body=read-only; fi ;;
  *) body="hello from $KILN_INSTANCE_ID" ;;
esac
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#body}" "$body"
"#;

/// Builds a busybox image in `root`; `mount_points` adds `/dev`, `/proc`, `/tmp`, `/run`.
pub fn busybox_rootfs(root: &Path, mount_points: bool) {
    fs::create_dir_all(root.join("bin")).expect("mkdir bin");
    fs::create_dir_all(root.join("app")).expect("mkdir app");
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    for applet in APPLETS {
        symlink("busybox", root.join("bin").join(applet)).expect("applet link");
    }
    for (name, text) in [("start", START), ("handler", HANDLER)] {
        let path = root.join("app").join(name);
        fs::write(&path, text).expect("write script");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    if mount_points {
        for d in ["dev", "proc", "tmp", "run", "etc"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
    }
}

/// A temp dir with an image, a runtime dir and a log dir.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(mount_points: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        busybox_rootfs(&dir.path().join("rootfs"), mount_points);
        fs::create_dir(dir.path().join("logs")).expect("mkdir logs");
        Self { dir }
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn fixture(&self) -> Fixture {
        Fixture {
            rootfs: self.rootfs(),
            args: vec!["/app/start".to_owned()],
            exit_args: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("exit {}", conformance::EXIT_CODE),
            ],
            log_dir: self.dir.path().join("logs"),
            reachable: true,
            release_info: kiln_driver::ReleaseInfo::default(),
        }
    }
    pub fn driver(&self, sandbox: Option<Sandbox>) -> LocalDriver {
        LocalDriver::with_sandbox(self.run_dir(), Arc::new(SystemClock), sandbox)
    }
}

/// The conformance setup for `sandbox`.
pub fn setup(sandbox: Option<Sandbox>) -> Setup {
    let scratch = Scratch::new(true);
    let driver = scratch.driver(sandbox.clone());
    let run_dir = scratch.run_dir();
    let fixture = scratch.fixture();
    Setup {
        driver: Box::new(driver),
        reopen: Box::new(move || {
            Box::new(LocalDriver::with_sandbox(
                run_dir.clone(),
                Arc::new(SystemClock),
                sandbox.clone(),
            )) as Box<dyn Driver>
        }),
        fixture,
        keep: vec![Box::new(scratch)],
    }
}

pub fn bubblewrap() -> Sandbox {
    match Sandbox::detect() {
        Some(s @ Sandbox::Bubblewrap { .. }) => s,
        other => panic!("these tests need bubblewrap, found {other:?}"),
    }
}

pub fn record(handle: &Handle) -> Record {
    serde_json::from_value(handle.data.clone()).expect("a local record")
}

/// Asserts that no process of the instance is left: its leader and namespace init are gone
/// (or zombies waiting for init to reap them).
pub fn assert_no_process_left(record: &Record) {
    assert!(
        !record.leader.alive(),
        "leader {:?} still runs",
        record.leader
    );
    if let Some(init) = &record.init {
        assert!(!init.proc.alive(), "namespace init {init:?} still runs");
    }
}

/// Pids of running processes whose command line contains `marker` (what `pgrep -f` does).
pub fn pgrep(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie
            && String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(marker)
        {
            out.push(pid);
        }
    }
    out
}

/// Pids of processes whose root directory is `root` (visible for chroot, not for bubblewrap,
/// whose processes show `/`).
pub fn pids_rooted_at(root: &Path) -> Vec<i32> {
    fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            (fs::read_link(e.path().join("root")).ok()? == root).then_some(pid)
        })
        .collect()
}
