use std::collections::BTreeMap;

use expect_test::expect;

use super::sim::{Fate, S, T0, World, transcript};
use super::*;
use crate::Digest;
use crate::model::{Rollout, Strategy};

/// A service of `instances` rolled `max_parallel` at a time, with Nomad's default timings.
pub(super) fn spec(instances: u32, max_parallel: u32) -> ServiceSpec {
    ServiceSpec {
        name: "web".into(),
        image: "web".into(),
        image_digest: Digest::of(b"web"),
        instances,
        port: 8080,
        env: BTreeMap::new(),
        health: None,
        rollout: Rollout {
            strategy: Strategy::Rolling,
            steps: Vec::new(),
            analysis: None,
            auto_rollback: true,
            auto_promote: false,
            scale_down_delay: Duration::from_secs(300),
            progress_deadline: Duration::from_secs(600),
            max_parallel,
            min_healthy_time: Duration::from_secs(10),
            healthy_deadline: Duration::from_secs(300),
            canary_instances: None,
            preview_listen: None,
        },
        notify: Vec::new(),
    }
}

fn journal(from: Option<u32>, to: u32, spec: &ServiceSpec) -> Journal {
    start("d1", "web", from, to, spec, T0)
}

#[test]
fn first_deploy_from_nothing() {
    let mut world = World::new(1, 0, 0);
    let (j, text) = transcript(journal(None, 1, &spec(2, 1)), &mut world, S);
    assert_eq!(j.phase, Phase::Succeeded);
    assert_eq!(world.stable, Some(1));
    // Nothing served before, so the floor is 0 and nothing waits for capacity.
    assert_eq!(j.floor, Some(0));
    expect![[r#"
        0s    launch v1-1
        13s   route v1-1
        14s   launch v1-2
        27s   route v1-2
        28s   stable v1, v1 active
    "#]]
    .assert_eq(&text);
}

#[test]
fn v1_to_v2_three_instances_one_at_a_time() {
    // New instances turn healthy 3s after they start and count after 10s more; the engine
    // observes every second and a retired instance takes 2s to drain.
    let mut world = World::new(1, 3, 0);
    let (j, text) = transcript(journal(Some(1), 2, &spec(3, 1)), &mut world, S);
    assert_eq!(j.phase, Phase::Succeeded);
    assert_eq!(
        world.marks,
        [(2, ReleaseStatus::Active), (1, ReleaseStatus::Retired)]
    );
    expect![[r#"
        0s    launch v2-1
        13s   route v2-1
        14s   retire v1-1, launch v2-2
        27s   route v2-2
        28s   retire v1-2, launch v2-3
        41s   route v2-3
        42s   retire v1-3, stable v2, v2 active, v1 retired
    "#]]
    .assert_eq(&text);
    let log: Vec<String> = j
        .log
        .iter()
        .map(|e| format!("{:<4} {}", format!("{}s", (e.at_ms - T0) / S), e.message))
        .collect();
    expect![[r#"
        0s   roll web from v1 to v2: 3 instances, 1 at a time
        0s   3 instances serve; routed capacity stays at or above 3
        0s   launch a v2 instance (1 of 3)
        13s  route v2-1: healthy for 10s
        14s  retire v1-1: replaced by v2; 3 instances still serve
        14s  launch a v2 instance (2 of 3)
        27s  route v2-2: healthy for 10s
        28s  retire v1-2: replaced by v2; 3 instances still serve
        28s  launch a v2 instance (3 of 3)
        41s  route v2-3: healthy for 10s
        42s  retire v1-3: replaced by v2; 3 instances still serve
        42s  succeeded: 3 v2 instances serve"#]]
    .assert_eq(&log.join("\n"));
}

#[test]
fn two_at_a_time_keeps_two_extra_at_most() {
    let mut world = World::new(1, 4, 0);
    let (j, text) = transcript(journal(Some(1), 2, &spec(4, 2)), &mut world, S);
    assert_eq!(j.phase, Phase::Succeeded);
    expect![[r#"
        0s    launch v2-1, launch v2-2
        13s   route v2-1, route v2-2
        14s   retire v1-1, retire v1-2, launch v2-3, launch v2-4
        27s   route v2-3, route v2-4
        28s   retire v1-3, retire v1-4, stable v2, v2 active, v1 retired
    "#]]
    .assert_eq(&text);
}

#[test]
fn a_service_short_of_instances_does_not_wait_for_capacity_it_never_had() {
    // Two of three v1 instances serve and one never came up: the floor is 2, and the idle one
    // goes at once since it serves nobody.
    let mut world = World::new(1, 2, 1);
    let (j, text) = transcript(journal(Some(1), 2, &spec(3, 1)), &mut world, S);
    assert_eq!((j.floor, &j.phase), (Some(2), &Phase::Succeeded));
    expect![[r#"
        0s    retire v1-3, launch v2-1
        13s   route v2-1
        14s   retire v1-1, launch v2-2
        27s   route v2-2
        28s   retire v1-2, launch v2-3
        41s   route v2-3
        42s   stable v2, v2 active, v1 retired
    "#]]
    .assert_eq(&text);
}

#[test]
fn healthy_deadline_reverts() {
    let mut spec = spec(2, 1);
    spec.rollout.healthy_deadline = Duration::from_secs(30);
    let mut world = World::new(1, 2, 0);
    world.fates = [Fate::Healthy(3 * S), Fate::Never].into();
    let (j, text) = transcript(journal(Some(1), 2, &spec), &mut world, S);
    assert_eq!(
        j.phase,
        Phase::Failed {
            reason: "v2 instance v2-2 was not healthy within 30s".into(),
            reverted: true
        }
    );
    assert_eq!(world.stable, Some(1));
    assert_eq!(world.marks, [(2, ReleaseStatus::Failed)]);
    expect![[r#"
        0s    launch v2-1
        13s   route v2-1
        14s   retire v1-1, launch v2-2
        44s   retire v2-2, launch v1-3
        57s   route v1-3
        58s   retire v2-1, stable v1, v2 failed
    "#]]
    .assert_eq(&text);
}

#[test]
fn progress_deadline_fails_the_rollout() {
    let mut spec = spec(3, 1);
    spec.rollout.progress_deadline = Duration::from_secs(30);
    let mut world = World::new(1, 3, 0);
    world.default = Fate::Healthy(5 * S);
    let (j, text) = transcript(journal(Some(1), 2, &spec), &mut world, S);
    assert_eq!(
        j.phase,
        Phase::Failed {
            reason: "the rollout did not finish within 30s: 1 of 3 v2 instances serve".into(),
            reverted: true
        }
    );
    expect![[r#"
        0s    launch v2-1
        15s   route v2-1
        16s   retire v1-1, launch v2-2
        30s   retire v2-2, launch v1-4
        45s   route v1-4
        46s   retire v2-1, stable v1, v2 failed
    "#]]
    .assert_eq(&text);
}

#[test]
fn a_new_instance_that_exits_fails_the_rollout() {
    let mut world = World::new(1, 2, 0);
    world.fates = [Fate::Exit(2 * S)].into();
    let (j, text) = transcript(journal(Some(1), 2, &spec(2, 1)), &mut world, S);
    assert!(
        matches!(&j.phase, Phase::Failed { reason, reverted: true } if reason == "v2 instance v2-1 exited")
    );
    expect![[r#"
        0s    launch v2-1
        2s    retire v2-1, stable v1, v2 failed
    "#]]
    .assert_eq(&text);
}

#[test]
fn without_auto_revert_the_rollout_stops_where_it_stands() {
    let mut spec = spec(3, 1);
    spec.rollout.auto_rollback = false;
    spec.rollout.healthy_deadline = Duration::from_secs(20);
    let mut world = World::new(1, 3, 0);
    world.fates = [Fate::Healthy(S), Fate::Never].into();
    let (j, text) = transcript(journal(Some(1), 2, &spec), &mut world, S);
    assert!(matches!(
        j.phase,
        Phase::Failed {
            reverted: false,
            ..
        }
    ));
    // v2-1 serves and stays; v2-2 never did and goes; two v1 instances still serve.
    assert_eq!((world.live(Some(2)), world.live(Some(1))), (1, 2));
    assert_eq!(world.stable, Some(1), "the stable release does not change");
    expect![[r#"
        0s    launch v2-1
        11s   route v2-1
        12s   retire v1-1, launch v2-2
        32s   v2 failed, retire v2-2
    "#]]
    .assert_eq(&text);
}

#[test]
fn a_revert_that_cannot_finish_gives_up_at_its_own_deadline() {
    let mut spec = spec(2, 1);
    spec.rollout.healthy_deadline = Duration::from_secs(10);
    spec.rollout.progress_deadline = Duration::from_secs(30);
    // v2-1 serves and v1-1 is retired for it, then v2-1 exits; no instance launched after it
    // ever turns healthy, so v1 cannot get back to two instances.
    let mut world = World::new(1, 2, 0);
    world.fates = [Fate::Flap(S, 15 * S, true)].into();
    world.default = Fate::Never;
    let (j, text) = transcript(journal(Some(1), 2, &spec), &mut world, S);
    assert_eq!(
        j.phase,
        Phase::Failed {
            reason: "v2 instance v2-1 exited; the revert to v1 did not finish within 30s".into(),
            reverted: false
        }
    );
    expect![[r#"
        0s    launch v2-1
        11s   route v2-1
        12s   retire v1-1, launch v2-2
        16s   retire v2-1, retire v2-2, launch v1-3
        26s   retire v1-3, launch v1-4
        36s   retire v1-4, launch v1-5
        46s   v2 failed
    "#]]
    .assert_eq(&text);
}

#[test]
fn the_same_observation_twice_launches_nothing_twice() {
    let world = World::new(1, 3, 0);
    let j = journal(Some(1), 2, &spec(3, 2));
    let (j, first) = step(&j, &world.observe(), T0);
    assert_eq!(
        first,
        [Action::Launch { release: 2 }, Action::Launch { release: 2 }]
    );
    let (j, again) = step(&j, &world.observe(), T0 + S);
    assert_eq!(again, []);
    // After a restart the launches may never have happened: they are decided again.
    let (_, resumed) = step(&resume(&j, T0 + 2 * S), &world.observe(), T0 + 2 * S);
    assert_eq!(resumed, first);
}

#[test]
fn a_launch_that_never_appears_fails_at_the_healthy_deadline() {
    let world = World::new(1, 1, 0);
    let j = journal(Some(1), 2, &spec(1, 1));
    let (j, _) = step(&j, &world.observe(), T0);
    let (j, _) = step(&j, &world.observe(), T0 + 299 * S);
    assert_eq!(j.phase, Phase::Rolling);
    let (j, _) = step(&j, &world.observe(), T0 + 300 * S);
    // v1-1 still serves, so the revert is over as soon as it starts.
    assert!(matches!(&j.phase, Phase::Failed { reason, reverted: true }
        if reason == "a v2 instance did not appear within 5m of its launch"));
}

#[test]
fn a_finished_rollout_does_nothing_more() {
    let mut world = World::new(1, 0, 0);
    let (j, _) = transcript(journal(None, 1, &spec(1, 1)), &mut world, S);
    let (again, actions) = step(&j, &world.observe(), world.now + 3_600 * S);
    assert_eq!((again, actions), (j, vec![]));
}

#[test]
fn journal_round_trips_through_json() {
    let mut world = World::new(1, 2, 0);
    world.fates = [Fate::Never].into();
    let j = journal(Some(1), 2, &spec(2, 1));
    let (j, _) = step(&j, &world.observe(), T0);
    let text = serde_json::to_string(&j).unwrap();
    assert_eq!(serde_json::from_str::<Journal>(&text).unwrap(), j);
    let reverting = Journal {
        phase: Phase::Reverting {
            reason: "r".into(),
            since_ms: T0,
        },
        ..j
    };
    expect![[r#"{"kind":"reverting","reason":"r","since_ms":1700000000000}"#]]
        .assert_eq(&serde_json::to_string(&reverting.phase).unwrap());
}

// --- heal --------------------------------------------------------------------------------

fn backoff() -> Backoff {
    Backoff::new(HealSettings::for_spec(&spec(1, 1)))
}

/// Heals `world` every `tick` until `until` and writes the actions taken, as `transcript`.
fn heal_transcript(world: &mut World, target: u32, tick: u64, until: u64) -> (Backoff, String) {
    let mut b = backoff();
    let mut out = String::new();
    while world.now < until {
        let (next, actions) = heal(1, target, &world.observe(), &b, world.now);
        b = next;
        if !actions.is_empty() {
            let lines = world.apply(&actions);
            let ms = world.now - T0;
            let at = format!("{}.{}s", ms / S, ms % S / 100);
            let _ = writeln!(out, "{at:<6} {}", lines.join(", "));
        }
        world.advance(tick);
    }
    (b, out)
}

use std::fmt::Write as _;

#[test]
fn heal_replaces_a_crash_loop_with_growing_delays() {
    // Every replacement exits half a second after it starts.
    let mut world = World::new(1, 1, 0);
    world.default = Fate::Exit(S / 2);
    world.instances[0].obs.health = InstanceHealth::Exited;
    let (b, text) = heal_transcript(&mut world, 1, S / 10, T0 + 20 * S);
    assert_eq!(b.streak, 6);
    expect![[r#"
        0.0s   retire v1-1, launch v1-2
        0.5s   retire v1-2
        1.5s   launch v1-3
        2.0s   retire v1-3
        4.0s   launch v1-4
        4.5s   retire v1-4
        8.5s   launch v1-5
        9.0s   retire v1-5
        17.0s  launch v1-6
        17.5s  retire v1-6
    "#]]
    .assert_eq(&text);
}

#[test]
fn heal_backoff_resets_after_a_stable_period() {
    let mut b = backoff();
    b.streak = 5;
    b.last_failure_ms = Some(T0);
    b.not_before_ms = T0 + 16 * S;
    let mut world = World::new(1, 1, 0);
    world.now = T0 + STABLE_PERIOD_MS;
    world.instances[0].obs.health = InstanceHealth::Exited;
    let (b, actions) = heal(1, 1, &world.observe(), &b, world.now);
    assert_eq!(b.streak, 1, "a new streak");
    assert_eq!(
        actions,
        [
            Action::Retire { id: "v1-1".into() },
            Action::Launch { release: 1 }
        ]
    );
}

#[test]
fn heal_waits_out_the_grace_of_an_unhealthy_instance() {
    let mut world = World::new(1, 2, 0);
    world.instances[0].obs.health = InstanceHealth::Unhealthy { since_ms: T0 };
    let b = backoff();
    let (_, actions) = heal(1, 2, &world.observe(), &b, T0 + 9 * S);
    assert_eq!(actions, []);
    let (_, actions) = heal(1, 2, &world.observe(), &b, T0 + 10 * S);
    assert_eq!(
        actions,
        [
            Action::Retire { id: "v1-1".into() },
            Action::Launch { release: 1 }
        ]
    );
}

#[test]
fn heal_scales_up_and_routes_when_ready() {
    let mut world = World::new(1, 1, 0);
    let (_, text) = heal_transcript(&mut world, 3, S, T0 + 20 * S);
    expect![[r#"
        0.0s   launch v1-2, launch v1-3
        13.0s  route v1-2, route v1-3
    "#]]
    .assert_eq(&text);
}

#[test]
fn heal_scales_down_newest_first_and_leaves_other_releases_alone() {
    let mut world = World::new(1, 4, 0);
    // A warm instance of the previous release, and one of v1 still starting.
    world.apply(&[Action::Launch { release: 0 }, Action::Launch { release: 1 }]);
    let (_, actions) = heal(1, 2, &world.observe(), &backoff(), world.now);
    assert_eq!(
        actions,
        [
            Action::Retire { id: "v1-5".into() },
            Action::Retire { id: "v1-4".into() },
            Action::Retire { id: "v1-3".into() },
        ]
    );
}

#[test]
fn heal_replaces_an_instance_that_never_turns_healthy() {
    let mut world = World::new(1, 0, 0);
    world.apply(&[Action::Launch { release: 1 }]);
    let b = backoff();
    let (b, actions) = heal(1, 1, &world.observe(), &b, T0 + 299 * S);
    assert_eq!(actions, []);
    let (_, actions) = heal(1, 1, &world.observe(), &b, T0 + 300 * S);
    assert_eq!(
        actions,
        [
            Action::Retire { id: "v1-1".into() },
            Action::Launch { release: 1 }
        ]
    );
}

#[test]
fn heal_replaces_condemned_instances_before_retiring_them() {
    // Two serving instances; v1-1 drifted. Its replacement is launched at once, and it is
    // retired only once the replacement is routed, so two instances serve throughout.
    let mut world = World::new(1, 2, 0);
    world.instances[0].obs.condemned = true;
    let mut b = backoff();
    let mut out = String::new();
    while world.now < T0 + 20 * S {
        let routed = world.capacity();
        assert!(
            routed >= 2,
            "capacity dropped to {routed} at {}",
            world.now - T0
        );
        let (next, actions) = heal(1, 2, &world.observe(), &b, world.now);
        b = next;
        if !actions.is_empty() {
            let lines = world.apply(&actions);
            let _ = writeln!(out, "{:<4} {}", (world.now - T0) / S, lines.join(", "));
        }
        world.advance(S);
    }
    expect![[r#"
        0    launch v1-3
        13   route v1-3
        14   retire v1-1
    "#]]
    .assert_eq(&out);
}
