//! `kiln images ls | inspect | verify | export | rm | gc`.

use std::collections::BTreeSet;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kiln_bake::ExportFormat;
use serde::Serialize;

use crate::project::GlobalArgs;
use crate::ui;

/// Image subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List the images in the store.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's record, manifest and config as JSON.
    Inspect {
        /// Name, `sha256:…` digest, or a unique digest prefix.
        image: String,
    },
    /// Re-hash every blob of an image; with `--rebuild`, also re-bake it in a scratch store and
    /// compare digests.
    Verify {
        /// Name, `sha256:…` digest, or a unique digest prefix.
        image: String,
        /// Re-bake from the config in a fresh store and check the digest is the same.
        #[arg(long)]
        rebuild: bool,
    },
    /// Write an image as an OCI archive or a `docker load`-able tar.
    Export {
        /// Name, `sha256:…` digest, or a unique digest prefix.
        image: String,
        /// `oci` (an OCI image layout) or `docker` (the same plus `manifest.json`).
        #[arg(long, value_enum, default_value = "oci")]
        format: Format,
        /// The file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// The repository:tag recorded in the archive (default `PROJECT/NAME:DIGEST12`).
        #[arg(long)]
        tag: Option<String>,
    },
    /// Remove an image's record and tag (its blobs go at the next `gc`).
    Rm {
        /// Name, `sha256:…` digest, or a unique digest prefix.
        image: String,
    },
    /// Revoke an image: deploys and rollbacks to it, and to every image built on it, are
    /// refused from `--at` on.
    Revoke {
        /// Name, `sha256:…` digest, or a unique digest prefix.
        image: String,
        /// Why (shown wherever the revocation refuses something).
        #[arg(long)]
        reason: String,
        /// From when (RFC 3339, e.g. 2026-12-01T00:00:00Z); default now.
        #[arg(long)]
        at: Option<String>,
    },
    /// Delete untagged images and every blob no image uses.
    Gc {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Archive formats for `export`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// OCI image layout in a tar.
    Oci,
    /// OCI image layout plus Docker's `manifest.json`.
    Docker,
}

#[derive(Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    record: &'a kiln_bake::ImageRecord,
    tagged: bool,
    /// The revocation in effect for it (its own or an ancestor's).
    revoked: Option<kiln_bake::revoke::Revoked>,
}

/// Runs an image subcommand.
pub fn run(global: &GlobalArgs, command: Command) -> Result<ExitCode> {
    let store = global.open_store()?;
    match command {
        Command::Ls { json } => {
            let tags = store.tagged()?;
            let images = store.images()?;
            let now = kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock);
            let listed: Vec<Listed<'_>> = images
                .iter()
                .map(|r| {
                    Ok(Listed {
                        tagged: tags.get(&r.name) == Some(&r.digest),
                        revoked: store.revoked(r, now)?,
                        record: r,
                    })
                })
                .collect::<Result<_>>()?;
            if json {
                ui::out_json(&listed)?;
            } else {
                ui::out(format!(
                    "{:<20} {:<19} {:>9}  {:<20}  {:<6}  {}",
                    "NAME", "DIGEST", "SIZE", "BUILT", "TAG", "REVOKED"
                ));
                for l in &listed {
                    let revoked = match &l.revoked {
                        None => String::new(),
                        Some(r) if r.inherited => format!("yes, via {}", r.revocation.name),
                        Some(r) => format!("yes: {}", r.revocation.reason),
                    };
                    ui::out(
                        format!(
                            "{:<20} sha256:{} {:>9}  {:<20}  {:<6}  {}",
                            l.record.name,
                            l.record.digest.short(),
                            ui::size(l.record.size),
                            l.record.built_at,
                            if l.tagged { "latest" } else { "" },
                            revoked
                        )
                        .trim_end()
                        .to_owned(),
                    );
                }
            }
        }
        Command::Inspect { image } => {
            let record = store.resolve(&image)?;
            let manifest: serde_json::Value =
                serde_json::from_slice(&store.read_blob(&record.digest)?)?;
            let config: serde_json::Value =
                serde_json::from_slice(&store.read_blob(&record.config_digest)?)?;
            let now = kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock);
            ui::out_json(&serde_json::json!({
                "record": record,
                "revoked": store.revoked(&record, now)?,
                "manifest": manifest,
                "config": config,
            }))?;
        }
        Command::Verify { image, rebuild } => return verify(global, &store, &image, rebuild),
        Command::Revoke { image, reason, at } => {
            let record = store.resolve(&image)?;
            let now = kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock);
            let at = at.unwrap_or_else(|| humantime::format_rfc3339_seconds(now).to_string());
            let r = store.revoke(&record, &reason, &at, &kiln_engine::actor(), now)?;
            let db = crate::cmd::deploy::open_state(&crate::cmd::deploy::paths(global))?;
            crate::cmd::audit::record(
                &db,
                "revoke",
                &format!("image.{}", r.name),
                serde_json::to_value(&r)?,
            )?;
            ui::out(format!(
                "revoked {} (sha256:{}) from {}: {}; deploys and rollbacks to it and to every image built on it are refused",
                r.name,
                r.digest.short(),
                r.at,
                r.reason
            ));
        }
        Command::Export {
            image,
            format,
            output,
            tag,
        } => {
            let record = store.resolve(&image)?;
            let tag = tag.unwrap_or_else(|| default_tag(global, &record));
            let format = match format {
                Format::Oci => ExportFormat::Oci,
                Format::Docker => ExportFormat::Docker,
            };
            // Written beside the target and renamed, so a failed export leaves no partial file.
            let dir = match output.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            let tmp = tempfile::NamedTempFile::new_in(&dir)
                .with_context(|| format!("cannot write in {}", dir.display()))?;
            let mut w = BufWriter::new(tmp.as_file());
            kiln_bake::export(&store, &record, format, &tag, &mut w)?;
            w.flush()?;
            drop(w);
            tmp.persist(&output)
                .with_context(|| format!("cannot write {}", output.display()))?;
            ui::out(format!(
                "{} {} → {} ({tag})",
                record.name,
                record.digest,
                output.display()
            ));
        }
        Command::Rm { image } => {
            let record = store.resolve(&image)?;
            if let Some((service, release)) = release_images(global)?.get(&record.digest) {
                bail!(
                    "image {} {} is release v{release} of service `{service}`; it stays while the state keeps that release",
                    record.name,
                    record.digest
                );
            }
            let _lock = store.lock()?;
            let record = store.remove_image(&image)?;
            ui::out(format!("removed {} {}", record.name, record.digest));
        }
        Command::Gc { json } => {
            // Every image a release points at stays: rollbacks launch from it.
            let keep: BTreeSet<_> = release_images(global)?.into_keys().collect();
            let _lock = store.lock()?;
            let report = store.gc(&keep)?;
            if json {
                ui::out_json(&report)?;
            } else {
                ui::out(format!(
                    "removed {} image{}, {} blob{}, freed {}",
                    report.images_removed.len(),
                    if report.images_removed.len() == 1 {
                        ""
                    } else {
                        "s"
                    },
                    report.blobs_removed,
                    if report.blobs_removed == 1 { "" } else { "s" },
                    ui::size(report.bytes_freed)
                ));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The image of every release in the project's state: digest → (service, release number).
fn release_images(
    global: &GlobalArgs,
) -> Result<std::collections::BTreeMap<kiln_core::Digest, (String, u32)>> {
    let paths = super::deploy::paths(global);
    let mut images = std::collections::BTreeMap::new();
    if !paths.state_db().exists() {
        return Ok(images);
    }
    let now = kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock);
    let db = kiln_state::StateStore::open(&paths.state_db(), now)?;
    let state = db.read::<kiln_core::state::State>()?.doc;
    for (name, service) in state.services {
        for r in service.releases {
            images.insert(r.image_digest, (name.clone(), r.number));
        }
    }
    Ok(images)
}

fn default_tag(global: &GlobalArgs, record: &kiln_bake::ImageRecord) -> String {
    let project = global
        .load()
        .map(|p| p.config.project)
        .unwrap_or_else(|_| "kiln".to_owned());
    format!(
        "{}/{}:{}",
        project.to_lowercase(),
        record.name.to_lowercase(),
        record.digest.short()
    )
}

fn verify(
    global: &GlobalArgs,
    store: &kiln_bake::Store,
    image: &str,
    rebuild: bool,
) -> Result<ExitCode> {
    let record = store.resolve(image)?;
    let problems = store.verify(&record)?;
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{} {}: {p}", record.name, record.digest);
        }
        bail!(
            "image {} {} is corrupt: {} bad blob{}; re-bake it (`kiln bake {}`) after `kiln images rm` and `kiln images gc`",
            record.name,
            record.digest,
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            record.name
        );
    }
    ui::out(format!(
        "{} {}: {} blobs verified",
        record.name,
        record.digest,
        record.layers.len() + 2
    ));
    if rebuild {
        let project = global.load()?;
        if !project.config.images.contains_key(&record.name) {
            bail!(
                "cannot rebuild `{}`: the config has no image of that name",
                record.name
            );
        }
        let scratch = tempfile::tempdir().context("cannot create a scratch store")?;
        let scratch_store = kiln_bake::Store::open(scratch.path())?;
        let rebuilt = super::bake::bake(
            &scratch_store,
            &project.config,
            &project.dir,
            std::slice::from_ref(&record.name),
            true,
        )?;
        let digest = rebuilt
            .iter()
            .find(|r| r.name == record.name)
            .map(|r| r.digest.clone())
            .context("the rebuild produced no image")?;
        if digest != record.digest {
            bail!(
                "rebuild of `{}` is not reproducible: the store has {} but a fresh bake gives {}",
                record.name,
                record.digest,
                digest
            );
        }
        ui::out(format!(
            "{} {}: rebuilt in a fresh store, same digest",
            record.name, digest
        ));
    }
    Ok(ExitCode::SUCCESS)
}
