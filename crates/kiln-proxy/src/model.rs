//! The data the engine hands the proxy, and the data it reads back.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

/// Settings of a [`crate::Proxy`].
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How long to wait for a backend to accept a TCP connection before trying another one.
    pub connect_timeout: Duration,
    /// The longest [`crate::Proxy::unbind`] waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Pooled upstream connections idle for longer than this are closed.
    pub upstream_idle_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            upstream_idle_timeout: Duration::from_secs(90),
        }
    }
}

/// A route of a balancer: requests whose host and path match go to `service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteTarget {
    /// The `Host` to match (case-insensitive, port ignored); `None` matches any host.
    pub host: Option<String>,
    /// The path prefix to match; `"/"` matches every path.
    pub path_prefix: String,
    /// The service that serves matching requests.
    pub service: String,
}

/// Everything the proxy needs to serve one service: its release pools and how to check health.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceTable {
    /// One pool per release that has instances.
    pub pools: Vec<Pool>,
    /// The active health check; `None` checks with a TCP connect every second.
    pub health: Option<HealthCheck>,
    /// The release whose pool serves **preview** requests: those with `X-Kiln-Preview: 1` or a
    /// `kiln-preview=1` cookie, and every request of a listener bound with
    /// [`crate::Proxy::bind_preview`]. They go to its routable, healthy, not draining backends
    /// whatever the weights (a weight of 0 included); other requests follow the weights. `None`
    /// (no preview): the header and cookie are ignored.
    pub preview: Option<u32>,
}

/// The instances of one release and the share of requests they get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// The release number (`v3` is 3).
    pub release: u32,
    /// The pool's share of requests relative to the other pools' weights; 0 gets none.
    pub weight: u32,
    /// The instances of the release.
    pub backends: Vec<BackendSpec>,
    /// This release's own health check, when it differs from the service's: a release that
    /// moved its health endpoint is checked at its new path while the old release is still
    /// checked at the old one.
    pub health: Option<HealthCheck>,
}

/// One instance as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// The instance id, unique across the proxy; health state is kept by id.
    pub id: String,
    /// Where the instance listens.
    pub addr: SocketAddr,
    /// Whether it may get requests; non-routable backends are still health-checked.
    pub routable: bool,
}

/// An HTTP health check: `GET path` every `interval`; a 2xx or 3xx within `timeout` passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The path to request, such as `/healthz`.
    pub path: String,
    /// Time between two checks of one backend.
    pub interval: Duration,
    /// How long one check may take.
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_threshold: u32,
}

/// The health of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendHealth {
    /// Whether the backend may get requests (if routable and not draining).
    pub healthy: bool,
    /// Consecutive passed checks (0 after a failure).
    pub passes: u32,
    /// Consecutive failed checks, passive failures included (0 after a pass).
    pub failures: u32,
    /// Checks run since the backend was first added.
    pub checks: u64,
    /// When `healthy` last changed (or when the backend was added).
    pub since: tokio::time::Instant,
    /// The reason of the last failure, if any.
    pub last_error: Option<String>,
}

/// How a [`crate::Proxy::drain`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DrainOutcome {
    /// The backend finished its last request.
    Drained,
    /// The timeout passed with requests still in flight; they keep running.
    TimedOut {
        /// Requests still in flight at the timeout.
        in_flight: u64,
    },
    /// The service has no backend with this id.
    NotFound,
}

/// What the proxy serves, for `kiln status` and drift checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProxySnapshot {
    /// Balancers by name.
    pub balancers: Vec<BalancerSnapshot>,
    /// Services by name.
    pub services: Vec<ServiceSnapshot>,
}

/// One balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalancerSnapshot {
    /// Its name.
    pub name: String,
    /// The address it listens on, if bound.
    pub addr: Option<SocketAddr>,
    /// Its routes, in the order they are tried.
    pub routes: Vec<RouteTarget>,
    /// Whether it is bound in preview mode ([`crate::Proxy::bind_preview`]).
    pub preview: bool,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSnapshot {
    /// Its name.
    pub name: String,
    /// Its release pools.
    pub pools: Vec<PoolSnapshot>,
    /// The release that serves preview requests, if any.
    pub preview: Option<u32>,
}

/// One release pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolSnapshot {
    /// The release number.
    pub release: u32,
    /// Its weight.
    pub weight: u32,
    /// Its backends.
    pub backends: Vec<BackendSnapshot>,
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendSnapshot {
    /// The instance id.
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Whether the table lets it get requests.
    pub routable: bool,
    /// Whether its health checks pass.
    pub healthy: bool,
    /// Whether it is being drained.
    pub draining: bool,
    /// Requests it is serving now.
    pub in_flight: u64,
}
