//! Per-release request counters and latency histograms.
//!
//! Counters are plain atomics owned by the service, one set per release, and shared by every table
//! that names the release, so a `set_service` swap never resets them. They are cumulative: the
//! analysis takes deltas between two reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Octaves covered by the histogram: up to 2^30 µs (about 18 minutes); slower requests land in the
/// last bucket.
const OCTAVES: usize = 30;
/// Sub-buckets per octave: four keeps the relative error of a quantile under 25 %.
const SUB: usize = 4;
/// Number of latency buckets.
pub const BUCKETS: usize = OCTAVES * SUB;

/// The bucket a latency in microseconds falls into. Buckets 0–3 hold 0–3 µs exactly; above that,
/// each power of two is split into four equal buckets (a log-linear layout, as in HdrHistogram).
pub(crate) fn bucket_of(micros: u64) -> usize {
    if micros < SUB as u64 {
        // Lossless: `micros` is below 4.
        return micros as usize;
    }
    let exp = 63 - micros.leading_zeros() as usize; // floor(log2), at least 2
    let sub = ((micros >> (exp - 2)) & 3) as usize;
    ((exp - 1) * SUB + sub).min(BUCKETS - 1)
}

/// The exclusive upper bound, in microseconds, of bucket `index`.
pub fn bucket_upper_micros(index: usize) -> u64 {
    if index < SUB {
        return index as u64 + 1;
    }
    let exp = index / SUB + 1;
    let sub = (index % SUB) as u64;
    ((SUB as u64 + sub) << (exp - 2)) + (1 << (exp - 2))
}

/// The live counters of one release.
#[derive(Debug)]
pub(crate) struct ReleaseCounters {
    requests: AtomicU64,
    status_5xx: AtomicU64,
    connect_errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl ReleaseCounters {
    pub(crate) fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            status_5xx: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Records one finished request. Relaxed ordering is enough: each counter is independent and a
    /// reader only needs eventually consistent totals.
    pub(crate) fn record(&self, status: u16, latency: Duration, connect_error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.status_5xx.fetch_add(1, Ordering::Relaxed);
        }
        if connect_error {
            self.connect_errors.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn read(&self) -> ReleaseMetrics {
        ReleaseMetrics {
            requests: self.requests.load(Ordering::Relaxed),
            status_5xx: self.status_5xx.load(Ordering::Relaxed),
            connect_errors: self.connect_errors.load(Ordering::Relaxed),
            latency: LatencyHistogram {
                counts: self
                    .buckets
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
            },
        }
    }
}

/// What the proxy measured for one release of a service, since the release was first routed to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReleaseMetrics {
    /// Requests answered for this release, whatever their status (proxy-generated 502s included).
    pub requests: u64,
    /// Responses with a status of 500 or more.
    pub status_5xx: u64,
    /// Requests that failed because no backend accepted a connection, after the retry.
    pub connect_errors: u64,
    /// Time from receiving the request to receiving the upstream's response head.
    pub latency: LatencyHistogram,
}

/// A latency histogram with fixed log-linear buckets in microseconds (see [`bucket_upper_micros`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LatencyHistogram {
    /// `counts[i]` requests took less than `bucket_upper_micros(i)` and at least the bound of `i - 1`.
    pub counts: Vec<u64>,
}

impl LatencyHistogram {
    /// Number of recorded requests.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0.0–1.0), or `None` when empty.
    /// Reporting the bucket's upper bound errs on the slow side, which is the safe side for an
    /// analysis that aborts rollouts on high latency.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        // The rank of the quantile, 1-based; the ceiling keeps p99 of 100 samples at the 99th.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(bucket_upper_micros(i)));
            }
        }
        None
    }

    /// The median.
    pub fn p50(&self) -> Option<Duration> {
        self.quantile(0.5)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Option<Duration> {
        self.quantile(0.99)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_bounds_contain_their_values() {
        let mut last = 0;
        for v in 0..100_000u64 {
            let b = bucket_of(v);
            assert!(b == last || b == last + 1, "gap at {v}");
            last = b;
            assert!(v < bucket_upper_micros(b), "{v} not below bound of {b}");
            if b > 0 {
                assert!(
                    v >= bucket_upper_micros(b - 1),
                    "{v} below lower bound of {b}"
                );
            }
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_err_on_the_slow_side() {
        let c = ReleaseCounters::new();
        for _ in 0..99 {
            c.record(200, Duration::from_micros(1000), false);
        }
        c.record(503, Duration::from_millis(200), true);
        let m = c.read();
        assert_eq!((m.requests, m.status_5xx, m.connect_errors), (100, 1, 1));
        let p50 = m.latency.p50().unwrap();
        assert!(p50 >= Duration::from_micros(1000) && p50 <= Duration::from_micros(1250));
        assert_eq!(m.latency.p99(), m.latency.p50());
        assert!(m.latency.quantile(1.0).unwrap() >= Duration::from_millis(200));
    }
}
