//! The rollout schedule shown in a plan: batches, surge, an expected duration and what a
//! rollback would look like, so a reviewer knows the cost and the risk before applying.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Analysis, CanaryStep, Strategy};
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
    /// Instances started per batch, in order: `max_parallel` each (the last may be smaller)
    /// for a rolling update; all at once for blue/green; for a canary its `canary_instances`,
    /// then the rest at promotion.
    pub batches: Vec<u32>,
    /// The most instances that run on top of the service's `instances` at any moment (extra
    /// capacity needed). Canary and blue/green keep every stable instance until promotion, so
    /// for them it is the new release's full size.
    pub surge: u32,
    /// A rough estimate of how long the rollout takes; see [`schedule`] for the formula.
    #[serde(with = "humantime_serde")]
    pub expected_duration: Duration,
    /// Whether the rollout waits for `kiln rollout promote` (not counted in the estimate).
    pub waits_for_promotion: bool,
    /// Canary steps (weights and pauses); empty for other strategies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<CanaryStep>,
    /// The analysis that gates every step and the blue/green switch (canary and blue/green).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
    /// How long the old release stays warm after promotion (canary and blue/green); not in
    /// `expected_duration`.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub warm_for: Option<Duration>,
    /// One sentence: what happens if the new release fails.
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
/// plus, for a canary, each step's hold: its pause, or with analysis at least one `interval`
/// (a step is passed only on a passing verdict, and the first comes one interval after the
/// weights are set); for blue/green with analysis, one `interval` before the switch. Boot
/// time, draining, manual pauses and the warm period are not in it, so it is a lower bound
/// for a healthy release, not a promise.
///
/// A first deploy (`from` is `None`) has no stable release to protect and rolls out like a
/// rolling update whatever the strategy (see [`crate::rollout`]).
pub fn schedule(spec: &ServiceSpec, from: Option<u32>, to: u32) -> Schedule {
    if from.is_some() && spec.instances > 0 && spec.rollout.strategy != Strategy::Rolling {
        return progressive(spec, from, to);
    }
    let r = &spec.rollout;
    let instances = spec.instances;
    let parallel = r.max_parallel.max(1);
    let mut batches = vec![parallel; (instances / parallel) as usize];
    if !instances.is_multiple_of(parallel) {
        batches.push(instances % parallel);
    }
    let per_batch = per_batch(spec);
    let bring_up = per_batch * u32::try_from(batches.len()).unwrap_or(u32::MAX);
    // Rolling keeps the old instances until their replacements count, `max_parallel` at a
    // time. A new service replaces nothing, so it needs no extra capacity.
    let surge = match from {
        None => 0,
        Some(_) => parallel.min(instances),
    };
    Schedule {
        strategy: r.strategy,
        from_release: from,
        to_release: to,
        instances,
        batches,
        surge,
        expected_duration: bring_up,
        waits_for_promotion: false,
        steps: Vec::new(),
        analysis: None,
        warm_for: None,
        rollback: rollback_sentence(spec, from, to),
    }
}

/// Canary and blue/green: the new release comes up all at once beside the stable one (a
/// canary with `canary_instances` first, the rest at promotion), so every bring-up is one
/// batch.
fn progressive(spec: &ServiceSpec, from: Option<u32>, to: u32) -> Schedule {
    let r = &spec.rollout;
    let instances = spec.instances;
    let interval = r.analysis.as_ref().map(|a| a.interval);
    let (batches, steps, holds, waits_for_promotion) = match r.strategy {
        Strategy::Canary => {
            // As the rollout does: without steps a canary waits at 0 % for a promote.
            let steps = if r.steps.is_empty() {
                vec![CanaryStep {
                    weight: 0,
                    pause: None,
                }]
            } else {
                r.steps.clone()
            };
            let canary = r.canary_instances.unwrap_or(instances).clamp(1, instances);
            let batches: Vec<u32> = [canary, instances - canary]
                .into_iter()
                .filter(|n| *n > 0)
                .collect();
            let holds = steps
                .iter()
                .map(|s| {
                    let pause = s.pause.unwrap_or_default();
                    interval.map_or(pause, |i| pause.max(i))
                })
                .sum::<Duration>();
            let manual = steps.iter().any(|s| s.pause.is_none());
            (batches, steps, holds, manual)
        }
        Strategy::BlueGreen | Strategy::Rolling => (
            vec![instances],
            Vec::new(),
            interval.unwrap_or_default(),
            !r.auto_promote,
        ),
    };
    let bring_up = per_batch(spec) * u32::try_from(batches.len()).unwrap_or(u32::MAX);
    Schedule {
        strategy: r.strategy,
        from_release: from,
        to_release: to,
        instances,
        batches,
        surge: instances,
        expected_duration: bring_up + holds,
        waits_for_promotion,
        steps,
        analysis: r.analysis.clone(),
        warm_for: Some(r.scale_down_delay),
        rollback: progressive_rollback(spec, from, to),
    }
}

/// How long one batch takes to count: checks to turn healthy, then `min_healthy_time`.
fn per_batch(spec: &ServiceSpec) -> Duration {
    let to_healthy = spec
        .health
        .as_ref()
        .map_or(Duration::ZERO, |h| h.interval * h.healthy_threshold);
    to_healthy + spec.rollout.min_healthy_time
}

/// What a canary or blue/green abort does: one switch of every request back to the stable
/// release, which kept all its instances, whatever `auto_rollback` says.
fn progressive_rollback(spec: &ServiceSpec, from: Option<u32>, to: u32) -> String {
    let r = &spec.rollout;
    let from = from.unwrap_or_default();
    let mut causes = Vec::new();
    if let Some(a) = &r.analysis {
        let times = a.failure_limit + 1;
        let plural = if times == 1 { "" } else { "s" };
        causes.push(format!("analysis fails {times} time{plural} in a row"));
    }
    causes.push(format!(
        "a v{to} instance exits or is not healthy within {}",
        humantime::format_duration(r.healthy_deadline)
    ));
    causes.push(format!(
        "v{to} is not up within {}",
        humantime::format_duration(r.progress_deadline)
    ));
    format!(
        "if {}, or on `kiln rollout abort`, every request returns to v{from} in one switch (v{from} keeps its {} \
         instances until promotion) and v{to} is stopped; during the {} warm period after \
         promotion `kiln rollout abort` switches back to v{from} the same way",
        causes.join(", or "),
        spec.instances,
        humantime::format_duration(r.scale_down_delay)
    )
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
