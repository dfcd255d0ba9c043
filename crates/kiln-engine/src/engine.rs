//! The engine: the one owner of a project's running world.
//!
//! It holds the state (as last persisted), the runtime driver and the traffic layer (kiln's proxy). Changes come from
//! two places only: an apply (a plan the user approved) and the reconcile loop, which observes
//! instances and health and asks the pure core ([`kiln_core::rollout`]) what to do next. Every
//! decision is persisted before it is carried out, so a killed server resumes from the state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_bake::Store;
use kiln_core::clock::Clock;
use kiln_core::plan::Plan;
use kiln_core::rollout::{self, Backoff};
use kiln_core::state::{Release, ReleaseStatus, ServiceState, State};
use kiln_driver::Driver;
use kiln_proxy::Traffic;
use kiln_state::{LockInfo, LockRequest, NewEvent, StateStore, WriteMeta};
use tokio::sync::Notify;

use crate::api::{self, ApplyRequest, ApplyResponse};
use crate::error::{Error, Result};
use crate::paths::Paths;
use crate::remote::RemoteState;

/// How the engine behaves.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The project's `.kiln` directory.
    pub paths: Paths,
    /// The image store (by default `.kiln/store`).
    pub store: std::path::PathBuf,
    /// How long a removed instance may take to finish its requests.
    pub drain_timeout: Duration,
    /// How long an instance has to exit after SIGTERM.
    pub stop_grace: Duration,
    /// How often the reconcile loop looks at the world when nothing wakes it.
    pub tick: Duration,
    /// The lease of the state lock; renewed every tick while a rollout runs.
    pub lock_lease: Duration,
    /// A team state backend every state version is also written to; `None` keeps the state
    /// on this machine only.
    pub remote: Option<Arc<dyn RemoteState>>,
    /// How long to wait for another server to let the team backend's lease go.
    pub remote_wait: Duration,
    /// Stop once nothing has happened for this long: no rollout (a warm release included),
    /// no request. For servers a command started on a team backend, so that the next
    /// machine's server can take the lease.
    pub idle_exit: Option<Duration>,
}

impl EngineConfig {
    /// Defaults for a project whose `.kiln` directory is `paths`.
    pub fn new(paths: Paths) -> Self {
        Self {
            store: paths.store(),
            paths,
            drain_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            tick: Duration::from_millis(200),
            lock_lease: Duration::from_secs(60),
            remote: None,
            remote_wait: Duration::ZERO,
            idle_exit: None,
        }
    }
}

/// The running world of one project.
#[derive(Clone)]
pub struct Engine {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    pub(crate) cfg: EngineConfig,
    pub(crate) db: Mutex<StateStore>,
    pub(crate) images: Store,
    pub(crate) driver: Arc<dyn Driver>,
    pub(crate) traffic: Arc<dyn Traffic>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) world: tokio::sync::Mutex<World>,
    pub(crate) wake: Notify,
    pub(crate) started_at: SystemTime,
    /// Why the engine stopped by itself (idle, or the team backend refused a write); the
    /// reconcile loop ends once it is set.
    pub(crate) halted: Mutex<Option<Halt>>,
    pub(crate) halt: Notify,
    /// When the last request came (for `idle_exit`).
    pub(crate) last_request: Mutex<SystemTime>,
    /// When the team backend's lease was last renewed.
    pub(crate) renewed: Mutex<SystemTime>,
    /// Posts the events of services with webhooks, in the background.
    pub(crate) notifier: crate::notify::Notifier,
    /// Wakes the continuous drift loop when its settings change.
    pub(crate) drift_wake: Notify,
    /// Per image root, its file manifest and what the last verification found unchanged
    /// (drift checks).
    pub(crate) verify_caches: Mutex<
        BTreeMap<kiln_core::Digest, (Arc<kiln_bake::Manifest>, kiln_bake::verify_tree::StatCache)>,
    >,
}

/// The engine's view of the world, guarded by one lock.
pub(crate) struct World {
    pub(crate) state: State,
    pub(crate) serial: u64,
    pub(crate) lineage: String,
    /// The state lock, held while any rollout runs.
    pub(crate) lock: Option<LockInfo>,
    pub(crate) backoff: BTreeMap<String, Backoff>,
    /// Instances a background task is draining and stopping.
    pub(crate) retiring: BTreeSet<String>,
    /// Where each balancer really listens.
    pub(crate) bound: BTreeMap<String, SocketAddr>,
    /// Preview listeners by service: where each listens, or `None` when it could not bind
    /// (reported once, tried again at the next preview).
    pub(crate) previews: BTreeMap<String, Option<SocketAddr>>,
    /// Events to persist with the next write.
    pub(crate) events: Vec<NewEvent>,
    /// Whether `state` differs from what was last persisted.
    pub(crate) dirty: bool,
    /// Start-of-window counters per service, for analysis samples.
    pub(crate) marks: BTreeMap<String, crate::analysis::Mark>,
    /// Operator commands not yet taken by a rollout, per service.
    pub(crate) commands: BTreeMap<String, rollout::OperatorCommand>,
    /// What kiln last handed the proxy per service, to hand it again only when it changes
    /// and to tell a table changed behind kiln's back (routing drift).
    pub(crate) tables: BTreeMap<String, kiln_proxy::ServiceTable>,
    /// The last drift check, for `kiln status`.
    pub(crate) drift: Option<kiln_core::drift::Report>,
    /// The sequence number of the last command given.
    pub(crate) next_command: u64,
}

/// Milliseconds since 1970 of `t`.
pub(crate) fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// RFC 3339, to the second.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl World {
    pub(crate) fn event(&mut self, service: Option<&str>, kind: &str, message: String) {
        tracing::info!(service, kind, "{message}");
        self.events.push(NewEvent {
            service: service.map(str::to_owned),
            kind: kind.to_owned(),
            message,
            data: serde_json::Value::Null,
        });
    }

    /// An event caused by a person's request (`actor`: `user@host`), recorded as theirs in
    /// the audit log.
    pub(crate) fn event_by(
        &mut self,
        actor: &str,
        service: Option<&str>,
        kind: &str,
        message: String,
    ) {
        self.event(service, kind, message);
        if let Some(e) = self.events.last_mut() {
            e.data = serde_json::json!({ "actor": actor });
        }
    }
}

/// The audit entries of `events`: every event is a change or a decision of kiln's; the actor
/// is the person who asked for it, or the server.
fn audit_entries(events: &[NewEvent], server: &str) -> Vec<kiln_state::NewAuditEntry> {
    events
        .iter()
        .map(|e| kiln_state::NewAuditEntry {
            actor: e
                .data
                .get("actor")
                .and_then(|a| a.as_str())
                .map_or_else(|| server.to_owned(), str::to_owned),
            kind: e.kind.clone(),
            subject: e
                .service
                .clone()
                .map_or_else(|| "project".to_owned(), |s| format!("service.{s}")),
            git_commit: e
                .data
                .get("git_commit")
                .and_then(|g| g.as_str())
                .map(str::to_owned),
            data: serde_json::json!({ "message": e.message }),
        })
        .collect()
}

impl Engine {
    /// Opens the project's state and starts nothing yet; call [`Engine::recover`] next.
    pub fn open(
        cfg: EngineConfig,
        driver: Arc<dyn Driver>,
        traffic: Arc<dyn Traffic>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        cfg.paths
            .create()
            .map_err(Error::io("create", &cfg.paths.root))?;
        let now = clock.now();
        let db = StateStore::open(&cfg.paths.state_db(), now)?;
        let mut current = db.read::<State>()?;
        if let Some(remote) = &cfg.remote {
            current = take_remote(remote.as_ref(), &db, current, cfg.remote_wait, now)?;
        }
        let images = Store::open(&cfg.store)?;
        let world = World {
            state: current.doc,
            serial: current.serial,
            lineage: current.lineage,
            lock: None,
            backoff: BTreeMap::new(),
            retiring: BTreeSet::new(),
            bound: BTreeMap::new(),
            previews: BTreeMap::new(),
            events: Vec::new(),
            dirty: false,
            marks: BTreeMap::new(),
            commands: BTreeMap::new(),
            tables: BTreeMap::new(),
            drift: None,
            next_command: ms(now),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                cfg,
                db: Mutex::new(db),
                images,
                driver,
                traffic,
                clock,
                world: tokio::sync::Mutex::new(world),
                wake: Notify::new(),
                started_at: now,
                halted: Mutex::new(None),
                halt: Notify::new(),
                last_request: Mutex::new(now),
                renewed: Mutex::new(now),
                notifier: crate::notify::Notifier::new(),
                verify_caches: Mutex::new(BTreeMap::new()),
                drift_wake: Notify::new(),
            }),
        })
    }

    /// What carries requests (kiln's proxy, or a cloud load balancer), for tests and the
    /// server.
    pub fn traffic(&self) -> &dyn Traffic {
        self.shared.traffic.as_ref()
    }

    /// Stops the reconcile loop (and with it the server) for `why`.
    pub(crate) fn halt_with(&self, why: Halt) {
        let mut halted = self.shared.halted.lock().unwrap_or_else(|e| e.into_inner());
        if halted.is_none() {
            tracing::warn!("stopping: {why}");
            *halted = Some(why);
        }
        drop(halted);
        self.shared.halt.notify_one();
    }

    /// Why the engine stopped by itself, if it did.
    pub fn halted(&self) -> Option<Halt> {
        self.shared
            .halted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Notes a request (it keeps an `idle_exit` server running).
    pub fn touch(&self) {
        *self
            .shared
            .last_request
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.shared.clock.now();
    }

    /// Lets the team backend's lease go (when the server stops).
    pub fn release_remote(&self) -> Result<()> {
        match &self.shared.cfg.remote {
            Some(remote) => remote.release().map_err(Error::Remote),
            None => Ok(()),
        }
    }

    /// Renews the team backend's lease when it is due; stops the engine when it is lost.
    pub(crate) fn renew_remote(&self, now: SystemTime) {
        let Some(remote) = &self.shared.cfg.remote else {
            return;
        };
        let mut renewed = self
            .shared
            .renewed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if now.duration_since(*renewed).unwrap_or_default() < crate::remote::RENEW_EVERY {
            return;
        }
        match remote.renew(now) {
            Ok(()) => *renewed = now,
            Err(e) => {
                drop(renewed);
                self.halt_with(Halt::Failed(format!(
                    "lost the lease of the team state backend {}: {e}",
                    remote.describe()
                )));
            }
        }
    }

    /// Wakes the reconcile loop now.
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Writes the world to the state store if it changed, with the pending events.
    pub(crate) fn persist(&self, world: &mut World, operation: &str) -> Result<()> {
        if !world.dirty && world.events.is_empty() {
            return Ok(());
        }
        let db = self.shared.db.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.shared.clock.now();
        let server = format!("kiln server ({})", actor());
        let audit = audit_entries(&world.events, &server);
        if world.dirty {
            let meta = WriteMeta {
                actor: actor(),
                operation: operation.to_owned(),
            };
            let (serial, _) = db.write_with_audit(
                world.serial,
                &world.state,
                &meta,
                &world.events,
                &audit,
                now,
            )?;
            world.serial = serial;
            if let Some(remote) = &self.shared.cfg.remote {
                let doc = serde_json::to_value(&world.state)?;
                if let Err(e) = remote.write(&doc, &meta.actor, operation, now) {
                    let why = format!(
                        "the team state backend {} refused state version {serial}: {e}",
                        remote.describe()
                    );
                    self.halt_with(Halt::Failed(why.clone()));
                    return Err(Error::Remote(why));
                }
            }
        } else {
            db.append_events(&world.events, now)?;
            db.append_audit(&audit, now)?;
        }
        // Only queued here: delivery never holds up the caller.
        self.shared
            .notifier
            .enqueue(&world.state, &world.events, now);
        world.events.clear();
        world.dirty = false;
        Ok(())
    }

    /// Refuses `what` (`deploy`, `rollback`) of `service` to a revoked image.
    pub(crate) fn refuse_revoked(
        &self,
        service: &str,
        image: &kiln_core::Digest,
        what: &str,
        now: SystemTime,
    ) -> Result<()> {
        let Some(record) = self.shared.images.image(image)? else {
            return Ok(());
        };
        if let Some(revoked) = self.shared.images.revoked(&record, now)? {
            return Err(Error::PlanRefused(format!(
                "{what} of `{service}` refused: image {} ({image}) is {revoked}",
                record.name
            )));
        }
        Ok(())
    }

    /// Applies a plan: records new releases and rollout journals, then lets the reconcile loop
    /// carry them out. Refuses a plan made against another state or an older serial, and refuses
    /// while another apply's rollout holds the state lock.
    pub async fn apply(&self, req: ApplyRequest) -> Result<ApplyResponse> {
        let mut world = self.shared.world.lock().await;
        let versions = {
            let db = self.shared.db.lock().unwrap_or_else(|e| e.into_inner());
            db.versions()?
        };
        check_plan(&req.plan, &world, &versions)?;
        let now = self.shared.clock.now();
        for change in &req.plan.resource_changes {
            let actions: Vec<&str> = change.change.actions.iter().map(String::as_str).collect();
            if change.kind == "kiln_service"
                && matches!(actions.as_slice(), ["create"] | ["create", "delete"])
            {
                let spec = &req.plan.services[&change.name];
                self.refuse_revoked(&change.name, &spec.image_digest, "deploy", now)?;
            }
        }
        self.take_lock(
            &mut world,
            "apply",
            &req.actor,
            format!("deploy {}", req.plan.config_hash),
            now,
        )?;

        if let Some(remedy) = &req.plan.drift {
            self.remediate(&mut world, remedy)?;
        }
        let deployment_id = uuid::Uuid::new_v4().to_string();
        let mut releases = BTreeMap::new();
        for change in &req.plan.resource_changes {
            let actions: Vec<&str> = change.change.actions.iter().map(String::as_str).collect();
            match (change.kind.as_str(), actions.as_slice()) {
                ("kiln_service", ["create"] | ["create", "delete"]) => {
                    self.end_warm_period(&mut world, &change.name);
                    let spec = req.plan.services[&change.name].clone();
                    let number = new_release(&mut world, &spec, &req, &deployment_id, now);
                    releases.insert(change.name.clone(), number);
                }
                ("kiln_service", ["update"]) => {
                    let spec = req.plan.services[&change.name].clone();
                    if let Some(s) = world.state.services.get_mut(&change.name) {
                        // A health check changed without a new release applies to the release
                        // that serves now.
                        let stable = s.stable;
                        if let Some(r) = s.releases.iter_mut().find(|r| Some(r.number) == stable) {
                            r.health = spec.health.clone();
                        }
                        s.spec = spec;
                    }
                    world.event(
                        Some(&change.name),
                        "updated",
                        change.action_reason.clone().unwrap_or_default(),
                    );
                }
                ("kiln_service", ["delete"]) => {
                    if let Some(s) = world.state.services.get_mut(&change.name) {
                        // Zero instances wanted marks a service being deleted: the reconcile
                        // loop retires its instances and then forgets it.
                        s.spec.instances = 0;
                        s.rollout = None;
                    }
                    world.event(Some(&change.name), "deleting", "not in config".to_owned());
                }
                ("kiln_balancer", ["create"] | ["update"]) => {
                    let spec = req.plan.balancers[&change.name].clone();
                    world.state.balancers.insert(change.name.clone(), spec);
                }
                ("kiln_balancer", ["delete"]) => {
                    world.state.balancers.remove(&change.name);
                }
                ("kiln_drift", ["update"]) => {
                    if let Some(settings) = req.plan.drift_settings {
                        world.state.drift = settings;
                        self.shared.drift_wake.notify_one();
                    }
                }
                _ => {}
            }
        }
        world.dirty = true;
        world.event_by(
            &req.actor,
            None,
            "apply",
            format!(
                "deployment {deployment_id} by {}: {} change(s) (plan of config {})",
                req.actor,
                req.plan.summary().total(),
                req.plan.config_hash
            ),
        );
        if let (Some(commit), Some(e)) = (&req.git_commit, world.events.last_mut()) {
            e.data["git_commit"] = serde_json::json!(commit);
        }
        self.persist(&mut world, "apply")?;
        let serial = world.serial;
        self.sync_balancers(&mut world).await?;
        drop(world);
        self.wake();
        Ok(ApplyResponse {
            deployment_id,
            releases,
            serial,
        })
    }

    /// Ends a promoted rollout's warm period early (a new deployment replaces it): the warm old
    /// release is retired now and the journal closed.
    pub(crate) fn end_warm_period(&self, world: &mut World, service: &str) {
        let Some(journal) = world
            .state
            .services
            .get(service)
            .and_then(|s| s.rollout.clone())
            .filter(crate::reconcile::is_warm)
        else {
            return;
        };
        let Some(from) = journal.from else { return };
        let warm: Vec<String> = world.state.services[service]
            .instances
            .iter()
            .filter(|i| i.release == from)
            .map(|i| i.id.clone())
            .collect();
        for id in &warm {
            self.retire(world, service, id);
        }
        if let Some(s) = world.state.services.get_mut(service) {
            s.rollout = None;
            s.stable = Some(journal.to);
            for r in &mut s.releases {
                if r.number == from && r.status == ReleaseStatus::Warm {
                    r.status = ReleaseStatus::Retired;
                }
                if r.number == journal.to && r.status == ReleaseStatus::Pending {
                    r.status = ReleaseStatus::Active;
                }
            }
        }
        world.dirty = true;
        world.event(
            Some(service),
            "rollout",
            format!("v{from} retired early: a new deployment replaces the warm period"),
        );
    }

    /// Takes the state lock for an operation that starts rollouts; refused while another
    /// operation's rollout holds it.
    pub(crate) fn take_lock(
        &self,
        world: &mut World,
        operation: &str,
        who: &str,
        info: String,
        now: SystemTime,
    ) -> Result<()> {
        if let Some(lock) = &world.lock {
            return Err(Error::State(kiln_state::Error::Locked(Box::new(
                lock.clone(),
            ))));
        }
        let db = self.shared.db.lock().unwrap_or_else(|e| e.into_inner());
        let lock = db.lock(
            &LockRequest {
                operation: operation.to_owned(),
                who: who.to_owned(),
                info,
                lease: self.shared.cfg.lock_lease,
            },
            now,
        )?;
        drop(db);
        world.event_by(
            who,
            None,
            "lock",
            format!("state lock {} taken by {who} for {operation}", lock.id),
        );
        world.lock = Some(lock);
        Ok(())
    }

    /// What runs now.
    pub async fn status(&self) -> api::Status {
        let world = self.shared.world.lock().await;
        let snapshot = self.shared.traffic.snapshot();
        let services = world
            .state
            .services
            .iter()
            .map(|(name, s)| {
                crate::reconcile::service_status(self, name, s, &snapshot, world.drift.as_ref())
            })
            .collect();
        let balancers = world
            .state
            .balancers
            .values()
            .map(|b| api::BalancerStatus {
                name: b.name.clone(),
                listen: b.listen.clone(),
                bound: world.bound.get(&b.name).map(ToString::to_string),
            })
            .collect();
        api::Status {
            lineage: world.lineage.clone(),
            serial: world.serial,
            server: api::ServerInfo {
                pid: std::process::id(),
                started_at: rfc3339(self.shared.started_at),
                driver: self.shared.driver.name().to_owned(),
                sandbox: String::new(),
            },
            services,
            balancers,
            lock: world.lock.clone(),
        }
    }

    /// Events after `after`.
    pub fn events(&self, after: u64) -> Result<Vec<kiln_state::Event>> {
        let db = self.shared.db.lock().unwrap_or_else(|e| e.into_inner());
        Ok(db.events(after, 1000)?)
    }

    /// Binds a service's `preview_listen` listener while its rollout previews a release
    /// ([`crate::reconcile::preview_release`]) and closes it once the preview is over.
    pub(crate) async fn sync_previews(&self, world: &mut World) {
        let proxy = &self.shared.traffic;
        let wanted: BTreeMap<String, (u32, String)> = world
            .state
            .services
            .iter()
            .filter_map(|(name, s)| {
                let listen = s.spec.rollout.preview_listen.clone()?;
                let release = crate::reconcile::preview_release(s.rollout.as_ref()?)?;
                Some((name.clone(), (release, listen)))
            })
            .collect();
        let over: Vec<String> = world
            .previews
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in over {
            if let Some(Some(addr)) = world.previews.remove(&name) {
                // In the background: preview requests in flight may finish in their own time.
                let traffic = self.shared.traffic.clone();
                let balancer = preview_balancer(&name);
                tokio::spawn(async move { traffic.unbind(&balancer).await });
                let message = format!("preview listener http://{addr}/ closed");
                world.event(Some(&name), "preview", message);
            }
        }
        for (name, (release, listen)) in wanted {
            if world.previews.contains_key(&name) {
                continue;
            }
            let bound = match listen.parse::<SocketAddr>() {
                Ok(addr) => proxy
                    .bind_preview(&preview_balancer(&name), addr, &name)
                    .await
                    .map_err(|e| e.to_string()),
                Err(_) => Err(format!("bad preview_listen address `{listen}`")),
            };
            match &bound {
                Ok(addr) => {
                    let message = format!("preview of v{release} on http://{addr}/");
                    world.event(Some(&name), "preview", message);
                }
                Err(e) => world.event(Some(&name), "error", format!("preview listener: {e}")),
            }
            world.previews.insert(name, bound.ok());
        }
    }

    /// Binds listeners for new balancers, closes removed ones, and sets every route.
    pub(crate) async fn sync_balancers(&self, world: &mut World) -> Result<()> {
        let proxy = &self.shared.traffic;
        let wanted: BTreeSet<String> = world.state.balancers.keys().cloned().collect();
        let gone: Vec<String> = world
            .bound
            .keys()
            .filter(|b| !wanted.contains(*b))
            .cloned()
            .collect();
        for name in gone {
            proxy.unbind(&name).await;
            world.bound.remove(&name);
        }
        for (name, b) in &world.state.balancers {
            if !world.bound.contains_key(name) {
                let addr: SocketAddr = b.listen.parse().map_err(|_| {
                    Error::Conflict(format!(
                        "balancer `{name}`: bad listen address `{}`",
                        b.listen
                    ))
                })?;
                // A port chosen by the system is kept across restarts when it is still free.
                let previous = world
                    .state
                    .listeners
                    .get(name)
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .filter(|p| addr.port() == 0 && p.ip() == addr.ip());
                let bound = match previous {
                    Some(p) => match proxy.bind(name, p).await {
                        Ok(bound) => bound,
                        Err(_) => proxy.bind(name, addr).await?,
                    },
                    None => proxy.bind(name, addr).await?,
                };
                world.bound.insert(name.clone(), bound);
                tracing::info!(balancer = %name, %bound, "listening");
            }
            let routes = b
                .routes
                .iter()
                .map(|r| kiln_proxy::RouteTarget {
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    service: r.service.clone(),
                })
                .collect();
            proxy.set_routes(name, routes);
        }
        let listeners: BTreeMap<String, String> = world
            .bound
            .iter()
            .map(|(n, a)| (n.clone(), a.to_string()))
            .collect();
        if listeners != world.state.listeners {
            world.state.listeners = listeners;
            world.dirty = true;
        }
        Ok(())
    }
}

/// The proxy balancer that serves a service's preview listener (`preview:web`): a name no
/// sensible `balancer` block takes.
pub(crate) fn preview_balancer(service: &str) -> String {
    format!("preview:{service}")
}

/// Operations that record what runs (instances started, drained, adopted) without changing
/// what was asked for. They do not make a saved plan stale: the plan depends only on the
/// services, releases and balancers that applies write.
pub(crate) const RUNTIME_OPERATIONS: [&str; 5] =
    ["reconcile", "launch", "retire", "recover", "down"];

/// Refuses a plan that was made against another state, or before a later apply.
fn check_plan(plan: &Plan, world: &World, versions: &[kiln_state::VersionInfo]) -> Result<()> {
    if plan.lineage != world.lineage {
        return Err(Error::PlanRefused(format!(
            "the plan was made for another state (lineage {}), not this one (lineage {}); run `kiln plan` here",
            plan.lineage, world.lineage
        )));
    }
    if plan.serial > world.serial {
        return Err(Error::PlanRefused(format!(
            "the plan was made against state serial {}, which this state (serial {}) never had; run `kiln plan` again",
            plan.serial, world.serial
        )));
    }
    if let Some(v) = versions
        .iter()
        .find(|v| v.serial > plan.serial && !RUNTIME_OPERATIONS.contains(&v.operation.as_str()))
    {
        return Err(Error::PlanRefused(format!(
            "the plan is stale: it was made against state serial {}, and {} by {} changed the state since (serial {}); run `kiln plan` again",
            plan.serial, v.operation, v.actor, v.serial
        )));
    }
    Ok(())
}

/// Records release vN+1 of a service and starts its rollout journal.
fn new_release(
    world: &mut World,
    spec: &kiln_core::state::ServiceSpec,
    req: &ApplyRequest,
    deployment_id: &str,
    now: SystemTime,
) -> u32 {
    let service = world
        .state
        .services
        .entry(spec.name.clone())
        .or_insert_with(|| ServiceState {
            spec: spec.clone(),
            releases: Vec::new(),
            stable: None,
            instances: Vec::new(),
            rollout: None,
        });
    let number = service.releases.last().map_or(1, |r| r.number + 1);
    service.releases.push(Release {
        number,
        image: spec.image.clone(),
        image_digest: spec.image_digest.clone(),
        config_hash: spec.config_hash(),
        port: spec.port,
        env: spec.env.clone(),
        health: spec.health.clone(),
        git_commit: req.git_commit.clone(),
        deployment_id: deployment_id.to_owned(),
        created_at: rfc3339(now),
        actor: req.actor.clone(),
        status: ReleaseStatus::Pending,
        rollback_of: None,
    });
    service.spec = spec.clone();
    let from = service.stable;
    let journal = rollout::start(deployment_id, &spec.name, from, number, spec, ms(now));
    service.rollout = Some(journal);
    let message = match from {
        Some(f) => format!("release v{number} created; rolling out from v{f}"),
        None => format!("release v{number} created"),
    };
    world.event(Some(&spec.name), "release", message);
    number
}

/// Who is acting: `user@host`.
pub fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(user_of_this_process)
        .unwrap_or_else(|| "unknown".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{user}@{host}")
}

/// The name of this process's user from /etc/passwd (services and CI often have no `$USER`).
fn user_of_this_process() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_owned();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)? == uid).then(|| name.to_owned())
    })
}

/// Why an engine stopped by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// Nothing happened for `idle_exit`.
    Idle,
    /// It cannot go on: the team backend refused a write or the lease was lost.
    Failed(String),
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idle => f.write_str("idle"),
            Self::Failed(why) => f.write_str(why),
        }
    }
}

/// Takes the team backend's lease and starts from its document: adopted (written here as a
/// new local version) when it differs from the local one, created from the local one when
/// the backend has none yet.
fn take_remote(
    remote: &dyn RemoteState,
    db: &StateStore,
    local: kiln_state::Versioned<State>,
    wait: Duration,
    now: SystemTime,
) -> Result<kiln_state::Versioned<State>> {
    let who = format!("kiln server {} ({})", std::process::id(), actor());
    let found = remote.acquire(&who, wait, now).map_err(Error::Remote)?;
    let local_doc = serde_json::to_value(&local.doc)?;
    match found {
        None => {
            remote
                .write(&local_doc, &actor(), "create", now)
                .map_err(Error::Remote)?;
            tracing::info!(backend = %remote.describe(), "created the team state from this machine's");
            Ok(local)
        }
        Some(r) if r.doc == local_doc => Ok(local),
        Some(r) => {
            let doc: State = serde_json::from_value(r.doc).map_err(|e| {
                Error::Remote(format!(
                    "the state in {} is not a kiln state: {e}",
                    remote.describe()
                ))
            })?;
            let meta = WriteMeta {
                actor: actor(),
                operation: format!("pull {} serial {}", remote.describe(), r.serial),
            };
            let serial = db.write(local.serial, &doc, &meta, &[], now)?;
            tracing::info!(backend = %remote.describe(), serial = r.serial, "started from the team state");
            Ok(kiln_state::Versioned {
                serial,
                doc,
                ..local
            })
        }
    }
}
