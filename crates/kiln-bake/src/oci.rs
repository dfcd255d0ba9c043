//! OCI image-spec documents (manifest, index, config) with deterministic JSON.
//!
//! kiln defines its own small types rather than using the `oci-spec` crate because that crate
//! keeps maps in `HashMap`s: their iteration order, hence the JSON bytes and the digests, would
//! change from run to run. Here every map is a `BTreeMap`, fields serialize in declaration order
//! (the order the spec lists them) and empty optional fields are left out, so equal values
//! always give equal bytes and equal digests.

use std::collections::BTreeMap;

use kiln_core::Digest;
use serde::{Deserialize, Serialize};

/// Media type of an image manifest.
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an image index.
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an image config.
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed layer.
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip-compressed layer.
pub const MEDIA_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd-compressed layer.
pub const MEDIA_LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Annotation naming the tag of a manifest in an image layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd and Docker read for the full `repo:tag` of an imported image.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Content of the `oci-layout` file.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The canonical bytes of an OCI document: compact JSON, fields in declaration order.
pub fn to_canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Only plain structs, strings, numbers and string-keyed maps reach here.
    serde_json::to_vec(value).expect("serializing plain data to JSON cannot fail")
}

/// A reference to a blob: what it is, its digest and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is, e.g. [`MEDIA_LAYER_TAR_GZIP`].
    pub media_type: String,
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor for `bytes` of `media_type`, without annotations.
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Self::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }

    /// A descriptor without annotations.
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest,
            size,
            annotations: BTreeMap::new(),
        }
    }
}

/// An image manifest: one config and an ordered list of layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// [`MEDIA_MANIFEST`]; optional in the spec but written so tools need not guess.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// The image config blob.
    pub config: Descriptor,
    /// The layer blobs, base first.
    pub layers: Vec<Descriptor>,
    /// Annotations such as `org.opencontainers.image.created`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// A manifest of `config` and `layers`, without annotations.
    pub fn new(config: Descriptor, layers: Vec<Descriptor>) -> Self {
        Self {
            schema_version: 2,
            media_type: MEDIA_MANIFEST.to_owned(),
            config,
            layers,
            annotations: BTreeMap::new(),
        }
    }

    /// The canonical JSON bytes, whose sha256 is the image digest.
    pub fn to_json(&self) -> Vec<u8> {
        to_canonical_json(self)
    }
}

/// An image index: a list of manifests (an image layout's `index.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// [`MEDIA_INDEX`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
    /// Annotations of the index itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Index {
    /// An index of `manifests`.
    pub fn new(manifests: Vec<Descriptor>) -> Self {
        Self {
            schema_version: 2,
            media_type: MEDIA_INDEX.to_owned(),
            manifests,
            annotations: BTreeMap::new(),
        }
    }

    /// The canonical JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_canonical_json(self)
    }
}

/// The image config: platform, run settings and the layers' uncompressed digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// RFC 3339 creation time; kiln writes the source date epoch here, or nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// CPU architecture in Go's naming (`amd64`, `arm64`).
    pub architecture: String,
    /// Operating system in Go's naming (`linux`).
    pub os: String,
    /// How to run the image.
    #[serde(default, skip_serializing_if = "RunSettings::is_empty")]
    pub config: RunSettings,
    /// The layers' DiffIDs.
    pub rootfs: RootFs,
    /// One entry per build step, base first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

impl ImageConfig {
    /// The canonical JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        to_canonical_json(self)
    }
}

/// The `config` object of an image config: how a container of the image is started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunSettings {
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Ports as `8080/tcp`; the values are empty objects, as the spec requires.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, Empty>,
    /// `NAME=value` pairs, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// The program and its leading arguments. `None` (left out) differs from `Some([])`
    /// (written as `[]`, clearing a base image's entrypoint) for runtimes, so both are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments; `None` and `Some([])` differ as for `entrypoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Working directory of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Image labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Signal that asks the process to stop (`SIGTERM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

impl RunSettings {
    /// True when nothing is set, so the whole object can be left out.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// `Env` (`K=V` strings) as a map; an entry without `=` is left out.
    pub fn env_map(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect()
    }
}

/// The empty JSON object `{}`, used as the value of `ExposedPorts` entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// The `rootfs` object of an image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The sha256 of each layer's uncompressed tar, base first.
    pub diff_ids: Vec<Digest>,
}

impl RootFs {
    /// A `layers` rootfs of these DiffIDs.
    pub fn layers(diff_ids: Vec<Digest>) -> Self {
        Self {
            kind: "layers".to_owned(),
            diff_ids,
        }
    }
}

/// One entry of an image config's history (the spec spells these fields in snake_case).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// RFC 3339 time the step ran (kiln writes the source date epoch, or nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// What the step was, e.g. `kiln: file build/web → /app/web`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Free-form comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// True when the step produced no layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use super::*;

    fn sample() -> (ImageConfig, Manifest) {
        let diff = Digest::of(b"layer tar");
        let config = ImageConfig {
            created: Some("1970-01-01T00:00:00Z".into()),
            architecture: "amd64".into(),
            os: "linux".into(),
            config: RunSettings {
                user: Some("app".into()),
                exposed_ports: BTreeMap::from([("8080/tcp".into(), Empty {})]),
                env: vec!["PATH=/usr/bin".into()],
                entrypoint: Some(vec!["/app/web".into()]),
                cmd: Some(vec!["--port=8080".into()]),
                working_dir: Some("/app".into()),
                labels: BTreeMap::from([
                    ("team".into(), "storefront".into()),
                    ("a".into(), "1".into()),
                ]),
                stop_signal: None,
            },
            rootfs: RootFs::layers(vec![diff]),
            history: vec![History {
                created_by: Some("kiln: file".into()),
                ..History::default()
            }],
        };
        let config_desc = Descriptor::of(MEDIA_CONFIG, &config.to_json());
        let layer = Descriptor::new(MEDIA_LAYER_TAR_GZIP, Digest::of(b"gz"), 2);
        (config, Manifest::new(config_desc, vec![layer]))
    }

    #[test]
    fn config_json_uses_spec_names_and_is_stable() {
        let (config, _) = sample();
        let json = String::from_utf8(config.to_json()).unwrap();
        let expected = concat!(
            r#"{"created":"1970-01-01T00:00:00Z","architecture":"amd64","os":"linux","#,
            r#""config":{"User":"app","ExposedPorts":{"8080/tcp":{}},"Env":["PATH=/usr/bin"],"#,
            r#""Entrypoint":["/app/web"],"Cmd":["--port=8080"],"WorkingDir":"/app","#,
            r#""Labels":{"a":"1","team":"storefront"}},"#,
            r#""rootfs":{"type":"layers","diff_ids":["sha256:"#
        );
        assert!(json.starts_with(expected), "{json}");
        assert!(
            json.ends_with(r#""history":[{"created_by":"kiln: file"}]}"#),
            "{json}"
        );
        // Same value, same bytes; and the bytes read back to the same value.
        assert_eq!(config.to_json(), sample().0.to_json());
        let back: ImageConfig = serde_json::from_slice(&config.to_json()).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn manifest_json_uses_spec_names_and_leaves_out_empty_fields() {
        let (_, manifest) = sample();
        let json = String::from_utf8(manifest.to_json()).unwrap();
        assert!(
            json.starts_with(
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:"#
            ),
            "{json}"
        );
        let layers = format!(
            r#""layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":2}}]}}"#,
            Digest::of(b"gz")
        );
        assert!(json.ends_with(&layers), "{json}");
        assert!(
            !json.contains("annotations"),
            "empty annotations are left out: {json}"
        );
        let back: Manifest = serde_json::from_slice(manifest.to_json().as_slice()).unwrap();
        assert_eq!(back, manifest);
    }

    #[test]
    fn empty_run_settings_and_history_are_left_out() {
        let config = ImageConfig {
            created: None,
            architecture: "arm64".into(),
            os: "linux".into(),
            config: RunSettings::default(),
            rootfs: RootFs::layers(vec![]),
            history: vec![],
        };
        assert_eq!(
            String::from_utf8(config.to_json()).unwrap(),
            r#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
        );
    }

    #[test]
    fn index_json_carries_ref_names() {
        let mut d = Descriptor::new(MEDIA_MANIFEST, Digest::of(b"m"), 1);
        d.annotations
            .insert(ANNOTATION_REF_NAME.into(), "web".into());
        let json = String::from_utf8(Index::new(vec![d]).to_json()).unwrap();
        assert!(json.starts_with(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json""#
        ));
        assert!(
            json.ends_with(
                r#""size":1,"annotations":{"org.opencontainers.image.ref.name":"web"}}]}"#
            )
        );
    }
}
