//! The rollout schedule shown in a plan: batches, surge, an expected duration and what a
//! rollback would look like, so a reviewer knows the cost and the risk before applying.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{CanaryStep, Strategy};
use crate::state::ServiceSpec;

/// How a new release of a service is planned to roll out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The service's strategy.
    pub strategy: Strategy,
    /// The stable release being replaced; `None` for a new service.
    pub from_release: Option<u32>,
    /// The new release.
    pub to_release: u32,
    /// Instances of the new release at the end.
    pub instances: u32,
    /// Instances started per batch, in order (`max_parallel` each, the last may be smaller).
    pub batches: Vec<u32>,
    /// The most instances that run on top of `instances` at any moment (extra capacity needed).
    pub surge: u32,
    /// A rough estimate of how long the rollout takes; see [`schedule`] for the formula.
    #[serde(with = "humantime_serde")]
    pub expected_duration: Duration,
    /// Whether the rollout waits for `kiln rollout promote` (not counted in the estimate).
    pub waits_for_promotion: bool,
    /// Canary steps (weights and pauses); empty for other strategies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<CanaryStep>,
    /// One sentence: what happens if the new release does not turn healthy.
    pub rollback: String,
}

/// The schedule of rolling `spec` out as release `to`, replacing `from`.
///
/// The estimate assumes an instance turns healthy after `healthy_threshold` passing checks one
/// `interval` apart, then must stay healthy for `min_healthy_time` before it counts, and that
/// batches run one after the other:
///
/// `batches × (interval × healthy_threshold + min_healthy_time)`
///
/// plus, for a canary, the sum of its timed pauses. Boot time, draining and manual pauses are
/// not in it, so it is a lower bound for a healthy release, not a promise.
pub fn schedule(spec: &ServiceSpec, from: Option<u32>, to: u32) -> Schedule {
    let r = &spec.rollout;
    let instances = match r.strategy {
        Strategy::Canary => r.canary_instances.unwrap_or(spec.instances),
        Strategy::Rolling | Strategy::BlueGreen => spec.instances,
    };
    let parallel = r.max_parallel.max(1);
    let mut batches = vec![parallel; (instances / parallel) as usize];
    if instances % parallel != 0 {
        batches.push(instances % parallel);
    }
    let to_healthy = spec
        .health
        .as_ref()
        .map_or(Duration::ZERO, |h| h.interval * h.healthy_threshold);
    let per_batch = to_healthy + r.min_healthy_time;
    let bring_up = per_batch * u32::try_from(batches.len()).unwrap_or(u32::MAX);
    // Rolling keeps the old instances until their replacements count, `max_parallel` at a
    // time; blue/green and canary run the new instances next to all the old ones. A new
    // service replaces nothing, so it needs no extra capacity.
    let surge = match (from, r.strategy) {
        (None, _) => 0,
        (Some(_), Strategy::Rolling) => parallel.min(instances),
        (Some(_), Strategy::BlueGreen | Strategy::Canary) => instances,
    };
    let (steps, pauses, waits_for_promotion) = match r.strategy {
        Strategy::Canary => {
            let pauses = r.steps.iter().filter_map(|s| s.pause).sum::<Duration>();
            let manual = r.steps.iter().any(|s| s.pause.is_none());
            (r.steps.clone(), pauses, manual)
        }
        Strategy::BlueGreen => (Vec::new(), Duration::ZERO, !r.auto_promote),
        Strategy::Rolling => (Vec::new(), Duration::ZERO, false),
    };
    Schedule {
        strategy: r.strategy,
        from_release: from,
        to_release: to,
        instances,
        batches,
        surge,
        expected_duration: bring_up + pauses,
        waits_for_promotion,
        steps,
        rollback: rollback_sentence(spec, from, to),
    }
}

fn rollback_sentence(spec: &ServiceSpec, from: Option<u32>, to: u32) -> String {
    let r = &spec.rollout;
    let when = format!(
        "if v{to} does not turn healthy within {} or the rollout takes over {}",
        humantime::format_duration(r.healthy_deadline),
        humantime::format_duration(r.progress_deadline),
    );
    match from {
        Some(from) if r.auto_rollback => format!(
            "{when}, v{to} is stopped and v{from} is restored to {} instances (auto_rollback)",
            spec.instances
        ),
        Some(from) => format!(
            "{when}, the rollout stops and what serves keeps serving; \
             `kiln rollback {}` returns to v{from} (auto_rollback is off)",
            spec.name
        ),
        None => format!("{when}, the rollout fails; there is no earlier release to return to"),
    }
}
