//! [`AlbTraffic`]: the engine's traffic tables carried out by an application load balancer.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kiln_proxy::{
    BackendHealth, BackendSnapshot, BalancerSnapshot, BoxFuture, DrainOutcome, PoolSnapshot,
    ProxyError, ProxySnapshot, ReleaseMetrics, RouteTarget, ServiceSnapshot, ServiceTable, Traffic,
};
use tokio::sync::Notify;

use super::AwsRuntime;
use crate::fleet::{Balancer, RouteSpec, TargetHealth};

/// How often the load balancer's targets and listener are read back when nothing changes.
const POLL: Duration = Duration::from_secs(5);
/// Between two looks at a draining target.
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// kiln's traffic layer on AWS. Each balancer is an application load balancer whose HTTP
/// listener listens on the port of the balancer's `listen`; each release pool is its
/// release's target group; the pools' weights are the weights of the listener's forward
/// action (the route `/`) or of a rule per other path prefix; a release being previewed gets
/// a rule for the header `X-Kiln-Preview: 1`. Instances are registered in their release's
/// target group only while the engine routes them, and health is the target group's.
///
/// Calls return at once; a background task makes the load balancer match the newest tables
/// and reads back what it really does, which [`Traffic::snapshot`] reports (so a weight
/// changed by hand in the console shows as routing drift). Not supported on AWS: routes by
/// `host`, `preview_listen` (use the header), and request metrics (canary analysis sees no
/// requests, which is inconclusive, never a pass: use timed steps or `kiln rollout promote`).
#[derive(Debug, Clone)]
pub struct AlbTraffic {
    rt: Arc<AwsRuntime>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    wanted: Mutex<Wanted>,
    seen: Mutex<Seen>,
    wake: Notify,
}

/// What the engine asked for.
#[derive(Debug, Default, Clone)]
struct Wanted {
    /// Balancer → listener port.
    balancers: BTreeMap<String, u16>,
    routes: BTreeMap<String, Vec<RouteTarget>>,
    services: BTreeMap<String, ServiceTable>,
    /// Grows with every call that changes what is wanted.
    generation: u64,
}

/// What the background task made and read back.
#[derive(Debug, Default)]
struct Seen {
    balancers: BTreeMap<String, Balancer>,
    /// The generation last carried out.
    applied: u64,
    /// `(target group, EC2 id)` pairs registered.
    registered: BTreeSet<(String, String)>,
    /// kiln instance id → health.
    health: BTreeMap<String, BackendHealth>,
    /// Kiln instance ids being drained.
    draining: BTreeSet<String>,
    /// `(service, release)` of every pool in the tables last carried out.
    pools: BTreeSet<(String, u32)>,
    snapshot: ProxySnapshot,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AlbTraffic {
    /// A traffic layer on `rt`; starts its background task on the AWS runtime.
    pub fn new(rt: Arc<AwsRuntime>) -> Self {
        let traffic = Self {
            rt,
            shared: Arc::new(Shared::default()),
        };
        let worker = traffic.clone();
        traffic.rt.spawn(async move { worker.run().await });
        traffic
    }

    fn want(&self, change: impl FnOnce(&mut Wanted)) {
        let mut wanted = lock(&self.shared.wanted);
        change(&mut wanted);
        wanted.generation += 1;
        drop(wanted);
        self.shared.wake.notify_one();
    }

    async fn run(self) {
        loop {
            let wanted = lock(&self.shared.wanted).clone();
            if let Err(e) = self.apply(&wanted).await {
                tracing::warn!("load balancer: {e}");
            }
            if let Err(e) = self.read_back(&wanted).await {
                tracing::warn!("reading back the load balancer: {e}");
            }
            let _ = tokio::time::timeout(POLL, self.shared.wake.notified()).await;
        }
    }

    /// Makes the load balancers, registrations and listeners match `wanted`, if it is newer
    /// than what was carried out.
    async fn apply(&self, wanted: &Wanted) -> crate::Result<()> {
        if lock(&self.shared.seen).applied == wanted.generation {
            return Ok(());
        }
        let fleet = self.rt.fleet();
        for (name, port) in &wanted.balancers {
            if lock(&self.shared.seen).balancers.contains_key(name) {
                continue;
            }
            let made = fleet.ensure_balancer(name, *port).await?;
            tracing::info!(balancer = %name, dns = %made.dns_name, "load balancer ready");
            lock(&self.shared.seen).balancers.insert(name.clone(), made);
        }
        // Registrations: exactly the routable backends of every pool.
        let mut want_registered = BTreeSet::new();
        let mut ports = BTreeMap::new();
        for (service, table) in &wanted.services {
            for pool in &table.pools {
                let Some(res) = self.rt.release(service, pool.release) else {
                    continue;
                };
                for b in pool.backends.iter().filter(|b| b.routable) {
                    if let Some(ec2) = self.rt.ec2_id(&b.id) {
                        ports.insert(ec2.clone(), b.addr.port());
                        want_registered.insert((res.target_group_arn.clone(), ec2));
                    }
                }
            }
        }
        let (registered, draining) = {
            let seen = lock(&self.shared.seen);
            (seen.registered.clone(), seen.draining.clone())
        };
        for (tg, ec2) in want_registered.difference(&registered) {
            fleet.register(tg, ec2, ports[ec2]).await?;
        }
        let draining_ec2: BTreeSet<String> = draining
            .iter()
            .filter_map(|id| self.rt.ec2_id(id))
            .collect();
        for (tg, ec2) in registered.difference(&want_registered) {
            if !draining_ec2.contains(ec2) {
                fleet.deregister(tg, ec2).await?;
            }
        }
        lock(&self.shared.seen).registered = want_registered;
        // Listeners.
        for (balancer, routes) in &wanted.routes {
            let Some(lb) = lock(&self.shared.seen).balancers.get(balancer).cloned() else {
                continue;
            };
            let specs = self.route_specs(wanted, routes);
            fleet.set_routes(&lb, &specs).await?;
        }
        // A release whose pool left every table has no instance left and no listener
        // sends it anything any more: its group and target group go (the launch template
        // version stays, for a rollback).
        let pools: BTreeSet<(String, u32)> = wanted
            .services
            .iter()
            .flat_map(|(s, t)| t.pools.iter().map(move |p| (s.clone(), p.release)))
            .collect();
        let gone: Vec<(String, u32)> = lock(&self.shared.seen)
            .pools
            .difference(&pools)
            .cloned()
            .collect();
        for (service, release) in gone {
            fleet.delete_release(&service, release).await?;
            self.rt.forget_release(&service, release);
            tracing::info!(%service, release, "deleted the group and target group of a retired release");
        }
        let mut seen = lock(&self.shared.seen);
        seen.pools = pools;
        seen.applied = wanted.generation;
        Ok(())
    }

    /// The listener routes for a balancer's routes: each service's pools as weighted target
    /// groups, its preview release as the preview target group.
    fn route_specs(&self, wanted: &Wanted, routes: &[RouteTarget]) -> Vec<RouteSpec> {
        routes
            .iter()
            .filter(|r| {
                if r.host.is_some() {
                    tracing::warn!(
                        service = %r.service,
                        "routes by host are not supported on AWS yet; route skipped"
                    );
                }
                r.host.is_none()
            })
            .map(|r| {
                let table = wanted.services.get(&r.service);
                let tg = |release: u32| {
                    self.rt
                        .release(&r.service, release)
                        .map(|res| res.target_group_arn)
                };
                let weights = table
                    .map(|t| {
                        t.pools
                            .iter()
                            .filter_map(|p| Some((tg(p.release)?, p.weight)))
                            .collect()
                    })
                    .unwrap_or_default();
                let preview = table.and_then(|t| t.preview).and_then(tg);
                RouteSpec {
                    path_prefix: r.path_prefix.clone(),
                    weights,
                    preview,
                }
            })
            .collect()
    }

    /// Reads the target groups' health and the listeners' weights back into the snapshot.
    async fn read_back(&self, wanted: &Wanted) -> crate::Result<()> {
        let fleet = self.rt.fleet();
        let mut health_by_ec2: BTreeMap<String, TargetHealth> = BTreeMap::new();
        let mut tgs = BTreeSet::new();
        for (service, table) in &wanted.services {
            for pool in &table.pools {
                if let Some(res) = self.rt.release(service, pool.release) {
                    tgs.insert(res.target_group_arn);
                }
            }
        }
        for tg in &tgs {
            health_by_ec2.extend(fleet.target_health(tg).await?);
        }
        // Weights as the listeners have them, by target group.
        let mut weights: BTreeMap<String, u32> = BTreeMap::new();
        let mut preview_tgs = BTreeSet::new();
        let balancers: Vec<(String, Balancer)> = lock(&self.shared.seen)
            .balancers
            .iter()
            .map(|(n, b)| (n.clone(), b.clone()))
            .collect();
        for (_, lb) in &balancers {
            for route in fleet.routes(lb).await? {
                for (tg, w) in route.weights {
                    *weights.entry(tg).or_default() += w;
                }
                preview_tgs.extend(route.preview);
            }
        }
        let mut seen = lock(&self.shared.seen);
        let mut services = Vec::new();
        for (service, table) in &wanted.services {
            let mut pools = Vec::new();
            let mut preview = None;
            for pool in &table.pools {
                let tg = self
                    .rt
                    .release(service, pool.release)
                    .map(|r| r.target_group_arn);
                if tg.as_ref().is_some_and(|t| preview_tgs.contains(t)) {
                    preview = Some(pool.release);
                }
                let backends = pool
                    .backends
                    .iter()
                    .map(|b| {
                        let ec2 = self.rt.ec2_id(&b.id);
                        let state = ec2.as_ref().and_then(|e| health_by_ec2.get(e));
                        let healthy = matches!(state, Some(TargetHealth::Healthy));
                        let last_error = match state {
                            Some(TargetHealth::Unhealthy(reason)) => Some(reason.clone()),
                            _ => None,
                        };
                        let previous = seen.health.get(&b.id).cloned();
                        let since = match &previous {
                            Some(p) if p.healthy == healthy => p.since,
                            _ => tokio::time::Instant::now(),
                        };
                        let checks = previous.as_ref().map_or(0, |p| p.checks) + 1;
                        seen.health.insert(
                            b.id.clone(),
                            BackendHealth {
                                healthy,
                                passes: u32::from(healthy),
                                failures: u32::from(!healthy && state.is_some()),
                                checks,
                                since,
                                last_error,
                            },
                        );
                        BackendSnapshot {
                            id: b.id.clone(),
                            addr: b.addr,
                            routable: ec2.as_ref().is_some_and(|e| {
                                tg.as_ref().is_some_and(|t| {
                                    seen.registered.contains(&(t.clone(), e.clone()))
                                })
                            }),
                            healthy,
                            draining: matches!(state, Some(TargetHealth::Draining))
                                || seen.draining.contains(&b.id),
                            in_flight: 0,
                        }
                    })
                    .collect();
                pools.push(PoolSnapshot {
                    release: pool.release,
                    weight: tg.and_then(|t| weights.get(&t).copied()).unwrap_or(0),
                    backends,
                });
            }
            services.push(ServiceSnapshot {
                name: service.clone(),
                pools,
                preview,
            });
        }
        let balancers = wanted
            .balancers
            .iter()
            .map(|(name, port)| BalancerSnapshot {
                name: name.clone(),
                addr: seen
                    .balancers
                    .contains_key(name)
                    .then(|| SocketAddr::from(([0, 0, 0, 0], *port))),
                routes: wanted.routes.get(name).cloned().unwrap_or_default(),
                preview: false,
            })
            .collect();
        seen.snapshot = ProxySnapshot {
            balancers,
            services,
        };
        Ok(())
    }

    async fn drain_now(&self, service: String, id: String, timeout: Duration) -> DrainOutcome {
        let Some(ec2) = self.rt.ec2_id(&id) else {
            return DrainOutcome::NotFound;
        };
        let release = lock(&self.shared.wanted)
            .services
            .get(&service)
            .and_then(|t| {
                t.pools
                    .iter()
                    .find(|p| p.backends.iter().any(|b| b.id == id))
                    .map(|p| p.release)
            });
        let Some(res) = release.and_then(|r| self.rt.release(&service, r)) else {
            return DrainOutcome::NotFound;
        };
        let tg = res.target_group_arn;
        lock(&self.shared.seen).draining.insert(id.clone());
        let fleet = self.rt.fleet();
        let outcome = match fleet.deregister(&tg, &ec2).await {
            Err(e) => {
                tracing::warn!(instance = %id, "deregistering: {e}");
                DrainOutcome::TimedOut { in_flight: 0 }
            }
            Ok(()) => {
                let waited = tokio::time::timeout(timeout, async {
                    loop {
                        match fleet.target_health(&tg).await {
                            Ok(h) if !matches!(h.get(&ec2), Some(TargetHealth::Draining)) => {
                                break;
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(instance = %id, "draining: {e}"),
                        }
                        tokio::time::sleep(DRAIN_POLL).await;
                    }
                })
                .await;
                match waited {
                    Ok(()) => DrainOutcome::Drained,
                    Err(_) => DrainOutcome::TimedOut { in_flight: 0 },
                }
            }
        };
        let mut seen = lock(&self.shared.seen);
        seen.draining.remove(&id);
        seen.registered.remove(&(tg, ec2));
        seen.health.remove(&id);
        outcome
    }

    /// Runs `fut` on the AWS runtime and awaits it from any runtime.
    fn on_aws<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> BoxFuture<'static, Option<T>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        Box::pin(async move { rx.await.ok() })
    }
}

impl Traffic for AlbTraffic {
    fn kind(&self) -> &'static str {
        "alb"
    }

    fn bind<'a>(
        &'a self,
        balancer: &'a str,
        addr: SocketAddr,
    ) -> BoxFuture<'a, Result<SocketAddr, ProxyError>> {
        let name = balancer.to_owned();
        self.want(|w| {
            w.balancers.insert(name.clone(), addr.port());
        });
        let this = self.clone();
        let made = self.on_aws(async move {
            this.rt
                .fleet()
                .ensure_balancer(&name, addr.port())
                .await
                .inspect(|lb| {
                    lock(&this.shared.seen).balancers.insert(name, lb.clone());
                })
        });
        let balancer = balancer.to_owned();
        Box::pin(async move {
            match made.await {
                Some(Ok(lb)) => {
                    tracing::info!(%balancer, dns = %lb.dns_name, "listening");
                    Ok(SocketAddr::from(([0, 0, 0, 0], addr.port())))
                }
                Some(Err(e)) => Err(ProxyError::Remote {
                    name: balancer,
                    detail: e.to_string(),
                }),
                None => Err(ProxyError::Remote {
                    name: balancer,
                    detail: "the AWS runtime stopped".to_owned(),
                }),
            }
        })
    }

    fn bind_preview<'a>(
        &'a self,
        balancer: &'a str,
        _addr: SocketAddr,
        _service: &'a str,
    ) -> BoxFuture<'a, Result<SocketAddr, ProxyError>> {
        Box::pin(async move {
            Err(ProxyError::Remote {
                name: balancer.to_owned(),
                detail: "preview_listen is not supported on AWS; send the header X-Kiln-Preview: 1 to the balancer instead".to_owned(),
            })
        })
    }

    fn unbind<'a>(&'a self, balancer: &'a str) -> BoxFuture<'a, ()> {
        // The load balancer stays: it has a DNS name that clients use.
        self.want(|w| {
            w.balancers.remove(balancer);
            w.routes.remove(balancer);
        });
        Box::pin(async {})
    }

    fn set_routes(&self, balancer: &str, routes: Vec<RouteTarget>) {
        self.want(|w| {
            w.routes.insert(balancer.to_owned(), routes);
        });
    }

    fn set_service(&self, service: &str, table: ServiceTable) {
        self.want(|w| {
            w.services.insert(service.to_owned(), table);
        });
    }

    fn remove_service(&self, service: &str) {
        self.want(|w| {
            w.services.remove(service);
        });
    }

    fn backend_health(&self, backend_id: &str) -> Option<BackendHealth> {
        lock(&self.shared.seen).health.get(backend_id).cloned()
    }

    fn drain<'a>(
        &'a self,
        service: &'a str,
        backend_id: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, DrainOutcome> {
        let this = self.clone();
        let (service, id) = (service.to_owned(), backend_id.to_owned());
        let drained = self.on_aws(async move { this.drain_now(service, id, timeout).await });
        Box::pin(async move { drained.await.unwrap_or(DrainOutcome::NotFound) })
    }

    fn metrics(&self, _service: &str) -> BTreeMap<u32, ReleaseMetrics> {
        BTreeMap::new()
    }

    fn snapshot(&self) -> ProxySnapshot {
        lock(&self.shared.seen).snapshot.clone()
    }
}
