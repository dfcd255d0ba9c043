//! Active health checks: the pure state transition and the task that runs the checks.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::backend::Backend;
use crate::model::{BackendHealth, HealthCheck};

/// How one service's backends are checked, with the defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckSpec {
    /// `None` is a TCP connect check.
    pub(crate) path: Option<String>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) healthy_threshold: u32,
    pub(crate) unhealthy_threshold: u32,
}

impl CheckSpec {
    /// Without an HTTP check, a TCP connect every second: one success makes a backend healthy,
    /// three failures in a row make it unhealthy.
    pub(crate) fn new(check: Option<&HealthCheck>, connect_timeout: Duration) -> Self {
        match check {
            Some(c) => Self {
                path: Some(c.path.clone()),
                interval: c.interval,
                timeout: c.timeout,
                healthy_threshold: c.healthy_threshold.max(1),
                unhealthy_threshold: c.unhealthy_threshold.max(1),
            },
            None => Self {
                path: None,
                interval: Duration::from_secs(1),
                timeout: connect_timeout,
                healthy_threshold: 1,
                unhealthy_threshold: 3,
            },
        }
    }
}

impl BackendHealth {
    /// A new backend: unhealthy until it has passed `healthy_threshold` checks.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            healthy: false,
            passes: 0,
            failures: 0,
            checks: 0,
            since: now,
            last_error: None,
        }
    }

    /// Applies one check result; returns whether `healthy` changed.
    pub(crate) fn observe(
        &mut self,
        result: Result<(), String>,
        now: Instant,
        spec: &CheckSpec,
    ) -> bool {
        self.checks += 1;
        let before = self.healthy;
        match result {
            Ok(()) => {
                self.passes = self.passes.saturating_add(1);
                self.failures = 0;
                if !self.healthy && self.passes >= spec.healthy_threshold {
                    self.healthy = true;
                }
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.passes = 0;
                self.last_error = Some(e);
                if self.healthy && self.failures >= spec.unhealthy_threshold {
                    self.healthy = false;
                }
            }
        }
        if before != self.healthy {
            self.since = now;
        }
        before != self.healthy
    }
}

/// Starts the checker of `backend`. It holds only a weak reference between checks, so it ends by
/// itself once the backend is gone; removal also aborts it at once.
pub(crate) fn spawn_checker(
    backend: &Arc<Backend>,
    idle_timeout: Duration,
) -> tokio::task::AbortHandle {
    let weak: Weak<Backend> = Arc::downgrade(backend);
    let addr = backend.addr;
    let host = backend.host_header.clone();
    tokio::spawn(async move {
        loop {
            let Some(spec) = weak.upgrade().map(|b| b.check_spec()) else {
                return;
            };
            let result = check_once(&spec, addr, &host).await;
            let Some(b) = weak.upgrade() else { return };
            let now = Instant::now();
            b.observe(result, now);
            // The checker's tick is also when idle upstream connections past their time go.
            b.prune_idle(now, idle_timeout);
            drop(b);
            tokio::time::sleep(spec.interval).await;
        }
    })
    .abort_handle()
}

async fn check_once(spec: &CheckSpec, addr: SocketAddr, host: &HeaderValue) -> Result<(), String> {
    let check = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let Some(path) = &spec.path else {
            return Ok(());
        };
        let _ = stream.set_nodelay(true);
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let req = Request::get(path.as_str())
            .header(header::HOST, host)
            .header(header::USER_AGENT, "kiln-health-check")
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("invalid health check path {path:?}: {e}"))?;
        // The connection is driven here rather than spawned, so a timeout drops it with the check.
        let mut conn = std::pin::pin!(conn);
        let mut res = std::pin::pin!(tx.send_request(req));
        let res = tokio::select! {
            res = &mut res => res,
            // A small response with `Connection: close` can end the connection in the same poll
            // that delivers the response; either way the response (or its error) is there now.
            _ = &mut conn => res.await,
        }
        .map_err(|e| format!("request: {e}"))?;
        let status = res.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("status {}", status.as_u16()))
        }
    };
    match tokio::time::timeout(spec.timeout, check).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_need_consecutive_results() {
        let spec = CheckSpec {
            path: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        };
        let t0 = Instant::now();
        let mut h = BackendHealth::new(t0);
        let fail = || Err("boom".to_owned());
        assert!(!h.observe(Ok(()), t0, &spec));
        assert!(!h.observe(fail(), t0, &spec));
        assert!(!h.observe(Ok(()), t0, &spec));
        let t1 = t0 + Duration::from_secs(5);
        assert!(h.observe(Ok(()), t1, &spec));
        assert!(h.healthy && h.since == t1 && h.passes == 2);
        assert!(!h.observe(fail(), t1, &spec));
        assert!(!h.observe(fail(), t1, &spec));
        assert!(h.observe(fail(), t1, &spec));
        assert!(!h.healthy && h.failures == 3 && h.checks == 7);
        assert_eq!(h.last_error.as_deref(), Some("boom"));
    }
}
