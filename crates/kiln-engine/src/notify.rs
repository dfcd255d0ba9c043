//! Webhook notifications: every event of a service whose spec names webhooks is posted to each
//! of them as JSON, in the background.
//!
//! [`Engine::persist`](crate::Engine) hands the events it has just written to
//! [`Notifier::enqueue`], which only serialises them and pushes them on a bounded in-memory
//! queue per webhook; it never waits for the network, so a slow or dead receiver cannot slow a
//! rollout. One task per webhook (started when its queue has work, ended when the queue is
//! empty) posts the events in order, each with a 2 s timeout and up to 5 attempts 1 s, 2 s and
//! 4 s (then 8 s) apart. A full queue drops its oldest event with a warning. Delivery is at
//! least once: a receiver that answered too late may see an event twice, and the `id` tells.
//!
//! The payload's `kind` is one of a small public set, derived from kiln's internal event kind
//! (and, for journal entries, from their text) by [`public_kind`]:
//!
//! | public `kind` | internal event (`event`)                                             |
//! |---------------|----------------------------------------------------------------------|
//! | `started`     | `release`: a release was recorded and its rollout begins             |
//! | `step`        | `traffic` (a new split), `rollout` "step N of M…" (a canary step)     |
//! | `verdict`     | `rollout` "analysis: …" (one analysis window judged)                 |
//! | `promoted`    | `rollout` "promoted: …" (the new release takes every request)        |
//! | `aborted`     | `rollout` "aborting: …", or "…: reverting to vN" (a rolling update)  |
//! | `rolled_back` | `rollout` "rollout to vN failed (…); reverted to vM", and `rollback` |
//! | `succeeded`   | `rollout` "rollout to vN succeeded"                                  |
//! | `failed`      | `rollout` "rollout to vN failed: …" (not reverted)                   |
//! | anything else | the internal kind unchanged (`rollout`, `launch`, `stopped`, `heal`, …) |

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kiln_core::state::{ServiceState, State};
use kiln_state::NewEvent;
use serde::Serialize;

/// Events waiting per webhook before the oldest is dropped.
pub(crate) const QUEUE_CAPACITY: usize = 1000;
/// How long one POST may take, connect to last byte of the answer.
pub(crate) const POST_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per event, the first included.
pub(crate) const ATTEMPTS: u32 = 5;
/// The wait before the second attempt; it doubles before each further one.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// What a webhook receives, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Payload {
    /// Unique per event (the same on every attempt, so a receiver can drop repeats).
    pub id: String,
    /// When the event was recorded (RFC 3339, milliseconds).
    pub time: String,
    /// The service.
    pub service: String,
    /// The public kind (see [`public_kind`]).
    pub kind: String,
    /// kiln's internal kind.
    pub event: String,
    /// What happened, in words.
    pub message: String,
    /// The release the rollout under way targets, else the one that serves.
    pub release: Option<u32>,
    /// The deployment (apply or rollback) that made that release.
    pub deployment_id: Option<String>,
}

/// The public kind of an internal event; see the module documentation for the table.
pub(crate) fn public_kind<'k>(kind: &'k str, message: &str) -> &'k str {
    match kind {
        "release" => "started",
        "traffic" => "step",
        "rollback" => "rolled_back",
        "rollout" => {
            if message.starts_with("step ") {
                "step"
            } else if message.starts_with("analysis: ") {
                "verdict"
            } else if message.starts_with("promoted: ") {
                "promoted"
            } else if message.starts_with("aborting: ") {
                "aborted"
            } else if let Some(rest) = message.strip_prefix("rollout to v") {
                if rest.contains("; reverted to v") {
                    "rolled_back"
                } else if rest.contains(" succeeded") {
                    "succeeded"
                } else if rest.contains(" failed") {
                    "failed"
                } else {
                    kind
                }
            } else if message.contains(": reverting to v") {
                "aborted"
            } else {
                kind
            }
        }
        other => other,
    }
}

/// The background delivery of webhook events. Cheap to create; tasks start with the first
/// event for a webhook.
pub(crate) struct Notifier {
    hooks: Mutex<BTreeMap<String, Arc<Hook>>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

/// One webhook's queue.
#[derive(Debug)]
struct Hook {
    url: String,
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Whether a task is delivering this queue.
    running: bool,
}

#[derive(Debug, Clone)]
struct Item {
    id: String,
    kind: String,
    body: Bytes,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    pub(crate) fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(POST_TIMEOUT));
        connector.set_nodelay(true);
        Self {
            hooks: Mutex::new(BTreeMap::new()),
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    /// Queues `events` (just written at `now`) for the webhooks of their services in `state`.
    /// Never waits: the posting happens in background tasks.
    pub(crate) fn enqueue(&self, state: &State, events: &[NewEvent], now: SystemTime) {
        let mut refs: BTreeMap<&str, Option<(u32, String)>> = BTreeMap::new();
        for event in events {
            let Some(name) = event.service.as_deref() else {
                continue;
            };
            let Some(service) = state.services.get(name) else {
                continue;
            };
            if service.spec.notify.is_empty() {
                continue;
            }
            let kind = public_kind(&event.kind, &event.message);
            let rollout_event = kind != event.kind || event.kind == "rollout";
            let release = if rollout_event {
                refs.entry(name)
                    .or_insert_with(|| rollout_release(service))
                    .clone()
            } else {
                serving_release(service)
            };
            let (release, deployment_id) = release.unzip();
            let payload = Payload {
                id: uuid::Uuid::new_v4().to_string(),
                time: humantime::format_rfc3339_millis(now).to_string(),
                service: name.to_owned(),
                kind: kind.to_owned(),
                event: event.kind.clone(),
                message: event.message.clone(),
                release,
                deployment_id,
            };
            let body = match serde_json::to_vec(&payload) {
                Ok(body) => Bytes::from(body),
                Err(e) => {
                    tracing::warn!(service = name, "webhook payload: {e}");
                    continue;
                }
            };
            let item = Item {
                id: payload.id,
                kind: payload.kind,
                body,
            };
            for url in &service.spec.notify {
                self.push(url, item.clone());
            }
        }
    }

    fn push(&self, url: &str, item: Item) {
        let hook = {
            let mut hooks = self.hooks.lock().unwrap_or_else(|e| e.into_inner());
            hooks
                .entry(url.to_owned())
                .or_insert_with(|| {
                    Arc::new(Hook {
                        url: url.to_owned(),
                        queue: Mutex::new(Queue::default()),
                    })
                })
                .clone()
        };
        let start = {
            let mut q = hook.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.items.len() >= QUEUE_CAPACITY
                && let Some(dropped) = q.items.pop_front()
            {
                tracing::warn!(
                    webhook = %hook.url,
                    event = %dropped.id,
                    kind = %dropped.kind,
                    "webhook queue full ({QUEUE_CAPACITY} events): dropping the oldest event"
                );
            }
            q.items.push_back(item);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                // Only outside the server (no runtime): the event stays queued for the next push.
                hook.queue.lock().unwrap_or_else(|e| e.into_inner()).running = false;
                tracing::warn!(webhook = %hook.url, "no async runtime to deliver webhooks");
                return;
            };
            let client = self.client.clone();
            runtime.spawn(deliver_all(client, hook));
        }
    }
}

/// The release a rollout-related event is about: the one the rollout under way targets, else
/// (the rollout has just ended) the newest release.
fn rollout_release(service: &ServiceState) -> Option<(u32, String)> {
    let journal = service.rollout.clone();
    if let Some(j) = journal {
        return Some((j.to, j.deployment_id));
    }
    service
        .releases
        .last()
        .map(|r| (r.number, r.deployment_id.clone()))
}

/// The release another event is about: the one a rollout targets, else the stable one.
fn serving_release(service: &ServiceState) -> Option<(u32, String)> {
    if service.rollout.is_some() {
        return rollout_release(service);
    }
    service
        .stable
        .and_then(|n| service.releases.iter().find(|r| r.number == n))
        .or(service.releases.last())
        .map(|r| (r.number, r.deployment_id.clone()))
}

/// Posts a webhook's queue in order until it is empty.
async fn deliver_all(client: Client<HttpConnector, Full<Bytes>>, hook: Arc<Hook>) {
    loop {
        let next = {
            let mut q = hook.queue.lock().unwrap_or_else(|e| e.into_inner());
            let next = q.items.pop_front();
            if next.is_none() {
                q.running = false;
            }
            next
        };
        let Some(item) = next else {
            return;
        };
        deliver(&client, &hook.url, &item).await;
    }
}

/// Posts one event, retrying with backoff; gives up (with a warning) after [`ATTEMPTS`].
async fn deliver(client: &Client<HttpConnector, Full<Bytes>>, url: &str, item: &Item) {
    let mut wait = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let outcome = tokio::time::timeout(POST_TIMEOUT, post(client, url, item)).await;
        let problem = match outcome {
            Ok(Ok(())) => {
                tracing::debug!(webhook = url, event = %item.id, attempt, "webhook delivered");
                return;
            }
            Ok(Err(problem)) => problem,
            Err(_) => format!(
                "no answer within {}",
                humantime::format_duration(POST_TIMEOUT)
            ),
        };
        if attempt == ATTEMPTS {
            tracing::warn!(
                webhook = url,
                event = %item.id,
                kind = %item.kind,
                "webhook delivery failed {ATTEMPTS} times, giving up: {problem}"
            );
            return;
        }
        tracing::debug!(
            webhook = url,
            event = %item.id,
            attempt,
            "webhook delivery failed: {problem}; retrying in {}",
            humantime::format_duration(wait)
        );
        tokio::time::sleep(wait).await;
        wait = wait.saturating_mul(2);
    }
}

/// One POST; an answer other than 2xx is a failure.
async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    item: &Item,
) -> Result<(), String> {
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("kiln/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-kiln-event", item.id.as_str())
        .body(Full::new(item.body.clone()))
        .map_err(|e| format!("bad request: {e}"))?;
    let response = client.request(request).await.map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    })?;
    let status = response.status();
    // Read the answer to the end so the connection can be reused.
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::public_kind;

    #[test]
    fn internal_kinds_map_to_the_public_set() {
        let cases = [
            (
                "release",
                "release v2 created; rolling out from v1",
                "started",
            ),
            ("traffic", "v1 75%, v2 25%", "step"),
            (
                "rollout",
                "step 1 of 2: 25% of requests to v2; hold for 30s",
                "step",
            ),
            (
                "rollout",
                "step 2 of 2 passed; scaling v2 to 3 instances",
                "step",
            ),
            (
                "rollout",
                "analysis: pass (120 requests, 0 errors)",
                "verdict",
            ),
            (
                "rollout",
                "promoted: v2 takes every request; v1 stays warm for 5m",
                "promoted",
            ),
            ("rollout", "aborting: aborted by an operator", "aborted"),
            (
                "rollout",
                "v2 instance web-v2-1 exited: reverting to v1",
                "aborted",
            ),
            ("rollout", "rollout to v2 succeeded", "succeeded"),
            (
                "rollout",
                "rollout to v2 failed (aborted by an operator); reverted to v1",
                "rolled_back",
            ),
            (
                "rollout",
                "rollout to v2 failed: progress deadline",
                "failed",
            ),
            (
                "rollback",
                "rolling back from v2 to v1 as release v3",
                "rolled_back",
            ),
            ("rollout", "launch a v2 instance (1 of 2)", "rollout"),
            ("rollout", "traffic: v1 100%, v2 0%", "rollout"),
            ("launch", "web-v2-1 started", "launch"),
            (
                "stopped",
                "instance web-v1-1 drained and stopped",
                "stopped",
            ),
            ("heal", "replacing a dead instance of v1", "heal"),
        ];
        for (kind, message, public) in cases {
            assert_eq!(public_kind(kind, message), public, "{kind}: {message}");
        }
    }
}
