//! Analysis: judging a release by the requests it served, and the bookkeeping of a run of
//! such judgements during a rollout.
//!
//! [`judge`] is a pure function of one window of [`Samples`] (the RED counts of the new release
//! and of the stable release over the same stretch of time) and the [`AnalysisRules`] of the
//! service's `analysis` block. Its rule of thumb is the opposite of the tools users complain
//! about (flagger#1581, kayenta#377): **missing data never passes**. No requests, fewer than
//! `min_requests`, a threshold whose measurement is absent (no latency histogram, no stable
//! baseline for a relative rule) or counts that contradict each other make the verdict
//! [`Verdict::Inconclusive`], and only a window where every configured rule could be checked
//! and held is a [`Verdict::Pass`].
//!
//! [`AnalysisRun`] turns verdicts into decisions the way Argo Rollouts does: more consecutive
//! failures than `failure_limit` abort the rollout, more consecutive inconclusive windows than
//! `inconclusive_limit` pause it (never promote it).
//!
//! ```
//! use kiln_core::analysis::{judge, AnalysisRules, Red, Samples, Verdict};
//!
//! let rules = AnalysisRules { max_error_rate: Some(0.01), min_requests: 50, ..AnalysisRules::default() };
//! let window = |requests, errors| Samples {
//!     from_ms: 0,
//!     to_ms: 5_000,
//!     canary: Red { requests, errors, p50_us: None, p99_us: None },
//!     stable: None,
//! };
//! assert_eq!(judge(&window(200, 1), &rules), Verdict::Pass);
//! assert!(matches!(judge(&window(200, 20), &rules), Verdict::Fail { .. }));
//! // Ten clean requests prove nothing.
//! assert!(matches!(judge(&window(10, 0), &rules), Verdict::Inconclusive { .. }));
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::Analysis;

/// Rate comparisons allow this much slack, so that a window exactly at a configured bound
/// (`max_error_rate = 0.01` and 1 error in 100 requests) passes whatever the float rounding.
const EPSILON: f64 = 1e-9;

/// Rate, errors and duration of the requests one release served in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Red {
    /// Requests answered, whatever their status.
    pub requests: u64,
    /// Failed requests: responses with a status of 500 or more, plus requests no backend
    /// accepted a connection for.
    pub errors: u64,
    /// Median latency in microseconds; `None` when nothing was measured.
    pub p50_us: Option<u64>,
    /// 99th-percentile latency in microseconds; `None` when nothing was measured.
    pub p99_us: Option<u64>,
}

impl Red {
    fn error_rate(&self) -> f64 {
        // Counts stay far below 2^53 in any real window, so the conversion is exact.
        self.errors as f64 / self.requests as f64
    }
}

/// One measurement window: what the new release and the stable release served between
/// `from_ms` and `to_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Samples {
    /// When the window began.
    pub from_ms: u64,
    /// When the window ended.
    pub to_ms: u64,
    /// The release being judged (the canary, or the blue/green release on its preview route).
    pub canary: Red,
    /// The stable release in the same window, for rules relative to it; `None` if unknown.
    pub stable: Option<Red>,
}

/// The thresholds a window is judged against, from [`Analysis`]. An absent threshold is not
/// checked; `min_requests` always is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct AnalysisRules {
    /// Highest acceptable share of failed requests (0–1).
    pub max_error_rate: Option<f64>,
    /// Highest acceptable median latency, in microseconds.
    pub max_p50_us: Option<u64>,
    /// Highest acceptable 99th-percentile latency, in microseconds.
    pub max_p99_us: Option<u64>,
    /// Highest acceptable error rate above the stable release's in the same window, in
    /// absolute terms (`0.005`: half a percentage point more). A difference rather than a ratio,
    /// so that a stable release with no errors at all does not make every error infinite.
    pub max_error_rate_increase: Option<f64>,
    /// Highest acceptable 99th-percentile latency above the stable release's, as a fraction
    /// of it (`0.2`: at most 20 % slower).
    pub max_p99_increase: Option<f64>,
    /// Fewer requests than this (for the release, and for the stable release when a relative
    /// rule needs it) make a window inconclusive. At least 1 is always required.
    pub min_requests: u64,
}

impl From<&Analysis> for AnalysisRules {
    fn from(a: &Analysis) -> Self {
        Self {
            max_error_rate: a.max_error_rate,
            max_p50_us: a.max_p50_latency.map(micros),
            max_p99_us: a.max_p99_latency.map(micros),
            max_error_rate_increase: a.max_error_rate_increase,
            max_p99_increase: a.max_p99_increase,
            min_requests: a.min_requests,
        }
    }
}

/// What one window says about a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Every configured rule was checked and held.
    Pass,
    /// At least one rule was broken (a broken rule fails the window even when others lack
    /// data).
    Fail {
        /// Every broken rule, in words.
        reasons: Vec<String>,
    },
    /// The window cannot say: too few requests, or a measurement a rule needs is missing.
    Inconclusive {
        /// Why, in words.
        reason: String,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pass => f.write_str("pass"),
            Self::Fail { reasons } => write!(f, "fail: {}", reasons.join("; ")),
            Self::Inconclusive { reason } => write!(f, "inconclusive: {reason}"),
        }
    }
}

/// Judges one window of samples against the rules.
pub fn judge(samples: &Samples, rules: &AnalysisRules) -> Verdict {
    let canary = &samples.canary;
    let min = rules.min_requests.max(1);
    if let Some(why) = insufficient(canary, min, "the release") {
        return Verdict::Inconclusive { reason: why };
    }

    let mut broken = Vec::new();
    let mut missing = Vec::new();
    let rate = canary.error_rate();
    if let Some(max) = rules.max_error_rate
        && rate > max + EPSILON
    {
        broken.push(format!(
            "error rate {} above {}",
            percent(rate),
            percent(max)
        ));
    }
    let latencies = [
        ("p50", canary.p50_us, rules.max_p50_us),
        ("p99", canary.p99_us, rules.max_p99_us),
    ];
    for (name, value, max) in latencies {
        match (value, max) {
            (_, None) => {}
            (None, Some(_)) => missing.push(format!("no {name} latency measured")),
            (Some(v), Some(max)) if v > max => {
                broken.push(format!("{name} latency {} above {}", us(v), us(max)));
            }
            (Some(_), Some(_)) => {}
        }
    }

    let relative = rules.max_error_rate_increase.is_some() || rules.max_p99_increase.is_some();
    if relative {
        match samples
            .stable
            .as_ref()
            .map(|s| (s, insufficient(s, min, "stable")))
        {
            None => missing.push("no stable release measured to compare with".to_owned()),
            Some((_, Some(why))) => missing.push(why),
            Some((stable, None)) => compare(canary, stable, rules, &mut broken, &mut missing),
        }
    }

    if !broken.is_empty() {
        Verdict::Fail { reasons: broken }
    } else if !missing.is_empty() {
        Verdict::Inconclusive {
            reason: missing.join("; "),
        }
    } else {
        Verdict::Pass
    }
}

/// Why `red` is not enough to judge on, if it is not: no requests, too few, or more errors than
/// requests (counters from two different windows).
fn insufficient(red: &Red, min: u64, who: &str) -> Option<String> {
    if red.requests == 0 {
        Some(format!("no requests to {who} in the window"))
    } else if red.requests < min {
        Some(format!(
            "{} requests to {who}, fewer than min_requests {min}",
            red.requests
        ))
    } else if red.errors > red.requests {
        Some(format!(
            "{} errors in {} requests to {who}: inconsistent counts",
            red.errors, red.requests
        ))
    } else {
        None
    }
}

/// The rules relative to the stable release, for two windows that both have enough requests.
fn compare(
    canary: &Red,
    stable: &Red,
    rules: &AnalysisRules,
    broken: &mut Vec<String>,
    missing: &mut Vec<String>,
) {
    if let Some(max) = rules.max_error_rate_increase {
        let (c, s) = (canary.error_rate(), stable.error_rate());
        if c - s > max + EPSILON {
            broken.push(format!(
                "error rate {} is more than {} above stable's {}",
                percent(c),
                percent(max),
                percent(s)
            ));
        }
    }
    if let Some(max) = rules.max_p99_increase {
        match (canary.p99_us, stable.p99_us) {
            (Some(c), Some(s)) => {
                // Integer microseconds, so the comparison is exact at the bound.
                let limit = s as f64 * (1.0 + max);
                if c as f64 > limit + EPSILON * limit {
                    broken.push(format!(
                        "p99 latency {} is more than {} above stable's {}",
                        us(c),
                        percent(max),
                        us(s)
                    ));
                }
            }
            (None, _) => missing.push("no p99 latency measured".to_owned()),
            (_, None) => missing.push("no p99 latency measured for stable".to_owned()),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Exact, for limits and breaches: rounding could make `100ms 1us above 100ms` read as
/// `100ms above 100ms`.
fn us(v: u64) -> String {
    humantime::format_duration(Duration::from_micros(v)).to_string()
}

/// A latency in microseconds for people, to three significant digits: `870us`, `4.1ms`,
/// `12.5ms`, `1.25s`, for measurements in a verdict's summary.
pub fn latency(micros: u64) -> String {
    // Three digits are shown, so the f64 rounding is invisible.
    let v = micros as f64;
    let (value, unit) = match micros {
        0..1_000 => return format!("{micros}us"),
        1_000..1_000_000 => (v / 1e3, "ms"),
        _ => (v / 1e6, "s"),
    };
    let decimals = match value {
        v if v < 10.0 => 2,
        v if v < 100.0 => 1,
        _ => 0,
    };
    let digits = format!("{value:.decimals$}");
    let digits = if digits.contains('.') {
        digits.trim_end_matches('0').trim_end_matches('.')
    } else {
        &digits
    };
    format!("{digits}{unit}")
}

fn percent(rate: f64) -> String {
    let p = format!("{:.3}", rate * 100.0);
    let p = p.trim_end_matches('0').trim_end_matches('.');
    format!("{p}%")
}

/// One verdict as recorded by an [`AnalysisRun`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurement {
    /// When it was taken.
    pub at_ms: u64,
    /// The window judged (`None` when no usable samples came).
    pub window: Option<Samples>,
    /// The verdict.
    pub verdict: Verdict,
}

/// What an [`AnalysisRun`] decides after a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Keep going (a pass, or a failure or inconclusive window within its limit).
    Continue,
    /// More consecutive failures than `failure_limit`: abort the rollout.
    Abort {
        /// Why, in words.
        reason: String,
    },
    /// More consecutive inconclusive windows than `inconclusive_limit`: pause the rollout
    /// until an operator resumes (or promotes, or aborts) it.
    Pause {
        /// Why, in words.
        reason: String,
    },
}

/// The analysis of one rollout: when the next window is due and how the verdicts so far
/// count towards the limits.
///
/// - A window is due every `interval`; a due window without usable samples (none given, older
///   than the last one judged, or begun before the current traffic split) is
///   **inconclusive**, so an engine that stops reporting metrics pauses the rollout instead
///   of stalling it unseen or letting it pass.
/// - `consecutive_failures` counts failures since the last pass (inconclusive windows neither
///   add to it nor reset it); more than `failure_limit` aborts. With the default 0 the first
///   failure aborts.
/// - `consecutive_inconclusive` counts inconclusive windows since the last conclusive one;
///   more than `inconclusive_limit` pauses. A resume starts the count again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisRun {
    /// What windows are judged against.
    pub rules: AnalysisRules,
    /// Time between windows.
    pub interval_ms: u64,
    /// Consecutive failures tolerated.
    pub failure_limit: u32,
    /// Consecutive inconclusive windows tolerated.
    pub inconclusive_limit: u32,
    /// When the next window is due; `None` while no traffic split is being measured.
    pub next_ms: Option<u64>,
    /// Samples must begin at or after this: the later of when the current traffic split was
    /// set and the end of the last window judged.
    pub window_floor_ms: u64,
    /// Failures since the last pass.
    pub consecutive_failures: u32,
    /// Inconclusive windows since the last conclusive one.
    pub consecutive_inconclusive: u32,
    /// Verdicts so far, by kind: passes, failures, inconclusive.
    pub totals: [u32; 3],
    /// The latest verdict.
    pub last: Option<Measurement>,
}

impl AnalysisRun {
    /// A run of `analysis`, not yet measuring.
    pub fn new(analysis: &Analysis) -> Self {
        Self {
            rules: AnalysisRules::from(analysis),
            // A zero interval would judge every tick on a window of nothing.
            interval_ms: u64::try_from(analysis.interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            failure_limit: analysis.failure_limit,
            inconclusive_limit: analysis.inconclusive_limit,
            next_ms: None,
            window_floor_ms: 0,
            consecutive_failures: 0,
            consecutive_inconclusive: 0,
            totals: [0; 3],
            last: None,
        }
    }

    /// Starts measuring a new traffic split set at `now_ms`: samples from before it no longer
    /// count, and the first window is due one interval later.
    pub fn measure_from(&mut self, now_ms: u64) {
        self.window_floor_ms = now_ms;
        self.next_ms = Some(now_ms.saturating_add(self.interval_ms));
    }

    /// Stops measuring (after promotion or abort).
    pub fn stop(&mut self) {
        self.next_ms = None;
    }

    /// Whether a window is due at `now_ms`.
    pub fn due(&self, now_ms: u64) -> bool {
        self.next_ms.is_some_and(|t| now_ms >= t)
    }

    /// Takes the measurement due at `now_ms` from `samples` (judging them if they are a usable
    /// window) and records it. Returns the verdict and what it means for the rollout.
    pub fn measure(&mut self, samples: Option<&Samples>, now_ms: u64) -> (Verdict, Outcome) {
        let usable = samples.filter(|s| s.from_ms >= self.window_floor_ms && s.to_ms > s.from_ms);
        let verdict = match (samples, usable) {
            (_, Some(s)) => judge(s, &self.rules),
            (None, _) => Verdict::Inconclusive {
                reason: "no samples reported for the window".to_owned(),
            },
            (Some(s), None) => Verdict::Inconclusive {
                reason: format!(
                    "no fresh samples: the window reported began at {} ms, \
                     before the {} ms this window must start after",
                    s.from_ms, self.window_floor_ms
                ),
            },
        };
        if let Some(s) = usable {
            self.window_floor_ms = s.to_ms;
        }
        self.next_ms = Some(now_ms.saturating_add(self.interval_ms));
        let outcome = self.record(verdict.clone(), usable.copied(), now_ms);
        (verdict, outcome)
    }

    /// Counts a verdict towards the limits.
    pub fn record(&mut self, verdict: Verdict, window: Option<Samples>, now_ms: u64) -> Outcome {
        let outcome = match &verdict {
            Verdict::Pass => {
                self.totals[0] += 1;
                self.consecutive_failures = 0;
                self.consecutive_inconclusive = 0;
                Outcome::Continue
            }
            Verdict::Fail { .. } => {
                self.totals[1] += 1;
                self.consecutive_failures += 1;
                self.consecutive_inconclusive = 0;
                if self.consecutive_failures > self.failure_limit {
                    Outcome::Abort {
                        reason: format!(
                            "analysis failed {} time{} in a row (failure_limit {}): {verdict}",
                            self.consecutive_failures,
                            plural(self.consecutive_failures),
                            self.failure_limit
                        ),
                    }
                } else {
                    Outcome::Continue
                }
            }
            Verdict::Inconclusive { .. } => {
                self.totals[2] += 1;
                self.consecutive_inconclusive += 1;
                if self.consecutive_inconclusive > self.inconclusive_limit {
                    Outcome::Pause {
                        reason: format!(
                            "analysis inconclusive {} time{} in a row (inconclusive_limit {}): \
                             {verdict}",
                            self.consecutive_inconclusive,
                            plural(self.consecutive_inconclusive),
                            self.inconclusive_limit
                        ),
                    }
                } else {
                    Outcome::Continue
                }
            }
        };
        self.last = Some(Measurement {
            at_ms: now_ms,
            window,
            verdict,
        });
        outcome
    }

    /// Whether the latest verdict is a pass taken at or after `since_ms`: the gate every
    /// promotion goes through when analysis is configured.
    pub fn passed_since(&self, since_ms: u64) -> bool {
        self.last
            .as_ref()
            .is_some_and(|m| m.verdict == Verdict::Pass && m.at_ms >= since_ms)
    }

    /// Forgets the inconclusive streak, when an operator resumes a paused rollout.
    pub fn resume(&mut self) {
        self.consecutive_inconclusive = 0;
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests;
