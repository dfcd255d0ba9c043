//! Deterministic layer tars: the same tree always gives the same bytes.
//!
//! Following the reproducible-build recipe (apko, Nix, BuildKit with `rewrite-timestamp`):
//! entries are written in sorted walk order; every entry's mtime is the given epoch; uid/gid are
//! numeric and given (0 unless told otherwise) with empty user and group names; there are no
//! atime/ctime or PAX records; device numbers are 0; modes are masked to `0o7777`. Hard links
//! become independent files, because their grouping depends on the checkout, not the content.
//! Identity is the DiffID (the uncompressed tar's sha256): compressed bytes depend on the
//! compressor's version and level.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use flate2::write::GzEncoder;
use kiln_core::Digest;
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};
use walkdir::WalkDir;

use crate::error::{Error, Result};
use crate::oci::{MEDIA_LAYER_TAR, MEDIA_LAYER_TAR_GZIP, MEDIA_LAYER_TAR_ZSTD};
use crate::record::LayerRecord;
use crate::store::{BlobWriter, IO_BUF, Store};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar: fastest to write (one hash pass), largest, and its digest does not depend
    /// on a compressor's version. kiln's default.
    #[default]
    None,
    /// gzip at level 6: what every runtime and registry accepts; several times slower.
    Gzip,
    /// zstd at level 3: far faster than gzip and smaller; needs a recent runtime.
    Zstd,
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => MEDIA_LAYER_TAR,
            Compression::Gzip => MEDIA_LAYER_TAR_GZIP,
            Compression::Zstd => MEDIA_LAYER_TAR_ZSTD,
        }
    }
}

/// Writes a layer blob into the store: hashes the uncompressed tar (the DiffID) while
/// compressing it into a [`BlobWriter`]. Wrap it in a [`LayerWriter`].
pub struct LayerBlobWriter {
    sink: Sink,
    /// `None` for uncompressed layers, whose DiffID is the blob digest.
    diff: Option<Sha256>,
    compression: Compression,
}

enum Sink {
    Plain(BlobWriter),
    Gzip(GzEncoder<BlobWriter>),
    Zstd(zstd::stream::write::Encoder<'static, BlobWriter>),
}

impl fmt::Debug for LayerBlobWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerBlobWriter")
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl LayerBlobWriter {
    /// A writer for a new layer blob in `store`.
    pub fn new(store: &Store, compression: Compression) -> Result<Self> {
        let blob = store.blob_writer()?;
        let sink = match compression {
            Compression::None => Sink::Plain(blob),
            // GzEncoder writes mtime 0 and OS "unknown" in the gzip header: no host leaks in.
            Compression::Gzip => Sink::Gzip(GzEncoder::new(blob, flate2::Compression::new(6))),
            Compression::Zstd => Sink::Zstd(
                zstd::stream::write::Encoder::new(blob, 3)
                    .map_err(Error::io("start zstd compression in", store.root()))?,
            ),
        };
        let diff = (compression != Compression::None).then(Sha256::new);
        Ok(Self {
            sink,
            diff,
            compression,
        })
    }

    /// Finishes compression and stores the blob.
    pub fn commit(self) -> Result<LayerRecord> {
        let finish_err = |e| Error::Io {
            action: "finish compressing layer",
            path: PathBuf::from("<layer blob>"),
            source: e,
        };
        let blob = match self.sink {
            Sink::Plain(b) => b,
            Sink::Gzip(gz) => gz.finish().map_err(finish_err)?,
            Sink::Zstd(z) => z.finish().map_err(finish_err)?,
        };
        let (digest, size) = blob.commit()?;
        let diff_id = self
            .diff
            .map_or_else(|| digest.clone(), Digest::from_hasher);
        Ok(LayerRecord {
            digest,
            diff_id,
            size,
            media_type: self.compression.media_type().to_owned(),
        })
    }
}

impl Write for LayerBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.sink {
            Sink::Plain(w) => w.write(buf)?,
            Sink::Gzip(w) => w.write(buf)?,
            Sink::Zstd(w) => w.write(buf)?,
        };
        if let Some(h) = &mut self.diff {
            h.update(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Deliberately not forwarded: a flush would end a deflate/zstd block early and make the
        // compressed bytes depend on when callers flush. `commit` finishes the stream.
        Ok(())
    }
}

/// Writes tar entries with deterministic headers.
///
/// `W` should be buffered (a [`BlobWriter`] or [`LayerBlobWriter`] is): headers go out as
/// 512-byte writes. Paths are relative; a leading `/` or `./` is dropped and `..` is refused.
pub struct LayerWriter<W: Write> {
    builder: tar::Builder<W>,
    epoch: u64,
    /// Copy buffer reused for every file, so files cost no allocation.
    buf: Vec<u8>,
}

impl<W: Write> fmt::Debug for LayerWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerWriter")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

const BLOCK: u64 = 512;

impl<W: Write> LayerWriter<W> {
    /// A writer whose entries all get `epoch` (seconds since 1970) as mtime.
    pub fn new(out: W, epoch: u64) -> Self {
        Self {
            builder: tar::Builder::new(out),
            epoch,
            buf: Vec::new(),
        }
    }

    /// The mtime written for entries added through this writer's `append_*` methods.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Adds a directory.
    pub fn append_dir(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<()> {
        let path = layer_path(path.as_ref())?;
        self.put_dir(&path, mode, (uid, gid), self.epoch)
    }

    /// Adds a regular file of `size` bytes read from `reader`: fails if `reader` ends early, and
    /// reads no further than `size` (the header is already written by then).
    pub fn append_file(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        mut reader: impl Read,
    ) -> Result<()> {
        let path = layer_path(path.as_ref())?;
        self.put_file(
            &path,
            mode,
            (uid, gid),
            self.epoch,
            size,
            &mut reader,
            &path,
        )
    }

    /// Adds a symlink (mode `0o777`, as Linux reports for every symlink).
    pub fn append_symlink(
        &mut self,
        path: impl AsRef<Path>,
        target: impl AsRef<Path>,
        uid: u32,
        gid: u32,
    ) -> Result<()> {
        let path = layer_path(path.as_ref())?;
        self.put_symlink(&path, target.as_ref(), (uid, gid), self.epoch)
    }

    /// Adds an OCI whiteout (an empty `.wh.<name>` file) that deletes `path` from lower layers.
    pub fn append_whiteout(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = layer_path(path.as_ref())?;
        self.put_whiteout(&path, self.epoch)
    }

    /// Writes the end-of-archive marker and returns the inner writer (not flushed).
    pub fn finish(self) -> Result<W> {
        self.builder
            .into_inner()
            .map_err(Error::io("finish", Path::new("<layer tar>")))
    }

    fn header(
        &self,
        kind: EntryType,
        mode: u32,
        (uid, gid): (u32, u32),
        mtime: u64,
        size: u64,
    ) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode & 0o7777);
        h.set_uid(uid.into());
        h.set_gid(gid.into());
        h.set_mtime(mtime);
        h.set_size(size);
        // GNU tar writes zero device numbers as octal digits; setting them cannot fail on a GNU
        // header, and leaving the bytes NUL would differ from other tools for no reason.
        let _ = h.set_device_major(0);
        let _ = h.set_device_minor(0);
        h
    }

    pub(crate) fn put_dir(
        &mut self,
        path: &Path,
        mode: u32,
        owner: (u32, u32),
        mtime: u64,
    ) -> Result<()> {
        let mut h = self.header(EntryType::Directory, mode, owner, mtime, 0);
        // Directory names end in `/`, as GNU tar and Docker write them.
        let mut name = OsString::with_capacity(path.as_os_str().len() + 1);
        name.push(path.as_os_str());
        name.push("/");
        self.builder
            .append_data(&mut h, Path::new(&name), io::empty())
            .map_err(Error::io("write layer entry", path))
    }

    /// Appends a file entry. `source` names the file in read errors.
    #[expect(
        clippy::too_many_arguments,
        reason = "internal; every argument is a header field"
    )]
    pub(crate) fn put_file(
        &mut self,
        path: &Path,
        mode: u32,
        owner: (u32, u32),
        mtime: u64,
        size: u64,
        reader: &mut dyn Read,
        source: &Path,
    ) -> Result<()> {
        let mut h = self.header(EntryType::Regular, mode, owner, mtime, size);
        // `append_data` writes the header (and a GNU long-name entry if needed), then copies
        // the empty reader; the content follows here, exactly `size` bytes from a reused buffer.
        self.builder
            .append_data(&mut h, path, io::empty())
            .map_err(Error::io("write layer entry", path))?;
        if self.buf.is_empty() {
            self.buf = vec![0; IO_BUF];
        }
        let out = self.builder.get_mut();
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let n = match reader.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(Error::ShortRead {
                        path: path.display().to_string(),
                        expected: size,
                        found: size - left,
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("read", source)(e)),
            };
            out.write_all(&self.buf[..n])
                .map_err(Error::io("write layer entry", path))?;
            left -= n as u64;
        }
        let pad = (BLOCK - size % BLOCK) % BLOCK;
        out.write_all(&[0; BLOCK as usize][..pad as usize])
            .map_err(Error::io("write layer entry", path))
    }

    pub(crate) fn put_symlink(
        &mut self,
        path: &Path,
        target: &Path,
        owner: (u32, u32),
        mtime: u64,
    ) -> Result<()> {
        let mut h = self.header(EntryType::Symlink, 0o777, owner, mtime, 0);
        self.builder
            .append_link(&mut h, path, target)
            .map_err(Error::io("write layer entry", path))
    }

    fn put_whiteout(&mut self, path: &Path, mtime: u64) -> Result<()> {
        let Some(name) = path.file_name() else {
            return Err(Error::InvalidPath {
                path: path.display().to_string(),
                reason: "a whiteout needs a file name",
            });
        };
        let mut wh = OsString::from(".wh.");
        wh.push(name);
        let wh = path.with_file_name(wh);
        // Mode 0 and owner 0:0, like containerd's whiteouts.
        let mut h = self.header(EntryType::Regular, 0, (0, 0), mtime, 0);
        self.builder
            .append_data(&mut h, &wh, io::empty())
            .map_err(Error::io("write layer entry", &wh))
    }
}

/// A relative path with only normal components, or an error.
fn layer_path(p: &Path) -> Result<PathBuf> {
    let out = layer_prefix(p)?;
    if out.as_os_str().is_empty() {
        return Err(Error::InvalidPath {
            path: p.display().to_string(),
            reason: "it names the image root, which a layer entry cannot be",
        });
    }
    Ok(out)
}

/// Like [`layer_path`] but the root (`/`, `.`, empty) is allowed and gives an empty path.
fn layer_prefix(p: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::InvalidPath {
                    path: p.display().to_string(),
                    reason: "layer paths cannot contain `..`",
                });
            }
        }
    }
    Ok(out)
}

/// How [`write_tree`] writes a tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeOptions {
    /// mtime of every entry, in seconds since 1970 (the source date epoch).
    pub epoch: u64,
    /// Mode for every regular file instead of its own. Directories then get the same mode plus
    /// an execute bit wherever it grants read (`0o644` → `0o755`, `0o640` → `0o750`), so they
    /// stay traversable; without an override they keep their own mode. Symlinks are `0o777`.
    pub mode: Option<u32>,
    /// Who owns the entries.
    pub owner: Ownership,
}

/// Who owns the entries a layer takes from disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ownership {
    /// Every entry `0:0`: whoever ran the bake must not change the digest.
    #[default]
    Root,
    /// Every entry this `(uid, gid)`.
    Fixed(u32, u32),
    /// Each entry's numeric owner on disk: for trees that kiln unpacked, or a sandbox wrote,
    /// as root, where ownership on disk is the image's own.
    Disk,
}

impl Ownership {
    fn of(self, meta: &Metadata) -> (u32, u32) {
        match self {
            Ownership::Root => (0, 0),
            Ownership::Fixed(uid, gid) => (uid, gid),
            Ownership::Disk => (meta.uid(), meta.gid()),
        }
    }
}

/// What [`write_tree`] or [`write_diff`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Regular files written.
    pub files: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
}

/// The mode a directory gets under a file mode override: readable means traversable.
fn dir_mode(file_mode: u32) -> u32 {
    file_mode | ((file_mode & 0o444) >> 2)
}

/// Writes `src` (a file or a directory tree) into the layer at `dest_prefix`.
///
/// The walk is sorted by file name, so parents come before children and the same tree always
/// gives the same entries in the same order. Symlinks (including `src` itself) are stored as
/// symlinks, never followed; hard links become independent files; sockets are left out; fifos
/// and device nodes are an error, because an unprivileged bake could not reproduce them.
/// `dest_prefix` `/` (or empty) writes a directory's contents at the image root. Parent
/// directories of `dest_prefix` are not written: extraction creates them (`0o755`, root).
pub fn write_tree<W: Write>(
    src: &Path,
    dest_prefix: &str,
    w: &mut LayerWriter<W>,
    opts: &TreeOptions,
) -> Result<TreeStats> {
    let prefix = layer_prefix(Path::new(dest_prefix))?;
    let mut stats = TreeStats::default();
    let walk = WalkDir::new(src)
        .follow_links(false)
        .follow_root_links(false)
        .sort_by_file_name();
    for entry in walk {
        let entry = entry.map_err(|e| walk_error(e, src))?;
        // Every walked path starts with `src`; `depth` components follow it.
        let rel: PathBuf = entry
            .path()
            .components()
            .skip(src.components().count())
            .collect();
        // `join("")` would add a trailing slash: a file `src` must land exactly on the prefix.
        let dest = if rel.as_os_str().is_empty() {
            prefix.clone()
        } else {
            prefix.join(&rel)
        };
        if dest.as_os_str().is_empty() {
            continue; // the image root itself
        }
        let meta = entry.metadata().map_err(|e| walk_error(e, entry.path()))?;
        append_entry(
            w,
            entry.path(),
            &dest,
            &meta,
            opts.mode,
            opts.owner,
            opts.epoch,
            &mut stats,
        )?;
    }
    Ok(stats)
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

#[expect(
    clippy::too_many_arguments,
    reason = "internal; shared by write_tree and write_diff"
)]
fn append_entry<W: Write>(
    w: &mut LayerWriter<W>,
    src: &Path,
    dest: &Path,
    meta: &Metadata,
    mode_override: Option<u32>,
    ownership: Ownership,
    mtime: u64,
    stats: &mut TreeStats,
) -> Result<()> {
    let owner = ownership.of(meta);
    let ft = meta.file_type();
    let own_mode = meta.mode() & 0o7777;
    if ft.is_dir() {
        w.put_dir(dest, mode_override.map_or(own_mode, dir_mode), owner, mtime)
    } else if ft.is_file() {
        let mut file = File::open(src).map_err(Error::io("open", src))?;
        let size = meta.len();
        w.put_file(
            dest,
            mode_override.unwrap_or(own_mode),
            owner,
            mtime,
            size,
            &mut file,
            src,
        )?;
        stats.files += 1;
        stats.bytes += size;
        Ok(())
    } else if ft.is_symlink() {
        let target = fs::read_link(src).map_err(Error::io("read symlink", src))?;
        w.put_symlink(dest, &target, owner, mtime)
    } else if ft.is_socket() {
        // A socket is only meaningful to the process that bound it.
        tracing::debug!(path = %src.display(), "leaving a socket out of the layer");
        Ok(())
    } else if ft.is_fifo() {
        Err(Error::Unsupported {
            path: src.to_path_buf(),
            kind: "fifo",
        })
    } else {
        Err(Error::Unsupported {
            path: src.to_path_buf(),
            kind: "device node",
        })
    }
}

/// What a path was when a [`Snapshot`] was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A socket, fifo or device node.
    Other,
}

/// The recorded state of one path; any difference means the path changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapEntry {
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since 1970.
    pub mtime_ns: i128,
    /// Status-change time in nanoseconds since 1970. Catches what mtime misses: `chmod`,
    /// `chown`, and content rewritten with the old mtime restored (`touch -r`).
    pub ctime_ns: i128,
    /// Inode number: a file replaced by a new one (`mv new old`) changes it.
    pub inode: u64,
    /// A symlink's target.
    pub target: Option<PathBuf>,
}

/// The state of a tree before a shell step, to find what the step changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every path below the root (relative, the root itself excluded).
    pub entries: BTreeMap<PathBuf, SnapEntry>,
}

impl Snapshot {
    /// True when `path` (relative to the root) existed when the snapshot was taken.
    pub fn contains(&self, path: &Path) -> bool {
        self.entries.contains_key(path)
    }
}

/// Records every path under `root`, without following symlinks.
pub fn snapshot(root: &Path) -> Result<Snapshot> {
    let mut entries = BTreeMap::new();
    for entry in walk_below(root) {
        let (rel, path, meta) = entry?;
        entries.insert(rel, snap_entry(&path, &meta)?);
    }
    Ok(Snapshot { entries })
}

/// Every path below `root` (not `root` itself), without following symlinks, as (path relative
/// to `root`, full path, metadata).
fn walk_below(root: &Path) -> impl Iterator<Item = Result<(PathBuf, PathBuf, Metadata)>> + '_ {
    let depth = root.components().count();
    WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .into_iter()
        .map(move |entry| {
            let entry = entry.map_err(|e| walk_error(e, root))?;
            let meta = entry.metadata().map_err(|e| walk_error(e, entry.path()))?;
            let rel: PathBuf = entry.path().components().skip(depth).collect();
            Ok((rel, entry.into_path(), meta))
        })
}

fn snap_entry(path: &Path, meta: &Metadata) -> Result<SnapEntry> {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Other
    };
    let target = if kind == EntryKind::Symlink {
        Some(fs::read_link(path).map_err(Error::io("read symlink", path))?)
    } else {
        None
    };
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    Ok(SnapEntry {
        kind,
        mode: meta.mode() & 0o7777,
        size: meta.size(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        inode: meta.ino(),
        target,
    })
}

/// How [`write_diff`] writes a diff.
#[derive(Debug, Clone, Copy)]
pub struct DiffOptions {
    /// mtime of every entry, in seconds since 1970.
    pub epoch: u64,
    /// Who owns the written entries.
    pub owner: Ownership,
}

/// Writes what changed under `root` since `before`: every added or changed entry, and a
/// whiteout for every removed path (only the topmost removed one: removing a directory's
/// whiteout covers its children). Entries come out in sorted order.
pub fn write_diff<W: Write>(
    root: &Path,
    before: &Snapshot,
    w: &mut LayerWriter<W>,
    opts: &DiffOptions,
) -> Result<TreeStats> {
    enum Change {
        Entry(Metadata),
        /// A whiteout for this removed path; sorted under its `.wh.` name.
        Whiteout(PathBuf),
    }
    let mut changes: Vec<(PathBuf, Change)> = Vec::new();
    let mut present: HashSet<PathBuf> = HashSet::new();
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    for entry in walk_below(root) {
        let (rel, path, meta) = entry?;
        let now = snap_entry(&path, &meta)?;
        if now.kind == EntryKind::Dir {
            dirs.insert(rel.clone());
        }
        if before.entries.get(&rel) != Some(&now) {
            changes.push((rel.clone(), Change::Entry(meta)));
        }
        present.insert(rel);
    }
    for removed in before.entries.keys().filter(|p| !present.contains(*p)) {
        // Only where the parent still is a directory: if the parent went away or became a
        // file or symlink, its own whiteout or replacement already removes this path.
        let parent = removed.parent().unwrap_or(Path::new(""));
        if parent.as_os_str().is_empty() || dirs.contains(parent) {
            let mut name = OsString::from(".wh.");
            name.push(removed.file_name().unwrap_or_default());
            changes.push((parent.join(name), Change::Whiteout(removed.clone())));
        }
    }
    // Path ordering compares component by component: the same order as a sorted walk.
    changes.sort_by(|a, b| a.0.cmp(&b.0));

    let mut stats = TreeStats::default();
    for (rel, change) in changes {
        match change {
            Change::Entry(meta) => {
                append_entry(
                    w,
                    &root.join(&rel),
                    &rel,
                    &meta,
                    None,
                    opts.owner,
                    opts.epoch,
                    &mut stats,
                )?;
            }
            Change::Whiteout(removed) => w.put_whiteout(&removed, opts.epoch)?,
        }
    }
    Ok(stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
pub(crate) mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::time::{Duration, SystemTime};

    use super::*;

    /// One entry of a tar, as the tests look at it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Seen {
        pub path: String,
        pub kind: char,
        pub mode: u32,
        pub owner: (u64, u64),
        pub mtime: u64,
        pub names: (String, String),
        pub link: Option<String>,
        pub data: Vec<u8>,
    }

    pub(crate) fn entries(tar: &[u8]) -> Vec<Seen> {
        let mut ar = tar::Archive::new(tar);
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                Seen {
                    path: String::from_utf8(e.path_bytes().into_owned()).unwrap(),
                    kind: match h.entry_type() {
                        EntryType::Directory => 'd',
                        EntryType::Regular => 'f',
                        EntryType::Symlink => 'l',
                        other => panic!("unexpected entry type {other:?}"),
                    },
                    mode: h.mode().unwrap(),
                    owner: (h.uid().unwrap(), h.gid().unwrap()),
                    mtime: h.mtime().unwrap(),
                    names: (
                        String::from_utf8_lossy(h.username_bytes().unwrap_or_default())
                            .into_owned(),
                        String::from_utf8_lossy(h.groupname_bytes().unwrap_or_default())
                            .into_owned(),
                    ),
                    link: e
                        .link_name_bytes()
                        .map(|l| String::from_utf8(l.into_owned()).unwrap()),
                    data,
                }
            })
            .collect()
    }

    fn paths(tar: &[u8]) -> Vec<String> {
        entries(tar).into_iter().map(|e| e.path).collect()
    }

    fn tree_tar(src: &Path, prefix: &str, opts: &TreeOptions) -> (Vec<u8>, TreeStats) {
        let mut w = LayerWriter::new(Vec::new(), opts.epoch);
        let stats = write_tree(src, prefix, &mut w, opts).unwrap();
        (w.finish().unwrap(), stats)
    }

    /// site/{index.html, b/, b/z.txt, a.txt, link -> index.html}, with a hard link and odd modes.
    fn sample_tree(root: &Path) -> PathBuf {
        let site = root.join("site");
        fs::create_dir_all(site.join("b")).unwrap();
        fs::write(site.join("index.html"), "<h1>hi</h1>").unwrap();
        fs::write(site.join("b/z.txt"), "zzz").unwrap();
        fs::write(site.join("a.txt"), vec![7u8; 3000]).unwrap();
        fs::hard_link(site.join("a.txt"), site.join("hard.txt")).unwrap();
        symlink("index.html", site.join("link")).unwrap();
        fs::set_permissions(site.join("b/z.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
        site
    }

    #[test]
    fn write_tree_is_sorted_normalised_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let site = sample_tree(dir.path());
        let opts = TreeOptions {
            epoch: 1_700_000_000,
            ..TreeOptions::default()
        };
        let (first, stats) = tree_tar(&site, "/srv/site", &opts);
        assert_eq!(
            stats,
            TreeStats {
                files: 4,
                bytes: 11 + 3 + 3000 + 3000
            }
        );
        let seen = entries(&first);
        let names: Vec<&str> = seen.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            names,
            [
                "srv/site/",
                "srv/site/a.txt",
                "srv/site/b/",
                "srv/site/b/z.txt",
                "srv/site/hard.txt",
                "srv/site/index.html",
                "srv/site/link"
            ]
        );
        for e in &seen {
            assert_eq!(e.mtime, 1_700_000_000, "{}", e.path);
            assert_eq!(e.owner, (0, 0), "{}", e.path);
            assert_eq!(e.names, (String::new(), String::new()), "{}", e.path);
        }
        let by_name = |n: &str| seen.iter().find(|e| e.path.ends_with(n)).unwrap().clone();
        assert_eq!(by_name("z.txt").mode, 0o4755);
        assert_eq!(by_name("hard.txt").kind, 'f', "hard links become files");
        assert_eq!(by_name("hard.txt").data, vec![7u8; 3000]);
        assert_eq!(by_name("link").kind, 'l');
        assert_eq!(by_name("link").link.as_deref(), Some("index.html"));

        // New mtimes, a new owner and a rewrite with the same content change nothing.
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        for f in ["index.html", "a.txt", "b/z.txt"] {
            File::options()
                .write(true)
                .open(site.join(f))
                .unwrap()
                .set_modified(later)
                .unwrap();
        }
        fs::write(site.join("index.html"), "<h1>hi</h1>").unwrap();
        if crate::unpack::running_as_root() {
            std::os::unix::fs::lchown(site.join("a.txt"), Some(1234), Some(1234)).unwrap();
            std::os::unix::fs::lchown(site.join("link"), Some(1234), Some(1234)).unwrap();
        }
        let (second, _) = tree_tar(&site, "srv/site", &opts);
        assert!(first == second, "same tree, same bytes");
    }

    #[test]
    fn write_tree_overrides_modes_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let site = sample_tree(dir.path());
        let opts = TreeOptions {
            epoch: 0,
            mode: Some(0o640),
            owner: Ownership::Fixed(1000, 1001),
        };
        let (tar, _) = tree_tar(&site, "app", &opts);
        for e in entries(&tar) {
            assert_eq!(e.owner, (1000, 1001), "{}", e.path);
            let expected = match e.kind {
                'd' => 0o750,
                'f' => 0o640,
                _ => 0o777,
            };
            assert_eq!(e.mode, expected, "{}", e.path);
        }
    }

    #[test]
    fn write_tree_of_a_file_writes_exactly_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("web"), "binary").unwrap();
        let (tar, stats) = tree_tar(&dir.path().join("web"), "/app/web", &TreeOptions::default());
        assert_eq!(paths(&tar), ["app/web"]);
        assert_eq!(stats, TreeStats { files: 1, bytes: 6 });
    }

    #[test]
    fn write_tree_at_the_root_and_with_long_names() {
        let dir = tempfile::tempdir().unwrap();
        let long = "d".repeat(120);
        fs::create_dir_all(dir.path().join("t").join(&long)).unwrap();
        fs::write(dir.path().join("t").join(&long).join("f"), "x").unwrap();
        symlink("t".repeat(150), dir.path().join("t/l")).unwrap();
        let (tar, _) = tree_tar(&dir.path().join("t"), "/", &TreeOptions::default());
        let seen = entries(&tar);
        let names: Vec<&str> = seen.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, [format!("{long}/"), format!("{long}/f"), "l".into()]);
        assert_eq!(seen[2].link, Some("t".repeat(150)));
    }

    #[test]
    fn write_tree_refuses_fifos_and_drops_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        fs::create_dir(&t).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(t.join("sock")).unwrap();
        fs::write(t.join("f"), "x").unwrap();
        let (tar, _) = tree_tar(&t, "x", &TreeOptions::default());
        assert_eq!(paths(&tar), ["x/", "x/f"]);

        let status = std::process::Command::new("mkfifo")
            .arg(t.join("pipe"))
            .status()
            .unwrap();
        assert!(status.success());
        let mut w = LayerWriter::new(Vec::new(), 0);
        let err = write_tree(&t, "x", &mut w, &TreeOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported { path, kind: "fifo" } if path.ends_with("pipe")),
            "{err}"
        );
        assert!(err.to_string().contains("pipe"), "{err}");
    }

    #[test]
    fn layer_paths_are_relative_and_never_climb() {
        let mut w = LayerWriter::new(Vec::new(), 0);
        w.append_dir("/etc", 0o755, 0, 0).unwrap();
        w.append_file("./etc/motd", 0o100644, 0, 0, 2, &b"hi"[..])
            .unwrap();
        w.append_symlink("/etc/localtime", "/usr/share/zoneinfo/UTC", 0, 0)
            .unwrap();
        w.append_whiteout("/etc/old.conf").unwrap();
        assert!(matches!(
            w.append_file("../x", 0o644, 0, 0, 0, io::empty()),
            Err(Error::InvalidPath { .. })
        ));
        assert!(matches!(
            w.append_dir("/", 0o755, 0, 0),
            Err(Error::InvalidPath { .. })
        ));
        let err = w
            .append_file("short", 0o644, 0, 0, 10, &b"abc"[..])
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::ShortRead {
                    expected: 10,
                    found: 3,
                    ..
                }
            ),
            "{err}"
        );
        let seen = entries(&LayerWriter::new(Vec::new(), 0).finish().unwrap());
        assert!(seen.is_empty());

        let mut w = LayerWriter::new(Vec::new(), 0);
        w.append_dir("/etc", 0o755, 0, 0).unwrap();
        w.append_file("./etc/motd", 0o100644, 0, 0, 2, &b"hi"[..])
            .unwrap();
        w.append_whiteout("/etc/old.conf").unwrap();
        let seen = entries(&w.finish().unwrap());
        let names: Vec<&str> = seen.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["etc/", "etc/motd", "etc/.wh.old.conf"]);
        assert_eq!(seen[1].mode, 0o644, "mode masked to 0o7777");
        assert_eq!((seen[2].mode, seen[2].data.len()), (0, 0));
    }

    #[test]
    fn layer_blobs_record_the_diff_id_and_are_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let content: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut plain = LayerWriter::new(Vec::new(), 0);
        plain
            .append_file("data", 0o644, 0, 0, content.len() as u64, &content[..])
            .unwrap();
        let plain = plain.finish().unwrap();

        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let write = |chunk: usize| {
                let mut w = LayerBlobWriter::new(&store, compression).unwrap();
                for part in plain.chunks(chunk) {
                    w.write_all(part).unwrap();
                }
                w.commit().unwrap()
            };
            let a = write(1 << 20);
            let b = write(4096);
            assert_eq!(
                a, b,
                "{compression:?}: same tar, same blob, however it is written"
            );
            assert_eq!(a.diff_id, Digest::of(&plain), "{compression:?}");
            assert_eq!(a.media_type, compression.media_type());
            assert_eq!(
                a.size,
                fs::metadata(store.blob_path(&a.digest)).unwrap().len()
            );
            if compression == Compression::None {
                assert_eq!(a.digest, a.diff_id);
            } else {
                assert!(a.size < plain.len() as u64, "{compression:?} compresses");
            }
            // It reads back (gzip and zstd are detected by their magic bytes).
            let out = tempfile::tempdir().unwrap();
            crate::unpack::unpack(
                store.open_blob(&a.digest).unwrap(),
                out.path(),
                &Default::default(),
            )
            .unwrap();
            assert_eq!(fs::read(out.path().join("data")).unwrap(), content);
        }
    }

    #[test]
    fn diff_finds_added_changed_and_removed_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for d in ["etc", "usr/lib/old", "var/cache/apt", "keep"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "etc/hosts",
            "etc/motd",
            "etc/passwd",
            "usr/lib/old/a.so",
            "usr/lib/old/b.so",
            "keep/same",
        ] {
            fs::write(root.join(f), f).unwrap();
        }
        fs::write(root.join("var/cache/apt/pkgcache.bin"), "cache").unwrap();
        let before = snapshot(&root).unwrap();
        assert!(before.contains(Path::new("usr/lib/old/a.so")));
        assert!(!before.contains(Path::new("etc/new.conf")));

        // Changes: add, modify content, chmod only, remove a file, remove a tree, replace a
        // file by a directory, add a symlink.
        fs::write(root.join("etc/new.conf"), "new").unwrap();
        fs::write(root.join("etc/motd"), "changed motd").unwrap();
        fs::set_permissions(root.join("etc/passwd"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::remove_file(root.join("etc/hosts")).unwrap();
        fs::remove_dir_all(root.join("usr/lib/old")).unwrap();
        fs::remove_dir_all(root.join("var/cache/apt")).unwrap();
        fs::create_dir(root.join("var/cache/apt")).unwrap();
        symlink("/etc/motd", root.join("keep/motd")).unwrap();

        let mut w = LayerWriter::new(Vec::new(), 7);
        let stats = write_diff(
            &root,
            &before,
            &mut w,
            &DiffOptions {
                epoch: 7,
                owner: Ownership::Disk,
            },
        )
        .unwrap();
        let tar = w.finish().unwrap();
        let seen = entries(&tar);
        let names: Vec<&str> = seen.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc/",
                "etc/.wh.hosts",
                "etc/motd",
                "etc/new.conf",
                "etc/passwd",
                "keep/",
                "keep/motd",
                "usr/lib/",
                "usr/lib/.wh.old",
                "var/cache/",
                "var/cache/apt/",
                "var/cache/apt/.wh.pkgcache.bin",
            ]
        );
        assert_eq!(
            stats,
            TreeStats {
                files: 3,
                bytes: 3 + 12 + 10
            }
        );
        let passwd = seen.iter().find(|e| e.path == "etc/passwd").unwrap();
        let on_disk = root.join("etc/passwd").metadata().unwrap();
        let disk_owner = (u64::from(on_disk.uid()), u64::from(on_disk.gid()));
        assert_eq!((passwd.mode, passwd.owner), (0o600, disk_owner));
        assert!(seen.iter().all(|e| e.mtime == 7));

        // Nothing changed since: an empty diff.
        let after = snapshot(&root).unwrap();
        let mut w = LayerWriter::new(Vec::new(), 7);
        write_diff(
            &root,
            &after,
            &mut w,
            &DiffOptions {
                epoch: 7,
                owner: Ownership::Disk,
            },
        )
        .unwrap();
        assert!(entries(&w.finish().unwrap()).is_empty());
    }

    #[test]
    fn a_diff_applied_over_the_old_tree_gives_the_new_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("a/deep/er")).unwrap();
        fs::write(root.join("a/deep/er/f"), "f").unwrap();
        fs::write(root.join("a/x"), "x").unwrap();
        fs::write(root.join("top"), "top").unwrap();
        let mut base = LayerWriter::new(Vec::new(), 0);
        write_tree(&root, "", &mut base, &TreeOptions::default()).unwrap();
        let base = base.finish().unwrap();
        let before = snapshot(&root).unwrap();

        fs::remove_dir_all(root.join("a/deep")).unwrap();
        fs::remove_file(root.join("top")).unwrap();
        fs::create_dir(root.join("top")).unwrap();
        fs::write(root.join("top/inside"), "in").unwrap();
        fs::write(root.join("a/x"), "x2").unwrap();
        let mut diff = LayerWriter::new(Vec::new(), 0);
        write_diff(
            &root,
            &before,
            &mut diff,
            &DiffOptions {
                epoch: 0,
                owner: Ownership::Root,
            },
        )
        .unwrap();
        let diff = diff.finish().unwrap();

        let out = tempfile::tempdir().unwrap();
        let opts = crate::unpack::UnpackOptions {
            whiteouts: true,
            chown: false,
        };
        crate::unpack::unpack(&base[..], out.path(), &opts).unwrap();
        crate::unpack::unpack(&diff[..], out.path(), &opts).unwrap();
        let listing = |r: &Path| -> Vec<(PathBuf, Option<Vec<u8>>)> {
            snapshot(r)
                .unwrap()
                .entries
                .into_iter()
                .map(|(p, e)| {
                    let content =
                        (e.kind == EntryKind::File).then(|| fs::read(r.join(&p)).unwrap());
                    (p, content)
                })
                .collect()
        };
        assert_eq!(listing(out.path()), listing(&root));
    }
}
