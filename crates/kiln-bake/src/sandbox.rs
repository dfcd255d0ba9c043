//! Running shell provisioners inside an image root with bubblewrap.
//!
//! A shell step runs with the image root bound writable at `/`, fresh `/dev`, `/proc` and a
//! tmpfs `/tmp`, its own pid, ipc, uts and network namespaces (no network unless the step asks
//! for it), a cleared environment, and `--die-with-parent` so that a killed bake leaves no
//! process behind. Run by root, the step is root inside with a container runtime's default
//! capabilities (so `chown` and package installs work); run by another user, a user namespace
//! maps that user to root inside. Nothing
//! of the host's filesystem is visible. There is no fallback: without bubblewrap a shell step is
//! refused, never run on the host.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The PATH inside the sandbox.
const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where a script file is mounted inside the sandbox.
const SCRIPT_MOUNT: &str = "/tmp/.kiln-provisioner.sh";

/// Capabilities a shell step keeps when kiln runs as root (Docker's default set without
/// `CAP_NET_RAW` and `CAP_MKNOD`).
const ROOT_CAPS: [&str; 11] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_SETFCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
];

/// How many trailing output lines a failure reports.
pub const TAIL_LINES: usize = 20;

/// Finds bubblewrap: `$KILN_BWRAP` if set, else `bwrap` on `PATH`.
pub fn find_bwrap() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_BWRAP") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bwrap"))
        .find(|p| p.is_file())
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub enum Commands<'a> {
    /// Commands run in order by `/bin/sh -e -c`.
    Inline(&'a [String]),
    /// A script file on the host, mounted read-only into the sandbox and run by `/bin/sh -e`.
    Script(&'a Path),
}

/// How a sandboxed step ended badly.
#[derive(Debug)]
pub enum RunError {
    /// bubblewrap could not be started.
    Spawn(io::Error),
    /// The step exited non-zero (or was killed: `code` is `None`).
    Failed {
        /// Exit code, if it exited.
        code: Option<i32>,
        /// The last lines of its combined output.
        tail: Vec<String>,
    },
}

/// Runs `what` in the image root at `root`. Every output line (stdout and stderr, interleaved
/// as written) goes to `on_line`. `as_root` says kiln runs as root (see [`ROOT_CAPS`]).
pub fn run(
    bwrap: &Path,
    root: &Path,
    what: Commands<'_>,
    env: &BTreeMap<String, String>,
    network: bool,
    as_root: bool,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), RunError> {
    let mut cmd = Command::new(bwrap);
    cmd.arg("--bind").arg(root).arg("/");
    cmd.args(["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]);
    if as_root {
        // No user namespace: steps that install packages need real ownership changes. Keep
        // only the capabilities a container runtime grants by default, less raw sockets and
        // device nodes.
        cmd.args([
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-uts",
            "--unshare-cgroup-try",
        ]);
        if !network {
            cmd.arg("--unshare-net");
        }
        cmd.args(["--cap-drop", "ALL"]);
        for cap in ROOT_CAPS {
            cmd.args(["--cap-add", cap]);
        }
    } else {
        // A user namespace maps the building user to root inside; other owners cannot be set.
        cmd.arg("--unshare-all");
        if network {
            cmd.arg("--share-net");
        }
    }
    cmd.args(["--die-with-parent", "--new-session"]);
    cmd.args(["--clearenv", "--setenv", "PATH", SANDBOX_PATH]);
    cmd.args(["--setenv", "HOME", "/root"]);
    for (k, v) in env {
        cmd.arg("--setenv").arg(k).arg(v);
    }
    cmd.args(["--chdir", "/"]);
    match what {
        Commands::Inline(lines) => {
            cmd.args(["/bin/sh", "-e", "-c"]).arg(lines.join("\n"));
        }
        Commands::Script(path) => {
            cmd.arg("--ro-bind").arg(path).arg(SCRIPT_MOUNT);
            cmd.args(["/bin/sh", "-e", SCRIPT_MOUNT]);
        }
    }

    // One pipe for both streams keeps their lines in the order they were written.
    let (reader, writer) = io::pipe().map_err(RunError::Spawn)?;
    let writer2 = writer.try_clone().map_err(RunError::Spawn)?;
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    // Drop our copies of the write end so the reader sees EOF when the child exits.
    drop(cmd);

    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in BufReader::new(reader).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches('\r');
        on_line(line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
    }
    let status = child.wait().map_err(RunError::Spawn)?;
    if status.success() {
        Ok(())
    } else {
        Err(RunError::Failed {
            code: status.code(),
            tail: tail.into(),
        })
    }
}
