//! The reconcile loop: observe, decide (in the pure core), persist, act.
//!
//! Each tick builds an [`Observed`] per service from the driver (is the process alive?) and
//! the proxy (is it healthy, since when?), asks [`rollout::step`] (a rollout runs) or
//! [`rollout::heal`] (none runs) what to do, persists the new journal and instance records,
//! and only then carries the actions out. Launches are written ahead (the instance record
//! exists before its process), retirements drain in the proxy before the process is stopped.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use kiln_core::rollout::{
    self, Action, Backoff, HealSettings, InstanceHealth, Journal, Observed, ObservedInstance,
    Phase, Stage,
};
use kiln_core::state::{Instance, ServiceState};
use kiln_driver::{Handle, Status};
use kiln_proxy::{BackendSpec, HealthCheck, Pool, ProxySnapshot, ServiceTable};

use crate::api;
use crate::engine::{Engine, World, ms};
use crate::error::Result;

impl Engine {
    /// Runs the reconcile loop until `shutdown` resolves.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (stop_drift, drift_stopped) = tokio::sync::watch::channel(false);
        let engine = self.clone();
        let drift = tokio::spawn(async move { engine.watch_drift(drift_stopped).await });
        loop {
            if let Err(e) = self.tick().await {
                tracing::error!("reconcile: {e}");
            }
            let now = self.shared.clock.now();
            self.renew_remote(now);
            if self.idle_for_long(now).await {
                self.halt_with(crate::Halt::Idle);
            }
            if self.halted().is_some() {
                break;
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = self.shared.halt.notified() => break,
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep(self.shared.cfg.tick) => {}
            }
        }
        let _ = stop_drift.send(true);
        let _ = drift.await;
    }

    /// Whether an `idle_exit` server has had nothing to do for that long: no rollout (a warm
    /// release included), no lock, no request.
    async fn idle_for_long(&self, now: SystemTime) -> bool {
        let Some(idle) = self.shared.cfg.idle_exit else {
            return false;
        };
        let last = *self
            .shared
            .last_request
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if now.duration_since(last).unwrap_or_default() < idle {
            return false;
        }
        let world = self.shared.world.lock().await;
        world.lock.is_none()
            && world.retiring.is_empty()
            && world.state.services.values().all(|s| s.rollout.is_none())
    }

    /// One pass of observe → decide → persist → act.
    pub async fn tick(&self) -> Result<()> {
        let mut world = self.shared.world.lock().await;
        let now = self.shared.clock.now();
        let names: Vec<String> = world.state.services.keys().cloned().collect();
        let mut work: Vec<(String, Vec<Action>)> = Vec::new();
        for name in names {
            let mut observed = self.observe(&world, &name, now);
            let journal = world
                .state
                .services
                .get(&name)
                .and_then(|s| s.rollout.clone());
            if let Some(journal) = &journal {
                observed.samples = self.samples(&mut world, &name, journal, ms(now));
                observed.command = world.commands.get(&name).cloned();
            }
            let actions = decide(&mut world, &name, &observed, ms(now));
            // A command the journal has taken is done.
            let taken = world
                .state
                .services
                .get(&name)
                .and_then(|s| s.rollout.as_ref())
                .and_then(|j| j.progressive.as_ref())
                .map(|p| p.last_command);
            if let Some(cmd) = world.commands.get(&name)
                && (journal.is_some() && (taken.is_none_or(|t| t >= cmd.seq)))
            {
                world.commands.remove(&name);
            }
            if !actions.is_empty() {
                work.push((name, actions));
            }
        }
        // Decisions are durable before they are carried out.
        self.persist(&mut world, "reconcile")?;
        for (service, actions) in work {
            for action in actions {
                if let Err(e) = self.perform(&mut world, &service, action, now) {
                    world.event(Some(&service), "error", e.to_string());
                }
            }
        }
        forget_deleted(&mut world);
        self.release_lock_if_idle(&mut world, now)?;
        self.persist(&mut world, "reconcile")?;
        self.sync_tables(&mut world);
        self.sync_previews(&mut world).await;
        Ok(())
    }

    /// What the driver and the proxy say about a service's instances.
    fn observe(&self, world: &World, service: &str, now: SystemTime) -> Observed {
        let Some(s) = world.state.services.get(service) else {
            return Observed::default();
        };
        let now_ms = ms(now);
        let instances = s
            .instances
            .iter()
            .map(|inst| {
                let alive = match serde_json::from_value::<Handle>(inst.handle.clone()) {
                    Ok(handle) => matches!(self.shared.driver.status(&handle), Ok(Status::Running)),
                    // Not started yet (or its start failed): nothing runs.
                    Err(_) => false,
                };
                let health = if !alive {
                    InstanceHealth::Exited
                } else {
                    match self.shared.traffic.backend_health(&inst.id) {
                        Some(h) => {
                            let since = now_ms.saturating_sub(millis(h.since.elapsed()));
                            if h.healthy {
                                InstanceHealth::Healthy { since_ms: since }
                            } else if h.passes == 0
                                && h.checks > 0
                                && was_ever_healthy(world, &inst.id)
                            {
                                InstanceHealth::Unhealthy { since_ms: since }
                            } else {
                                InstanceHealth::Starting
                            }
                        }
                        None => InstanceHealth::Starting,
                    }
                };
                ObservedInstance {
                    id: inst.id.clone(),
                    release: inst.release,
                    started_ms: humantime::parse_rfc3339(&inst.started_at).map_or(now_ms, ms),
                    health,
                    routable: inst.routable,
                    retiring: inst.retiring,
                    condemned: inst.replace_because.is_some(),
                }
            })
            .collect();
        // No analysis samples and no operator commands yet: a canary or blue/green analysis
        // is then inconclusive (it pauses, never promotes) and a step without a pause waits.
        Observed {
            instances,
            ..Observed::default()
        }
    }

    /// Carries out one decision.
    fn perform(
        &self,
        world: &mut World,
        service: &str,
        action: Action,
        now: SystemTime,
    ) -> Result<()> {
        match action {
            Action::Launch { release } => self.launch(world, service, release, now),
            Action::Route { id } => {
                if let Some(inst) = instance_mut(world, service, &id) {
                    inst.routable = true;
                    world.dirty = true;
                }
                Ok(())
            }
            Action::Retire { id } => {
                self.retire(world, service, &id);
                Ok(())
            }
            Action::SetStable { release } => {
                if let Some(s) = world.state.services.get_mut(service) {
                    s.stable = Some(release);
                    world.dirty = true;
                }
                Ok(())
            }
            Action::SetWeights { weights } => {
                // The split is kept in the journal (persisted before this runs), so a restart
                // keeps it; `sync_tables` at the end of the tick hands it to the proxy.
                let split: Vec<String> = weights
                    .iter()
                    .map(|(release, w)| format!("v{release} {w}%"))
                    .collect();
                world.event(Some(service), "traffic", split.join(", "));
                Ok(())
            }
            Action::MarkRelease { release, status } => {
                if let Some(r) = world
                    .state
                    .services
                    .get_mut(service)
                    .and_then(|s| s.releases.iter_mut().find(|r| r.number == release))
                {
                    r.status = status;
                    world.dirty = true;
                }
                Ok(())
            }
        }
    }

    /// Marks an instance retiring and, in the background, drains it and stops it; the record is
    /// removed once the process is gone.
    pub(crate) fn retire(&self, world: &mut World, service: &str, id: &str) {
        let Some(inst) = instance_mut(world, service, id) else {
            return;
        };
        inst.routable = false;
        inst.retiring = true;
        let handle = serde_json::from_value::<Handle>(inst.handle.clone()).ok();
        world.dirty = true;
        if !world.retiring.insert(id.to_owned()) {
            return;
        }
        let engine = self.clone();
        let service = service.to_owned();
        let id = id.to_owned();
        tokio::spawn(async move {
            let proxy = &engine.shared.traffic;
            let outcome = proxy
                .drain(&service, &id, engine.shared.cfg.drain_timeout)
                .await;
            tracing::debug!(instance = %id, ?outcome, "drained");
            if let Some(handle) = handle {
                let driver = engine.shared.driver.clone();
                let grace = engine.shared.cfg.stop_grace;
                let stopped =
                    tokio::task::spawn_blocking(move || driver.stop(&handle, grace)).await;
                if let Ok(Err(e)) = stopped {
                    tracing::warn!(instance = %id, "stop failed: {e}");
                }
            }
            let mut world = engine.shared.world.lock().await;
            world.retiring.remove(&id);
            if let Some(s) = world.state.services.get_mut(&service) {
                s.instances.retain(|i| i.id != id);
            }
            world.dirty = true;
            world.event(
                Some(&service),
                "stopped",
                format!("instance {id} drained and stopped"),
            );
            if let Err(e) = engine.persist(&mut world, "retire") {
                tracing::error!("persisting a retirement: {e}");
            }
            engine.sync_tables(&mut world);
        });
    }

    /// Gives every service's instances to the proxy: one pool per release, weighted by how many
    /// routable instances it has, so each routable instance gets an equal share — unless a
    /// canary or blue/green rollout has set the split ([`Journal::weights`]): then each pool
    /// gets its release's share and a release not in the split gets none. While the rollout
    /// previews its new release ([`preview_release`]), the proxy sends preview requests there.
    ///
    /// A table is handed over only when it differs from the one kiln last handed over
    /// (`World::tables`): a table changed in the proxy by anything else stays as it is until a
    /// drift check finds it and its remediation hands kiln's table over again.
    pub(crate) fn sync_tables(&self, world: &mut World) {
        let tables = expected_tables(world);
        for (name, table) in tables {
            if world.tables.get(&name) != Some(&table) {
                self.shared.traffic.set_service(&name, table.clone());
                world.tables.insert(name, table);
            }
        }
    }
}

/// The table of every service, as the state says it: see [`Engine::sync_tables`].
pub(crate) fn expected_tables(world: &World) -> BTreeMap<String, ServiceTable> {
    let mut tables = BTreeMap::new();
    {
        for (name, s) in &world.state.services {
            let journal = s.rollout.as_ref();
            let split = journal.and_then(|j| j.weights().cloned());
            let preview = journal.and_then(preview_release);
            let mut pools: BTreeMap<u32, Pool> = BTreeMap::new();
            for inst in &s.instances {
                if inst.handle.is_null() {
                    continue;
                }
                let pool = pools.entry(inst.release).or_insert_with(|| Pool {
                    release: inst.release,
                    weight: 0,
                    backends: Vec::new(),
                    health: s
                        .releases
                        .iter()
                        .find(|r| r.number == inst.release)
                        .and_then(|r| r.health.as_ref())
                        .map(health_check),
                });
                if split.is_none() && inst.routable {
                    pool.weight += 1;
                }
                pool.backends.push(BackendSpec {
                    id: inst.id.clone(),
                    addr: std::net::SocketAddr::from(([127, 0, 0, 1], inst.port)),
                    routable: inst.routable && !inst.retiring,
                });
            }
            if let Some(split) = &split {
                for pool in pools.values_mut() {
                    pool.weight = split.get(&pool.release).copied().unwrap_or(0);
                }
            }
            let health = s.spec.health.as_ref().map(health_check);
            tables.insert(
                name.clone(),
                ServiceTable {
                    pools: pools.into_values().collect(),
                    health,
                    preview,
                },
            );
        }
    }
    tables
}

impl Engine {
    /// Gives the state lock back once no rollout runs; renews its lease while one does.
    fn release_lock_if_idle(&self, world: &mut World, now: SystemTime) -> Result<()> {
        let Some(lock) = world.lock.clone() else {
            return Ok(());
        };
        // A promoted rollout that only keeps the old release warm does not hold the lock: the
        // deployment is done, and a new apply or rollback may start (see `Engine::apply`).
        let busy = world
            .state
            .services
            .values()
            .any(|s| s.rollout.as_ref().is_some_and(|j| !is_warm(j)));
        let db = self.shared.db.lock().unwrap_or_else(|e| e.into_inner());
        if busy {
            db.renew(&lock.id, self.shared.cfg.lock_lease, now)?;
        } else {
            db.unlock(&lock.id)?;
            drop(db);
            world.lock = None;
        }
        Ok(())
    }
}

/// Runs the pure decision for one service and applies its bookkeeping to the world.
fn decide(world: &mut World, name: &str, observed: &Observed, now_ms: u64) -> Vec<Action> {
    let Some(s) = world.state.services.get(name) else {
        return Vec::new();
    };
    if let Some(journal) = s.rollout.clone() {
        let (next, actions) = rollout::step(&journal, observed, now_ms);
        let finished = matches!(next.phase, Phase::Succeeded | Phase::Failed { .. });
        let new_entries: Vec<String> = next.log[journal.log.len().min(next.log.len())..]
            .iter()
            .map(|e| e.message.clone())
            .collect();
        if next != journal {
            let s = world.state.services.get_mut(name).expect("checked above");
            s.rollout = if finished { None } else { Some(next.clone()) };
            world.dirty = true;
        }
        for message in new_entries {
            world.event(Some(name), "rollout", message);
        }
        if finished {
            let message = match &next.phase {
                Phase::Succeeded => format!("rollout to v{} succeeded", next.to),
                Phase::Failed {
                    reason,
                    reverted: true,
                } => {
                    format!(
                        "rollout to v{} failed ({reason}); reverted to v{}",
                        next.to,
                        next.from.unwrap_or(0)
                    )
                }
                Phase::Failed { reason, .. } => format!("rollout to v{} failed: {reason}", next.to),
                _ => String::new(),
            };
            world.event(Some(name), "rollout", message);
        }
        let mut actions = actions;
        // A rollback that took over leaves the release it replaced marked as rolled back.
        let rollback = world
            .state
            .services
            .get(name)
            .and_then(|s| s.releases.iter().find(|r| r.number == next.to))
            .is_some_and(|r| r.rollback_of.is_some());
        if rollback && let (Phase::Succeeded, Some(from)) = (&next.phase, next.from) {
            actions.push(Action::MarkRelease {
                release: from,
                status: kiln_core::state::ReleaseStatus::RolledBack,
            });
        }
        return actions;
    }
    let target = s.spec.instances;
    let Some(stable) = s.stable else {
        return Vec::new();
    };
    let backoff = world
        .backoff
        .get(name)
        .cloned()
        .unwrap_or_else(|| Backoff::new(HealSettings::for_spec(&s.spec)));
    let (backoff, actions) = rollout::heal(stable, target, observed, &backoff, now_ms);
    world.backoff.insert(name.to_owned(), backoff);
    for action in &actions {
        if let Action::Launch { .. } = action
            && observed
                .instances
                .iter()
                .any(|i| i.health == InstanceHealth::Exited && i.release == stable)
        {
            world.event(
                Some(name),
                "heal",
                format!("replacing a dead instance of v{stable}"),
            );
        }
    }
    actions
}

/// Services being deleted whose instances are all gone leave the state.
fn forget_deleted(world: &mut World) {
    let gone: Vec<String> = world
        .state
        .services
        .iter()
        .filter(|(_, s)| s.spec.instances == 0 && s.instances.is_empty())
        .map(|(n, _)| n.clone())
        .collect();
    for name in gone {
        world.state.services.remove(&name);
        world.dirty = true;
        world.event(Some(&name), "deleted", "service removed".to_owned());
    }
}

/// Whether a journal only keeps the old release warm after a promotion.
pub(crate) fn is_warm(journal: &Journal) -> bool {
    journal
        .progressive
        .as_ref()
        .is_some_and(|p| matches!(p.stage, Stage::Warm { .. }))
}

/// The release a rollout previews: its new release (`to`) while a blue/green rollout brings it
/// up or waits for promotion, and while a canary brings it up, holds at a step or scales it up
/// — everything before promotion. `None` for rolling updates, once promoted (warm), and while
/// aborting: then preview requests follow the weights like the others.
pub(crate) fn preview_release(journal: &Journal) -> Option<u32> {
    let p = journal.progressive.as_ref()?;
    let before_promotion = matches!(
        p.stage,
        Stage::BringUp { .. } | Stage::Preview { .. } | Stage::Step { .. } | Stage::ScaleUp { .. }
    );
    (journal.phase == Phase::Rolling && before_promotion).then_some(journal.to)
}

fn health_check(h: &kiln_core::model::Health) -> HealthCheck {
    HealthCheck {
        path: h.path.clone(),
        interval: h.interval,
        timeout: h.timeout,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    }
}

fn was_ever_healthy(world: &World, id: &str) -> bool {
    world
        .state
        .services
        .values()
        .flat_map(|s| &s.instances)
        .any(|i| i.id == id && i.routable)
}

pub(crate) fn instance_mut<'w>(
    world: &'w mut World,
    service: &str,
    id: &str,
) -> Option<&'w mut Instance> {
    world
        .state
        .services
        .get_mut(service)?
        .instances
        .iter_mut()
        .find(|i| i.id == id)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One service's status, for `kiln status`: instances with the proxy's view of their health,
/// and the share of requests each release gets now (pool weights among pools that have a
/// backend able to serve, as the proxy picks them).
pub(crate) fn service_status(
    engine: &Engine,
    name: &str,
    s: &ServiceState,
    snapshot: &ProxySnapshot,
    drift: Option<&kiln_core::drift::Report>,
) -> api::ServiceStatus {
    let instances = s
        .instances
        .iter()
        .map(|inst| {
            let health = match engine.shared.traffic.backend_health(&inst.id) {
                Some(h) if h.healthy => "healthy",
                Some(h) if h.checks > 0 && h.passes == 0 && inst.routable => "unhealthy",
                _ => "starting",
            };
            api::InstanceStatus {
                id: inst.id.clone(),
                release: inst.release,
                port: inst.port,
                health: health.to_owned(),
                routable: inst.routable,
                retiring: inst.retiring,
                started_at: inst.started_at.clone(),
                replacing: inst.replace_because.clone(),
            }
        })
        .collect();
    let mut traffic = BTreeMap::new();
    if let Some(svc) = snapshot.services.iter().find(|p| p.name == name) {
        let serving: Vec<_> = svc
            .pools
            .iter()
            .filter(|p| {
                p.backends
                    .iter()
                    .any(|b| b.routable && b.healthy && !b.draining)
            })
            .collect();
        let total: u32 = serving.iter().map(|p| p.weight).sum();
        for pool in serving.iter().filter(|p| p.weight > 0) {
            traffic.insert(
                pool.release,
                f64::from(pool.weight) * 100.0 / f64::from(total),
            );
        }
    }
    let rollout = s.rollout.as_ref().map(|j| api::RolloutStatus {
        deployment_id: j.deployment_id.clone(),
        from: j.from,
        to: j.to,
        phase: match &j.phase {
            Phase::Rolling => "rolling".to_owned(),
            Phase::Reverting { reason, .. } => format!("reverting: {reason}"),
            Phase::Succeeded => "succeeded".to_owned(),
            Phase::Failed { reason, .. } => format!("failed: {reason}"),
        },
        stage: j.progressive.as_ref().map(|p| {
            let stage = match &p.stage {
                Stage::BringUp { .. } => "bringing up the new release".to_owned(),
                Stage::Step { index, .. } => format!("step {} of {}", index + 1, p.steps.len()),
                Stage::Preview { .. } => "preview: waiting for promotion".to_owned(),
                Stage::ScaleUp { .. } => "scaling the new release up".to_owned(),
                Stage::Warm { .. } => "promoted; the old release stays warm".to_owned(),
                _ => "aborting".to_owned(),
            };
            if p.paused.is_some() {
                format!("{stage} (paused)")
            } else {
                stage
            }
        }),
        weights: j.weights().cloned().unwrap_or_default(),
        promoted: j
            .progressive
            .as_ref()
            .is_some_and(|p| matches!(p.stage, Stage::Warm { .. })),
        log: j
            .log
            .iter()
            .rev()
            .take(20)
            .rev()
            .map(|e| e.message.clone())
            .collect(),
    });
    let preview = snapshot
        .balancers
        .iter()
        .find(|b| b.name == crate::engine::preview_balancer(name))
        .and_then(|b| b.addr)
        .map(|a| a.to_string());
    api::ServiceStatus {
        name: name.to_owned(),
        preview,
        stable: s.stable,
        target: s.spec.instances,
        rollout,
        instances,
        traffic,
        drift: drift.map_or_else(Vec::new, |r| {
            r.findings
                .iter()
                .filter(|f| f.service.as_deref() == Some(name))
                .cloned()
                .collect()
        }),
    }
}
