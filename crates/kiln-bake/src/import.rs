//! Importing an image from an OCI image layout (`base = "oci:PATH[:TAG]"`).
//!
//! The layers are copied into the store exactly as they are, compressed or not, each verified
//! against its digest while it is copied, so the imported image keeps its identity and a base
//! that was tampered with is refused.

use std::fs::{self, File};
use std::path::Path;

use kiln_core::Digest;

use crate::oci::{self, Descriptor, ImageConfig, Manifest};
use crate::store::{LayerRecord, Store};

/// An image read from an OCI layout.
pub(crate) struct Imported {
    pub(crate) manifest: Digest,
    pub(crate) layers: Vec<LayerRecord>,
    pub(crate) run: oci::RunSettings,
    /// Bytes copied into the store (0 when every blob was there already).
    pub(crate) copied: u64,
}

/// Reads the image tagged `tag` (or the only image) of the layout at `layout` into `store`.
pub(crate) fn import_oci(
    store: &Store,
    layout: &Path,
    tag: Option<&str>,
) -> Result<Imported, crate::Error> {
    let read_json = |path: &Path| -> Result<serde_json::Value, crate::Error> {
        let bytes = fs::read(path).map_err(crate::Error::io("read", path))?;
        serde_json::from_slice(&bytes).map_err(|e| crate::Error::Json {
            what: path.display().to_string(),
            source: e,
        })
    };
    let index_path = layout.join("index.json");
    let index: oci::Index =
        serde_json::from_value(read_json(&index_path)?).map_err(|e| crate::Error::Json {
            what: index_path.display().to_string(),
            source: e,
        })?;
    let tag_of = |d: &Descriptor| d.annotations.get(oci::ANNOTATION_REF_NAME).cloned();
    let chosen = match tag {
        Some(t) => index
            .manifests
            .iter()
            .find(|d| tag_of(d).as_deref() == Some(t)),
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => None,
    };
    let Some(desc) = chosen else {
        let tags: Vec<String> = index.manifests.iter().filter_map(tag_of).collect();
        return Err(crate::Error::BadArchive {
            detail: match tag {
                Some(t) => format!(
                    "{} has no image tagged `{t}` (tags: {})",
                    layout.display(),
                    tags.join(", ")
                ),
                None => format!(
                    "{} holds {} images; name one with oci:PATH:TAG (tags: {})",
                    layout.display(),
                    index.manifests.len(),
                    tags.join(", ")
                ),
            },
        });
    };
    let mut copied = 0;
    let mut copy = |d: &Descriptor| -> Result<(), crate::Error> {
        if store.has_blob(&d.digest) {
            return Ok(());
        }
        let src = layout.join("blobs/sha256").join(d.digest.hex());
        let mut file = File::open(&src).map_err(crate::Error::io("read", &src))?;
        let mut writer = store.blob_writer()?;
        std::io::copy(&mut file, &mut writer).map_err(crate::Error::io("copy", &src))?;
        let (digest, size) = writer.commit()?;
        if digest != d.digest {
            return Err(crate::Error::CorruptBlob {
                digest: d.digest.clone(),
                found: digest,
            });
        }
        copied += size;
        Ok(())
    };
    copy(desc)?;
    let manifest: Manifest = store.read_blob_json(&desc.digest)?;
    copy(&manifest.config)?;
    let config: ImageConfig = store.read_blob_json(&manifest.config.digest)?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(crate::Error::BadArchive {
            detail: format!(
                "image {} lists {} layers but its config {} diff_ids",
                desc.digest,
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        });
    }
    let mut layers = Vec::new();
    for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        copy(layer)?;
        layers.push(LayerRecord {
            digest: layer.digest.clone(),
            diff_id: diff_id.clone(),
            size: layer.size,
            media_type: layer.media_type.clone(),
        });
    }
    Ok(Imported {
        manifest: desc.digest.clone(),
        layers,
        run: config.config,
        copied,
    })
}
