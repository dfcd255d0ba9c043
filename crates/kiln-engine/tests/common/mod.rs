//! One engine on the fake driver and the real proxy, for the engine's integration tests: a
//! config with one service whose `rollout` block (and optional `notify` hooks) a test chooses,
//! applied through the real bake, plan and apply path.

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::clock::{Clock, SystemClock};
use kiln_core::config::{Source, load};
use kiln_core::state::{State, desired};
use kiln_driver::fake::{FakeControl, FakeDriver};
use kiln_engine::api::{ApplyRequest, ApplyResponse, Status};
use kiln_engine::{Engine, EngineConfig, Paths};

/// A rolling update with fast health, a short warm period.
pub const ROLLING: &str = r#"
    min_healthy_time = "100ms"
    healthy_deadline = "2s"
    scale_down_delay = "100ms"
"#;

const CONFIG: &str = r#"
project = "p"
variable "greeting" { default = "one" }
image "app" { entrypoint = ["/app"] }
service "web" {
  image     = image.app
  instances = 2
  port      = 8080
  env       = { GREETING = var.greeting }
  health {
    path              = "/healthz"
    interval          = "50ms"
    timeout           = "200ms"
    healthy_threshold = 1
  }
  rollout {
ROLLOUT
  }
NOTIFY
}
"#;

/// A running engine over a scratch project; stops its reconcile loop when dropped.
pub struct World {
    rollout: String,
    notify: String,
    _dir: tempfile::TempDir,
    pub paths: Paths,
    pub engine: Engine,
    pub control: FakeControl,
    stop: tokio::sync::watch::Sender<bool>,
    runner: Option<tokio::task::JoinHandle<()>>,
}

/// An engine whose service uses `rollout` (the body of its `rollout` block) and posts its
/// events to `webhook`, if given.
pub async fn world_with(rollout: &str, webhook: Option<&str>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path().join(".kiln"));
    paths.create().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let control = FakeControl::new();
    let driver = Arc::new(FakeDriver::new(control.clone(), clock.clone()));
    let proxy = Arc::new(kiln_proxy::Proxy::new(kiln_proxy::ProxyConfig::default()));
    let mut cfg = EngineConfig::new(paths.clone());
    cfg.tick = Duration::from_millis(50);
    cfg.drain_timeout = Duration::from_secs(2);
    let engine = Engine::open(cfg, driver, proxy, clock).unwrap();
    engine.recover().await.unwrap();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let runner = engine.clone();
    let runner = tokio::spawn(async move {
        runner
            .run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
    });
    World {
        rollout: rollout.to_owned(),
        notify: webhook
            .map(|url| format!("  notify {{ webhook = \"{url}\" }}"))
            .unwrap_or_default(),
        _dir: dir,
        paths,
        engine,
        control,
        stop,
        runner: Some(runner),
    }
}

impl World {
    /// Bakes the (empty) image and applies the config with `greeting`.
    pub async fn apply(&self, greeting: &str) -> Result<ApplyResponse, kiln_engine::Error> {
        self.apply_with(greeting, None).await
    }

    /// [`World::apply`], also setting the `drift` block's settings when given.
    pub async fn apply_with(
        &self,
        greeting: &str,
        drift: Option<kiln_core::model::DriftSettings>,
    ) -> Result<ApplyResponse, kiln_engine::Error> {
        let overrides = [kiln_core::model::VarOverride {
            name: "greeting".into(),
            value: greeting.into(),
            source: kiln_core::model::VarSource::Flag,
        }];
        let text = CONFIG
            .replace("ROLLOUT", &self.rollout)
            .replace("NOTIFY", &self.notify);
        let source = Source {
            name: "kiln.hcl".into(),
            text,
        };
        let (config, diags) = load(&source, &overrides);
        assert!(diags.is_empty(), "{diags:?}");
        let config = config.unwrap();
        let store = kiln_bake::Store::open(&self.paths.store()).unwrap();
        let settings = kiln_bake::BakeSettings {
            context_dir: self.paths.root.clone(),
            epoch: 0,
            git: None,
            kiln_version: "test".into(),
            host: "test".into(),
            bwrap: None,
        };
        let records =
            kiln_bake::bake(&store, &config, &[], &settings, &SystemClock, &mut |_| {}).unwrap();
        let digests: BTreeMap<_, _> = records
            .iter()
            .map(|r| (r.name.clone(), r.digest.clone()))
            .collect();
        let (services, balancers, _) = desired(&config, &digests);
        let db = kiln_state::StateStore::open(&self.paths.state_db(), SystemClock.now()).unwrap();
        let current = db.read::<State>().unwrap();
        let mut plan = kiln_core::plan::plan(
            &current.lineage,
            current.serial,
            &services,
            &balancers,
            &current.doc,
        );
        if let Some(settings) = drift {
            plan = plan.with_drift_settings(settings, &current.doc);
        }
        self.engine
            .apply(ApplyRequest {
                plan,
                actor: "test@host".into(),
                git_commit: None,
            })
            .await
    }

    /// Polls the engine's status until `done` holds (bounded: 10 s).
    pub async fn until(&self, what: &str, done: impl Fn(&Status) -> bool) -> Status {
        for _ in 0..500 {
            let status = self.engine.status().await;
            if done(&status) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "timed out waiting until {what}: {:#?}",
            self.engine.status().await
        );
    }
}

impl World {
    /// Stops the reconcile loop (instances keep running): nothing heals or re-syncs after
    /// this, so a test can look at a world it has just changed.
    pub async fn pause(&mut self) {
        let _ = self.stop.send(true);
        if let Some(runner) = self.runner.take() {
            runner.await.unwrap();
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// `release` alone serves the service with `n` healthy routed instances, and no rollout runs.
pub fn serving(s: &Status, release: u32, n: usize) -> bool {
    let svc = &s.services[0];
    svc.rollout.is_none()
        && svc.stable == Some(release)
        && svc.instances.len() == n
        && svc
            .instances
            .iter()
            .all(|i| i.release == release && i.routable && i.health == "healthy")
}
