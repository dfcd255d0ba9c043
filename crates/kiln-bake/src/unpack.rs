//! Safe extraction of untrusted tars (base archives, layers of other tools' images).
//!
//! The rules, each refused with [`Error::Unsafe`] before anything is written for that entry:
//!
//! - member names that are absolute, or whose `..` components climb above the root
//!   (`./x` and `a/../b` are fine: names are normalised lexically);
//! - members whose path passes through a symlink already on disk (`evil -> /etc`, then
//!   `evil/passwd`): every parent component is checked with `symlink_metadata`, and missing
//!   parents are created as real directories;
//! - symlinks whose *relative* target, resolved lexically from the link's directory, climbs above
//!   the root. Absolute targets are allowed: inside an image they resolve against the image's own
//!   root, and because extraction never follows a link they cannot reach the host here;
//! - hard links whose target escapes the root or is not an earlier member of the same archive.
//!
//! Nothing is ever written through a symlink: an existing path is removed (not followed) before
//! a file, symlink or hard link replaces it, and files are created with `O_EXCL`. Device nodes and
//! fifos are skipped with a warning (an unprivileged bake cannot create them). Directory modes are
//! applied at the end, deepest first, so a read-only directory can still be filled. mtimes are
//! not kept: nothing reads them, and layers are re-written with the epoch anyway.
//!
//! The checks assume no other process changes `dest` during extraction (it is kiln's own scratch
//! directory).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::EntryType;

use crate::error::{Error, Result};
use crate::record::LayerRecord;
use crate::store::{HashingReader, IO_BUF, Store};

/// How [`unpack`] extracts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Apply OCI whiteouts: `.wh.<name>` deletes `<name>`, `.wh..wh..opq` empties its directory
    /// (of what lower layers put there). Off, they are extracted as ordinary files.
    pub whiteouts: bool,
    /// Set owners from the headers with `lchown`. Only meaningful as root. A failure (e.g. an id
    /// the user namespace does not map) is counted and logged, not fatal: owners are metadata,
    /// not a safety property of the extraction.
    pub chown: bool,
}

impl UnpackOptions {
    /// The options for applying image layers: whiteouts on, owners kept when running as root.
    pub fn layers() -> Self {
        Self {
            whiteouts: true,
            chown: running_as_root(),
        }
    }
}

/// True when this process's effective uid is 0 (`/proc/self` belongs to it).
pub fn running_as_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// What [`unpack`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Archive members read.
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Whiteouts applied (both kinds).
    pub whiteouts: u64,
    /// Device nodes and fifos skipped.
    pub skipped_special: u64,
    /// `lchown` calls that failed.
    pub chown_failures: u64,
}

/// Extracts a tar, tar.gz or tar.zst (detected by magic bytes) into the existing directory
/// `dest`, refusing anything that would write outside it.
///
/// Directory modes are applied when the archive is done; to stack several layers as a non-root
/// user (whose writes a read-only directory would stop) use [`apply_layers`], which applies them
/// once after the last layer.
pub fn unpack(reader: impl Read, dest: &Path, opts: &UnpackOptions) -> Result<UnpackStats> {
    let mut x = Extractor::new(dest, *opts)?;
    x.archive(reader)?;
    x.finish()
}

/// Applies image layers in order (base first) onto `dest`, with whiteouts, checking each blob's
/// digest as it is read. A corrupt blob is [`Error::CorruptBlob`], even when the corruption first
/// shows up as a broken archive; the caller must then discard `dest`.
pub fn apply_layers(store: &Store, layers: &[LayerRecord], dest: &Path) -> Result<()> {
    let mut x = Extractor::new(dest, UnpackOptions::layers())?;
    for_each_layer(store, layers, |reader| x.archive(reader))?;
    x.finish().map(drop)
}

/// Streams each layer blob (base first) through `each`, checking its digest as it is read.
///
/// A blob whose content does not hash to its digest is [`Error::CorruptBlob`], even when `each`
/// failed first: corruption explains any other failure. Shared by [`apply_layers`] and
/// [`crate::manifest::Manifest::from_layers`], so both read layers the same way.
pub(crate) fn for_each_layer(
    store: &Store,
    layers: &[LayerRecord],
    mut each: impl FnMut(&mut HashingReader<File>) -> Result<()>,
) -> Result<()> {
    for layer in layers {
        let path = store.blob_path(&layer.digest);
        let mut reader = HashingReader::new(store.open_blob(&layer.digest)?);
        let done = each(&mut reader);
        // Hash the rest (tar stops at its end marker, decoders at their end of stream) so that
        // the digest covers the whole blob, then judge: corruption explains any other failure.
        let found = reader.finish().map_err(Error::io("read blob", &path))?;
        if found != layer.digest {
            return Err(Error::CorruptBlob {
                digest: layer.digest.clone(),
                found,
            });
        }
        done?;
    }
    Ok(())
}

/// An archive stream decompressed as its magic bytes say: gzip, zstd, or plain.
pub(crate) enum Decoded<R: BufRead> {
    /// Gzip (`1f 8b`); several members are read as one stream.
    Gzip(flate2::read::MultiGzDecoder<R>),
    /// Zstandard (`28 b5 2f fd`).
    Zstd(zstd::stream::read::Decoder<'static, R>),
    /// Anything else: read as it is.
    Plain(R),
}

/// Detects the compression of `reader` from its first bytes and wraps it in the decoder.
pub(crate) fn decompress<R: Read>(reader: R) -> Result<Decoded<BufReader<R>>> {
    let mut reader = BufReader::with_capacity(IO_BUF, reader);
    let magic = reader.fill_buf().map_err(bad_archive)?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Decoded::Gzip(flate2::read::MultiGzDecoder::new(reader))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Decoded::Zstd(zstd::stream::read::Decoder::with_buffer(reader).map_err(bad_archive)?)
    } else {
        Decoded::Plain(reader)
    })
}

impl<R: BufRead> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Gzip(r) => r.read(buf),
            Decoded::Zstd(r) => r.read(buf),
            Decoded::Plain(r) => r.read(buf),
        }
    }
}

struct Extractor {
    root: PathBuf,
    opts: UnpackOptions,
    stats: UnpackStats,
    /// Final modes of directories, applied by `finish` (relative paths).
    dir_modes: BTreeMap<PathBuf, u32>,
    /// Members of the current archive, the only valid hard-link targets.
    members: HashSet<PathBuf>,
    /// Paths the current archive wrote or wrote below: whiteouts only hide lower layers.
    touched: HashSet<PathBuf>,
    /// The last parent directory checked to be a real directory chain (relative); reset whenever
    /// anything on disk is removed or replaced.
    checked_parent: Option<PathBuf>,
    buf: Vec<u8>,
}

pub(crate) fn unsafe_entry(entry: &str, reason: impl Into<String>) -> Error {
    Error::Unsafe {
        entry: entry.to_owned(),
        reason: reason.into(),
    }
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "used as `map_err(bad_archive)`"
)]
pub(crate) fn bad_archive(e: io::Error) -> Error {
    Error::BadArchive {
        detail: e.to_string(),
    }
}

/// Where a hard link entry `name` points: a path inside the root that an earlier member of
/// the archive made (so a layer cannot link to a host file), or `None` when it names itself.
/// Shared by the extractor and by the manifest that replays it.
pub(crate) fn hard_link_target(
    target: &[u8],
    name: &str,
    rel: &Path,
    members: &HashSet<PathBuf>,
) -> Result<Option<PathBuf>> {
    let target_name = String::from_utf8_lossy(target).into_owned();
    let target_rel = member_path(target, &target_name).map_err(|_| {
        unsafe_entry(
            name,
            format!("is a hard link to {target_name:?}, which escapes the image root"),
        )
    })?;
    if !members.contains(&target_rel) {
        return Err(unsafe_entry(
            name,
            format!(
                "is a hard link to {target_name:?}, which is not an earlier member of the archive"
            ),
        ));
    }
    Ok((target_rel != rel).then_some(target_rel))
}

/// Normalises a member name lexically into a relative path (empty for the root itself).
pub(crate) fn member_path(raw: &[u8], name: &str) -> Result<PathBuf> {
    if raw.starts_with(b"/") {
        return Err(unsafe_entry(
            name,
            "escapes the image root: it is an absolute path, and members must be relative",
        ));
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(unsafe_entry(
                        name,
                        "escapes the image root: parent directory components lead outside",
                    ));
                }
            }
            part => parts.push(part),
        }
    }
    Ok(parts.into_iter().map(OsStr::from_bytes).collect())
}

/// True when a relative symlink target, resolved from `link_dir_depth` directories below the
/// root, climbs above the root.
pub(crate) fn target_escapes(target: &[u8], link_dir_depth: usize) -> bool {
    if target.starts_with(b"/") {
        return false;
    }
    let mut depth = link_dir_depth;
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return true,
            },
            _ => depth += 1,
        }
    }
    false
}

impl Extractor {
    fn new(root: &Path, opts: UnpackOptions) -> Result<Self> {
        let meta = fs::metadata(root).map_err(Error::io("open extraction directory", root))?;
        if !meta.is_dir() {
            return Err(Error::io("extract into", root)(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        Ok(Self {
            root: root.to_path_buf(),
            opts,
            stats: UnpackStats::default(),
            dir_modes: BTreeMap::new(),
            members: HashSet::new(),
            touched: HashSet::new(),
            checked_parent: None,
            buf: Vec::new(),
        })
    }

    fn archive(&mut self, reader: impl Read) -> Result<()> {
        self.members.clear();
        self.touched.clear();
        self.checked_parent = None;
        self.entries(decompress(reader)?)
    }

    fn entries(&mut self, reader: impl Read) -> Result<()> {
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(bad_archive)? {
            let mut entry = entry.map_err(bad_archive)?;
            self.entry(&mut entry)?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let rel = member_path(&raw, &name)?;
        self.stats.entries += 1;
        let header = entry.header();
        let kind = header.entry_type();
        if rel.as_os_str().is_empty() {
            // `./` is the root itself: nothing to create, and its mode is not ours to change.
            return if kind.is_dir() {
                Ok(())
            } else {
                Err(unsafe_entry(
                    &name,
                    "names the image root but is not a directory",
                ))
            };
        }
        if self.opts.whiteouts
            && let Some(file_name) = rel.file_name()
            && file_name.as_bytes().starts_with(b".wh.")
        {
            return self.whiteout(&rel, &name);
        }
        let mode = header.mode().map_err(bad_archive)? & 0o7777;
        // Owners are only read when they are applied, so a sloppy uid field in some old
        // archive does not stop an unprivileged extraction that would ignore it anyway.
        let owner = if self.opts.chown {
            (
                header.uid().map_err(bad_archive)?,
                header.gid().map_err(bad_archive)?,
            )
        } else {
            (0, 0)
        };
        match kind {
            EntryType::Directory => self.make_dir(&rel, &name, mode, owner)?,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.make_file(entry, &rel, &name, mode, owner)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&name, "is a symlink without a target"))?
                    .into_owned();
                self.make_symlink(&rel, &name, &target, owner)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&name, "is a hard link without a target"))?
                    .into_owned();
                self.make_hard_link(&rel, &name, &target)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                tracing::warn!(entry = %name, "skipping a device node or fifo: it cannot be created without privileges");
                self.stats.skipped_special += 1;
                return Ok(());
            }
            other => {
                tracing::warn!(entry = %name, kind = ?other, "skipping a tar entry of an unsupported type");
                return Ok(());
            }
        }
        self.members.insert(rel.clone());
        self.touched.insert(rel);
        Ok(())
    }

    /// Makes sure every parent of `rel` is a real directory (creating missing ones) and returns
    /// the absolute path of `rel`.
    fn prepare_parent(&mut self, rel: &Path, name: &str) -> Result<PathBuf> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        if self.checked_parent.as_deref() != Some(parent) {
            self.check_dirs(parent, name, true)?;
            self.checked_parent = Some(parent.to_path_buf());
        }
        Ok(self.root.join(rel))
    }

    /// Checks that `dir` and each of its ancestors is a real directory, never a symlink.
    /// Missing ones are created when `create`; otherwise returns `false` on the first missing.
    fn check_dirs(&mut self, dir: &Path, name: &str, create: bool) -> Result<bool> {
        let mut rel = PathBuf::new();
        let mut abs = self.root.clone();
        for part in dir.iter() {
            rel.push(part);
            abs.push(part);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(unsafe_entry(
                        name,
                        format!(
                            "passes through the symlink {}, and extraction never follows symlinks",
                            rel.display()
                        ),
                    ));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(unsafe_entry(
                        name,
                        format!("has a parent {} that is not a directory", rel.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    DirBuilder::new()
                        .mode(0o700)
                        .create(&abs)
                        .map_err(Error::io("create directory", &abs))?;
                    self.dir_modes.insert(rel.clone(), 0o755);
                }
                Err(e) => return Err(Error::io("inspect", &abs)(e)),
            }
            if create {
                self.touched.insert(rel.clone());
            }
        }
        Ok(true)
    }

    /// Removes whatever is at `abs` without following it; returns true if something was there.
    fn clear(&mut self, abs: &Path, rel: &Path, keep_dir: bool) -> Result<bool> {
        match fs::symlink_metadata(abs) {
            Ok(m) if m.is_dir() && keep_dir => Ok(true),
            Ok(m) => {
                self.checked_parent = None;
                if m.is_dir() {
                    // remove_dir_all does not follow symlinks inside the tree.
                    fs::remove_dir_all(abs).map_err(Error::io("remove", abs))?;
                    self.dir_modes.retain(|p, _| !p.starts_with(rel));
                } else {
                    fs::remove_file(abs).map_err(Error::io("remove", abs))?;
                }
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("inspect", abs)(e)),
        }
    }

    fn chown(&mut self, abs: &Path, (uid, gid): (u64, u64)) {
        if !self.opts.chown {
            return;
        }
        let ids = u32::try_from(uid).ok().zip(u32::try_from(gid).ok());
        let result = match ids {
            Some((uid, gid)) => std::os::unix::fs::lchown(abs, Some(uid), Some(gid)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "owner id out of range",
            )),
        };
        if let Err(e) = result {
            if self.stats.chown_failures == 0 {
                tracing::warn!(path = %abs.display(), error = %e, "cannot set owner; keeping the current one");
            }
            self.stats.chown_failures += 1;
        }
    }

    fn make_dir(&mut self, rel: &Path, name: &str, mode: u32, owner: (u64, u64)) -> Result<()> {
        let abs = self.prepare_parent(rel, name)?;
        if !self.clear(&abs, rel, true)? {
            // Owner-writable while extracting; the real mode is applied by `finish`.
            DirBuilder::new()
                .mode(0o700)
                .create(&abs)
                .map_err(Error::io("create directory", &abs))?;
        }
        self.dir_modes.insert(rel.to_path_buf(), mode);
        self.chown(&abs, owner);
        self.stats.dirs += 1;
        Ok(())
    }

    fn make_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        name: &str,
        mode: u32,
        owner: (u64, u64),
    ) -> Result<()> {
        let abs = self.prepare_parent(rel, name)?;
        self.clear(&abs, rel, false)?;
        // O_CREAT|O_EXCL: fails rather than follow anything that appeared at the path.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&abs)
            .map_err(Error::io("create", &abs))?;
        if self.buf.is_empty() {
            self.buf = vec![0; IO_BUF];
        }
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(bad_archive(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(Error::io("write", &abs))?;
            self.stats.bytes += n as u64;
        }
        if self.opts.chown {
            // Before the mode: chown clears setuid bits.
            self.chown(&abs, owner);
        }
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(Error::io("set mode of", &abs))?;
        self.stats.files += 1;
        Ok(())
    }

    fn make_symlink(
        &mut self,
        rel: &Path,
        name: &str,
        target: &[u8],
        owner: (u64, u64),
    ) -> Result<()> {
        let depth = rel.components().count() - 1;
        if target_escapes(target, depth) {
            return Err(unsafe_entry(
                name,
                format!(
                    "is a symlink to {:?}, which leads outside the image root",
                    String::from_utf8_lossy(target)
                ),
            ));
        }
        let abs = self.prepare_parent(rel, name)?;
        self.clear(&abs, rel, false)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &abs)
            .map_err(Error::io("create symlink", &abs))?;
        self.chown(&abs, owner);
        self.stats.symlinks += 1;
        Ok(())
    }

    fn make_hard_link(&mut self, rel: &Path, name: &str, target: &[u8]) -> Result<()> {
        let Some(target_rel) = hard_link_target(target, name, rel, &self.members)? else {
            return Ok(());
        };
        let target_parent = target_rel.parent().unwrap_or(Path::new(""));
        self.check_dirs(target_parent, name, false)?;
        let target_abs = self.root.join(&target_rel);
        let target_meta =
            fs::symlink_metadata(&target_abs).map_err(Error::io("inspect", &target_abs))?;
        if target_meta.is_dir() {
            return Err(unsafe_entry(
                name,
                format!(
                    "is a hard link to the directory {:?}",
                    String::from_utf8_lossy(target)
                ),
            ));
        }
        let abs = self.prepare_parent(rel, name)?;
        self.clear(&abs, rel, false)?;
        // link(2) does not follow a symlink target; a copy is the fallback where linking is
        // refused (e.g. protected_hardlinks), and it too copies a symlink as a symlink.
        if fs::hard_link(&target_abs, &abs).is_err() {
            if target_meta.file_type().is_symlink() {
                let to =
                    fs::read_link(&target_abs).map_err(Error::io("read symlink", &target_abs))?;
                std::os::unix::fs::symlink(to, &abs).map_err(Error::io("create symlink", &abs))?;
            } else {
                let mut from = File::open(&target_abs).map_err(Error::io("open", &target_abs))?;
                let mut to = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(target_meta.mode() & 0o7777)
                    .open(&abs)
                    .map_err(Error::io("create", &abs))?;
                io::copy(&mut from, &mut to).map_err(Error::io("copy to", &abs))?;
            }
        }
        self.stats.hardlinks += 1;
        Ok(())
    }

    fn whiteout(&mut self, rel: &Path, name: &str) -> Result<()> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let file_name = rel.file_name().unwrap_or_default().as_bytes();
        self.stats.whiteouts += 1;
        if file_name == b".wh..wh..opq" {
            if self.check_dirs(parent, name, false)? {
                self.checked_parent = None;
                self.clear_lower(parent)?;
            }
            return Ok(());
        }
        if file_name.starts_with(b".wh..wh.") {
            // Other AUFS bookkeeping (`.wh..wh.plnk`): not part of the image.
            return Ok(());
        }
        let victim = &file_name[b".wh.".len()..];
        if victim.is_empty() || victim == b"." || victim == b".." {
            return Err(unsafe_entry(name, "is a whiteout of an invalid name"));
        }
        let target = parent.join(OsStr::from_bytes(victim));
        if self.touched.contains(&target) || !self.check_dirs(parent, name, false)? {
            return Ok(());
        }
        let abs = self.root.join(&target);
        self.clear(&abs, &target, false)?;
        Ok(())
    }

    /// Removes what lower layers put in `dir`, keeping what the current archive wrote.
    fn clear_lower(&mut self, dir: &Path) -> Result<()> {
        let abs_dir = self.root.join(dir);
        let mut children = Vec::new();
        for child in fs::read_dir(&abs_dir).map_err(Error::io("list", &abs_dir))? {
            children.push(child.map_err(Error::io("list", &abs_dir))?.file_name());
        }
        for child in children {
            let rel = dir.join(&child);
            let abs = self.root.join(&rel);
            if !self.touched.contains(&rel) {
                self.clear(&abs, &rel, false)?;
            } else if fs::symlink_metadata(&abs).is_ok_and(|m| m.is_dir()) {
                self.clear_lower(&rel)?;
            }
        }
        Ok(())
    }

    /// Applies directory modes, deepest first (a parent may become unreadable).
    fn finish(mut self) -> Result<UnpackStats> {
        let modes = std::mem::take(&mut self.dir_modes);
        for (rel, mode) in modes.iter().rev() {
            let parent = rel.parent().unwrap_or(Path::new(""));
            // Never chmod through a symlink that a later member put in the way.
            if !self
                .check_dirs(parent, &rel.to_string_lossy(), false)
                .unwrap_or(false)
            {
                continue;
            }
            let abs = self.root.join(rel);
            if fs::symlink_metadata(&abs).is_ok_and(|m| m.is_dir()) {
                fs::set_permissions(&abs, Permissions::from_mode(*mode))
                    .map_err(Error::io("set mode of", &abs))?;
            }
        }
        Ok(self.stats)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::layer::{Compression as Layer, LayerWriter};
    use crate::store::test_support;

    /// Builds tars entry by entry, writing names straight into the header so that the tar
    /// crate's own checks (it refuses `..` in `set_path`) cannot stop a malicious name.
    #[derive(Default)]
    struct Evil {
        tar: Vec<u8>,
    }

    impl Evil {
        fn entry(mut self, name: &str, kind: EntryType, link: &str, data: &[u8]) -> Self {
            let mut h = tar::Header::new_gnu();
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            self.tar.extend_from_slice(h.as_bytes());
            self.tar.extend_from_slice(data);
            self.tar.resize(self.tar.len().next_multiple_of(512), 0);
            self
        }
        fn file(self, name: &str, data: &str) -> Self {
            self.entry(name, EntryType::Regular, "", data.as_bytes())
        }
        fn dir(self, name: &str) -> Self {
            self.entry(name, EntryType::Directory, "", b"")
        }
        fn symlink(self, name: &str, target: &str) -> Self {
            self.entry(name, EntryType::Symlink, target, b"")
        }
        fn hard_link(self, name: &str, target: &str) -> Self {
            self.entry(name, EntryType::Link, target, b"")
        }
        fn bytes(mut self) -> Vec<u8> {
            self.tar.extend_from_slice(&[0; 1024]);
            self.tar
        }
    }

    /// A scratch area: `dest` to extract into, and `outside` beside it that must stay empty.
    struct Scratch {
        _dir: tempfile::TempDir,
        dest: PathBuf,
        outside: PathBuf,
    }

    fn scratch() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a/b/c/root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(&outside).unwrap();
        Scratch {
            _dir: dir,
            dest,
            outside,
        }
    }

    impl Scratch {
        fn unpack(&self, tar: &[u8]) -> Result<UnpackStats> {
            unpack(tar, &self.dest, &UnpackOptions::default())
        }
        fn outside_is_untouched(&self) {
            let root = self.dest.ancestors().nth(4).unwrap();
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(root)
                .into_iter()
                .map(|e| e.unwrap().path().to_path_buf())
                .filter(|p| !p.starts_with(&self.dest) || p == &self.dest)
                .collect();
            found.sort();
            let expected: Vec<PathBuf> = ["", "a", "a/b", "a/b/c", "a/b/c/root", "outside"]
                .iter()
                .map(|p| {
                    if p.is_empty() {
                        root.to_path_buf()
                    } else {
                        root.join(p)
                    }
                })
                .collect();
            assert_eq!(
                found, expected,
                "nothing may appear outside the extraction root"
            );
        }
    }

    fn assert_unsafe(result: Result<UnpackStats>, entry: &str, reason: &str) {
        match result {
            Err(Error::Unsafe {
                entry: e,
                reason: r,
            }) => {
                assert_eq!(e, entry);
                assert!(r.contains(reason), "reason {r:?} should mention {reason:?}");
            }
            other => panic!("expected Unsafe for {entry:?}, got {other:?}"),
        }
    }

    #[test]
    fn member_names_that_climb_out_are_refused() {
        let s = scratch();
        let tar = Evil::default().file("../x", "pwned").bytes();
        let err = s.unpack(&tar).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"tar entry "../x" escapes the image root: parent directory components lead outside"#
        );
        assert_unsafe(
            s.unpack(&Evil::default().file("a/../../x", "pwned").bytes()),
            "a/../../x",
            "escapes",
        );
        assert_unsafe(
            s.unpack(&Evil::default().file("../../../../outside/x", "p").bytes()),
            "../../../../outside/x",
            "escapes",
        );
        s.outside_is_untouched();
        assert_eq!(fs::read_dir(&s.dest).unwrap().count(), 0);
    }

    #[test]
    fn absolute_member_names_are_refused() {
        let s = scratch();
        let abs = s.outside.join("abs").to_str().unwrap().to_owned();
        assert_unsafe(
            s.unpack(&Evil::default().file(&abs, "pwned").bytes()),
            &abs,
            "absolute path",
        );
        assert_unsafe(
            s.unpack(&Evil::default().file("/etc/kiln-test-passwd", "p").bytes()),
            "/etc/kiln-test-passwd",
            "absolute",
        );
        assert!(!Path::new("/etc/kiln-test-passwd").exists());
        s.outside_is_untouched();
    }

    #[test]
    fn harmless_dot_names_are_normalised() {
        let s = scratch();
        let tar = Evil::default()
            .dir("./")
            .file("./x", "1")
            .file("a/../b", "2")
            .file(".//c/./d", "3")
            .bytes();
        s.unpack(&tar).unwrap();
        assert_eq!(fs::read_to_string(s.dest.join("x")).unwrap(), "1");
        assert_eq!(fs::read_to_string(s.dest.join("b")).unwrap(), "2");
        assert_eq!(fs::read_to_string(s.dest.join("c/d")).unwrap(), "3");
        assert!(!s.dest.join("a").exists());
    }

    #[test]
    fn entries_through_a_symlink_are_refused() {
        let s = scratch();
        let outside = s.outside.to_str().unwrap();
        // An absolute symlink is fine by itself; writing through it is not.
        let tar = Evil::default()
            .symlink("evil", outside)
            .file("evil/passwd", "root::0:0")
            .bytes();
        assert_unsafe(
            s.unpack(&tar),
            "evil/passwd",
            "passes through the symlink evil",
        );
        assert_eq!(fs::read_link(s.dest.join("evil")).unwrap(), s.outside);
        s.outside_is_untouched();

        // The same through a relative symlink to a directory inside the root.
        let s = scratch();
        let tar = Evil::default()
            .dir("real")
            .symlink("alias", "real")
            .file("alias/x", "1")
            .bytes();
        assert_unsafe(
            s.unpack(&tar),
            "alias/x",
            "passes through the symlink alias",
        );
        assert!(!s.dest.join("real/x").exists());

        // And through a symlink left on disk by an earlier archive (an earlier layer).
        let s = scratch();
        s.unpack(&Evil::default().symlink("etc", outside).bytes())
            .unwrap();
        assert_unsafe(
            s.unpack(&Evil::default().file("etc/shadow", "x").bytes()),
            "etc/shadow",
            "symlink etc",
        );
        assert_unsafe(
            s.unpack(&Evil::default().dir("etc/ssh/").bytes()),
            "etc/ssh/",
            "symlink etc",
        );
        s.outside_is_untouched();
    }

    #[test]
    fn relative_symlinks_that_climb_out_are_refused() {
        let s = scratch();
        assert_unsafe(
            s.unpack(&Evil::default().symlink("up", "../../..").bytes()),
            "up",
            r#"is a symlink to "../../..", which leads outside the image root"#,
        );
        assert_unsafe(
            s.unpack(&Evil::default().symlink("a/b/up", "../../../x").bytes()),
            "a/b/up",
            "outside",
        );
        assert!(!s.dest.join("up").exists() && !s.dest.join("a/b/up").exists());
        // Inside the root, and absolute targets, are fine.
        let tar = Evil::default()
            .symlink("a/b/ok", "../../x")
            .symlink("a/abs", "/etc/passwd")
            .symlink("a/b/dots", "./../../a/./b/../b")
            .bytes();
        let stats = s.unpack(&tar).unwrap();
        assert_eq!(stats.symlinks, 3);
        assert_eq!(
            fs::read_link(s.dest.join("a/abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        s.outside_is_untouched();
    }

    #[test]
    fn hard_links_must_name_an_earlier_member_inside_the_root() {
        let s = scratch();
        assert_unsafe(
            s.unpack(
                &Evil::default()
                    .hard_link("shadow", "../../etc/shadow")
                    .bytes(),
            ),
            "shadow",
            r#"is a hard link to "../../etc/shadow", which escapes the image root"#,
        );
        let abs = s.outside.join("secret");
        fs::write(&abs, "secret").unwrap();
        assert_unsafe(
            s.unpack(
                &Evil::default()
                    .hard_link("s", abs.to_str().unwrap())
                    .bytes(),
            ),
            "s",
            "escapes the image root",
        );
        // A file already on disk is not a member of this archive.
        fs::write(s.dest.join("existing"), "x").unwrap();
        assert_unsafe(
            s.unpack(&Evil::default().hard_link("l", "existing").bytes()),
            "l",
            "not an earlier member",
        );
        assert!(
            !s.dest.join("shadow").exists()
                && !s.dest.join("s").exists()
                && !s.dest.join("l").exists()
        );
        fs::remove_file(&abs).unwrap();
        s.outside_is_untouched();

        // A proper hard link works.
        let stats = s
            .unpack(
                &Evil::default()
                    .file("bin/busybox", "bb")
                    .hard_link("bin/sh", "bin/busybox")
                    .bytes(),
            )
            .unwrap();
        assert_eq!(stats.hardlinks, 1);
        let (a, b) = (
            fs::metadata(s.dest.join("bin/busybox")).unwrap(),
            fs::metadata(s.dest.join("bin/sh")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
    }

    #[test]
    fn an_existing_symlink_is_replaced_not_written_through() {
        let s = scratch();
        let victim = s.outside.join("victim");
        symlink(&victim, s.dest.join("f")).unwrap();
        s.unpack(&Evil::default().file("f", "new content").bytes())
            .unwrap();
        assert!(fs::symlink_metadata(s.dest.join("f")).unwrap().is_file());
        assert!(!victim.exists());
        s.outside_is_untouched();
    }

    #[test]
    fn device_nodes_and_fifos_are_skipped_and_counted() {
        let s = scratch();
        let tar = Evil::default()
            .entry("dev/null", EntryType::Char, "", b"")
            .entry("dev/sda", EntryType::Block, "", b"")
            .entry("run/pipe", EntryType::Fifo, "", b"")
            .file("ok", "1")
            .bytes();
        let stats = s.unpack(&tar).unwrap();
        assert_eq!(
            (stats.skipped_special, stats.files, stats.entries),
            (3, 1, 4)
        );
        assert!(!s.dest.join("dev/null").exists());
    }

    #[test]
    fn modes_come_from_headers_and_read_only_dirs_still_fill() {
        let s = scratch();
        let mut w = LayerWriter::new(Vec::new(), 0);
        w.append_dir("ro", 0o555, 0, 0).unwrap();
        w.append_file("ro/tool", 0o4755, 0, 0, 2, &b"#!"[..])
            .unwrap();
        w.append_file("secret", 0o600, 0, 0, 1, &b"s"[..]).unwrap();
        let tar = w.finish().unwrap();
        let stats = s.unpack(&tar).unwrap();
        assert_eq!((stats.dirs, stats.files, stats.bytes), (1, 2, 3));
        let mode = |p: &str| fs::symlink_metadata(s.dest.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("ro"), 0o555);
        assert_eq!(mode("ro/tool"), 0o4755);
        assert_eq!(mode("secret"), 0o600);
    }

    #[test]
    fn gzip_and_zstd_archives_unpack() {
        let mut w = LayerWriter::new(Vec::new(), 0);
        w.append_file("etc/os-release", 0o644, 0, 0, 9, &b"ID=kiln\n\n"[..])
            .unwrap();
        let tar = w.finish().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for (label, bytes) in [("plain", tar.clone()), ("gzip", gz), ("zstd", zst)] {
            let s = scratch();
            let stats = s.unpack(&bytes).unwrap();
            assert_eq!(stats.files, 1, "{label}");
            assert_eq!(
                fs::read(s.dest.join("etc/os-release")).unwrap(),
                b"ID=kiln\n\n",
                "{label}"
            );
        }
        // Garbage is a bad archive, not a panic.
        let s = scratch();
        let err = s.unpack(&[0x1f, 0x8b, 0, 1, 2, 3]).unwrap_err();
        assert!(matches!(err, Error::BadArchive { .. }), "{err}");
    }

    #[test]
    fn whiteouts_apply_only_when_asked_and_only_to_lower_layers() {
        let s = scratch();
        let base = Evil::default()
            .file("a/b", "b")
            .file("a/c", "c")
            .file("d/e", "e")
            .file("d/sub/f", "f")
            .bytes();
        let layers = UnpackOptions {
            whiteouts: true,
            chown: false,
        };
        unpack(&base[..], &s.dest, &layers).unwrap();
        // `d/new` comes before the opaque marker: it belongs to this layer and must survive.
        let upper = Evil::default()
            .file("a/.wh.b", "")
            .file("d/new", "n")
            .file("d/sub/g", "g")
            .file("d/.wh..wh..opq", "")
            .file(".wh.missing", "")
            .bytes();
        let stats = unpack(&upper[..], &s.dest, &layers).unwrap();
        assert_eq!(stats.whiteouts, 3);
        let mut left: Vec<String> = walkdir::WalkDir::new(&s.dest)
            .min_depth(1)
            .into_iter()
            .map(|e| {
                e.unwrap()
                    .path()
                    .strip_prefix(&s.dest)
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        left.sort();
        assert_eq!(left, ["a", "a/c", "d", "d/new", "d/sub", "d/sub/g"]);

        // Without the option a whiteout is just a file.
        let plain = scratch();
        plain
            .unpack(&Evil::default().file("a/.wh.b", "").bytes())
            .unwrap();
        assert!(plain.dest.join("a/.wh.b").exists());
    }

    #[test]
    fn apply_layers_stacks_layers_and_refuses_a_corrupt_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let l1 = test_support::layer(
            &store,
            &[("etc/motd", b"v1"), ("etc/old", b"x")],
            Layer::Gzip,
        );
        let mut upper = LayerWriter::new(
            crate::layer::LayerBlobWriter::new(&store, Layer::Zstd).unwrap(),
            0,
        );
        upper
            .append_file("etc/motd", 0o644, 0, 0, 2, &b"v2"[..])
            .unwrap();
        upper.append_whiteout("etc/old").unwrap();
        let l2 = upper.finish().unwrap().commit().unwrap();

        let out = tempfile::tempdir().unwrap();
        apply_layers(&store, &[l1.clone(), l2.clone()], out.path()).unwrap();
        assert_eq!(fs::read(out.path().join("etc/motd")).unwrap(), b"v2");
        assert!(!out.path().join("etc/old").exists());

        // Flip a byte near the end (inside the compressed stream's tail).
        let path = store.blob_path(&l1.digest);
        let mut bytes = fs::read(&path).unwrap();
        let i = bytes.len() - 3;
        bytes[i] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let out = tempfile::tempdir().unwrap();
        match apply_layers(&store, &[l1.clone(), l2], out.path()) {
            Err(Error::CorruptBlob { digest, .. }) => assert_eq!(digest, l1.digest),
            other => panic!("expected CorruptBlob, got {other:?}"),
        }

        // A missing blob names itself too.
        fs::remove_file(&path).unwrap();
        let err = apply_layers(&store, std::slice::from_ref(&l1), out.path()).unwrap_err();
        assert!(
            matches!(err, Error::MissingBlob { ref digest } if digest == &l1.digest),
            "{err}"
        );
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        /// Member names built from the pieces that make tar-slips.
        fn name() -> impl Strategy<Value = String> {
            let part = prop::sample::select(vec!["l", "a", "..", ".", ""]);
            (prop::bool::weighted(0.2), prop::collection::vec(part, 1..4)).prop_map(
                |(abs, parts)| {
                    let joined = parts.join("/");
                    if abs { format!("/{joined}") } else { joined }
                },
            )
        }

        /// Link targets, many of them reaching the scratch directory's `outside` (four levels
        /// above the root). Absolute targets are left out on purpose: were extraction ever to
        /// follow one, this test would write to the host's own root.
        fn target() -> impl Strategy<Value = String> {
            prop::sample::select(vec![
                "../../../../outside",
                "../../../..",
                "../../../../../",
                "..",
                "../a",
                "a",
                "l",
            ])
            .prop_map(str::to_owned)
        }

        #[derive(Debug, Clone)]
        enum Member {
            File(String),
            Dir(String),
            Symlink(String, String),
            HardLink(String, String),
        }

        /// One member, or a symlink followed by a file written through it.
        fn members() -> impl Strategy<Value = Vec<Member>> {
            prop_oneof![
                name().prop_map(|n| vec![Member::File(n)]),
                name().prop_map(|n| vec![Member::Dir(n)]),
                (name(), target()).prop_map(|(n, t)| vec![Member::Symlink(n, t)]),
                (name(), target()).prop_map(|(n, t)| vec![Member::HardLink(n, t)]),
                (name(), target(), name()).prop_map(|(l, t, c)| vec![
                    Member::Symlink(l.clone(), t),
                    Member::File(format!("{l}/{c}")),
                ]),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Whatever an archive holds, unpacking it writes nothing outside the root and
            /// never panics: it either succeeds or refuses.
            #[test]
            fn no_archive_writes_outside_the_root(
                groups in prop::collection::vec(members(), 1..8)
            ) {
                let s = scratch();
                let mut tar = Evil::default();
                for member in groups.iter().flatten() {
                    tar = match member {
                        Member::File(n) => tar.file(n, "x"),
                        Member::Dir(n) => tar.dir(n),
                        Member::Symlink(n, t) => tar.symlink(n, t),
                        Member::HardLink(n, t) => tar.hard_link(n, t),
                    };
                }
                let _ = s.unpack(&tar.bytes());
                s.outside_is_untouched();
            }
        }
    }
}
