//! Times `evaluate` with the built-in pack on a plan of 1,000 services.
//!
//! ```console
//! $ cargo run --release -p kiln-policy --example policy_bench
//! ```
//!
//! Every service gets a new release (a replacement: the checks that look at releases all
//! run), with a health check, a canary with analysis and a labelled image, in a protected
//! environment; so every check runs on every service and passes.

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::disallowed_methods,
    reason = "a benchmark: prints, panics on broken fixtures and reads the monotonic clock"
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kiln_core::Digest;
use kiln_core::model::{Analysis, CanaryStep, Health, Rollout, Strategy};
use kiln_core::plan::plan;
use kiln_core::state::{Release, ReleaseStatus, ServiceSpec, ServiceState, State};
use kiln_policy::{
    BuiltinSettings, Context, Environment, Evaluator, GitFacts, ImageFacts, Limits, build_input,
    builtin_pack, evaluate,
};

const SERVICES: usize = 1000;
const RUNS: usize = 10;

fn spec(name: &str, digest: Digest) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        image: name.into(),
        image_digest: digest,
        instances: 3,
        port: 8080,
        env: BTreeMap::from([
            ("DATABASE_URL".into(), format!("postgres://db/{name}")),
            ("LOG_LEVEL".into(), "info".into()),
        ]),
        health: Some(Health {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 3,
            unhealthy_threshold: 3,
        }),
        rollout: Rollout {
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
            analysis: Some(Analysis {
                interval: Duration::from_secs(10),
                max_error_rate: Some(0.01),
                max_p50_latency: None,
                max_p99_latency: Some(Duration::from_millis(300)),
                max_error_rate_increase: Some(0.005),
                max_p99_increase: None,
                min_requests: 50,
                failure_limit: 0,
                inconclusive_limit: 3,
            }),
            auto_rollback: true,
            auto_promote: false,
            scale_down_delay: Duration::from_secs(300),
            progress_deadline: Duration::from_secs(600),
            max_parallel: 1,
            min_healthy_time: Duration::from_secs(10),
            healthy_deadline: Duration::from_secs(300),
            canary_instances: None,
            preview_listen: None,
        },
        notify: Vec::new(),
    }
}

fn image(name: &str, digest: Digest, base: &Digest) -> ImageFacts {
    ImageFacts {
        name: name.into(),
        digest,
        in_store: true,
        verified: true,
        labels: BTreeMap::from([
            ("version".into(), "1.4.2".into()),
            ("org.opencontainers.image.revision".into(), "abc123".into()),
        ]),
        git: Some(GitFacts {
            commit: "abc123".into(),
            dirty: false,
        }),
        created: Some("2026-11-20T12:00:00Z".into()),
        age_seconds: Some(9 * 86_400),
        ancestry: vec![base.clone()],
        revoked: None,
        entrypoint: vec!["/bin/app".into()],
        cmd: vec!["--serve".into()],
        exposed_ports: vec![8080],
    }
}

fn input() -> serde_json::Value {
    let base = Digest::of(b"base");
    let mut desired = BTreeMap::new();
    let mut state = State::default();
    let mut images = BTreeMap::new();
    images.insert(base.clone(), image("base", base.clone(), &base));
    for i in 0..SERVICES {
        let name = format!("svc{i:04}");
        let old = Digest::of(format!("{name} v1").as_bytes());
        let new = Digest::of(format!("{name} v2").as_bytes());
        let old_spec = spec(&name, old.clone());
        state.services.insert(
            name.clone(),
            ServiceState {
                spec: old_spec.clone(),
                releases: vec![Release {
                    number: 1,
                    image: name.clone(),
                    image_digest: old,
                    config_hash: old_spec.config_hash(),
                    port: 8080,
                    env: old_spec.env.clone(),
                    health: old_spec.health.clone(),
                    git_commit: None,
                    deployment_id: "d1".into(),
                    created_at: "2026-11-01T00:00:00Z".into(),
                    actor: "bench@host".into(),
                    status: ReleaseStatus::Active,
                    rollback_of: None,
                }],
                stable: Some(1),
                instances: Vec::new(),
                rollout: None,
            },
        );
        images.insert(new.clone(), image(&name, new.clone(), &base));
        desired.insert(name.clone(), spec(&name, new));
    }
    let p = plan("bench", 1, &desired, &BTreeMap::new(), &state);
    let context = Context {
        environment: Environment {
            name: "prod".into(),
            protected: true,
        },
        actor: "bench@host".into(),
        now: "2026-11-29T12:00:00Z".into(),
        images,
    };
    build_input(&p, &context)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let t = Instant::now();
    let input = input();
    let build = t.elapsed();
    let bytes = serde_json::to_vec(&input).unwrap().len();
    let sets = [builtin_pack(&BuiltinSettings::default())];
    let limits = Limits {
        timeout: Duration::from_secs(60),
    };
    println!(
        "input: {SERVICES} services, {} resource changes, {} images, {:.1} MB of JSON (built in {})",
        input["resource_changes"].as_array().unwrap().len(),
        input["kiln"]["images"].as_object().unwrap().len(),
        bytes as f64 / 1e6,
        ms(build),
    );

    // The share of handing the document to regorus (part of every evaluation).
    let t = Instant::now();
    let converted = <regorus::Value as serde::Deserialize>::deserialize(&input).unwrap();
    let convert = t.elapsed();
    drop(converted);

    // First evaluation: parse + compile + evaluate.
    let t = Instant::now();
    let first = evaluate(&sets, &input, &limits).unwrap();
    let first_time = t.elapsed();
    assert!(first.passed(), "{}", first.render());
    assert!(first.results.is_empty(), "{}", first.render());

    // `evaluate` again: every call parses and compiles the pack anew.
    let runs: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            let d = evaluate(&sets, &input, &limits).unwrap();
            assert!(d.results.is_empty());
            t.elapsed()
        })
        .collect();

    // A kept Evaluator: parsed once, compiled on its first evaluation.
    let mut evaluator = Evaluator::new(&sets).unwrap();
    evaluator.evaluate(&input, &limits).unwrap();
    let kept: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            evaluator.evaluate(&input, &limits).unwrap();
            t.elapsed()
        })
        .collect();

    println!(
        "first evaluate (parse + compile + eval): {}",
        ms(first_time)
    );
    println!(
        "evaluate, median of {RUNS}: {} (min {}, max {})",
        ms(median(runs.clone())),
        ms(*runs.iter().min().unwrap()),
        ms(*runs.iter().max().unwrap()),
    );
    println!(
        "kept Evaluator, median of {RUNS}: {} (min {}, max {})",
        ms(median(kept.clone())),
        ms(*kept.iter().min().unwrap()),
        ms(*kept.iter().max().unwrap()),
    );
    println!(
        "of which: input to regorus::Value {}; decision.duration of the first {}",
        ms(convert),
        ms(first.duration),
    );
    println!("bundle {}", first.bundles[0].1);
}
