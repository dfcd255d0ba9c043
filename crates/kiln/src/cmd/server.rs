//! `kiln server`: the control plane in the foreground (for systemd, or started by `kiln up`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_core::clock::{Clock, SystemClock};
use kiln_driver::Driver;
use kiln_engine::{Engine, EngineConfig};
use kiln_proxy::Traffic;

use crate::cmd::deploy::paths;
use crate::project::{GlobalArgs, Project};

/// Runs until SIGINT/SIGTERM (instances keep running and are re-adopted by the next server) or
/// `kiln down` (instances are stopped first).
/// `kiln server` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// With a team state backend: how long to wait for another server to let its lease go.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    lock_timeout: Duration,
    /// Stop after this long with nothing to do (no rollout, no warm release, no request).
    /// Commands that start a server on a team backend set it, so that the next machine's
    /// server can take the lease.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    idle_exit: Option<Duration>,
}

pub fn run(global: &GlobalArgs, args: &Args) -> Result<ExitCode> {
    let paths = paths(global);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let project = load(global)?;
        let (driver, traffic) = match target(project.as_ref()) {
            Target::Local => {
                let driver: Arc<dyn Driver> = Arc::new(kiln_driver_local::LocalDriver::new(
                    paths.runtime(),
                    clock.clone(),
                ));
                let proxy = kiln_proxy::Proxy::new(kiln_proxy::ProxyConfig::default());
                let traffic: Arc<dyn Traffic> = Arc::new(proxy);
                (driver, traffic)
            }
            Target::Aws(project) => aws::runtime(project).await?,
        };
        eprintln!(
            "kiln server: instances on the {} runtime, traffic through the {}",
            driver.name(),
            traffic.kind()
        );
        let mut cfg = EngineConfig::new(paths.clone());
        cfg.store = global.store_path();
        cfg.idle_exit = args.idle_exit;
        cfg.remote_wait = args.lock_timeout;
        if let Some(backend) = project.as_ref().and_then(|p| p.config.backend.as_ref()) {
            let remote = aws::remote(backend)?;
            eprintln!("kiln server: the state is shared in {}", remote.describe());
            cfg.remote = Some(remote);
        }
        let engine = Engine::open(cfg, driver, traffic, clock).with_context(|| {
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
        let served = kiln_engine::server::serve(engine.clone()).await;
        let released = engine.release_remote();
        served?;
        released.context("releasing the team state lock")?;
        match engine.halted() {
            Some(kiln_engine::Halt::Failed(why)) => {
                eprintln!("kiln server stopped: {why}");
                Ok(ExitCode::FAILURE)
            }
            Some(kiln_engine::Halt::Idle) => {
                eprintln!(
                    "kiln server stopped: nothing to do for {}",
                    humantime::format_duration(args.idle_exit.unwrap_or_default())
                );
                Ok(ExitCode::SUCCESS)
            }
            None => Ok(ExitCode::SUCCESS),
        }
    })
}

/// Where the server runs instances.
enum Target<'p> {
    /// The local runtime behind kiln's proxy.
    Local,
    /// AWS, as the config's `target "aws"` block says.
    Aws(&'p Project),
}

/// The project's config, when there is one: a server needs none to run what the state
/// holds on the local runtime.
fn load(global: &GlobalArgs) -> Result<Option<Project>> {
    if !global.config.exists() {
        return Ok(None);
    }
    global.load().map(Some)
}

/// The project's target: AWS when its config names `target.aws`, else the local runtime.
fn target(project: Option<&Project>) -> Target<'_> {
    match project {
        Some(p) if p.config.target() == kiln_core::model::TargetKind::Aws => Target::Aws(p),
        _ => Target::Local,
    }
}

#[cfg(feature = "aws")]
mod aws {
    use std::sync::Arc;

    use anyhow::{Context, Result};
    use kiln_driver::Driver;
    use kiln_proxy::Traffic;

    use crate::project::Project;

    /// The AWS driver and the ALB traffic layer for the project's `target "aws"`.
    pub async fn runtime(project: &Project) -> Result<(Arc<dyn Driver>, Arc<dyn Traffic>)> {
        let config = &project.config;
        let target = config
            .aws
            .as_ref()
            .context("the config has services on target.aws but no target \"aws\" block")?;
        let conf = kiln_aws::sdk_config(&kiln_aws::AwsSettings {
            region: target.region.clone(),
            endpoint_url: target.endpoint_url.clone(),
        })
        .await;
        let fleet = kiln_aws::Fleet::new(&conf, &config.project, crate::aws::fleet_target(target));
        let rt = kiln_aws::AwsRuntime::new(&conf, fleet).context("starting the AWS runtime")?;
        let driver =
            kiln_aws::AwsDriver::new(rt.clone()).context("reading what the project has on AWS")?;
        let traffic = kiln_aws::AlbTraffic::new(rt);
        Ok((Arc::new(driver), Arc::new(traffic)))
    }

    /// The `backend "s3"` block as the engine's team state backend.
    pub fn remote(
        backend: &kiln_core::model::Backend,
    ) -> Result<Arc<dyn kiln_engine::remote::RemoteState>> {
        let kiln_core::model::Backend::S3(s3) = backend;
        Ok(Arc::new(crate::aws::S3Remote::new(s3)?))
    }
}

#[cfg(not(feature = "aws"))]
mod aws {
    use std::sync::Arc;

    use anyhow::Result;
    use kiln_driver::Driver;
    use kiln_proxy::Traffic;

    use crate::project::Project;

    pub async fn runtime(_project: &Project) -> Result<(Arc<dyn Driver>, Arc<dyn Traffic>)> {
        Err(crate::without_aws("a service on target.aws"))
    }

    pub fn remote(
        _backend: &kiln_core::model::Backend,
    ) -> Result<Arc<dyn kiln_engine::remote::RemoteState>> {
        Err(crate::without_aws("backend \"s3\""))
    }
}
