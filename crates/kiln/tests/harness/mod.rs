//! Runs the real `kiln` binary in a scratch project directory.

#![allow(dead_code, clippy::unwrap_used)]
// Waits here are bounded polls of a real server from outside; there is no clock to move.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch project: a directory with a `kiln.hcl` and whatever files a test writes.
pub struct Project {
    dir: tempfile::TempDir,
}

/// What one `kiln` run did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: &Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with the whole output unless the run exited 0.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "kiln failed:\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the run failed with exit code 1.
    pub fn fails(self) -> Self {
        assert_eq!(
            self.code, 1,
            "expected exit 1:\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// The digest printed for `image` by `kiln bake`.
    pub fn digest_of(&self, image: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{image} ")))
            .unwrap_or_else(|| panic!("no digest for {image} in:\n{}", self.stdout))
            .to_owned()
    }
}

impl Project {
    /// An empty project with `config` as its kiln.hcl.
    pub fn new(config: &str) -> Self {
        let p = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        p.write("kiln.hcl", config);
        p
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, contents: &str) {
        let path = self.dir.path().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    /// A busybox root filesystem at `rel`, enough for shell provisioners.
    pub fn busybox_rootfs(&self, rel: &str) {
        let root = self.dir.path().join(rel);
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("tests need a static busybox: run scripts/deps.sh test (Debian package busybox-static)");
        fs::copy(busybox, root.join("bin/busybox")).unwrap();
        for app in ["sh", "echo", "cat", "mkdir", "rm", "ls", "chmod", "touch"] {
            symlink("busybox", root.join("bin").join(app)).unwrap();
        }
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join(".kiln/store")
    }

    /// Runs `kiln ARGS` in the project directory, without a terminal.
    pub fn kiln(&self, args: &[&str]) -> Run {
        self.kiln_env(args, &[])
    }

    pub fn kiln_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(args).current_dir(self.dir.path());
        for var in [
            "KILN_CONFIG",
            "KILN_STORE",
            "SOURCE_DATE_EPOCH",
            "KILN_BWRAP",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Run::from(&cmd.output().unwrap())
    }
}

/// Every process whose command line mentions this project's directory, by the instance id in
/// its environment (`KILN_INSTANCE_ID`), or `"?"` when it has none.
pub fn instance_processes(p: &Project) -> Vec<String> {
    let needle = p.path().to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&needle) || cmdline.contains(" server") {
            continue;
        }
        let environ = fs::read(entry.path().join("environ")).unwrap_or_default();
        let id = environ
            .split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"KILN_INSTANCE_ID="))
            .map_or_else(
                || "?".to_owned(),
                |v| String::from_utf8_lossy(v).into_owned(),
            );
        found.push(id);
    }
    found
}

fn pids_of_instance(p: &Project, id: &str) -> Vec<i32> {
    let needle = p.path().to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(&needle) {
            continue;
        }
        let environ = fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ
            .split(|b| *b == 0)
            .any(|kv| kv == format!("KILN_INSTANCE_ID={id}").as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

/// Kills an instance's processes with SIGKILL, as an operator or the OOM killer would.
pub fn kill_instance(p: &Project, id: &str) {
    let pids = pids_of_instance(p, id);
    assert!(!pids.is_empty(), "no process found for instance {id}");
    for pid in pids {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
}

/// Kills the project's server with SIGKILL.
pub fn kill_server(p: &Project) {
    let pid = fs::read_to_string(p.path().join(".kiln/server.pid")).unwrap();
    let status = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(status.success());
    // The pid file stays behind, as after a real crash; wait until the process is gone.
    assert!(wait_for(std::time::Duration::from_secs(5), || !Path::new(
        &format!("/proc/{}", pid.trim())
    )
    .exists()));
}

/// Polls `f` every 100 ms until it is true or `timeout` passes.
pub fn wait_for(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl Drop for Project {
    /// Whatever a test did, nothing of kiln's may outlive it: `kiln down`, then kill what is
    /// left of this project (a killed server's instances, if a test failed half way).
    fn drop(&mut self) {
        if self.path().join(".kiln/kiln.sock").exists() {
            let _ = self.kiln(&["down", "--auto-approve"]);
        }
        if let Ok(pid) = fs::read_to_string(self.path().join(".kiln/server.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        let needle = self.path().to_string_lossy().into_owned();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// Runs `f` while `kiln-load` keeps 8 connections busy against `url`; returns its summary and
/// what `f` returned.
pub fn under_load<T>(url: &str, f: impl FnOnce() -> T) -> (kiln_load::Summary, T) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let load = rt.spawn(kiln_load::run(url.parse().unwrap(), 8, async {
        let _ = stopped.await;
    }));
    // Let the load reach a steady state before the change.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = f();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = stop.send(());
    (rt.block_on(load).unwrap(), out)
}

pub fn assert_no_failed_request(summary: &kiln_load::Summary) {
    assert_eq!(
        summary.failed(),
        0,
        "failed requests: {:?} of {} ({:?})",
        summary.statuses,
        summary.requests,
        summary.failures
    );
}
