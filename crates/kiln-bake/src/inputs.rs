//! Content identity of a step's input files, cheap to recompute.
//!
//! A step's cache key covers the hashes of its input files. Hashing a large tree on every bake
//! would make a no-op re-bake slow, so file hashes are remembered against the file's stat data
//! (device, inode, size, mtime, ctime) in a stat cache, the way git's index and ccache's direct
//! mode do. A file whose stat data is unchanged is not read again. Entries whose mtime is too
//! close to when the cache is written are not kept ("racy" files may change again within the
//! same timestamp tick).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_core::Digest;
use kiln_core::digest::digest_json;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// How close to the save time an mtime may be and still be trusted.
const RACY_WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl StatKey {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    stat: StatKey,
    hash: Digest,
}

/// Remembered file hashes, kept in one JSON file in the store.
#[derive(Debug)]
pub struct StatCache {
    path: PathBuf,
    entries: BTreeMap<PathBuf, Entry>,
    dirty: bool,
    /// Files actually read and hashed since load, for reporting.
    pub hashed_files: u64,
}

impl StatCache {
    /// Loads the cache at `path`; a missing or unreadable cache starts empty (it is only a cache).
    pub fn load(path: PathBuf) -> Self {
        let entries = fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self {
            path,
            entries,
            dirty: false,
            hashed_files: 0,
        }
    }

    /// The sha256 of the file at `path`, whose metadata (not following links) is `meta`.
    pub fn file_hash(&mut self, path: &Path, meta: &fs::Metadata) -> io::Result<Digest> {
        let stat = StatKey::of(meta);
        if let Some(entry) = self.entries.get(path)
            && entry.stat == stat
        {
            return Ok(entry.hash.clone());
        }
        let hash = hash_file(path)?;
        self.hashed_files += 1;
        self.entries.insert(
            path.to_owned(),
            Entry {
                stat,
                hash: hash.clone(),
            },
        );
        self.dirty = true;
        Ok(hash)
    }

    /// Writes the cache atomically, leaving out entries modified within the racy window of `now`.
    pub fn save(&mut self, now: SystemTime) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let limit = now
            .checked_sub(RACY_WINDOW)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128);
        self.entries
            .retain(|_, e| e.stat.mtime_ns < limit && e.stat.ctime_ns < limit);
        let bytes = serde_json::to_vec(&self.entries)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&bytes)?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        self.dirty = false;
        Ok(())
    }
}

/// The sha256 of a file's contents.
pub fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest::from_hasher(hasher))
}

/// One entry of a tree's identity.
#[derive(Debug, Serialize)]
struct TreeEntry {
    path: String,
    kind: &'static str,
    mode: u32,
    /// Content hash of a file, target of a symlink, empty for a directory.
    content: String,
}

/// The identity of a file or directory tree: relative paths, kinds, permission bits, and the
/// content hash of every file (or target of every symlink). Ownership and times are left out,
/// since the bake normalises them.
pub fn tree_hash(cache: &mut StatCache, root: &Path) -> io::Result<Digest> {
    let mut entries = Vec::new();
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by(|a, b| a.file_name().cmp(b.file_name()));
    for entry in walk {
        let entry = entry.map_err(io::Error::other)?;
        let meta = entry.path().symlink_metadata()?;
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .into_owned();
        let ft = meta.file_type();
        let (kind, content) = if ft.is_dir() {
            ("dir", String::new())
        } else if ft.is_symlink() {
            let target = fs::read_link(entry.path())?;
            ("symlink", target.to_string_lossy().into_owned())
        } else if ft.is_file() {
            ("file", cache.file_hash(entry.path(), &meta)?.to_string())
        } else {
            ("other", String::new())
        };
        entries.push(TreeEntry {
            path: rel,
            kind,
            mode: meta.mode() & 0o7777,
            content,
        });
    }
    Ok(digest_json(&entries))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tree_hash_follows_content_and_mode_not_times() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("a"), b"one").unwrap();
        fs::write(root.join("sub/b"), b"two").unwrap();
        let mut cache = StatCache::load(dir.path().join("cache.json"));
        let first = tree_hash(&mut cache, &root).unwrap();
        assert_eq!(cache.hashed_files, 2);

        // Unchanged stat data: nothing is read again.
        assert_eq!(tree_hash(&mut cache, &root).unwrap(), first);
        assert_eq!(cache.hashed_files, 2);

        // Same content rewritten (new mtime): same identity.
        fs::write(root.join("a"), b"one").unwrap();
        assert_eq!(tree_hash(&mut cache, &root).unwrap(), first);

        fs::write(root.join("a"), b"ONE").unwrap();
        let changed = tree_hash(&mut cache, &root).unwrap();
        assert_ne!(changed, first);

        fs::set_permissions(root.join("sub/b"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(tree_hash(&mut cache, &root).unwrap(), changed);
    }

    #[test]
    fn save_keeps_only_settled_entries() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let path = dir.path().join("cache.json");
        let mut cache = StatCache::load(path.clone());
        let meta = file.symlink_metadata().unwrap();
        cache.file_hash(&file, &meta).unwrap();
        let modified = meta.modified().unwrap();

        // Saved right after the write: the entry is racy and dropped.
        cache.save(modified).unwrap();
        assert!(StatCache::load(path.clone()).entries.is_empty());

        cache.file_hash(&file, &meta).unwrap();
        cache.save(modified + Duration::from_secs(10)).unwrap();
        let reloaded = StatCache::load(path);
        assert_eq!(reloaded.entries.len(), 1);
    }
}
