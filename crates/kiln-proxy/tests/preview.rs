//! The blue/green preview route against real sockets: `X-Kiln-Preview: 1`, the `kiln-preview=1`
//! cookie and preview listeners reach the preview release whatever the weights.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use kiln_proxy::ServiceTable;

/// v1 at 100 %, v2 at 0 % with `preview`.
fn blue_green(a: &Upstream, b: &Upstream, preview: Option<u32>) -> ServiceTable {
    ServiceTable {
        preview,
        ..table(
            vec![
                pool(1, 100, vec![a.spec(true)]),
                pool(2, 0, vec![b.spec(true)]),
            ],
            fast_check(1, 3),
        )
    }
}

impl Tester {
    async fn get_with(&self, header: &'static str, value: &'static str) -> Reply {
        self.send(
            Request::get(self.uri("/"))
                .header(header, value)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
    }
}

async fn ready() -> (Tester, Upstream, Upstream) {
    let t = Tester::new().await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    t.proxy.set_service("web", blue_green(&a, &b, Some(2)));
    t.until_health("a", true).await;
    t.until_health("b", true).await;
    (t, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_cookie_reach_the_preview_while_the_rest_follows_weights() {
    within(async {
        let (t, _a, _b) = ready().await;
        let mut seen = BTreeMap::new();
        for i in 0..60 {
            let r = match i % 3 {
                0 => t.get("/").await,
                1 => t.get_with("x-kiln-preview", "1").await,
                _ => t.get_with("cookie", "theme=dark; kiln-preview=1").await,
            };
            assert_eq!(r.status, 200);
            *seen
                .entry((i % 3, r.release().unwrap().to_owned()))
                .or_insert(0) += 1;
        }
        assert_eq!(
            seen,
            BTreeMap::from([
                ((0, "v1".to_owned()), 20),
                ((1, "v2".to_owned()), 20),
                ((2, "v2".to_owned()), 20),
            ])
        );
        // Other values ask for nothing.
        assert_eq!(
            t.get_with("x-kiln-preview", "0").await.release(),
            Some("v1")
        );
        assert_eq!(
            t.get_with("cookie", "kiln-preview=yes").await.release(),
            Some("v1")
        );
        // Metrics count preview requests under the preview release.
        let m = t.proxy.metrics("web");
        assert_eq!((m[&1].requests, m[&2].requests), (22, 40));
        assert_eq!(t.proxy.snapshot().services[0].preview, Some(2));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_preview_the_header_is_ignored() {
    within(async {
        let (t, a, b) = ready().await;
        t.proxy.set_service("web", blue_green(&a, &b, None));
        for _ in 0..10 {
            let r = t.get_with("x-kiln-preview", "1").await;
            assert_eq!((r.status.as_u16(), r.release()), (200, Some("v1")));
            let r = t.get_with("cookie", "kiln-preview=1").await;
            assert_eq!((r.status.as_u16(), r.release()), (200, Some("v1")));
        }
        assert_eq!(t.proxy.metrics("web").get(&2).map_or(0, |m| m.requests), 0);
        // Promotion is one swap: 100 % to v2, no preview.
        t.proxy.set_service(
            "web",
            table(
                vec![
                    pool(1, 0, vec![a.spec(true)]),
                    pool(2, 100, vec![b.spec(true)]),
                ],
                fast_check(1, 3),
            ),
        );
        assert_eq!(t.get("/").await.release(), Some("v2"));
        assert_eq!(
            t.get_with("x-kiln-preview", "1").await.release(),
            Some("v2")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_without_a_backend_able_to_serve_is_503() {
    within(async {
        let (t, a, b) = ready().await;
        // The preview release's only backend is not routable yet.
        t.proxy.set_service(
            "web",
            ServiceTable {
                preview: Some(2),
                ..table(
                    vec![
                        pool(1, 100, vec![a.spec(true)]),
                        pool(2, 0, vec![b.spec(false)]),
                    ],
                    fast_check(1, 3),
                )
            },
        );
        let r = t.get_with("x-kiln-preview", "1").await;
        assert_eq!(r.status, 503);
        assert_eq!(
            r.text(),
            "no healthy backend for the preview of service web\n"
        );
        assert_eq!(r.release(), None);
        // A preview release with no pool at all answers the same; normal traffic is untouched.
        t.proxy.set_service(
            "web",
            ServiceTable {
                preview: Some(3),
                ..blue_green(&a, &b, None)
            },
        );
        assert_eq!(t.get_with("x-kiln-preview", "1").await.status, 503);
        assert_eq!(t.get("/").await.release(), Some("v1"));
        // An unhealthy preview backend is skipped: it answers 503 rather than reach v1.
        t.proxy.set_service("web", blue_green(&a, &b, Some(2)));
        b.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        t.until_health("b", false).await;
        assert_eq!(t.get_with("x-kiln-preview", "1").await.status, 503);
        assert_eq!(t.get("/").await.release(), Some("v1"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_listener_sends_every_request_to_the_preview() {
    within(async {
        let (t, a, b) = ready().await;
        let addr = t
            .proxy
            .bind_preview("preview-web", "127.0.0.1:0".parse().unwrap(), "web")
            .await
            .unwrap();
        let get = |path: &'static str| {
            t.send(
                Request::get(format!("http://{addr}{path}"))
                    .header("host", "anything.test")
                    .body(Full::default())
                    .unwrap(),
            )
        };
        for path in ["/", "/x/y", "/"] {
            let r = get(path).await;
            assert_eq!(
                (r.status.as_u16(), r.release()),
                (200, Some("v2")),
                "{path}"
            );
        }
        // The main listener still follows the weights.
        assert_eq!(t.get("/").await.release(), Some("v1"));
        let snap = t.proxy.snapshot();
        let listener = snap
            .balancers
            .iter()
            .find(|b| b.name == "preview-web")
            .unwrap();
        assert_eq!((listener.addr, listener.preview), (Some(addr), true));
        assert!(
            !snap
                .balancers
                .iter()
                .find(|b| b.name == "public")
                .unwrap()
                .preview
        );
        // Binding it twice is refused, without touching its routes.
        assert!(
            t.proxy
                .bind_preview("preview-web", "127.0.0.1:0".parse().unwrap(), "other")
                .await
                .is_err()
        );
        assert_eq!(get("/").await.release(), Some("v2"));

        // Without a preview the listener answers 503 rather than serve another release.
        t.proxy.set_service("web", blue_green(&a, &b, None));
        let r = get("/").await;
        assert_eq!(r.status, 503);
        assert_eq!(
            r.text(),
            "no healthy backend for the preview of service web\n"
        );

        t.proxy.unbind("preview-web").await;
        assert_eq!(
            t.proxy
                .snapshot()
                .balancers
                .iter()
                .find(|b| b.name == "preview-web")
                .unwrap()
                .addr,
            None
        );
        assert_eq!(t.get("/").await.release(), Some("v1"));
    })
    .await;
}
