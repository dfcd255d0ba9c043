//! Canary and blue/green rollouts: the new release runs beside the stable one, which keeps its
//! full capacity, and traffic moves between them by weights that kiln's proxy splits exactly.
//!
//! Stages (see [`Stage`]):
//!
//! ```text
//! canary:     BringUp ─▶ Step 1 ─▶ … ─▶ Step n ─▶ ScaleUp ─▶ Warm ─▶ Succeeded
//! blue/green: BringUp ─▶ Preview ───────────────────────────▶ Warm ─▶ Succeeded
//!               │           │                        │          │
//!               └───────────┴──── abort ─────────────┴──────────┴─▶ Aborting ─▶ Failed
//! ```
//!
//! Rules:
//! - **Bring-up.** A canary launches `canary_instances` (default: as many as the service,
//!   at most that many), blue/green the full size, all at once beside the stable instances.
//!   The split is set to 100 % stable *before* any new instance is routed, so routing a ready
//!   instance gives it health checks and a place in the proxy but no requests.
//! - **Steps** (canary). Each step sets `{from: 100 − w, to: w}` and holds. It is passed when
//!   its pause is over (a step without a pause waits for [`Command::Promote`]) **and**, with
//!   `analysis`, the latest verdict is a pass taken during the step — after it began, so
//!   never the pass that ended the step before, though both carry the same time. After the
//!   last step `to` is scaled to full size at the last step's weight, then promoted.
//! - **Preview** (blue/green). The new release serves no requests but its preview (the proxy's
//!   concern); it is promoted on `auto_promote` or [`Command::Promote`], and with `analysis`
//!   only after a passing verdict.
//! - **Promotion** is one `SetWeights` to 100 % of `to`. `to` becomes stable and active;
//!   `from` stays warm (running, health-checked, routed at weight 0) for `scale_down_delay`,
//!   then its instances are retired and it is marked retired.
//! - **Analysis** runs every `interval` while traffic is split (or previewed); see
//!   [`AnalysisRun`] for the limits. More failures than `failure_limit` abort; more
//!   inconclusive windows than `inconclusive_limit` pause; an inconclusive window never
//!   promotes. An operator's promote approves a step or a switch but does not override the
//!   analysis: to ship without it, take it out of the config.
//! - **Abort** (analysis, a new instance that exits or never turns healthy, a bring-up past
//!   `progress_deadline`, or [`Command::Abort`]): **one** `SetWeights` back to 100 % stable —
//!   never a walk back through the steps — every `to` instance retired, `to` marked `Failed`
//!   (`RolledBack` when an operator aborted). The stable release never lost an instance, so
//!   this needs no launch and happens whatever `auto_rollback` says. During `Warm` an abort
//!   is an instant rollback: `from` is stable again.
//! - **Deadlines.** `progress_deadline` bounds each stage that waits for instances (bring-up,
//!   scale-up), counted from the stage's start; holding at a step or in preview is bounded by
//!   the step's pause, by analysis and by the operator, not by the deadline (a step that
//!   waits for a promote may wait a weekend).
//! - **One call goes as far as it can.** A stage whose gate is already open when it is
//!   entered (a step with a zero pause and no analysis, a preview promoted without analysis,
//!   a zero `scale_down_delay`) is passed in the same call, so that the same observation fed
//!   again decides nothing new (see the idempotency contract in [`super`]).
//! - **Pause** stops steps, promotion and deadlines (instances still come up, and analysis
//!   still runs: a failure still aborts); **resume** continues with the time spent paused
//!   added to the stage's timers, and forgets the inconclusive streak.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Action, InstanceHealth, Journal, Launching, Observed, Phase, count, fmt_ms, millis};
use crate::analysis::{AnalysisRun, Outcome, Samples, Verdict};
use crate::model::{CanaryStep, Strategy};
use crate::state::{ReleaseStatus, ServiceSpec};

/// The part of a [`Journal`] only canary and blue/green rollouts have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progressive {
    /// `Canary` or `BlueGreen`.
    pub strategy: Strategy,
    /// The release traffic returns to on abort (the journal's `from`).
    pub stable: u32,
    /// Canary steps; empty for blue/green.
    pub steps: Vec<CanaryStep>,
    /// How many `to` instances the bring-up launches.
    pub canary_instances: u32,
    /// Blue/green: promote without a command once ready (and analysis passed).
    pub auto_promote: bool,
    /// How long `from` stays warm after promotion.
    pub scale_down_delay_ms: u64,
    /// The analysis, when the service has one.
    pub analysis: Option<AnalysisRun>,
    /// Where the rollout stands.
    pub stage: Stage,
    /// Set while paused.
    pub paused: Option<Paused>,
    /// An operator promoted: the current step's pause (or blue/green's wait) is over.
    pub approved: bool,
    /// The `seq` of the last operator command taken.
    pub last_command: u64,
    /// The traffic split in force: percent per release, summing to 100. Empty until set.
    pub weights: BTreeMap<u32, u32>,
}

/// Where a canary or blue/green rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// The new instances are launched and routed at weight 0.
    BringUp {
        /// When the stage began (shifted by time spent paused).
        since_ms: u64,
    },
    /// Canary: holding at `steps[index]`.
    Step {
        /// The step, from 0.
        index: usize,
        /// When its weights were set (shifted by time spent paused).
        since_ms: u64,
    },
    /// Blue/green: the new release is up at full size and waits for promotion.
    Preview {
        /// When it became ready (shifted by time spent paused).
        since_ms: u64,
    },
    /// Canary after its last step: the new release is scaled to full size before it gets
    /// all requests.
    ScaleUp {
        /// When the stage began (shifted by time spent paused).
        since_ms: u64,
    },
    /// Promoted: the new release takes every request; the old one stays warm until then.
    Warm {
        /// When the old release's instances are retired.
        until_ms: u64,
    },
    /// Aborted: traffic is back on the stable release; waits until no launch of the new
    /// release is in flight, so that none is left running unseen.
    Aborting {
        /// Why.
        reason: String,
        /// What the new release is marked: `Failed` or `RolledBack`.
        status: ReleaseStatus,
    },
}

/// Why and since when a rollout is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    /// Why, in words.
    pub reason: String,
    /// Since when.
    pub since_ms: u64,
}

/// What an operator can ask of a running rollout (`kiln rollout promote | abort | pause |
/// resume`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Approve the current step or the blue/green switch (ends a pause early, resumes a
    /// paused rollout). Analysis must still pass.
    Promote,
    /// Return all traffic to the stable release now; the new release is marked rolled back.
    Abort,
    /// Hold where the rollout stands.
    Pause,
    /// Continue a paused rollout.
    Resume,
}

/// A command with the sequence number that makes it happen once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorCommand {
    /// Increases with every command given to the service (the engine's counter or the time
    /// it was received, in ms).
    pub seq: u64,
    /// The command.
    pub command: Command,
}

impl Progressive {
    pub(super) fn new(spec: &ServiceSpec, from: u32, now_ms: u64) -> Self {
        let r = &spec.rollout;
        let (steps, canary_instances) = match r.strategy {
            // Without steps (the config refuses that) a canary waits for a promote at 0 %,
            // rather than jumping to 100 % unseen.
            Strategy::Canary if r.steps.is_empty() => (
                vec![CanaryStep {
                    weight: 0,
                    pause: None,
                }],
                r.canary_instances,
            ),
            Strategy::Canary => (r.steps.clone(), r.canary_instances),
            Strategy::BlueGreen | Strategy::Rolling => (Vec::new(), None),
        };
        let canary_instances = canary_instances
            .unwrap_or(spec.instances)
            .clamp(1, spec.instances.max(1));
        Self {
            strategy: r.strategy,
            stable: from,
            steps,
            canary_instances,
            auto_promote: r.auto_promote,
            scale_down_delay_ms: millis(r.scale_down_delay),
            analysis: r.analysis.as_ref().map(AnalysisRun::new),
            stage: Stage::BringUp { since_ms: now_ms },
            paused: None,
            approved: false,
            last_command: 0,
            weights: BTreeMap::new(),
        }
    }

    /// The first line of the journal.
    pub(super) fn describe(&self, service: &str, from: u32, to: u32, target: u32) -> String {
        let analysis = match &self.analysis {
            Some(a) => format!("analysis every {}", fmt_ms(a.interval_ms)),
            None => "no analysis".to_owned(),
        };
        match self.strategy {
            Strategy::Canary => {
                let steps: Vec<String> = self
                    .steps
                    .iter()
                    .map(|s| match s.pause {
                        Some(p) => format!("{}% for {}", s.weight, fmt_ms(millis(p))),
                        None => format!("{}% until promoted", s.weight),
                    })
                    .collect();
                format!(
                    "canary {service} from v{from} to v{to}: {} v{to} instance{} beside v{from}; \
                     {}, then 100% on {target}; {analysis}",
                    self.canary_instances,
                    if self.canary_instances == 1 { "" } else { "s" },
                    steps.join(", ")
                )
            }
            Strategy::BlueGreen | Strategy::Rolling => {
                let promote = if self.auto_promote {
                    "promoted automatically"
                } else {
                    "promoted by `kiln rollout promote`"
                };
                format!(
                    "blue/green {service} from v{from} to v{to}: {target} v{to} instances beside \
                     v{from}, {promote}; {analysis}"
                )
            }
        }
    }
}

impl Journal {
    /// One step of a canary or blue/green rollout.
    pub(super) fn progress(
        &mut self,
        p: &mut Progressive,
        observed: &Observed,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        if let Some(cmd) = observed.command.filter(|c| c.seq > p.last_command) {
            p.last_command = cmd.seq;
            let aborting = matches!(p.stage, Stage::Aborting { .. });
            self.command(p, observed, cmd.command, now_ms, actions);
            if !aborting && matches!(p.stage, Stage::Aborting { .. }) {
                // The abort did all there is to do in this step.
                return;
            }
        }
        match p.stage.clone() {
            Stage::Aborting { reason, .. } => {
                return self.finish_abort(p, observed, reason, now_ms, actions);
            }
            Stage::Warm { until_ms } => {
                return self.warm(p, observed, until_ms, now_ms, actions);
            }
            _ => {}
        }

        // Failures of the new release, then the deadline of a stage that waits for instances.
        if let Some(why) = self.health_failure(observed, now_ms) {
            return self.abort(p, observed, why, ReleaseStatus::Failed, now_ms, actions);
        }
        if let Stage::BringUp { since_ms } | Stage::ScaleUp { since_ms } = p.stage
            && p.paused.is_none()
            && now_ms >= since_ms.saturating_add(self.progress_deadline_ms)
        {
            let why = format!(
                "v{} was not up within the progress deadline of {}",
                self.to,
                fmt_ms(self.progress_deadline_ms)
            );
            return self.abort(p, observed, why, ReleaseStatus::Failed, now_ms, actions);
        }

        // A due analysis window.
        if let Some(run) = p.analysis.as_mut()
            && run.due(now_ms)
        {
            let (verdict, outcome) = run.measure(observed.samples.as_ref(), now_ms);
            let window = run.last.as_ref().and_then(|m| m.window);
            self.note(
                now_ms,
                format!("analysis: {}", verdict_line(&verdict, window)),
            );
            match outcome {
                Outcome::Continue => {}
                Outcome::Abort { reason } => {
                    return self.abort(p, observed, reason, ReleaseStatus::Failed, now_ms, actions);
                }
                Outcome::Pause { reason } => {
                    if p.paused.is_none() {
                        self.note(now_ms, format!("paused: {reason}"));
                        p.paused = Some(Paused {
                            reason,
                            since_ms: now_ms,
                        });
                    }
                }
            }
        }

        // Go as far as this observation allows: a stage whose gate is already open when it is
        // entered (a step whose pause is zero, a preview promoted without analysis, a warm
        // period of zero) is passed in the same call. Otherwise the next call would pass it
        // even on the same observation, and decide then what this one should have (the
        // scale-up's launches after the last step): the same observation twice must decide
        // nothing new. Stages only move forward, so this ends.
        loop {
            let before = p.stage.clone();
            self.advance(p, observed, now_ms, actions);
            if p.stage == before {
                return;
            }
            if let Stage::Warm { until_ms } = p.stage {
                return self.warm(p, observed, until_ms, now_ms, actions);
            }
        }
    }

    /// Takes the current stage one move forward, if its gate is open.
    fn advance(
        &mut self,
        p: &mut Progressive,
        observed: &Observed,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        match p.stage.clone() {
            Stage::BringUp { .. } => {
                let want = match p.strategy {
                    Strategy::Canary => p.canary_instances,
                    Strategy::BlueGreen | Strategy::Rolling => self.target,
                };
                if p.weights.is_empty() {
                    // Before any new instance is routed, so that routing gives it no requests.
                    self.set_weights(p, 0, now_ms, actions);
                }
                let up = self.bring_up(observed, want, now_ms, actions);
                if up && p.paused.is_none() {
                    match p.strategy {
                        Strategy::Canary => self.enter_step(p, 0, now_ms, actions),
                        Strategy::BlueGreen | Strategy::Rolling => {
                            p.stage = Stage::Preview { since_ms: now_ms };
                            if let Some(run) = p.analysis.as_mut() {
                                run.measure_from(now_ms);
                            }
                            let how = match (&p.analysis, p.auto_promote) {
                                (Some(_), true) => "promoted once analysis passes",
                                (Some(_), false) => {
                                    "waiting for `kiln rollout promote` and a passing analysis"
                                }
                                (None, true) => "promoting",
                                (None, false) => "waiting for `kiln rollout promote`",
                            };
                            let n = self.target;
                            self.note(now_ms, format!("{n} v{} instances ready; {how}", self.to));
                        }
                    }
                }
            }
            Stage::Step { index, since_ms } => {
                if p.paused.is_none() && self.step_passed(p, index, since_ms, now_ms) {
                    if index + 1 < p.steps.len() {
                        self.enter_step(p, index + 1, now_ms, actions);
                    } else {
                        p.stage = Stage::ScaleUp { since_ms: now_ms };
                        p.approved = false;
                        if let Some(run) = p.analysis.as_mut() {
                            run.stop();
                        }
                        let msg = format!(
                            "step {} of {} passed; scaling v{} to {} instances",
                            index + 1,
                            p.steps.len(),
                            self.to,
                            self.target
                        );
                        self.note(now_ms, msg);
                    }
                }
            }
            Stage::Preview { since_ms } => {
                let asked = p.approved || p.auto_promote;
                if p.paused.is_none() && asked && passed_during(p, since_ms) {
                    self.promote(p, now_ms, actions);
                }
            }
            Stage::ScaleUp { .. } => {
                if self.bring_up(observed, self.target, now_ms, actions) && p.paused.is_none() {
                    self.promote(p, now_ms, actions);
                }
            }
            Stage::Warm { .. } | Stage::Aborting { .. } => {}
        }
    }

    /// Takes one operator command.
    fn command(
        &mut self,
        p: &mut Progressive,
        observed: &Observed,
        command: Command,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let what = format!("{command:?}").to_lowercase();
        let too_late = match p.stage {
            Stage::Aborting { .. } => Some("the rollout is aborting".to_owned()),
            Stage::Warm { .. } if command != Command::Abort => {
                Some(format!("v{} is already promoted", self.to))
            }
            _ => None,
        };
        if let Some(why) = too_late {
            self.note(now_ms, format!("{what} ignored: {why}"));
            return;
        }
        match command {
            Command::Abort => {
                let why = "aborted by an operator".to_owned();
                self.abort(p, observed, why, ReleaseStatus::RolledBack, now_ms, actions);
            }
            Command::Pause => {
                if p.paused.is_none() {
                    self.note(now_ms, "paused by an operator".to_owned());
                    p.paused = Some(Paused {
                        reason: "paused by an operator".to_owned(),
                        since_ms: now_ms,
                    });
                }
            }
            Command::Resume => self.resume_from_pause(p, "resumed by an operator", now_ms),
            Command::Promote => {
                self.resume_from_pause(p, "resumed by a promote", now_ms);
                p.approved = true;
                let gate = if p.analysis.is_some() {
                    " (once analysis passes)"
                } else {
                    ""
                };
                self.note(now_ms, format!("promote requested{gate}"));
            }
        }
    }

    /// Ends a pause: the stage's timers move on by the time spent paused, and the analysis
    /// forgets its inconclusive streak.
    fn resume_from_pause(&mut self, p: &mut Progressive, why: &str, now_ms: u64) {
        let Some(paused) = p.paused.take() else {
            return;
        };
        let held = now_ms.saturating_sub(paused.since_ms);
        match &mut p.stage {
            Stage::BringUp { since_ms }
            | Stage::Step { since_ms, .. }
            | Stage::Preview { since_ms }
            | Stage::ScaleUp { since_ms } => *since_ms = since_ms.saturating_add(held),
            Stage::Warm { .. } | Stage::Aborting { .. } => {}
        }
        if let Some(run) = p.analysis.as_mut() {
            run.resume();
        }
        self.note(now_ms, format!("{why} after {}", fmt_ms(held)));
    }

    /// Whether the canary may leave `steps[index]`: its pause is over (or it was promoted) and,
    /// with analysis, the latest verdict is a pass taken during the step.
    fn step_passed(&self, p: &Progressive, index: usize, since_ms: u64, now_ms: u64) -> bool {
        let timer = p.steps.get(index).and_then(|s| s.pause).map(millis);
        let held = timer.is_some_and(|t| now_ms >= since_ms.saturating_add(t)) || p.approved;
        held && passed_during(p, since_ms)
    }

    fn enter_step(
        &mut self,
        p: &mut Progressive,
        index: usize,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let Some(step) = p.steps.get(index).cloned() else {
            return;
        };
        p.stage = Stage::Step {
            index,
            since_ms: now_ms,
        };
        p.approved = false;
        let weight = u32::from(step.weight).min(100);
        self.set_weights(p, weight, now_ms, actions);
        if let Some(run) = p.analysis.as_mut() {
            run.measure_from(now_ms);
        }
        let hold = match step.pause {
            Some(d) => format!("hold for {}", fmt_ms(millis(d))),
            None => "hold until promoted".to_owned(),
        };
        let gate = if p.analysis.is_some() {
            " and analysis passes"
        } else {
            ""
        };
        let msg = format!(
            "step {} of {}: {weight}% of requests to v{}; {hold}{gate}",
            index + 1,
            p.steps.len(),
            self.to
        );
        self.note(now_ms, msg);
    }

    /// Sets the split to `weight` % for `to` and the rest for the stable release.
    fn set_weights(
        &mut self,
        p: &mut Progressive,
        weight: u32,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let weight = weight.min(100);
        let weights = BTreeMap::from([(p.stable, 100 - weight), (self.to, weight)]);
        p.weights.clone_from(&weights);
        actions.push(Action::SetWeights { weights });
        let msg = format!(
            "traffic: v{} {}%, v{} {weight}%",
            p.stable,
            100 - weight,
            self.to
        );
        self.note(now_ms, msg);
    }

    /// The switch: every request to `to` in one `SetWeights`; `from` stays warm.
    fn promote(&mut self, p: &mut Progressive, now_ms: u64, actions: &mut Vec<Action>) {
        self.set_weights(p, 100, now_ms, actions);
        actions.push(Action::SetStable { release: self.to });
        actions.push(Action::MarkRelease {
            release: self.to,
            status: ReleaseStatus::Active,
        });
        actions.push(Action::MarkRelease {
            release: p.stable,
            status: ReleaseStatus::Warm,
        });
        if let Some(run) = p.analysis.as_mut() {
            run.stop();
        }
        p.approved = false;
        let until_ms = now_ms.saturating_add(p.scale_down_delay_ms);
        p.stage = Stage::Warm { until_ms };
        let msg = format!(
            "promoted: v{} takes every request; v{} stays warm for {}",
            self.to,
            p.stable,
            fmt_ms(p.scale_down_delay_ms)
        );
        self.note(now_ms, msg);
    }

    /// After promotion: keep `to` at full size (it is stable now) until the warm period is
    /// over, then retire everything else.
    fn warm(
        &mut self,
        p: &Progressive,
        observed: &Observed,
        until_ms: u64,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        self.bring_up(observed, self.target, now_ms, actions);
        if now_ms < until_ms {
            return;
        }
        let to = self.to;
        for i in &observed.instances {
            if i.release != to && !self.ledger.is_retiring(i) {
                let why = format!("v{} no longer needed warm", i.release);
                self.retire(i, &why, now_ms, actions);
            }
        }
        actions.push(Action::MarkRelease {
            release: p.stable,
            status: ReleaseStatus::Retired,
        });
        self.phase = Phase::Succeeded;
        let msg = format!("succeeded: v{to} serves; v{} retired", p.stable);
        self.note(now_ms, msg);
    }

    /// Aborts: one switch back to the stable release, every new instance retired.
    fn abort(
        &mut self,
        p: &mut Progressive,
        observed: &Observed,
        reason: String,
        status: ReleaseStatus,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let was_promoted = matches!(p.stage, Stage::Warm { .. });
        self.note(now_ms, format!("aborting: {reason}"));
        self.set_weights(p, 0, now_ms, actions);
        if was_promoted {
            actions.push(Action::SetStable { release: p.stable });
            actions.push(Action::MarkRelease {
                release: p.stable,
                status: ReleaseStatus::Active,
            });
        }
        actions.push(Action::MarkRelease {
            release: self.to,
            status,
        });
        if let Some(run) = p.analysis.as_mut() {
            run.stop();
        }
        p.paused = None;
        p.approved = false;
        p.stage = Stage::Aborting {
            reason: reason.clone(),
            status,
        };
        self.finish_abort(p, observed, reason, now_ms, actions);
    }

    /// Retires every instance of `to` (including ones whose launch shows up only now) and ends
    /// the rollout once no launch of `to` is in flight.
    fn finish_abort(
        &mut self,
        p: &Progressive,
        observed: &Observed,
        reason: String,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let to = self.to;
        for i in &observed.instances {
            if i.release == to && !self.ledger.is_retiring(i) {
                self.retire(i, &format!("v{to} aborted"), now_ms, actions);
            }
        }
        // A launch that never appears within the healthy deadline is not waited for longer.
        let deadline = self.healthy_deadline_ms;
        self.ledger
            .launching
            .retain(|l| l.release != to || now_ms < l.at_ms.saturating_add(deadline));
        if self.ledger.in_flight(to) == 0 {
            let msg = format!("failed: {reason}; every request goes to v{}", p.stable);
            self.note(now_ms, msg);
            self.phase = Phase::Failed {
                reason,
                reverted: true,
            };
        }
    }

    /// Keeps `want` instances of `to` live beside everything else, all launched at once:
    /// routes the ready ones, replaces exited ones (before promotion an exit aborts first).
    /// Returns whether `want` of them serve.
    fn bring_up(
        &mut self,
        observed: &Observed,
        want: u32,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> bool {
        let to = self.to;
        let mine: Vec<_> = observed
            .instances
            .iter()
            .filter(|i| i.release == to && !self.ledger.is_retiring(i))
            .collect();
        let mut alive = self.ledger.in_flight(to);
        for i in mine {
            if i.health == InstanceHealth::Exited {
                self.retire(
                    i,
                    &format!("v{to} instance exited; replacing it"),
                    now_ms,
                    actions,
                );
                continue;
            }
            alive += 1;
            if self.ready(i, now_ms) && !i.routable && !self.ledger.routing.contains(&i.id) {
                self.ledger.routing.insert(i.id.clone());
                actions.push(Action::Route { id: i.id.clone() });
                let held = fmt_ms(self.min_healthy_time_ms);
                self.note(now_ms, format!("route {}: healthy for {held}", i.id));
            }
        }
        while alive < want {
            alive += 1;
            self.ledger.launching.push(Launching {
                release: to,
                at_ms: now_ms,
            });
            actions.push(Action::Launch { release: to });
            self.note(
                now_ms,
                format!("launch a v{to} instance ({alive} of {want})"),
            );
        }
        let serving = observed
            .instances
            .iter()
            .filter(|i| i.release == to && self.serving(i, to, now_ms))
            .count();
        count(serving) >= want
    }
}

/// Whether the analysis gate of a stage that began at `since_ms` is open: no analysis, or the
/// latest verdict is a pass taken *during* the stage.
///
/// A verdict taken at `since_ms` itself is not: [`Journal::progress`] judges a due window
/// before it moves between stages, so a verdict with the stage's own timestamp was taken by
/// the stage before (typically the very pass that ended it) and judged the previous split.
/// Counting it would let a canary step pass on its predecessor's verdict, on the next call
/// or even on the same observation fed again.
fn passed_during(p: &Progressive, since_ms: u64) -> bool {
    p.analysis
        .as_ref()
        .is_none_or(|a| a.passed_since(since_ms.saturating_add(1)))
}

/// A verdict with the window it judged, for the journal.
fn verdict_line(verdict: &Verdict, window: Option<Samples>) -> String {
    let Some(w) = window else {
        return verdict.to_string();
    };
    let c = &w.canary;
    let mut facts = vec![format!("{} requests, {} errors", c.requests, c.errors)];
    if let Some(p99) = c.p99_us {
        facts.push(format!("p99 {}", crate::analysis::latency(p99)));
    }
    if let Some(s) = &w.stable {
        facts.push(format!(
            "stable {} requests, {} errors",
            s.requests, s.errors
        ));
    }
    format!("{verdict} ({})", facts.join(", "))
}
