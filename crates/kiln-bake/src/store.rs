//! The content-addressed image store: an OCI image layout plus kiln's records.
//!
//! ```text
//! <root>/oci-layout               {"imageLayoutVersion":"1.0.0"}
//! <root>/index.json               one manifest per tag (annotation org.opencontainers.image.ref.name)
//! <root>/blobs/sha256/<hex>       manifests, configs, layers
//! <root>/kiln/images/<hex>.json   an ImageRecord per built image, named by manifest digest
//! <root>/kiln/cache/<hex>.json    a CacheEntry per step cache key
//! <root>/kiln/tmp/                temp files; same filesystem as blobs/, so rename is atomic
//! <root>/kiln/lock                taken by `Store::lock`
//! ```
//!
//! Because the root is a plain OCI layout, `skopeo copy oci:<root>:web …` works on it directly.
//!
//! Every file is written to `kiln/tmp` and renamed into place, so readers never see a partial
//! blob, record or index. Blob writes are safe without the lock (a blob's name is its content);
//! operations that read-modify-write (`put_image`, `remove_image`, `gc`, `cache_put`) expect the
//! caller to hold [`Store::lock`]. They do not take it themselves: `flock` locks belong to an
//! open file, so a second `lock()` in a process that already holds one would deadlock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use kiln_core::Digest;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};
use tempfile::NamedTempFile;

use crate::error::{Error, Result};
use crate::oci::{
    self, ANNOTATION_REF_NAME, Descriptor, ImageConfig, Index, MEDIA_MANIFEST, Manifest,
};
pub use crate::record::{CacheEntry, GitInfo, ImageRecord, LayerRecord, StepRecord};

/// Buffer size for blob I/O: large enough that hashing, not syscalls, bounds throughput.
pub(crate) const IO_BUF: usize = 1 << 20;

/// Shortest digest prefix `resolve` accepts, so a prefix rarely becomes ambiguous later.
const MIN_PREFIX: usize = 6;

/// An open store. Cheap to clone; holds no file descriptors.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The exclusive store lock; released when dropped.
#[derive(Debug)]
pub struct StoreLock {
    // Closing the file releases the flock.
    _file: File,
}

/// What [`Store::gc`] removed. Its JSON is the `kiln images gc --json` output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Manifest digests of the image records removed.
    pub images_removed: Vec<Digest>,
    /// Number of blobs removed.
    pub blobs_removed: usize,
    /// Bytes of blobs removed.
    pub bytes_freed: u64,
    /// Number of step-cache entries removed because their layer is gone. Left out of the JSON,
    /// whose shape docs/cli.md fixes.
    #[serde(skip)]
    pub cache_entries_removed: usize,
}

/// A problem [`Store::verify`] found with one blob of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobProblem {
    /// `manifest`, `config` or `layer N` (counted from 1, base first).
    pub role: String,
    /// The digest the image expects.
    pub digest: Digest,
    /// What is wrong.
    pub problem: Problem,
}

/// What is wrong with a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The blob is not in the store.
    Missing,
    /// The blob's content hashes to something else.
    Mismatch {
        /// The digest of its actual content.
        found: Digest,
    },
    /// The blob is intact but disagrees with the image record (or is not valid JSON).
    Inconsistent {
        /// What disagrees.
        detail: String,
    },
}

impl fmt::Display for BlobProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            role,
            digest,
            problem,
        } = self;
        match problem {
            Problem::Missing => write!(f, "{role} {digest} is missing"),
            Problem::Mismatch { found } => write!(
                f,
                "{role} {digest} is corrupt: its content hashes to {found}"
            ),
            Problem::Inconsistent { detail } => {
                write!(f, "{role} {digest} is inconsistent: {detail}")
            }
        }
    }
}

impl Store {
    /// Opens the store at `root`, creating the layout if `root` is missing or empty.
    ///
    /// Refuses a directory that has content but no `oci-layout`, so a typo in `--store` cannot
    /// scatter kiln's files into (and later garbage-collect) somebody's home directory.
    pub fn open(root: &Path) -> Result<Store> {
        let layout = root.join("oci-layout");
        match fs::read_dir(root) {
            Ok(mut entries) => {
                let has_layout = fs::symlink_metadata(&layout).is_ok();
                if !has_layout && entries.next().is_some() {
                    return Err(Error::NotAStore {
                        path: root.to_path_buf(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(root).map_err(Error::io("create store directory", root))?;
            }
            Err(e) => return Err(Error::io("open store directory", root)(e)),
        }
        // The marker goes first: were kiln interrupted after creating the directories below but
        // before writing it, the next open would take its own store for someone else's files.
        if !layout.exists() {
            fs::write(&layout, oci::OCI_LAYOUT).map_err(Error::io("write", &layout))?;
        }
        let store = Store {
            root: root.to_path_buf(),
        };
        for dir in [
            store.blobs_dir(),
            store.kiln_dir("images"),
            store.kiln_dir("cache"),
            store.kiln_dir("tmp"),
        ] {
            fs::create_dir_all(&dir).map_err(Error::io("create store directory", &dir))?;
        }
        if !store.index_path().exists() {
            store.write_atomic(&store.index_path(), &Index::new(Vec::new()).to_json())?;
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the exclusive store lock, waiting for other kiln processes to release it.
    pub fn lock(&self) -> Result<StoreLock> {
        let (file, path) = self.lock_file()?;
        file.lock().map_err(Error::io("lock", &path))?;
        Ok(StoreLock { _file: file })
    }

    /// Takes the exclusive store lock, or fails at once with [`Error::StoreInUse`].
    pub fn try_lock(&self) -> Result<StoreLock> {
        let (file, path) = self.lock_file()?;
        match file.try_lock() {
            Ok(()) => Ok(StoreLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(Error::StoreInUse { path }),
            Err(fs::TryLockError::Error(e)) => Err(Error::io("lock", &path)(e)),
        }
    }

    fn lock_file(&self) -> Result<(File, PathBuf)> {
        let path = self.kiln_dir("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io("open lock file", &path))?;
        Ok((file, path))
    }

    /// A fresh scratch directory under `kiln/tmp`, removed when dropped.
    pub fn tmp_dir(&self) -> Result<tempfile::TempDir> {
        let tmp = self.kiln_dir("tmp");
        tempfile::Builder::new()
            .prefix("dir-")
            .tempdir_in(&tmp)
            .map_err(Error::io("create temp directory in", &tmp))
    }

    /// Where the blob `d` lives (whether or not it exists).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs_dir().join(d.hex())
    }

    /// True when the blob `d` is present (its content is not checked).
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Stores `bytes` as a blob and returns its digest and size.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<(Digest, u64)> {
        let digest = Digest::of(bytes);
        let size = bytes.len() as u64;
        if fs::metadata(self.blob_path(&digest)).is_ok_and(|m| m.len() == size) {
            return Ok((digest, size));
        }
        let mut w = self.blob_writer()?;
        w.write_all(bytes)
            .map_err(Error::io("write blob", &w.tmp_path()))?;
        w.commit()
    }

    /// A writer that stores what is written as a blob when committed.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let tmp = self.kiln_dir("tmp");
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&tmp)
            .map_err(Error::io("create temp file in", &tmp))?;
        Ok(BlobWriter {
            file: BufWriter::with_capacity(IO_BUF, file),
            hasher: Sha256::new(),
            size: 0,
            blobs_dir: self.blobs_dir(),
        })
    }

    /// The content of blob `d`, checked against its digest.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(d);
        let bytes = fs::read(&path).map_err(|e| self.blob_error(d, &path, e))?;
        let found = Digest::of(&bytes);
        if &found != d {
            return Err(Error::CorruptBlob {
                digest: d.clone(),
                found,
            });
        }
        Ok(bytes)
    }

    /// Blob `d` parsed as JSON (checked against its digest first).
    pub fn read_blob_json<T: DeserializeOwned>(&self, d: &Digest) -> Result<T> {
        let bytes = self.read_blob(d)?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            what: format!("blob {d}"),
            source,
        })
    }

    /// Opens blob `d` for streaming. The content is not checked: hash while reading
    /// (as `unpack::apply_layers` and `export` do) or call `read_blob`.
    pub fn open_blob(&self, d: &Digest) -> Result<File> {
        let path = self.blob_path(d);
        File::open(&path).map_err(|e| self.blob_error(d, &path, e))
    }

    fn blob_error(&self, d: &Digest, path: &Path, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::NotFound {
            Error::MissingBlob { digest: d.clone() }
        } else {
            Error::io("read blob", path)(e)
        }
    }

    /// Saves `rec` and points the tag `rec.name` in `index.json` at it (one tag per name).
    ///
    /// The manifest blob must already be stored: the tag's descriptor needs its size.
    pub fn put_image(&self, rec: &ImageRecord) -> Result<()> {
        let manifest_path = self.blob_path(&rec.digest);
        let size = fs::metadata(&manifest_path)
            .map_err(|e| self.blob_error(&rec.digest, &manifest_path, e))?
            .len();
        self.write_json(&self.image_path(&rec.digest), rec)?;

        let mut index = self.read_index()?;
        index
            .manifests
            .retain(|m| ref_name(m) != Some(rec.name.as_str()));
        let mut desc = Descriptor::new(MEDIA_MANIFEST, rec.digest.clone(), size);
        desc.annotations
            .insert(ANNOTATION_REF_NAME.to_owned(), rec.name.clone());
        index.manifests.push(desc);
        self.write_index(index)
    }

    /// Every image record, sorted by name and then build time.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.kiln_dir("images");
        let mut records = Vec::new();
        for entry in fs::read_dir(&dir).map_err(Error::io("list", &dir))? {
            let path = entry.map_err(Error::io("list", &dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                records.push(self.read_json::<ImageRecord>(&path)?);
            }
        }
        records.sort_by(|a, b| {
            (&a.name, &a.built_at, &a.digest).cmp(&(&b.name, &b.built_at, &b.digest))
        });
        Ok(records)
    }

    /// The record of the image whose manifest is `d`, if there is one.
    pub fn image(&self, d: &Digest) -> Result<Option<ImageRecord>> {
        let path = self.image_path(d);
        if !path.exists() {
            return Ok(None);
        }
        self.read_json(&path).map(Some)
    }

    /// Tag name → manifest digest, from `index.json`.
    pub fn tagged(&self) -> Result<BTreeMap<String, Digest>> {
        Ok(self
            .read_index()?
            .manifests
            .into_iter()
            .filter_map(|m| Some((ref_name(&m)?.to_owned(), m.digest)))
            .collect())
    }

    /// Finds an image by name, `sha256:<hex>`, or a unique hex prefix of at least 6 digits.
    ///
    /// A name resolves to the most recently built (by `built_at`) of the images of that name and
    /// the image its tag points at. Names win over digest prefixes.
    pub fn resolve(&self, reference: &str) -> Result<ImageRecord> {
        let images = self.images()?;
        let tagged = self.tagged()?;

        // Records are keyed by manifest digest, so when two names bake to the same digest the
        // record carries the later name; the other name still reaches it through its tag.
        let by_tag = tagged
            .get(reference)
            .and_then(|d| images.iter().find(|r| &r.digest == d));
        let newest = images
            .iter()
            .filter(|r| r.name == reference)
            .chain(by_tag)
            .max_by(|a, b| a.built_at.cmp(&b.built_at));
        if let Some(rec) = newest {
            return Ok(rec.clone());
        }

        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        let is_hex = hex.len() >= MIN_PREFIX
            && hex.len() <= 64
            && hex.bytes().all(|b| b.is_ascii_hexdigit());
        if is_hex {
            let hex = hex.to_ascii_lowercase();
            let matches: Vec<&ImageRecord> = images
                .iter()
                .filter(|r| r.digest.hex().starts_with(&hex))
                .collect();
            match matches.as_slice() {
                [one] => return Ok((*one).clone()),
                [] => {}
                many => {
                    return Err(Error::AmbiguousReference {
                        reference: reference.to_owned(),
                        candidates: many
                            .iter()
                            .map(|r| format!("{} ({})", r.digest, r.name))
                            .collect(),
                    });
                }
            }
        }

        let names: BTreeSet<&str> = tagged
            .keys()
            .map(String::as_str)
            .chain(images.iter().map(|r| r.name.as_str()))
            .collect();
        Err(Error::ImageNotFound {
            reference: reference.to_owned(),
            suggestion: kiln_core::diag::did_you_mean(reference, names).map(str::to_owned),
        })
    }

    /// Deletes the record `reference` resolves to, and its tag if the tag points at it.
    /// Blobs stay until [`Store::gc`].
    pub fn remove_image(&self, reference: &str) -> Result<ImageRecord> {
        let rec = self.resolve(reference)?;
        let path = self.image_path(&rec.digest);
        fs::remove_file(&path).map_err(Error::io("remove image record", &path))?;
        let mut index = self.read_index()?;
        let before = index.manifests.len();
        index
            .manifests
            .retain(|m| !(ref_name(m) == Some(rec.name.as_str()) && m.digest == rec.digest));
        if index.manifests.len() != before {
            self.write_index(index)?;
        }
        Ok(rec)
    }

    /// Removes image records that are neither tagged nor in `keep`, then every blob no
    /// remaining image (or tagged / kept manifest) reaches, step-cache entries whose layer is
    /// gone, and everything in `kiln/tmp`.
    ///
    /// Call it holding [`Store::lock`]: every kiln process that writes holds the lock, so what
    /// is in `kiln/tmp` then was left by a crashed process.
    pub fn gc(&self, keep: &BTreeSet<Digest>) -> Result<GcReport> {
        let mut report = GcReport::default();
        let tagged: BTreeSet<Digest> = self.tagged()?.into_values().collect();

        let mut live = BTreeSet::new();
        for rec in self.images()? {
            if tagged.contains(&rec.digest) || keep.contains(&rec.digest) {
                live.insert(rec.config_digest.clone());
                live.extend(rec.layers.iter().map(|l| l.digest.clone()));
                live.insert(rec.digest);
            } else {
                let path = self.image_path(&rec.digest);
                fs::remove_file(&path).map_err(Error::io("remove image record", &path))?;
                // Its file manifest (drift checks) goes with it, if it was ever built.
                let manifest = self
                    .kiln_dir("manifests")
                    .join(format!("{}.json", rec.digest.hex()));
                match fs::remove_file(&manifest) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("remove manifest", &manifest)(e)),
                }
                report.images_removed.push(rec.digest);
            }
        }
        // Also follow the manifests themselves, so a tag without a record (made by another tool)
        // or a record that disagrees with its manifest never loses a blob it needs.
        let roots: Vec<Digest> = live.iter().chain(&tagged).chain(keep).cloned().collect();
        for d in roots {
            if let Ok(m) = self.read_blob_json::<Manifest>(&d) {
                live.insert(m.config.digest);
                live.extend(m.layers.into_iter().map(|l| l.digest));
            }
            live.insert(d);
        }

        let blobs = self.blobs_dir();
        for entry in fs::read_dir(&blobs).map_err(Error::io("list", &blobs))? {
            let entry = entry.map_err(Error::io("list", &blobs))?;
            // Leave files that are not named like blobs alone: kiln did not put them there.
            let Some(d) = entry
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
            else {
                continue;
            };
            if live.contains(&d) {
                continue;
            }
            let path = entry.path();
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&path).map_err(Error::io("remove blob", &path))?;
            report.blobs_removed += 1;
            report.bytes_freed += len;
        }

        let cache = self.kiln_dir("cache");
        for entry in fs::read_dir(&cache).map_err(Error::io("list", &cache))? {
            let path = entry.map_err(Error::io("list", &cache))?.path();
            // An unreadable cache entry is as good as a missing one: it only costs a rebuild.
            let keep = self
                .read_json::<CacheEntry>(&path)
                .is_ok_and(|e| self.has_blob(&e.layer.digest));
            if !keep {
                fs::remove_file(&path).map_err(Error::io("remove cache entry", &path))?;
                report.cache_entries_removed += 1;
            }
        }

        let tmp = self.kiln_dir("tmp");
        for entry in fs::read_dir(&tmp).map_err(Error::io("list", &tmp))? {
            let entry = entry.map_err(Error::io("list", &tmp))?;
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let removed = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::io("remove temp file", &path)(e));
                }
                _ => {}
            }
        }
        Ok(report)
    }

    /// Re-hashes the manifest, config and every layer of `rec`, and checks that the manifest
    /// and config name exactly the record's blobs. An empty list means the image is intact.
    ///
    /// Layers are checked by blob digest; their DiffIDs are compared with the config's but not
    /// recomputed (that would mean decompressing every layer).
    pub fn verify(&self, rec: &ImageRecord) -> Result<Vec<BlobProblem>> {
        let mut problems = Vec::new();
        let mut problem = |role: &str, digest: &Digest, problem: Problem| {
            problems.push(BlobProblem {
                role: role.to_owned(),
                digest: digest.clone(),
                problem,
            });
        };

        if let Some(bytes) = self.check_small_blob("manifest", &rec.digest, &mut problem)? {
            match serde_json::from_slice::<Manifest>(&bytes) {
                Err(e) => problem(
                    "manifest",
                    &rec.digest,
                    inconsistent(format!("not a manifest: {e}")),
                ),
                Ok(m) => {
                    if m.config.digest != rec.config_digest {
                        let detail = format!(
                            "it names config {} but the record has {}",
                            m.config.digest, rec.config_digest
                        );
                        problem("manifest", &rec.digest, inconsistent(detail));
                    }
                    let in_manifest: Vec<&Digest> = m.layers.iter().map(|l| &l.digest).collect();
                    let in_record: Vec<&Digest> = rec.layers.iter().map(|l| &l.digest).collect();
                    if in_manifest != in_record {
                        let detail = format!(
                            "it names layers {in_manifest:?} but the record has {in_record:?}"
                        );
                        problem("manifest", &rec.digest, inconsistent(detail));
                    }
                }
            }
        }

        if let Some(bytes) = self.check_small_blob("config", &rec.config_digest, &mut problem)? {
            match serde_json::from_slice::<ImageConfig>(&bytes) {
                Err(e) => problem(
                    "config",
                    &rec.config_digest,
                    inconsistent(format!("not an image config: {e}")),
                ),
                Ok(c) => {
                    let in_record: Vec<&Digest> = rec.layers.iter().map(|l| &l.diff_id).collect();
                    if c.rootfs.diff_ids.iter().collect::<Vec<_>>() != in_record {
                        let detail = format!(
                            "its diff_ids are {:?} but the record has {in_record:?}",
                            c.rootfs.diff_ids
                        );
                        problem("config", &rec.config_digest, inconsistent(detail));
                    }
                }
            }
        }

        for (i, layer) in rec.layers.iter().enumerate() {
            let role = format!("layer {}", i + 1);
            let path = self.blob_path(&layer.digest);
            match hash_file(&path) {
                Ok(found) if found == layer.digest => {}
                Ok(found) => problem(&role, &layer.digest, Problem::Mismatch { found }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    problem(&role, &layer.digest, Problem::Missing);
                }
                Err(e) => return Err(Error::io("read blob", &path)(e)),
            }
        }
        Ok(problems)
    }

    /// Reads and hashes a small blob; `None` (with a problem recorded) when missing or corrupt.
    fn check_small_blob(
        &self,
        role: &str,
        d: &Digest,
        problem: &mut impl FnMut(&str, &Digest, Problem),
    ) -> Result<Option<Vec<u8>>> {
        match self.read_blob(d) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(Error::MissingBlob { .. }) => {
                problem(role, d, Problem::Missing);
                Ok(None)
            }
            Err(Error::CorruptBlob { found, .. }) => {
                problem(role, d, Problem::Mismatch { found });
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The step-cache entry for `key`, unless it is missing or its layer blob is gone.
    pub fn cache_get(&self, key: &Digest) -> Result<Option<CacheEntry>> {
        let path = self.cache_path(key);
        if !path.exists() {
            return Ok(None);
        }
        let entry: CacheEntry = self.read_json(&path)?;
        Ok(self.has_blob(&entry.layer.digest).then_some(entry))
    }

    /// Records the step-cache entry for `key`, replacing any previous one.
    pub fn cache_put(&self, key: &Digest, e: &CacheEntry) -> Result<()> {
        self.write_json(&self.cache_path(key), e)
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn kiln_dir(&self, name: &str) -> PathBuf {
        self.root.join("kiln").join(name)
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn image_path(&self, d: &Digest) -> PathBuf {
        self.kiln_dir("images").join(format!("{}.json", d.hex()))
    }

    fn cache_path(&self, key: &Digest) -> PathBuf {
        self.kiln_dir("cache").join(format!("{}.json", key.hex()))
    }

    fn read_index(&self) -> Result<Index> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                what: path.display().to_string(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::new(Vec::new())),
            Err(e) => Err(Error::io("read", &path)(e)),
        }
    }

    /// Writes `index.json` with manifests sorted by tag, so equal stores have equal indexes.
    fn write_index(&self, mut index: Index) -> Result<()> {
        index
            .manifests
            .sort_by(|a, b| (ref_name(a), &a.digest).cmp(&(ref_name(b), &b.digest)));
        self.write_atomic(&self.index_path(), &index.to_json())
    }

    fn read_json<T: DeserializeOwned>(&self, path: &Path) -> Result<T> {
        let bytes = fs::read(path).map_err(Error::io("read", path))?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            what: path.display().to_string(),
            source,
        })
    }

    /// Writes a record as pretty JSON: records are for people too, and are not hashed.
    pub(crate) fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| Error::Json {
            what: path.display().to_string(),
            source,
        })?;
        self.write_atomic(path, &bytes)
    }

    /// Writes `bytes` to a temp file, fsyncs it and renames it over `dest`.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.kiln_dir("tmp");
        let mut file =
            NamedTempFile::new_in(&tmp).map_err(Error::io("create temp file in", &tmp))?;
        file.write_all(bytes)
            .map_err(Error::io("write", file.path()))?;
        file.as_file()
            .sync_all()
            .map_err(Error::io("sync", file.path()))?;
        file.persist(dest)
            .map_err(|e| Error::io("write", dest)(e.error))?;
        Ok(())
    }
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str)
}

fn inconsistent(detail: String) -> Problem {
    Problem::Inconsistent { detail }
}

/// The sha256 of a file's content, read in large chunks.
pub(crate) fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; IO_BUF];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(Digest::from_hasher(hasher)),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes a blob: hashes what passes through, then renames the temp file into place on
/// [`BlobWriter::commit`]. Dropped without a commit, the temp file is deleted.
pub struct BlobWriter {
    file: BufWriter<NamedTempFile>,
    hasher: Sha256,
    size: u64,
    blobs_dir: PathBuf,
}

impl fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobWriter")
            .field("tmp", &self.file.get_ref().path())
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn tmp_path(&self) -> PathBuf {
        self.file.get_ref().path().to_path_buf()
    }

    /// Makes the blob durable and visible under its digest; returns the digest and size.
    ///
    /// If the blob already exists, the new copy is discarded: same name, same content.
    pub fn commit(self) -> Result<(Digest, u64)> {
        let tmp_path = self.tmp_path();
        let file = self
            .file
            .into_inner()
            .map_err(|e| Error::io("write blob", &tmp_path)(e.into_error()))?;
        let digest = Digest::from_hasher(self.hasher);
        let dest = self.blobs_dir.join(digest.hex());
        // A present blob of the right size was itself written through this path; a blob of the
        // wrong size is damaged and gets replaced.
        if fs::metadata(&dest).is_ok_and(|m| m.len() == self.size) {
            return Ok((digest, self.size));
        }
        file.as_file()
            .sync_all()
            .map_err(Error::io("sync blob", &tmp_path))?;
        file.persist(&dest)
            .map_err(|e| Error::io("store blob", &dest)(e.error))?;
        // Make the rename itself durable.
        if let Ok(dir) = File::open(&self.blobs_dir) {
            let _ = dir.sync_all();
        }
        Ok((digest, self.size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A reader that hashes everything read through it, to check a blob while streaming it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// Reads the rest of the stream and returns the digest of everything read.
    pub(crate) fn finish(mut self) -> io::Result<Digest> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(Digest::from_hasher(self.hasher))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Builds small real images by hand, for tests across the crate.
#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
pub(crate) mod test_support {
    use std::collections::BTreeMap;

    use super::*;
    use crate::layer::{Compression, LayerBlobWriter, LayerWriter};
    use crate::oci::{MEDIA_CONFIG, RootFs, RunSettings};

    /// Stores a layer holding `files` (path, content), compressed as asked.
    pub(crate) fn layer(
        store: &Store,
        files: &[(&str, &[u8])],
        compression: Compression,
    ) -> LayerRecord {
        let mut w = LayerWriter::new(LayerBlobWriter::new(store, compression).unwrap(), 0);
        for (path, content) in files {
            w.append_file(path, 0o644, 0, 0, content.len() as u64, *content)
                .unwrap();
        }
        w.finish().unwrap().commit().unwrap()
    }

    /// Stores config and manifest for `layers`; returns the record (not yet put).
    pub(crate) fn image(
        store: &Store,
        name: &str,
        built_at: &str,
        layers: Vec<LayerRecord>,
    ) -> ImageRecord {
        let config = ImageConfig {
            created: Some("1970-01-01T00:00:00Z".into()),
            architecture: "amd64".into(),
            os: "linux".into(),
            config: RunSettings {
                cmd: Some(vec!["/hello".into()]),
                ..RunSettings::default()
            },
            rootfs: RootFs::layers(layers.iter().map(|l| l.diff_id.clone()).collect()),
            history: vec![],
        };
        let (config_digest, config_size) = store.put_blob(&config.to_json()).unwrap();
        let manifest = Manifest::new(
            Descriptor::new(MEDIA_CONFIG, config_digest.clone(), config_size),
            layers
                .iter()
                .map(|l| Descriptor::new(&l.media_type, l.digest.clone(), l.size))
                .collect(),
        );
        let (digest, manifest_size) = store.put_blob(&manifest.to_json()).unwrap();
        ImageRecord {
            name: name.into(),
            digest,
            config_digest,
            size: manifest_size + config_size + layers.iter().map(|l| l.size).sum::<u64>(),
            layers,
            parent: None,
            base: "scratch".into(),
            inputs_hash: Digest::of(name.as_bytes()),
            git: None,
            kiln_version: "0.1.0".into(),
            labels: BTreeMap::new(),
            steps: vec![],
            built_at: built_at.into(),
            host: "test".into(),
            duration_ms: 1,
        }
    }

    /// A stored, tagged image of one gzip layer with one file.
    pub(crate) fn put(store: &Store, name: &str, built_at: &str, content: &[u8]) -> ImageRecord {
        let l = layer(store, &[("hello", content)], Compression::Gzip);
        let rec = image(store, name, built_at, vec![l]);
        store.put_image(&rec).unwrap();
        rec
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use super::test_support::put;
    use super::*;

    fn new_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    fn tmp_entries(store: &Store) -> usize {
        fs::read_dir(store.root().join("kiln/tmp")).unwrap().count()
    }

    fn flip_byte(path: &Path) {
        let mut bytes = fs::read(path).unwrap();
        let i = bytes.len() / 2;
        bytes[i] ^= 0x01;
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn open_creates_an_oci_layout_and_refuses_other_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::open(&root).unwrap();
        assert_eq!(fs::read(root.join("oci-layout")).unwrap(), oci::OCI_LAYOUT);
        let index: Index =
            serde_json::from_slice(&fs::read(root.join("index.json")).unwrap()).unwrap();
        assert_eq!(index, Index::new(vec![]));
        for d in ["blobs/sha256", "kiln/images", "kiln/cache", "kiln/tmp"] {
            assert!(root.join(d).is_dir(), "{d}");
        }
        // Re-opening keeps what is there.
        let (d, _) = store.put_blob(b"x").unwrap();
        assert!(Store::open(&root).unwrap().has_blob(&d));

        // An empty directory becomes a store; a directory with other content is refused.
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        Store::open(&empty).unwrap();
        let home = dir.path().join("home");
        fs::create_dir(&home).unwrap();
        fs::write(home.join("notes.txt"), "mine").unwrap();
        let err = Store::open(&home).unwrap_err();
        assert!(matches!(err, Error::NotAStore { .. }), "{err}");
        assert!(
            err.to_string().contains("without an `oci-layout` file"),
            "{err}"
        );
        assert!(!home.join("blobs").exists());
    }

    #[test]
    fn blob_writer_commits_atomically_and_drop_leaves_nothing() {
        let (_dir, store) = new_store();
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"half a blob").unwrap();
        drop(w);
        assert_eq!(tmp_entries(&store), 0, "the temp file is deleted");
        assert!(!store.has_blob(&Digest::of(b"half a blob")));
        assert_eq!(
            fs::read_dir(store.blob_path(&Digest::of(b"")).parent().unwrap())
                .unwrap()
                .count(),
            0
        );

        let mut w = store.blob_writer().unwrap();
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (d, size) = w.commit().unwrap();
        assert_eq!((d.clone(), size), (Digest::of(b"hello world"), 11));
        assert_eq!(store.read_blob(&d).unwrap(), b"hello world");
        assert_eq!(tmp_entries(&store), 0);
        // Writing it again is a no-op that gives the same answer.
        assert_eq!(store.put_blob(b"hello world").unwrap(), (d, 11));
        assert_eq!(tmp_entries(&store), 0);
    }

    #[test]
    fn read_blob_catches_a_flipped_byte_and_a_missing_blob() {
        let (_dir, store) = new_store();
        let (d, _) = store.put_blob(b"precious content").unwrap();
        flip_byte(&store.blob_path(&d));
        match store.read_blob(&d) {
            Err(Error::CorruptBlob { digest, found }) => {
                assert_eq!(digest, d);
                assert_ne!(found, d);
            }
            other => panic!("expected CorruptBlob, got {other:?}"),
        }
        let missing = Digest::of(b"never stored");
        let err = store.read_blob(&missing).unwrap_err();
        assert!(
            matches!(err, Error::MissingBlob { ref digest } if digest == &missing),
            "{err}"
        );
        assert!(err.to_string().contains(&missing.to_string()));
    }

    #[test]
    fn put_image_tags_one_manifest_per_name_sorted() {
        let (_dir, store) = new_store();
        let web1 = put(&store, "web", "2026-01-01T00:00:00Z", b"1");
        let api = put(&store, "api", "2026-01-01T00:00:00Z", b"a");
        let web2 = put(&store, "web", "2026-01-02T00:00:00Z", b"2");
        let tagged = store.tagged().unwrap();
        assert_eq!(
            tagged,
            BTreeMap::from([
                ("api".into(), api.digest.clone()),
                ("web".into(), web2.digest.clone())
            ])
        );
        let index: Index =
            serde_json::from_slice(&fs::read(store.root().join("index.json")).unwrap()).unwrap();
        let names: Vec<_> = index.manifests.iter().filter_map(ref_name).collect();
        assert_eq!(names, ["api", "web"]);
        assert_eq!(
            index.manifests[1].size,
            fs::metadata(store.blob_path(&web2.digest)).unwrap().len()
        );
        assert_eq!(store.images().unwrap(), vec![api, web1, web2]);
    }

    /// Two manifest-like blobs whose digests share their first six hex digits.
    fn colliding_blobs() -> (Vec<u8>, Vec<u8>) {
        let mut seen: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for i in 0u64.. {
            let bytes = format!("{{\"n\":{i}}}").into_bytes();
            let prefix = Digest::of(&bytes).hex()[..6].to_owned();
            if let Some(first) = seen.insert(prefix, bytes.clone()) {
                return (first, bytes);
            }
        }
        unreachable!()
    }

    #[test]
    fn resolve_by_name_digest_and_prefix() {
        let (_dir, store) = new_store();
        let older = put(&store, "web", "2026-01-01T00:00:00Z", b"1");
        let newer = put(&store, "web", "2026-01-02T00:00:00Z", b"2");
        assert_eq!(
            store.resolve("web").unwrap(),
            newer,
            "a name is its newest bake"
        );
        assert_eq!(store.resolve(&older.digest.to_string()).unwrap(), older);
        assert_eq!(store.resolve(&older.digest.hex()[..12]).unwrap(), older);
        assert_eq!(
            store
                .resolve(&format!("sha256:{}", &newer.digest.hex()[..8]))
                .unwrap(),
            newer
        );
        assert_eq!(
            store
                .resolve(&newer.digest.hex().to_uppercase()[..10])
                .unwrap(),
            newer
        );

        let err = store.resolve(&older.digest.hex()[..5]).unwrap_err();
        assert!(
            matches!(err, Error::ImageNotFound { .. }),
            "5 digits are too few: {err}"
        );

        // Same content under a second name: one record (the later name), both names resolve.
        let mut twin = newer.clone();
        twin.name = "web-twin".into();
        store.put_image(&twin).unwrap();
        assert_eq!(store.resolve("web-twin").unwrap(), twin);
        assert_eq!(store.resolve("web").unwrap().digest, newer.digest);

        let err = store.resolve("webb").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no image matches `webb`; did you mean `web`?"
        );
        let err = store.resolve("zzz").unwrap_err();
        assert_eq!(err.to_string(), "no image matches `zzz`");
    }

    #[test]
    fn resolve_reports_an_ambiguous_prefix_with_its_candidates() {
        let (_dir, store) = new_store();
        let (a, b) = colliding_blobs();
        let mut recs = Vec::new();
        for (name, bytes) in [("a", a), ("b", b)] {
            let mut rec = test_support::image(&store, name, "2026-01-01T00:00:00Z", vec![]);
            rec.digest = store.put_blob(&bytes).unwrap().0;
            store.put_image(&rec).unwrap();
            recs.push(rec);
        }
        let prefix = &recs[0].digest.hex()[..6];
        match store.resolve(prefix).unwrap_err() {
            Error::AmbiguousReference {
                reference,
                candidates,
            } => {
                assert_eq!(reference, prefix);
                assert_eq!(candidates.len(), 2);
                assert!(
                    candidates[0].contains(&recs[0].digest.to_string()),
                    "{candidates:?}"
                );
                assert!(
                    candidates[1].contains(&recs[1].digest.to_string()),
                    "{candidates:?}"
                );
            }
            other => panic!("expected AmbiguousReference, got {other:?}"),
        }
        // A longer prefix settles it (the digests differ within 64 digits).
        let full = recs[1].digest.hex();
        let n = (6..64)
            .find(|&n| !recs[0].digest.hex().starts_with(&full[..n]))
            .unwrap();
        assert_eq!(store.resolve(&full[..n]).unwrap(), recs[1]);
    }

    #[test]
    fn remove_image_drops_the_record_and_its_tag_but_not_blobs() {
        let (_dir, store) = new_store();
        let web = put(&store, "web", "2026-01-01T00:00:00Z", b"1");
        let removed = store.remove_image("web").unwrap();
        assert_eq!(removed, web);
        assert!(store.tagged().unwrap().is_empty());
        assert!(store.images().unwrap().is_empty());
        assert!(matches!(
            store.resolve("web"),
            Err(Error::ImageNotFound { .. })
        ));
        assert!(store.has_blob(&web.digest) && store.has_blob(&web.layers[0].digest));
    }

    #[test]
    fn gc_keeps_tagged_and_kept_images_and_removes_the_rest() {
        let (_dir, store) = new_store();
        let old_web = put(&store, "web", "2026-01-01T00:00:00Z", b"old web");
        let web = put(&store, "web", "2026-01-02T00:00:00Z", b"web");
        let released = put(&store, "api", "2026-01-01T00:00:00Z", b"released api");
        let api = put(&store, "api", "2026-01-02T00:00:00Z", b"api");
        let orphan = store.put_blob(b"orphan").unwrap();
        // Cache entries of a layer that stays and of one that goes.
        let entry = |layer: &LayerRecord| CacheEntry {
            layer: layer.clone(),
            chain: layer.diff_id.clone(),
            files: 1,
            bytes: 1,
        };
        store
            .cache_put(&Digest::of(b"k1"), &entry(&web.layers[0]))
            .unwrap();
        store
            .cache_put(&Digest::of(b"k2"), &entry(&old_web.layers[0]))
            .unwrap();
        fs::write(store.root().join("kiln/tmp/blob-crashed"), b"partial").unwrap();
        // File manifests (drift checks) of an image that goes and of one that stays.
        store.manifest(&old_web).unwrap();
        store.manifest(&web).unwrap();
        let manifest_of = |d: &Digest| {
            store
                .root()
                .join(format!("kiln/manifests/{}.json", d.hex()))
        };
        assert!(manifest_of(&old_web.digest).exists());

        let unique_to_old: Vec<Digest> = [
            old_web.digest.clone(),
            old_web.config_digest.clone(),
            old_web.layers[0].digest.clone(),
        ]
        .into();
        let expected_bytes: u64 = unique_to_old
            .iter()
            .map(|d| fs::metadata(store.blob_path(d)).unwrap().len())
            .sum::<u64>()
            + orphan.1;

        let keep = BTreeSet::from([released.digest.clone()]);
        let report = store.gc(&keep).unwrap();
        assert_eq!(report.images_removed, vec![old_web.digest.clone()]);
        // The old manifest, config and layer, and the orphan.
        assert_eq!(report.blobs_removed, 4);
        assert_eq!(report.bytes_freed, expected_bytes);
        assert_eq!(report.cache_entries_removed, 1);
        assert!(
            !manifest_of(&old_web.digest).exists(),
            "its manifest went with it"
        );
        assert!(manifest_of(&web.digest).exists());

        let names: Vec<(String, Digest)> = store
            .images()
            .unwrap()
            .into_iter()
            .map(|r| (r.name, r.digest))
            .collect();
        assert_eq!(
            names,
            [
                ("api".to_owned(), released.digest.clone()),
                ("api".to_owned(), api.digest.clone()),
                ("web".to_owned(), web.digest.clone())
            ]
        );
        for rec in [&web, &released, &api] {
            assert_eq!(store.verify(rec).unwrap(), vec![], "{}", rec.name);
        }
        for d in &unique_to_old {
            assert!(!store.has_blob(d));
        }
        assert!(!store.has_blob(&orphan.0));
        assert!(store.cache_get(&Digest::of(b"k1")).unwrap().is_some());
        assert!(
            !store
                .root()
                .join(format!("kiln/cache/{}.json", Digest::of(b"k2").hex()))
                .exists()
        );
        assert_eq!(tmp_entries(&store), 0);

        // Nothing left to collect.
        let again = store.gc(&keep).unwrap();
        assert_eq!(again, GcReport::default());
    }

    #[test]
    fn verify_names_a_corrupt_layer_a_missing_config_and_a_lying_record() {
        let (_dir, store) = new_store();
        let l1 = test_support::layer(&store, &[("a", b"first")], crate::layer::Compression::Gzip);
        let l2 = test_support::layer(&store, &[("b", b"second")], crate::layer::Compression::None);
        let rec = test_support::image(&store, "web", "2026-01-01T00:00:00Z", vec![l1, l2.clone()]);
        store.put_image(&rec).unwrap();
        assert_eq!(store.verify(&rec).unwrap(), vec![]);

        flip_byte(&store.blob_path(&l2.digest));
        fs::remove_file(store.blob_path(&rec.config_digest)).unwrap();
        let problems = store.verify(&rec).unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].role, "config");
        assert_eq!(problems[0].digest, rec.config_digest);
        assert_eq!(problems[0].problem, Problem::Missing);
        assert_eq!(problems[1].role, "layer 2");
        assert_eq!(problems[1].digest, l2.digest);
        assert!(matches!(&problems[1].problem, Problem::Mismatch { found } if found != &l2.digest));
        assert!(
            problems[1]
                .to_string()
                .starts_with(&format!("layer 2 {} is corrupt", l2.digest))
        );

        // A record that names other layers than its manifest does.
        let mut liar = rec;
        liar.layers.reverse();
        let problems = store.verify(&liar).unwrap();
        assert!(
            problems
                .iter()
                .any(|p| p.role == "manifest" && matches!(p.problem, Problem::Inconsistent { .. })),
            "{problems:?}"
        );
    }

    #[test]
    fn cache_entries_round_trip_and_vanish_with_their_layer() {
        let (_dir, store) = new_store();
        let layer = test_support::layer(&store, &[("a", b"x")], crate::layer::Compression::None);
        let key = Digest::of(b"step");
        assert_eq!(store.cache_get(&key).unwrap(), None);
        let entry = CacheEntry {
            chain: layer.diff_id.clone(),
            layer,
            files: 1,
            bytes: 1,
        };
        store.cache_put(&key, &entry).unwrap();
        assert_eq!(store.cache_get(&key).unwrap(), Some(entry.clone()));
        fs::remove_file(store.blob_path(&entry.layer.digest)).unwrap();
        assert_eq!(store.cache_get(&key).unwrap(), None);
    }

    #[test]
    fn the_lock_is_exclusive_until_dropped() {
        let (_dir, store) = new_store();
        let other = Store::open(store.root()).unwrap();
        let held = store.lock().unwrap();
        let err = other.try_lock().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("store is in use by another kiln process"),
            "{err}"
        );
        drop(held);
        let _again = other.try_lock().unwrap();
    }

    #[test]
    fn tmp_dir_is_inside_the_store_and_cleaned_up() {
        let (_dir, store) = new_store();
        let tmp = store.tmp_dir().unwrap();
        assert!(tmp.path().starts_with(store.root().join("kiln/tmp")));
        drop(tmp);
        assert_eq!(tmp_entries(&store), 0);
    }
}
