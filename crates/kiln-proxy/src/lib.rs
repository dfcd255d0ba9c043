//! kiln's HTTP reverse proxy: the traffic-shifting half of a rollout on the local runtime.
//!
//! A [`Proxy`] holds **balancers** (listeners with host / path-prefix routes to services) and
//! **services** (one [`ServiceTable`] each: release pools with weights, and a health check). The
//! engine drives it with plain calls — [`Proxy::set_service`] to shift weights or add instances,
//! [`Proxy::backend_health`] to learn when a new instance may take traffic, [`Proxy::drain`]
//! before stopping one — and reads [`Proxy::metrics`] for the rollout's analysis.
//!
//! - **Weights** are exact shares: pools are chosen by smooth weighted round-robin (90/10 sends
//!   exactly one request in ten to the second pool), then backends round-robin inside a pool.
//! - **Health**: every backend is checked actively (HTTP or TCP), whether routable or not, and a
//!   refused connection on a real request counts as a failed check at once.
//! - **Zero downtime**: a table swap is one pointer swap (requests keep the backend they got), a
//!   connect failure is retried once on another backend, and drained backends finish their
//!   requests before they leave the table.
//!
//! The proxy decides nothing about rollouts; it does what the engine tells it and reports what
//! it sees.
//!
//! ```
//! use std::time::Duration;
//! use kiln_proxy::{BackendSpec, Pool, Proxy, ProxyConfig, RouteTarget, ServiceTable};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let rt = tokio::runtime::Runtime::new()?;
//! rt.block_on(async {
//!     let proxy = Proxy::new(ProxyConfig::default());
//!     // Release 1 gets 90 % of the requests, the canary release 2 gets 10 %.
//!     proxy.set_service("web", ServiceTable {
//!         pools: vec![
//!             Pool { release: 1, weight: 90, backends: vec![BackendSpec {
//!                 id: "web-1-a".into(), addr: "127.0.0.1:9001".parse()?, routable: true }], health: None },
//!             Pool { release: 2, weight: 10, backends: vec![BackendSpec {
//!                 id: "web-2-a".into(), addr: "127.0.0.1:9002".parse()?, routable: true }], health: None },
//!         ],
//!         health: None,
//!         // No preview: `X-Kiln-Preview` requests follow the weights like the others.
//!         preview: None,
//!     });
//!     proxy.set_routes("public", vec![RouteTarget {
//!         host: None, path_prefix: "/".into(), service: "web".into() }]);
//!     let addr = proxy.bind("public", "127.0.0.1:0".parse()?).await?;
//!     println!("listening on {addr}");
//!     // Before stopping an instance: no new requests, wait for the ones it serves.
//!     let outcome = proxy.drain("web", "web-1-a", Duration::from_secs(30)).await;
//!     println!("{outcome:?}");
//!     proxy.unbind("public").await;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })
//! # }
//! ```

mod backend;
mod error;
mod forward;
mod health;
mod listener;
mod metrics;
mod model;
mod routes;
mod table;
mod traffic;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

pub use error::ProxyError;
pub use forward::{ProxyBody, X_KILN_PREVIEW, X_KILN_RELEASE};
pub use metrics::{BUCKETS, LatencyHistogram, ReleaseMetrics, bucket_upper_micros};
pub use model::{
    BackendHealth, BackendSnapshot, BackendSpec, BalancerSnapshot, DrainOutcome, HealthCheck, Pool,
    PoolSnapshot, ProxyConfig, ProxySnapshot, RouteTarget, ServiceSnapshot, ServiceTable,
};
pub use traffic::{BoxFuture, Traffic};

use backend::{Backend, lock};
use health::CheckSpec;
use listener::BalancerState;
use routes::Routes;
use table::{Member, PoolState, Service, Table};

/// The proxy. Cheap to clone: clones share one state.
#[derive(Debug, Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: ProxyConfig,
    /// Read on every request (briefly, to clone an `Arc`); written only by control calls.
    services: RwLock<HashMap<String, Arc<Service>>>,
    /// Every backend by id, across services. Its lock also serialises table changes, so a drain's
    /// removal and a `set_service` never interleave.
    backends: Mutex<HashMap<String, Arc<Backend>>>,
    balancers: Mutex<BTreeMap<String, Arc<BalancerState>>>,
}

impl Inner {
    pub(crate) fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn balancer(&self, name: &str) -> Arc<BalancerState> {
        Arc::clone(lock(&self.balancers).entry(name.to_owned()).or_default())
    }
}

/// Takes a backend out of the registry (if it is still the one registered under its id) and
/// stops its checks and pooling.
fn retire(registry: &mut HashMap<String, Arc<Backend>>, backend: &Arc<Backend>) {
    if registry
        .get(&backend.id)
        .is_some_and(|b| Arc::ptr_eq(b, backend))
    {
        registry.remove(&backend.id);
    }
    backend.retire();
}

impl Proxy {
    /// Creates a proxy with no balancers and no services. Must be called inside a tokio runtime,
    /// which later calls use to run listeners and health checkers.
    pub fn new(config: ProxyConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                services: RwLock::new(HashMap::new()),
                backends: Mutex::new(HashMap::new()),
                balancers: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Starts listening for balancer `balancer` (HTTP/1.1 and h2c) and returns the bound address,
    /// which tells the real port when `addr` asks for port 0.
    pub async fn bind(&self, balancer: &str, addr: SocketAddr) -> Result<SocketAddr, ProxyError> {
        self.inner
            .balancer(balancer)
            .bind(&self.inner, balancer, addr, false)
            .await
    }

    /// Starts listening for balancer `balancer` in **preview mode**: every request it accepts
    /// goes to `service` and is served by the service's preview release
    /// ([`ServiceTable::preview`]), whatever its headers and the weights; with no preview set,
    /// or no backend of it able to serve, the answer is a 503. Returns the bound address.
    /// [`Proxy::unbind`] stops it like any balancer.
    pub async fn bind_preview(
        &self,
        balancer: &str,
        addr: SocketAddr,
        service: &str,
    ) -> Result<SocketAddr, ProxyError> {
        let state = self.inner.balancer(balancer);
        if let Some(addr) = state.addr() {
            return Err(ProxyError::AlreadyBound {
                name: balancer.to_owned(),
                addr,
            });
        }
        state.set_routes(Routes::new(vec![RouteTarget {
            host: None,
            path_prefix: "/".to_owned(),
            service: service.to_owned(),
        }]));
        state.bind(&self.inner, balancer, addr, true).await
    }

    /// Stops accepting connections for `balancer` and waits (up to the drain timeout) for the
    /// requests in flight to finish. Its routes are kept for a later `bind`.
    pub async fn unbind(&self, balancer: &str) {
        let state = lock(&self.inner.balancers).get(balancer).cloned();
        if let Some(state) = state {
            state.unbind().await;
        }
    }

    /// Replaces the routes of `balancer`. The longest matching prefix wins, host-specific routes
    /// before host-less ones; a request no route matches gets a 404.
    pub fn set_routes(&self, balancer: &str, routes: Vec<RouteTarget>) {
        self.inner
            .balancer(balancer)
            .set_routes(Routes::new(routes));
    }

    /// Replaces the pools of `service` in one swap: requests already in flight keep their
    /// backend, new ones see the new table. Backends keep their health state by id (if their
    /// address is unchanged); new ones start unhealthy and are checked at once; backends no
    /// longer listed stop being checked. Call it within the tokio runtime the proxy runs on: it
    /// starts the health checkers of new backends there.
    pub fn set_service(&self, service: &str, table: ServiceTable) {
        let inner = &self.inner;
        let mut registry = lock(&inner.backends);
        let svc = Arc::clone(
            inner
                .services
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(service.to_owned())
                .or_insert_with(|| Arc::new(Service::new())),
        );
        let preview = table.preview;
        let mut pools = Vec::with_capacity(table.pools.len());
        for pool in table.pools {
            let health = pool.health.as_ref().or(table.health.as_ref());
            let spec = CheckSpec::new(health, inner.config.connect_timeout);
            let members = pool
                .backends
                .into_iter()
                .map(|b| {
                    let backend = match registry.get(&b.id) {
                        Some(existing) if existing.addr == b.addr => {
                            if existing.check_spec() != spec {
                                existing.set_check_spec(spec.clone());
                            }
                            Arc::clone(existing)
                        }
                        _ => {
                            let new = Backend::start(
                                b.id.clone(),
                                b.addr,
                                spec.clone(),
                                inner.config.upstream_idle_timeout,
                            );
                            if let Some(old) = registry.insert(b.id, Arc::clone(&new)) {
                                old.retire();
                            }
                            new
                        }
                    };
                    Member {
                        backend,
                        routable: b.routable,
                    }
                })
                .collect();
            pools.push(PoolState::new(
                pool.release,
                pool.weight,
                svc.counters(pool.release),
                members,
            ));
        }
        let old = svc.swap(Table::new(pools, preview));
        let current = svc.table();
        for b in old.backends() {
            if !current.backends().any(|n| Arc::ptr_eq(n, b)) {
                retire(&mut registry, b);
            }
        }
    }

    /// Removes `service`: its routes answer 503 from now on, and its backends stop being checked.
    pub fn remove_service(&self, service: &str) {
        let mut registry = lock(&self.inner.backends);
        let removed = self
            .inner
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(service);
        if let Some(svc) = removed {
            for b in svc.table().backends() {
                retire(&mut registry, b);
            }
        }
    }

    /// The health of backend `backend_id`, if some service lists it.
    pub fn backend_health(&self, backend_id: &str) -> Option<BackendHealth> {
        lock(&self.inner.backends)
            .get(backend_id)
            .map(|b| b.health())
    }

    /// Stops sending new requests to the backend now and resolves once it serves none
    /// ([`DrainOutcome::Drained`]) or at `timeout` ([`DrainOutcome::TimedOut`], the requests
    /// keep running). Either way the backend then leaves the service's table.
    pub async fn drain(&self, service: &str, backend_id: &str, timeout: Duration) -> DrainOutcome {
        let Some(svc) = self.inner.service(service) else {
            return DrainOutcome::NotFound;
        };
        let Some(backend) = svc.table().backends().find(|b| b.id == backend_id).cloned() else {
            return DrainOutcome::NotFound;
        };
        let left = backend.drain(timeout).await;
        {
            let mut registry = lock(&self.inner.backends);
            let table = svc.table();
            if table.backends().any(|b| Arc::ptr_eq(b, &backend)) {
                svc.swap(table.without(backend_id));
            }
            retire(&mut registry, &backend);
        }
        if left == 0 {
            DrainOutcome::Drained
        } else {
            DrainOutcome::TimedOut { in_flight: left }
        }
    }

    /// Cumulative request metrics of `service`, per release number.
    pub fn metrics(&self, service: &str) -> BTreeMap<u32, ReleaseMetrics> {
        let Some(svc) = self.inner.service(service) else {
            return BTreeMap::new();
        };
        lock(&svc.metrics)
            .iter()
            .map(|(r, c)| (*r, c.read()))
            .collect()
    }

    /// What the proxy serves now.
    pub fn snapshot(&self) -> ProxySnapshot {
        let balancers = lock(&self.inner.balancers)
            .iter()
            .map(|(name, b)| BalancerSnapshot {
                name: name.clone(),
                addr: b.addr(),
                routes: b.routes().targets().to_vec(),
                preview: b.preview(),
            })
            .collect();
        let services: Vec<(String, Arc<Service>)> = self
            .inner
            .services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(n, s)| (n.clone(), Arc::clone(s)))
            .collect();
        let mut services: Vec<ServiceSnapshot> = services
            .into_iter()
            .map(|(name, svc)| {
                let table = svc.table();
                ServiceSnapshot {
                    name,
                    preview: table.preview,
                    pools: table
                        .pools
                        .iter()
                        .map(|p| PoolSnapshot {
                            release: p.release,
                            weight: p.weight,
                            backends: p
                                .members
                                .iter()
                                .map(|m| BackendSnapshot {
                                    id: m.backend.id.clone(),
                                    addr: m.backend.addr,
                                    routable: m.routable,
                                    healthy: m.backend.healthy(),
                                    draining: m.backend.draining(),
                                    in_flight: m.backend.in_flight(),
                                })
                                .collect(),
                        })
                        .collect(),
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        ProxySnapshot {
            balancers,
            services,
        }
    }
}
