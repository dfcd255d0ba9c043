//! `kiln rollout status | promote | abort | pause | resume SERVICE`: watch and steer the rollout
//! in progress. The decisions stay in the server; these only hand it an operator's command.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Result, bail};
use kiln_engine::api::{RolloutCommand, Status};
use kiln_engine::client::Client;

use crate::cmd::deploy::{confirm, follow, paths, runtime};
use crate::project::GlobalArgs;
use crate::ui;

/// Rollout subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Where the rollout stands: stage, traffic split, analysis verdicts, decisions.
    Status {
        /// The service.
        service: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve the current canary step or the blue/green switch (analysis must still pass).
    Promote(Target),
    /// Send every request back to the stable release now and stop the new one.
    Abort(Target),
    /// Hold the rollout where it stands.
    Pause(Target),
    /// Continue a paused rollout.
    Resume(Target),
}

/// The service a command is for.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The service.
    service: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    auto_approve: bool,
}

/// Runs a rollout subcommand.
pub fn run(global: &GlobalArgs, command: Command) -> Result<ExitCode> {
    let client = Client::new(&paths(global).socket());
    let rt = runtime()?;
    let (target, verb, question) = match command {
        Command::Status { service, json } => {
            let status: Status = rt.block_on(client.get("/v1/status"))?;
            let Some(s) = status.services.into_iter().find(|s| s.name == service) else {
                bail!("no service `{service}`");
            };
            if json {
                ui::out_json(&s.rollout)?;
            } else {
                match &s.rollout {
                    None => ui::out(format!(
                        "service {service}: no rollout in progress; stable {}",
                        s.stable.map_or("-".to_owned(), |v| format!("v{v}"))
                    )),
                    Some(r) => {
                        let split: Vec<String> = r
                            .weights
                            .iter()
                            .map(|(v, w)| format!("v{v} {w}%"))
                            .collect();
                        ui::out(format!(
                            "service {service}: {} → v{} ({}), deployment {}",
                            r.from.map_or("-".to_owned(), |v| format!("v{v}")),
                            r.to,
                            r.stage.as_deref().unwrap_or(&r.phase),
                            r.deployment_id
                        ));
                        if !split.is_empty() {
                            ui::out(format!("  traffic: {}", split.join(", ")));
                        }
                        for line in &r.log {
                            ui::out(format!("  {line}"));
                        }
                    }
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Promote(t) => (t, "promote", "promote the new release"),
        Command::Abort(t) => (t, "abort", "send every request back to the stable release"),
        Command::Pause(t) => (t, "pause", "pause the rollout"),
        Command::Resume(t) => (t, "resume", "resume the rollout"),
    };
    // Pausing changes nothing that runs; promote, abort and resume do.
    if verb != "pause" {
        confirm(
            &format!("{question} of `{}`", target.service),
            target.auto_approve,
        )?;
    }
    rt.block_on(client.post::<_, serde_json::Value>(
        "/v1/rollout",
        &RolloutCommand {
            service: target.service.clone(),
            command: verb.to_owned(),
            actor: Some(kiln_engine::actor()),
        },
    ))?;
    ui::out(format!(
        "{verb}: sent to the rollout of `{}` (follow it with `kiln rollout status {}`)",
        target.service, target.service
    ));
    Ok(ExitCode::SUCCESS)
}

/// `kiln rollback` options.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The service.
    service: String,
    /// The release to return to, e.g. `v3` or `3` (default: the one before the current).
    #[arg(long, value_parser = parse_release)]
    to: Option<u32>,
    /// Do not ask for confirmation.
    #[arg(long)]
    auto_approve: bool,
    /// Return once the server accepted the rollback, without following it.
    #[arg(long)]
    detach: bool,
}

fn parse_release(s: &str) -> Result<u32, String> {
    s.trim_start_matches('v')
        .parse()
        .map_err(|_| format!("`{s}` is not a release: expected v3 or 3"))
}

/// `kiln rollback SERVICE [--to vN]`.
pub fn rollback(global: &GlobalArgs, args: &RollbackArgs) -> Result<ExitCode> {
    let what = args
        .to
        .map_or("the previous release".to_owned(), |v| format!("v{v}"));
    confirm(
        &format!("roll `{}` back to {what}", args.service),
        args.auto_approve,
    )?;
    let client = Client::new(&paths(global).socket());
    let rt = runtime()?;
    let resp: kiln_engine::api::RollbackResponse = rt.block_on(client.post(
        "/v1/rollback",
        &kiln_engine::api::RollbackRequest {
            service: args.service.clone(),
            to: args.to,
            actor: kiln_engine::actor(),
        },
    ))?;
    let service = &args.service;
    let release = resp.release;
    if resp.warm {
        if !args.detach {
            rt.block_on(wait_for_traffic(&client, service, release))?;
        }
        ui::out(format!(
            "{service}: v{release} was still warm; every request goes to it"
        ));
        return Ok(ExitCode::SUCCESS);
    }
    ui::out(format!(
        "{service}: rolling back as release v{release}: launched from the stored image, switched once healthy"
    ));
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let releases = BTreeMap::from([(service.clone(), release)]);
    rt.block_on(follow(&client, &releases, "rollback"))
}

/// Waits until the proxy sends every request of `service` to `release` (a warm rollback is one
/// switch, done within a tick of the server).
async fn wait_for_traffic(client: &Client, service: &str, release: u32) -> Result<()> {
    for _ in 0..200 {
        let status: Status = client.get("/v1/status").await?;
        let all = status
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.traffic.get(&release))
            .is_some_and(|share| *share >= 100.0);
        if all {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bail!(
        "the switch back to v{release} of `{service}` did not happen within 10 s; see `kiln rollout status {service}`"
    )
}
