//! How long `kiln plan` takes on a large project: 1,000 services of 10 instances each.
//!
//! ```sh
//! cargo run --release -p kiln-core --example plan_bench [-- RUNS]   # RUNS defaults to 20
//! ```
//!
//! Everything is built in memory, so only the pure core is timed (no config parsing, no state
//! database): the desired side is 1,000 [`ServiceSpec`]s (10 instances each, three env
//! variables, a health check, rolling updates) and one balancer with a route per service; the
//! [`State`] has every service applied as its third release (v1 and v2 retired, v3 active) with
//! 10 running instances whose handles look like the local driver's. Three cases:
//!
//! - **no changes**: the desired side is exactly what was applied;
//! - **10 % new image**: every tenth service has a new image digest (100 replacements);
//! - **first apply**: the same 1,000 services against an empty state (1,001 creations).
//!
//! For each case it times [`plan`], [`Plan::render`] (what `kiln plan` prints) and the JSON of
//! the plan (`kiln plan --json` pretty-prints it; `kiln plan -out` writes it pretty too), and
//! for context the compact JSON of the whole state, which the server writes on every change and
//! `kiln plan` reads back before planning.
//! Each figure is the median of RUNS runs, with the min and max.

// A benchmark's output is its figures.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use kiln_core::Digest;
use kiln_core::model::{Health, Rollout, Route, Strategy};
use kiln_core::plan::{Plan, plan};
use kiln_core::state::{
    BalancerSpec, Instance, Release, ReleaseStatus, ServiceSpec, ServiceState, State,
};
use serde_json::json;

const SERVICES: usize = 1_000;
const INSTANCES: u32 = 10;

fn rollout() -> Rollout {
    Rollout {
        strategy: Strategy::Rolling,
        steps: Vec::new(),
        analysis: None,
        auto_rollback: true,
        auto_promote: false,
        scale_down_delay: Duration::from_secs(300),
        progress_deadline: Duration::from_secs(600),
        max_parallel: 2,
        min_healthy_time: Duration::from_secs(10),
        healthy_deadline: Duration::from_secs(300),
        canary_instances: None,
        preview_listen: None,
    }
}

fn name(i: usize) -> String {
    format!("svc-{i:04}")
}

fn spec(i: usize, image_generation: u32) -> ServiceSpec {
    ServiceSpec {
        name: name(i),
        image: name(i),
        image_digest: Digest::of(format!("image {i} generation {image_generation}").as_bytes()),
        instances: INSTANCES,
        port: 8080,
        env: BTreeMap::from([
            ("GREETING".to_owned(), "hello".to_owned()),
            ("LOG_LEVEL".to_owned(), "info".to_owned()),
            (
                "DATABASE_URL".to_owned(),
                format!("postgres://db.internal:5432/{}", name(i)),
            ),
        ]),
        health: Some(Health {
            path: "/healthz".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }),
        rollout: rollout(),
        notify: Vec::new(),
    }
}

fn balancer() -> BalancerSpec {
    BalancerSpec {
        name: "public".to_owned(),
        listen: "127.0.0.1:8080".to_owned(),
        routes: (0..SERVICES)
            .map(|i| Route {
                host: None,
                path_prefix: format!("/{}/", name(i)),
                service: name(i),
            })
            .collect(),
    }
}

/// `spec` applied and rolled out as v3 (v1, v2 retired), with 10 running instances.
fn applied(spec: &ServiceSpec, i: usize) -> ServiceState {
    let releases = (1..=3)
        .map(|n| Release {
            number: n,
            image: spec.image.clone(),
            image_digest: spec.image_digest.clone(),
            config_hash: spec.config_hash(),
            port: spec.port,
            env: spec.env.clone(),
            health: spec.health.clone(),
            git_commit: Some(format!("{:040x}", i * 10 + n as usize)),
            deployment_id: format!("00000000-0000-4000-8000-{:012}", i * 10 + n as usize),
            created_at: "2026-01-01T00:00:00Z".to_owned(),
            actor: "bench@host".to_owned(),
            rollback_of: None,
            status: if n == 3 {
                ReleaseStatus::Active
            } else {
                ReleaseStatus::Retired
            },
        })
        .collect();
    let instances = (0..INSTANCES)
        .map(|k| {
            let id = format!("{}-v3-{:06x}", spec.name, i * 16 + k as usize);
            let port = 20_000 + u16::try_from(i).unwrap_or(0) * 10 + k as u16 % 10;
            let pid = 100_000 + i * 20 + 2 * k as usize;
            Instance {
                id: id.clone(),
                release: 3,
                port,
                // The shape of a local-driver handle.
                handle: json!({
                    "id": id,
                    "data": {
                        "id": id,
                        "init": { "ns": "pid:[4026532180]", "pid": pid + 1, "start": 443_281 },
                        "leader": { "pid": pid, "start": 443_281 },
                        "log_path": format!("/srv/app/.kiln/logs/{}/{id}.log", spec.name),
                        "port": port,
                        "program": "/bin/sh",
                        "release": 3,
                        "rootfs": format!("/srv/app/.kiln/rootfs/{}", spec.image_digest.hex()),
                        "sandbox": "bubblewrap",
                        "service": spec.name,
                        "started_at": "2026-01-01T00:00:00Z",
                        "version": 1,
                    },
                }),
                routable: true,
                retiring: false,
                started_at: "2026-01-01T00:00:00Z".to_owned(),
                replace_because: None,
            }
        })
        .collect();
    ServiceState {
        spec: spec.clone(),
        releases,
        stable: Some(3),
        instances,
        rollout: None,
    }
}

/// The wall time of one call of `f`, and its result.
// A benchmark measures and decides nothing, so it reads the clock directly rather than through
// kiln_core::clock (clippy's disallowed-methods is there to keep decisions testable).
#[allow(clippy::disallowed_methods)]
fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let out = black_box(f());
    (start.elapsed(), out)
}

/// Median, min and max of `runs` calls of `f`, and the last result.
fn measure<T>(runs: usize, mut f: impl FnMut() -> T) -> (Stats, T) {
    let (first, mut out) = timed(&mut f);
    let mut times = vec![first];
    for _ in 1..runs {
        let (t, o) = timed(&mut f);
        times.push(t);
        out = o;
    }
    times.sort_unstable();
    let stats = Stats {
        median: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
        runs,
    };
    (stats, out)
}

struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
    runs: usize,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "median {:8.2} ms  (min {:.2}, max {:.2}, n={})",
            ms(self.median),
            ms(self.min),
            ms(self.max),
            self.runs
        )
    }
}

fn row(what: &str, stats: &Stats, extra: &str) {
    println!("  {what:<37} {stats}{extra}");
}

fn case(
    title: &str,
    runs: usize,
    services: &BTreeMap<String, ServiceSpec>,
    balancers: &BTreeMap<String, BalancerSpec>,
    state: &State,
) -> Duration {
    println!("{title}");
    let (stats, p): (Stats, Plan) =
        measure(runs, || plan("lineage", 42, services, balancers, state));
    let s = p.summary();
    row(
        "plan()",
        &stats,
        &format!(
            "  -> {} create, {} replace, {} update, {} delete",
            s.create, s.replace, s.update, s.delete
        ),
    );
    let plan_median = stats.median;
    let (stats, text) = measure(runs, || p.render());
    row(
        "plan.render()",
        &stats,
        &format!("  -> {} bytes", text.len()),
    );
    let (stats, pretty) = measure(runs, || serde_json::to_string_pretty(&p));
    let size = pretty.map_or(0, |j| j.len());
    row(
        "serde_json::to_string_pretty(&plan)",
        &stats,
        &format!("  -> {size} bytes"),
    );
    let (stats, compact) = measure(runs, || serde_json::to_string(&p));
    let size = compact.map_or(0, |j| j.len());
    row(
        "serde_json::to_string(&plan)",
        &stats,
        &format!("  -> {size} bytes"),
    );
    plan_median
}

fn main() {
    let runs = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<usize>().ok())
        .unwrap_or(20)
        .max(1);

    let current: Vec<ServiceSpec> = (0..SERVICES).map(|i| spec(i, 1)).collect();
    let balancers = BTreeMap::from([("public".to_owned(), balancer())]);
    let state = State {
        services: current
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), applied(s, i)))
            .collect(),
        balancers: balancers.clone(),
        listeners: BTreeMap::from([("public".to_owned(), "127.0.0.1:8080".to_owned())]),
        drift: kiln_core::model::DriftSettings::default(),
    };
    let unchanged: BTreeMap<String, ServiceSpec> = current
        .iter()
        .map(|s| (s.name.clone(), s.clone()))
        .collect();
    let tenth_new: BTreeMap<String, ServiceSpec> = (0..SERVICES)
        .map(|i| (name(i), spec(i, if i % 10 == 0 { 2 } else { 1 })))
        .collect();

    let instances: usize = state.services.values().map(|s| s.instances.len()).sum();
    let releases: usize = state.services.values().map(|s| s.releases.len()).sum();
    println!(
        "plan_bench: {SERVICES} services x {INSTANCES} instances; state: {instances} instances, \
         {releases} releases; 1 balancer with {SERVICES} routes; {runs} runs per figure"
    );

    let worst = [
        case(
            "no changes (everything applied):",
            runs,
            &unchanged,
            &balancers,
            &state,
        ),
        case(
            "10 % of services with a new image digest:",
            runs,
            &tenth_new,
            &balancers,
            &state,
        ),
        case(
            "first apply (empty state):",
            runs,
            &unchanged,
            &balancers,
            &State::default(),
        ),
    ]
    .into_iter()
    .max()
    .unwrap_or_default();

    println!("for context, the state document:");
    let (stats, json) = measure(runs, || serde_json::to_string(&state));
    let json = json.unwrap_or_default();
    row(
        "serde_json::to_string(&state)",
        &stats,
        &format!("  -> {} bytes", json.len()),
    );
    // `kiln plan` reads the state back from the database before planning.
    let (stats, back) = measure(runs, || serde_json::from_str::<State>(&json));
    let ok = if back.is_ok_and(|b| b == state) {
        "  -> equal to the original"
    } else {
        "  -> NOT EQUAL"
    };
    row("serde_json::from_str::<State>", &stats, ok);
    println!(
        "slowest plan() median: {:.2} ms (goal < 1000 ms)",
        worst.as_secs_f64() * 1000.0
    );
}
