//! The rolling update, canary and blue/green rollouts as pure state machines, and
//! self-healing of a service at rest. Canary and blue/green live in `progressive.rs`; their
//! rules are documented there and on [`Progressive`].
//!
//! The engine owns time, instances and the proxy; this module only decides. A rollout is a
//! [`Journal`] made by [`start`] and advanced by [`step`] with each new [`Observed`] snapshot:
//!
//! ```text
//! loop {
//!     let observed = driver + proxy + health checks;      // engine
//!     let (journal, actions) = rollout::step(&journal, &observed, now_ms);
//!     persist(journal);                                   // engine, before acting
//!     perform(actions);                                   // engine
//! }
//! ```
//!
//! Contract with the engine:
//! - Persist the returned journal (in `ServiceState.rollout`) *before* performing the actions,
//!   so that a crashed server resumes the rollout, or reverts it, instead of forgetting it.
//!   After a restart call [`resume`] once: it forgets actions that may not have been carried
//!   out, and the next observation shows which were.
//! - `Launch` starts one instance of the release; it must appear in the next observation (as
//!   `Starting`, with its `started_ms`). `Route` adds an instance to the proxy and `Retire`
//!   takes it out, drains and stops it; both must be idempotent (they may be issued again
//!   after a restart) and show in the observation as `routable` / `retiring`.
//! - An instance without a health check is reported `Healthy` from the moment it started.
//! - Canary and blue/green: `SetWeights` sets the share of requests per release; while a
//!   journal has [`Journal::weights`], the proxy's pools take exactly those weights (a release
//!   not named gets none), otherwise pools are weighed by routed instances. With `analysis`,
//!   the engine reports the RED counts since [`Journal::samples_since`] in
//!   [`Observed::samples`]; operator commands come in [`Observed::command`] with a growing
//!   `seq`, and may be delivered until [`Progressive::last_command`] shows them taken.
//!
//! Rules of the rolling update (create before destroy; Nomad's `update` block):
//! - An instance is *ready* once it has been `Healthy` for `min_healthy_time`. Only ready
//!   instances of the new release are routed.
//! - Old instances are retired, oldest first, only while the routed healthy instances stay at
//!   or above the *floor*: `min(target, instances routed, healthy and not retiring at the
//!   first step)`. Counting
//!   what served at the start rather than `target` keeps a service that was already short of
//!   instances from being stuck: the rollout must not wait for capacity it never had. Only
//!   observed routes count, so an old instance leaves only after the proxy shows that its
//!   replacement takes traffic.
//!   Old instances that serve nobody (starting, unhealthy, exited, unrouted) go at once, and
//!   old instances beyond the floor go without waiting for a replacement (a rollout that also
//!   scales down).
//! - New instances are launched while fewer than `max_parallel` of them are unready or unrouted
//!   and fewer than `target` are live. Counting unrouted ones too makes the surge exact: after
//!   every step at most `target` instances of `to` and at most `target + max_parallel`
//!   instances in all are live (not retiring), as long as no routed instance turns unhealthy
//!   (one that does counts as unready again and frees a launch slot).
//! - A new instance that exits, one not healthy within `healthy_deadline` of its start, a
//!   launch that never appears within `healthy_deadline`, or the rollout running past
//!   `progress_deadline` fails it; with `auto_revert` and a previous release the rollout then
//!   runs the same rules backwards (see [`Phase::Reverting`]). Without, `to` is marked failed,
//!   its instances that serve nobody are retired, and what serves keeps serving.
//! - Success: `target` instances of `to` serve and every other instance is retiring; the
//!   engine finishes draining those after the journal is done.

mod heal;
mod ledger;
mod progressive;
#[cfg(test)]
mod progressive_sim;
#[cfg(test)]
mod progressive_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use heal::{
    BACKOFF_CAP_MS, BACKOFF_FIRST_MS, Backoff, DEFAULT_UNHEALTHY_GRACE_MS, HealSettings,
    STABLE_PERIOD_MS, heal,
};
pub use ledger::{Launching, Ledger};
pub use progressive::{Command, OperatorCommand, Paused, Progressive, Stage};

use crate::analysis::Samples;
use crate::state::{ReleaseStatus, ServiceSpec};

/// The durable record of one rollout: its settings, where it stands, every decision taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// The deployment (apply) that started it.
    pub deployment_id: String,
    /// The service rolled out.
    pub service: String,
    /// The stable release being replaced; `None` for a first deploy.
    pub from: Option<u32>,
    /// The release rolled out.
    pub to: u32,
    /// Instances wanted.
    pub target: u32,
    /// New instances starting at once (at least 1).
    pub max_parallel: u32,
    /// How long an instance must be healthy before it is ready.
    pub min_healthy_time_ms: u64,
    /// How long a new instance has, from its start, to turn healthy.
    pub healthy_deadline_ms: u64,
    /// How long the rollout (and, separately, a revert) may take.
    pub progress_deadline_ms: u64,
    /// Whether a failed rollout returns to `from` by itself.
    pub auto_revert: bool,
    /// When the rollout started.
    pub started_ms: u64,
    /// Where it stands.
    pub phase: Phase,
    /// Every decision, in order.
    pub log: Vec<Entry>,
    /// The capacity floor: `min(target, instances serving at the first step)`; `None` until
    /// the first step has seen an observation.
    #[serde(default)]
    pub floor: Option<u32>,
    /// Actions issued and not yet observed done.
    #[serde(default)]
    pub ledger: Ledger,
    /// The state of a canary or blue/green rollout; `None` for a rolling update (and for the
    /// first deploy of any strategy: with nothing to protect it rolls out like a rolling
    /// update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progressive: Option<Progressive>,
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Phase {
    /// Replacing `from` with `to`.
    Rolling,
    /// The rollout failed and `to` is being replaced by `from` under the same rules. The
    /// revert gets its own `progress_deadline`, counted from `since_ms`; past it the rollout
    /// ends `Failed { reverted: false }` with whatever serves.
    Reverting {
        /// Why the rollout failed.
        reason: String,
        /// When the revert began.
        since_ms: u64,
    },
    /// `to` is stable.
    Succeeded,
    /// The rollout is over without `to` becoming stable.
    Failed {
        /// Why.
        reason: String,
        /// Whether `from` was restored to `target` instances.
        reverted: bool,
    },
}

impl Phase {
    /// Whether the rollout is over.
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed { .. })
    }
}

/// One decision in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When it was taken.
    pub at_ms: u64,
    /// What and why, in words.
    pub message: String,
}

/// What runs, as the engine sees it at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Every instance of the service kiln knows of, of any release, until it is seen stopped.
    pub instances: Vec<ObservedInstance>,
    /// The latest measurement window of the new release and the stable one, for a rollout with
    /// `analysis` (ignored otherwise). It should count requests since
    /// [`Journal::samples_since`]; a window that begins earlier, or none at all when a
    /// measurement is due, counts as inconclusive.
    #[serde(default)]
    pub samples: Option<Samples>,
    /// The latest operator command for this service's rollout. The engine may deliver the
    /// same command on every tick: one whose `seq` is not above [`Progressive::last_command`]
    /// was already taken and is ignored.
    #[serde(default)]
    pub command: Option<OperatorCommand>,
}

/// One instance as observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedInstance {
    /// Its id.
    pub id: String,
    /// The release it runs.
    pub release: u32,
    /// When it was started.
    pub started_ms: u64,
    /// Its health.
    pub health: InstanceHealth,
    /// Whether the proxy sends it traffic.
    pub routable: bool,
    /// Whether it is being retired (unrouted, draining or stopping).
    pub retiring: bool,
    /// It drifted and must be replaced: a replacement is launched first, and it is retired
    /// once routed capacity allows (see [`heal`]).
    pub condemned: bool,
}

/// An instance's health as its checks report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum InstanceHealth {
    /// Running, not yet `healthy_threshold` passing checks.
    Starting,
    /// Passing checks since `since_ms`.
    Healthy {
        /// When it turned healthy.
        since_ms: u64,
    },
    /// Failing checks since `since_ms`.
    Unhealthy {
        /// When it turned unhealthy.
        since_ms: u64,
    },
    /// The process is gone.
    Exited,
}

/// What the engine is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Start one new instance of the release.
    Launch {
        /// The release.
        release: u32,
    },
    /// Send the instance traffic.
    Route {
        /// The instance.
        id: String,
    },
    /// Stop routing to the instance, drain it, stop it.
    Retire {
        /// The instance.
        id: String,
    },
    /// Record the release as the service's stable one.
    SetStable {
        /// The release.
        release: u32,
    },
    /// Record a release's status.
    MarkRelease {
        /// The release.
        release: u32,
        /// Its new status.
        status: ReleaseStatus,
    },
    /// Split the service's requests between releases by these shares (they sum to 100; a
    /// release not named gets none). The split is also kept in the journal
    /// ([`Journal::weights`]), so it survives a restart; once the rollout is over the proxy
    /// goes back to weighing releases by their routed instances.
    SetWeights {
        /// Percent of requests per release number.
        weights: BTreeMap<u32, u32>,
    },
}

/// A new rollout of `spec` from release `from` to `to`, started at `now_ms`.
pub fn start(
    deployment_id: &str,
    service: &str,
    from: Option<u32>,
    to: u32,
    spec: &ServiceSpec,
    now_ms: u64,
) -> Journal {
    let r = &spec.rollout;
    let max_parallel = r.max_parallel.max(1);
    let what = match from {
        Some(from) => format!("roll {service} from v{from} to v{to}"),
        None => format!("roll out {service} v{to}"),
    };
    use crate::model::Strategy::{BlueGreen, Canary};
    let progressive = match (r.strategy, from) {
        (Canary | BlueGreen, Some(from)) if spec.instances > 0 => {
            Some(Progressive::new(spec, from, now_ms))
        }
        _ => None,
    };
    let first = match &progressive {
        Some(p) => p.describe(service, from.unwrap_or_default(), to, spec.instances),
        None => format!(
            "{what}: {} instances, {max_parallel} at a time",
            spec.instances
        ),
    };
    Journal {
        deployment_id: deployment_id.to_owned(),
        service: service.to_owned(),
        from,
        to,
        target: spec.instances,
        max_parallel,
        min_healthy_time_ms: millis(r.min_healthy_time),
        healthy_deadline_ms: millis(r.healthy_deadline),
        progress_deadline_ms: millis(r.progress_deadline),
        auto_revert: r.auto_rollback,
        started_ms: now_ms,
        phase: Phase::Rolling,
        log: vec![Entry {
            at_ms: now_ms,
            message: first,
        }],
        floor: None,
        ledger: Ledger::default(),
        progressive,
    }
}

/// The journal to continue with after the engine restarted: actions issued before the crash
/// may or may not have been carried out, so they are forgotten and decided again from the next
/// observation. Time does not stop for a crash: the deadlines still count from the start.
pub fn resume(journal: &Journal, now_ms: u64) -> Journal {
    let mut j = journal.clone();
    if !j.phase.is_done() {
        j.ledger.forget();
        j.note(now_ms, "resumed after a restart".to_owned());
    }
    j
}

/// Advances the rollout by one observation: the next journal and what to do now.
pub fn step(journal: &Journal, observed: &Observed, now_ms: u64) -> (Journal, Vec<Action>) {
    let mut j = journal.clone();
    let mut actions = Vec::new();
    if j.phase.is_done() {
        return (j, actions);
    }
    j.ledger.observe(observed);
    if let Some(mut p) = j.progressive.take() {
        j.progress(&mut p, observed, now_ms, &mut actions);
        j.progressive = Some(p);
        return (j, actions);
    }
    if j.floor.is_none() {
        let serving = observed
            .instances
            .iter()
            .filter(|i| i.release != j.to && j.serving(i, j.to, now_ms))
            .count();
        let floor = count(serving).min(j.target);
        j.note(
            now_ms,
            format!("{serving} instances serve; routed capacity stays at or above {floor}"),
        );
        j.floor = Some(floor);
    }
    if j.phase == Phase::Rolling {
        match j.failure(observed, now_ms) {
            None => {
                if j.converge(observed, j.to, now_ms, &mut actions) {
                    j.succeed(now_ms, &mut actions);
                }
                return (j, actions);
            }
            Some(reason) => j.fail(observed, reason, now_ms, &mut actions),
        }
    }
    if let Phase::Reverting { reason, since_ms } = j.phase.clone() {
        match j.from {
            Some(from) => j.revert(observed, from, &reason, since_ms, now_ms, &mut actions),
            // Only a journal edited by hand gets here: there is nothing to revert to.
            None => j.give_up(observed, reason, now_ms, &mut actions),
        }
    }
    (j, actions)
}

impl Journal {
    /// The traffic split a canary or blue/green rollout has set, which the proxy must apply
    /// while the rollout runs; `None` while the proxy should weigh releases by their routed
    /// instances (rolling updates, and before the first split).
    pub fn weights(&self) -> Option<&BTreeMap<u32, u32>> {
        self.progressive
            .as_ref()
            .map(|p| &p.weights)
            .filter(|w| !w.is_empty())
    }

    /// When the samples in [`Observed::samples`] should start counting: the later of when the
    /// current traffic split was set and the end of the last window judged. `None` when no
    /// analysis is measuring.
    pub fn samples_since(&self) -> Option<u64> {
        let run = self.progressive.as_ref()?.analysis.as_ref()?;
        run.next_ms.map(|_| run.window_floor_ms)
    }

    fn note(&mut self, at_ms: u64, message: String) {
        self.log.push(Entry { at_ms, message });
    }

    /// Whether `i` counts as capacity: routed, healthy and not leaving. Instances of the
    /// release being brought up (`new`) must also be ready, so that one which flapped since it
    /// was routed does not count until it proved itself again.
    fn serving(&self, i: &ObservedInstance, new: u32, now_ms: u64) -> bool {
        i.routable
            && !self.ledger.is_retiring(i)
            && match i.health {
                InstanceHealth::Healthy { .. } if i.release == new => self.ready(i, now_ms),
                InstanceHealth::Healthy { .. } => true,
                _ => false,
            }
    }

    fn ready(&self, i: &ObservedInstance, now_ms: u64) -> bool {
        matches!(i.health, InstanceHealth::Healthy { since_ms }
            if now_ms.saturating_sub(since_ms) >= self.min_healthy_time_ms)
    }

    /// Whether `i` has not turned healthy within `healthy_deadline` of its start.
    fn past_healthy_deadline(&self, i: &ObservedInstance, now_ms: u64) -> bool {
        !matches!(i.health, InstanceHealth::Healthy { .. })
            && now_ms >= i.started_ms.saturating_add(self.healthy_deadline_ms)
    }

    /// Why the rolling phase fails now, if it does.
    fn failure(&self, observed: &Observed, now_ms: u64) -> Option<String> {
        if let Some(why) = self.health_failure(observed, now_ms) {
            return Some(why);
        }
        if now_ms >= self.started_ms.saturating_add(self.progress_deadline_ms) {
            let ready = observed
                .instances
                .iter()
                .filter(|i| i.release == self.to && self.serving(i, self.to, now_ms))
                .count();
            return Some(format!(
                "the rollout did not finish within {}: {ready} of {} v{} instances serve",
                fmt_ms(self.progress_deadline_ms),
                self.target,
                self.to
            ));
        }
        None
    }

    /// Why the new release counts as failed by its instances, if it does: one exited, one
    /// never turned healthy, or a launch never appeared.
    fn health_failure(&self, observed: &Observed, now_ms: u64) -> Option<String> {
        let deadline = fmt_ms(self.healthy_deadline_ms);
        for i in &observed.instances {
            if i.release != self.to || self.ledger.is_retiring(i) {
                continue;
            }
            if i.health == InstanceHealth::Exited {
                return Some(format!("v{} instance {} exited", self.to, i.id));
            }
            // An instance that was routed proved itself once; if it turns unhealthy later it
            // stops counting as capacity, and the progress deadline bounds the wait for it,
            // rather than one blip failing a long rollout.
            if !i.routable && self.past_healthy_deadline(i, now_ms) {
                return Some(format!(
                    "v{} instance {} was not healthy within {deadline}",
                    self.to, i.id
                ));
            }
        }
        let lost = self.ledger.launching.iter().any(|l| {
            l.release == self.to && now_ms >= l.at_ms.saturating_add(self.healthy_deadline_ms)
        });
        if lost {
            return Some(format!(
                "a v{} instance did not appear within {deadline} of its launch",
                self.to
            ));
        }
        None
    }

    /// Moves `release` towards `target` serving instances and everything else out, within the
    /// floor and `max_parallel`. Returns whether that is reached: `target` instances of
    /// `release` serve and every other instance is retiring.
    fn converge(
        &mut self,
        observed: &Observed,
        release: u32,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> bool {
        let floor = self.floor.unwrap_or(0);
        let live: Vec<&ObservedInstance> = observed
            .instances
            .iter()
            .filter(|i| !self.ledger.is_retiring(i))
            .collect();

        // Route the new instances that proved themselves.
        for i in live.iter().filter(|i| i.release == release) {
            if self.ready(i, now_ms) && !i.routable && !self.ledger.routing.contains(&i.id) {
                self.ledger.routing.insert(i.id.clone());
                actions.push(Action::Route { id: i.id.clone() });
                let held = fmt_ms(self.min_healthy_time_ms);
                self.note(now_ms, format!("route {}: healthy for {held}", i.id));
            }
        }

        // Other instances that serve nobody can go at once; serving ones only down to the floor.
        let mut serving = count(
            live.iter()
                .filter(|i| self.serving(i, release, now_ms))
                .count(),
        );
        let mut others: Vec<&ObservedInstance> = live
            .iter()
            .copied()
            .filter(|i| i.release != release)
            .collect();
        others.sort_by(|a, b| (a.started_ms, &a.id).cmp(&(b.started_ms, &b.id)));
        let mut others_left = 0;
        for i in others {
            let why = if !self.serving(i, release, now_ms) {
                format!("v{} instance not serving", i.release)
            } else if serving > floor {
                serving -= 1;
                format!("replaced by v{release}; {serving} instances still serve")
            } else {
                others_left += 1;
                continue;
            };
            self.retire(i, &why, now_ms, actions);
        }

        // Launch within max_parallel and target. In-flight launches count as starting.
        let in_flight = self.ledger.in_flight(release);
        let mine = || {
            live.iter()
                .filter(|i| i.release == release && i.health != InstanceHealth::Exited)
        };
        let mut alive = count(mine().count()) + in_flight;
        let mut pending = count(
            mine()
                .filter(|i| !(i.routable && self.ready(i, now_ms)))
                .count(),
        ) + in_flight;
        while pending < self.max_parallel && alive < self.target {
            pending += 1;
            alive += 1;
            self.ledger.launching.push(Launching {
                release,
                at_ms: now_ms,
            });
            actions.push(Action::Launch { release });
            self.note(
                now_ms,
                format!("launch a v{release} instance ({alive} of {})", self.target),
            );
        }

        let new_serving = mine().filter(|i| self.serving(i, release, now_ms)).count();
        count(new_serving) >= self.target && others_left == 0
    }

    fn retire(&mut self, i: &ObservedInstance, why: &str, now_ms: u64, actions: &mut Vec<Action>) {
        self.ledger.retiring.insert(i.id.clone());
        actions.push(Action::Retire { id: i.id.clone() });
        self.note(now_ms, format!("retire {}: {why}", i.id));
    }

    fn succeed(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        actions.push(Action::SetStable { release: self.to });
        actions.push(Action::MarkRelease {
            release: self.to,
            status: ReleaseStatus::Active,
        });
        if let Some(from) = self.from {
            actions.push(Action::MarkRelease {
                release: from,
                status: ReleaseStatus::Retired,
            });
        }
        self.phase = Phase::Succeeded;
        let msg = format!("succeeded: {} v{} instances serve", self.target, self.to);
        self.note(now_ms, msg);
    }

    /// The rolling phase failed: revert if allowed, else stop where it stands.
    fn fail(
        &mut self,
        observed: &Observed,
        reason: String,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        // Launches of `to` still in flight are no longer wanted; if they appear while the
        // revert runs they are retired like any other `to` instance.
        let to = self.to;
        self.ledger.launching.retain(|l| l.release != to);
        match self.from {
            Some(from) if self.auto_revert => {
                self.note(now_ms, format!("{reason}: reverting to v{from}"));
                self.phase = Phase::Reverting {
                    reason,
                    since_ms: now_ms,
                };
            }
            _ => self.give_up(observed, reason, now_ms, actions),
        }
    }

    /// Ends the rollout without a revert: `to` is marked failed, no more launches, and of its
    /// instances only those that serve are kept, since taking them away would only lose
    /// capacity.
    fn give_up(
        &mut self,
        observed: &Observed,
        reason: String,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        actions.push(Action::MarkRelease {
            release: self.to,
            status: ReleaseStatus::Failed,
        });
        let to = self.to;
        for i in &observed.instances {
            if i.release == to && !self.ledger.is_retiring(i) && !self.serving(i, to, now_ms) {
                self.retire(
                    i,
                    &format!("v{to} failed and it does not serve"),
                    now_ms,
                    actions,
                );
            }
        }
        self.note(now_ms, format!("failed: {reason}"));
        self.phase = Phase::Failed {
            reason,
            reverted: false,
        };
    }

    fn revert(
        &mut self,
        observed: &Observed,
        from: u32,
        reason: &str,
        since_ms: u64,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        if now_ms >= since_ms.saturating_add(self.progress_deadline_ms) {
            let why = format!(
                "{reason}; the revert to v{from} did not finish within {}",
                fmt_ms(self.progress_deadline_ms)
            );
            self.give_up(observed, why, now_ms, actions);
            return;
        }
        // A `from` instance that fails is replaced rather than failing the revert: `from` ran
        // well before, and the revert's own deadline bounds how long that is tried.
        for i in &observed.instances {
            let failed =
                i.health == InstanceHealth::Exited || self.past_healthy_deadline(i, now_ms);
            if i.release == from && failed && !self.ledger.is_retiring(i) {
                self.retire(
                    i,
                    &format!("v{from} instance failed; replacing it"),
                    now_ms,
                    actions,
                );
            }
        }
        let deadline = self.healthy_deadline_ms;
        let before = self.ledger.launching.len();
        self.ledger
            .launching
            .retain(|l| now_ms < l.at_ms.saturating_add(deadline));
        if self.ledger.launching.len() < before {
            self.note(
                now_ms,
                format!("a v{from} launch never appeared; launching again"),
            );
        }
        if self.converge(observed, from, now_ms, actions) {
            actions.push(Action::SetStable { release: from });
            actions.push(Action::MarkRelease {
                release: self.to,
                status: ReleaseStatus::Failed,
            });
            self.note(
                now_ms,
                format!("reverted: {} v{from} instances serve", self.target),
            );
            self.phase = Phase::Failed {
                reason: reason.to_owned(),
                reverted: true,
            };
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn fmt_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}
