//! Canary and blue/green rollouts in the simulated world of [`super::sim`]: a traffic model
//! that turns the split into analysis samples, operator commands on a script, and property
//! tests of the rules in [`super::progressive`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use proptest::prelude::*;

use super::sim::{Fate, S, T0, World};
use super::*;
use crate::analysis::{AnalysisRules, Red, Verdict, judge};
use crate::model::{Analysis, CanaryStep};

/// How the new release behaves in one window, as the proxy would measure it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Traffic {
    /// Plenty of requests, no errors, fast.
    Good,
    /// Plenty of requests, a fifth of them fail.
    Bad,
    /// Three requests: too few to judge.
    Sparse,
    /// The engine reports nothing.
    NoData,
}

/// The samples the engine would report now for `journal`, if the new release behaves as
/// `traffic`: requests counted since [`Journal::samples_since`].
pub(super) fn samples(journal: &Journal, traffic: Traffic, now: u64) -> Option<Samples> {
    let since = journal.samples_since()?;
    let canary = match traffic {
        Traffic::Good => Red {
            requests: 1_000,
            errors: 0,
            p50_us: Some(20_000),
            p99_us: Some(90_000),
        },
        Traffic::Bad => Red {
            requests: 1_000,
            errors: 200,
            p50_us: Some(20_000),
            p99_us: Some(90_000),
        },
        Traffic::Sparse => Red {
            requests: 3,
            errors: 0,
            p50_us: Some(20_000),
            p99_us: Some(90_000),
        },
        Traffic::NoData => return None,
    };
    let stable = Red {
        requests: 5_000,
        errors: 5,
        p50_us: Some(20_000),
        p99_us: Some(100_000),
    };
    Some(Samples {
        from_ms: since,
        to_ms: now,
        canary,
        stable: Some(stable),
    })
}

/// 5 % errors at most, 50 requests, every `interval_s`, with the given limits.
pub(super) fn analysis(interval_s: u64, failure_limit: u32, inconclusive_limit: u32) -> Analysis {
    Analysis {
        interval: Duration::from_secs(interval_s),
        max_error_rate: Some(0.05),
        max_p50_latency: None,
        max_p99_latency: Some(Duration::from_millis(500)),
        max_error_rate_increase: None,
        max_p99_increase: None,
        min_requests: 50,
        failure_limit,
        inconclusive_limit,
    }
}

pub(super) fn canary_spec(target: u32, steps: &[(u8, Option<u64>)]) -> ServiceSpec {
    let mut spec = tests::spec(target, 1);
    spec.rollout.strategy = crate::model::Strategy::Canary;
    spec.rollout.steps = steps
        .iter()
        .map(|&(weight, pause)| CanaryStep {
            weight,
            pause: pause.map(Duration::from_secs),
        })
        .collect();
    spec.rollout.scale_down_delay = Duration::from_secs(60);
    spec
}

pub(super) fn blue_green_spec(target: u32, auto_promote: bool) -> ServiceSpec {
    let mut spec = tests::spec(target, 1);
    spec.rollout.strategy = crate::model::Strategy::BlueGreen;
    spec.rollout.auto_promote = auto_promote;
    spec.rollout.scale_down_delay = Duration::from_secs(60);
    spec
}

/// What the world does at tick `k`: the new release's traffic, and maybe a command.
pub(super) type Script<'a> = &'a dyn Fn(usize, u64) -> (Traffic, Option<Command>);

/// Runs `journal` for at most `ticks` ticks of `tick` ms, feeding samples and commands from
/// `script`; returns the last journal and one line per step with actions.
pub(super) fn drive(
    mut journal: Journal,
    world: &mut World,
    tick: u64,
    ticks: usize,
    script: Script<'_>,
) -> (Journal, String) {
    let mut out = String::new();
    let mut seq = 0;
    for k in 0..ticks {
        let (traffic, command) = script(k, world.now - T0);
        if let Some(command) = command {
            seq += 1;
            world.command = Some(OperatorCommand { seq, command });
        }
        world.samples = samples(&journal, traffic, world.now);
        let (next, actions) = step(&journal, &world.observe(), world.now);
        journal = next;
        if !actions.is_empty() {
            let lines = world.apply(&actions);
            let secs = (world.now - journal.started_ms) / S;
            let _ = writeln!(out, "{:<5} {}", format!("{secs}s"), lines.join(", "));
        }
        if journal.phase.is_done() {
            break;
        }
        world.advance(tick);
    }
    (journal, out)
}

/// The journal's log with times since the start, for snapshots.
pub(super) fn log(journal: &Journal) -> String {
    journal
        .log
        .iter()
        .map(|e| {
            let at = (e.at_ms - journal.started_ms) / S;
            format!("{:<4} {}", format!("{at}s"), e.message)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, Clone)]
struct Scenario {
    spec: ServiceSpec,
    serving: u32,
    fates: Vec<Fate>,
    ticks: Vec<u64>,
    traffic: Vec<Traffic>,
    commands: Vec<Option<Command>>,
    repeats: Vec<bool>,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        6 => (0..20 * S).prop_map(Fate::Healthy),
        1 => (0..20 * S).prop_map(Fate::Exit),
        1 => Just(Fate::Never),
        1 => (0..20 * S, 0..60 * S, any::<bool>()).prop_map(|(u, d, e)| Fate::Flap(u, d, e)),
    ]
}

fn steps() -> impl Strategy<Value = Vec<CanaryStep>> {
    prop::collection::vec(
        (
            0u8..=100,
            prop_oneof![3 => (0u64..40).prop_map(Some), 1 => Just(None)],
        ),
        1..4,
    )
    .prop_map(|mut steps| {
        // The config refuses decreasing weights.
        steps.sort_by_key(|s| s.0);
        steps
            .into_iter()
            .map(|(weight, pause)| CanaryStep {
                weight,
                pause: pause.map(Duration::from_secs),
            })
            .collect()
    })
}

fn command() -> impl Strategy<Value = Option<Command>> {
    prop_oneof![
        30 => Just(None),
        2 => Just(Some(Command::Promote)),
        1 => Just(Some(Command::Pause)),
        2 => Just(Some(Command::Resume)),
        1 => Just(Some(Command::Abort)),
    ]
}

/// A canary or blue/green rollout of v2 over `serving` healthy v1 instances. With `traffic`
/// never good, analysis is always on (the inconclusive-never-promotes property).
fn scenario(
    traffic: BoxedStrategy<Traffic>,
    analysis_always: bool,
) -> impl Strategy<Value = Scenario> {
    (
        (
            any::<bool>(),
            1u32..=4,
            prop::option::of(1u32..=4),
            steps(),
            any::<bool>(),
            0u64..=30,
            prop::option::of((1u64..=10, 0u32..=2, 0u32..=3)),
            (20u64..=60, 60u64..=240),
        ),
        0u32..=4,
        prop::collection::vec(fate(), 0..12),
        prop::collection::vec(200..=6 * S, 1..12),
        prop::collection::vec(traffic, 1..20),
        prop::collection::vec(command(), 1..40),
        prop::collection::vec(any::<bool>(), 1..8),
    )
        .prop_map(
            move |(
                (canary, target, canary_instances, steps, auto, delay, a, (hd, pd)),
                serving,
                fates,
                ticks,
                traffic,
                commands,
                repeats,
            )| {
                let mut spec = tests::spec(target, 1);
                let r = &mut spec.rollout;
                r.strategy = if canary {
                    crate::model::Strategy::Canary
                } else {
                    crate::model::Strategy::BlueGreen
                };
                r.steps = steps;
                r.canary_instances = canary_instances;
                r.auto_promote = auto;
                r.scale_down_delay = Duration::from_secs(delay);
                r.min_healthy_time = Duration::from_secs(2);
                r.healthy_deadline = Duration::from_secs(hd);
                r.progress_deadline = Duration::from_secs(pd);
                let a = a.or(analysis_always.then_some((5, 0, 1)));
                r.analysis = a.map(|(i, f, n)| analysis(i, f, n));
                Scenario {
                    spec,
                    serving,
                    fates,
                    ticks,
                    traffic,
                    commands,
                    repeats,
                }
            },
        )
}

/// What a run saw, for the checks at the end.
struct Run {
    journal: Journal,
    world: World,
    /// The highest share of requests `to` was ever given.
    max_to_weight: u32,
}

/// Runs `sc` for a bounded time (a manual step may wait forever), checking the invariants
/// after every step.
fn run(sc: &Scenario) -> Result<Run, TestCaseError> {
    let (from, to) = (1, 2);
    let mut world = World::new(from, sc.serving, 0);
    // v1 is the stable release even when none of its instances runs.
    world.stable = Some(from);
    world.fates = sc.fates.iter().copied().collect();
    let mut journal = start("d1", "web", Some(from), to, &sc.spec, world.now);
    prop_assert!(journal.progressive.is_some());
    let rules = sc.spec.rollout.analysis.as_ref().map(AnalysisRules::from);
    let v1_serving = v1_capacity(&world);
    let mut fed: BTreeMap<u64, Option<Samples>> = BTreeMap::new();
    let mut to_weight = 0;
    let mut max_to_weight = 0;
    let mut weights_at: Option<u64> = None;
    let mut aborted = false;
    let mut seq = 0;
    for k in 0..400 {
        if let Some(command) = sc.commands[k % sc.commands.len()] {
            seq += 1;
            world.command = Some(OperatorCommand { seq, command });
        }
        let traffic = sc.traffic[k % sc.traffic.len()];
        world.samples = samples(&journal, traffic, world.now);
        fed.insert(world.now, world.samples);
        let observed = world.observe();
        let before = journal.clone();
        let (mut next, mut actions) = step(&journal, &observed, world.now);
        if sc.repeats[k % sc.repeats.len()] {
            let (again, more) = step(&next, &observed, world.now);
            prop_assert!(
                more.iter()
                    .all(|a| !matches!(a, Action::Launch { .. } | Action::Route { .. })),
                "repeated step launched or routed again: {more:?}"
            );
            // The first call went as far as the observation allows.
            prop_assert!(more.is_empty(), "repeated step decided more: {more:?}");
            next = again;
            actions.extend(more);
        }
        journal = next;

        let set: Vec<&BTreeMap<u32, u32>> = actions
            .iter()
            .filter_map(|a| match a {
                Action::SetWeights { weights } => Some(weights),
                _ => None,
            })
            .collect();
        for weights in &set {
            // Weights always sum to 100, and name only the two releases.
            prop_assert_eq!(weights.values().sum::<u32>(), 100, "{:?}", weights);
            prop_assert!(weights.keys().all(|r| *r == from || *r == to));
        }
        let abort_now = actions.iter().any(|a| {
            matches!(a, Action::MarkRelease { release, status }
                if *release == to && matches!(status, ReleaseStatus::Failed | ReleaseStatus::RolledBack))
        });
        if abort_now {
            // An abort is one switch back to 100 % stable, in the same batch.
            prop_assert!(!aborted, "aborted twice");
            prop_assert_eq!(
                set.len(),
                1,
                "abort with {} weight changes: {:?}",
                set.len(),
                actions
            );
            prop_assert_eq!(set[0], &BTreeMap::from([(from, 100), (to, 0)]));
            aborted = true;
        } else if aborted {
            prop_assert!(
                set.is_empty(),
                "weights changed after the abort: {actions:?}"
            );
        }
        for weights in set.iter().filter(|_| !abort_now) {
            let w = weights.get(&to).copied().unwrap_or(0);
            // A gated raise: more traffic than the step before, once `to` already had its
            // first step (blue/green has only the switch, which is gated).
            let first_step = matches!(
                before.progressive.as_ref().map(|p| &p.stage),
                Some(Stage::BringUp { .. })
            ) && sc.spec.rollout.strategy == crate::model::Strategy::Canary;
            if w > to_weight
                && !first_step
                && let Some(rules) = &rules
            {
                let last = journal
                    .progressive
                    .as_ref()
                    .and_then(|p| p.analysis.as_ref())
                    .and_then(|a| a.last.clone());
                let Some(m) = last else {
                    return Err(TestCaseError::fail(format!(
                        "v2 raised to {w}% with no verdict at all"
                    )));
                };
                prop_assert_eq!(
                    &m.verdict,
                    &Verdict::Pass,
                    "raised to {}% without a pass",
                    w
                );
                // Taken after the split it lifts was set: a verdict from the split's own
                // millisecond was judged before it, on the split before.
                prop_assert!(
                    m.at_ms > weights_at.unwrap_or(0),
                    "the pass predates the split"
                );
                // The pass is real: the window judged is the one fed then, and it passes.
                let window = m.window.expect("a pass judged a window");
                prop_assert_eq!(fed.get(&m.at_ms).copied().flatten(), Some(window));
                prop_assert_eq!(judge(&window, rules), Verdict::Pass);
            }
            to_weight = w;
            max_to_weight = max_to_weight.max(w);
            weights_at = Some(world.now);
        }
        // New instances are routed only once a split keeps requests off them: one set
        // before, or earlier in the same batch.
        let first_split = actions
            .iter()
            .position(|a| matches!(a, Action::SetWeights { .. }));
        for (n, a) in actions.iter().enumerate() {
            if let Action::Route { id } = a {
                let split_before = !world.weights.is_empty() || first_split.is_some_and(|f| f < n);
                prop_assert!(split_before, "routed {id} before any split");
            }
        }
        // The stable release keeps every instance until the rollout is over.
        let v1_retired = actions
            .iter()
            .any(|a| matches!(a, Action::Retire { id } if id.starts_with("v1-")));
        prop_assert!(
            !v1_retired || journal.phase == Phase::Succeeded,
            "retired a v1 instance before success: {actions:?}"
        );
        world.apply(&actions);
        if !journal.phase.is_done() {
            prop_assert_eq!(v1_capacity(&world), v1_serving, "v1 lost capacity");
        }
        if journal.phase.is_done() {
            break;
        }
        world.advance(sc.ticks[k % sc.ticks.len()]);
    }
    match &journal.phase {
        Phase::Succeeded => {
            prop_assert_eq!(world.stable, Some(to));
            prop_assert_eq!(world.weights.get(&to), Some(&100));
            prop_assert_eq!(world.live(Some(from)), 0, "v1 is retired");
            prop_assert!(world.marks.contains(&(from, ReleaseStatus::Retired)));
        }
        Phase::Failed { reverted, .. } => {
            prop_assert!(*reverted);
            prop_assert!(aborted);
            prop_assert_eq!(world.stable, Some(from));
            prop_assert_eq!(world.weights.get(&from), Some(&100));
            prop_assert_eq!(world.live(Some(to)), 0, "every v2 instance is retired");
        }
        Phase::Rolling => prop_assert!(!aborted, "an abort that never finished"),
        Phase::Reverting { .. } => prop_assert!(false, "a canary never reverts step by step"),
    }
    Ok(Run {
        journal,
        world,
        max_to_weight,
    })
}

/// Routed, healthy v1 instances not being retired.
fn v1_capacity(world: &World) -> u32 {
    let n = world
        .instances
        .iter()
        .filter(|i| i.obs.release == 1 && i.obs.routable && !i.obs.retiring)
        .filter(|i| matches!(i.obs.health, InstanceHealth::Healthy { .. }))
        .count();
    count(n)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    /// Weights sum to 100; a raise needs a real passing verdict; an abort is one switch back;
    /// the stable release keeps its instances; every end is clean.
    #[test]
    fn canary_and_blue_green_invariants(sc in scenario(
        prop_oneof![4 => Just(Traffic::Good), 1 => Just(Traffic::Bad),
                    1 => Just(Traffic::Sparse), 1 => Just(Traffic::NoData)].boxed(),
        false,
    )) {
        run(&sc)?;
    }

    /// A release that never gets enough traffic to judge is never promoted past its first
    /// step (blue/green: never switched to), whatever the operator does short of removing
    /// the analysis.
    #[test]
    fn inconclusive_analysis_never_promotes(sc in scenario(
        prop_oneof![Just(Traffic::Sparse), Just(Traffic::NoData)].boxed(),
        true,
    )) {
        let Run { journal, world, max_to_weight } = run(&sc)?;
        prop_assert_ne!(&journal.phase, &Phase::Succeeded);
        prop_assert_ne!(world.stable, Some(2));
        let first = match sc.spec.rollout.strategy {
            crate::model::Strategy::Canary => u32::from(sc.spec.rollout.steps[0].weight),
            _ => 0,
        };
        prop_assert!(max_to_weight <= first, "v2 got {}% (first step {})", max_to_weight, first);
        let passes = journal.progressive.as_ref()
            .and_then(|p| p.analysis.as_ref()).map_or(0, |a| a.totals[0]);
        prop_assert_eq!(passes, 0);
    }
}
