//! `kiln bake [IMAGE...]`: build images into the store and print their digests.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_bake::{BakeSettings, ImageRecord, Store};
use kiln_core::clock::SystemClock;
use kiln_core::model::Config;

use crate::project::{GlobalArgs, git_info};
use crate::ui::{self, BakeProgress};

/// `kiln bake` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to bake (default: all); the images they build on are baked too.
    images: Vec<String>,
    /// Print the baked images' records as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Bakes and prints `name digest` lines (or JSON).
pub fn run(global: &GlobalArgs, args: &Args) -> Result<ExitCode> {
    let project = global.load()?;
    let store = global.open_store()?;
    let records = bake(
        &store,
        &project.config,
        &project.dir,
        &args.images,
        args.json,
    )?;
    if args.json {
        ui::out_json(&records)?;
    } else {
        for r in records
            .iter()
            .filter(|r| args.images.is_empty() || args.images.contains(&r.name))
        {
            ui::out(format!("{} {}", r.name, r.digest));
        }
    }
    let on_aws = records.iter().filter(|r| {
        (args.images.is_empty() || args.images.contains(&r.name))
            && project
                .config
                .images
                .get(&r.name)
                .is_some_and(|i| i.target == kiln_core::model::TargetKind::Aws)
    });
    for record in on_aws {
        bake_ami(&project, &store, record)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The AMI of an image baked for `target.aws`.
#[cfg(feature = "aws")]
fn bake_ami(project: &crate::project::Project, store: &Store, record: &ImageRecord) -> Result<()> {
    eprintln!("making the AMI of {} ({})", record.name, record.digest);
    let ami = crate::aws::bake_ami(project, store, record)?;
    let how = if ami.reused {
        "reused: same inputs"
    } else {
        "new"
    };
    eprintln!("{} {} ({how})", record.name, ami.id);
    Ok(())
}

#[cfg(not(feature = "aws"))]
fn bake_ami(
    _project: &crate::project::Project,
    _store: &Store,
    record: &ImageRecord,
) -> Result<()> {
    Err(crate::without_aws(&format!(
        "image `{}` (target.aws)",
        record.name
    )))
}

/// The settings a bake takes from the environment: `SOURCE_DATE_EPOCH`, git, host, bubblewrap.
pub fn settings(dir: &Path) -> Result<BakeSettings> {
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) if !s.trim().is_empty() => s.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH=`{s}`: expected whole seconds since 1970")
        })?,
        _ => 0,
    };
    let bwrap = kiln_bake::sandbox::find_bwrap();
    Ok(BakeSettings {
        context_dir: dir.to_owned(),
        epoch,
        git: git_info(dir),
        kiln_version: env!("CARGO_PKG_VERSION").to_owned(),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        bwrap,
    })
}

/// Bakes `targets` into `store`, showing progress unless `quiet`.
pub fn bake(
    store: &Store,
    config: &Config,
    dir: &Path,
    targets: &[String],
    quiet: bool,
) -> Result<Vec<ImageRecord>> {
    let settings = settings(dir)?;
    let mut progress = BakeProgress::new(quiet);
    let result = kiln_bake::bake(store, config, targets, &settings, &SystemClock, &mut |e| {
        progress.event(&e);
    });
    if result.is_err() {
        progress.abandon();
    }
    Ok(result?)
}
