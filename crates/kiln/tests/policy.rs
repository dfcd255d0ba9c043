//! The policy gate and approvals end to end, through the real binary: a custom deny rule
//! blocks an apply with its message and changes nothing; a soft-mandatory denial is overridden
//! only with a reason, which the audit log keeps; a protected environment applies only a saved
//! plan approved exactly; `kiln policy check --sarif` and `kiln policy test` work on the
//! project's policies.

#![allow(clippy::unwrap_used)]

mod harness;

use harness::Project;

fn config(extra: &str) -> String {
    format!(
        r#"
project = "shop"

variable "greeting" {{ default = "hello" }}

image "web" {{
  base = "dir:./rootfs"
  provisioner "file" {{
    source      = "site"
    destination = "/www"
  }}
  entrypoint = ["/bin/sh", "-c", "exec httpd -f -p \"$PORT\" -h /www"]
  labels     = {{ version = "1.0.0" }}
}}

service "web" {{
  image     = image.web
  instances = 1
  port      = 8080
  env       = {{ GREETING = var.greeting }}
  health {{
    path     = "/healthz"
    interval = "100ms"
  }}
  rollout {{
    strategy     = "blue_green"
    auto_promote = true
    analysis {{
      interval     = "1s"
      min_requests = 1
    }}
  }}
}}

balancer "public" {{
  listen = "127.0.0.1:0"
  route {{
    path_prefix = "/"
    service     = service.web
  }}
}}
{extra}
"#
    )
}

const NO_HELLO: &str = r#"package shop.rules

deny contains msg if {
  some name, spec in input.services
  spec.env.GREETING
  msg := sprintf("service.%s: greetings must be approved by marketing", [name])
}
"#;

fn project(extra: &str) -> Project {
    let p = Project::new(&config(extra));
    p.busybox_rootfs("rootfs");
    p.write("site/healthz", "ok\n");
    p.kiln(&["bake"]).ok();
    p
}

#[test]
fn a_custom_deny_rule_blocks_an_apply_and_changes_nothing() {
    let p = project("");
    p.write("policies/greetings.rego", NO_HELLO);
    let apply = p.kiln(&["apply", "--auto-approve"]);
    assert_eq!(apply.code, 1, "{}{}", apply.stdout, apply.stderr);
    assert!(
        apply
            .stderr
            .contains("service.web: greetings must be approved by marketing"),
        "{}",
        apply.stderr
    );
    assert!(
        apply.stderr.contains("refused by policy"),
        "{}",
        apply.stderr
    );
    // Nothing ran and nothing was recorded but the decision.
    assert!(!p.path().join(".kiln/kiln.sock").exists());
    let versions = p.kiln(&["state", "versions", "--json"]).ok().stdout;
    let versions: serde_json::Value = serde_json::from_str(&versions).unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 1, "only version 0");
    let log = p.kiln(&["audit", "log", "--json"]).ok().stdout;
    assert!(log.contains("\"kind\": \"policy\""), "{log}");
    // `kiln policy check` says the same, as SARIF too.
    let check = p.kiln(&["policy", "check", "--sarif"]);
    assert_eq!(check.code, 1);
    let sarif: serde_json::Value = serde_json::from_str(&check.stdout).unwrap();
    assert_eq!(sarif["version"], "2.1.0");
    assert!(
        check.stdout.contains("greetings must be approved"),
        "{}",
        check.stdout
    );
}

#[test]
fn a_soft_mandatory_denial_is_overridden_only_with_a_reason_that_is_logged() {
    let p = project(
        "policy \"team\" {\n  dir         = \"policies\"\n  enforcement = \"soft_mandatory\"\n}\n",
    );
    p.write("policies/greetings.rego", NO_HELLO);
    let refused = p.kiln(&["apply", "--auto-approve"]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("--override-policy"),
        "{}",
        refused.stderr
    );
    p.kiln(&[
        "apply",
        "--auto-approve",
        "--override-policy",
        "launch day, marketing signed off by mail",
    ])
    .ok();
    let log = p.kiln(&["audit", "log", "--json"]).ok().stdout;
    let entries: serde_json::Value = serde_json::from_str(&log).unwrap();
    let overrides: Vec<&serde_json::Value> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "policy_override")
        .collect();
    assert_eq!(overrides.len(), 1, "{log}");
    assert_eq!(
        overrides[0]["data"]["reason"],
        "launch day, marketing signed off by mail"
    );
    p.kiln(&["down", "--auto-approve"]).ok();
}

#[test]
fn a_protected_environment_applies_only_the_plan_that_was_approved() {
    // The built-in pack is enforced in a protected environment; this project has no git
    // history, so its commit check is turned off, and the new release rolls out blue/green
    // with analysis as the pack asks (the first release goes straight in).
    let p = project(
        r#"environment {
  name      = "prod"
  protected = true
}
policy "builtin" {
  disable = ["image_labels"]
}
"#,
    );
    // Without a saved plan: refused.
    let apply = p.kiln(&["apply", "--auto-approve"]);
    assert_eq!(apply.code, 1);
    assert!(apply.stderr.contains("is protected"), "{}", apply.stderr);

    let plan = p.path().join("release.plan");
    let other = p.path().join("other.plan");
    p.kiln(&["plan", "-out", plan.to_str().unwrap()]);
    p.kiln(&[
        "-var",
        "greeting=hi",
        "plan",
        "-out",
        other.to_str().unwrap(),
    ]);
    // An approval of another plan does not count.
    p.kiln(&["approve", other.to_str().unwrap()]).ok();
    let apply = p.kiln(&["apply", plan.to_str().unwrap()]);
    assert_eq!(apply.code, 1, "{}{}", apply.stdout, apply.stderr);
    assert!(apply.stderr.contains("has no approval"), "{}", apply.stderr);

    p.kiln(&["approve", plan.to_str().unwrap()]).ok();
    let apply = p.kiln(&["apply", plan.to_str().unwrap()]);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    assert!(apply.stderr.contains("approved by"), "{}", apply.stderr);
    let log = p.kiln(&["audit", "log"]).ok().stdout;
    assert!(log.contains("approval"), "{log}");
    p.kiln(&["down", "--auto-approve"]).ok();
}

#[test]
fn policy_tests_run_from_the_policy_directory() {
    let p = project("");
    p.write("policies/greetings.rego", NO_HELLO);
    p.write(
        "policies/greetings_test.rego",
        r#"package shop.rules_test

import rego.v1

test_a_greeting_is_denied if {
  count(data.shop.rules.deny) == 1 with input as {"services": {"web": {"env": {"GREETING": "x"}}}}
}

test_no_greeting_passes if {
  count(data.shop.rules.deny) == 1 with input as {"services": {"web": {"env": {}}}}
}
"#,
    );
    let test = p.kiln(&["policy", "test"]);
    assert_eq!(
        test.code, 1,
        "one test fails: {}{}",
        test.stdout, test.stderr
    );
    assert!(test.stdout.contains("PASS: 1/2"), "{}", test.stdout);
    assert!(
        test.stdout.contains("test_no_greeting_passes: FAIL"),
        "{}",
        test.stdout
    );
}

#[test]
fn revoking_a_base_image_refuses_deploys_of_the_images_built_on_it() {
    let p = Project::new(
        r#"
project = "shop"
variable "greeting" { default = "hello" }
image "base" {
  base = "dir:./rootfs"
}
image "web" {
  base = image.base
  provisioner "file" {
    source      = "site"
    destination = "/www"
  }
  entrypoint = ["/bin/sh", "-c", "exec httpd -f -p \"$PORT\" -h /www"]
}
service "web" {
  image     = image.web
  instances = 1
  port      = 8080
  env       = { GREETING = var.greeting }
  health {
    path     = "/healthz"
    interval = "100ms"
  }
}
"#,
    );
    p.busybox_rootfs("rootfs");
    p.write("site/healthz", "ok\n");
    p.kiln(&["bake"]).ok();
    let revoke = p
        .kiln(&[
            "images",
            "revoke",
            "base",
            "--reason",
            "CVE-2026-4242 in busybox",
        ])
        .ok();
    assert!(revoke.stdout.contains("revoked base"), "{}", revoke.stdout);
    let ls = p.kiln(&["images", "ls"]).ok().stdout;
    assert!(ls.contains("yes, via base"), "{ls}");

    let apply = p.kiln(&["apply", "--auto-approve"]);
    assert_eq!(apply.code, 1, "{}{}", apply.stdout, apply.stderr);
    assert!(
        apply.stderr.contains("built on base") && apply.stderr.contains("CVE-2026-4242"),
        "{}",
        apply.stderr
    );
    let log = p.kiln(&["audit", "log"]).ok().stdout;
    assert!(log.contains("revoke"), "{log}");
}
