//! Webhook notifications against a real HTTP receiver: events arrive in order, failed posts are
//! retried, and a receiver that never answers does not slow a rollout.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kiln_core::clock::{Clock, SystemClock};
use serde_json::Value;

mod common;

use common::{ROLLING, World, serving};

const CANARY: &str = r#"
    strategy         = "canary"
    steps            = [{ weight = 25, pause = "200ms" }, { weight = 50, pause = "200ms" }]
    min_healthy_time = "100ms"
    healthy_deadline = "2s"
    scale_down_delay = "100ms"
"#;

// --- the receiver -------------------------------------------------------------------------

/// How the receiver answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// 204 to every post.
    Ok,
    /// 500 to the first `n` posts, then 204.
    FailFirst(usize),
    /// Reads the post and never answers.
    Never,
}

/// An HTTP server on 127.0.0.1:0 that records what is posted to it.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    /// Every post's body, answered or not, in arrival order.
    attempts: Arc<Mutex<Vec<Value>>>,
    /// The posts answered with 2xx, in arrival order.
    accepted: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start(answer: Answer) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Self {
            addr: listener.local_addr().unwrap(),
            attempts: Arc::default(),
            accepted: Arc::default(),
        };
        let seen = Arc::new(AtomicUsize::new(0));
        let r = receiver.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, seen) = (r.clone(), seen.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (r, seen) = (r.clone(), seen.clone());
                        async move {
                            assert_eq!(req.method(), hyper::Method::POST);
                            assert_eq!(req.uri().path(), "/hook");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let json: Value = serde_json::from_slice(&body).unwrap();
                            r.attempts.lock().unwrap().push(json.clone());
                            let n = seen.fetch_add(1, Ordering::SeqCst);
                            let status = match answer {
                                Answer::Ok => 204,
                                Answer::FailFirst(k) if n < k => 500,
                                Answer::FailFirst(_) => 204,
                                Answer::Never => std::future::pending().await,
                            };
                            if status == 204 {
                                r.accepted.lock().unwrap().push(json);
                            }
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        receiver
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn accepted(&self) -> Vec<Value> {
        self.accepted.lock().unwrap().clone()
    }

    fn attempts(&self) -> Vec<Value> {
        self.attempts.lock().unwrap().clone()
    }

    /// Waits (bounded) until an accepted post satisfies `done`.
    async fn until(&self, what: &str, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        for _ in 0..300 {
            let posts = self.accepted();
            if posts.iter().any(&done) {
                return posts;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}: {:#?}", self.accepted());
    }
}

fn is(post: &Value, kind: &str, release: u32) -> bool {
    post["kind"] == kind && post["release"] == release
}

// --- the engine, as in tests/engine.rs ------------------------------------------------------

async fn world(rollout: &str, webhook: Option<&str>) -> World {
    common::world_with(rollout, webhook).await
}

/// Rolls out v1, then v2, and returns how long the v2 rollout took (apply to v2 alone serving,
/// with the lock given back).
async fn v1_then_v2(w: &World) -> Duration {
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2) && s.lock.is_none())
        .await;
    let start = SystemClock.now();
    w.apply("two").await.unwrap();
    w.until("v2 serves", |s| serving(s, 2, 2) && s.lock.is_none())
        .await;
    SystemClock.now().duration_since(start).unwrap()
}

/// The public kinds of `posts` about `release`, in order.
fn kinds(posts: &[Value], release: u32) -> Vec<String> {
    posts
        .iter()
        .filter(|p| p["release"] == release)
        .map(|p| p["kind"].as_str().unwrap().to_owned())
        .collect()
}

// --- tests -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_posts_its_events_in_order_from_started_to_succeeded() {
    let hook = Receiver::start(Answer::Ok).await;
    let w = world(ROLLING, Some(&hook.url())).await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2) && s.lock.is_none())
        .await;
    let v2 = w.apply("two").await.unwrap();
    w.until("v2 serves", |s| serving(s, 2, 2)).await;
    let posts = hook.until("v2 succeeded", |p| is(p, "succeeded", 2)).await;

    // Every event of the service, exactly as the state store recorded it, in the same order.
    let recorded: Vec<(String, String)> = w
        .engine
        .events(0)
        .unwrap()
        .into_iter()
        .filter(|e| e.service.as_deref() == Some("web"))
        .map(|e| (e.kind, e.message))
        .collect();
    let posted: Vec<(String, String)> = posts
        .iter()
        .map(|p| {
            let field = |k: &str| p[k].as_str().unwrap().to_owned();
            (field("event"), field("message"))
        })
        .collect();
    assert_eq!(
        posted[..],
        recorded[..posted.len()],
        "posted in the order recorded"
    );

    // v2's story starts with `started` and ends with `succeeded`, once each (instances
    // stopping in the background may still be reported after it).
    let public = [
        "started",
        "step",
        "verdict",
        "promoted",
        "aborted",
        "rolled_back",
        "succeeded",
        "failed",
    ];
    let v2_kinds: Vec<String> = kinds(&posts, 2)
        .into_iter()
        .filter(|k| public.contains(&k.as_str()))
        .collect();
    assert_eq!(v2_kinds.first().map(String::as_str), Some("started"));
    assert_eq!(v2_kinds.last().map(String::as_str), Some("succeeded"));
    assert_eq!(v2_kinds.iter().filter(|k| *k == "started").count(), 1);
    assert_eq!(v2_kinds.iter().filter(|k| *k == "succeeded").count(), 1);
    let started = posts.iter().find(|p| is(p, "started", 2)).unwrap();
    assert_eq!(started["service"], "web");
    assert_eq!(started["event"], "release");
    assert_eq!(started["deployment_id"], v2.deployment_id.as_str());
    assert!(
        humantime::parse_rfc3339(started["time"].as_str().unwrap()).is_ok(),
        "{started}"
    );
    for p in posts.iter().filter(|p| p["release"] == 2) {
        assert_eq!(p["deployment_id"], v2.deployment_id.as_str(), "{p}");
    }
    let fields: Vec<&String> = started.as_object().unwrap().keys().collect();
    assert_eq!(
        fields,
        [
            "deployment_id",
            "event",
            "id",
            "kind",
            "message",
            "release",
            "service",
            "time"
        ]
    );
    let mut ids: Vec<&str> = posts.iter().map(|p| p["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), posts.len(), "every event has its own id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_posts_its_steps_and_its_promotion() {
    let hook = Receiver::start(Answer::Ok).await;
    let w = world(CANARY, Some(&hook.url())).await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2) && s.lock.is_none())
        .await;
    w.apply("two").await.unwrap();
    let posts = hook.until("v2 succeeded", |p| is(p, "succeeded", 2)).await;
    let v2: Vec<String> = kinds(&posts, 2)
        .into_iter()
        .filter(|k| ["started", "step", "promoted", "succeeded"].contains(&k.as_str()))
        .collect();
    // started; the 0 % split before any v2 instance is routed; each step's entry and split;
    // "step 2 of 2 passed"; promoted, then the 100 % split it set (the journal's decisions are
    // recorded before the actions that carry them out); succeeded once the warm period is over.
    assert_eq!(
        v2,
        [
            "started",
            "step",
            "step",
            "step",
            "step",
            "step",
            "step",
            "promoted",
            "step",
            "succeeded"
        ],
        "{posts:#?}"
    );
    let steps: Vec<&str> = posts
        .iter()
        .filter(|p| is(p, "step", 2) && p["event"] == "rollout")
        .map(|p| p["message"].as_str().unwrap())
        .collect();
    assert!(
        steps[0].starts_with("step 1 of 2: 25% of requests to v2"),
        "{steps:?}"
    );
    assert!(
        steps[1].starts_with("step 2 of 2: 50% of requests to v2"),
        "{steps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_twice_still_gets_the_event() {
    let hook = Receiver::start(Answer::FailFirst(2)).await;
    let w = world(ROLLING, Some(&hook.url())).await;
    w.apply("one").await.unwrap();
    // The first event is tried three times (two 500s, 1 s and 2 s apart), then delivered.
    let posts = hook.until("v1 started", |p| is(p, "started", 1)).await;
    let first = &posts[0];
    assert!(is(first, "started", 1), "{posts:#?}");
    let attempts = hook.attempts();
    assert_eq!(
        attempts
            .iter()
            .take(3)
            .map(|a| &a["id"])
            .collect::<Vec<_>>(),
        [&first["id"], &first["id"], &first["id"]],
        "the same event, retried: {attempts:#?}"
    );
    // The rest follow, in order, once the receiver is back.
    let posts = hook.until("v1 succeeded", |p| is(p, "succeeded", 1)).await;
    assert_eq!(
        kinds(&posts, 1).first().map(String::as_str),
        Some("started")
    );
    assert!(serving(&w.engine.status().await, 1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_does_not_slow_a_rollout() {
    // The usual time of the same rollout without a webhook.
    let usual = {
        let w = world(ROLLING, None).await;
        v1_then_v2(&w).await
    };
    let hook = Receiver::start(Answer::Never).await;
    let w = world(ROLLING, Some(&hook.url())).await;
    let took = v1_then_v2(&w).await;
    // Blocking on the receiver would cost 2 s per event and attempt; allow for a busy machine.
    assert!(
        took < usual * 2 + Duration::from_secs(1),
        "the v2 rollout took {took:?} with a dead webhook, {usual:?} without"
    );
    assert!(
        !hook.attempts().is_empty(),
        "the receiver was posted to (and never answered)"
    );
    assert!(hook.accepted().is_empty());
}
