//! Drift detection and remediation on the fake driver and the real proxy: each category made
//! to happen (an instance's environment or root changed under it, an instance killed, a stray
//! instance, a proxy table changed behind the engine's back, the state file written or edited
//! by hand), then found by `Engine::drift`; and a remediation plan that replaces exactly the
//! drifted instance.

#![allow(clippy::unwrap_used)]

use kiln_core::drift::{Category, Report};
use kiln_engine::api::ApplyRequest;
use kiln_proxy::{Pool, ServiceTable};

mod common;

use common::{ROLLING, World, serving, world_with};

/// v1 serving with 2 instances.
async fn deployed() -> World {
    let w = world_with(ROLLING, None).await;
    w.apply("one").await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    w
}

async fn apply(w: &World, plan: kiln_core::plan::Plan) {
    let req = ApplyRequest {
        plan,
        actor: "test@host".into(),
        git_commit: None,
    };
    w.engine.apply(req).await.unwrap();
}

fn categories(report: &Report) -> Vec<Category> {
    report.findings.iter().map(|f| f.category).collect()
}

async fn instance_ids(w: &World) -> Vec<String> {
    let status = w.engine.status().await;
    status.services[0]
        .instances
        .iter()
        .map(|i| i.id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_deployment_has_no_drift() {
    let w = deployed().await;
    let report = w.engine.drift(None, true).await.unwrap();
    assert!(report.is_clean(), "{}", report.render());
    assert_eq!(report.instances_checked, 2);
    assert_eq!(report.roots_verified, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_changed_under_an_instance_is_config_drift_without_its_value() {
    let w = deployed().await;
    let id = instance_ids(&w).await[0].clone();
    assert!(w.control.tamper_env(&id, "GREETING", Some("s3cret-value")));
    let report = w.engine.drift(None, false).await.unwrap();
    assert_eq!(
        categories(&report),
        [Category::Config],
        "{}",
        report.render()
    );
    let f = &report.findings[0];
    assert_eq!(f.instance.as_deref(), Some(id.as_str()));
    assert_eq!(f.subject.as_deref(), Some("env.GREETING"));
    let json = serde_json::to_string(&report).unwrap();
    assert!(
        !json.contains("s3cret-value") && !json.contains("\"one\""),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_root_is_not_its_image_is_an_image_mismatch() {
    let w = deployed().await;
    let id = instance_ids(&w).await[1].clone();
    assert!(w.control.swap_root(&id, false));
    let report = w.engine.drift(None, false).await.unwrap();
    assert_eq!(
        categories(&report),
        [Category::ImageMismatch],
        "{}",
        report.render()
    );
    assert_eq!(report.findings[0].instance.as_deref(), Some(id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_missing_until_healing_replaces_it() {
    let mut w = deployed().await;
    w.pause().await;
    let id = instance_ids(&w).await[0].clone();
    assert!(w.control.kill(&id));
    let report = w.engine.drift(None, false).await.unwrap();
    assert_eq!(
        categories(&report),
        [Category::Missing],
        "{}",
        report.render()
    );
    assert_eq!(report.findings[0].instance.as_deref(), Some(id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_instance_is_unmanaged() {
    let w = deployed().await;
    let spec = kiln_driver::InstanceSpec::new(
        "web-v7-stray0",
        "web",
        7,
        kiln_driver::free_port().unwrap(),
    )
    .with_args(["/app"])
    .with_log_path(w.paths.root.join("stray.log"));
    w.control.start_stray(&spec).unwrap();
    let report = w.engine.drift(None, false).await.unwrap();
    assert_eq!(
        categories(&report),
        [Category::Unmanaged],
        "{}",
        report.render()
    );
    assert_eq!(
        report.findings[0].instance.as_deref(),
        Some("web-v7-stray0")
    );

    // The remediation plan stops it and changes nothing else.
    let plan = w.engine.drift_plan(&report).await;
    assert_eq!(plan.summary().delete, 1);
    assert_eq!(plan.summary().total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_changed_in_the_proxy_behind_the_engines_back_is_routing_drift() {
    let w = deployed().await;
    let snapshot = w.engine.traffic().snapshot();
    let pool = &snapshot.services[0].pools[0];
    // Everything to a pool of a release that does not exist, and v1 weighted 0.
    let backends = pool
        .backends
        .iter()
        .map(|b| kiln_proxy::BackendSpec {
            id: b.id.clone(),
            addr: b.addr,
            routable: b.routable,
        })
        .collect();
    w.engine.traffic().set_service(
        "web",
        ServiceTable {
            pools: vec![Pool {
                release: 1,
                weight: 0,
                backends,
                health: None,
            }],
            health: None,
            preview: None,
        },
    );
    let report = w.engine.drift(None, false).await.unwrap();
    assert_eq!(
        categories(&report),
        [Category::Routing],
        "{}",
        report.render()
    );
    assert_eq!(report.findings[0].expected, "v1 weight 2");
    assert_eq!(report.findings[0].found, "v1 weight 0");

    // The remediation hands kiln's table over again.
    let plan = w.engine.drift_plan(&report).await;
    assert_eq!(plan.summary().update, 1);
    apply(&w, plan).await;
    w.until("the weights are kiln's again", |_| {
        w.engine.traffic().snapshot().services[0].pools[0].weight == 2
    })
    .await;
    let report = w.engine.drift(None, false).await.unwrap();
    assert!(report.is_clean(), "{}", report.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_edited_by_hand_is_state_drift() {
    let w = deployed().await;
    let db = w.paths.state_db();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE versions SET doc = replace(doc, '\"one\"', '\"two\"') \
         WHERE serial = (SELECT max(serial) FROM versions)",
        [],
    )
    .unwrap();
    drop(conn);
    assert_state_findings(&w, "hashes to").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_written_outside_this_server_is_state_drift() {
    let w = deployed().await;
    let store = kiln_state::StateStore::open(
        &w.paths.state_db(),
        kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock),
    )
    .unwrap();
    let current = store.read::<serde_json::Value>().unwrap();
    let meta = kiln_state::WriteMeta {
        actor: "mallory@elsewhere".into(),
        operation: "hand edit".into(),
    };
    store
        .write(
            current.serial,
            &current.doc,
            &meta,
            &[],
            kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock),
        )
        .unwrap();
    assert_state_findings(&w, "mallory@elsewhere").await;
}

/// Every finding is about the state, and one of them found `found`.
async fn assert_state_findings(w: &World, found: &str) {
    let report = w.engine.drift(None, false).await.unwrap();
    let all_state = categories(&report).iter().all(|c| *c == Category::State);
    assert!(all_state && !report.is_clean(), "{}", report.render());
    assert!(
        report.findings.iter().any(|f| f.found.contains(found)),
        "{}",
        report.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_replaces_exactly_the_drifted_instance_before_retiring_it() {
    let w = deployed().await;
    let ids = instance_ids(&w).await;
    let (drifted, untouched) = (ids[0].clone(), ids[1].clone());
    assert!(w.control.tamper_env(&drifted, "GREETING", Some("other")));
    let report = w.engine.drift(None, false).await.unwrap();
    let plan = w.engine.drift_plan(&report).await;
    assert_eq!(plan.summary().replace, 1);
    let change = plan
        .resource_changes
        .iter()
        .find(|c| c.kind == "kiln_instance")
        .unwrap();
    assert_eq!(change.name, drifted);
    assert_eq!(
        change.action_reason.as_deref(),
        Some("replace_because_drift")
    );
    apply(&w, plan).await;
    // Two instances serve throughout: the replacement is routed before the drifted one goes.
    let done = w
        .until("the drifted instance is replaced", |s| {
            let svc = &s.services[0];
            let routed = svc
                .instances
                .iter()
                .filter(|i| i.routable && !i.retiring)
                .count();
            assert!(routed >= 2, "capacity dropped: {svc:#?}");
            serving(s, 1, 2) && svc.instances.iter().all(|i| i.id != drifted)
        })
        .await;
    let now: Vec<&str> = done.services[0]
        .instances
        .iter()
        .map(|i| i.id.as_str())
        .collect();
    assert!(now.contains(&untouched.as_str()), "{now:?}");
    assert_eq!(done.services[0].stable, Some(1), "no new release");
    let report = w.engine.drift(None, false).await.unwrap();
    assert!(report.is_clean(), "{}", report.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_mode_finds_drift_on_its_own_and_auto_remediate_replaces_it() {
    let w = world_with(ROLLING, None).await;
    let settings = kiln_core::model::DriftSettings {
        interval: std::time::Duration::from_millis(100),
        auto_remediate: true,
        watch: false,
        full_every: 1,
    };
    w.apply_with("one", Some(settings)).await.unwrap();
    w.until("v1 serves", |s| serving(s, 1, 2)).await;
    let drifted = instance_ids(&w).await[0].clone();
    assert!(w.control.tamper_env(&drifted, "GREETING", Some("other")));
    // Nobody calls `drift`: the server's own timed check finds it and replaces the instance.
    let done = w
        .until("the drifted instance is replaced on its own", |s| {
            serving(s, 1, 2) && s.services[0].instances.iter().all(|i| i.id != drifted)
        })
        .await;
    assert_eq!(done.services[0].stable, Some(1));
    let events = w.engine.events(0).unwrap();
    let found = events.iter().any(|e| {
        e.kind == "drift" && e.message.contains("drift found") && e.message.contains(&drifted)
    });
    assert!(found, "{events:#?}");
    let applied = events
        .iter()
        .any(|e| e.kind == "drift" && e.message.starts_with(&format!("replacing {drifted}")));
    assert!(applied, "{events:#?}");
}
