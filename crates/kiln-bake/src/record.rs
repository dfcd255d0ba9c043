//! kiln's own records kept next to the OCI layout: what was built, how, and the step cache.
//!
//! These are kiln's bookkeeping, not OCI documents, so they may grow fields; every map is a
//! `BTreeMap` so that a record's JSON is stable.

use std::collections::BTreeMap;

use kiln_core::Digest;
use serde::{Deserialize, Serialize};

/// Everything kiln knows about one built image (`kiln/images/<manifest-hex>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image name from the config (`web`); also its tag in `index.json`.
    pub name: String,
    /// The manifest digest: the image's identity.
    pub digest: Digest,
    /// The config blob.
    pub config_digest: Digest,
    /// The layers, base first (the base image's layers included).
    pub layers: Vec<LayerRecord>,
    /// The base image's manifest digest, if the base is an image.
    pub parent: Option<Digest>,
    /// The base as written in the config: `scratch`, `image.base`, `tar:./x.tar`.
    pub base: String,
    /// Hash of every input of the bake (spec, files, base digest).
    pub inputs_hash: Digest,
    /// The git commit the bake ran from, if any.
    pub git: Option<GitInfo>,
    /// The kiln version that baked it.
    pub kiln_version: String,
    /// Image labels.
    pub labels: BTreeMap<String, String>,
    /// One record per provisioner step.
    pub steps: Vec<StepRecord>,
    /// RFC 3339 UTC time the bake finished (same format everywhere, so it sorts as text).
    pub built_at: String,
    /// Host name of the machine that baked it.
    pub host: String,
    /// Wall time of the bake.
    pub duration_ms: u64,
    /// Sum of the manifest, config and layer blob sizes.
    pub size: u64,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the (possibly compressed) blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar (the OCI DiffID).
    pub diff_id: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// The blob's media type, e.g. `application/vnd.oci.image.layer.v1.tar+gzip`.
    pub media_type: String,
}

/// The git state a bake ran from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitInfo {
    /// Full commit hash of `HEAD`.
    pub commit: String,
    /// True when the work tree had uncommitted changes.
    pub dirty: bool,
}

/// What one provisioner step did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// For people: `file build/web → /app/web`.
    pub name: String,
    /// The step's cache key.
    pub cache_key: Digest,
    /// The layer it produced (its blob digest), if any.
    pub layer: Option<Digest>,
    /// True when the layer came from the step cache.
    pub cached: bool,
    /// Wall time of the step (0 when cached).
    pub duration_ms: u64,
    /// Files the step wrote.
    pub files: u64,
    /// Bytes of file content the step wrote.
    pub bytes: u64,
}

/// A step-cache entry (`kiln/cache/<key-hex>.json`): the layer a step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The layer.
    pub layer: LayerRecord,
    /// The chain id of the rootfs after this step.
    pub chain: Digest,
    /// Files the step wrote.
    pub files: u64,
    /// Bytes of file content the step wrote.
    pub bytes: u64,
}
