//! Balancers: their routes and their listeners (HTTP/1.1 and h2c on one port).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Inner;
use crate::backend::lock;
use crate::error::ProxyError;
use crate::forward::{ConnCtx, handle};
use crate::routes::Routes;

#[derive(Debug, Default)]
pub(crate) struct BalancerState {
    routes: RwLock<Arc<Routes>>,
    listener: Mutex<Option<Listener>>,
}

#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    /// Bound by `bind_preview`: every request is a preview request.
    preview: bool,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl BalancerState {
    pub(crate) fn routes(&self) -> Arc<Routes> {
        Arc::clone(&self.routes.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn set_routes(&self, routes: Routes) {
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(routes);
    }

    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        lock(&self.listener).as_ref().map(|l| l.addr)
    }

    /// Whether the listener, if bound, is in preview mode.
    pub(crate) fn preview(&self) -> bool {
        lock(&self.listener).as_ref().is_some_and(|l| l.preview)
    }

    pub(crate) async fn bind(
        self: &Arc<Self>,
        inner: &Arc<Inner>,
        name: &str,
        addr: SocketAddr,
        preview: bool,
    ) -> Result<SocketAddr, ProxyError> {
        if let Some(addr) = self.addr() {
            return Err(ProxyError::AlreadyBound {
                name: name.to_owned(),
                addr,
            });
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind {
                name: name.to_owned(),
                addr,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| ProxyError::Bind {
            name: name.to_owned(),
            addr,
            source,
        })?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(
            listener,
            Arc::clone(inner),
            Arc::clone(self),
            stopped,
            inner.config.drain_timeout,
            preview,
        ));
        let mut slot = lock(&self.listener);
        if let Some(existing) = slot.as_ref() {
            // Another bind won the race while this one was binding.
            task.abort();
            return Err(ProxyError::AlreadyBound {
                name: name.to_owned(),
                addr: existing.addr,
            });
        }
        *slot = Some(Listener {
            addr: bound,
            preview,
            stop,
            task,
        });
        tracing::info!(balancer = name, addr = %bound, preview, "balancer listening");
        Ok(bound)
    }

    pub(crate) async fn unbind(&self) {
        let Some(listener) = lock(&self.listener).take() else {
            return;
        };
        let _ = listener.stop.send(true);
        let _ = listener.task.await;
    }
}

async fn serve(
    listener: TcpListener,
    inner: Arc<Inner>,
    balancer: Arc<BalancerState>,
    mut stopped: watch::Receiver<bool>,
    drain_timeout: Duration,
    preview: bool,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A timer lets hyper enforce its header-read timeout on slow or idle clients.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            biased;
            _ = stopped.changed() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let ctx = Arc::new(ConnCtx {
                    inner: Arc::clone(&inner),
                    balancer: Arc::clone(&balancer),
                    preview,
                    client_ip: HeaderValue::from_str(&peer.ip().to_string())
                        .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
                });
                let svc = service_fn(move |req| {
                    let ctx = Arc::clone(&ctx);
                    async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    // Idle connections close now; busy ones after their current request.
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("balancer stopped with requests still in flight after the drain timeout");
    }
}
