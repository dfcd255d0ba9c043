//! Run records: one small JSON file per instance in the runtime directory, `<id>.json`,
//! written atomically (temp file, fsync, rename, fsync of the directory) so that a kiln killed
//! at any moment leaves either no record or a whole one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::procfs;

/// The record's format version.
pub(crate) const VERSION: u32 = 1;

/// How an instance was sandboxed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxKind {
    /// bubblewrap: read-only root, own pid namespace.
    Bubblewrap,
    /// `chroot`: no read-only root, no pid namespace; the process group is the instance.
    Chroot,
}

/// How the image root became the sandbox's `/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootMount {
    /// `/` is the image root directory itself: bubblewrap's `--ro-bind ROOTFS /`, or `chroot`.
    Rootfs,
    /// `/` is a tmpfs holding read-only binds of the image's top-level entries (images without
    /// `/dev`, `/proc`, `/tmp` and `/run`), so it is not the image directory.
    Composed,
}

/// A process identified by pid and start time (field 22 of `/proc/<pid>/stat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    /// Host pid.
    pub pid: i32,
    /// Start time in clock ticks since boot.
    pub start: u64,
}

impl Proc {
    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        procfs::alive(self.pid, self.start)
    }
}

/// The init of a bubblewrap sandbox's pid namespace. When it dies the kernel kills every
/// process in the namespace, so it is how the whole instance is killed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsInit {
    /// The init process (bubblewrap's own, on the host's side).
    #[serde(flatten)]
    pub proc: Proc,
    /// The namespace, as `/proc/<pid>/ns/pid` names it: `pid:[4026532178]`.
    pub ns: String,
}

/// What the driver keeps about a running instance; also the [`Handle`](kiln_driver::Handle)'s
/// data. No environment values: they may hold secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The record format version (1).
    pub version: u32,
    /// The instance id.
    pub id: String,
    /// Its service.
    pub service: String,
    /// Its release number.
    pub release: u32,
    /// Its host port.
    pub port: u16,
    /// The program (`args[0]`).
    pub program: String,
    /// The image root.
    pub rootfs: PathBuf,
    /// The log file.
    pub log_path: PathBuf,
    /// How it is sandboxed.
    pub sandbox: SandboxKind,
    /// The process kiln spawned, leader of its own process group: bubblewrap's monitor (alive
    /// exactly as long as the app), or under `chroot` the app itself.
    pub leader: Proc,
    /// bubblewrap only: the sandbox's pid namespace init. `None` if the app exited before it
    /// could be seen.
    pub init: Option<NsInit>,
    /// When it started (RFC 3339, from kiln's clock).
    pub started_at: String,
    /// How the image root was mounted; `None` in records written before kiln recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<RootMount>,
}

impl Record {
    /// The record's file in `dir`.
    pub(crate) fn path(dir: &Path, id: &str) -> PathBuf {
        dir.join(format!("{id}.json"))
    }

    /// Writes the record atomically.
    pub(crate) fn write(&self, dir: &Path) -> io::Result<()> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".record-")
            .suffix(".tmp")
            .tempfile_in(dir)?;
        serde_json::to_writer_pretty(&mut tmp, self)?;
        tmp.write_all(b"\n")?;
        tmp.as_file().sync_all()?;
        tmp.persist(Self::path(dir, &self.id))
            .map_err(|e| e.error)?;
        File::open(dir)?.sync_all()
    }

    /// Reads every record in `dir`: `(file, Ok(record))`, or the parse error for a file that
    /// is not a record of this version. Temp files (dot files) are skipped.
    pub(crate) fn read_all(dir: &Path) -> io::Result<Vec<(PathBuf, io::Result<Self>)>> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let record = fs::read(&path).and_then(|bytes| {
                let record: Self = serde_json::from_slice(&bytes)?;
                if record.version == VERSION {
                    Ok(record)
                } else {
                    Err(io::Error::other(format!(
                        "expected record version {VERSION}, found {}",
                        record.version
                    )))
                }
            });
            out.push((path, record));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes the record's file; a missing file is fine.
    pub(crate) fn remove(dir: &Path, id: &str) -> io::Result<()> {
        match fs::remove_file(Self::path(dir, id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether any process of the instance still runs: the leader, or anything left in its
    /// sandbox (bubblewrap: the namespace init outlives the app while the app's children
    /// live; chroot: members of the process group).
    pub(crate) fn anything_alive(&self) -> bool {
        if self.leader.alive() {
            return true;
        }
        match (&self.sandbox, &self.init) {
            (SandboxKind::Bubblewrap, Some(init)) => init.proc.alive(),
            (SandboxKind::Bubblewrap, None) => false,
            (SandboxKind::Chroot, _) => !procfs::find(|_, s| s.pgrp == self.leader.pid).is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> Record {
        Record {
            version: VERSION,
            id: id.to_owned(),
            service: "web".into(),
            release: 2,
            port: 41000,
            program: "/app/web".into(),
            rootfs: "/var/lib/kiln/rootfs/abc".into(),
            log_path: "/var/log/kiln/web.log".into(),
            sandbox: SandboxKind::Bubblewrap,
            leader: Proc {
                pid: 1234,
                start: 99,
            },
            init: Some(NsInit {
                proc: Proc {
                    pid: 1236,
                    start: 100,
                },
                ns: "pid:[4026532178]".into(),
            }),
            started_at: "2025-01-01T00:00:00Z".into(),
            root: Some(RootMount::Composed),
        }
    }

    #[test]
    fn writes_reads_and_removes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = sample("web-v2-a");
        a.write(dir.path()).expect("write");
        // A leftover temp file and a foreign file are not records.
        fs::write(dir.path().join(".record-x.tmp"), "{").expect("tmp");
        fs::write(dir.path().join("junk.json"), "{").expect("junk");
        let all = Record::read_all(dir.path()).expect("read");
        assert_eq!(all.len(), 2);
        let records: Vec<&Record> = all.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
        assert_eq!(records, [&a]);
        Record::remove(dir.path(), "web-v2-a").expect("remove");
        Record::remove(dir.path(), "web-v2-a").expect("remove again");
        assert!(!Record::path(dir.path(), "web-v2-a").exists());
    }

    #[test]
    fn json_shape_is_stable() {
        let json = serde_json::to_value(sample("x")).expect("json");
        assert_eq!(
            json["leader"],
            serde_json::json!({"pid": 1234, "start": 99})
        );
        assert_eq!(
            json["init"],
            serde_json::json!({"pid": 1236, "start": 100, "ns": "pid:[4026532178]"})
        );
        assert_eq!(json["sandbox"], "bubblewrap");
        assert_eq!(json["root"], "composed");
        let back: Record = serde_json::from_value(json.clone()).expect("round trip");
        assert_eq!(back, sample("x"));
        // A record (and a handle kept in kiln's state) from before `root` was recorded.
        let mut old = json;
        old.as_object_mut().expect("object").remove("root");
        let back: Record = serde_json::from_value(old).expect("an older record");
        assert_eq!(back.root, None);
        assert!(
            serde_json::to_value(&back)
                .expect("json")
                .get("root")
                .is_none(),
            "written back unchanged"
        );
    }

    #[test]
    fn missing_directory_has_no_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let all = Record::read_all(&dir.path().join("nope")).expect("read");
        assert!(all.is_empty());
    }
}
