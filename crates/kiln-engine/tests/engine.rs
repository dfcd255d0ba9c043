//! The engine against the fake driver and the real proxy: rollouts, healing and failures on cue,
//! without sandboxes or images that run.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use std::time::Duration;

mod common;

use common::{ROLLING, World, serving, world_with as world_notify};

async fn world() -> World {
    world_notify(ROLLING, None).await
}

async fn world_with(rollout: &str) -> World {
    world_notify(rollout, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_replaces_every_instance_and_a_killed_one_is_replaced() {
    let w = world().await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w.apply("two").await.unwrap();
    let status = w.until("v2 serves", |s| serving(s, 2, 2)).await;
    assert_eq!(status.services[0].traffic, BTreeMap::from([(2, 100.0)]));

    // An instance that dies is replaced by a new one of the same release.
    let victim = status.services[0].instances[0].id.clone();
    assert!(w.control.kill(&victim));
    let healed = w
        .until("the dead instance is replaced", |s| {
            serving(s, 2, 2) && s.services[0].instances.iter().all(|i| i.id != victim)
        })
        .await;
    assert_eq!(healed.services[0].stable, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_cannot_start_is_reverted() {
    let w = world().await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w.control.fail_start(2);
    w.apply("two").await.unwrap();
    let status = w
        .until("the rollout gave up", |s| {
            serving(s, 1, 2) && s.lock.is_none()
        })
        .await;
    assert_eq!(status.services[0].stable, Some(1));
    let events = w.engine.events(0).unwrap();
    assert!(
        events.iter().any(|e| e.message.contains("reverted to v1")),
        "{:#?}",
        events.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_apply_while_a_rollout_runs_is_refused() {
    let w = world().await;
    w.control.unhealthy(1, true);
    w.apply("one").await.unwrap();
    let err = w.apply("two").await.unwrap_err().to_string();
    assert!(err.contains("state is locked by apply (test@host"), "{err}");
}

const CANARY_WAITING: &str = r#"
    strategy         = "canary"
    steps            = [{ weight = 25 }]
    min_healthy_time = "100ms"
    healthy_deadline = "2s"
    scale_down_delay = "100ms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_step_without_a_pause_waits_for_promote_then_finishes() {
    let w = world_with(CANARY_WAITING).await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w.apply("two").await.unwrap();
    let held = w
        .until("the canary holds at its step", |s| {
            s.services[0]
                .rollout
                .as_ref()
                .is_some_and(|r| r.weights == BTreeMap::from([(1, 75), (2, 25)]))
        })
        .await;
    assert_eq!(
        held.services[0].traffic,
        BTreeMap::from([(1, 75.0), (2, 25.0)]),
        "the proxy uses the split"
    );
    w.engine
        .command("web", kiln_core::rollout::Command::Promote)
        .await
        .unwrap();
    w.until("v2 takes over", |s| serving(s, 2, 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_returns_every_request_to_stable_in_one_switch() {
    let w = world_with(CANARY_WAITING).await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w.apply("two").await.unwrap();
    w.until("the canary holds at its step", |s| {
        s.services[0]
            .rollout
            .as_ref()
            .is_some_and(|r| r.weights.get(&2) == Some(&25))
    })
    .await;
    w.engine
        .command("web", kiln_core::rollout::Command::Abort)
        .await
        .unwrap();
    let back = w.until("v1 alone serves again", |s| serving(s, 1, 2)).await;
    assert_eq!(back.services[0].traffic, BTreeMap::from([(1, 100.0)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_without_traffic_never_promotes_on_analysis() {
    let w = world_with(
        r#"
    strategy         = "canary"
    steps            = [{ weight = 50, pause = "100ms" }]
    min_healthy_time = "100ms"
    healthy_deadline = "2s"
    analysis {
      interval       = "100ms"
      max_error_rate = 0.1
      min_requests   = 10
    }
"#,
    )
    .await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w.apply("two").await.unwrap();
    // No request reaches the service: every window is inconclusive and the rollout pauses.
    let paused = w
        .until("the canary pauses for lack of data", |s| {
            s.services[0]
                .rollout
                .as_ref()
                .is_some_and(|r| r.stage.as_deref().is_some_and(|st| st.contains("paused")))
        })
        .await;
    let r = paused.services[0].rollout.as_ref().unwrap();
    assert_eq!(
        r.weights.get(&2),
        Some(&50),
        "never past its first step: {r:#?}"
    );
    assert_eq!(paused.services[0].stable, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_the_old_release_is_gone_relaunches_it_as_a_new_release() {
    let w = world().await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w.apply("two").await.unwrap();
    w.until("v2 serves", |s| serving(s, 2, 2)).await;
    let resp = w
        .engine
        .rollback(kiln_engine::api::RollbackRequest {
            service: "web".into(),
            to: None,
            actor: "test@host".into(),
        })
        .await
        .unwrap();
    assert_eq!((resp.release, resp.warm), (3, false));
    w.until("v3, a copy of v1, serves", |s| serving(s, 3, 2))
        .await;
    let started = w.control.started();
    let last = started.last().unwrap();
    assert_eq!(
        last.env.get("GREETING").map(String::as_str),
        Some("one"),
        "v3 runs v1's config"
    );
    let events = w.engine.events(0).unwrap();
    assert!(events.iter().any(|e| {
        e.message
            .contains("rolling back from v2 to v1 as release v3")
    }));
}

const BLUE_GREEN_WARM: &str = r#"
    strategy         = "blue_green"
    auto_promote     = true
    min_healthy_time = "100ms"
    healthy_deadline = "2s"
    scale_down_delay = "10m"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_while_the_old_release_is_warm_only_moves_traffic() {
    let w = world_with(BLUE_GREEN_WARM).await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w.apply("two").await.unwrap();
    w.until("v2 takes every request, v1 warm", |s| {
        s.services[0].traffic == BTreeMap::from([(2, 100.0)])
            && s.services[0]
                .instances
                .iter()
                .filter(|i| i.release == 1)
                .count()
                == 2
    })
    .await;
    let launched = w.control.started().len();
    let resp = w
        .engine
        .rollback(kiln_engine::api::RollbackRequest {
            service: "web".into(),
            to: None,
            actor: "test@host".into(),
        })
        .await
        .unwrap();
    assert_eq!((resp.release, resp.warm), (1, true));
    let back = w.until("v1 serves again", |s| serving(s, 1, 2)).await;
    assert_eq!(back.services[0].traffic, BTreeMap::from([(1, 100.0)]));
    assert_eq!(
        w.control.started().len(),
        launched,
        "a warm rollback launches nothing"
    );
}

const BLUE_GREEN_PREVIEW: &str = r#"
    strategy         = "blue_green"
    auto_promote     = false
    preview_listen   = "127.0.0.1:0"
    min_healthy_time = "100ms"
    healthy_deadline = "2s"
    scale_down_delay = "100ms"
"#;

/// One `GET /` over a new connection with the `extra` header lines: the answer's status and
/// `X-Kiln-Release`.
async fn get_release(addr: std::net::SocketAddr, extra: &str) -> (u16, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET / HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
    let release = answer
        .lines()
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("x-kiln-release"))
        .map(|(_, v)| v.trim().to_owned());
    (status, release)
}

/// A listener of the test's own on the engine's proxy, routing everything to `web`.
async fn bind_test_balancer(w: &World) -> std::net::SocketAddr {
    let proxy = w.engine.traffic();
    proxy.set_routes(
        "test",
        vec![kiln_proxy::RouteTarget {
            host: None,
            path_prefix: "/".into(),
            service: "web".into(),
        }],
    );
    proxy
        .bind("test", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_preview_reaches_the_new_release_until_promotion() {
    let w = world_with(BLUE_GREEN_PREVIEW).await;
    let proxy = w.engine.traffic();
    let main = bind_test_balancer(&w).await;
    w.apply("one").await.unwrap();
    let first = w.until("v1 serves", |s| serving(s, 1, 2)).await;
    assert_eq!(
        first.services[0].preview, None,
        "a first deploy previews nothing"
    );
    w.apply("two").await.unwrap();
    let previewing = w
        .until("v2 waits in preview", |s| {
            let svc = &s.services[0];
            svc.preview.is_some()
                && svc.rollout.as_ref().is_some_and(|r| {
                    r.stage
                        .as_deref()
                        .is_some_and(|st| st.starts_with("preview"))
                })
        })
        .await;
    let preview: std::net::SocketAddr = previewing.services[0]
        .preview
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(
        preview.port(),
        0,
        "the bound address, not the configured one"
    );
    let v = |r: &str| (200, Some(r.to_owned()));
    for _ in 0..4 {
        assert_eq!(get_release(main, "").await, v("v1"));
        assert_eq!(get_release(main, "X-Kiln-Preview: 1\r\n").await, v("v2"));
        assert_eq!(
            get_release(main, "Cookie: a=b; kiln-preview=1\r\n").await,
            v("v2")
        );
        assert_eq!(get_release(preview, "").await, v("v2"));
    }
    assert_eq!(previewing.services[0].traffic, BTreeMap::from([(1, 100.0)]));
    let metrics = proxy.metrics("web");
    assert_eq!(metrics[&2].requests, 12, "preview requests count for v2");

    w.engine
        .command("web", kiln_core::rollout::Command::Promote)
        .await
        .unwrap();
    let done = w.until("v2 takes over", |s| serving(s, 2, 2)).await;
    assert_eq!(done.services[0].preview, None);
    for _ in 0..4 {
        assert_eq!(get_release(main, "").await, v("v2"));
        assert_eq!(get_release(main, "X-Kiln-Preview: 1\r\n").await, v("v2"));
    }
    // The preview listener is closed once the preview is over.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(preview).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the preview listener on {preview} is still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_is_previewed_before_promotion_and_not_after_an_abort() {
    let w = world_with(CANARY_WAITING).await;
    let main = bind_test_balancer(&w).await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w.apply("two").await.unwrap();
    let held = w
        .until("the canary holds at its step", |s| {
            s.services[0]
                .rollout
                .as_ref()
                .is_some_and(|r| r.weights.get(&2) == Some(&25))
        })
        .await;
    assert_eq!(
        held.services[0].preview, None,
        "no preview_listen configured"
    );
    // 25 % by weight, but every preview request reaches the canary.
    for _ in 0..8 {
        let r = get_release(main, "X-Kiln-Preview: 1\r\n").await;
        assert_eq!(r, (200, Some("v2".to_owned())));
    }
    w.engine
        .command("web", kiln_core::rollout::Command::Abort)
        .await
        .unwrap();
    w.until("v1 alone serves again", |s| serving(s, 1, 2)).await;
    for _ in 0..4 {
        let r = get_release(main, "X-Kiln-Preview: 1\r\n").await;
        assert_eq!(r, (200, Some("v1".to_owned())));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_image_is_refused_on_deploy_and_on_rollback() {
    let w = world().await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w.apply("two").await.unwrap();
    w.until("v2 serves", |s| serving(s, 2, 2)).await;

    let store = kiln_bake::Store::open(&w.paths.store()).unwrap();
    let image = store.resolve("app").unwrap();
    let now = kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock);
    let at = humantime::format_rfc3339_seconds(now).to_string();
    store
        .revoke(&image, "CVE-2026-1234", &at, "sec@host", now)
        .unwrap();

    let err = w.apply("three").await.unwrap_err().to_string();
    assert!(
        err.contains("deploy of `web` refused") && err.contains("CVE-2026-1234"),
        "{err}"
    );
    let err = w
        .engine
        .rollback(kiln_engine::api::RollbackRequest {
            service: "web".into(),
            to: Some(1),
            actor: "test@host".into(),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rollback of `web` refused") && err.contains("CVE-2026-1234"),
        "{err}"
    );
    // Nothing changed: v2 still serves.
    let status = w.engine.status().await;
    assert!(serving(&status, 2, 2), "{status:#?}");
}
