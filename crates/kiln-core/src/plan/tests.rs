use std::collections::BTreeMap;
use std::time::Duration;

use expect_test::{Expect, expect};
use proptest::prelude::*;

use super::*;
use crate::model::{Analysis, CanaryStep, Health, Rollout, Route, Strategy as Kind};
use crate::state::{Release, ReleaseStatus};

/// A digest that reads well in snapshots: `prefix` padded with zeros.
fn digest(prefix: &str) -> Digest {
    Digest::from_hex(&format!("{prefix:0<64}")).unwrap()
}

fn rollout() -> Rollout {
    Rollout {
        strategy: Kind::Rolling,
        steps: Vec::new(),
        analysis: None,
        auto_rollback: true,
        auto_promote: false,
        scale_down_delay: Duration::from_secs(300),
        progress_deadline: Duration::from_secs(600),
        max_parallel: 1,
        min_healthy_time: Duration::from_secs(10),
        healthy_deadline: Duration::from_secs(300),
        canary_instances: None,
        preview_listen: None,
    }
}

fn web() -> ServiceSpec {
    ServiceSpec {
        name: "web".into(),
        image: "web".into(),
        image_digest: digest("1a2b3c4d5e6f"),
        instances: 3,
        port: 8080,
        env: BTreeMap::from([("GREETING".into(), "hello".into())]),
        health: Some(Health {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 3,
            unhealthy_threshold: 3,
        }),
        rollout: rollout(),
        notify: Vec::new(),
    }
}

fn public() -> BalancerSpec {
    BalancerSpec {
        name: "public".into(),
        listen: "127.0.0.1:8080".into(),
        routes: vec![Route {
            host: None,
            path_prefix: "/".into(),
            service: "web".into(),
        }],
    }
}

/// The state after `spec` was applied and rolled out as release `number`.
fn applied(spec: &ServiceSpec, number: u32) -> ServiceState {
    let releases = (1..=number)
        .map(|n| Release {
            number: n,
            image: spec.image.clone(),
            image_digest: spec.image_digest.clone(),
            config_hash: spec.config_hash(),
            port: spec.port,
            env: spec.env.clone(),
            health: spec.health.clone(),
            git_commit: None,
            deployment_id: format!("d{n}"),
            created_at: "2026-01-01T00:00:00Z".into(),
            actor: "test@host".into(),
            rollback_of: None,
            status: if n == number {
                ReleaseStatus::Active
            } else {
                ReleaseStatus::Retired
            },
        })
        .collect();
    ServiceState {
        spec: spec.clone(),
        releases,
        stable: Some(number),
        instances: Vec::new(),
        rollout: None,
    }
}

fn desired(
    services: &[ServiceSpec],
    balancers: &[BalancerSpec],
) -> (
    BTreeMap<String, ServiceSpec>,
    BTreeMap<String, BalancerSpec>,
) {
    (
        services
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect(),
        balancers
            .iter()
            .map(|b| (b.name.clone(), b.clone()))
            .collect(),
    )
}

fn make(services: &[ServiceSpec], balancers: &[BalancerSpec], state: &State) -> Plan {
    let (s, b) = desired(services, balancers);
    plan("lin", 7, &s, &b, state)
}

/// Snapshots the rendered plan and the JSON of its resource changes (the rest of the plan
/// repeats the inputs).
fn check(plan: &Plan, text: &Expect, json: &Expect) {
    text.assert_eq(&plan.render());
    let changes = serde_json::to_string_pretty(&plan.resource_changes).unwrap();
    json.assert_eq(&changes);
}

fn state_with(services: &[(ServiceSpec, u32)], balancers: &[BalancerSpec]) -> State {
    State {
        services: services
            .iter()
            .map(|(s, n)| (s.name.clone(), applied(s, *n)))
            .collect(),
        balancers: balancers
            .iter()
            .map(|b| (b.name.clone(), b.clone()))
            .collect(),
        ..State::default()
    }
}

#[test]
fn create_a_service_and_a_balancer() {
    let plan = make(&[web()], &[public()], &State::default());
    assert_eq!(plan.format_version, "1.0");
    assert_eq!((plan.lineage.as_str(), plan.serial), ("lin", 7));
    assert_eq!(
        plan.summary(),
        Summary {
            create: 2,
            ..Summary::default()
        }
    );
    check(
        &plan,
        &expect![[r#"
          # balancer.public will be created
          + balancer "public"
              + listen: "127.0.0.1:8080"
              + routes[0].path_prefix: "/"
              + routes[0].service: "web"

          # service.web will be created as release v1
          + service "web"
              + image: "web"
              + image_digest: sha256:1a2b3c4d5e6f
              + instances: 3
              + port: 8080
              + env.GREETING: "hello"
              + health.healthy_threshold: 3
              + health.interval: "1s"
              + health.path: "/healthz"
              + health.timeout: "500ms"
              + health.unhealthy_threshold: 3
                rollout: rolling in 3 batches of 1, about 39s; if v1 does not turn healthy within 5m or the rollout takes over 10m, the rollout fails; there is no earlier release to return to

        Plan: 2 to create, 0 to replace, 0 to update, 0 to delete.
    "#]],
        &expect![[r#"
        [
          {
            "address": "balancer.public",
            "mode": "managed",
            "type": "kiln_balancer",
            "name": "public",
            "change": {
              "actions": [
                "create"
              ],
              "before": null,
              "after": {
                "listen": "127.0.0.1:8080",
                "name": "public",
                "routes": [
                  {
                    "host": null,
                    "path_prefix": "/",
                    "service": "web"
                  }
                ]
              }
            },
            "action_reason": null,
            "rollout": null
          },
          {
            "address": "service.web",
            "mode": "managed",
            "type": "kiln_service",
            "name": "web",
            "change": {
              "actions": [
                "create"
              ],
              "before": null,
              "after": {
                "env": {
                  "GREETING": "hello"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                "instances": 3,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              }
            },
            "action_reason": null,
            "rollout": {
              "strategy": "rolling",
              "from_release": null,
              "to_release": 1,
              "instances": 3,
              "batches": [
                1,
                1,
                1
              ],
              "surge": 0,
              "expected_duration": "39s",
              "waits_for_promotion": false,
              "rollback": "if v1 does not turn healthy within 5m or the rollout takes over 10m, the rollout fails; there is no earlier release to return to"
            }
          }
        ]"#]],
    );
}

#[test]
fn replace_on_image_and_env_change() {
    let state = state_with(&[(web(), 1)], &[]);
    let mut next = web();
    next.image_digest = digest("9f8e7d6c5b4a");
    next.env.insert("GREETING".into(), "bonjour".into());
    let plan = make(&[next], &[], &state);
    check(
        &plan,
        &expect![[r#"
          # service.web will be replaced by release v2: image changed, env changed
          +/- service "web"
              ~ image_digest: sha256:1a2b3c4d5e6f -> sha256:9f8e7d6c5b4a
              ~ env.GREETING: "hello" -> "bonjour"
                rollout: rolling in 3 batches of 1 (surge 1), about 39s; if v2 does not turn healthy within 5m or the rollout takes over 10m, v2 is stopped and v1 is restored to 3 instances (auto_rollback)

        Plan: 0 to create, 1 to replace, 0 to update, 0 to delete.
    "#]],
        &expect![[r#"
        [
          {
            "address": "service.web",
            "mode": "managed",
            "type": "kiln_service",
            "name": "web",
            "change": {
              "actions": [
                "create",
                "delete"
              ],
              "before": {
                "env": {
                  "GREETING": "hello"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                "instances": 3,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              },
              "after": {
                "env": {
                  "GREETING": "bonjour"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:9f8e7d6c5b4a0000000000000000000000000000000000000000000000000000",
                "instances": 3,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              }
            },
            "action_reason": "image changed, env changed",
            "rollout": {
              "strategy": "rolling",
              "from_release": 1,
              "to_release": 2,
              "instances": 3,
              "batches": [
                1,
                1,
                1
              ],
              "surge": 1,
              "expected_duration": "39s",
              "waits_for_promotion": false,
              "rollback": "if v2 does not turn healthy within 5m or the rollout takes over 10m, v2 is stopped and v1 is restored to 3 instances (auto_rollback)"
            }
          }
        ]"#]],
    );
}

#[test]
fn replace_reasons_come_in_a_fixed_order() {
    let state = state_with(&[(web(), 4)], &[]);
    let mut next = web();
    next.env.clear();
    next.port = 9090;
    next.instances = 5;
    next.rollout.max_parallel = 2;
    let plan = make(&[next], &[], &state);
    let change = &plan.resource_changes[0];
    assert_eq!(change.change.actions, ["create", "delete"]);
    assert_eq!(
        change.action_reason.as_deref(),
        Some("port changed, env changed, instances changed, rollout settings changed")
    );
    let schedule = change.rollout.as_ref().unwrap();
    assert_eq!((schedule.from_release, schedule.to_release), (Some(4), 5));
    assert_eq!(schedule.batches, [2, 2, 1]);
    assert_eq!(schedule.surge, 2);
    // 3 batches × (1s × 3 checks + 10s min_healthy_time).
    assert_eq!(schedule.expected_duration, Duration::from_secs(39));
    expect![[r#"
          # service.web will be replaced by release v5: port changed, env changed, instances changed, rollout settings changed
          +/- service "web"
              ~ instances: 3 -> 5
              ~ port: 8080 -> 9090
              - env.GREETING: "hello"
              ~ rollout.max_parallel: 1 -> 2
                rollout: rolling in 3 batches of up to 2 (surge 2), about 39s; if v5 does not turn healthy within 5m or the rollout takes over 10m, v5 is stopped and v4 is restored to 5 instances (auto_rollback)

        Plan: 0 to create, 1 to replace, 0 to update, 0 to delete.
    "#]].assert_eq(&plan.render());
}

#[test]
fn scale_is_an_update_not_a_new_release() {
    let state = state_with(&[(web(), 2)], &[]);
    let mut next = web();
    next.instances = 5;
    let plan = make(&[next], &[], &state);
    check(
        &plan,
        &expect![[r#"
          # service.web will be updated: instances changed
          ~ service "web"
              ~ instances: 3 -> 5

        Plan: 0 to create, 0 to replace, 1 to update, 0 to delete.
    "#]],
        &expect![[r#"
        [
          {
            "address": "service.web",
            "mode": "managed",
            "type": "kiln_service",
            "name": "web",
            "change": {
              "actions": [
                "update"
              ],
              "before": {
                "env": {
                  "GREETING": "hello"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                "instances": 3,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              },
              "after": {
                "env": {
                  "GREETING": "hello"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                "instances": 5,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              }
            },
            "action_reason": "instances changed",
            "rollout": null
          }
        ]"#]],
    );
}

#[test]
fn health_and_rollout_settings_are_updates() {
    let state = state_with(&[(web(), 1)], &[]);
    let mut next = web();
    next.health = None;
    next.rollout.min_healthy_time = Duration::from_secs(5);
    let plan = make(&[next], &[], &state);
    expect![[r#"
          # service.web will be updated: health check changed, rollout settings changed
          ~ service "web"
              - health.healthy_threshold: 3
              - health.interval: "1s"
              - health.path: "/healthz"
              - health.timeout: "500ms"
              - health.unhealthy_threshold: 3
              ~ rollout.min_healthy_time: "10s" -> "5s"

        Plan: 0 to create, 0 to replace, 1 to update, 0 to delete.
    "#]]
    .assert_eq(&plan.render());
}

#[test]
fn webhooks_are_an_update_not_a_new_release() {
    let state = state_with(&[(web(), 1)], &[]);
    let mut next = web();
    next.notify = vec!["http://127.0.0.1:9000/hook".into()];
    let plan = make(std::slice::from_ref(&next), &[], &state);
    assert!(plan.resource_changes[0].rollout.is_none());
    expect![[r#"
          # service.web will be updated: notifications changed
          ~ service "web"
              + notify[0]: "http://127.0.0.1:9000/hook"

        Plan: 0 to create, 0 to replace, 1 to update, 0 to delete.
    "#]]
    .assert_eq(&plan.render());
    // Once applied, the same config plans as no change.
    let state = state_with(&[(next.clone(), 1)], &[]);
    assert!(!make(&[next], &[], &state).has_changes());
}

#[test]
fn delete_what_is_not_in_config() {
    let state = state_with(&[(web(), 3)], &[public()]);
    let plan = make(&[], &[], &state);
    check(
        &plan,
        &expect![[r#"
          # balancer.public will be destroyed: not in config
          - balancer "public"

          # service.web will be destroyed: not in config
          - service "web"

        Plan: 0 to create, 0 to replace, 0 to update, 2 to delete.
    "#]],
        &expect![[r#"
        [
          {
            "address": "balancer.public",
            "mode": "managed",
            "type": "kiln_balancer",
            "name": "public",
            "change": {
              "actions": [
                "delete"
              ],
              "before": {
                "listen": "127.0.0.1:8080",
                "name": "public",
                "routes": [
                  {
                    "host": null,
                    "path_prefix": "/",
                    "service": "web"
                  }
                ]
              },
              "after": null
            },
            "action_reason": "not in config",
            "rollout": null
          },
          {
            "address": "service.web",
            "mode": "managed",
            "type": "kiln_service",
            "name": "web",
            "change": {
              "actions": [
                "delete"
              ],
              "before": {
                "env": {
                  "GREETING": "hello"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                "instances": 3,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              },
              "after": null
            },
            "action_reason": "not in config",
            "rollout": null
          }
        ]"#]],
    );
}

#[test]
fn no_op_when_everything_matches() {
    let state = state_with(&[(web(), 3)], &[public()]);
    let plan = make(&[web()], &[public()], &state);
    assert!(!plan.has_changes());
    assert_eq!(plan.summary(), Summary::default());
    check(
        &plan,
        &expect![[r#"
        No changes. The running services match the configuration.
    "#]],
        &expect![[r#"
        [
          {
            "address": "balancer.public",
            "mode": "managed",
            "type": "kiln_balancer",
            "name": "public",
            "change": {
              "actions": [
                "no-op"
              ],
              "before": {
                "listen": "127.0.0.1:8080",
                "name": "public",
                "routes": [
                  {
                    "host": null,
                    "path_prefix": "/",
                    "service": "web"
                  }
                ]
              },
              "after": {
                "listen": "127.0.0.1:8080",
                "name": "public",
                "routes": [
                  {
                    "host": null,
                    "path_prefix": "/",
                    "service": "web"
                  }
                ]
              }
            },
            "action_reason": null,
            "rollout": null
          },
          {
            "address": "service.web",
            "mode": "managed",
            "type": "kiln_service",
            "name": "web",
            "change": {
              "actions": [
                "no-op"
              ],
              "before": {
                "env": {
                  "GREETING": "hello"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                "instances": 3,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              },
              "after": {
                "env": {
                  "GREETING": "hello"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                "instances": 3,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              }
            },
            "action_reason": null,
            "rollout": null
          }
        ]"#]],
    );
}

#[test]
fn balancer_listen_and_routes_changes() {
    let state = state_with(&[(web(), 1)], &[public()]);
    let mut next = public();
    next.listen = "0.0.0.0:80".into();
    next.routes.push(Route {
        host: Some("api.example.com".into()),
        path_prefix: "/v1".into(),
        service: "web".into(),
    });
    let mut admin = public();
    admin.name = "admin".into();
    let plan = make(&[web()], &[next, admin], &state);
    check(
        &plan,
        &expect![[r#"
          # balancer.admin will be created
          + balancer "admin"
              + listen: "127.0.0.1:8080"
              + routes[0].path_prefix: "/"
              + routes[0].service: "web"

          # balancer.public will be updated: listen changed, routes changed
          ~ balancer "public"
              ~ listen: "127.0.0.1:8080" -> "0.0.0.0:80"
              + routes[1].host: "api.example.com"
              + routes[1].path_prefix: "/v1"
              + routes[1].service: "web"

        Plan: 1 to create, 0 to replace, 1 to update, 0 to delete.
    "#]],
        &expect![[r#"
        [
          {
            "address": "balancer.admin",
            "mode": "managed",
            "type": "kiln_balancer",
            "name": "admin",
            "change": {
              "actions": [
                "create"
              ],
              "before": null,
              "after": {
                "listen": "127.0.0.1:8080",
                "name": "admin",
                "routes": [
                  {
                    "host": null,
                    "path_prefix": "/",
                    "service": "web"
                  }
                ]
              }
            },
            "action_reason": null,
            "rollout": null
          },
          {
            "address": "balancer.public",
            "mode": "managed",
            "type": "kiln_balancer",
            "name": "public",
            "change": {
              "actions": [
                "update"
              ],
              "before": {
                "listen": "127.0.0.1:8080",
                "name": "public",
                "routes": [
                  {
                    "host": null,
                    "path_prefix": "/",
                    "service": "web"
                  }
                ]
              },
              "after": {
                "listen": "0.0.0.0:80",
                "name": "public",
                "routes": [
                  {
                    "host": null,
                    "path_prefix": "/",
                    "service": "web"
                  },
                  {
                    "host": "api.example.com",
                    "path_prefix": "/v1",
                    "service": "web"
                  }
                ]
              }
            },
            "action_reason": "listen changed, routes changed",
            "rollout": null
          },
          {
            "address": "service.web",
            "mode": "managed",
            "type": "kiln_service",
            "name": "web",
            "change": {
              "actions": [
                "no-op"
              ],
              "before": {
                "env": {
                  "GREETING": "hello"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                "instances": 3,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              },
              "after": {
                "env": {
                  "GREETING": "hello"
                },
                "health": {
                  "healthy_threshold": 3,
                  "interval": "1s",
                  "path": "/healthz",
                  "timeout": "500ms",
                  "unhealthy_threshold": 3
                },
                "image": "web",
                "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                "instances": 3,
                "port": 8080,
                "rollout": {
                  "analysis": null,
                  "auto_promote": false,
                  "auto_rollback": true,
                  "canary_instances": null,
                  "healthy_deadline": "5m",
                  "max_parallel": 1,
                  "min_healthy_time": "10s",
                  "progress_deadline": "10m",
                  "scale_down_delay": "5m",
                  "steps": [],
                  "strategy": "rolling"
                }
              }
            },
            "action_reason": null,
            "rollout": null
          }
        ]"#]],
    );
}

#[test]
fn same_config_after_a_failed_rollout_rolls_out_again() {
    let mut state = state_with(&[(web(), 1)], &[]);
    let mut failed = web();
    failed.image_digest = digest("bad");
    let service = state.services.get_mut("web").unwrap();
    service.spec = failed.clone();
    let mut release = service.releases[0].clone();
    release.number = 2;
    release.image_digest = failed.image_digest.clone();
    release.config_hash = failed.config_hash();
    release.status = ReleaseStatus::Failed;
    service.releases.push(release);

    let plan = make(&[failed.clone()], &[], &state);
    let change = &plan.resource_changes[0];
    assert_eq!(change.change.actions, ["create", "delete"]);
    assert_eq!(change.action_reason.as_deref(), Some("v2 did not roll out"));
    assert_eq!(change.rollout.as_ref().unwrap().to_release, 3);

    // While that rollout still runs, the same config is no change: it is on its way.
    state.services.get_mut("web").unwrap().rollout =
        Some(crate::rollout::start("d", "web", Some(1), 2, &failed, 0));
    assert!(!make(&[failed], &[], &state).has_changes());
}

#[test]
fn canary_and_blue_green_schedules() {
    let state = state_with(&[(web(), 1)], &[]);
    let mut canary = web();
    canary.image_digest = digest("c0ffee");
    canary.rollout.strategy = Kind::Canary;
    canary.rollout.canary_instances = Some(1);
    canary.rollout.steps = vec![
        CanaryStep {
            weight: 10,
            pause: Some(Duration::from_secs(30)),
        },
        CanaryStep {
            weight: 50,
            pause: None,
        },
    ];
    canary.rollout.analysis = Some(Analysis {
        interval: Duration::from_secs(5),
        max_error_rate: Some(0.01),
        max_p50_latency: None,
        max_p99_latency: Some(Duration::from_millis(300)),
        max_error_rate_increase: None,
        max_p99_increase: Some(0.2),
        min_requests: 50,
        failure_limit: 1,
        inconclusive_limit: 2,
    });
    let plan = make(&[canary], &[], &state);
    let schedule = plan.resource_changes[0].rollout.as_ref().unwrap();
    assert!(schedule.waits_for_promotion);
    // One canary instance up (13s), 30s at 10%, at least one analysis interval (5s) at 50%,
    // then the other two instances up (13s). The manual wait is not counted.
    assert_eq!(schedule.expected_duration, Duration::from_secs(61));
    // The new release ends at full size beside all three stable instances before the switch.
    assert_eq!(
        (schedule.batches.as_slice(), schedule.surge),
        (&[1, 2][..], 3)
    );
    assert_eq!(schedule.warm_for, Some(Duration::from_secs(300)));
    expect![[r#"
          # service.web will be replaced by release v2: image changed, rollout settings changed
          +/- service "web"
              ~ image_digest: sha256:1a2b3c4d5e6f -> sha256:c0ffee000000
              + rollout.analysis.failure_limit: 1
              + rollout.analysis.inconclusive_limit: 2
              + rollout.analysis.interval: "5s"
              + rollout.analysis.max_error_rate: 0.01
              + rollout.analysis.max_p99_increase: 0.2
              + rollout.analysis.max_p99_latency: "300ms"
              + rollout.analysis.min_requests: 50
              + rollout.canary_instances: 1
              + rollout.steps[0].pause: "30s"
              + rollout.steps[0].weight: 10
              + rollout.steps[1].weight: 50
              ~ rollout.strategy: "rolling" -> "canary"
                rollout: canary with 1 instance, 3 at promotion (surge 3), about 1m 1s: 10% for 30s, 50% until promoted, then 100%; analysis every 5s: error rate <= 1%, p99 <= 300ms, p99 <= stable + 20%, at least 50 requests (failure_limit 1, inconclusive_limit 2: too few requests pauses, never promotes); v1 stays warm 5m after promotion; if analysis fails 2 times in a row, or a v2 instance exits or is not healthy within 5m, or v2 is not up within 10m, or on `kiln rollout abort`, every request returns to v1 in one switch (v1 keeps its 3 instances until promotion) and v2 is stopped; during the 5m warm period after promotion `kiln rollout abort` switches back to v1 the same way

        Plan: 0 to create, 1 to replace, 0 to update, 0 to delete.
    "#]].assert_eq(&plan.render());

    let mut blue_green = web();
    blue_green.image_digest = digest("b1de");
    blue_green.rollout.strategy = Kind::BlueGreen;
    blue_green.rollout.auto_rollback = false;
    let plan = make(&[blue_green], &[], &state);
    expect![[r#"
          # service.web will be replaced by release v2: image changed, rollout settings changed
          +/- service "web"
              ~ image_digest: sha256:1a2b3c4d5e6f -> sha256:b1de00000000
              ~ rollout.auto_rollback: true -> false
              ~ rollout.strategy: "rolling" -> "blue_green"
                rollout: blue/green: 3 new instances at once (surge 3), about 13s, then all traffic switches at once after `kiln rollout promote`; v1 stays warm 5m after promotion; if a v2 instance exits or is not healthy within 5m, or v2 is not up within 10m, or on `kiln rollout abort`, every request returns to v1 in one switch (v1 keeps its 3 instances until promotion) and v2 is stopped; during the 5m warm period after promotion `kiln rollout abort` switches back to v1 the same way

        Plan: 0 to create, 1 to replace, 0 to update, 0 to delete.
    "#]].assert_eq(&plan.render());
}

#[test]
fn plan_round_trips_through_json() {
    let state = state_with(&[(web(), 1)], &[]);
    let mut next = web();
    next.image_digest = digest("abc");
    let plan = make(&[next], &[public()], &state);
    let text = serde_json::to_string(&plan).unwrap();
    let back: Plan = serde_json::from_str(&text).unwrap();
    assert_eq!(back, plan);
}

#[test]
fn config_hash_names_the_desired_config() {
    let state = State::default();
    let a = make(&[web()], &[], &state);
    let b = make(&[web()], &[], &state);
    assert_eq!(a.config_hash, b.config_hash);
    let mut other = web();
    other.instances = 4;
    assert_ne!(make(&[other], &[], &state).config_hash, a.config_hash);
}

fn arb_spec() -> impl Strategy<Value = ServiceSpec> {
    (
        "[a-z]{1,6}",
        prop::sample::select(vec!["1a", "2b", "3c"]),
        1u32..6,
        1u16..4,
        prop::collection::btree_map("[A-Z]{1,3}", "[a-z]{0,3}", 0..3),
        any::<bool>(),
        prop::sample::select(vec![Kind::Rolling, Kind::BlueGreen, Kind::Canary]),
        1u32..4,
        0u64..30,
    )
        .prop_map(
            |(name, d, instances, port, env, health, strategy, parallel, min_healthy)| {
                let mut spec = web();
                spec.name = name;
                spec.image_digest = digest(d);
                spec.instances = instances;
                spec.port = port;
                spec.env = env;
                if !health {
                    spec.health = None;
                }
                spec.rollout.strategy = strategy;
                spec.rollout.max_parallel = parallel;
                spec.rollout.min_healthy_time = Duration::from_secs(min_healthy);
                spec
            },
        )
}

fn arb_balancer() -> impl Strategy<Value = BalancerSpec> {
    (
        "[a-z]{1,6}",
        1u16..5,
        prop::collection::vec("/[a-z]{0,3}", 0..3),
    )
        .prop_map(|(name, port, prefixes)| BalancerSpec {
            name,
            listen: format!("127.0.0.1:{port}"),
            routes: prefixes
                .into_iter()
                .map(|path_prefix| Route {
                    host: None,
                    path_prefix,
                    service: "web".into(),
                })
                .collect(),
        })
}

proptest! {
    /// A plan made against the state that applying it leads to has nothing left to do.
    #[test]
    fn applied_config_plans_no_changes(
        services in prop::collection::vec(arb_spec(), 0..5),
        balancers in prop::collection::vec(arb_balancer(), 0..3),
        release in 1u32..5,
    ) {
        let (s, b) = desired(&services, &balancers);
        let state = State {
            services: s.values().map(|spec| (spec.name.clone(), applied(spec, release))).collect(),
            balancers: b.clone(),
            ..State::default()
        };
        let plan = plan("lin", 1, &s, &b, &state);
        prop_assert!(!plan.has_changes(), "{}", plan.render());
        prop_assert_eq!(plan.resource_changes.len(), s.len() + b.len());

        // And from nothing, every resource is created, each service as v1.
        let fresh = super::plan("lin", 0, &s, &b, &State::default());
        prop_assert_eq!(fresh.summary().create, s.len() + b.len());
        for change in fresh.resource_changes.iter().filter(|c| c.kind == "kiln_service") {
            prop_assert_eq!(change.rollout.as_ref().map(|r| r.to_release), Some(1));
        }
    }
}

#[test]
fn a_drift_plan_replaces_drifted_instances_and_stops_unmanaged_ones() {
    use crate::drift::{Category, Finding, Report};
    let mut state = state_with(&[(web(), 2)], &[public()]);
    let instance = |id: &str| crate::state::Instance {
        id: id.into(),
        release: 2,
        port: 41000,
        handle: serde_json::json!({"pid": 1}),
        routable: true,
        retiring: false,
        started_at: "2026-01-01T00:00:00Z".into(),
        replace_because: None,
    };
    let web_state = state.services.get_mut("web").unwrap();
    web_state.instances = vec![instance("web-v2-aaaaaa"), instance("web-v2-bbbbbb")];
    let report = Report {
        findings: vec![
            Finding::new(Category::FileTamper, "sha256:ab…", "sha256:cd…")
                .service("web")
                .release(2)
                .instance("web-v2-aaaaaa")
                .subject("/var/www/index.html"),
            Finding::new(Category::Config, "sha256:11…", "sha256:22…")
                .service("web")
                .release(2)
                .instance("web-v2-aaaaaa")
                .subject("env.GREETING"),
            Finding::new(Category::Unmanaged, "nothing", "a running instance")
                .service("web")
                .instance("web-v9-stray1"),
            Finding::new(Category::State, "sha256:aa…", "sha256:bb…").subject("serial 7"),
        ],
        ..Report::default()
    };
    let plan = drift_plan("lin", 7, &state, &report);
    assert_eq!(
        plan.summary(),
        Summary {
            replace: 1,
            delete: 1,
            ..Summary::default()
        }
    );
    // Nothing of the services or balancers changes.
    assert_eq!(plan.services["web"], state.services["web"].spec);
    check(
        &plan,
        &expect![[r#"
              # instance["web-v9-stray1"] will be stopped: not in the state (a running instance)
              - instance "web-v9-stray1"

              # service.web.instance["web-v2-aaaaaa"] will be replaced because it drifted: file_tamper /var/www/index.html; config env.GREETING
              +/- instance "web-v2-aaaaaa": a new v2 instance starts first; this one is retired once it serves

            Plan: 0 to create, 1 to replace, 0 to update, 1 to delete.

            Not answered by replacing instances:
              state          serial 7: expected sha256:aa…, found sha256:bb…
        "#]],
        &expect![[r#"
            [
              {
                "address": "balancer.public",
                "mode": "managed",
                "type": "kiln_balancer",
                "name": "public",
                "change": {
                  "actions": [
                    "no-op"
                  ],
                  "before": {
                    "listen": "127.0.0.1:8080",
                    "name": "public",
                    "routes": [
                      {
                        "host": null,
                        "path_prefix": "/",
                        "service": "web"
                      }
                    ]
                  },
                  "after": {
                    "listen": "127.0.0.1:8080",
                    "name": "public",
                    "routes": [
                      {
                        "host": null,
                        "path_prefix": "/",
                        "service": "web"
                      }
                    ]
                  }
                },
                "action_reason": null,
                "rollout": null
              },
              {
                "address": "instance[\"web-v9-stray1\"]",
                "mode": "managed",
                "type": "kiln_instance",
                "name": "web-v9-stray1",
                "change": {
                  "actions": [
                    "delete"
                  ],
                  "before": {
                    "drift": "not in the state (a running instance)"
                  },
                  "after": null
                },
                "action_reason": "delete_because_unmanaged",
                "rollout": null
              },
              {
                "address": "service.web",
                "mode": "managed",
                "type": "kiln_service",
                "name": "web",
                "change": {
                  "actions": [
                    "no-op"
                  ],
                  "before": {
                    "env": {
                      "GREETING": "hello"
                    },
                    "health": {
                      "healthy_threshold": 3,
                      "interval": "1s",
                      "path": "/healthz",
                      "timeout": "500ms",
                      "unhealthy_threshold": 3
                    },
                    "image": "web",
                    "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                    "instances": 3,
                    "port": 8080,
                    "rollout": {
                      "analysis": null,
                      "auto_promote": false,
                      "auto_rollback": true,
                      "canary_instances": null,
                      "healthy_deadline": "5m",
                      "max_parallel": 1,
                      "min_healthy_time": "10s",
                      "progress_deadline": "10m",
                      "scale_down_delay": "5m",
                      "steps": [],
                      "strategy": "rolling"
                    }
                  },
                  "after": {
                    "env": {
                      "GREETING": "hello"
                    },
                    "health": {
                      "healthy_threshold": 3,
                      "interval": "1s",
                      "path": "/healthz",
                      "timeout": "500ms",
                      "unhealthy_threshold": 3
                    },
                    "image": "web",
                    "image_digest": "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000",
                    "instances": 3,
                    "port": 8080,
                    "rollout": {
                      "analysis": null,
                      "auto_promote": false,
                      "auto_rollback": true,
                      "canary_instances": null,
                      "healthy_deadline": "5m",
                      "max_parallel": 1,
                      "min_healthy_time": "10s",
                      "progress_deadline": "10m",
                      "scale_down_delay": "5m",
                      "steps": [],
                      "strategy": "rolling"
                    }
                  }
                },
                "action_reason": null,
                "rollout": null
              },
              {
                "address": "service.web.instance[\"web-v2-aaaaaa\"]",
                "mode": "managed",
                "type": "kiln_instance",
                "name": "web-v2-aaaaaa",
                "change": {
                  "actions": [
                    "create",
                    "delete"
                  ],
                  "before": {
                    "drift": "file_tamper /var/www/index.html; config env.GREETING",
                    "release": 2
                  },
                  "after": {
                    "release": 2
                  }
                },
                "action_reason": "replace_because_drift",
                "rollout": null
              }
            ]"#]],
    );
}

#[test]
fn a_changed_drift_block_is_an_update_that_touches_no_instance() {
    let state = state_with(&[(web(), 1)], &[public()]);
    let same = make(&[web()], &[public()], &state)
        .with_drift_settings(crate::model::DriftSettings::default(), &state);
    assert!(!same.has_changes());
    let want = crate::model::DriftSettings {
        interval: Duration::from_secs(10),
        ..crate::model::DriftSettings::default()
    };
    let plan = make(&[web()], &[public()], &state).with_drift_settings(want, &state);
    assert_eq!(plan.drift_settings, Some(want));
    expect![[r#"
          # drift.settings will be updated: drift settings changed
          ~ drift "settings"
              ~ interval: "30s" -> "10s"

        Plan: 0 to create, 0 to replace, 1 to update, 0 to delete.
    "#]]
    .assert_eq(&plan.render());
}

#[test]
fn a_resized_group_is_set_back_by_a_service_update() {
    use crate::drift::{Category, Finding, Report};
    let state = state_with(&[(web(), 2)], &[public()]);
    let report = Report {
        findings: vec![
            Finding::new(Category::Config, "2", "5")
                .service("web")
                .release(2)
                .subject("group kiln-shop-web-v2 desired capacity"),
        ],
        ..Report::default()
    };
    let plan = drift_plan("lin", 7, &state, &report);
    let remedy = plan.drift.as_ref().unwrap();
    assert_eq!(
        remedy.regroup["web"][&2],
        "config group kiln-shop-web-v2 desired capacity"
    );
    assert!(remedy.replace.is_empty() && remedy.remove.is_empty());
    assert_eq!(
        plan.summary(),
        Summary {
            update: 1,
            ..Summary::default()
        }
    );
    let web = plan
        .resource_changes
        .iter()
        .find(|c| c.address == "service.web")
        .unwrap();
    assert_eq!(
        web.action_reason.as_deref(),
        Some("update_because_drift: v2: config group kiln-shop-web-v2 desired capacity")
    );
    // The services themselves do not change.
    assert_eq!(plan.services["web"], state.services["web"].spec);
}
