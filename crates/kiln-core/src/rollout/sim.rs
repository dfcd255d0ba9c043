//! A simulated service for tests: instances that turn healthy, fail or exit on a script, an
//! engine that carries out [`Action`]s faithfully, and property tests of the rollout rules
//! over random scripts.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use proptest::prelude::*;

use super::*;

pub(super) const S: u64 = 1_000;
/// An arbitrary epoch, so that nothing accidentally works because time starts at zero.
pub(super) const T0: u64 = 1_700_000_000_000;
/// How long a retired instance takes to drain and stop.
const DRAIN_MS: u64 = 2 * S;

/// What an instance will do, counted from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// Turns healthy after this long and stays so.
    Healthy(u64),
    /// Exits after this long without ever being healthy.
    Exit(u64),
    /// Reports unhealthy after a second and never recovers.
    Never,
    /// Turns healthy after the first duration, fails after the second (exits when the flag
    /// says so, else turns unhealthy).
    Flap(u64, u64, bool),
}

#[derive(Debug, Clone)]
pub(super) struct SimInstance {
    pub obs: ObservedInstance,
    fate: Fate,
    gone_at: Option<u64>,
}

/// The world as the engine would run it.
#[derive(Debug, Clone)]
pub(super) struct World {
    pub now: u64,
    pub instances: Vec<SimInstance>,
    /// Fates of instances launched from now on, in order; `default` once they run out.
    pub fates: VecDeque<Fate>,
    pub default: Fate,
    numbers: BTreeMap<u32, u32>,
    pub stable: Option<u32>,
    pub marks: Vec<(u32, ReleaseStatus)>,
    /// The traffic split last set (empty: by routed instances).
    pub weights: BTreeMap<u32, u32>,
    /// What the next observations report as analysis samples and operator command.
    pub samples: Option<Samples>,
    pub command: Option<OperatorCommand>,
}

impl World {
    /// `serving` instances of release `from` that are healthy and routed, and `idle` ones that
    /// are still starting and unrouted.
    pub fn new(from: u32, serving: u32, idle: u32) -> Self {
        let mut world = Self {
            now: T0,
            instances: Vec::new(),
            fates: VecDeque::new(),
            default: Fate::Healthy(3 * S),
            numbers: BTreeMap::new(),
            stable: (serving + idle > 0).then_some(from),
            marks: Vec::new(),
            weights: BTreeMap::new(),
            samples: None,
            command: None,
        };
        for k in 0..serving + idle {
            let fate = if k < serving {
                Fate::Healthy(0)
            } else {
                Fate::Healthy(1_000 * S)
            };
            let started = T0 - 3_600 * S + u64::from(k) * S;
            world.spawn(from, started, fate);
            if k < serving {
                let last = world.instances.len() - 1;
                let i = &mut world.instances[last].obs;
                i.health = InstanceHealth::Healthy { since_ms: started };
                i.routable = true;
            }
        }
        world
    }

    fn spawn(&mut self, release: u32, started_ms: u64, fate: Fate) -> String {
        let n = self.numbers.entry(release).or_insert(0);
        *n += 1;
        let id = format!("v{release}-{n}");
        self.instances.push(SimInstance {
            obs: ObservedInstance {
                id: id.clone(),
                release,
                started_ms,
                health: InstanceHealth::Starting,
                routable: false,
                retiring: false,
                condemned: false,
            },
            fate,
            gone_at: None,
        });
        id
    }

    pub fn observe(&self) -> Observed {
        Observed {
            instances: self.instances.iter().map(|i| i.obs.clone()).collect(),
            samples: self.samples,
            command: self.command,
        }
    }

    fn find(&mut self, id: &str) -> &mut SimInstance {
        self.instances
            .iter_mut()
            .find(|i| i.obs.id == id)
            .unwrap_or_else(|| panic!("no instance {id}"))
    }

    /// Carries out `actions`; returns a line per action for transcripts.
    pub fn apply(&mut self, actions: &[Action]) -> Vec<String> {
        let now = self.now;
        let mut lines = Vec::new();
        for action in actions {
            lines.push(match action {
                Action::Launch { release } => {
                    let fate = self.fates.pop_front().unwrap_or(self.default);
                    format!("launch {}", self.spawn(*release, now, fate))
                }
                Action::Route { id } => {
                    self.find(id).obs.routable = true;
                    format!("route {id}")
                }
                Action::Retire { id } => {
                    let i = self.find(id);
                    i.obs.routable = false;
                    i.obs.retiring = true;
                    i.gone_at.get_or_insert(now + DRAIN_MS);
                    format!("retire {id}")
                }
                Action::SetStable { release } => {
                    self.stable = Some(*release);
                    format!("stable v{release}")
                }
                Action::MarkRelease { release, status } => {
                    self.marks.push((*release, *status));
                    format!("v{release} {status:?}").to_lowercase()
                }
                Action::SetWeights { weights } => {
                    self.weights.clone_from(weights);
                    let split: Vec<String> =
                        weights.iter().map(|(r, w)| format!("v{r}={w}")).collect();
                    format!("weights {}", split.join(" "))
                }
            });
        }
        lines
    }

    /// Moves time on by `dt`: instances follow their fates, drained ones go away.
    pub fn advance(&mut self, dt: u64) {
        self.now += dt;
        let now = self.now;
        self.instances.retain(|i| i.gone_at.is_none_or(|t| now < t));
        for i in &mut self.instances {
            let start = i.obs.started_ms;
            let at = |d: u64| now >= start + d;
            let health = &mut i.obs.health;
            if *health == InstanceHealth::Exited {
                continue;
            }
            match i.fate {
                Fate::Healthy(d) => {
                    if *health == InstanceHealth::Starting && at(d) {
                        *health = InstanceHealth::Healthy {
                            since_ms: start + d,
                        };
                    }
                }
                Fate::Exit(d) => {
                    if at(d) {
                        *health = InstanceHealth::Exited;
                    }
                }
                Fate::Never => {
                    if *health == InstanceHealth::Starting && at(S) {
                        *health = InstanceHealth::Unhealthy {
                            since_ms: start + S,
                        };
                    }
                }
                Fate::Flap(up, down, exits) => {
                    if at(up + down) {
                        *health = if exits {
                            InstanceHealth::Exited
                        } else {
                            InstanceHealth::Unhealthy {
                                since_ms: start + up + down,
                            }
                        };
                    } else if *health == InstanceHealth::Starting && at(up) {
                        *health = InstanceHealth::Healthy {
                            since_ms: start + up,
                        };
                    }
                }
            }
        }
    }

    /// Routed healthy instances that are not leaving: the capacity users see.
    pub fn capacity(&self) -> u32 {
        let n = self
            .instances
            .iter()
            .filter(|i| {
                i.obs.routable
                    && !i.obs.retiring
                    && matches!(i.obs.health, InstanceHealth::Healthy { .. })
            })
            .count();
        count(n)
    }

    /// Instances not being retired, of `release` or (with `None`) of any release.
    pub fn live(&self, release: Option<u32>) -> u32 {
        let n = self
            .instances
            .iter()
            .filter(|i| !i.obs.retiring && release.is_none_or(|r| i.obs.release == r))
            .filter(|i| i.obs.health != InstanceHealth::Exited || release.is_none())
            .count();
        count(n)
    }
}

/// Runs a rollout to its end, one step every `tick`, and writes what happened, one line per
/// step with actions: time since the start, then the actions.
pub(super) fn transcript(mut journal: Journal, world: &mut World, tick: u64) -> (Journal, String) {
    let mut out = String::new();
    for _ in 0..10_000 {
        let (next, actions) = step(&journal, &world.observe(), world.now);
        journal = next;
        if !actions.is_empty() {
            let lines = world.apply(&actions);
            let secs = (world.now - journal.started_ms) / S;
            // Left-aligned: expect-test strips the leading indentation of snapshots.
            let _ = writeln!(out, "{:<5} {}", format!("{secs}s"), lines.join(", "));
        }
        if journal.phase.is_done() {
            break;
        }
        world.advance(tick);
    }
    (journal, out)
}

fn settings(
    target: u32,
    max_parallel: u32,
    min_healthy_s: u64,
    healthy_deadline_s: u64,
    progress_deadline_s: u64,
    auto_revert: bool,
) -> ServiceSpec {
    let mut spec = tests::spec(target, max_parallel);
    spec.rollout.min_healthy_time = Duration::from_secs(min_healthy_s);
    spec.rollout.healthy_deadline = Duration::from_secs(healthy_deadline_s);
    spec.rollout.progress_deadline = Duration::from_secs(progress_deadline_s);
    spec.rollout.auto_rollback = auto_revert;
    spec
}

/// Fates where nothing fails once it was healthy, so that capacity only drops by decisions.
fn fair_fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        4 => (0..20 * S).prop_map(Fate::Healthy),
        1 => (0..20 * S).prop_map(Fate::Exit),
        1 => Just(Fate::Never),
    ]
}

/// Any fate, including instances that fail after they were healthy (and routed).
fn any_fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        fair_fate(),
        (0..20 * S, 0..30 * S, any::<bool>()).prop_map(|(u, d, e)| Fate::Flap(u, d, e)),
    ]
}

#[derive(Debug, Clone)]
struct Scenario {
    spec: ServiceSpec,
    serving: u32,
    idle: u32,
    fates: Vec<Fate>,
    ticks: Vec<u64>,
    repeats: Vec<bool>,
}

const MAX_TICK: u64 = 6 * S;

fn scenario(fate: BoxedStrategy<Fate>) -> impl Strategy<Value = Scenario> {
    (
        (
            1u32..=5,
            1u32..=3,
            0u64..=15,
            20u64..=60,
            60u64..=240,
            any::<bool>(),
        ),
        0u32..=5,
        0u32..=2,
        prop::collection::vec(fate, 0..30),
        prop::collection::vec(200..=MAX_TICK, 1..20),
        prop::collection::vec(any::<bool>(), 1..10),
    )
        .prop_map(
            |((t, p, m, h, d, r), serving, idle, fates, ticks, repeats)| Scenario {
                spec: settings(t, p, m, h, d, r),
                serving,
                idle,
                fates,
                ticks,
                repeats,
            },
        )
}

/// What a run must show at every step.
struct Checks {
    /// Capacity never drops below the floor (only sound when nothing fails after it was
    /// healthy).
    capacity: bool,
}

/// Runs `sc` to the end, checking the invariants after every step; returns the final journal.
fn run(sc: &Scenario, checks: &Checks) -> Result<(Journal, World), TestCaseError> {
    let from = (sc.serving + sc.idle > 0).then_some(1);
    let mut world = World::new(1, sc.serving, sc.idle);
    world.fates = sc.fates.iter().copied().collect();
    let mut journal = start("d1", "web", from, 2, &sc.spec, world.now);
    let (target, max_parallel) = (journal.target, journal.max_parallel);
    let floor = sc.serving.min(target);
    let min_healthy = journal.min_healthy_time_ms;
    let end = journal.started_ms + 2 * journal.progress_deadline_ms + MAX_TICK;
    for k in 0.. {
        let observed = world.observe();
        let (mut next, mut actions) = step(&journal, &observed, world.now);
        if sc.repeats[k % sc.repeats.len()] {
            // The engine may call again with the same observation (a retry, a restart): the
            // second call must not do anything twice.
            let (again, more) = step(&next, &observed, world.now);
            prop_assert!(
                more.iter()
                    .all(|a| !matches!(a, Action::Launch { .. } | Action::Route { .. })),
                "repeated step launched or routed again: {more:?}"
            );
            next = again;
            actions.extend(more);
        }
        journal = next;
        // (b) A new instance is routed only once it has been healthy for min_healthy_time.
        for action in &actions {
            if let Action::Route { id } = action {
                let i = observed.instances.iter().find(|i| &i.id == id);
                let ok = i.is_some_and(|i| {
                    matches!(i.health, InstanceHealth::Healthy { since_ms }
                    if world.now - since_ms >= min_healthy)
                });
                prop_assert!(ok, "routed {id} before it was ready: {i:?}");
            }
        }
        world.apply(&actions);
        if !journal.phase.is_done() {
            // (a) Routed healthy capacity never drops below min(target, initially serving).
            if checks.capacity {
                prop_assert!(
                    world.capacity() >= floor,
                    "capacity {} < floor {floor} at {}s: {:#?}",
                    world.capacity(),
                    (world.now - T0) / S,
                    journal.log
                );
            }
            // (c) Never more than `target` live instances of the new release, and (when
            // nothing flaps) never more than `target + max_parallel` instances in all.
            prop_assert!(world.live(Some(2)) <= target);
            if checks.capacity {
                prop_assert!(
                    world.live(None) <= target + max_parallel,
                    "{} live instances",
                    world.live(None)
                );
            }
        }
        if journal.phase.is_done() {
            break;
        }
        // (d) Every rollout ends: the rolling phase within progress_deadline, a revert within
        // its own progress_deadline after that (plus one tick for the step to notice).
        prop_assert!(world.now < end, "still {:?} at the deadline", journal.phase);
        world.advance(sc.ticks[k % sc.ticks.len()]);
    }
    Ok((journal, world))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a)–(d) with instances that only ever fail before they turn healthy.
    #[test]
    fn rolling_update_keeps_capacity_and_ends(sc in scenario(fair_fate().boxed())) {
        let (journal, world) = run(&sc, &Checks { capacity: true })?;
        match &journal.phase {
            Phase::Succeeded => {
                prop_assert_eq!(world.stable, Some(2));
                prop_assert_eq!(world.live(Some(2)), journal.target);
                prop_assert_eq!(world.live(None), journal.target, "only v2 is left");
            }
            Phase::Failed { reverted: true, .. } => {
                prop_assert_eq!(world.stable, Some(1));
                prop_assert_eq!(world.live(Some(2)), 0, "no v2 is left after a revert");
                prop_assert!(world.capacity() >= journal.target);
            }
            Phase::Failed { reverted: false, .. } => {
                prop_assert!(world.marks.contains(&(2, ReleaseStatus::Failed)));
            }
            other => prop_assert!(false, "ended {:?}", other),
        }
        // A release whose instances all turn healthy in time rolls out, when the progress
        // deadline leaves room for every batch: each takes at most 20s to turn healthy, then
        // min_healthy_time, plus a tick each to notice, route and see the route.
        let all_fine = sc.fates.iter().all(|f| matches!(f, Fate::Healthy(d) if *d < 20 * S));
        let batches = u64::from(journal.target.div_ceil(journal.max_parallel));
        let per_batch = 20 * S + journal.min_healthy_time_ms + 3 * MAX_TICK;
        if all_fine && batches * per_batch < journal.progress_deadline_ms {
            prop_assert_eq!(&journal.phase, &Phase::Succeeded);
        }
    }

    /// (b)–(d) when instances may also fail after they were healthy and routed.
    #[test]
    fn rolling_update_ends_whatever_instances_do(sc in scenario(any_fate().boxed())) {
        let (journal, _) = run(&sc, &Checks { capacity: false })?;
        prop_assert!(journal.phase.is_done());
    }
}
