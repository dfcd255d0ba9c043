//! Each built-in check with an input that passes and one that fails, on real kiln plans.

#![allow(clippy::unwrap_used, reason = "test helpers panic on broken fixtures")]

mod common;

use common::{World, digest, disabled, image, messages};
use kiln_core::model::{CanaryStep, Strategy};
use kiln_policy::{
    BUILTIN_CHECKS, BuiltinSettings, Kind, Level, Limits, Revocation, builtin_pack, evaluate,
};
use serde_json::json;

#[test]
fn a_good_release_passes_every_check() {
    let w = World::new();
    let d = w.check(&BuiltinSettings::default());
    assert_eq!(messages(&d), Vec::<String>::new());
    assert!(d.passed());
    assert_eq!(d.bundles[0].0, "builtin");
}

#[test]
fn the_input_masks_env_values_and_carries_the_context() {
    let input = World::new().input();
    assert_eq!(
        input["services"]["web"]["env"]["DATABASE_PASSWORD"],
        kiln_policy::mask_env_value("hunter2")
    );
    let after = &input["resource_changes"][1]["change"]["after"];
    assert_eq!(input["resource_changes"][1]["address"], "service.web");
    assert_eq!(
        after["env"]["DATABASE_PASSWORD"],
        kiln_policy::mask_env_value("hunter2")
    );
    assert!(!input.to_string().contains("hunter2"));
    assert_eq!(input["kiln"]["environment"]["protected"], true);
    assert_eq!(
        input["kiln"]["images"][digest("1a2b3c4d5e6f").to_string()]["labels"]["version"],
        "1.0.0"
    );
}

// image_from_store

#[test]
fn image_from_store_denies_an_image_kiln_does_not_hold() {
    let mut w = World::new();
    let d = w.web().image_digest.clone();
    w.context.images.remove(&d);
    assert_eq!(
        w.messages(),
        [
            "deny_image_from_store: service.web: image web (sha256:1a2b3c4d5e6f) is not in kiln's image store"
        ]
    );

    let mut w = World::new();
    w.web_image().in_store = false;
    assert_eq!(
        w.messages(),
        [
            "deny_image_from_store: service.web: image web (sha256:1a2b3c4d5e6f) is not in kiln's image store"
        ]
    );
}

#[test]
fn image_from_store_denies_an_unverified_digest() {
    let mut w = World::new();
    w.web_image().verified = false;
    assert_eq!(
        w.messages(),
        [
            "deny_image_from_store: service.web: image web (sha256:1a2b3c4d5e6f) has a digest that was not verified against its content"
        ]
    );
}

// image_labels

#[test]
fn image_labels_denies_missing_version_and_commit() {
    let mut w = World::new();
    w.web_image().labels.clear();
    w.web_image().git = None;
    assert_eq!(
        w.messages(),
        [
            "deny_image_labels: service.web: image web (sha256:1a2b3c4d5e6f) has no git commit (label org.opencontainers.image.revision or a git record)",
            "deny_image_labels: service.web: image web (sha256:1a2b3c4d5e6f) has no version label",
        ]
    );
}

#[test]
fn image_labels_takes_the_commit_from_the_label_or_the_git_record() {
    let mut w = World::new();
    w.web_image().git = None;
    assert_eq!(w.messages(), Vec::<String>::new(), "label alone");
    let mut w = World::new();
    w.web_image()
        .labels
        .remove("org.opencontainers.image.revision");
    assert_eq!(w.messages(), Vec::<String>::new(), "git record alone");
}

#[test]
fn image_labels_denies_a_dirty_tree_only_in_a_protected_environment() {
    let mut w = World::new();
    w.web_image().git.as_mut().unwrap().dirty = true;
    assert_eq!(
        w.messages(),
        [
            "deny_image_labels: service.web: image web (sha256:1a2b3c4d5e6f) was built from a dirty git tree, which the protected environment prod refuses"
        ]
    );
    let mut w = World::dev();
    w.web_image().git.as_mut().unwrap().dirty = true;
    assert_eq!(w.messages(), Vec::<String>::new());
}

// no_ssh

#[test]
fn no_ssh_denies_port_22_everywhere() {
    let mut w = World::new();
    w.web().port = 22;
    w.web_image().exposed_ports = vec![22, 8080];
    w.balancers.get_mut("public").unwrap().listen = "0.0.0.0:22".into();
    assert_eq!(
        w.messages(),
        [
            "deny_no_ssh: balancer.public: listens on port 22 (0.0.0.0:22)",
            "deny_no_ssh: service.web: image web (sha256:1a2b3c4d5e6f) exposes port 22 (ssh)",
            "deny_no_ssh: service.web: listens on port 22 (ssh)",
        ]
    );
}

#[test]
fn no_ssh_denies_an_ssh_daemon_in_entrypoint_or_cmd() {
    let mut w = World::new();
    w.web_image().entrypoint = vec!["/bin/sh".into(), "-c".into()];
    w.web_image().cmd = vec!["/usr/sbin/sshd -D & exec /bin/app".into()];
    assert_eq!(
        w.messages(),
        [
            "deny_no_ssh: service.web: image web (sha256:1a2b3c4d5e6f) runs an ssh daemon (cmd: /usr/sbin/sshd -D & exec /bin/app)"
        ]
    );
    let mut w = World::new();
    w.web_image().entrypoint = vec!["/usr/sbin/dropbear".into(), "-F".into()];
    assert_eq!(
        w.messages(),
        [
            "deny_no_ssh: service.web: image web (sha256:1a2b3c4d5e6f) runs an ssh daemon (entrypoint: /usr/sbin/dropbear)"
        ]
    );
}

// health_required

#[test]
fn health_required_denies_a_service_without_a_health_check() {
    let mut w = World::new();
    w.web().health = None;
    assert_eq!(
        w.messages(),
        ["deny_health_required: service.web: has no health check"]
    );
}

#[test]
fn unchanged_services_are_not_checked() {
    // `legacy` has no health check, but the plan does not touch it.
    let mut w = World::new();
    let mut legacy = common::service("legacy", digest("2b"));
    legacy.health = None;
    w.state
        .services
        .insert("legacy".into(), common::applied(&legacy));
    w.desired.insert("legacy".into(), legacy);
    assert_eq!(w.messages(), Vec::<String>::new());
}

#[test]
fn removing_a_health_check_is_an_update_that_is_checked() {
    let mut w = World::new();
    let spec = w.state.services["web"].spec.clone();
    w.desired.insert("web".into(), spec);
    w.web().health = None;
    assert_eq!(
        w.messages(),
        ["deny_health_required: service.web: has no health check"]
    );
}

// capacity

#[test]
fn capacity_denies_a_canary_step_heavier_than_its_instances() {
    let mut w = World::new();
    w.web().instances = 10;
    w.web().rollout.canary_instances = Some(1);
    assert_eq!(
        w.messages(),
        [
            "deny_capacity: service.web: canary step 2 sends 50% of requests to 1 of 10 instances; raise canary_instances to at least 5 or lower the weight"
        ]
    );
    // 10 % of requests to 1 of 10 instances is exactly its share.
    w.web().rollout.steps = vec![CanaryStep {
        weight: 10,
        pause: None,
    }];
    assert_eq!(w.messages(), Vec::<String>::new());
    // The default canary is as large as the service.
    let mut w = World::new();
    w.web().instances = 10;
    assert_eq!(w.messages(), Vec::<String>::new());
}

#[test]
fn capacity_warns_about_a_rolling_update_that_replaces_everything_at_once() {
    let mut w = World::dev();
    w.web().rollout.strategy = Strategy::Rolling;
    w.web().rollout.max_parallel = 3;
    let d = w.check(&BuiltinSettings::default());
    assert_eq!(
        messages(&d),
        [
            "warn_capacity: service.web: max_parallel 3 replaces all 3 instances at once; lower it to roll out in batches"
        ]
    );
    assert_eq!(d.results[0].kind, Kind::Warn);
    assert!(d.passed(), "a warning never blocks");

    w.web().rollout.max_parallel = 1;
    assert_eq!(w.messages(), Vec::<String>::new());
    // One instance: nothing to keep.
    w.web().rollout.max_parallel = 3;
    w.web().instances = 1;
    assert_eq!(w.messages(), Vec::<String>::new());
}

// protected_progressive

#[test]
fn protected_progressive_denies_a_rolling_release_in_a_protected_environment() {
    let mut w = World::new();
    w.web().rollout.strategy = Strategy::Rolling;
    assert_eq!(
        w.messages(),
        [
            "deny_protected_progressive: service.web: a new release in the protected environment prod must roll out as canary or blue_green (strategy is rolling)"
        ]
    );
    let mut w = World::dev();
    w.web().rollout.strategy = Strategy::Rolling;
    assert_eq!(w.messages(), Vec::<String>::new());
}

#[test]
fn protected_progressive_denies_a_canary_without_analysis() {
    let mut w = World::new();
    w.web().rollout.analysis = None;
    assert_eq!(
        w.messages(),
        [
            "deny_protected_progressive: service.web: a canary release in the protected environment prod needs an analysis block"
        ]
    );
    w.web().rollout.strategy = Strategy::BlueGreen;
    w.web().rollout.analysis = Some(common::analysis());
    assert_eq!(w.messages(), Vec::<String>::new());
}

#[test]
fn protected_progressive_covers_a_new_service() {
    let mut w = World::new();
    let mut api = common::service("api", digest("3c"));
    api.rollout.strategy = Strategy::Rolling;
    w.context
        .images
        .insert(digest("3c"), image("api", digest("3c")));
    w.desired.insert("api".into(), api);
    assert_eq!(
        w.messages(),
        [
            "deny_protected_progressive: service.api: a new release in the protected environment prod must roll out as canary or blue_green (strategy is rolling)"
        ]
    );
}

// max_image_age

#[test]
fn max_image_age_denies_an_old_image_for_a_new_release() {
    let mut w = World::new();
    w.web_image().age_seconds = Some(100 * 86_400 + 5);
    assert_eq!(
        w.messages(),
        [
            "deny_max_image_age: service.web: image web (sha256:1a2b3c4d5e6f) is 100 days old (limit 90 days); rebuild it"
        ]
    );
    let settings = BuiltinSettings {
        max_image_age_days: 120,
        ..BuiltinSettings::default()
    };
    assert_eq!(messages(&w.check(&settings)), Vec::<String>::new());

    w.web_image().age_seconds = Some(90 * 86_400);
    assert_eq!(w.messages(), Vec::<String>::new(), "90 days is still fine");
}

#[test]
fn max_image_age_does_not_hold_up_a_scale_up() {
    let mut w = World::new();
    let spec = w.state.services["web"].spec.clone();
    w.desired.insert("web".into(), spec);
    w.web().instances = 5;
    w.web_image().age_seconds = Some(400 * 86_400);
    assert_eq!(w.messages(), Vec::<String>::new());
    // … but a scale-up still starts instances, so the store is checked.
    w.web_image().verified = false;
    assert_eq!(
        w.messages(),
        [
            "deny_image_from_store: service.web: image web (sha256:0a0b0c0d0e0f) has a digest that was not verified against its content"
        ]
    );
}

// revoked

#[test]
fn revoked_denies_a_revoked_image() {
    let mut w = World::new();
    w.web_image().revoked = Some(Revocation {
        reason: "CVE-2026-1234 in openssl".into(),
        at: "2026-11-20T00:00:00Z".into(),
    });
    assert_eq!(
        w.messages(),
        [
            "deny_revoked: service.web: image web (sha256:1a2b3c4d5e6f) is revoked: CVE-2026-1234 in openssl"
        ]
    );
}

#[test]
fn revoked_denies_an_image_built_on_a_revoked_one() {
    let mut w = World::new();
    let base = digest("ba5e");
    let mut base_facts = image("base", base.clone());
    base_facts.revoked = Some(Revocation {
        reason: "leaked key".into(),
        at: "2026-11-20T00:00:00Z".into(),
    });
    w.context.images.insert(base.clone(), base_facts);
    w.web_image().ancestry = vec![base];
    assert_eq!(
        w.messages(),
        [
            "deny_revoked: service.web: image web (sha256:1a2b3c4d5e6f) is built on the revoked image sha256:ba5e00000000: leaked key"
        ]
    );
}

#[test]
fn revoked_checks_drift_replacements() {
    // A drift remediation replaces an instance of `web`: its image must not be revoked.
    let mut input = World::new().input();
    input["resource_changes"] = json!([{
        "address": "service.web.instance[\"web-v1-3f9a1c\"]",
        "mode": "managed",
        "type": "kiln_instance",
        "name": "web-v1-3f9a1c",
        "change": { "actions": ["create", "delete"], "before": { "release": 1, "drift": "file_tamper /bin/app" }, "after": { "release": 1 } },
        "action_reason": "replace_because_drift",
        "rollout": null,
    }]);
    let d = digest("1a2b3c4d5e6f").to_string();
    input["kiln"]["images"][&d]["revoked"] =
        json!({ "reason": "bad", "at": "2026-11-20T00:00:00Z" });
    let decision = evaluate(
        &[builtin_pack(&BuiltinSettings::default())],
        &input,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(
        messages(&decision),
        ["deny_revoked: service.web: image web (sha256:1a2b3c4d5e6f) is revoked: bad"]
    );
}

// settings

#[test]
fn a_disabled_check_does_not_run() {
    let mut w = World::new();
    w.web().health = None;
    w.web().port = 22;
    let d = w.check(&disabled(&["health_required"]));
    assert_eq!(
        messages(&d),
        ["deny_no_ssh: service.web: listens on port 22 (ssh)"]
    );
    let d = w.check(&disabled(&["health_required", "no_ssh"]));
    assert!(d.results.is_empty());
}

#[test]
fn every_check_can_be_disabled() {
    // Everything wrong at once: each check fires, and disabling all of them silences it.
    let mut w = World::new();
    w.web().health = None;
    w.web().port = 22;
    w.web().instances = 10;
    w.web().rollout.canary_instances = Some(1);
    w.web().rollout.analysis = None;
    let img = w.web_image();
    img.verified = false;
    img.labels.clear();
    img.age_seconds = Some(1000 * 86_400);
    img.revoked = Some(Revocation {
        reason: "bad".into(),
        at: "2026-11-20T00:00:00Z".into(),
    });
    let d = w.check(&BuiltinSettings::default());
    let rules: std::collections::BTreeSet<&str> =
        d.results.iter().map(|o| o.rule.as_str()).collect();
    let expected: std::collections::BTreeSet<String> = BUILTIN_CHECKS
        .iter()
        .map(|(id, _)| format!("deny_{id}"))
        .collect();
    assert_eq!(
        rules,
        expected.iter().map(String::as_str).collect(),
        "every check fires"
    );
    let all: Vec<&str> = BUILTIN_CHECKS.iter().map(|(id, _)| *id).collect();
    assert!(w.check(&disabled(&all)).results.is_empty());
}

#[test]
fn unknown_disabled_ids_are_reported() {
    assert_eq!(disabled(&["no_ssh", "no_shh"]).unknown_checks(), ["no_shh"]);
}

#[test]
fn the_pack_is_soft_mandatory_by_default_and_its_level_is_a_setting() {
    let mut w = World::new();
    w.web().health = None;
    let d = w.check(&BuiltinSettings::default());
    assert!(d.overridable());
    let d = w.check(&BuiltinSettings {
        level: Level::HardMandatory,
        ..BuiltinSettings::default()
    });
    assert!(!d.passed());
    assert!(!d.overridable());
}
