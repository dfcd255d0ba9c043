//! Drift detection: compares the state with what runs, and answers drift by replacement.
//!
//! A check looks at everything kiln can observe without changing it: the state file (its
//! newest version, serial, lineage and hash), every instance through the runtime driver
//! ([`kiln_driver::Driver::observe`]: its environment and root as the kernel holds them), every
//! image root file by file against the image's manifest (hashing only files whose
//! `(dev, ino, size, mtime, ctime)` changed since their last hash, unless `full`), the
//! processes the runtime runs, and the proxy's tables. Nothing is patched: remediation is a
//! plan ([`kiln_core::plan::drift_plan`]) whose apply condemns the drifted instances, so that
//! self-healing starts replacements first and retires them once the replacements serve.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use kiln_bake::verify_tree::{Change, StatCache};
use kiln_core::Digest;
use kiln_core::drift::{Category, Finding, Report, masked};
use kiln_core::plan::Plan;
use kiln_driver::{GroupExpectation, Handle, Status};
use kiln_proxy::{ServiceSnapshot, ServiceTable};

use crate::engine::{Engine, World, rfc3339};
use crate::error::{Error, Result};

/// At most this many file changes are listed per image root; the rest are counted.
const MAX_FILE_FINDINGS: usize = 50;

/// One running instance to look at, taken from the state under the world lock.
struct Subject {
    service: String,
    release: u32,
    id: String,
    handle: Handle,
    image: Digest,
    /// The environment kiln gave it (the release's, the image's and kiln's own variables).
    env: BTreeMap<String, String>,
}

impl Engine {
    /// Checks for drift (of `service` only, when given). `full` re-hashes every file of every
    /// image root; otherwise files unchanged since their last hash are trusted.
    pub async fn drift(&self, service: Option<&str>, full: bool) -> Result<Report> {
        let now = self.shared.clock.now();
        let mut report = Report {
            checked_at: rfc3339(now),
            ..Report::default()
        };
        let (subjects, known, serial, lineage, expected_tables, groups) = {
            let world = self.shared.world.lock().await;
            if let Some(name) = service
                && !world.state.services.contains_key(name)
            {
                return Err(Error::NotFound(format!("no service `{name}` in the state")));
            }
            let (subjects, unknown) = self.subjects(&world, service);
            report.findings.extend(unknown);
            let known: BTreeSet<String> = world
                .state
                .services
                .values()
                .flat_map(|s| s.instances.iter().map(|i| i.id.clone()))
                .chain(world.retiring.iter().cloned())
                .collect();
            (
                subjects,
                known,
                world.serial,
                world.lineage.clone(),
                world.tables.clone(),
                group_expectations(&world.state),
            )
        };

        report
            .findings
            .extend(self.state_findings(serial, &lineage));

        let engine = self.clone();
        let (instance_findings, checked, roots, hashed) =
            tokio::task::spawn_blocking(move || engine.check_instances(&subjects, full))
                .await
                .map_err(|e| Error::Conflict(format!("the drift check stopped: {e}")))?;
        report.findings.extend(instance_findings);
        report.instances_checked = checked;
        report.roots_verified = roots;
        report.files_hashed = hashed;

        report.findings.extend(self.unmanaged_processes(&known));
        report.findings.extend(self.group_findings(&groups));
        report.findings.extend(routing_findings(
            &expected_tables,
            &self.shared.traffic.snapshot().services,
            &known,
        ));

        if let Some(name) = service {
            report.only_service(name);
        }
        report.normalize();
        let mut world = self.shared.world.lock().await;
        world.drift = Some(report.clone());
        Ok(report)
    }

    /// The running instances to check; instances the driver cannot be asked about are
    /// findings of their own (`unknown`).
    fn subjects(&self, world: &World, only: Option<&str>) -> (Vec<Subject>, Vec<Finding>) {
        let mut subjects = Vec::new();
        let mut unknown = Vec::new();
        let mut configs: BTreeMap<
            Digest,
            std::result::Result<kiln_bake::oci::ImageConfig, String>,
        > = BTreeMap::new();
        for (name, s) in &world.state.services {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            for inst in &s.instances {
                if inst.retiring || inst.handle.is_null() {
                    continue;
                }
                let Some(rel) = s.releases.iter().find(|r| r.number == inst.release) else {
                    unknown.push(
                        Finding::new(
                            Category::Unknown,
                            format!("release v{}", inst.release),
                            "no such release in the state",
                        )
                        .service(name)
                        .instance(&inst.id),
                    );
                    continue;
                };
                let handle: Handle = match serde_json::from_value(inst.handle.clone()) {
                    Ok(h) => h,
                    Err(e) => {
                        unknown.push(
                            Finding::new(
                                Category::Unknown,
                                "a runtime handle",
                                format!("an unreadable one ({e})"),
                            )
                            .service(name)
                            .release(inst.release)
                            .instance(&inst.id),
                        );
                        continue;
                    }
                };
                // One read of each image's config, however many instances run it.
                let config = configs.entry(rel.image_digest.clone()).or_insert_with(|| {
                    self.image_config(&rel.image_digest)
                        .map_err(|e| e.to_string())
                });
                let env = config
                    .as_ref()
                    .map(|c| crate::launch::instance_env(c, name, rel, &inst.id, inst.port));
                match env {
                    Ok(env) => subjects.push(Subject {
                        service: name.clone(),
                        release: inst.release,
                        id: inst.id.clone(),
                        handle,
                        image: rel.image_digest.clone(),
                        env,
                    }),
                    Err(e) => unknown.push(
                        Finding::new(
                            Category::Unknown,
                            "the release's environment",
                            format!("none ({e})"),
                        )
                        .service(name)
                        .release(inst.release)
                        .instance(&inst.id),
                    ),
                }
            }
        }
        (subjects, unknown)
    }

    /// The state file against what this server last wrote: a newer serial, another lineage,
    /// or a broken audit chain (an entry, or a state version whose JSON no longer hashes to what
    /// kiln logged) means someone changed it.
    fn state_findings(&self, serial: u64, lineage: &str) -> Vec<Finding> {
        let db = self.shared.db.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        match db.lineage() {
            Ok(l) if l != lineage => out.push(
                Finding::new(
                    Category::State,
                    format!("lineage {lineage}"),
                    format!("lineage {l}"),
                )
                .subject("state lineage"),
            ),
            Ok(_) => {}
            Err(e) => out.push(
                Finding::new(Category::Unknown, "a readable state", e.to_string()).subject("state"),
            ),
        }
        match db.versions() {
            Ok(versions) => {
                if let Some(newest) = versions.last()
                    && newest.serial != serial
                {
                    out.push(
                        Finding::new(
                            Category::State,
                            format!("serial {serial} (the last kiln wrote)"),
                            format!(
                                "serial {} by {} ({})",
                                newest.serial, newest.actor, newest.operation
                            ),
                        )
                        .subject("state serial"),
                    );
                }
            }
            Err(e) => out.push(
                Finding::new(Category::Unknown, "a readable state", e.to_string()).subject("state"),
            ),
        }
        match db.verify_audit() {
            Ok(kiln_state::AuditCheck::Broken { seq, reason }) => out.push(
                Finding::new(
                    Category::State,
                    "an intact audit log",
                    format!("entry {seq} broken: {reason}"),
                )
                .subject("audit log"),
            ),
            Ok(kiln_state::AuditCheck::Ok { .. }) => {}
            Err(e) => out.push(
                Finding::new(Category::Unknown, "a readable audit log", e.to_string())
                    .subject("audit log"),
            ),
        }
        // `verify_audit` also re-hashes every state version against the hash it logged, so
        // the history needs no second pass (`StateStore::verify`).
        out
    }

    /// Each instance through the driver, and each image root against its manifest.
    /// Returns the findings, instances checked, roots verified and files hashed.
    fn check_instances(&self, subjects: &[Subject], full: bool) -> (Vec<Finding>, u64, u64, u64) {
        let mut findings = Vec::new();
        let mut checked = 0;
        let mut images: BTreeMap<Digest, Vec<&Subject>> = BTreeMap::new();
        for s in subjects {
            let at = |f: Finding| f.service(&s.service).release(s.release).instance(&s.id);
            match self.shared.driver.status(&s.handle) {
                Ok(Status::Running) => {}
                Ok(other) => {
                    findings.push(at(Finding::new(
                        Category::Missing,
                        "running",
                        describe(other),
                    )));
                    continue;
                }
                Err(e) => {
                    findings.push(at(Finding::new(
                        Category::Unknown,
                        "a runtime status",
                        e.to_string(),
                    )));
                    continue;
                }
            }
            checked += 1;
            let observed = match self.shared.driver.observe(&s.handle) {
                Ok(o) => o,
                // It ended between the two calls.
                Err(kiln_driver::DriverError::NotRunning { .. }) => {
                    checked -= 1;
                    findings.push(at(Finding::new(
                        Category::Missing,
                        "running",
                        "nothing running",
                    )));
                    continue;
                }
                Err(e) => {
                    findings.push(at(Finding::new(
                        Category::Unknown,
                        "an observable instance",
                        e.to_string(),
                    )));
                    continue;
                }
            };
            let rootfs = self.shared.cfg.paths.rootfs().join(s.image.hex());
            if observed.rootfs.as_ref().is_some_and(|r| *r != rootfs) {
                findings.push(at(Finding::new(
                    Category::ImageMismatch,
                    format!("root {} (image {})", rootfs.display(), s.image),
                    format!(
                        "root {}",
                        observed
                            .rootfs
                            .as_ref()
                            .map_or(String::new(), |r| r.display().to_string())
                    ),
                )));
            } else if observed.root_is_rootfs == Some(false) {
                findings.push(at(Finding::new(
                    Category::ImageMismatch,
                    format!("its root to be {} (image {})", rootfs.display(), s.image),
                    "another directory mounted as its root (the image directory was replaced after it started)",
                )));
            }
            for m in &observed.mismatches {
                let category = match m.kind {
                    kiln_driver::MismatchKind::Image => Category::ImageMismatch,
                    kiln_driver::MismatchKind::Config => Category::Config,
                };
                findings.push(at(
                    Finding::new(category, &m.expected, &m.found).subject(m.subject.clone())
                ));
            }
            for (key, want) in &s.env {
                let got = observed.env.get(key);
                if got != Some(want) {
                    findings.push(at(Finding::new(
                        Category::Config,
                        masked(Some(want)),
                        masked(got.map(String::as_str)),
                    )
                    .subject(format!("env.{key}"))));
                }
            }
            images.entry(s.image.clone()).or_default().push(s);
        }

        let mut roots = 0;
        let mut hashed = 0;
        for (image, users) in images {
            let rootfs = self.shared.cfg.paths.rootfs().join(image.hex());
            match self.verify_root(&image, &rootfs, full) {
                Ok((changes, files)) => {
                    roots += 1;
                    hashed += files;
                    for s in users {
                        findings.extend(tamper_findings(&changes, s));
                    }
                }
                Err(e) => {
                    for s in users {
                        findings.push(
                            Finding::new(
                                Category::Unknown,
                                format!("a verifiable root of image {image}"),
                                e.to_string(),
                            )
                            .service(&s.service)
                            .release(s.release)
                            .instance(&s.id)
                            .subject(rootfs.display().to_string()),
                        );
                    }
                }
            }
        }
        (findings, checked, roots, hashed)
    }

    /// One image root against the image's manifest, with the root's stat cache.
    fn verify_root(
        &self,
        image: &Digest,
        rootfs: &std::path::Path,
        full: bool,
    ) -> Result<(Vec<Change>, u64)> {
        // The manifest and the stat cache are kept between checks: a check every few seconds
        // then reads neither the manifest file nor any unchanged file.
        let taken = self
            .shared
            .verify_caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(image);
        let (manifest, mut cache) = match taken {
            Some(kept) => kept,
            None => {
                let images = &self.shared.images;
                let record = images
                    .image(image)?
                    .ok_or_else(|| Error::ImageMissing(image.clone()))?;
                (
                    std::sync::Arc::new(images.manifest(&record)?),
                    StatCache::default(),
                )
            }
        };
        let result = kiln_bake::verify_tree::verify_tree(rootfs, &manifest, &mut cache, full);
        self.shared
            .verify_caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(image.clone(), (manifest, cache));
        let report = result?;
        Ok((report.changes, report.files_hashed))
    }

    /// Processes the runtime runs for this project that the state does not know.
    fn unmanaged_processes(&self, known: &BTreeSet<String>) -> Vec<Finding> {
        match self.shared.driver.running() {
            Ok(handles) => handles
                .into_iter()
                .filter(|h| !known.contains(&h.id))
                .map(|h| {
                    let mut f = Finding::new(
                        Category::Unmanaged,
                        "nothing",
                        "a running instance kiln started, unknown to the state",
                    )
                    .instance(&h.id);
                    if let Some(service) = h.data.get("service").and_then(|s| s.as_str()) {
                        f = f.service(service);
                    }
                    f
                })
                .collect(),
            Err(e) => vec![Finding::new(
                Category::Unknown,
                "the runtime's list of instances",
                e.to_string(),
            )],
        }
    }

    /// Groups of instances in the runtime (Auto Scaling groups) that differ from the state.
    fn group_findings(&self, groups: &[GroupExpectation]) -> Vec<Finding> {
        match self.shared.driver.check_groups(groups) {
            Ok(found) => found
                .into_iter()
                .map(|g| {
                    let f = Finding::new(Category::Config, g.expected, g.found)
                        .service(&g.service)
                        .subject(g.subject);
                    match g.release {
                        Some(r) => f.release(r),
                        None => f,
                    }
                })
                .collect(),
            Err(e) => vec![Finding::new(
                Category::Unknown,
                "the runtime's groups of instances",
                e.to_string(),
            )],
        }
    }

    /// The plan answering the last check's findings, made against the current state.
    pub async fn drift_plan(&self, report: &Report) -> Plan {
        let world = self.shared.world.lock().await;
        kiln_core::plan::drift_plan(&world.lineage, world.serial, &world.state, report)
    }

    /// Carries out a drift remediation plan: condemns the instances to replace (self-healing
    /// starts their replacements and retires them once those serve), moves an image root that
    /// was tampered with aside so that replacements get a fresh one from the store, stops the
    /// unmanaged instances, and hands kiln's proxy tables over again.
    pub(crate) fn remediate(
        &self,
        world: &mut World,
        remedy: &kiln_core::plan::DriftRemediation,
    ) -> Result<()> {
        let tampered: BTreeSet<Digest> = remedy
            .findings
            .iter()
            .filter(|f| f.category == Category::FileTamper)
            .filter_map(|f| {
                let s = world.state.services.get(f.service.as_ref()?)?;
                let inst = s
                    .instances
                    .iter()
                    .find(|i| Some(&i.id) == f.instance.as_ref())?;
                let rel = s.releases.iter().find(|r| r.number == inst.release)?;
                Some(rel.image_digest.clone())
            })
            .collect();
        for image in &tampered {
            self.quarantine_root(world, image)?;
        }
        for (service, ids) in &remedy.replace {
            let Some(s) = world.state.services.get_mut(service) else {
                continue;
            };
            for (id, why) in ids {
                if let Some(inst) = s.instances.iter_mut().find(|i| &i.id == id) {
                    inst.replace_because = Some(why.clone());
                }
            }
            for (id, why) in ids {
                world.event(Some(service), "drift", format!("replacing {id}: {why}"));
            }
        }
        world.dirty = true;
        for (id, why) in &remedy.remove {
            world.event(None, "drift", format!("stopping {id}: {why}"));
        }
        let regroup: Vec<GroupExpectation> = group_expectations(&world.state)
            .into_iter()
            .filter(|g| {
                remedy
                    .regroup
                    .get(&g.service)
                    .is_some_and(|r| r.contains_key(&g.release))
            })
            .collect();
        for g in &regroup {
            world.event(
                Some(&g.service),
                "drift",
                format!(
                    "setting the group of v{} back: {}",
                    g.release, remedy.regroup[&g.service][&g.release]
                ),
            );
        }
        if !remedy.remove.is_empty() || !regroup.is_empty() {
            let handles: Vec<Handle> = if remedy.remove.is_empty() {
                Vec::new()
            } else {
                self.shared
                    .driver
                    .running()?
                    .into_iter()
                    .filter(|h| remedy.remove.contains_key(&h.id))
                    .collect()
            };
            let driver = self.shared.driver.clone();
            let grace = self.shared.cfg.stop_grace;
            // Strays first: a group set back to its size while strays are in it would let
            // the runtime choose which instances to stop.
            tokio::task::spawn_blocking(move || {
                for h in handles {
                    if let Err(e) = driver.stop(&h, grace) {
                        tracing::warn!(instance = %h.id, "stopping an unmanaged instance: {e}");
                    }
                }
                for g in regroup {
                    if let Err(e) = driver.repair_group(&g) {
                        tracing::warn!(service = %g.service, release = g.release, "setting a group back: {e}");
                    }
                }
            });
        }
        // Routing drift: forget what was handed over, so the next sync hands the table over.
        for (service, why) in &remedy.reroute {
            world.tables.remove(service);
            world.event(Some(service), "drift", format!("routing restored: {why}"));
        }
        Ok(())
    }

    /// Moves a tampered image root aside (kept for inspection under `rootfs/.tampered/`), so
    /// that the next launch of the image unpacks it again from the store. Running instances
    /// keep the root they mounted until they are replaced.
    fn quarantine_root(&self, world: &mut World, image: &Digest) -> Result<()> {
        let rootfs = self.shared.cfg.paths.rootfs();
        let dir = rootfs.join(image.hex());
        if !dir.is_dir() {
            return Ok(());
        }
        let aside = rootfs.join(".tampered");
        std::fs::create_dir_all(&aside).map_err(Error::io("create", &aside))?;
        let to = aside.join(format!(
            "{}-{}",
            image.hex(),
            crate::engine::ms(self.shared.clock.now())
        ));
        std::fs::rename(&dir, &to).map_err(Error::io("move aside", &dir))?;
        self.shared
            .verify_caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(image);
        world.event(
            None,
            "drift",
            format!("moved the tampered root of image {image} to {}; replacements unpack it again from the store", to.display()),
        );
        Ok(())
    }
}

/// What the state expects of each release's group of instances in the runtime.
fn group_expectations(state: &kiln_core::state::State) -> Vec<GroupExpectation> {
    let mut groups = Vec::new();
    for (name, s) in &state.services {
        let mut by_release: BTreeMap<u32, Vec<Handle>> = BTreeMap::new();
        for inst in &s.instances {
            if let Ok(h) = serde_json::from_value::<Handle>(inst.handle.clone()) {
                by_release.entry(inst.release).or_default().push(h);
            }
        }
        for (release, instances) in by_release {
            groups.push(GroupExpectation {
                service: name.clone(),
                release,
                instances,
                max_instances: s.spec.instances + s.spec.rollout.max_parallel.max(1),
            });
        }
    }
    groups
}

fn describe(status: Status) -> String {
    match status {
        Status::Running => "running".to_owned(),
        Status::Exited { code: Some(c) } => format!("exited with code {c}"),
        Status::Exited { code: None } => "exited".to_owned(),
        Status::Gone => "nothing running".to_owned(),
    }
}

/// The file changes of one image root, as findings of one instance using it.
fn tamper_findings(changes: &[Change], s: &Subject) -> Vec<Finding> {
    let at = |f: Finding| f.service(&s.service).release(s.release).instance(&s.id);
    let mut out: Vec<Finding> = changes
        .iter()
        .take(MAX_FILE_FINDINGS)
        .map(|c| {
            let (expected, found) = match c {
                Change::Added { kind, .. } => (
                    "nothing".to_owned(),
                    format!("an added {kind:?}").to_lowercase(),
                ),
                Change::Removed { .. } => ("present".to_owned(), "removed".to_owned()),
                Change::Content {
                    expected, found, ..
                } => (format!("content {expected}"), format!("content {found}")),
                Change::Mode {
                    expected, found, ..
                } => (format!("mode {expected:04o}"), format!("mode {found:04o}")),
                Change::Owner {
                    expected, found, ..
                } => (
                    format!("owner {}:{}", expected.0, expected.1),
                    format!("owner {}:{}", found.0, found.1),
                ),
                Change::Kind {
                    expected, found, ..
                } => (
                    format!("{expected:?}").to_lowercase(),
                    format!("{found:?}").to_lowercase(),
                ),
                Change::LinkTarget {
                    expected, found, ..
                } => (format!("link to {expected}"), format!("link to {found}")),
            };
            at(Finding::new(Category::FileTamper, expected, found)
                .subject(format!("/{}", c.path())))
        })
        .collect();
    if changes.len() > MAX_FILE_FINDINGS {
        out.push(at(Finding::new(
            Category::FileTamper,
            "the image's files",
            format!("{} more changed paths", changes.len() - MAX_FILE_FINDINGS),
        )
        .subject("/…")));
    }
    out
}

/// The routing of one table, comparable with a proxy snapshot: per release its weight and
/// backends, and the preview release.
type Routing = (Pools, Option<u32>);
/// Per release: its weight and its backends `(id, address, routable)`.
type Pools = BTreeMap<u32, (u32, BTreeSet<(String, SocketAddr, bool)>)>;

fn routing_of_table(t: &ServiceTable) -> Routing {
    let pools = t.pools.iter().map(|p| {
        let backends = p
            .backends
            .iter()
            .map(|b| (b.id.clone(), b.addr, b.routable));
        (p.release, p.weight, backends.collect())
    });
    (pools.map(|(r, w, b)| (r, (w, b))).collect(), t.preview)
}

fn routing_of_snapshot(s: &ServiceSnapshot) -> Routing {
    let pools = s.pools.iter().map(|p| {
        let backends = p
            .backends
            .iter()
            .map(|b| (b.id.clone(), b.addr, b.routable));
        (p.release, p.weight, backends.collect())
    });
    (pools.map(|(r, w, b)| (r, (w, b))).collect(), s.preview)
}

/// The proxy's tables against what kiln last handed it.
fn routing_findings(
    expected: &BTreeMap<String, ServiceTable>,
    live: &[ServiceSnapshot],
    known: &BTreeSet<String>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for snap in live {
        let Some(table) = expected.get(&snap.name) else {
            out.push(
                Finding::new(
                    Category::Routing,
                    "no such service in the proxy",
                    format!("service {} routed", snap.name),
                )
                .service(&snap.name),
            );
            continue;
        };
        let (want, want_preview) = routing_of_table(table);
        let (got, got_preview) = routing_of_snapshot(snap);
        let show = |r: &Pools| {
            let parts: Vec<String> = r
                .iter()
                .map(|(v, (w, _))| format!("v{v} weight {w}"))
                .collect();
            if parts.is_empty() {
                "no pools".to_owned()
            } else {
                parts.join(", ")
            }
        };
        let weights =
            |r: &Pools| -> BTreeMap<u32, u32> { r.iter().map(|(v, (w, _))| (*v, *w)).collect() };
        if weights(&want) != weights(&got) {
            out.push(
                Finding::new(Category::Routing, show(&want), show(&got))
                    .service(&snap.name)
                    .subject("weights"),
            );
        }
        if want_preview != got_preview {
            let p =
                |v: Option<u32>| v.map_or("no preview".to_owned(), |v| format!("preview of v{v}"));
            out.push(
                Finding::new(Category::Routing, p(want_preview), p(got_preview))
                    .service(&snap.name)
                    .subject("preview"),
            );
        }
        let backends = |r: &Pools| -> BTreeMap<String, (u32, SocketAddr, bool)> {
            r.iter()
                .flat_map(|(v, (_, bs))| {
                    bs.iter()
                        .map(move |(id, addr, routable)| (id.clone(), (*v, *addr, *routable)))
                })
                .collect()
        };
        let (want_b, got_b) = (backends(&want), backends(&got));
        for (id, (v, addr, routable)) in &got_b {
            match want_b.get(id) {
                None => {
                    let category = if known.contains(id) {
                        Category::Routing
                    } else {
                        Category::Unmanaged
                    };
                    out.push(
                        Finding::new(
                            category,
                            "no such backend",
                            format!("backend {addr} in the v{v} pool"),
                        )
                        .service(&snap.name)
                        .instance(id)
                        .subject(kiln_core::plan::PROXY_BACKEND),
                    );
                }
                Some(w) if w != &(*v, *addr, *routable) => out.push(
                    Finding::new(
                        Category::Routing,
                        format!(
                            "v{} {} {}",
                            w.0,
                            w.1,
                            if w.2 { "routable" } else { "not routable" }
                        ),
                        format!(
                            "v{v} {addr} {}",
                            if *routable {
                                "routable"
                            } else {
                                "not routable"
                            }
                        ),
                    )
                    .service(&snap.name)
                    .instance(id)
                    .subject(kiln_core::plan::PROXY_BACKEND),
                ),
                Some(_) => {}
            }
        }
        for (id, (v, addr, _)) in &want_b {
            if !got_b.contains_key(id) {
                out.push(
                    Finding::new(
                        Category::Routing,
                        format!("backend {addr} in the v{v} pool"),
                        "not in the proxy",
                    )
                    .service(&snap.name)
                    .instance(id)
                    .subject(kiln_core::plan::PROXY_BACKEND),
                );
            }
        }
    }
    for name in expected.keys() {
        if !live.iter().any(|s| &s.name == name) {
            out.push(
                Finding::new(
                    Category::Routing,
                    format!("service {name} routed"),
                    "not in the proxy",
                )
                .service(name),
            );
        }
    }
    out
}

/// How long a change seen by the watcher waits for more before the check runs: an editor or a
/// package manager writes several files in a burst.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);
/// How often the watches are brought in line with the image roots in use.
const REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

impl Engine {
    /// Continuous drift detection (the `drift` block): a check every `interval` (every
    /// `full_every`-th hashes every file again), and at once when the watcher sees a change
    /// in an image root; new findings become `drift` events (and so webhooks), and with
    /// `auto_remediate` they are answered by the same plan `kiln drift --remediate` makes.
    /// Runs until `stop` turns true.
    pub(crate) async fn watch_drift(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let changed = std::sync::Arc::new(tokio::sync::Notify::new());
        let mut watcher = RootWatcher::new(changed.clone());
        let mut timed_checks: u32 = 0;
        // Time left until the next timed check; the watches follow the instances every
        // `REFRESH` meanwhile.
        let mut left = self.shared.world.lock().await.state.drift.interval;
        loop {
            let settings = self.shared.world.lock().await.state.drift;
            let roots = if settings.watch {
                self.roots_in_use().await
            } else {
                BTreeSet::new()
            };
            watcher.watch(&roots);
            let step = if settings.interval.is_zero() {
                REFRESH
            } else {
                REFRESH.min(left)
            };
            let timed = tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(step) => {
                    if settings.interval.is_zero() {
                        continue;
                    }
                    left = left.saturating_sub(step);
                    if !left.is_zero() {
                        continue;
                    }
                    left = settings.interval;
                    true
                }
                () = changed.notified() => false,
                () = self.shared.drift_wake.notified() => {
                    left = self.shared.world.lock().await.state.drift.interval;
                    continue;
                }
            };
            if !timed {
                tokio::time::sleep(SETTLE).await;
            }
            let full = timed && {
                timed_checks = timed_checks.wrapping_add(1);
                timed_checks.is_multiple_of(settings.full_every.max(1))
            };
            let before = self.shared.world.lock().await.drift.clone();
            let report = match self.drift(None, full).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("drift check: {e}");
                    continue;
                }
            };
            self.record_new_findings(before.as_ref(), &report).await;
            if settings.auto_remediate && !report.is_clean() {
                self.auto_remediate(&report).await;
            }
        }
    }

    /// The image roots the instances in the state run from.
    async fn roots_in_use(&self) -> BTreeSet<PathBuf> {
        let world = self.shared.world.lock().await;
        let rootfs = self.shared.cfg.paths.rootfs();
        world
            .state
            .services
            .values()
            .flat_map(|s| {
                s.instances.iter().filter_map(|i| {
                    let rel = s.releases.iter().find(|r| r.number == i.release)?;
                    Some(rootfs.join(rel.image_digest.hex()))
                })
            })
            .filter(|p| p.is_dir())
            .collect()
    }

    /// One `drift` event per finding that the previous check did not have.
    async fn record_new_findings(&self, before: Option<&Report>, report: &Report) {
        let old: BTreeSet<&Finding> = before
            .map(|r| r.findings.iter().collect())
            .unwrap_or_default();
        let new: Vec<&Finding> = report
            .findings
            .iter()
            .filter(|f| !old.contains(f))
            .collect();
        if new.is_empty() {
            return;
        }
        let mut world = self.shared.world.lock().await;
        for f in new {
            world.event(f.service.as_deref(), "drift", format!("drift found: {f}"));
        }
        if let Err(e) = self.persist(&mut world, "drift") {
            tracing::warn!("recording drift findings: {e}");
        }
    }

    /// Applies the remediation plan of `report`, as `kiln drift --remediate` would.
    async fn auto_remediate(&self, report: &Report) {
        let plan = self.drift_plan(report).await;
        if !plan.has_changes() {
            return;
        }
        let req = crate::api::ApplyRequest {
            plan,
            actor: format!("{} (drift auto_remediate)", crate::engine::actor()),
            git_commit: None,
        };
        if let Err(e) = self.apply(req).await {
            let mut world = self.shared.world.lock().await;
            world.event(None, "drift", format!("automatic remediation waits: {e}"));
            if let Err(e) = self.persist(&mut world, "drift") {
                tracing::warn!("recording a drift event: {e}");
            }
        }
    }
}

/// inotify watches on image roots, recursive; every event wakes the drift loop. Without
/// inotify (or past the watch limit) the timed checks still run.
struct RootWatcher {
    changed: std::sync::Arc<tokio::sync::Notify>,
    watcher: Option<notify::RecommendedWatcher>,
    watched: BTreeSet<PathBuf>,
}

impl RootWatcher {
    fn new(changed: std::sync::Arc<tokio::sync::Notify>) -> Self {
        Self {
            changed,
            watcher: None,
            watched: BTreeSet::new(),
        }
    }

    /// Watches exactly `roots`.
    fn watch(&mut self, roots: &BTreeSet<PathBuf>) {
        use notify::Watcher as _;
        if *roots == self.watched {
            return;
        }
        if self.watcher.is_none() {
            let changed = self.changed.clone();
            match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    changed.notify_one();
                }
            }) {
                Ok(w) => self.watcher = Some(w),
                Err(e) => {
                    tracing::warn!("cannot watch image roots (timed drift checks still run): {e}");
                    return;
                }
            }
        }
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        for gone in self.watched.difference(roots) {
            let _ = watcher.unwatch(gone);
        }
        for new in roots.difference(&self.watched) {
            if let Err(e) = watcher.watch(new, notify::RecursiveMode::Recursive) {
                tracing::warn!(root = %new.display(), "cannot watch (timed drift checks still run): {e}");
            }
        }
        self.watched = roots.clone();
    }
}
