//! Fixtures: real kiln plans (made by `kiln_core::plan::plan`) turned into policy input.

#![allow(dead_code, reason = "each test file uses some of the fixtures")]
#![allow(clippy::unwrap_used, reason = "fixtures panic when broken")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln_core::Digest;
use kiln_core::model::{Analysis, CanaryStep, Health, Rollout, Route, Strategy};
use kiln_core::plan::plan;
use kiln_core::state::{BalancerSpec, Release, ReleaseStatus, ServiceSpec, ServiceState, State};
use kiln_policy::{
    BuiltinSettings, Context, Decision, Environment, GitFacts, ImageFacts, Limits, build_input,
    builtin_pack, evaluate,
};
use serde_json::Value;

/// A digest that reads well in messages: `prefix` padded with zeros.
pub fn digest(prefix: &str) -> Digest {
    Digest::from_hex(&format!("{prefix:0<64}")).unwrap()
}

pub fn analysis() -> Analysis {
    Analysis {
        interval: Duration::from_secs(10),
        max_error_rate: Some(0.01),
        max_p50_latency: None,
        max_p99_latency: Some(Duration::from_millis(300)),
        max_error_rate_increase: Some(0.005),
        max_p99_increase: None,
        min_requests: 50,
        failure_limit: 0,
        inconclusive_limit: 3,
    }
}

/// A canary with analysis: what a protected environment wants.
pub fn canary() -> Rollout {
    Rollout {
        strategy: Strategy::Canary,
        steps: vec![
            CanaryStep {
                weight: 10,
                pause: Some(Duration::from_secs(30)),
            },
            CanaryStep {
                weight: 50,
                pause: None,
            },
        ],
        analysis: Some(analysis()),
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

pub fn health() -> Health {
    Health {
        path: "/healthz".into(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        healthy_threshold: 3,
        unhealthy_threshold: 3,
    }
}

/// A service that passes every built-in check.
pub fn service(name: &str, image_digest: Digest) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        image: name.into(),
        image_digest,
        instances: 3,
        port: 8080,
        env: BTreeMap::from([("DATABASE_PASSWORD".into(), "hunter2".into())]),
        health: Some(health()),
        rollout: canary(),
        notify: Vec::new(),
    }
}

/// An image record that passes every built-in check.
pub fn image(name: &str, digest: Digest) -> ImageFacts {
    ImageFacts {
        name: name.into(),
        digest,
        in_store: true,
        verified: true,
        labels: BTreeMap::from([
            ("version".into(), "1.0.0".into()),
            ("org.opencontainers.image.revision".into(), "abc123".into()),
        ]),
        git: Some(GitFacts {
            commit: "abc123".into(),
            dirty: false,
        }),
        created: Some("2026-11-28T12:00:00Z".into()),
        age_seconds: Some(86_400),
        ancestry: Vec::new(),
        revoked: None,
        entrypoint: vec!["/bin/app".into()],
        cmd: vec!["--serve".into()],
        exposed_ports: vec![8080],
    }
}

/// The state after `spec` was applied as release 1.
pub fn applied(spec: &ServiceSpec) -> ServiceState {
    ServiceState {
        spec: spec.clone(),
        releases: vec![Release {
            number: 1,
            image: spec.image.clone(),
            image_digest: spec.image_digest.clone(),
            config_hash: spec.config_hash(),
            port: spec.port,
            env: spec.env.clone(),
            health: spec.health.clone(),
            git_commit: None,
            deployment_id: "d1".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            actor: "test@host".into(),
            status: ReleaseStatus::Active,
            rollback_of: None,
        }],
        stable: Some(1),
        instances: Vec::new(),
        rollout: None,
    }
}

/// A project and the plan kiln would make for it.
#[derive(Debug, Clone)]
pub struct World {
    pub desired: BTreeMap<String, ServiceSpec>,
    pub balancers: BTreeMap<String, BalancerSpec>,
    pub state: State,
    pub context: Context,
}

impl World {
    /// `web` (3 instances, canary with analysis, health check) runs `sha256:0ld…` as v1 and
    /// the config moves it to `sha256:1a2b3c4d5e6f…`, in the protected environment `prod`:
    /// a replacement that passes every built-in check.
    pub fn new() -> Self {
        let new = digest("1a2b3c4d5e6f");
        let old = digest("0a0b0c0d0e0f");
        let desired = BTreeMap::from([("web".to_owned(), service("web", new.clone()))]);
        let mut state = State::default();
        state
            .services
            .insert("web".into(), applied(&service("web", old.clone())));
        let balancers = BTreeMap::from([(
            "public".to_owned(),
            BalancerSpec {
                name: "public".into(),
                listen: "127.0.0.1:8080".into(),
                routes: vec![Route {
                    host: None,
                    path_prefix: "/".into(),
                    service: "web".into(),
                }],
            },
        )]);
        let context = Context {
            environment: Environment {
                name: "prod".into(),
                protected: true,
            },
            actor: "alice@build-1".into(),
            now: "2026-11-29T12:00:00Z".into(),
            images: BTreeMap::from([
                (new.clone(), image("web", new)),
                (old.clone(), image("web", old)),
            ]),
        };
        Self {
            desired,
            balancers,
            state,
            context,
        }
    }

    /// The same in the unprotected environment `dev`.
    pub fn dev() -> Self {
        let mut w = Self::new();
        w.context.environment = Environment {
            name: "dev".into(),
            protected: false,
        };
        w
    }

    pub fn web(&mut self) -> &mut ServiceSpec {
        self.desired.get_mut("web").unwrap()
    }

    /// The record of the image `web` is moving to.
    pub fn web_image(&mut self) -> &mut ImageFacts {
        let d = self.desired["web"].image_digest.clone();
        self.context.images.get_mut(&d).unwrap()
    }

    pub fn input(&self) -> Value {
        let p = plan("lineage", 1, &self.desired, &self.balancers, &self.state);
        build_input(&p, &self.context)
    }

    pub fn check(&self, settings: &BuiltinSettings) -> Decision {
        evaluate(&[builtin_pack(settings)], &self.input(), &Limits::default()).unwrap()
    }

    /// The built-in pack's messages, `rule: message`.
    pub fn messages(&self) -> Vec<String> {
        messages(&self.check(&BuiltinSettings::default()))
    }
}

pub fn messages(d: &Decision) -> Vec<String> {
    d.results
        .iter()
        .map(|o| format!("{}: {}", o.rule, o.message))
        .collect()
}

pub fn disabled(ids: &[&str]) -> BuiltinSettings {
    BuiltinSettings {
        disabled: ids.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>(),
        ..BuiltinSettings::default()
    }
}
