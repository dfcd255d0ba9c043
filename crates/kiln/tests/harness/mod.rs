//! Runs the real `kiln` binary in a scratch project directory.

#![allow(dead_code, clippy::unwrap_used)]

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
