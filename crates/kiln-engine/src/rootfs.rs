//! Read-only root filesystems for instances, unpacked from the image store.
//!
//! Each image digest is unpacked once into `rootfs/<hex>`: first into a temporary directory
//! beside it (every layer's digest verified while it is read), then renamed into place, so a
//! directory under its final name is always complete. Instances of the same image share it,
//! mounted read-only.

use std::path::PathBuf;

use kiln_bake::{ImageRecord, Store};
use kiln_core::Digest;

use crate::paths::Paths;

/// The unpacked root of `image`, creating it if needed.
pub fn materialize(paths: &Paths, store: &Store, image: &Digest) -> Result<PathBuf, crate::Error> {
    let dir = paths.rootfs().join(image.hex());
    if dir.is_dir() {
        return Ok(dir);
    }
    let record: ImageRecord = store
        .image(image)?
        .ok_or_else(|| crate::Error::ImageMissing(image.clone()))?;
    let problems = store.verify(&record)?;
    if let Some(p) = problems.first() {
        return Err(crate::Error::ImageCorrupt {
            image: image.clone(),
            problem: p.to_string(),
        });
    }
    std::fs::create_dir_all(paths.rootfs()).map_err(crate::Error::io("create", paths.rootfs()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpacking-")
        .tempdir_in(paths.rootfs())
        .map_err(crate::Error::io("create a directory in", paths.rootfs()))?;
    kiln_bake::apply_layers(store, &record.layers, tmp.path())?;
    let unpacked = tmp.keep();
    std::fs::rename(&unpacked, &dir).map_err(crate::Error::io("rename", &unpacked))?;
    Ok(dir)
}
