//! Self-healing of a service with no rollout: keep `target` instances of the stable release
//! running and routed, replacing (never restarting) the ones that die, with an exponential
//! backoff so that a crash loop does not spin.

use serde::{Deserialize, Serialize};

use super::{Action, InstanceHealth, Launching, Ledger, Observed, ObservedInstance};
use crate::state::ServiceSpec;

/// How long an instance may stay `Unhealthy` before it is replaced, by default. The checks
/// already failed `unhealthy_threshold` times before reporting it; this extra grace rides out
/// a short stall (a GC pause, a slow dependency) without churning instances.
pub const DEFAULT_UNHEALTHY_GRACE_MS: u64 = 10_000;
/// The delay before the second replacement in a crash loop; it doubles with each further one.
pub const BACKOFF_FIRST_MS: u64 = 1_000;
/// The longest delay between replacements.
pub const BACKOFF_CAP_MS: u64 = 60_000;
/// A failure this long after the previous one starts a new streak (the first replacement is
/// immediate again). Twice the cap, so a service crashing at the cap stays backed off.
pub const STABLE_PERIOD_MS: u64 = 2 * BACKOFF_CAP_MS;

/// When an instance of the stable release counts as failed, and when it counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealSettings {
    /// How long an instance may be `Unhealthy` before it is replaced.
    pub unhealthy_grace_ms: u64,
    /// How long an instance must be healthy before it is routed.
    pub min_healthy_time_ms: u64,
    /// How long a new instance has to turn healthy before it is replaced.
    pub healthy_deadline_ms: u64,
}

impl HealSettings {
    /// The settings for a service: its rollout's `min_healthy_time` and `healthy_deadline`,
    /// and the default grace.
    pub fn for_spec(spec: &ServiceSpec) -> Self {
        Self {
            unhealthy_grace_ms: DEFAULT_UNHEALTHY_GRACE_MS,
            min_healthy_time_ms: super::millis(spec.rollout.min_healthy_time),
            healthy_deadline_ms: super::millis(spec.rollout.healthy_deadline),
        }
    }
}

/// The memory of self-healing for one service, kept by the engine between calls to [`heal`]
/// (it carries the settings so that the engine keeps one value per service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// When instances count as failed or ready.
    pub settings: HealSettings,
    /// Rounds of replacements in the current crash loop (0 when stable).
    pub streak: u32,
    /// When the last replacement round was decided.
    pub last_failure_ms: Option<u64>,
    /// No instance is launched before this.
    pub not_before_ms: u64,
    /// Actions issued and not yet observed done.
    #[serde(default)]
    pub ledger: Ledger,
}

impl Backoff {
    /// A fresh backoff: no streak, launches allowed at once.
    pub fn new(settings: HealSettings) -> Self {
        Self {
            settings,
            streak: 0,
            last_failure_ms: None,
            not_before_ms: 0,
            ledger: Ledger::default(),
        }
    }

    /// The delay before launching replacements in round `streak` of a crash loop: none for
    /// the first, then 1 s, 2 s, 4 s … up to [`BACKOFF_CAP_MS`].
    pub fn delay_ms(streak: u32) -> u64 {
        match streak {
            0 | 1 => 0,
            n => BACKOFF_FIRST_MS
                .checked_shl(n - 2)
                .unwrap_or(BACKOFF_CAP_MS)
                .min(BACKOFF_CAP_MS),
        }
    }
}

/// Keeps `target` instances of release `stable` running and routed: replaces instances that
/// exited, stayed unhealthy past the grace or never turned healthy (Retire + Launch, never a
/// restart in place), launches missing ones, retires extra ones newest first, and routes ready
/// ones. Instances of other releases (a warm previous release, say) are left alone.
///
/// Condemned instances (a drift remediation) are replaced create-before-destroy: a
/// replacement is launched at once, and the condemned instance retired once the routed
/// instances without it still number `target`.
///
/// All failures seen in one call make one replacement round: several instances dying together
/// are one incident, not a loop.
pub fn heal(
    stable: u32,
    target: u32,
    observed: &Observed,
    backoff: &Backoff,
    now_ms: u64,
) -> (Backoff, Vec<Action>) {
    let mut b = backoff.clone();
    let mut actions = Vec::new();
    b.ledger.observe(observed);
    let s = b.settings;
    if b.last_failure_ms
        .is_some_and(|t| now_ms >= t.saturating_add(STABLE_PERIOD_MS))
    {
        b.streak = 0;
    }

    let mine: Vec<&ObservedInstance> = observed
        .instances
        .iter()
        .filter(|i| i.release == stable && !b.ledger.is_retiring(i))
        .collect();
    let failed = |i: &ObservedInstance| match i.health {
        InstanceHealth::Exited => true,
        InstanceHealth::Unhealthy { since_ms } => {
            now_ms >= since_ms.saturating_add(s.unhealthy_grace_ms)
        }
        InstanceHealth::Starting => now_ms >= i.started_ms.saturating_add(s.healthy_deadline_ms),
        InstanceHealth::Healthy { .. } => false,
    };
    let (dead, alive): (Vec<_>, Vec<_>) = mine.into_iter().partition(|i| failed(i));
    // Condemned instances (drifted) still serve but do not count as capacity: replacements
    // are launched for them as for missing ones, and each is retired only once the routed
    // instances without it still reach `target` (create before destroy).
    let (condemned, mut alive): (Vec<_>, Vec<_>) = alive.into_iter().partition(|i| i.condemned);
    for i in &dead {
        retire(&mut b.ledger, i, &mut actions);
    }
    if !dead.is_empty() {
        b.streak = b.streak.saturating_add(1);
        b.last_failure_ms = Some(now_ms);
        b.not_before_ms = now_ms.saturating_add(Backoff::delay_ms(b.streak));
    }

    // A launch that never showed up within the healthy deadline is given up on, so that the
    // missing instance is launched again.
    b.ledger
        .launching
        .retain(|l| l.release != stable || now_ms < l.at_ms.saturating_add(s.healthy_deadline_ms));
    let in_flight = b.ledger.in_flight(stable);
    let live = super::count(alive.len()) + in_flight;
    if live > target {
        // Newest first: they have proved the least.
        alive.sort_by(|a, b| (b.started_ms, &b.id).cmp(&(a.started_ms, &a.id)));
        let extra = (live - target) as usize;
        for i in alive.drain(..extra.min(alive.len())) {
            retire(&mut b.ledger, i, &mut actions);
        }
    } else if live < target && now_ms >= b.not_before_ms {
        for _ in live..target {
            b.ledger.launching.push(Launching {
                release: stable,
                at_ms: now_ms,
            });
            actions.push(Action::Launch { release: stable });
        }
    }

    let mut routed = super::count(
        alive
            .iter()
            .chain(condemned.iter())
            .filter(|i| i.routable)
            .count(),
    );
    for i in alive {
        let ready = matches!(i.health, InstanceHealth::Healthy { since_ms }
            if now_ms.saturating_sub(since_ms) >= s.min_healthy_time_ms);
        if ready && !i.routable && !b.ledger.routing.contains(&i.id) {
            b.ledger.routing.insert(i.id.clone());
            actions.push(Action::Route { id: i.id.clone() });
        }
    }
    // Oldest first, one at a time as capacity allows; one that serves nothing goes at once.
    let mut condemned = condemned;
    condemned.sort_by(|a, b| (a.started_ms, &a.id).cmp(&(b.started_ms, &b.id)));
    for i in condemned {
        if !i.routable {
            retire(&mut b.ledger, i, &mut actions);
        } else if routed > target {
            routed -= 1;
            retire(&mut b.ledger, i, &mut actions);
        }
    }
    (b, actions)
}

fn retire(ledger: &mut Ledger, i: &ObservedInstance, actions: &mut Vec<Action>) {
    ledger.retiring.insert(i.id.clone());
    actions.push(Action::Retire { id: i.id.clone() });
}
