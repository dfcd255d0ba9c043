//! A small HTTP load generator for kiln's tests and benchmarks.
//!
//! It keeps `concurrency` keep-alive connections busy with `GET` requests until told to stop,
//! and records every response: its status, the `X-Kiln-Release` header that says which
//! release served it, and its latency. A failed request (connection error, 5xx) is counted, never
//! retried, so "0 failed requests" means exactly that.
//!
//! ```no_run
//! # async fn demo() {
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let load = tokio::spawn(kiln_load::run("http://127.0.0.1:8080/".parse().unwrap(), 8, async {
//!     let _ = stopped.await;
//! }));
//! // ... deploy something ...
//! let _ = stop.send(());
//! let summary = load.await.unwrap();
//! assert_eq!(summary.failed(), 0);
//! # }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::Mutex;

/// Every response seen, summarised.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Requests sent.
    pub requests: u64,
    /// Responses by status code (`0` = the request failed without a response).
    pub statuses: BTreeMap<u16, u64>,
    /// Successful responses by the release that served them (`X-Kiln-Release`, `-` if absent).
    pub releases: BTreeMap<String, u64>,
    /// Responses with a status of 400 or more, by the release that served them.
    pub failed_by_release: BTreeMap<String, u64>,
    /// The first few failures, for the error message.
    pub failures: Vec<String>,
    /// Latencies in microseconds, sorted, of successful responses.
    #[serde(skip)]
    pub latencies_us: Vec<u64>,
}

impl Summary {
    /// Requests that did not get a 2xx or 3xx response.
    pub fn failed(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| !(200..400).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    /// The latency at quantile `q` (0–1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[i]
    }

    fn merge(&mut self, other: Summary) {
        self.requests += other.requests;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in other.releases {
            *self.releases.entry(k).or_default() += v;
        }
        for (k, v) in other.failed_by_release {
            *self.failed_by_release.entry(k).or_default() += v;
        }
        for f in other.failures {
            if self.failures.len() < 10 {
                self.failures.push(f);
            }
        }
        self.latencies_us.extend(other.latencies_us);
    }
}

/// Sends requests to `url` from `concurrency` workers until `stop` resolves, then returns what
/// came back. Each worker waits for its response before sending the next request.
pub async fn run(url: http::Uri, concurrency: usize, stop: impl Future<Output = ()>) -> Summary {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let stopping = Arc::new(AtomicBool::new(false));
    let total = Arc::new(Mutex::new(Summary::default()));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let url = url.clone();
        let stopping = stopping.clone();
        let total = total.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = Summary::default();
            while !stopping.load(Ordering::Relaxed) {
                let started = tokio::time::Instant::now();
                mine.requests += 1;
                match client.get(url.clone()).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let release = resp
                            .headers()
                            .get("x-kiln-release")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let body = resp.into_body().collect().await;
                        let status = if body.is_err() { 0 } else { status };
                        *mine.statuses.entry(status).or_default() += 1;
                        if (200..400).contains(&status) {
                            *mine.releases.entry(release).or_default() += 1;
                            mine.latencies_us.push(
                                u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                            );
                        } else {
                            if mine.failures.len() < 10 {
                                mine.failures
                                    .push(format!("status {status} from {release}"));
                            }
                            *mine.failed_by_release.entry(release).or_default() += 1;
                        }
                    }
                    Err(e) => {
                        *mine.statuses.entry(0).or_default() += 1;
                        if mine.failures.len() < 10 {
                            mine.failures.push(format!("request failed: {e}"));
                        }
                    }
                }
            }
            total.lock().await.merge(mine);
        }));
    }
    stop.await;
    stopping.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let mut summary = std::mem::take(&mut *total.lock().await);
    summary.latencies_us.sort_unstable();
    summary
}
