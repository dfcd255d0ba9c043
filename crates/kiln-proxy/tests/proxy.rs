//! The proxy against real sockets: hyper upstreams and a hyper client on 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use kiln_proxy::DrainOutcome;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_exact() {
    within(async {
        let t = Tester::new().await;
        let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
        t.proxy.set_service(
            "web",
            table(
                vec![
                    pool(1, 90, vec![a.spec(true)]),
                    pool(2, 10, vec![b.spec(true)]),
                ],
                fast_check(1, 3),
            ),
        );
        t.until_health("a", true).await;
        t.until_health("b", true).await;
        let mut by_release = BTreeMap::new();
        for _ in 0..1000 {
            let r = t.get("/").await;
            assert_eq!(r.status, 200);
            *by_release
                .entry(r.release().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        assert_eq!(
            by_release,
            BTreeMap::from([("v1".to_owned(), 900), ("v2".to_owned(), 100)])
        );
        let m = t.proxy.metrics("web");
        assert_eq!((m[&1].requests, m[&2].requests), (900, 100));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_longest_prefix_else_404() {
    within(async {
        let t = Tester::new().await;
        let (web, api, admin) = (
            Upstream::start("web").await,
            Upstream::start("api").await,
            Upstream::start("admin").await,
        );
        for (svc, up) in [("web", &web), ("api", &api), ("admin", &admin)] {
            t.proxy.set_service(
                svc,
                table(vec![pool(1, 1, vec![up.spec(true)])], fast_check(1, 3)),
            );
            t.until_health(up.name, true).await;
        }
        t.proxy.set_routes(
            "public",
            vec![
                route(None, "/app", "web"),
                route(None, "/app/api/", "api"),
                route(Some("admin.test"), "/", "admin"),
            ],
        );
        let get = |host: &'static str, path: &'static str| {
            let req = Request::get(t.uri(path))
                .header("host", host)
                .body(Full::default())
                .unwrap();
            t.send(req)
        };
        assert_eq!(get("shop.test", "/app/x").await.upstream(), Some("web"));
        assert_eq!(get("shop.test", "/app/api/x").await.upstream(), Some("api"));
        assert_eq!(
            get("ADMIN.test:8080", "/app/api/x").await.upstream(),
            Some("admin")
        );
        let miss = get("shop.test", "/other").await;
        assert_eq!(miss.status, 404);
        assert_eq!(miss.release(), None);
        assert!(miss.text().starts_with("no route"), "{}", miss.text());

        let snap = t.proxy.snapshot();
        assert_eq!(snap.balancers[0].addr, Some(t.addr));
        assert_eq!(
            snap.balancers[0].routes[0].host.as_deref(),
            Some("admin.test")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_backend_is_503() {
    within(async {
        let t = Tester::new().await;
        let dead = closed_port().await;
        let spec = kiln_proxy::BackendSpec {
            id: "dead".into(),
            addr: dead,
            routable: true,
        };
        t.proxy.set_service(
            "web",
            table(vec![pool(1, 100, vec![spec])], fast_check(1, 1)),
        );
        let r = t.get("/").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "no healthy backend for service web\n");
        assert_eq!(r.release(), None);
        // A route to a service the proxy does not know is the same answer.
        t.proxy
            .set_routes("public", vec![route(None, "/", "ghost")]);
        assert_eq!(
            t.get("/").await.text(),
            "no healthy backend for service ghost\n"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_follow_thresholds() {
    within(async {
        let t = Tester::new().await;
        let a = Upstream::start("a").await;
        t.proxy.set_service(
            "web",
            table(vec![pool(1, 1, vec![a.spec(true)])], fast_check(3, 2)),
        );
        let h = t.proxy.backend_health("a").unwrap();
        assert!(!h.healthy, "a new backend starts unhealthy");
        t.until_health("a", true).await;
        let h = t.proxy.backend_health("a").unwrap();
        assert!(h.passes >= 3 && h.checks >= 3, "{h:?}");
        assert_eq!(t.get("/").await.status, 200);

        a.fail.store(true, Ordering::SeqCst);
        t.until_health("a", false).await;
        let h = t.proxy.backend_health("a").unwrap();
        assert!(h.failures >= 2, "{h:?}");
        assert_eq!(h.last_error.as_deref(), Some("status 500"));
        assert_eq!(t.get("/").await.status, 503);

        // Health survives a table swap that keeps the backend.
        a.fail.store(false, Ordering::SeqCst);
        t.until_health("a", true).await;
        let checks = t.proxy.backend_health("a").unwrap().checks;
        t.proxy.set_service(
            "web",
            table(vec![pool(2, 1, vec![a.spec(true)])], fast_check(3, 2)),
        );
        let h = t.proxy.backend_health("a").unwrap();
        assert!(h.healthy && h.checks >= checks, "{h:?}");
        assert_eq!(t.get("/").await.release(), Some("v2"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_routable_backends_are_checked_but_get_no_traffic() {
    within(async {
        let t = Tester::new().await;
        let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
        t.proxy.set_service(
            "web",
            table(
                vec![pool(1, 1, vec![a.spec(true), b.spec(false)])],
                fast_check(2, 2),
            ),
        );
        t.until_health("a", true).await;
        t.until_health("b", true).await;
        for _ in 0..50 {
            assert_eq!(t.get("/").await.upstream(), Some("a"));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_elsewhere_and_ejects_the_backend() {
    within(async {
        let t = Tester::new().await;
        let (a, b) = (
            Upstream::start_with("a", false).await,
            Upstream::start_with("b", false).await,
        );
        // One active check only (the first), so what follows is the passive path's doing.
        let mut check = fast_check(1, 2).unwrap();
        check.interval = Duration::from_secs(3600);
        t.proxy.set_service(
            "web",
            table(
                vec![pool(1, 1, vec![a.spec(true), b.spec(true)])],
                Some(check),
            ),
        );
        t.until_health("a", true).await;
        t.until_health("b", true).await;
        a.stop().await;
        for _ in 0..20 {
            let r = t.get("/").await;
            assert_eq!((r.status.as_u16(), r.upstream()), (200, Some("b")));
        }
        let h = t.proxy.backend_health("a").unwrap();
        assert!(!h.healthy && h.failures >= 2, "{h:?}");
        assert!(
            h.last_error.as_deref().unwrap().contains("connect"),
            "{h:?}"
        );
        let m = &t.proxy.metrics("web")[&1];
        assert_eq!((m.requests, m.status_5xx, m.connect_errors), (20, 0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_in_flight_requests_finish_and_sends_new_ones_elsewhere() {
    within(async {
        let t = Arc::new(Tester::new().await);
        let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
        t.proxy.set_service(
            "web",
            table(
                vec![pool(1, 1, vec![a.spec(true), b.spec(true)])],
                fast_check(1, 3),
            ),
        );
        t.until_health("a", true).await;
        t.until_health("b", true).await;

        let slow = tokio::spawn({
            let t = Arc::clone(&t);
            async move { t.get("/slow").await }
        });
        let busy = {
            let proxy = t.proxy.clone();
            let busy = move || {
                proxy.snapshot().services[0].pools[0]
                    .backends
                    .iter()
                    .find(|b| b.in_flight == 1)
                    .map(|b| b.id.clone())
            };
            until("the slow request to start", || busy().is_some()).await;
            busy().unwrap()
        };
        let other = if busy == "a" { "b" } else { "a" };

        let started = Instant::now();
        let drain = tokio::spawn({
            let proxy = t.proxy.clone();
            let busy = busy.clone();
            async move { proxy.drain("web", &busy, Duration::from_secs(10)).await }
        });
        {
            let proxy = t.proxy.clone();
            let busy = busy.clone();
            until("drain to start", move || {
                proxy.snapshot().services[0].pools[0]
                    .backends
                    .iter()
                    .any(|b| b.id == busy && b.draining)
            })
            .await;
        }
        for _ in 0..10 {
            assert_eq!(t.get("/").await.upstream(), Some(other));
        }
        let slow = slow.await.unwrap();
        assert_eq!((slow.status.as_u16(), slow.text()), (200, "slow"));
        assert_eq!(drain.await.unwrap(), DrainOutcome::Drained);
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "drain returned before the slow request ended"
        );

        let ids: Vec<_> = t.proxy.snapshot().services[0].pools[0]
            .backends
            .iter()
            .map(|b| b.id.clone())
            .collect();
        assert_eq!(ids, vec![other.to_owned()]);
        assert!(t.proxy.backend_health(&busy).is_none());
        assert_eq!(
            t.proxy.drain("web", &busy, Duration::from_secs(1)).await,
            DrainOutcome::NotFound
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_times_out_without_cutting_the_request() {
    within(async {
        let t = Arc::new(Tester::new().await);
        let a = Upstream::start("a").await;
        t.proxy.set_service(
            "web",
            table(vec![pool(1, 1, vec![a.spec(true)])], fast_check(1, 3)),
        );
        t.until_health("a", true).await;
        let slow = tokio::spawn({
            let t = Arc::clone(&t);
            async move { t.get("/slow").await }
        });
        let proxy = t.proxy.clone();
        until("the slow request to start", || {
            proxy.snapshot().services[0].pools[0].backends[0].in_flight == 1
        })
        .await;
        let outcome = t.proxy.drain("web", "a", Duration::from_millis(20)).await;
        assert_eq!(outcome, DrainOutcome::TimedOut { in_flight: 1 });
        assert_eq!(slow.await.unwrap().status, 200);
        assert_eq!(t.get("/").await.status, 503);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_swaps_under_load_lose_no_request() {
    within(async {
        let t = Arc::new(Tester::new().await);
        let ups = [
            Upstream::start("a").await,
            Upstream::start("b").await,
            Upstream::start("c").await,
            Upstream::start("d").await,
        ];
        let v1 = || vec![ups[0].spec(true), ups[1].spec(true)];
        let v2 = || vec![ups[2].spec(true), ups[3].spec(true)];
        let tables = [
            table(vec![pool(1, 100, v1()), pool(2, 0, v2())], fast_check(1, 3)),
            table(vec![pool(1, 50, v1()), pool(2, 50, v2())], fast_check(1, 3)),
            table(vec![pool(1, 0, v1()), pool(2, 100, v2())], fast_check(1, 3)),
            table(vec![pool(1, 10, v1()), pool(2, 90, v2())], fast_check(1, 3)),
            // Drops v1's backends while they serve; the next table adds them back as new
            // (unhealthy) backends, so requests fall back to v2 even at weight 0.
            table(vec![pool(2, 100, v2())], fast_check(1, 3)),
        ];
        t.proxy.set_service("web", tables[0].clone());
        for u in &ups {
            t.until_health(u.name, true).await;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let t = Arc::clone(&t);
            tasks.spawn(async move {
                let mut bad = Vec::new();
                for _ in 0..250 {
                    let r = t.get("/").await;
                    if r.status != 200 {
                        bad.push((r.status, r.text().to_owned()));
                    }
                }
                bad
            });
        }
        let mut swaps = 0;
        while !tasks.is_empty() && swaps < 10_000 {
            swaps += 1;
            t.proxy
                .set_service("web", tables[swaps % tables.len()].clone());
            // Pace the swaps so that each table serves some requests.
            tokio::time::sleep(Duration::from_millis(2)).await;
            if tasks.len() < 8 || swaps % 50 == 0 {
                tokio::task::yield_now().await;
            }
            if let Some(done) = tasks.try_join_next() {
                assert_eq!(done.unwrap(), vec![], "non-200 answers during swaps");
            }
        }
        while let Some(done) = tasks.join_next().await {
            assert_eq!(done.unwrap(), vec![], "non-200 answers during swaps");
        }
        assert!(swaps >= 5, "only {swaps} swaps");
        let m = t.proxy.metrics("web");
        assert_eq!(m.values().map(|m| m.requests).sum::<u64>(), 2000);
        assert_eq!(m.values().map(|m| m.status_5xx).sum::<u64>(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    within(async {
        let t = Tester::new().await;
        let a = Upstream::start("a").await;
        t.proxy.set_service(
            "web",
            table(vec![pool(7, 1, vec![a.spec(true)])], fast_check(1, 3)),
        );
        t.until_health("a", true).await;
        let req = Request::get(t.uri("/headers"))
            .header("host", "shop.test")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-authorization", "secret")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-end-to-end", "1")
            .body(Full::default())
            .unwrap();
        let r = t.send(req).await;
        let seen = r.text();
        for gone in [
            "connection:",
            "x-hop:",
            "keep-alive:",
            "te:",
            "proxy-authorization:",
        ] {
            assert!(
                !seen.lines().any(|l| l.starts_with(gone)),
                "{gone} reached the backend:\n{seen}"
            );
        }
        for kept in [
            "host: shop.test",
            "x-end-to-end: 1",
            "x-forwarded-for: 10.0.0.1, 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: shop.test",
        ] {
            assert!(seen.lines().any(|l| l == kept), "{kept} missing:\n{seen}");
        }
        for gone in ["keep-alive", "x-resp-hop", "proxy-foo"] {
            assert!(
                !r.headers.contains_key(gone),
                "{gone} reached the client: {:?}",
                r.headers
            );
        }
        assert!(r.headers.contains_key("x-end-to-end"));
        assert_eq!(r.release(), Some("v7"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_per_release() {
    within(async {
        let t = Tester::new().await;
        let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
        t.proxy.set_service(
            "web",
            table(
                vec![
                    pool(1, 1, vec![a.spec(true)]),
                    pool(2, 1, vec![b.spec(true)]),
                ],
                fast_check(1, 3),
            ),
        );
        t.until_health("a", true).await;
        t.until_health("b", true).await;
        for path in ["/", "/fail"] {
            for _ in 0..10 {
                t.get(path).await;
            }
        }
        let m = t.proxy.metrics("web");
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        for r in m.values() {
            assert_eq!((r.requests, r.status_5xx, r.connect_errors), (10, 5, 0));
            assert_eq!(r.latency.total(), 10);
            assert!(r.latency.p50().unwrap() <= r.latency.p99().unwrap());
        }
        assert!(t.proxy.metrics("nope").is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_intact() {
    within(async {
        let t = Tester::new().await;
        let a = Upstream::start("a").await;
        t.proxy.set_service(
            "web",
            table(vec![pool(1, 1, vec![a.spec(true)])], fast_check(1, 3)),
        );
        t.until_health("a", true).await;
        let up = t
            .send(
                Request::post(t.uri("/echo"))
                    .body(Full::new(big()))
                    .unwrap(),
            )
            .await;
        assert_eq!(up.status, 200);
        assert_eq!(up.body.len(), BIG);
        assert!(up.body == big(), "upload came back altered");
        let down = t.get("/big").await;
        assert_eq!(down.body.len(), BIG);
        assert!(down.body == big(), "download altered");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served() {
    within(async {
        let t = Tester::new().await;
        let a = Upstream::start("a").await;
        t.proxy.set_service(
            "web",
            table(vec![pool(3, 1, vec![a.spec(true)])], fast_check(1, 3)),
        );
        t.until_health("a", true).await;
        let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<Full<Bytes>>();
        let r = send(
            &h2,
            Request::get(t.uri("/headers"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.release(), Some("v3"));
        let host = format!("host: {}", t.addr);
        assert!(r.text().lines().any(|l| l == host), "{}", r.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbind_finishes_in_flight_requests_then_closes_the_port() {
    within(async {
        let t = Arc::new(Tester::new().await);
        let a = Upstream::start("a").await;
        t.proxy.set_service(
            "web",
            table(vec![pool(1, 1, vec![a.spec(true)])], fast_check(1, 3)),
        );
        t.until_health("a", true).await;
        let slow = tokio::spawn({
            let t = Arc::clone(&t);
            async move { t.get("/slow").await }
        });
        let proxy = t.proxy.clone();
        until("the slow request to start", || {
            proxy.snapshot().services[0].pools[0].backends[0].in_flight == 1
        })
        .await;
        t.proxy.unbind("public").await;
        assert_eq!(slow.await.unwrap().status, 200);
        assert!(tokio::net::TcpStream::connect(t.addr).await.is_err());
        assert_eq!(t.proxy.snapshot().balancers[0].addr, None);
        // The routes stay, so binding again serves at once.
        let addr = t
            .proxy
            .bind("public", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        assert!(t.proxy.bind("public", addr).await.is_err());
    })
    .await;
}
