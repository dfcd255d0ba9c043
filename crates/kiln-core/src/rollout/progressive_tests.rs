//! Transcripts of canary and blue/green rollouts in the simulated world: v1 has three healthy
//! routed instances, new instances turn healthy 3 s after they start and count after 10 s,
//! the engine observes every second.

use expect_test::expect;

use super::progressive_sim::{
    Traffic, analysis, blue_green_spec, canary_spec, drive, log, samples,
};
use super::sim::{Fate, S, T0, World};
use super::*;

fn good(_: usize, _: u64) -> (Traffic, Option<Command>) {
    (Traffic::Good, None)
}

#[test]
fn canary_walks_its_steps_then_promotes_and_keeps_v1_warm() {
    let mut spec = canary_spec(3, &[(10, Some(30)), (50, Some(30))]);
    spec.rollout.canary_instances = Some(1);
    let mut world = World::new(1, 3, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    let (j, text) = drive(j, &mut world, S, 1_000, &good);
    assert_eq!(j.phase, Phase::Succeeded);
    assert_eq!(world.stable, Some(2));
    assert_eq!(
        world.marks,
        [
            (2, ReleaseStatus::Active),
            (1, ReleaseStatus::Warm),
            (1, ReleaseStatus::Retired)
        ]
    );
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1
        13s   route v2-1
        14s   weights v1=90 v2=10
        44s   weights v1=50 v2=50
        74s   launch v2-2, launch v2-3
        87s   route v2-2, route v2-3
        88s   weights v1=0 v2=100, stable v2, v2 active, v1 warm
        148s  retire v1-1, retire v1-2, retire v1-3, v1 retired
    "#]]
    .assert_eq(&text);
    expect![[r#"
        0s   canary web from v1 to v2: 1 v2 instance beside v1; 10% for 30s, 50% for 30s, then 100% on 3; no analysis
        0s   traffic: v1 100%, v2 0%
        0s   launch a v2 instance (1 of 1)
        13s  route v2-1: healthy for 10s
        14s  traffic: v1 90%, v2 10%
        14s  step 1 of 2: 10% of requests to v2; hold for 30s
        44s  traffic: v1 50%, v2 50%
        44s  step 2 of 2: 50% of requests to v2; hold for 30s
        74s  step 2 of 2 passed; scaling v2 to 3 instances
        74s  launch a v2 instance (2 of 3)
        74s  launch a v2 instance (3 of 3)
        87s  route v2-2: healthy for 10s
        87s  route v2-3: healthy for 10s
        88s  traffic: v1 0%, v2 100%
        88s  promoted: v2 takes every request; v1 stays warm for 1m
        148s retire v1-1: v1 no longer needed warm
        148s retire v1-2: v1 no longer needed warm
        148s retire v1-3: v1 no longer needed warm
        148s succeeded: v2 serves; v1 retired"#]]
    .assert_eq(&log(&j));
}

#[test]
fn canary_with_analysis_records_every_verdict_and_waits_for_a_pass() {
    let mut spec = canary_spec(2, &[(20, Some(10))]);
    spec.rollout.analysis = Some(analysis(5, 0, 2));
    spec.rollout.scale_down_delay = Duration::ZERO;
    let mut world = World::new(1, 2, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    // The first two windows have too few requests; from then on the canary does well.
    let script = |_: usize, t: u64| {
        let traffic = if t < 25 * S {
            Traffic::Sparse
        } else {
            Traffic::Good
        };
        (traffic, None)
    };
    let (j, text) = drive(j, &mut world, S, 1_000, &script);
    assert_eq!(j.phase, Phase::Succeeded);
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1, launch v2-2
        13s   route v2-1, route v2-2
        14s   weights v1=80 v2=20
        29s   weights v1=0 v2=100, stable v2, v2 active, v1 warm, retire v1-1, retire v1-2, v1 retired
    "#]]
    .assert_eq(&text);
    let verdicts: Vec<&str> = j
        .log
        .iter()
        .filter(|e| e.message.starts_with("analysis"))
        .map(|e| e.message.as_str())
        .collect();
    // The step began at 14 s and its 10 s were over at 24 s, but the first pass came only
    // with the window judged at 29 s.
    expect![[r#"
        analysis: inconclusive: 3 requests to the release, fewer than min_requests 50 (3 requests, 0 errors, p99 90ms, stable 5000 requests, 5 errors)
        analysis: inconclusive: 3 requests to the release, fewer than min_requests 50 (3 requests, 0 errors, p99 90ms, stable 5000 requests, 5 errors)
        analysis: pass (1000 requests, 0 errors, p99 90ms, stable 5000 requests, 5 errors)"#]]
    .assert_eq(&verdicts.join("\n"));
}

#[test]
fn failing_analysis_aborts_with_one_switch_back_to_stable() {
    let mut spec = canary_spec(2, &[(10, Some(30)), (50, Some(30)), (80, Some(30))]);
    spec.rollout.analysis = Some(analysis(5, 1, 0));
    let mut world = World::new(1, 2, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    // Good through the first step, bad from 50 s on, during the 50 % step: the first failure
    // (54 s) is within failure_limit 1, the second (59 s) aborts.
    let script = |_: usize, t: u64| {
        let traffic = if t < 50 * S {
            Traffic::Good
        } else {
            Traffic::Bad
        };
        (traffic, None)
    };
    let (j, text) = drive(j, &mut world, S, 1_000, &script);
    assert!(
        matches!(&j.phase, Phase::Failed { reverted: true, reason } if reason.starts_with("analysis failed 2 times")),
        "{:?}",
        j.phase
    );
    assert_eq!(world.stable, Some(1));
    assert_eq!(world.weights, BTreeMap::from([(1, 100), (2, 0)]));
    assert_eq!(world.live(Some(2)), 0);
    assert_eq!(world.live(Some(1)), 2, "v1 never lost an instance");
    // From 50 % straight back to 0 %, not through 10 %.
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1, launch v2-2
        13s   route v2-1, route v2-2
        14s   weights v1=90 v2=10
        44s   weights v1=50 v2=50
        59s   weights v1=100 v2=0, v2 failed, retire v2-1, retire v2-2
    "#]]
    .assert_eq(&text);
    let tail: Vec<String> = log(&j).lines().rev().take(6).map(str::to_owned).collect();
    expect![[r#"
        59s  failed: analysis failed 2 times in a row (failure_limit 1): fail: error rate 20% above 5%; every request goes to v1
        59s  retire v2-2: v2 aborted
        59s  retire v2-1: v2 aborted
        59s  traffic: v1 100%, v2 0%
        59s  aborting: analysis failed 2 times in a row (failure_limit 1): fail: error rate 20% above 5%
        59s  analysis: fail: error rate 20% above 5% (1000 requests, 200 errors, p99 90ms, stable 5000 requests, 5 errors)"#]]
    .assert_eq(&tail.join("\n"));
}

#[test]
fn a_step_without_pause_waits_for_promote_and_inconclusive_pauses() {
    let mut spec = canary_spec(1, &[(10, None)]);
    spec.rollout.analysis = Some(analysis(5, 0, 1));
    spec.rollout.scale_down_delay = Duration::ZERO;
    let mut world = World::new(1, 1, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    // No traffic at all for ten minutes, with a promote after one (which resumes the pause,
    // until the analysis pauses it again): nothing promotes.
    let script = |_: usize, t: u64| {
        let cmd = (t == 60 * S).then_some(Command::Promote);
        (Traffic::NoData, cmd)
    };
    let (j, _) = drive(j, &mut world, S, 600, &script);
    assert_eq!(j.phase, Phase::Rolling);
    assert_eq!(
        world.weights.get(&2),
        Some(&10),
        "v2 still at its first step"
    );
    let p = j.progressive.as_ref().unwrap();
    assert!(p.approved, "the promote is remembered");
    assert!(
        p.paused
            .as_ref()
            .is_some_and(|x| x.reason.starts_with("analysis inconclusive 2 times"))
    );
    // Traffic comes, the operator resumes: the next pass promotes.
    let script = |k: usize, _: u64| (Traffic::Good, (k == 0).then_some(Command::Resume));
    world.command = None;
    let mut j = j;
    j.progressive.as_mut().unwrap().last_command = 0;
    let (j, _) = drive(j, &mut world, S, 100, &script);
    assert_eq!(j.phase, Phase::Succeeded);
    let text = log(&j);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("analysis: inconclusive"))
        .skip(4)
        .collect();
    expect![[r#"
        14s  traffic: v1 90%, v2 10%
        14s  step 1 of 1: 10% of requests to v2; hold until promoted and analysis passes
        24s  paused: analysis inconclusive 2 times in a row (inconclusive_limit 1): inconclusive: no samples reported for the window
        60s  resumed by a promote after 36s
        60s  promote requested (once analysis passes)
        69s  paused: analysis inconclusive 2 times in a row (inconclusive_limit 1): inconclusive: no samples reported for the window
        600s resumed by an operator after 8m 51s
        604s analysis: pass (1000 requests, 0 errors, p99 90ms, stable 5000 requests, 5 errors)
        604s step 1 of 1 passed; scaling v2 to 1 instances
        604s traffic: v1 0%, v2 100%
        604s promoted: v2 takes every request; v1 stays warm for 0s
        604s retire v1-1: v1 no longer needed warm
        604s succeeded: v2 serves; v1 retired"#]]
    .assert_eq(&lines.join("\n"));
}

#[test]
fn blue_green_switches_once_on_promote() {
    let spec = blue_green_spec(2, false);
    let mut world = World::new(1, 2, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    let script = |_: usize, t: u64| (Traffic::Good, (t == 30 * S).then_some(Command::Promote));
    let (j, text) = drive(j, &mut world, S, 1_000, &script);
    assert_eq!(j.phase, Phase::Succeeded);
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1, launch v2-2
        13s   route v2-1, route v2-2
        30s   weights v1=0 v2=100, stable v2, v2 active, v1 warm
        90s   retire v1-1, retire v1-2, v1 retired
    "#]]
    .assert_eq(&text);
}

#[test]
fn blue_green_auto_promotes_after_a_passing_preview_analysis() {
    let mut spec = blue_green_spec(2, true);
    spec.rollout.analysis = Some(analysis(5, 0, 3));
    let mut world = World::new(1, 2, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    let (j, text) = drive(j, &mut world, S, 1_000, &good);
    assert_eq!(j.phase, Phase::Succeeded);
    // Ready at 14 s; the first window is judged 5 s later, then one switch.
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1, launch v2-2
        13s   route v2-1, route v2-2
        19s   weights v1=0 v2=100, stable v2, v2 active, v1 warm
        79s   retire v1-1, retire v1-2, v1 retired
    "#]]
    .assert_eq(&text);
    assert!(
        log(&j)
            .lines()
            .any(|l| l == "14s  2 v2 instances ready; promoted once analysis passes")
    );
}

#[test]
fn an_operator_abort_marks_the_release_rolled_back() {
    let spec = blue_green_spec(2, false);
    let mut world = World::new(1, 2, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    let script = |_: usize, t: u64| (Traffic::Good, (t == 20 * S).then_some(Command::Abort));
    let (j, text) = drive(j, &mut world, S, 1_000, &script);
    assert_eq!(
        j.phase,
        Phase::Failed {
            reason: "aborted by an operator".into(),
            reverted: true
        }
    );
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1, launch v2-2
        13s   route v2-1, route v2-2
        20s   weights v1=100 v2=0, v2 rolledback, retire v2-1, retire v2-2
    "#]]
    .assert_eq(&text);
}

#[test]
fn an_abort_while_v1_is_warm_is_an_instant_rollback() {
    let spec = blue_green_spec(2, true);
    let mut world = World::new(1, 2, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    let script = |_: usize, t: u64| (Traffic::Good, (t == 40 * S).then_some(Command::Abort));
    let (j, text) = drive(j, &mut world, S, 1_000, &script);
    assert!(matches!(j.phase, Phase::Failed { reverted: true, .. }));
    assert_eq!(world.stable, Some(1));
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1, launch v2-2
        13s   route v2-1, route v2-2
        14s   weights v1=0 v2=100, stable v2, v2 active, v1 warm
        40s   weights v1=100 v2=0, stable v1, v1 active, v2 rolledback, retire v2-1, retire v2-2
    "#]]
    .assert_eq(&text);
}

#[test]
fn a_canary_instance_that_exits_aborts_and_a_late_launch_is_retired_too() {
    let mut spec = canary_spec(3, &[(10, Some(30))]);
    spec.rollout.canary_instances = Some(2);
    let mut world = World::new(1, 3, 0);
    world.fates = [Fate::Exit(5 * S)].into();
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    let (j, text) = drive(j, &mut world, S, 1_000, &good);
    assert_eq!(
        j.phase,
        Phase::Failed {
            reason: "v2 instance v2-1 exited".into(),
            reverted: true
        }
    );
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1, launch v2-2
        5s    weights v1=100 v2=0, v2 failed, retire v2-1, retire v2-2
    "#]]
    .assert_eq(&text);

    // A launch issued just before the abort that the observation does not show yet: the
    // rollout waits for it to appear and retires it, so nothing runs unseen.
    let mut world = World::new(1, 3, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    let (j, actions) = step(&j, &world.observe(), world.now);
    assert_eq!(j.ledger.in_flight(2), 2);
    let abort = Observed {
        command: Some(OperatorCommand {
            seq: 1,
            command: Command::Abort,
        }),
        ..world.observe()
    };
    let (j, _) = step(&j, &abort, world.now);
    assert!(matches!(
        j.progressive.as_ref().unwrap().stage,
        Stage::Aborting { .. }
    ));
    assert_eq!(j.phase, Phase::Rolling);
    world.apply(&actions);
    let (j, late) = step(&j, &world.observe(), world.now);
    assert_eq!(
        late,
        [
            Action::Retire { id: "v2-1".into() },
            Action::Retire { id: "v2-2".into() }
        ]
    );
    assert!(matches!(j.phase, Phase::Failed { .. }));
}

#[test]
fn bring_up_past_the_progress_deadline_aborts() {
    let mut spec = blue_green_spec(2, true);
    spec.rollout.progress_deadline = Duration::from_secs(20);
    let mut world = World::new(1, 2, 0);
    world.default = Fate::Healthy(15 * S);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    let (j, text) = drive(j, &mut world, S, 1_000, &good);
    assert_eq!(
        j.phase,
        Phase::Failed {
            reason: "v2 was not up within the progress deadline of 20s".into(),
            reverted: true
        }
    );
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1, launch v2-2
        20s   weights v1=100 v2=0, v2 failed, retire v2-1, retire v2-2
    "#]]
    .assert_eq(&text);
}

#[test]
fn a_command_delivered_twice_is_taken_once() {
    let spec = canary_spec(1, &[(10, None), (20, None), (30, None)]);
    let mut world = World::new(1, 1, 0);
    let mut j = start("d1", "web", Some(1), 2, &spec, T0);
    for _ in 0..20 {
        let (next, actions) = step(&j, &world.observe(), world.now);
        world.apply(&actions);
        j = next;
        world.advance(S);
    }
    assert_eq!(world.weights.get(&2), Some(&10));
    // The engine redelivers the same promote on every tick until the journal shows it taken.
    world.command = Some(OperatorCommand {
        seq: 7,
        command: Command::Promote,
    });
    for _ in 0..5 {
        let (next, actions) = step(&j, &world.observe(), world.now);
        world.apply(&actions);
        j = next;
        world.advance(S);
    }
    assert_eq!(world.weights.get(&2), Some(&20), "one step, not three");
    assert_eq!(j.progressive.as_ref().unwrap().last_command, 7);
}

#[test]
fn pause_holds_the_step_timer_and_resume_continues_it() {
    let spec = canary_spec(1, &[(10, Some(30)), (60, Some(30))]);
    let mut world = World::new(1, 1, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    // Step 1 starts at 14 s; paused from 20 s to 120 s: its 30 s end at 144 s, not 44 s.
    let script = |_: usize, t: u64| {
        let cmd = match t / S {
            20 => Some(Command::Pause),
            120 => Some(Command::Resume),
            _ => None,
        };
        (Traffic::Good, cmd)
    };
    let (_, text) = drive(j, &mut world, S, 160, &script);
    expect![[r#"
        0s    weights v1=100 v2=0, launch v2-1
        13s   route v2-1
        14s   weights v1=90 v2=10
        144s  weights v1=40 v2=60
    "#]]
    .assert_eq(&text);
}

#[test]
fn a_first_deploy_rolls_out_whatever_the_strategy() {
    let spec = canary_spec(2, &[(10, Some(30))]);
    let j = start("d1", "web", None, 1, &spec, T0);
    assert!(j.progressive.is_none());
    assert_eq!(j.weights(), None);
}

#[test]
fn progressive_journal_round_trips_and_tells_the_engine_the_split() {
    let mut spec = canary_spec(2, &[(25, Some(30))]);
    spec.rollout.analysis = Some(analysis(5, 0, 0));
    let mut world = World::new(1, 2, 0);
    let j = start("d1", "web", Some(1), 2, &spec, T0);
    let (j, _) = drive(j, &mut world, S, 20, &good);
    assert_eq!(j.weights(), Some(&BTreeMap::from([(1, 75), (2, 25)])));
    let since = j.samples_since().unwrap();
    assert_eq!(
        samples(&j, Traffic::Good, world.now).map(|s| s.from_ms),
        Some(since)
    );
    let text = serde_json::to_string(&j).unwrap();
    assert_eq!(serde_json::from_str::<Journal>(&text).unwrap(), j);
    // A rolling journal has no split and no samples to report.
    let rolling = start("d1", "web", Some(1), 2, &tests::spec(2, 1), T0);
    assert_eq!((rolling.weights(), rolling.samples_since()), (None, None));
    assert!(
        !serde_json::to_string(&rolling)
            .unwrap()
            .contains("progressive")
    );
}

fn stage(j: &Journal) -> Stage {
    j.progressive.as_ref().unwrap().stage.clone()
}

#[test]
fn regression_the_pass_that_ends_one_step_does_not_also_pass_the_next() {
    // Two steps without pauses, gated by analysis every 8 s: each needs a pass of its own.
    // The pass judged at 22 s ends step 1, and step 2 begins in that same millisecond; it is
    // still step 1's verdict, not one taken during step 2. Counting it for step 2 skipped
    // step 2 on the very next call, even with the same observation fed again, which then
    // launched the scale-up a second `step` must never issue.
    let mut spec = canary_spec(2, &[(0, Some(0)), (0, Some(0))]);
    spec.rollout.canary_instances = Some(1);
    spec.rollout.analysis = Some(analysis(8, 0, 0));
    spec.rollout.scale_down_delay = Duration::ZERO;
    let mut world = World::new(1, 2, 0);
    let mut j = start("d1", "web", Some(1), 2, &spec, T0);
    let second = |j: &Journal| matches!(stage(j), Stage::Step { index: 1, .. });
    let mut repeated = None;
    for _ in 0..100 {
        world.samples = samples(&j, Traffic::Good, world.now);
        let observed = world.observe();
        let (next, actions) = step(&j, &observed, world.now);
        world.apply(&actions);
        let entered = second(&next) && !second(&j);
        j = next;
        if entered {
            repeated = Some(step(&j, &observed, world.now));
            break;
        }
        world.advance(S);
    }
    let (again, more) = repeated.expect("step 2 began");
    assert_eq!(more, [], "the same observation again decides nothing new");
    assert_eq!(stage(&again), stage(&j), "still in step 2");

    // Without a repeat too, step 2 holds until its own window is judged, 8 s after it began.
    let (j, text) = drive(again, &mut world, S, 1_000, &good);
    assert_eq!(j.phase, Phase::Succeeded);
    expect![[r#"
        30s   launch v2-2
        43s   route v2-2
        44s   weights v1=0 v2=100, stable v2, v2 active, v1 warm, retire v1-1, retire v1-2, v1 retired
    "#]]
    .assert_eq(&text);
    // Step 1 passes on the window judged at 22 s; step 2 on its own, judged at 30 s.
    let text = log(&j);
    let gates: Vec<&str> = text
        .lines()
        .filter(|l| l[5..].starts_with("analysis") || l[5..].starts_with("step"))
        .collect();
    expect![[r#"
        14s  step 1 of 2: 0% of requests to v2; hold for 0s and analysis passes
        22s  analysis: pass (1000 requests, 0 errors, p99 90ms, stable 5000 requests, 5 errors)
        22s  step 2 of 2: 0% of requests to v2; hold for 0s and analysis passes
        30s  analysis: pass (1000 requests, 0 errors, p99 90ms, stable 5000 requests, 5 errors)
        30s  step 2 of 2 passed; scaling v2 to 2 instances"#]]
    .assert_eq(&gates.join("\n"));
}

#[test]
fn regression_a_last_step_already_over_when_entered_scales_up_in_the_same_step() {
    // Step 1 waits for a promote; step 2 holds for 0 s, so it is over the moment the promote
    // enters it. It used to be passed only by the next call, which then launched the scale-up:
    // on the same observation fed again, that is a second `step` deciding launches the first
    // should have.
    let mut spec = canary_spec(3, &[(0, None), (0, Some(0))]);
    spec.rollout.canary_instances = Some(1);
    let mut world = World::new(1, 3, 0);
    let mut j = start("d1", "web", Some(1), 2, &spec, T0);
    for _ in 0..20 {
        let (next, actions) = step(&j, &world.observe(), world.now);
        world.apply(&actions);
        j = next;
        world.advance(S);
    }
    assert!(matches!(stage(&j), Stage::Step { index: 0, .. }));
    world.command = Some(OperatorCommand {
        seq: 1,
        command: Command::Promote,
    });
    let observed = world.observe();
    let (j, actions) = step(&j, &observed, world.now);
    assert_eq!(
        actions,
        [
            Action::SetWeights {
                weights: BTreeMap::from([(1, 100), (2, 0)])
            },
            Action::Launch { release: 2 },
            Action::Launch { release: 2 },
        ],
        "step 2 entered and passed, the scale-up launched, in one call"
    );
    assert!(matches!(stage(&j), Stage::ScaleUp { .. }));
    let (again, more) = step(&j, &observed, world.now);
    assert_eq!(more, [], "the same observation again decides nothing new");
    assert_eq!(again.ledger.in_flight(2), 2);
}
