//! The bake: config images → OCI images in the store, one cached layer per step.
//!
//! Every step has a cache key over the chain id of everything below it, the step's definition
//! (which holds its environment) and the content hashes of its input files. A key found in the
//! store's step cache reuses that layer without doing any work; otherwise the step runs and its
//! layer and cache entry are written. A failing step writes nothing, so earlier steps stay
//! cached and the next bake resumes after the last good step. The image (config, manifest,
//! record, tag) is written only when every step succeeded.
//!
//! What goes into the digest is reproducible: layer tars are sorted with every mtime set to the
//! epoch (`SOURCE_DATE_EPOCH`, else 0) and owners normalised, and the image config's `created` is
//! the epoch too. What cannot be reproducible (build time, host, durations, git commit) is kept
//! in the image's record beside it, not inside the digest.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use kiln_core::Digest;
use kiln_core::clock::{Clock, elapsed_ms};
use kiln_core::diag::Loc;
use kiln_core::digest::digest_json;
use kiln_core::model::{Base, Config, FileStep, Image, RunConfig, Script, ShellStep, Step};
use serde::Serialize;

use crate::import;
use crate::inputs::{StatCache, tree_hash};
use crate::layer::{self, Compression, LayerBlobWriter, LayerWriter, Ownership, TreeOptions};
use crate::oci::{self, Descriptor, ImageConfig, Manifest};
use crate::sandbox;
use crate::store::{CacheEntry, GitInfo, ImageRecord, LayerRecord, StepRecord, Store};
use crate::unpack::{self, UnpackOptions};

/// Buffer between the tar writer and the blob file.
const WRITE_BUFFER: usize = 1 << 20;

/// How often a step's progress is reported.
const PROGRESS_EVERY: u64 = 8 << 20;

/// Counts the bytes of a layer on their way to the store.
pub struct Counting<'a> {
    inner: BufWriter<LayerBlobWriter>,
    written: u64,
    reported: u64,
    report: &'a mut dyn FnMut(u64),
}

impl std::fmt::Debug for Counting<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counting")
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl std::io::Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        if self.written - self.reported >= PROGRESS_EVERY {
            self.reported = self.written;
            (self.report)(self.written);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Everything about a bake that is not in the config.
#[derive(Debug, Clone)]
pub struct BakeSettings {
    /// The directory relative paths in the config are resolved against.
    pub context_dir: PathBuf,
    /// Seconds since 1970 that every timestamp inside an image is set to.
    pub epoch: u64,
    /// The config repository's commit, recorded beside each image.
    pub git: Option<GitInfo>,
    /// Recorded beside each image.
    pub kiln_version: String,
    /// Recorded beside each image.
    pub host: String,
    /// bubblewrap, needed by shell steps.
    pub bwrap: Option<PathBuf>,
}

/// Progress of a bake, for display.
#[derive(Debug)]
pub enum BakeEvent<'a> {
    /// An image's bake begins.
    ImageStarted {
        /// Image name.
        image: &'a str,
        /// How many steps it has (the base import counts as one when there is one).
        steps: usize,
    },
    /// A step begins.
    StepStarted {
        /// Image name.
        image: &'a str,
        /// 1-based step number.
        index: usize,
        /// Step description.
        name: &'a str,
    },
    /// A line of a shell step's output.
    Output {
        /// Image name.
        image: &'a str,
        /// The line.
        line: &'a str,
    },
    /// Bytes written so far by the running step (reported every few MiB).
    Progress {
        /// Image name.
        image: &'a str,
        /// Layer bytes written so far.
        bytes: u64,
    },
    /// A step ended well.
    StepFinished {
        /// Image name.
        image: &'a str,
        /// 1-based step number.
        index: usize,
        /// What was recorded.
        step: &'a StepRecord,
    },
    /// An image is in the store.
    ImageFinished {
        /// Its record.
        record: &'a ImageRecord,
        /// True when every step came from the cache and the image already existed.
        unchanged: bool,
    },
}

/// Why a bake failed. Nothing is tagged when a bake fails.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// A path in the config does not exist.
    #[error("{loc}: {what} `{path}` not found (looked for {})", resolved.display())]
    MissingInput {
        /// Where the path is written.
        loc: Loc,
        /// "provisioner source", "base directory"...
        what: &'static str,
        /// As written.
        path: String,
        /// As resolved.
        resolved: PathBuf,
    },
    /// A shell step with no sandbox available.
    #[error(
        "image `{image}` step {index} ({step}): shell provisioners need bubblewrap (`bwrap`), which was not found; install it (Debian/Ubuntu: `apt-get install bubblewrap`); kiln never runs provisioners on the host"
    )]
    NoSandbox {
        /// Image name.
        image: String,
        /// 1-based step number.
        index: usize,
        /// Step description.
        step: String,
    },
    /// A shell step in an image without a shell.
    #[error(
        "image `{image}` step {index} ({step}): the image has no /bin/sh to run the script with; start from a base that has a shell"
    )]
    NoShell {
        /// Image name.
        image: String,
        /// 1-based step number.
        index: usize,
        /// Step description.
        step: String,
    },
    /// A shell step exited non-zero.
    #[error("image `{image}` step {index} ({step}) failed with {}{}", exit_text(*.code), tail_text(.tail))]
    StepFailed {
        /// Image name.
        image: String,
        /// 1-based step number.
        index: usize,
        /// Step description.
        step: String,
        /// Exit code, if it exited.
        code: Option<i32>,
        /// Its last output lines.
        tail: Vec<String>,
    },
    /// The images to bake could not be ordered.
    #[error("{0}")]
    Order(String),
    /// Reading a base or input, or writing a layer, failed.
    #[error("image `{image}` step {index} ({step}): {source}")]
    Step {
        /// Image name.
        image: String,
        /// 1-based step number.
        index: usize,
        /// Step description.
        step: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::Error),
}

fn exit_text(code: Option<i32>) -> String {
    code.map_or_else(|| "a signal".to_owned(), |c| format!("exit code {c}"))
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        return String::new();
    }
    let mut s = String::from("; last output:");
    for line in tail {
        s.push_str("\n  | ");
        s.push_str(line);
    }
    s
}

/// Bakes `targets` (all images when empty) and every image they are built on, in dependency
/// order. Returns the records of every image baked, in that order.
pub fn bake(
    store: &Store,
    config: &Config,
    targets: &[String],
    settings: &BakeSettings,
    clock: &dyn Clock,
    observer: &mut dyn FnMut(BakeEvent<'_>),
) -> Result<Vec<ImageRecord>, BakeError> {
    let order = kiln_core::config::bake_order(config, targets).map_err(BakeError::Order)?;
    let _lock = store.lock()?;
    let mut baker = Baker {
        store,
        settings,
        clock,
        stat: StatCache::load(store.root().join("kiln").join("statcache.json")),
        observer,
    };
    let mut done: BTreeMap<String, ImageRecord> = BTreeMap::new();
    let mut records = Vec::new();
    let result = (|| {
        for name in &order {
            let image = &config.images[name];
            let record = baker.bake_image(image, &done)?;
            done.insert(name.clone(), record.clone());
            records.push(record);
        }
        Ok(())
    })();
    // The stat cache is only a cache: failing to save it must not fail the bake.
    if let Err(e) = baker.stat.save(clock.now()) {
        tracing::warn!("could not save the input hash cache: {e}");
    }
    result.map(|()| records)
}

struct Baker<'a, 'o> {
    store: &'a Store,
    settings: &'a BakeSettings,
    clock: &'a dyn Clock,
    stat: StatCache,
    observer: &'o mut dyn FnMut(BakeEvent<'_>),
}

/// An image being built: its layers so far and, once a shell step needs it, a root filesystem
/// holding the first `applied` of them.
struct Build {
    chain: Digest,
    layers: Vec<LayerRecord>,
    steps: Vec<StepRecord>,
    keys: Vec<Digest>,
    run: oci::RunSettings,
    rootfs: Option<tempfile::TempDir>,
    applied: usize,
}

/// What a cache key hashes.
#[derive(Serialize)]
struct KeyInput<'a, T: Serialize> {
    chain: &'a Digest,
    step: T,
    inputs: Option<&'a Digest>,
}

/// The result of running a step that was not cached.
struct Produced {
    layer: LayerRecord,
    files: u64,
    bytes: u64,
    /// The build's root filesystem already holds this layer (a shell step ran in it).
    in_rootfs: bool,
}

impl Baker<'_, '_> {
    fn emit(&mut self, event: BakeEvent<'_>) {
        (self.observer)(event);
    }

    fn bake_image(
        &mut self,
        image: &Image,
        done: &BTreeMap<String, ImageRecord>,
    ) -> Result<ImageRecord, BakeError> {
        let started = self.clock.now();
        let base_step = !matches!(image.base, Base::Scratch | Base::Image { .. });
        let total = image.provisioners.len() + usize::from(base_step);
        self.emit(BakeEvent::ImageStarted {
            image: &image.name,
            steps: total,
        });

        let (mut build, mut parent) = match &image.base {
            Base::Image { name } => {
                let base = &done[name];
                let config: ImageConfig = serde_json::from_slice(
                    &self.store.read_blob(&base.config_digest)?,
                )
                .map_err(|e| crate::Error::Json {
                    what: format!("config of image `{name}`"),
                    source: e,
                })?;
                let build = Build::new(
                    digest_json(&("image", &base.digest)),
                    base.layers.clone(),
                    config.config,
                );
                (build, Some(base.digest.clone()))
            }
            _ => (
                Build::new(
                    digest_json(&"scratch"),
                    Vec::new(),
                    oci::RunSettings::default(),
                ),
                None,
            ),
        };

        let mut index = 0;
        if base_step {
            index += 1;
            if let Some(p) = self.base_step(image, index, &mut build)? {
                parent = Some(p);
            }
        }
        for provisioner in &image.provisioners {
            index += 1;
            match &provisioner.step {
                Step::File(step) => self.file_step(image, index, step, &mut build)?,
                Step::Shell(step) => self.shell_step(image, index, step, &mut build)?,
            }
        }

        let record = self.finish_image(image, build, parent, started)?;
        Ok(record)
    }

    /// Runs a step through the cache: `key_of` computes the cache key, `produce` the layer on a
    /// miss.
    fn cached_step(
        &mut self,
        image: &Image,
        index: usize,
        name: String,
        build: &mut Build,
        key: Digest,
        produce: impl FnOnce(&mut Self, &mut Build) -> Result<Produced, BakeError>,
    ) -> Result<(), BakeError> {
        let started = self.clock.now();
        self.emit(BakeEvent::StepStarted {
            image: &image.name,
            index,
            name: &name,
        });
        let (entry, cached, in_rootfs) = match self.store.cache_get(&key)? {
            Some(entry) => (entry, true, false),
            None => {
                let produced = produce(self, build)?;
                let in_rootfs = produced.in_rootfs;
                let entry = CacheEntry {
                    chain: digest_json(&(&build.chain, &produced.layer.diff_id)),
                    layer: produced.layer,
                    files: produced.files,
                    bytes: produced.bytes,
                };
                self.store.cache_put(&key, &entry)?;
                (entry, false, in_rootfs)
            }
        };
        let step = StepRecord {
            name,
            cache_key: key.clone(),
            layer: Some(entry.layer.digest.clone()),
            cached,
            duration_ms: elapsed_ms(started, self.clock.now()),
            files: entry.files,
            bytes: entry.bytes,
        };
        build.chain = entry.chain;
        build.layers.push(entry.layer);
        build.keys.push(key);
        // A shell step that just ran left its result in the root filesystem already.
        if in_rootfs {
            build.applied = build.layers.len();
        }
        self.emit(BakeEvent::StepFinished {
            image: &image.name,
            index,
            step: &step,
        });
        build.steps.push(step);
        Ok(())
    }

    fn resolve(&self, path: &str) -> PathBuf {
        self.settings.context_dir.join(path)
    }

    /// Imports a `tar:`, `dir:` or `oci:` base; returns the parent image's digest if it has one.
    fn base_step(
        &mut self,
        image: &Image,
        index: usize,
        build: &mut Build,
    ) -> Result<Option<Digest>, BakeError> {
        let (kind, path) = match &image.base {
            Base::Tar { path } => ("tar", path),
            Base::Dir { path } => ("dir", path),
            Base::Oci { path, tag } => {
                return self.oci_base(image, index, path, tag.as_deref(), build);
            }
            Base::Scratch | Base::Image { .. } => return Ok(None),
        };
        let name = format!("base {kind}:{path}");
        let resolved = self.resolve(path);
        let missing = || BakeError::MissingInput {
            loc: image.base_loc.clone(),
            what: if kind == "tar" {
                "base archive"
            } else {
                "base directory"
            },
            path: path.clone(),
            resolved: resolved.clone(),
        };
        let meta = resolved.metadata().map_err(|_| missing())?;
        if (kind == "tar") != meta.is_file() {
            return Err(missing());
        }
        let step_err = |e: Box<dyn std::error::Error + Send + Sync>| BakeError::Step {
            image: image.name.clone(),
            index,
            step: format!("base {kind}:{path}"),
            source: e,
        };
        let content = if kind == "tar" {
            self.stat.file_hash(&resolved, &meta)
        } else {
            tree_hash(&mut self.stat, &resolved)
        }
        .map_err(|e| step_err(e.into()))?;
        let key = digest_json(&KeyInput {
            chain: &build.chain,
            step: ("base", kind),
            inputs: Some(&content),
        });
        let root = unpack::running_as_root();
        self.cached_step(image, index, name, build, key, |baker, _| {
            let unpacked;
            let (tree, owner) = if kind == "tar" {
                // Untrusted archive: unpack it safely, then re-pack it sorted and normalised. As
                // root the unpacked owners are the archive's own, so they are kept.
                unpacked = baker.store.tmp_dir()?;
                let file = File::open(&resolved).map_err(|e| step_err(e.into()))?;
                let opts = UnpackOptions {
                    whiteouts: false,
                    chown: root,
                };
                unpack::unpack(file, unpacked.path(), &opts).map_err(|e| step_err(e.into()))?;
                let owner = if root {
                    Ownership::Disk
                } else {
                    Ownership::Root
                };
                (unpacked.path(), owner)
            } else {
                // A directory on the build host: its owners are the host's users, not the image's.
                (resolved.as_path(), Ownership::Root)
            };
            let opts = TreeOptions {
                epoch: baker.settings.epoch,
                mode: None,
                owner,
            };
            let produced =
                baker.write_layer(&image.name, |w| layer::write_tree(tree, "", w, &opts));
            produced.map_err(|e| step_err(e.into()))
        })?;
        Ok(None)
    }

    /// Imports an image from an OCI image layout: its layers are copied as they are (each
    /// verified against its digest), its run config inherited.
    fn oci_base(
        &mut self,
        image: &Image,
        index: usize,
        path: &str,
        tag: Option<&str>,
        build: &mut Build,
    ) -> Result<Option<Digest>, BakeError> {
        let started = self.clock.now();
        let name = match tag {
            Some(t) => format!("base oci:{path}:{t}"),
            None => format!("base oci:{path}"),
        };
        let layout = self.resolve(path);
        if !layout.join("index.json").is_file() {
            return Err(BakeError::MissingInput {
                loc: image.base_loc.clone(),
                what: "OCI image layout",
                path: path.to_owned(),
                resolved: layout.join("index.json"),
            });
        }
        self.emit(BakeEvent::StepStarted {
            image: &image.name,
            index,
            name: &name,
        });
        let step_err = |e: Box<dyn std::error::Error + Send + Sync>| BakeError::Step {
            image: image.name.clone(),
            index,
            step: name.clone(),
            source: e,
        };
        let imported =
            import::import_oci(self.store, &layout, tag).map_err(|e| step_err(e.into()))?;
        build.chain = digest_json(&("oci", &imported.manifest));
        build.keys.push(build.chain.clone());
        build.layers = imported.layers;
        build.run = imported.run;
        let step = StepRecord {
            name: name.clone(),
            cache_key: build.chain.clone(),
            layer: None,
            cached: imported.copied == 0,
            duration_ms: elapsed_ms(started, self.clock.now()),
            files: 0,
            bytes: imported.copied,
        };
        self.emit(BakeEvent::StepFinished {
            image: &image.name,
            index,
            step: &step,
        });
        build.steps.push(step);
        Ok(Some(imported.manifest))
    }

    fn file_step(
        &mut self,
        image: &Image,
        index: usize,
        step: &FileStep,
        build: &mut Build,
    ) -> Result<(), BakeError> {
        let name = format!("file {} → {}", step.source, step.destination);
        let resolved = self.resolve(&step.source);
        let meta = resolved
            .symlink_metadata()
            .map_err(|_| BakeError::MissingInput {
                loc: step.source_loc.clone(),
                what: "provisioner source",
                path: step.source.clone(),
                resolved: resolved.clone(),
            })?;
        let step_err = |e: Box<dyn std::error::Error + Send + Sync>| BakeError::Step {
            image: image.name.clone(),
            index,
            step: format!("file {} → {}", step.source, step.destination),
            source: e,
        };
        let content = if meta.is_dir() {
            tree_hash(&mut self.stat, &resolved)
        } else {
            self.stat.file_hash(&resolved, &meta)
        }
        .map_err(|e| step_err(e.into()))?;
        let key = digest_json(&KeyInput {
            chain: &build.chain,
            step: &Step::File(step.clone()),
            inputs: Some(&content),
        });
        let mut dest = step.destination.trim_start_matches('/').to_owned();
        if step.destination.ends_with('/') && !meta.is_dir() {
            let file_name = resolved
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            dest = format!("{}{file_name}", dest);
        }
        let dest = dest.trim_end_matches('/').to_owned();
        let opts = TreeOptions {
            epoch: self.settings.epoch,
            mode: step.mode,
            owner: step
                .owner
                .map_or(Ownership::Root, |o| Ownership::Fixed(o.uid, o.gid)),
        };
        self.cached_step(image, index, name, build, key, |baker, _| {
            baker
                .write_layer(&image.name, |w| {
                    layer::write_tree(&resolved, &dest, w, &opts)
                })
                .map_err(|e| step_err(e.into()))
        })
    }

    fn shell_step(
        &mut self,
        image: &Image,
        index: usize,
        step: &ShellStep,
        build: &mut Build,
    ) -> Result<(), BakeError> {
        let name = match &step.script {
            Script::Inline(lines) => match lines.as_slice() {
                [one] => format!("shell {}", ellipsize(one, 48)),
                many => format!("shell ({} commands)", many.len()),
            },
            Script::File { path, .. } => format!("shell {path}"),
        };
        let step_name = name.clone();
        let step_err = |e: Box<dyn std::error::Error + Send + Sync>| BakeError::Step {
            image: image.name.clone(),
            index,
            step: step_name.clone(),
            source: e,
        };
        let script_path = match &step.script {
            Script::File { path, loc } => {
                let resolved = self.resolve(path);
                if !resolved.is_file() {
                    return Err(BakeError::MissingInput {
                        loc: loc.clone(),
                        what: "shell script",
                        path: path.clone(),
                        resolved,
                    });
                }
                Some(resolved)
            }
            Script::Inline(_) => None,
        };
        let script_hash = match &script_path {
            Some(p) => {
                let meta = p.metadata().map_err(|e| step_err(e.into()))?;
                Some(
                    self.stat
                        .file_hash(p, &meta)
                        .map_err(|e| step_err(e.into()))?,
                )
            }
            None => None,
        };
        let key = digest_json(&KeyInput {
            chain: &build.chain,
            step: &Step::Shell(step.clone()),
            inputs: script_hash.as_ref(),
        });
        self.cached_step(image, index, name, build, key, |baker, build| {
            let Some(bwrap) = baker.settings.bwrap.clone() else {
                return Err(BakeError::NoSandbox {
                    image: image.name.clone(),
                    index,
                    step: step_name.clone(),
                });
            };
            let root_dir = baker.materialize(build).map_err(&step_err)?;
            if fs::symlink_metadata(root_dir.join("bin/sh")).is_err() {
                return Err(BakeError::NoShell {
                    image: image.name.clone(),
                    index,
                    step: step_name.clone(),
                });
            }
            let before = layer::snapshot(&root_dir).map_err(|e| step_err(e.into()))?;
            let as_root = unpack::running_as_root();
            let what = match (&step.script, &script_path) {
                (Script::Inline(lines), _) => sandbox::Commands::Inline(lines),
                (Script::File { .. }, Some(p)) => sandbox::Commands::Script(p),
                (Script::File { .. }, None) => unreachable!("script path resolved above"),
            };
            let image_name = image.name.clone();
            let observer = &mut baker.observer;
            let result = sandbox::run(
                &bwrap,
                &root_dir,
                what,
                &step.environment,
                step.network,
                as_root,
                &mut |line| {
                    observer(BakeEvent::Output {
                        image: &image_name,
                        line,
                    });
                },
            );
            // bubblewrap creates its mount points in the root; they are not the step's doing.
            for mount in ["dev", "proc", "tmp"] {
                if !before.contains(Path::new(mount)) {
                    let _ = fs::remove_dir(root_dir.join(mount));
                }
            }
            match result {
                Ok(()) => {}
                Err(sandbox::RunError::Spawn(e)) => return Err(step_err(e.into())),
                Err(sandbox::RunError::Failed { code, tail }) => {
                    // The root now holds a half-done step: throw it away.
                    build.rootfs = None;
                    build.applied = 0;
                    return Err(BakeError::StepFailed {
                        image: image.name.clone(),
                        index,
                        step: step_name.clone(),
                        code,
                        tail,
                    });
                }
            }
            // As root the sandbox's owners are the image's (a step may `chown`); otherwise they
            // are the building user's and are normalised.
            let opts = layer::DiffOptions {
                epoch: baker.settings.epoch,
                owner: if as_root {
                    Ownership::Disk
                } else {
                    Ownership::Root
                },
            };
            let mut produced = baker
                .write_layer(&image.name, |w| {
                    layer::write_diff(&root_dir, &before, w, &opts)
                })
                .map_err(|e| step_err(e.into()))?;
            produced.in_rootfs = true;
            Ok(produced)
        })
    }

    /// A root filesystem holding every layer built so far.
    fn materialize(
        &self,
        build: &mut Build,
    ) -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
        if build.rootfs.is_none() {
            build.rootfs = Some(self.store.tmp_dir()?);
            build.applied = 0;
        }
        let dir = build
            .rootfs
            .as_ref()
            .map(|t| t.path().join("rootfs"))
            .unwrap_or_default();
        fs::create_dir_all(&dir)?;
        unpack::apply_layers(self.store, &build.layers[build.applied..], &dir)?;
        build.applied = build.layers.len();
        Ok(dir)
    }

    /// Streams a new layer of `image` into the store, reporting progress as bytes go by.
    fn write_layer(
        &mut self,
        image: &str,
        fill: impl FnOnce(&mut LayerWriter<Counting<'_>>) -> Result<layer::TreeStats, crate::Error>,
    ) -> Result<Produced, crate::Error> {
        // Uncompressed: the digest then depends on nothing but the tar bytes, not on a
        // compressor's version or level.
        let blob = LayerBlobWriter::new(self.store, Compression::None)?;
        let observer = &mut self.observer;
        let mut report = |bytes| observer(BakeEvent::Progress { image, bytes });
        let counting = Counting {
            inner: BufWriter::with_capacity(WRITE_BUFFER, blob),
            written: 0,
            reported: 0,
            report: &mut report,
        };
        let mut writer = LayerWriter::new(counting, self.settings.epoch);
        let stats = fill(&mut writer)?;
        let blob = writer
            .finish()?
            .inner
            .into_inner()
            .map_err(|e| crate::Error::io("write layer", self.store.root())(e.into_error()))?;
        Ok(Produced {
            layer: blob.commit()?,
            files: stats.files,
            bytes: stats.bytes,
            in_rootfs: false,
        })
    }

    fn finish_image(
        &mut self,
        image: &Image,
        build: Build,
        parent: Option<Digest>,
        started: std::time::SystemTime,
    ) -> Result<ImageRecord, BakeError> {
        let run = merge_run(build.run, &image.run);
        let created = rfc3339(self.settings.epoch);
        let config = ImageConfig {
            created: Some(created.clone()),
            architecture: oci_arch().to_owned(),
            os: "linux".to_owned(),
            config: run,
            rootfs: oci::RootFs {
                kind: "layers".to_owned(),
                diff_ids: build.layers.iter().map(|l| l.diff_id.clone()).collect(),
            },
            history: Vec::new(),
        };
        let config_bytes = serde_json::to_vec(&config).map_err(|e| crate::Error::Json {
            what: "image config".into(),
            source: e,
        })?;
        let (config_digest, config_size) = self.store.put_blob(&config_bytes)?;
        let mut annotations = BTreeMap::new();
        annotations.insert("org.opencontainers.image.created".to_owned(), created);
        if let Some(parent) = &parent {
            annotations.insert(
                "org.opencontainers.image.base.digest".to_owned(),
                parent.to_string(),
            );
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: oci::MEDIA_MANIFEST.to_owned(),
            config: Descriptor {
                media_type: oci::MEDIA_CONFIG.to_owned(),
                digest: config_digest.clone(),
                size: config_size,
                annotations: BTreeMap::new(),
            },
            layers: build
                .layers
                .iter()
                .map(|l| Descriptor {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: l.size,
                    annotations: BTreeMap::new(),
                })
                .collect(),
            annotations,
        };
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| crate::Error::Json {
            what: "image manifest".into(),
            source: e,
        })?;
        let digest = Digest::of(&manifest_bytes);
        let all_cached = build.steps.iter().all(|s| s.cached);
        // Records are keyed by digest: one read, not a scan of every record in the store.
        let existing = self.store.image(&digest)?.filter(|r| r.name == image.name);
        let (record, unchanged) = match existing {
            // Nothing to write; report this bake's steps (all cached) rather than the first one's.
            Some(record) if all_cached => (
                ImageRecord {
                    steps: build.steps,
                    ..record
                },
                true,
            ),
            _ => {
                let (digest, manifest_size) = self.store.put_blob(&manifest_bytes)?;
                let size =
                    manifest_size + config_size + build.layers.iter().map(|l| l.size).sum::<u64>();
                let record = ImageRecord {
                    name: image.name.clone(),
                    digest,
                    config_digest,
                    layers: build.layers,
                    parent,
                    base: base_text(&image.base),
                    inputs_hash: digest_json(&(&build.keys, &config.config)),
                    git: self.settings.git.clone(),
                    kiln_version: self.settings.kiln_version.clone(),
                    labels: config.config.labels.clone(),
                    steps: build.steps,
                    built_at: rfc3339_time(self.clock.now()),
                    host: self.settings.host.clone(),
                    duration_ms: elapsed_ms(started, self.clock.now()),
                    size,
                };
                (record, false)
            }
        };
        if unchanged {
            // Only make sure the tag points here (a rebake of an older config moves it back).
            if self.store.tagged()?.get(&record.name) != Some(&record.digest) {
                let stored = self
                    .store
                    .image(&record.digest)?
                    .unwrap_or_else(|| record.clone());
                self.store.put_image(&stored)?;
            }
        } else {
            self.store.put_image(&record)?;
        }
        self.emit(BakeEvent::ImageFinished {
            record: &record,
            unchanged,
        });
        Ok(record)
    }
}

impl Build {
    fn new(chain: Digest, layers: Vec<LayerRecord>, run: oci::RunSettings) -> Self {
        Self {
            chain,
            layers,
            steps: Vec::new(),
            keys: Vec::new(),
            run,
            rootfs: None,
            applied: 0,
        }
    }
}

/// The image's run config over its base's: lists replace, maps merge.
fn merge_run(mut base: oci::RunSettings, own: &RunConfig) -> oci::RunSettings {
    if let Some(e) = &own.entrypoint {
        base.entrypoint = Some(e.clone());
        // As in Dockerfiles, a new entrypoint drops the base's arguments.
        if own.cmd.is_none() {
            base.cmd = None;
        }
    }
    if let Some(c) = &own.cmd {
        base.cmd = Some(c.clone());
    }
    if !own.env.is_empty() {
        let mut env = base.env_map();
        env.extend(own.env.clone());
        base.env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    }
    if let Some(w) = &own.workdir {
        base.working_dir = Some(w.clone());
    }
    if let Some(u) = &own.user {
        base.user = Some(u.clone());
    }
    for port in &own.ports {
        base.exposed_ports
            .insert(format!("{port}/tcp"), oci::Empty {});
    }
    base.labels.extend(own.labels.clone());
    base
}

fn base_text(base: &Base) -> String {
    match base {
        Base::Scratch => "scratch".to_owned(),
        Base::Image { name } => format!("image.{name}"),
        Base::Tar { path } => format!("tar:{path}"),
        Base::Dir { path } => format!("dir:{path}"),
        Base::Oci {
            path,
            tag: Some(tag),
        } => format!("oci:{path}:{tag}"),
        Base::Oci { path, tag: None } => format!("oci:{path}"),
    }
}

/// The OCI name of this machine's architecture.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn rfc3339(epoch: u64) -> String {
    rfc3339_time(UNIX_EPOCH + Duration::from_secs(epoch))
}

fn rfc3339_time(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}
