//! What the engine was told to do and has not yet shown done: the memory that makes
//! [`super::step`] and [`super::heal`] idempotent when they see the same observation twice.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{Observed, ObservedInstance};

/// Actions issued whose effect the observations do not show yet.
///
/// The engine performs a `Launch` by starting an instance that shows up (as `Starting`) in the
/// next observation, a `Route` by making it `routable`, a `Retire` by marking it `retiring`.
/// Until that shows, the decision functions count the action as done, so calling them again
/// with a stale observation issues no second `Launch` and never counts an instance being
/// retired as serving.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The ids in the last observation. An id not seen before answers the oldest in-flight
    /// launch of its release.
    #[serde(default)]
    pub seen: BTreeSet<String>,
    /// Launches issued and not yet seen, oldest first.
    #[serde(default)]
    pub launching: Vec<Launching>,
    /// Instances told to take traffic that are not yet observed `routable`.
    #[serde(default)]
    pub routing: BTreeSet<String>,
    /// Instances told to retire that are not yet observed `retiring`.
    #[serde(default)]
    pub retiring: BTreeSet<String>,
}

/// One launch that has not appeared yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launching {
    /// The release launched.
    pub release: u32,
    /// When the launch was decided.
    pub at_ms: u64,
}

impl Ledger {
    /// Takes in an observation: settles the launches, routes and retirements it shows done.
    pub(super) fn observe(&mut self, observed: &Observed) {
        for instance in &observed.instances {
            if !self.seen.contains(&instance.id)
                && let Some(at) = self
                    .launching
                    .iter()
                    .position(|l| l.release == instance.release)
            {
                self.launching.remove(at);
            }
        }
        self.seen = observed.instances.iter().map(|i| i.id.clone()).collect();
        let find = |id: &String| observed.instances.iter().find(|i| &i.id == id);
        self.routing
            .retain(|id| find(id).is_some_and(|i| !i.routable && !i.retiring));
        self.retiring
            .retain(|id| find(id).is_some_and(|i| !i.retiring));
    }

    /// Forgets every action not yet shown done. After a restart the engine cannot know whether
    /// an action persisted in the journal was carried out, but the observation shows what was:
    /// a launch that happened appears as an instance, one that did not is decided again.
    pub(super) fn forget(&mut self) {
        self.launching.clear();
        self.routing.clear();
        self.retiring.clear();
    }

    /// Launches of `release` still in flight.
    pub(super) fn in_flight(&self, release: u32) -> u32 {
        let n = self
            .launching
            .iter()
            .filter(|l| l.release == release)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Whether the instance is retiring, or was told to.
    pub(super) fn is_retiring(&self, instance: &ObservedInstance) -> bool {
        instance.retiring || self.retiring.contains(&instance.id)
    }
}
