//! Building the command that runs an instance: bubblewrap when present, `chroot` as root when
//! not, nothing otherwise.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use kiln_driver::{DriverError, InstanceSpec};

use crate::record::{RootMount, SandboxKind};

/// How instances are sandboxed on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sandbox {
    /// bubblewrap at this path: read-only root, nothing of the host's files, own pid, ipc,
    /// uts and cgroup namespaces, the host's network.
    Bubblewrap {
        /// The `bwrap` binary.
        bwrap: PathBuf,
        /// kiln runs as root: capabilities are dropped explicitly.
        as_root: bool,
    },
    /// `chroot` at this path, run as root. The root is **not** read-only and nothing but the
    /// file system view is isolated; kiln warns loudly on every start.
    Chroot {
        /// The `chroot` binary.
        chroot: PathBuf,
    },
}

/// Where the kernel's pseudo file systems and scratch space are mounted in every sandbox.
const MOUNT_POINTS: [&str; 4] = ["dev", "proc", "tmp", "run"];

/// The script that changes to the workdir under `chroot`, then execs the app.
pub(crate) const CHROOT_CD: &str = "cd \"$0\" && exec \"$@\"";

/// The `PATH` `execvp` uses when the environment has none (glibc's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

impl Sandbox {
    /// Finds bubblewrap (`$KILN_BWRAP` if set, else `bwrap` on `PATH`), else `chroot` on
    /// `PATH` when running as root, else nothing.
    pub fn detect() -> Option<Self> {
        let as_root = crate::procfs::effective_uid() == Some(0);
        if let Some(bwrap) = find_bwrap() {
            return Some(Self::Bubblewrap { bwrap, as_root });
        }
        Self::chroot_fallback()
    }

    /// The `chroot` fallback, if this process is root and `chroot` is on `PATH`.
    pub fn chroot_fallback() -> Option<Self> {
        if crate::procfs::effective_uid() != Some(0) {
            return None;
        }
        find_on_path("chroot").map(|chroot| Self::Chroot { chroot })
    }

    /// The kind recorded for instances run this way.
    pub fn kind(&self) -> SandboxKind {
        match self {
            Self::Bubblewrap { .. } => SandboxKind::Bubblewrap,
            Self::Chroot { .. } => SandboxKind::Chroot,
        }
    }

    /// The command that runs `spec`, without stdio, and how it mounts the image root. Checks
    /// the spec against the image first.
    pub(crate) fn command(&self, spec: &InstanceSpec) -> Result<(Command, RootMount), DriverError> {
        check_image(spec)?;
        match self {
            Self::Bubblewrap { bwrap, as_root } => {
                let root = root_mount(&spec.rootfs);
                let mut cmd = Command::new(bwrap);
                cmd.args(bwrap_args(spec, *as_root, root).map_err(|e| bad(spec, &e))?);
                // Not the app's environment (bwrap clears that), but bwrap's own, so that
                // /proc/<pid>/environ names the instance.
                cmd.env_clear().env("KILN_INSTANCE_ID", &spec.id);
                Ok((cmd, root))
            }
            Self::Chroot { chroot } => {
                let mut cmd = Command::new(chroot);
                if let Some(user) = spec.user {
                    cmd.arg(format!("--userspec={}:{}", user.uid, user.gid));
                }
                cmd.arg(&spec.rootfs);
                if spec.workdir != "/" {
                    // chroot(1) always starts in `/`; a shell in the image changes directory.
                    if resolve_in_root(&spec.rootfs, "/bin/sh").is_none() {
                        return Err(bad(
                            spec,
                            "expected /bin/sh in the image to honour the workdir without \
                             bubblewrap, found none (install bubblewrap)",
                        ));
                    }
                    cmd.args(["/bin/sh", "-c", CHROOT_CD, &spec.workdir]);
                }
                cmd.args(&spec.args);
                cmd.env_clear().envs(&spec.env);
                Ok((cmd, RootMount::Rootfs))
            }
        }
    }
}

fn bad(spec: &InstanceSpec, reason: &str) -> DriverError {
    DriverError::InvalidSpec {
        id: spec.id.clone(),
        reason: reason.to_owned(),
    }
}

/// How bubblewrap mounts the image at `rootfs`: bound read-only at `/` when it has the usual
/// mount points (`/dev`, `/proc`, `/tmp`, `/run`), else composed on a tmpfs.
pub(crate) fn root_mount(rootfs: &Path) -> RootMount {
    let has_mount_points = MOUNT_POINTS
        .iter()
        .all(|m| fs::symlink_metadata(rootfs.join(m)).is_ok_and(|md| md.is_dir()));
    if has_mount_points {
        RootMount::Rootfs
    } else {
        RootMount::Composed
    }
}

/// bubblewrap's arguments for `spec`, mounting its root as `root` says ([`root_mount`]).
///
/// [`RootMount::Rootfs`]: the image root is bound read-only at `/`. [`RootMount::Composed`]
/// (a `scratch` image): `/` is a tmpfs holding read-only binds of the image's top-level
/// entries, remounted read-only once the mount points are made. Either way the app can write
/// only to `/tmp` and `/run` (fresh tmpfs each).
pub(crate) fn bwrap_args(
    spec: &InstanceSpec,
    as_root: bool,
    root: RootMount,
) -> Result<Vec<OsString>, String> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |args: &[&OsStr]| a.extend(args.iter().map(|s| s.to_os_string()));
    let composed = root == RootMount::Composed;
    if !composed {
        push(&["--ro-bind".as_ref(), spec.rootfs.as_os_str(), "/".as_ref()]);
    } else {
        let mut entries: Vec<_> = fs::read_dir(&spec.rootfs)
            .map_err(|e| format!("expected a readable image root, found {e}"))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let name = entry.file_name();
            if MOUNT_POINTS.iter().any(|m| name == OsStr::new(m)) {
                continue;
            }
            let dest = Path::new("/").join(&name);
            let md = entry.metadata().map_err(|e| e.to_string())?;
            if md.is_symlink() {
                let target = fs::read_link(entry.path()).map_err(|e| e.to_string())?;
                push(&["--symlink".as_ref(), target.as_os_str(), dest.as_os_str()]);
            } else {
                let src = entry.path();
                push(&["--ro-bind".as_ref(), src.as_os_str(), dest.as_os_str()]);
            }
        }
    }
    push(&[
        "--dev".as_ref(),
        "/dev".as_ref(),
        "--proc".as_ref(),
        "/proc".as_ref(),
    ]);
    push(&[
        "--tmpfs".as_ref(),
        "/tmp".as_ref(),
        "--tmpfs".as_ref(),
        "/run".as_ref(),
    ]);
    if composed {
        push(&["--remount-ro".as_ref(), "/".as_ref()]);
    }
    for flag in [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--new-session",
    ] {
        push(&[flag.as_ref()]);
    }
    if let Some(user) = spec.user {
        // bubblewrap sets another uid only inside a user namespace; run by root, the image
        // user maps to root outside, holding no capabilities there (see `--cap-drop`).
        let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
        push(&["--unshare-user".as_ref(), "--uid".as_ref(), uid.as_ref()]);
        push(&["--gid".as_ref(), gid.as_ref()]);
    }
    if as_root {
        // Without a user namespace root would keep every capability; bubblewrap also sets
        // no_new_privs, so none can be regained through setuid or file capabilities.
        push(&["--cap-drop".as_ref(), "ALL".as_ref()]);
    }
    push(&["--clearenv".as_ref()]);
    for (k, v) in &spec.env {
        push(&["--setenv".as_ref(), k.as_ref(), v.as_ref()]);
    }
    push(&["--chdir".as_ref(), spec.workdir.as_ref(), "--".as_ref()]);
    for arg in &spec.args {
        push(&[arg.as_ref()]);
    }
    Ok(a)
}

/// Checks the parts of the spec that name things in the image: the root is a directory, the
/// workdir is one in it, the program exists there and is executable.
fn check_image(spec: &InstanceSpec) -> Result<(), DriverError> {
    if !spec.rootfs.is_dir() {
        return Err(bad(
            spec,
            &format!(
                "expected the image root {} to be a directory, found none",
                spec.rootfs.display()
            ),
        ));
    }
    if !resolve_in_root(&spec.rootfs, &spec.workdir).is_some_and(|p| p.is_dir()) {
        return Err(bad(
            spec,
            &format!(
                "expected workdir {} to be a directory in the image, found none",
                spec.workdir
            ),
        ));
    }
    let program = &spec.args[0];
    let found = if program.contains('/') {
        resolve_in_root(&spec.rootfs, program)
    } else {
        let path = spec.env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
        path.split(':')
            .filter(|dir| dir.starts_with('/'))
            .find_map(|dir| resolve_in_root(&spec.rootfs, &format!("{dir}/{program}")))
    };
    let Some(found) = found else {
        return Err(bad(
            spec,
            &format!("expected program {program} in the image, found none"),
        ));
    };
    let executable =
        fs::metadata(&found).is_ok_and(|md| md.is_file() && md.permissions().mode() & 0o111 != 0);
    if !executable {
        return Err(bad(
            spec,
            &format!("expected program {program} to be an executable file in the image"),
        ));
    }
    Ok(())
}

/// The host path of `path` inside the image rooted at `root`, following symlinks as the
/// sandbox would (absolute targets resolve against `root`, `..` stops at `root`). `None` if
/// it does not exist or links loop.
pub(crate) fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: VecDeque<OsString> = components(Path::new(path));
    let mut at: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = todo.pop_front() {
        if part == ".." {
            at.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&at);
        candidate.push(&part);
        let md = fs::symlink_metadata(&candidate).ok()?;
        if md.is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(&candidate).ok()?;
            if target.is_absolute() {
                at.clear();
            }
            for c in components(&target).into_iter().rev() {
                todo.push_front(c);
            }
        } else {
            at.push(part);
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&at);
    Some(out)
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// `$KILN_BWRAP` if set (and a file), else `bwrap` on `PATH`.
pub(crate) fn find_bwrap() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_BWRAP") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    find_on_path("bwrap")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolves_links_inside_the_root() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        fs::write(root.join("usr/bin/app"), "").expect("file");
        symlink("usr/bin", root.join("bin")).expect("relative link");
        symlink("/usr/bin/app", root.join("usr/bin/abs")).expect("absolute link");
        symlink("../../etc/passwd", root.join("usr/bin/escape")).expect("escaping link");
        symlink("loop", root.join("loop")).expect("loop");
        let app = root.join("usr/bin/app");
        assert_eq!(resolve_in_root(root, "/bin/app"), Some(app.clone()));
        assert_eq!(resolve_in_root(root, "/usr/bin/abs"), Some(app.clone()));
        assert_eq!(resolve_in_root(root, "/../../usr/bin/app"), Some(app));
        // `..` stops at the image root: the host's /etc/passwd is not the image's.
        assert_eq!(resolve_in_root(root, "/usr/bin/escape"), None);
        assert_eq!(resolve_in_root(root, "/loop"), None);
        assert_eq!(resolve_in_root(root, "/"), Some(root.to_path_buf()));
    }

    fn spec(root: &Path) -> InstanceSpec {
        InstanceSpec::new("web-v1-a", "web", 1, 8080)
            .with_rootfs(root)
            .with_args(["/bin/app", "--flag"])
            .with_log_path("/dev/null")
    }

    fn text(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn binds_a_full_root_read_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        for d in ["bin", "dev", "proc", "tmp", "run"] {
            fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        let mut s = spec(dir.path());
        s.user = Some(kiln_driver::User {
            uid: 1000,
            gid: 100,
        });
        assert_eq!(root_mount(dir.path()), RootMount::Rootfs);
        let got = text(&bwrap_args(&s, true, RootMount::Rootfs).expect("args"));
        let root = dir.path().display();
        assert_eq!(
            got,
            format!(
                "--ro-bind {root} / --dev /dev --proc /proc --tmpfs /tmp --tmpfs /run \
                 --unshare-pid --unshare-ipc --unshare-uts --unshare-cgroup-try --new-session \
                 --unshare-user --uid 1000 --gid 100 --cap-drop ALL --clearenv \
                 --setenv KILN_INSTANCE_ID web-v1-a --setenv PORT 8080 --chdir / -- /bin/app --flag"
            )
        );
        assert!(!got.contains("--die-with-parent"), "instances outlive kiln");
    }

    #[test]
    fn composes_a_scratch_root_and_remounts_it_read_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir(dir.path().join("app")).expect("mkdir");
        fs::write(dir.path().join("config"), "").expect("file");
        symlink("app", dir.path().join("bin")).expect("link");
        assert_eq!(root_mount(dir.path()), RootMount::Composed);
        let got = text(&bwrap_args(&spec(dir.path()), false, RootMount::Composed).expect("args"));
        let root = dir.path().display();
        assert!(
            got.starts_with(&format!(
                "--ro-bind {root}/app /app --symlink app /bin --ro-bind {root}/config /config \
                 --dev /dev --proc /proc --tmpfs /tmp --tmpfs /run --remount-ro / --unshare-pid"
            )),
            "{got}"
        );
        assert!(!got.contains("--cap-drop"), "{got}");
    }

    #[test]
    fn checks_the_image_before_running() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir(dir.path().join("bin")).expect("mkdir");
        fs::write(dir.path().join("bin/app"), "").expect("file");
        let s = spec(dir.path());
        let err = check_image(&s).expect_err("not executable");
        assert!(err.to_string().contains("executable"), "{err}");
        fs::set_permissions(
            dir.path().join("bin/app"),
            fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        check_image(&s).expect("ok");
        let by_name = InstanceSpec {
            args: vec!["app".into()],
            ..s.clone()
        };
        check_image(&by_name).expect("found on the default PATH");
        let cases = [
            (s.clone().with_args(["/bin/nope"]), "program /bin/nope"),
            (
                InstanceSpec {
                    workdir: "/srv".into(),
                    ..s.clone()
                },
                "workdir /srv",
            ),
            (s.with_rootfs(dir.path().join("x")), "image root"),
        ];
        for (spec, needle) in cases {
            let err = check_image(&spec).expect_err(needle);
            assert!(err.to_string().contains(needle), "{err}");
            assert_eq!(err.fault(), kiln_driver::Fault::Spec);
        }
    }
}
