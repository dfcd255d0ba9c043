//! Test harness: real hyper upstreams on 127.0.0.1:0 and a real client.

#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_proxy::{BackendSpec, HealthCheck, Pool, Proxy, ProxyConfig, RouteTarget, ServiceTable};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

pub const BIG: usize = 5 * 1024 * 1024;

/// 5 MiB of a pattern that catches reordered or dropped chunks.
pub fn big() -> Bytes {
    (0..BIG).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A backend: answers `/healthz` (500 once `fail` is set), `/slow` (after 300 ms), `/fail` (500),
/// `/headers` (lists the request headers, sends hop-by-hop headers back), `/echo` (streams the
/// request body back), `/big` (5 MiB), anything else with its name. Every response carries
/// `x-upstream: <name>`.
pub struct Upstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub fail: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &'static str) -> Self {
        Self::start_with(name, true).await
    }

    /// With `keep_alive` false every response closes its connection, so the proxy has no pooled
    /// connection to a stopped upstream and each request connects anew.
    pub async fn start_with(name: &'static str, keep_alive: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&fail);
        let task = tokio::spawn(async move {
            // Dropped with this task when it is aborted, which aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let flag = Arc::clone(&flag);
                let svc = service_fn(move |req| {
                    let flag = Arc::clone(&flag);
                    async move { Ok::<_, Infallible>(answer(name, &flag, req).await) }
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            name,
            addr,
            fail,
            task,
        }
    }

    pub fn spec(&self, routable: bool) -> BackendSpec {
        BackendSpec {
            id: self.name.to_owned(),
            addr: self.addr,
            routable,
        }
    }

    /// Closes the port and every connection.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn answer(name: &'static str, fail: &AtomicBool, req: Request<Incoming>) -> Response<Body> {
    let mut res = match req.uri().path() {
        "/healthz" if fail.load(Ordering::SeqCst) => status(500, "unhealthy"),
        "/healthz" => Response::new(full("ok")),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::new(full("slow"))
        }
        "/fail" => status(500, "boom"),
        "/headers" => {
            let mut lines = String::new();
            for (k, v) in req.headers() {
                lines.push_str(&format!("{k}: {}\n", v.to_str().unwrap()));
            }
            let mut res = Response::new(full(lines));
            let h = res.headers_mut();
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("connection", "x-resp-hop".parse().unwrap());
            h.insert("x-resp-hop", "1".parse().unwrap());
            h.insert("proxy-foo", "1".parse().unwrap());
            h.insert("x-end-to-end", "1".parse().unwrap());
            res
        }
        "/echo" => Response::new(req.into_body().map_err(BoxError::from).boxed()),
        "/big" => Response::new(full(big())),
        _ => Response::new(full(name)),
    };
    res.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    res
}

fn status(code: u16, body: &'static str) -> Response<Body> {
    let mut res = Response::new(full(body));
    *res.status_mut() = StatusCode::from_u16(code).unwrap();
    res
}

/// A client of the proxy.
pub struct Tester {
    pub proxy: Proxy,
    pub addr: SocketAddr,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn release(&self) -> Option<&str> {
        self.headers
            .get("x-kiln-release")
            .map(|v| v.to_str().unwrap())
    }

    pub fn upstream(&self) -> Option<&str> {
        self.headers.get("x-upstream").map(|v| v.to_str().unwrap())
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

impl Tester {
    /// A proxy with balancer `public` routing everything to service `web`.
    pub async fn new() -> Self {
        let proxy = Proxy::new(ProxyConfig {
            connect_timeout: Duration::from_millis(500),
            ..ProxyConfig::default()
        });
        proxy.set_routes("public", vec![route(None, "/", "web")]);
        let addr = proxy
            .bind("public", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self {
            proxy,
            addr,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Request::get(self.uri(path)).body(Full::default()).unwrap())
            .await
    }

    pub fn uri(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        send(&self.client, req).await
    }

    /// Waits (bounded) until the backend's health is `healthy`.
    pub async fn until_health(&self, id: &str, healthy: bool) {
        let proxy = self.proxy.clone();
        for _ in 0..1000 {
            if proxy
                .backend_health(id)
                .is_some_and(|h| h.healthy == healthy)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{id} is not healthy={healthy}: {:?}",
            proxy.backend_health(id)
        );
    }
}

pub async fn send(client: &Client<HttpConnector, Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
    let res = client.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn route(host: Option<&str>, prefix: &str, service: &str) -> RouteTarget {
    RouteTarget {
        host: host.map(str::to_owned),
        path_prefix: prefix.to_owned(),
        service: service.to_owned(),
    }
}

pub fn pool(release: u32, weight: u32, backends: Vec<BackendSpec>) -> Pool {
    Pool {
        release,
        weight,
        backends,
        health: None,
    }
}

/// A fast HTTP check, so tests wait milliseconds rather than seconds.
pub fn fast_check(healthy_threshold: u32, unhealthy_threshold: u32) -> Option<HealthCheck> {
    Some(HealthCheck {
        path: "/healthz".to_owned(),
        interval: Duration::from_millis(20),
        timeout: Duration::from_millis(500),
        healthy_threshold,
        unhealthy_threshold,
    })
}

pub fn table(pools: Vec<Pool>, health: Option<HealthCheck>) -> ServiceTable {
    ServiceTable {
        pools,
        health,
        preview: None,
    }
}

/// Polls `cond` every 10 ms for up to 10 s.
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Bounds a test's run time.
pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test took longer than 60 s")
}

/// A port nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}
