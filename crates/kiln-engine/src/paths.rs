//! Where a project's local state lives: everything under one `.kiln` directory beside the
//! config, so a project can be moved, backed up or deleted as one folder.

use std::path::{Path, PathBuf};

/// The files and directories of one project's local state.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The `.kiln` directory.
    pub root: PathBuf,
}

impl Paths {
    /// The state of the project whose `.kiln` directory is `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The image store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// The SQLite state database.
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.db")
    }

    /// The control socket (only the owner may open it).
    pub fn socket(&self) -> PathBuf {
        self.root.join("kiln.sock")
    }

    /// The running server's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("server.pid")
    }

    /// The background server's own log.
    pub fn server_log(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// Records of running instances, for re-adoption.
    pub fn runtime(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Unpacked, read-only root filesystems, one per image digest.
    pub fn rootfs(&self) -> PathBuf {
        self.root.join("rootfs")
    }

    /// Instance logs: `logs/SERVICE/INSTANCE.log`.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The log file of one instance.
    pub fn instance_log(&self, service: &str, instance: &str) -> PathBuf {
        self.logs().join(service).join(format!("{instance}.log"))
    }

    /// Creates the directories, private to the owner.
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for dir in [
            self.root.clone(),
            self.runtime(),
            self.rootfs(),
            self.logs(),
        ] {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
    }

    /// The `.kiln` directory of the project whose config is at `config`, as an absolute path
    /// (the server and its instances must not depend on the directory they were started in).
    pub fn for_config(config: &Path) -> Self {
        let dir = match config.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        Self::new(dir.join(".kiln"))
    }
}
