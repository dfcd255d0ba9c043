//! The traffic layer as the engine sees it: the [`Traffic`] trait. kiln's own [`Proxy`] is the
//! local implementation; a cloud load balancer (an ALB's weighted target groups) is another.
//! The engine hands every implementation the same tables and routes and reads back the same
//! health, metrics and snapshots, so rollouts, analysis and drift checks do not know which
//! one carries the requests.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use crate::{
    BackendHealth, DrainOutcome, Proxy, ProxyError, ProxySnapshot, ReleaseMetrics, RouteTarget,
    ServiceTable,
};

/// A boxed future, so that [`Traffic`] can be used as `dyn Traffic`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What carries requests to instances. Every method mirrors the [`Proxy`] method of the same
/// name and has the same contract; calls that take effect elsewhere (an API) may take effect
/// later than they return, which [`Traffic::snapshot`] and [`Traffic::backend_health`] show.
pub trait Traffic: Send + Sync + fmt::Debug {
    /// What this is, for `kiln status` (`proxy`, `alb`).
    fn kind(&self) -> &'static str;
    /// Starts serving `balancer` on `addr`; returns where it serves.
    fn bind<'a>(
        &'a self,
        balancer: &'a str,
        addr: SocketAddr,
    ) -> BoxFuture<'a, Result<SocketAddr, ProxyError>>;
    /// Serves `service`'s preview release on `addr`.
    fn bind_preview<'a>(
        &'a self,
        balancer: &'a str,
        addr: SocketAddr,
        service: &'a str,
    ) -> BoxFuture<'a, Result<SocketAddr, ProxyError>>;
    /// Stops serving `balancer`.
    fn unbind<'a>(&'a self, balancer: &'a str) -> BoxFuture<'a, ()>;
    /// Replaces `balancer`'s routes.
    fn set_routes(&self, balancer: &str, routes: Vec<RouteTarget>);
    /// Replaces `service`'s pools, weights and health check.
    fn set_service(&self, service: &str, table: ServiceTable);
    /// Removes `service`.
    fn remove_service(&self, service: &str);
    /// The health of one backend, if some service lists it.
    fn backend_health(&self, backend_id: &str) -> Option<BackendHealth>;
    /// Stops sending new requests to a backend and resolves once it serves none (or at
    /// `timeout`); the backend then leaves its service's table.
    fn drain<'a>(
        &'a self,
        service: &'a str,
        backend_id: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, DrainOutcome>;
    /// Cumulative request metrics of `service` per release; empty where none are measured.
    fn metrics(&self, service: &str) -> BTreeMap<u32, ReleaseMetrics>;
    /// What is served now.
    fn snapshot(&self) -> ProxySnapshot;
}

impl Traffic for Proxy {
    fn kind(&self) -> &'static str {
        "proxy"
    }

    fn bind<'a>(
        &'a self,
        balancer: &'a str,
        addr: SocketAddr,
    ) -> BoxFuture<'a, Result<SocketAddr, ProxyError>> {
        Box::pin(Proxy::bind(self, balancer, addr))
    }

    fn bind_preview<'a>(
        &'a self,
        balancer: &'a str,
        addr: SocketAddr,
        service: &'a str,
    ) -> BoxFuture<'a, Result<SocketAddr, ProxyError>> {
        Box::pin(Proxy::bind_preview(self, balancer, addr, service))
    }

    fn unbind<'a>(&'a self, balancer: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(Proxy::unbind(self, balancer))
    }

    fn set_routes(&self, balancer: &str, routes: Vec<RouteTarget>) {
        Proxy::set_routes(self, balancer, routes);
    }

    fn set_service(&self, service: &str, table: ServiceTable) {
        Proxy::set_service(self, service, table);
    }

    fn remove_service(&self, service: &str) {
        Proxy::remove_service(self, service);
    }

    fn backend_health(&self, backend_id: &str) -> Option<BackendHealth> {
        Proxy::backend_health(self, backend_id)
    }

    fn drain<'a>(
        &'a self,
        service: &'a str,
        backend_id: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, DrainOutcome> {
        Box::pin(Proxy::drain(self, service, backend_id, timeout))
    }

    fn metrics(&self, service: &str) -> BTreeMap<u32, ReleaseMetrics> {
        Proxy::metrics(self, service)
    }

    fn snapshot(&self) -> ProxySnapshot {
        Proxy::snapshot(self)
    }
}
