//! Exporting an image as an OCI archive, or as one `docker load` also accepts.
//!
//! Both are a tar of an OCI image layout holding just this image. The Docker flavour adds the
//! classic root `manifest.json` (`[{Config, RepoTags, Layers}]`) pointing into `blobs/sha256/`,
//! as Docker 25's `docker save` does, so older Docker (20.10) and `skopeo docker-archive:` read it
//! too. The archive is deterministic: sorted entries, mtime 0, owner 0:0.

use std::collections::BTreeSet;
use std::io::{BufWriter, Write};
use std::path::Path;

use kiln_core::Digest;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::layer::LayerWriter;
use crate::oci::{
    self, ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, Descriptor, Index, MEDIA_MANIFEST,
    Manifest,
};
use crate::record::ImageRecord;
use crate::store::{HashingReader, IO_BUF, Store};

/// The flavour of archive [`export`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// An OCI image layout (`skopeo … oci-archive:FILE`, `ctr images import`).
    Oci,
    /// An OCI image layout plus Docker's `manifest.json` (`docker load`).
    Docker,
}

/// One image of Docker's `manifest.json`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// Writes `rec` as an archive of `format` to `out`, tagged `repo_tag` (`repo:tag`; `repo` alone
/// means `repo:latest`). Every blob is checked against its digest while it is copied; on
/// [`Error::CorruptBlob`] what was written to `out` must be discarded.
pub fn export(
    store: &Store,
    rec: &ImageRecord,
    format: ExportFormat,
    repo_tag: &str,
    out: impl Write,
) -> Result<()> {
    let (full_name, tag) = split_repo_tag(repo_tag)?;
    // The manifest, not the record, is what consumers read: export what it names.
    let manifest_bytes = store.read_blob(&rec.digest)?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|source| Error::Json {
            what: format!("manifest {}", rec.digest),
            source,
        })?;
    let mut blobs = BTreeSet::from([rec.digest.clone(), manifest.config.digest.clone()]);
    blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));

    let mut desc = Descriptor::new(
        MEDIA_MANIFEST,
        rec.digest.clone(),
        manifest_bytes.len() as u64,
    );
    desc.annotations.insert(ANNOTATION_REF_NAME.to_owned(), tag);
    desc.annotations
        .insert(ANNOTATION_CONTAINERD_NAME.to_owned(), full_name.clone());
    let index = Index::new(vec![desc]).to_json();

    let mut w = LayerWriter::new(BufWriter::with_capacity(IO_BUF, out), 0);
    // Names in sorted order: blobs/…, index.json, manifest.json, oci-layout.
    w.append_dir("blobs", 0o755, 0, 0)?;
    w.append_dir("blobs/sha256", 0o755, 0, 0)?;
    for d in &blobs {
        copy_blob(store, &mut w, d)?;
    }
    append_bytes(&mut w, "index.json", &index)?;
    if format == ExportFormat::Docker {
        let docker = [DockerManifest {
            config: blob_name(&manifest.config.digest),
            repo_tags: vec![full_name],
            layers: manifest
                .layers
                .iter()
                .map(|l| blob_name(&l.digest))
                .collect(),
        }];
        append_bytes(&mut w, "manifest.json", &oci::to_canonical_json(&docker))?;
    }
    append_bytes(&mut w, "oci-layout", oci::OCI_LAYOUT)?;
    w.finish()?
        .into_inner()
        .map_err(|e| Error::io("write", Path::new("<export archive>"))(e.into_error()))?
        .flush()
        .map_err(Error::io("write", Path::new("<export archive>")))
}

fn blob_name(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

fn append_bytes<W: Write>(w: &mut LayerWriter<W>, name: &str, bytes: &[u8]) -> Result<()> {
    w.append_file(name, 0o644, 0, 0, bytes.len() as u64, bytes)
}

fn copy_blob<W: Write>(store: &Store, w: &mut LayerWriter<W>, d: &Digest) -> Result<()> {
    let path = store.blob_path(d);
    let file = store.open_blob(d)?;
    let size = file.metadata().map_err(Error::io("inspect", &path))?.len();
    let mut reader = HashingReader::new(file);
    w.put_file(
        Path::new(&blob_name(d)),
        0o644,
        (0, 0),
        0,
        size,
        &mut reader,
        &path,
    )?;
    let found = reader.finish().map_err(Error::io("read blob", &path))?;
    if &found != d {
        return Err(Error::CorruptBlob {
            digest: d.clone(),
            found,
        });
    }
    Ok(())
}

/// Splits `repo[:tag]` into the full `repo:tag` and the tag.
fn split_repo_tag(repo_tag: &str) -> Result<(String, String)> {
    let invalid = |reason| Error::InvalidTag {
        name: repo_tag.to_owned(),
        reason,
    };
    if repo_tag.contains('@') {
        return Err(invalid("digests cannot be tags; expected `repo:tag`"));
    }
    if repo_tag
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid("it contains whitespace; expected `repo:tag`"));
    }
    let last_slash = repo_tag.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match repo_tag[last_slash..].rfind(':') {
        Some(i) => (&repo_tag[..last_slash + i], &repo_tag[last_slash + i + 1..]),
        None => (repo_tag, "latest"),
    };
    if repo.is_empty() || repo.ends_with('/') {
        return Err(invalid("the repository part is empty; expected `repo:tag`"));
    }
    if tag.is_empty() {
        return Err(invalid("the tag after `:` is empty; expected `repo:tag`"));
    }
    Ok((format!("{repo}:{tag}"), tag.to_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use std::fs;
    use std::process::Command;

    use super::*;
    use crate::layer::Compression;
    use crate::layer::tests::entries;
    use crate::store::test_support;

    fn tiny_image() -> (tempfile::TempDir, Store, ImageRecord) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let layer = test_support::layer(&store, &[("hello", b"hello, world\n")], Compression::Gzip);
        let rec = test_support::image(&store, "web", "2026-01-01T00:00:00Z", vec![layer]);
        store.put_image(&rec).unwrap();
        (dir, store, rec)
    }

    fn export_to_vec(store: &Store, rec: &ImageRecord, format: ExportFormat, tag: &str) -> Vec<u8> {
        let mut out = Vec::new();
        export(store, rec, format, tag, &mut out).unwrap();
        out
    }

    #[test]
    fn archives_are_deterministic_and_sorted() {
        let (_dir, store, rec) = tiny_image();
        let oci = export_to_vec(&store, &rec, ExportFormat::Oci, "kiln/web:1.0");
        assert!(oci == export_to_vec(&store, &rec, ExportFormat::Oci, "kiln/web:1.0"));
        let docker = export_to_vec(&store, &rec, ExportFormat::Docker, "kiln/web:1.0");
        let seen = entries(&docker);
        let mut blobs = vec![
            format!("blobs/sha256/{}", rec.digest.hex()),
            format!("blobs/sha256/{}", rec.config_digest.hex()),
            format!("blobs/sha256/{}", rec.layers[0].digest.hex()),
        ];
        blobs.sort();
        let mut expected = vec!["blobs/".to_owned(), "blobs/sha256/".to_owned()];
        expected.extend(blobs);
        expected.extend(["index.json", "manifest.json", "oci-layout"].map(String::from));
        assert_eq!(
            seen.iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
            expected
        );
        assert!(seen.iter().all(|e| e.mtime == 0 && e.owner == (0, 0)));

        let index: Index = serde_json::from_slice(&seen[5].data).unwrap();
        assert_eq!(index.manifests.len(), 1);
        assert_eq!(index.manifests[0].digest, rec.digest);
        assert_eq!(index.manifests[0].annotations[ANNOTATION_REF_NAME], "1.0");
        assert_eq!(
            index.manifests[0].annotations[ANNOTATION_CONTAINERD_NAME],
            "kiln/web:1.0"
        );
        let docker_manifest = String::from_utf8(seen[6].data.clone()).unwrap();
        assert_eq!(
            docker_manifest,
            format!(
                r#"[{{"Config":"blobs/sha256/{}","RepoTags":["kiln/web:1.0"],"Layers":["blobs/sha256/{}"]}}]"#,
                rec.config_digest.hex(),
                rec.layers[0].digest.hex()
            )
        );
        assert!(!entries(&oci).iter().any(|e| e.path == "manifest.json"));
    }

    #[test]
    fn a_corrupt_blob_stops_the_export() {
        let (_dir, store, rec) = tiny_image();
        let path = store.blob_path(&rec.layers[0].digest);
        let mut bytes = fs::read(&path).unwrap();
        bytes[10] ^= 1;
        fs::write(&path, bytes).unwrap();
        let err = export(&store, &rec, ExportFormat::Oci, "web", Vec::new()).unwrap_err();
        assert!(
            matches!(err, Error::CorruptBlob { ref digest, .. } if digest == &rec.layers[0].digest),
            "{err}"
        );
    }

    #[test]
    fn repo_tags_are_split_and_checked() {
        assert_eq!(
            split_repo_tag("web").unwrap(),
            ("web:latest".into(), "latest".into())
        );
        assert_eq!(
            split_repo_tag("kiln/web:1.0").unwrap(),
            ("kiln/web:1.0".into(), "1.0".into())
        );
        assert_eq!(
            split_repo_tag("localhost:5000/web").unwrap(),
            ("localhost:5000/web:latest".into(), "latest".into())
        );
        for bad in ["", "web:", "web@sha256:abc", "we b:1", ":1"] {
            assert!(
                matches!(split_repo_tag(bad), Err(Error::InvalidTag { .. })),
                "{bad:?}"
            );
        }
    }

    /// `skopeo inspect` output for `transport:file`, or `None` when skopeo is not installed.
    fn skopeo_inspect(transport: &str, file: &Path) -> Option<serde_json::Value> {
        let output = match Command::new("skopeo")
            .args(["inspect", &format!("{transport}:{}", file.display())])
            .output()
        {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("cannot run skopeo: {e}"),
        };
        assert!(
            output.status.success(),
            "skopeo inspect {transport} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Some(serde_json::from_slice(&output.stdout).unwrap())
    }

    #[test]
    fn skopeo_reads_both_formats() {
        let (dir, store, rec) = tiny_image();
        let oci_file = dir.path().join("web.oci.tar");
        let docker_file = dir.path().join("web.docker.tar");
        export(
            &store,
            &rec,
            ExportFormat::Oci,
            "kiln/web:1.0",
            fs::File::create(&oci_file).unwrap(),
        )
        .unwrap();
        export(
            &store,
            &rec,
            ExportFormat::Docker,
            "kiln/web:1.0",
            fs::File::create(&docker_file).unwrap(),
        )
        .unwrap();

        let Some(oci) = skopeo_inspect("oci-archive", &oci_file) else {
            #[allow(clippy::print_stdout, reason = "the notice is the point")]
            {
                println!("skipping: skopeo is not installed");
            }
            return;
        };
        assert_eq!(oci["Digest"], rec.digest.to_string(), "{oci}");
        assert_eq!(
            oci["Layers"],
            serde_json::json!([rec.layers[0].digest.to_string()]),
            "{oci}"
        );
        assert_eq!(oci["Os"], "linux");
        assert_eq!(oci["Architecture"], "amd64");

        // docker-archive names layers by DiffID (it serves them uncompressed).
        let docker = skopeo_inspect("docker-archive", &docker_file).unwrap();
        assert_eq!(
            docker["Layers"],
            serde_json::json!([rec.layers[0].diff_id.to_string()]),
            "{docker}"
        );
        assert_eq!(docker["Os"], "linux");
        // The Docker flavour is still a valid OCI archive.
        let both = skopeo_inspect("oci-archive", &docker_file).unwrap();
        assert_eq!(both["Digest"], rec.digest.to_string());

        // The store itself is an OCI layout that skopeo reads by tag.
        let status = Command::new("skopeo")
            .args(["inspect", &format!("oci:{}:web", store.root().display())])
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let from_store: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(from_store["Digest"], rec.digest.to_string());

        // A copy reads every layer and checks it against its digest (DiffID for docker-archive).
        for (transport, file) in [("oci-archive", &oci_file), ("docker-archive", &docker_file)] {
            let out = dir.path().join(format!("copy-{transport}"));
            let status = Command::new("skopeo")
                .args([
                    "copy",
                    "--quiet",
                    &format!("{transport}:{}", file.display()),
                ])
                .arg(format!("dir:{}", out.display()))
                .status()
                .unwrap();
            assert!(status.success(), "skopeo copy from {transport}");
        }
    }
}
