//! `kiln server`: the control plane in the foreground (for systemd, or started by `kiln up`).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_core::clock::{Clock, SystemClock};
use kiln_engine::{Engine, EngineConfig};

use crate::cmd::deploy::paths;
use crate::project::GlobalArgs;

/// Runs until SIGINT/SIGTERM (instances keep running and are re-adopted by the next server) or
/// `kiln down` (instances are stopped first).
pub fn run(global: &GlobalArgs) -> Result<ExitCode> {
    let paths = paths(global);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let driver = Arc::new(kiln_driver_local::LocalDriver::new(
            paths.runtime(),
            clock.clone(),
        ));
        let proxy = Arc::new(kiln_proxy::Proxy::new(kiln_proxy::ProxyConfig::default()));
        let mut cfg = EngineConfig::new(paths.clone());
        cfg.store = global.store_path();
        let engine = Engine::open(cfg, driver, proxy, clock).with_context(|| {
            format!("cannot open the project state in {}", paths.root.display())
        })?;
        engine
            .recover()
            .await
            .context("recovering after a restart")?;
        eprintln!(
            "kiln server {} listening on {}",
            std::process::id(),
            paths.socket().display()
        );
        kiln_engine::server::serve(engine).await?;
        Ok(ExitCode::SUCCESS)
    })
}
