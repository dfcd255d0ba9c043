//! One backend (an instance): its health, in-flight count, drain flag and pooled upstream
//! connections. A `Backend` outlives table swaps: every table that names its id shares it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use http::HeaderValue;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::health::{CheckSpec, spawn_checker};
use crate::model::BackendHealth;

/// A ready-to-use HTTP/1.1 connection to a backend.
pub(crate) type Sender = SendRequest<Incoming>;

/// Idle connections kept per backend; more than the benchmark's 64 concurrent clients, fewer
/// than would pin many file descriptors on a backend nobody uses any more.
const MAX_IDLE: usize = 256;

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data consistent, so a
/// panic elsewhere must not take the proxy down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) id: String,
    pub(crate) addr: SocketAddr,
    /// `Host` for health checks: the backend's own address.
    pub(crate) host_header: HeaderValue,
    /// Mirrors `health.healthy` so the request path reads one atomic, not a mutex.
    healthy: AtomicBool,
    draining: AtomicBool,
    /// Set once the backend left every table: its connections are no longer pooled.
    retired: AtomicBool,
    in_flight: AtomicU64,
    /// Woken when `in_flight` drops to 0 while draining.
    drained: Notify,
    health: Mutex<BackendHealth>,
    spec: RwLock<CheckSpec>,
    idle: Mutex<Vec<(Sender, Instant)>>,
    checker: Mutex<Option<AbortHandle>>,
}

impl Backend {
    /// Creates the backend and starts its health checker (needs a tokio runtime).
    pub(crate) fn start(
        id: String,
        addr: SocketAddr,
        spec: CheckSpec,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        let host_header = HeaderValue::from_str(&addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let b = Arc::new(Self {
            id,
            addr,
            host_header,
            healthy: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            drained: Notify::new(),
            health: Mutex::new(BackendHealth::new(Instant::now())),
            spec: RwLock::new(spec),
            idle: Mutex::new(Vec::new()),
            checker: Mutex::new(None),
        });
        *lock(&b.checker) = Some(spawn_checker(&b, idle_timeout));
        b
    }

    pub(crate) fn check_spec(&self) -> CheckSpec {
        self.spec
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_check_spec(&self, spec: CheckSpec) {
        *self.spec.write().unwrap_or_else(PoisonError::into_inner) = spec;
    }

    /// Whether new requests may go here (routability is the table's business).
    pub(crate) fn available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.draining.load(Ordering::SeqCst)
    }

    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn health(&self) -> BackendHealth {
        lock(&self.health).clone()
    }

    /// Applies a check result, active or passive.
    pub(crate) fn observe(&self, result: Result<(), String>, now: Instant) {
        let spec = self.check_spec();
        let mut h = lock(&self.health);
        if h.observe(result, now, &spec) {
            self.healthy.store(h.healthy, Ordering::Relaxed);
            tracing::info!(backend = %self.id, healthy = h.healthy, "backend health changed");
        }
    }

    /// Counts a request as in flight, unless the backend started draining meanwhile.
    ///
    /// The increment comes before the drain check and `drain` sets the flag before reading the
    /// count (both `SeqCst`), so either the request sees the flag and backs off, or `drain` sees
    /// the request and waits for it: a drain never reports `Drained` with a request about to start.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<InFlight> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(Arc::clone(self));
        (!self.draining.load(Ordering::SeqCst)).then_some(guard)
    }

    /// Stops new requests and waits until none is in flight or `timeout` passes; returns the
    /// requests still in flight.
    pub(crate) async fn drain(&self, timeout: Duration) -> u64 {
        self.draining.store(true, Ordering::SeqCst);
        self.close_idle();
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.drained.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the count is read, so a wake-up in between is not lost.
            notified.as_mut().enable();
            let n = self.in_flight();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight();
            }
        }
    }

    /// The backend left every table: stop checking it and close its idle connections. Requests
    /// in flight finish on their own connections.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.checker).take() {
            h.abort();
        }
        self.close_idle();
    }

    fn close_idle(&self) {
        let idle = std::mem::take(&mut *lock(&self.idle));
        drop(idle);
    }

    /// A pooled connection that is still open and not idle for too long. One that can take a
    /// request right now is preferred: a connection returned a moment ago may still wait for its
    /// connection task to finish the last response, and waiting on it costs a task switch.
    pub(crate) fn checkout(&self, now: Instant, idle_timeout: Duration) -> Option<Sender> {
        let usable = |(tx, since): &(Sender, Instant)| {
            !tx.is_closed() && now.saturating_duration_since(*since) < idle_timeout
        };
        let mut idle = lock(&self.idle);
        // O(1) per request: closed or stale connections elsewhere in the list go at the health
        // checker's next `prune_idle`.
        while idle.last().is_some_and(|c| !usable(c)) {
            idle.pop();
        }
        let last = idle.len().checked_sub(1)?;
        let i = if !idle[last].0.is_ready() && usable(&idle[0]) && idle[0].0.is_ready() {
            0
        } else {
            last
        };
        Some(idle.swap_remove(i).0)
    }

    /// Returns a connection whose last response was read completely.
    pub(crate) fn checkin(&self, tx: Sender) {
        if tx.is_closed() || self.draining() || self.retired.load(Ordering::Relaxed) {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push((tx, Instant::now()));
        }
    }

    pub(crate) fn prune_idle(&self, now: Instant, idle_timeout: Duration) {
        let stale: Vec<_> = {
            let mut idle = lock(&self.idle);
            let (keep, stale) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|(tx, since)| {
                    !tx.is_closed() && now.saturating_duration_since(*since) < idle_timeout
                });
            *idle = keep;
            stale
        };
        // Closed outside the lock.
        drop(stale);
    }

    /// Opens a new connection: TCP with `TCP_NODELAY` (requests are small and latency matters
    /// more than packet count), then an HTTP/1.1 handshake.
    pub(crate) async fn connect(&self, timeout: Duration) -> Result<Sender, String> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect to {}: {e}", self.addr)),
            Err(_) => {
                return Err(format!(
                    "connect to {}: no answer within {timeout:?}",
                    self.addr
                ));
            }
        };
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake with {}: {e}", self.addr))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }
}

/// One request in flight on a backend; dropping it ends the request.
#[derive(Debug)]
pub(crate) struct InFlight(pub(crate) Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let b = &self.0;
        if b.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && b.draining.load(Ordering::SeqCst) {
            b.drained.notify_waiters();
        }
    }
}
