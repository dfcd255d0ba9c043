//! The file manifest of an image: every path of the root filesystem [`apply_layers`] makes, with
//! its type, permission bits, owner, and a regular file's size and sha256 — what
//! [`verify_tree`](mod@crate::verify_tree) compares an instance's root with.
//!
//! The manifest is computed from the layer blobs alone, by replaying the extraction rules of
//! [`unpack`](mod@crate::unpack) on an in-memory tree (the same member-name normalisation,
//! whiteouts, opaque directories, hard links and refusals), so it equals the tree `apply_layers`
//! writes, without writing anything:
//!
//! - Keys are paths relative to the root, `/`-separated, without a leading `/`
//!   (`etc/os-release`). The root directory itself has **no entry**: extraction never changes
//!   its mode or owner, so there is nothing of the image's to compare. Names that are not UTF-8
//!   are kept lossily (`U+FFFD` for each bad byte), on both sides of a comparison.
//! - Owners are the image's: the uid/gid of the layer headers, whoever builds the manifest (so
//!   one cached manifest serves every process). An owner that does not fit in 32 bits is what
//!   root's failed `lchown` leaves: `0:0` for a new entry, the old owner for an existing
//!   directory (one that cannot be parsed at all is recorded the same way; root's extraction
//!   refuses it). [`verify_tree`](mod@crate::verify_tree) compares owners only when running as
//!   root, because only then does [`UnpackOptions::layers`] apply them.
//! - Directories that extraction creates because a member's parent is missing from the archive
//!   get mode `0o755` and owner `0:0`, as unpack gives them (it creates them as the extracting
//!   user, root when owners are kept, and sets `0o755` at the end).
//! - A hard link gets a copy of its target's entry (same content, mode and owner), as the link
//!   shares its target's inode. Device nodes and fifos are skipped, as unpack skips them.
//! - Symlinks have mode `0o777` (what Linux reports for every symlink).
//!
//! [`Store::manifest`] caches manifests as compact JSON in `<store>/kiln/manifests/<hex>.json`,
//! beside the image records.
//!
//! [`UnpackOptions::layers`]: crate::unpack::UnpackOptions::layers
//! [`apply_layers`]: crate::unpack::apply_layers

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_core::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tar::EntryType;

use crate::error::{Error, Result};
use crate::record::{ImageRecord, LayerRecord};
use crate::store::{IO_BUF, Store};
use crate::unpack::{
    bad_archive, decompress, for_each_layer, hard_link_target, member_path, target_escapes,
    unsafe_entry,
};

/// Every path of an image's root filesystem, as [`apply_layers`](crate::unpack::apply_layers)
/// writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The image's manifest digest (its identity).
    pub image: Digest,
    /// Path relative to the root (`usr/bin/env`, no leading `/`; the root itself is not listed)
    /// → what is there.
    pub entries: BTreeMap<String, Entry>,
}

/// One path of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// What it is, with what identifies its content.
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`); `0o777` for symlinks.
    pub mode: u32,
    /// Owner uid, as in the layer header.
    pub uid: u32,
    /// Owner gid, as in the layer header.
    pub gid: u32,
}

/// The type of a [`Manifest`] entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Kind {
    /// A regular file.
    File {
        /// Size in bytes.
        size: u64,
        /// sha256 of the content.
        sha256: Digest,
    },
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink {
        /// The link's target, as written in the layer (not resolved).
        target: String,
    },
}

impl Manifest {
    /// Computes the manifest of the tree that `apply_layers(store, layers, …)` makes, reading
    /// each layer blob once and checking its digest as it is read (a corrupt blob is
    /// [`Error::CorruptBlob`]). An archive that extraction would refuse is refused here too.
    ///
    /// `image` is only recorded; it names the image the layers belong to.
    pub fn from_layers(store: &Store, image: &Digest, layers: &[LayerRecord]) -> Result<Manifest> {
        let mut tree = Tree::default();
        for_each_layer(store, layers, |reader| tree.archive(reader))?;
        Ok(Manifest {
            image: image.clone(),
            entries: tree
                .entries
                .into_iter()
                .map(|(path, entry)| (key(&path), entry))
                .collect(),
        })
    }

    /// The entry at `path` (relative; a leading `/` is ignored).
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path.trim_start_matches('/'))
    }
}

/// A manifest key for a relative path.
fn key(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Store {
    /// The file manifest of `record`'s image, from the cache in `kiln/manifests/<hex>.json`,
    /// or computed from the layers (see [`Manifest::from_layers`]) and cached.
    ///
    /// A cached file that cannot be parsed, or that names another image, is rebuilt. The cache
    /// is written to a temp file and renamed into place, so readers never see a partial file;
    /// failing to write it is logged, not an error: it only costs a rebuild next time.
    pub fn manifest(&self, record: &ImageRecord) -> Result<Manifest> {
        let dir = self.root().join("kiln").join("manifests");
        let path = dir.join(format!("{}.json", record.digest.hex()));
        match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) if m.image == record.digest => return Ok(m),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "cached manifest names another image; rebuilding it");
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cached manifest is unreadable; rebuilding it");
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("read", &path)(e)),
        }
        let manifest = Manifest::from_layers(self, &record.digest, &record.layers)?;
        if let Err(e) = self.cache_manifest(&dir, &path, &manifest) {
            tracing::warn!(error = %e, "could not cache the image's file manifest");
        }
        Ok(manifest)
    }

    fn cache_manifest(&self, dir: &Path, path: &Path, manifest: &Manifest) -> Result<()> {
        let bytes = serde_json::to_vec(manifest).map_err(|source| Error::Json {
            what: path.display().to_string(),
            source,
        })?;
        fs::create_dir_all(dir).map_err(Error::io("create store directory", dir))?;
        let tmp = self.root().join("kiln").join("tmp");
        fs::create_dir_all(&tmp).map_err(Error::io("create store directory", &tmp))?;
        let mut file = tempfile::Builder::new()
            .prefix("manifest-")
            .tempfile_in(&tmp)
            .map_err(Error::io("create temp file in", &tmp))?;
        file.write_all(&bytes)
            .map_err(Error::io("write", file.path()))?;
        // No fsync: a cache file torn by a crash fails to parse and is rebuilt.
        file.persist(path)
            .map_err(|e| Error::io("write", path)(e.error))?;
        Ok(())
    }
}

/// The in-memory tree the layers are replayed on. Mirrors `unpack::Extractor` step by step:
/// keep the two in sync.
#[derive(Default)]
struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
    /// Members of the current archive, the only valid hard-link targets.
    members: HashSet<PathBuf>,
    /// Paths the current archive wrote or wrote below: whiteouts only hide lower layers.
    touched: HashSet<PathBuf>,
    buf: Vec<u8>,
}

/// The mode and owner extraction gives a directory it creates for a missing parent.
const IMPLICIT_DIR: Entry = Entry {
    kind: Kind::Dir,
    mode: 0o755,
    uid: 0,
    gid: 0,
};

impl Tree {
    fn archive(&mut self, reader: impl Read) -> Result<()> {
        self.members.clear();
        self.touched.clear();
        let mut archive = tar::Archive::new(decompress(reader)?);
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
        let header = entry.header();
        let kind = header.entry_type();
        if rel.as_os_str().is_empty() {
            return if kind.is_dir() {
                Ok(())
            } else {
                Err(unsafe_entry(
                    &name,
                    "names the image root but is not a directory",
                ))
            };
        }
        if let Some(file_name) = rel.file_name()
            && file_name.as_bytes().starts_with(b".wh.")
        {
            return self.whiteout(&rel, &name);
        }
        let mode = header.mode().map_err(bad_archive)? & 0o7777;
        // What root's `lchown` sets; `None` where it would fail (and keep the current owner).
        let owner = header
            .uid()
            .ok()
            .and_then(|u| u32::try_from(u).ok())
            .zip(header.gid().ok().and_then(|g| u32::try_from(g).ok()));
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
            // Device nodes, fifos and unknown types are skipped by extraction.
            _ => return Ok(()),
        }
        self.members.insert(rel.clone());
        self.touched.insert(rel);
        Ok(())
    }

    /// Checks that `dir` and each of its ancestors is a directory; missing ones are created
    /// when `create`, otherwise returns `false` on the first missing.
    fn check_dirs(&mut self, dir: &Path, name: &str, create: bool) -> Result<bool> {
        let mut rel = PathBuf::new();
        for part in dir.iter() {
            rel.push(part);
            match self.entries.get(&rel).map(|e| &e.kind) {
                Some(Kind::Symlink { .. }) => {
                    return Err(unsafe_entry(
                        name,
                        format!(
                            "passes through the symlink {}, and extraction never follows symlinks",
                            rel.display()
                        ),
                    ));
                }
                Some(Kind::Dir) => {}
                Some(Kind::File { .. }) => {
                    return Err(unsafe_entry(
                        name,
                        format!("has a parent {} that is not a directory", rel.display()),
                    ));
                }
                None => {
                    if !create {
                        return Ok(false);
                    }
                    self.entries.insert(rel.clone(), IMPLICIT_DIR);
                }
            }
            if create {
                self.touched.insert(rel.clone());
            }
        }
        Ok(true)
    }

    fn prepare_parent(&mut self, rel: &Path, name: &str) -> Result<()> {
        self.check_dirs(rel.parent().unwrap_or(Path::new("")), name, true)
            .map(drop)
    }

    /// Removes `rel` and everything below it.
    fn remove(&mut self, rel: &Path) {
        if self.entries.remove(rel).is_some() {
            // Component-wise order puts a path's descendants right after it.
            let below: Vec<PathBuf> = self
                .entries
                .range::<Path, _>((std::ops::Bound::Excluded(rel), std::ops::Bound::Unbounded))
                .map(|(p, _)| p)
                .take_while(|p| p.starts_with(rel))
                .cloned()
                .collect();
            for p in below {
                self.entries.remove(&p);
            }
        }
    }

    fn make_dir(
        &mut self,
        rel: &Path,
        name: &str,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<()> {
        self.prepare_parent(rel, name)?;
        match self.entries.get_mut(rel) {
            Some(e) if e.kind == Kind::Dir => {
                e.mode = mode;
                if let Some((uid, gid)) = owner {
                    (e.uid, e.gid) = (uid, gid);
                }
            }
            _ => {
                self.remove(rel);
                self.insert(rel, Kind::Dir, mode, owner);
            }
        }
        Ok(())
    }

    fn insert(&mut self, rel: &Path, kind: Kind, mode: u32, owner: Option<(u32, u32)>) {
        let (uid, gid) = owner.unwrap_or((0, 0));
        self.entries.insert(
            rel.to_path_buf(),
            Entry {
                kind,
                mode,
                uid,
                gid,
            },
        );
    }

    fn make_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        name: &str,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<()> {
        self.prepare_parent(rel, name)?;
        self.remove(rel);
        if self.buf.is_empty() {
            self.buf = vec![0; IO_BUF];
        }
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(bad_archive(e)),
            };
            hasher.update(&self.buf[..n]);
            size += n as u64;
        }
        let sha256 = Digest::from_hasher(hasher);
        self.insert(rel, Kind::File { size, sha256 }, mode, owner);
        Ok(())
    }

    fn make_symlink(
        &mut self,
        rel: &Path,
        name: &str,
        target: &[u8],
        owner: Option<(u32, u32)>,
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
        self.prepare_parent(rel, name)?;
        self.remove(rel);
        let target = String::from_utf8_lossy(target).into_owned();
        self.insert(rel, Kind::Symlink { target }, 0o777, owner);
        Ok(())
    }

    fn make_hard_link(&mut self, rel: &Path, name: &str, target: &[u8]) -> Result<()> {
        let Some(target_rel) = hard_link_target(target, name, rel, &self.members)? else {
            return Ok(());
        };
        let target_parent = target_rel.parent().unwrap_or(Path::new(""));
        self.check_dirs(target_parent, name, false)?;
        let linked = match self.entries.get(&target_rel) {
            Some(Entry {
                kind: Kind::Dir, ..
            }) => {
                return Err(unsafe_entry(
                    name,
                    format!(
                        "is a hard link to the directory {:?}",
                        String::from_utf8_lossy(target)
                    ),
                ));
            }
            Some(e) => e.clone(),
            None => {
                return Err(Error::io("inspect", &target_rel)(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the hard link's target is gone",
                )));
            }
        };
        self.prepare_parent(rel, name)?;
        self.remove(rel);
        // Clearing `rel` may have removed the target itself (a link replacing a directory that
        // holds its target): extraction then fails to link, and to copy, a missing file.
        if !self.entries.contains_key(&target_rel) {
            return Err(Error::io("open", &target_rel)(io::Error::new(
                io::ErrorKind::NotFound,
                "the hard link's target was removed to make room for the link",
            )));
        }
        self.entries.insert(rel.to_path_buf(), linked);
        Ok(())
    }

    fn whiteout(&mut self, rel: &Path, name: &str) -> Result<()> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let file_name = rel.file_name().unwrap_or_default().as_bytes();
        if file_name == b".wh..wh..opq" {
            if self.check_dirs(parent, name, false)? {
                self.clear_lower(parent);
            }
            return Ok(());
        }
        if file_name.starts_with(b".wh..wh.") {
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
        self.remove(&target);
        Ok(())
    }

    /// Removes what lower layers put in `dir`, keeping what the current archive wrote.
    fn clear_lower(&mut self, dir: &Path) {
        let children: Vec<PathBuf> = self
            .entries
            .range::<Path, _>((std::ops::Bound::Excluded(dir), std::ops::Bound::Unbounded))
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(dir))
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect();
        for child in children {
            if !self.touched.contains(&child) {
                self.remove(&child);
            } else if self
                .entries
                .get(&child)
                .is_some_and(|e| e.kind == Kind::Dir)
            {
                self.clear_lower(&child);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
pub(crate) mod tests {
    use super::*;
    use crate::layer::{Compression, LayerBlobWriter, LayerWriter};
    use crate::store::test_support;
    use crate::unpack::apply_layers;

    /// One member of a test layer.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum M<'a> {
        /// A directory and its mode.
        Dir(&'a str, u32),
        /// A file, its mode and content.
        File(&'a str, u32, &'a [u8]),
        /// A file owned by uid, gid (mode 0o640).
        Owned(&'a str, u32, u32, &'a [u8]),
        /// A symlink and its target.
        Link(&'a str, &'a str),
        /// A hard link and its target.
        Hard(&'a str, &'a str),
        /// A whiteout of the path.
        Whiteout(&'a str),
        /// An opaque marker in the directory.
        Opaque(&'a str),
    }

    /// Stores a layer of `members`, in that order, through the crate's [`LayerWriter`] (and a
    /// raw header for hard links, which `LayerWriter` never writes).
    pub(crate) fn layer(store: &Store, compression: Compression, members: &[M<'_>]) -> LayerRecord {
        let mut blob = LayerBlobWriter::new(store, compression).unwrap();
        // One LayerWriter per run of members: its `finish` writes the end marker, which is
        // trimmed so the runs form one archive.
        let mut tar = Vec::new();
        for m in members {
            let mut w = LayerWriter::new(Vec::new(), 0);
            match *m {
                M::Dir(p, mode) => w.append_dir(p, mode, 0, 0).unwrap(),
                M::File(p, mode, data) => w
                    .append_file(p, mode, 0, 0, data.len() as u64, data)
                    .unwrap(),
                M::Owned(p, uid, gid, data) => w
                    .append_file(p, 0o640, uid, gid, data.len() as u64, data)
                    .unwrap(),
                M::Link(p, target) => w.append_symlink(p, target, 0, 0).unwrap(),
                M::Whiteout(p) => w.append_whiteout(p).unwrap(),
                M::Opaque(dir) => w
                    .append_file(format!("{dir}/.wh..wh..opq"), 0, 0, 0, 0, &b""[..])
                    .unwrap(),
                M::Hard(p, target) => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(EntryType::Link);
                    h.set_mode(0o644);
                    h.set_uid(0);
                    h.set_gid(0);
                    h.set_size(0);
                    h.set_mtime(0);
                    let mut b = tar::Builder::new(Vec::new());
                    b.append_link(&mut h, p, target).unwrap();
                    tar.extend(b.into_inner().unwrap());
                    tar.truncate(tar.len() - 1024);
                    continue;
                }
            }
            let bytes = w.finish().unwrap();
            tar.extend_from_slice(&bytes[..bytes.len() - 1024]);
        }
        tar.extend_from_slice(&[0; 1024]);
        blob.write_all(&tar).unwrap();
        blob.commit().unwrap()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    #[test]
    fn whiteouts_and_implicit_dirs_are_replayed() {
        let (_dir, store) = store();
        let l1 = layer(
            &store,
            Compression::Gzip,
            &[
                M::Dir("etc", 0o755),
                M::File("etc/a", 0o644, b"a"),
                M::File("etc/b", 0o600, b"b"),
                M::File("opt/deep/x", 0o755, b"x"),
                M::Link("etc/l", "/etc/a"),
            ],
        );
        let l2 = layer(
            &store,
            Compression::Zstd,
            &[
                M::Whiteout("etc/a"),
                M::File("opt/new", 0o644, b"n"),
                M::Opaque("opt"),
                M::Dir("etc", 0o700),
            ],
        );
        let m = Manifest::from_layers(&store, &Digest::of(b"img"), &[l1, l2]).unwrap();
        let keys: Vec<&str> = m.entries.keys().map(String::as_str).collect();
        assert_eq!(keys, ["etc", "etc/b", "etc/l", "opt", "opt/new"]);
        assert_eq!(m.entries["etc"].mode, 0o700);
        assert_eq!(m.entries["opt"], IMPLICIT_DIR);
        assert_eq!(
            m.entries["etc/b"].kind,
            Kind::File {
                size: 1,
                sha256: Digest::of(b"b")
            }
        );
        assert_eq!(
            m.get("/etc/l").unwrap().kind,
            Kind::Symlink {
                target: "/etc/a".into()
            }
        );
    }

    #[test]
    fn a_hard_link_that_replaces_its_targets_directory_is_refused_like_unpack_refuses_it() {
        let (_dir, store) = store();
        let l = layer(
            &store,
            Compression::None,
            &[M::File("a/b/c", 0o644, b""), M::Hard("a", "a/b/c")],
        );
        assert!(
            Manifest::from_layers(&store, &Digest::of(b"img"), std::slice::from_ref(&l)).is_err()
        );
        let out = tempfile::tempdir().unwrap();
        assert!(apply_layers(&store, &[l], out.path()).is_err());
    }

    #[test]
    fn owners_are_the_images_own() {
        let (_dir, store) = store();
        let l = layer(
            &store,
            Compression::None,
            &[M::Owned("srv/data", 33, 44, b"d")],
        );
        let m = Manifest::from_layers(&store, &Digest::of(b"img"), &[l]).unwrap();
        let e = &m.entries["srv/data"];
        assert_eq!((e.uid, e.gid, e.mode), (33, 44, 0o640));
    }

    #[test]
    fn a_corrupt_or_missing_blob_is_an_error() {
        let (_dir, store) = store();
        let l = test_support::layer(&store, &[("a", b"content")], Compression::Gzip);
        let path = store.blob_path(&l.digest);
        let mut bytes = fs::read(&path).unwrap();
        let i = bytes.len() - 3;
        bytes[i] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        match Manifest::from_layers(&store, &Digest::of(b"img"), std::slice::from_ref(&l)) {
            Err(Error::CorruptBlob { digest, .. }) => assert_eq!(digest, l.digest),
            other => panic!("expected CorruptBlob, got {other:?}"),
        }
        fs::remove_file(&path).unwrap();
        let err = Manifest::from_layers(&store, &Digest::of(b"img"), &[l]).unwrap_err();
        assert!(matches!(err, Error::MissingBlob { .. }), "{err}");
    }

    #[test]
    fn unsafe_layers_are_refused_like_unpack_refuses_them() {
        let (_dir, store) = store();
        let l = layer(
            &store,
            Compression::None,
            &[M::Link("evil", "/etc"), M::File("evil/passwd", 0o644, b"x")],
        );
        let err = Manifest::from_layers(&store, &Digest::of(b"img"), std::slice::from_ref(&l))
            .unwrap_err();
        assert!(
            err.to_string().contains("passes through the symlink evil"),
            "{err}"
        );
        let out = tempfile::tempdir().unwrap();
        assert!(apply_layers(&store, &[l], out.path()).is_err());
    }

    #[test]
    fn the_cached_manifest_round_trips_and_a_broken_cache_is_rebuilt() {
        let (_dir, store) = store();
        let l = test_support::layer(&store, &[("a/b", b"x"), ("c", b"y")], Compression::Gzip);
        let rec = test_support::image(&store, "web", "2026-01-01T00:00:00Z", vec![l]);
        let cached = store
            .root()
            .join(format!("kiln/manifests/{}.json", rec.digest.hex()));
        assert!(!cached.exists());
        let first = store.manifest(&rec).unwrap();
        assert_eq!(first.image, rec.digest);
        assert_eq!(first.entries.len(), 3);
        let text = fs::read(&cached).unwrap();
        // Canonical: compact JSON of the value, so equal manifests are equal bytes.
        assert_eq!(text, serde_json::to_vec(&first).unwrap());
        assert_eq!(serde_json::from_slice::<Manifest>(&text).unwrap(), first);

        // Served from the cache: even with the layer gone.
        fs::remove_file(store.blob_path(&rec.layers[0].digest)).unwrap();
        assert_eq!(store.manifest(&rec).unwrap(), first);
        fs::write(&cached, b"{ not json").unwrap();
        assert!(matches!(
            store.manifest(&rec),
            Err(Error::MissingBlob { .. })
        ));
        assert_eq!(
            fs::read_dir(store.root().join("kiln/tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_cache_that_fails_to_parse_is_rebuilt() {
        let (_dir, store) = store();
        let l = test_support::layer(&store, &[("f", b"x")], Compression::None);
        let rec = test_support::image(&store, "web", "2026-01-01T00:00:00Z", vec![l]);
        let cached = store
            .root()
            .join(format!("kiln/manifests/{}.json", rec.digest.hex()));
        fs::create_dir_all(cached.parent().unwrap()).unwrap();
        fs::write(&cached, b"{\"image\": 1").unwrap();
        let m = store.manifest(&rec).unwrap();
        assert_eq!(m.entries.keys().collect::<Vec<_>>(), ["f"]);
        assert_eq!(fs::read(&cached).unwrap(), serde_json::to_vec(&m).unwrap());
    }
}
