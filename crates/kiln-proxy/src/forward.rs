//! The request path: route, pick, connect (with one retry), forward, stream the answer back.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, request};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use crate::Inner;
use crate::backend::{Backend, InFlight, Sender};
use crate::listener::BalancerState;
use crate::model::ProxyConfig;
use crate::table::PoolState;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// The release that served a response, for clients, tests and debugging a canary.
pub const X_KILN_RELEASE: HeaderName = HeaderName::from_static("x-kiln-release");
/// `X-Kiln-Preview: 1` asks for the service's preview release (as does a `kiln-preview=1`
/// cookie); see [`crate::ServiceTable::preview`].
pub const X_KILN_PREVIEW: HeaderName = HeaderName::from_static("x-kiln-preview");
/// The cookie that asks for the preview release, as it appears in a `Cookie` header.
const PREVIEW_COOKIE: &[u8] = b"kiln-preview=1";

/// What one accepted connection needs for each of its requests, behind one `Arc`.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub(crate) inner: Arc<Inner>,
    pub(crate) balancer: Arc<BalancerState>,
    /// The listener is in preview mode: every request goes to the preview release.
    pub(crate) preview: bool,
    /// The peer's address, formatted once per connection for `X-Forwarded-For`.
    pub(crate) client_ip: HeaderValue,
}

pub(crate) async fn handle(ctx: &ConnCtx, req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let routes = ctx.balancer.routes();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.host());
    let Some(service_name) = routes.find(host, parts.uri.path()) else {
        return text(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"no route for this host and path\n"),
            None,
        );
    };
    let Some(service) = ctx.inner.service(service_name) else {
        return no_backend(service_name);
    };
    let table = service.table();
    // The headers are only looked at when the service has a preview: the common case pays one
    // branch.
    let preview = ctx.preview || (table.preview.is_some() && wants_preview(&parts.headers));
    prepare_request(&mut parts, &ctx.client_ip);
    let mut req = Request::from_parts(parts, body);
    let config = &ctx.inner.config;

    let mut failed: Option<(&PoolState, Arc<Backend>)> = None;
    for _attempt in 0..2 {
        let Some((pool, guard)) = table.pick(failed.as_ref().map(|(_, b)| &**b), preview) else {
            break;
        };
        match send(&guard.0, req, config).await {
            Ok((res, tx)) => return respond(pool, start, res, tx, guard),
            Err(SendError::Upstream(e)) => {
                tracing::warn!(backend = %guard.0.id, error = %e, "upstream failed after the request was sent");
                pool.counters.record(502, start.elapsed(), false);
                return text(
                    StatusCode::BAD_GATEWAY,
                    Bytes::from_static(b"upstream error\n"),
                    Some(pool),
                );
            }
            Err(SendError::Connect(reason, r)) => {
                // Passive health: a refused connection counts as a failed check right away.
                tracing::debug!(backend = %guard.0.id, %reason, "connect failed, retrying elsewhere");
                guard.0.observe(Err(reason), Instant::now());
                req = r;
                failed = Some((pool, Arc::clone(&guard.0)));
            }
        }
    }
    match failed {
        Some((pool, _)) => {
            pool.counters.record(502, start.elapsed(), true);
            text(
                StatusCode::BAD_GATEWAY,
                Bytes::from_static(b"no backend accepted a connection\n"),
                Some(pool),
            )
        }
        None if preview => text(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from(format!(
                "no healthy backend for the preview of service {service_name}\n"
            )),
            None,
        ),
        None => no_backend(service_name),
    }
}

/// Whether a request asks for the preview release: `X-Kiln-Preview: 1`, or a `kiln-preview=1`
/// cookie in any `Cookie` header (HTTP/2 clients may send one header per cookie).
fn wants_preview(headers: &HeaderMap) -> bool {
    headers
        .get_all(X_KILN_PREVIEW)
        .iter()
        .any(|v| v.as_bytes().trim_ascii() == b"1")
        || headers.get_all(header::COOKIE).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b';')
                .any(|c| c.trim_ascii() == PREVIEW_COOKIE)
        })
}

fn respond(
    pool: &PoolState,
    start: Instant,
    res: Response<Incoming>,
    tx: Sender,
    guard: InFlight,
) -> Response<ProxyBody> {
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(X_KILN_RELEASE, pool.release_header.clone());
    pool.counters
        .record(parts.status.as_u16(), start.elapsed(), false);
    let body = ProxyBody(BodyKind::Upstream {
        body,
        tx: Some(tx),
        done: false,
        guard,
    });
    Response::from_parts(parts, body)
}

// The request travels back by value for the retry; the `Ok` side (a response and a connection)
// is as large, so boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum SendError {
    /// No byte of the request was sent; it comes back for a retry elsewhere.
    Connect(String, Request<Incoming>),
    /// The request (or part of it) went out: retrying could run it twice.
    Upstream(hyper::Error),
}

async fn send(
    backend: &Backend,
    mut req: Request<Incoming>,
    config: &ProxyConfig,
) -> Result<(Response<Incoming>, Sender), SendError> {
    let now = Instant::now();
    while let Some(mut tx) = backend.checkout(now, config.upstream_idle_timeout) {
        if !ready(&mut tx, config).await {
            continue;
        }
        match tx.try_send_request(req).await {
            Ok(res) => return Ok((res, tx)),
            Err(mut e) => match e.take_message() {
                // The pooled connection closed before the request went out: try another one.
                Some(r) => req = r,
                None => return Err(SendError::Upstream(e.into_error())),
            },
        }
    }
    let mut tx = match backend.connect(config.connect_timeout).await {
        Ok(tx) => tx,
        Err(reason) => return Err(SendError::Connect(reason, req)),
    };
    match tx.try_send_request(req).await {
        Ok(res) => Ok((res, tx)),
        Err(mut e) => match e.take_message() {
            Some(r) => Err(SendError::Connect(
                format!("connection to {} closed at once", backend.addr),
                r,
            )),
            None => Err(SendError::Upstream(e.into_error())),
        },
    }
}

/// Whether a pooled connection can take a request. Usually it already can; one that just
/// finished a response may need its connection task to run first, so wait a bounded time.
async fn ready(tx: &mut Sender, config: &ProxyConfig) -> bool {
    match std::future::poll_fn(|cx| Poll::Ready(tx.poll_ready(cx))).await {
        Poll::Ready(r) => r.is_ok(),
        Poll::Pending => matches!(
            tokio::time::timeout(config.connect_timeout, tx.ready()).await,
            Ok(Ok(()))
        ),
    }
}

/// Rewrites a client's request for the backend.
fn prepare_request(parts: &mut request::Parts, client_ip: &HeaderValue) {
    strip_hop_by_hop(&mut parts.headers);
    // HTTP/2 (and absolute-form HTTP/1) requests carry the host in the URI; backends speak
    // HTTP/1.1 and expect origin-form with a `Host` header.
    if let Some(authority) = parts.uri.authority() {
        if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let mut uri = http::uri::Parts::default();
        uri.path_and_query = parts.uri.path_and_query().cloned();
        if let Ok(u) = Uri::from_parts(uri) {
            parts.uri = u;
        }
    }
    parts.version = Version::HTTP_11;

    let headers = &mut parts.headers;
    let xff = if headers.contains_key(&X_FORWARDED_FOR) {
        // Appended to what earlier proxies wrote, all header lines folded into one.
        let mut buf = BytesMut::new();
        for v in headers.get_all(&X_FORWARDED_FOR) {
            buf.extend_from_slice(v.as_bytes());
            buf.extend_from_slice(b", ");
        }
        buf.extend_from_slice(client_ip.as_bytes());
        HeaderValue::from_maybe_shared(buf.freeze()).unwrap_or_else(|_| client_ip.clone())
    } else {
        client_ip.clone()
    };
    headers.insert(X_FORWARDED_FOR, xff);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || name.starts_with("proxy-")
}

/// Removes the headers that describe one connection rather than the message (RFC 9110 §7.6.1):
/// the fixed list, `Proxy-*`, and any header the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The common case has none: one pass over the names, no allocation.
    if !headers.keys().any(|k| is_hop_by_hop(k.as_str())) {
        return;
    }
    let mut remove: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    remove.extend(
        headers
            .keys()
            .filter(|k| is_hop_by_hop(k.as_str()))
            .cloned(),
    );
    for name in remove {
        headers.remove(name);
    }
}

fn no_backend(service: &str) -> Response<ProxyBody> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        Bytes::from(format!("no healthy backend for service {service}\n")),
        None,
    )
}

/// A response the proxy writes itself, tagged with the release it was meant for if any.
fn text(status: StatusCode, body: Bytes, pool: Option<&PoolState>) -> Response<ProxyBody> {
    let mut res = Response::new(ProxyBody(BodyKind::Full(Some(body))));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(pool) = pool {
        h.insert(X_KILN_RELEASE, pool.release_header.clone());
    }
    res
}

/// The body of a proxied response: the backend's body streamed through, or a short text.
#[derive(Debug)]
pub struct ProxyBody(BodyKind);

#[derive(Debug)]
enum BodyKind {
    Upstream {
        body: Incoming,
        /// The connection, pooled again once the body has been read to its end.
        tx: Option<Sender>,
        done: bool,
        /// Keeps the request in flight (for drain) until the client has the whole body.
        guard: InFlight,
    },
    Full(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().0 {
            BodyKind::Upstream { body, done, .. } => {
                let polled = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) = polled {
                    *done = true;
                }
                polled
            }
            BodyKind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyKind::Upstream { body, done, .. } => *done || body.is_end_stream(),
            BodyKind::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            BodyKind::Upstream { body, .. } => body.size_hint(),
            BodyKind::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let BodyKind::Upstream {
            body,
            tx,
            done,
            guard,
        } = &mut self.0
        {
            // Only a connection whose response was read to the end can carry another request;
            // hyper closes the others when their body is dropped.
            if (*done || body.is_end_stream())
                && let Some(tx) = tx.take()
            {
                guard.0.checkin(tx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asks(pairs: &[(&str, &str)]) -> bool {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        wants_preview(&h)
    }

    #[test]
    fn preview_is_asked_by_header_or_cookie_only_with_value_1() {
        assert!(asks(&[("x-kiln-preview", "1")]));
        assert!(asks(&[("x-kiln-preview", " 1 ")]));
        assert!(!asks(&[("x-kiln-preview", "0")]));
        assert!(!asks(&[("x-kiln-preview", "true")]));
        assert!(asks(&[("cookie", "kiln-preview=1")]));
        assert!(asks(&[("cookie", "a=b; kiln-preview=1; c=d")]));
        assert!(asks(&[("cookie", "a=b"), ("cookie", "kiln-preview=1")]));
        assert!(!asks(&[("cookie", "kiln-preview=0; xkiln-preview=1")]));
        assert!(!asks(&[("cookie", "kiln-preview=10")]));
        assert!(!asks(&[]));
    }
}
