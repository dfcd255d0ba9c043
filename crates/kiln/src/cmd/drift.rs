//! `kiln drift`: compare what runs with the state, and answer drift by replacement.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use kiln_core::drift::Report;
use kiln_core::state::State;
use kiln_engine::client::{Client, ClientError};

use crate::cmd::deploy::{confirm, open_state, paths, run_apply, runtime, save_plan};
use crate::project::GlobalArgs;
use crate::ui;

/// `kiln drift` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this service (findings of the state itself are always shown).
    service: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Exit 2 when there is drift (0 when clean, 1 on error).
    #[arg(long)]
    detailed_exitcode: bool,
    /// Hash every file of every image root again, not only those whose size, times or inode
    /// changed since their last hash.
    #[arg(long)]
    full: bool,
    /// Make the plan that answers the drift by replacement, show it, and apply it.
    #[arg(long)]
    remediate: bool,
    /// With --remediate: do not ask for confirmation.
    #[arg(long)]
    auto_approve: bool,
    /// With --remediate: save the plan to FILE instead of applying it (`kiln apply FILE`).
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    out: Option<PathBuf>,
}

/// `kiln drift [SERVICE] [--json] [--detailed-exitcode] [--full] [--remediate]`.
pub fn run(global: &GlobalArgs, args: &Args) -> Result<ExitCode> {
    let paths = paths(global);
    let client = Client::new(&paths.socket());
    let mut query = format!("/v1/drift?full={}", u8::from(args.full));
    if let Some(s) = &args.service {
        query.push_str(&format!("&service={s}"));
    }
    let report: Report = match runtime()?.block_on(client.get(&query)) {
        Ok(r) => r,
        Err(ClientError::NotRunning(_)) => bail!(
            "no kiln server runs for this project: drift is checked by the server that runs the \
             instances (`kiln up` starts it and re-adopts instances that still run)"
        ),
        Err(e) => return Err(e.into()),
    };
    if args.json && !args.remediate {
        ui::out_json(&report)?;
    } else {
        ui::out(report.render());
    }
    if args.remediate && !report.is_clean() {
        let db = open_state(&paths)?;
        let current = db.read::<State>()?;
        let plan =
            kiln_core::plan::drift_plan(&current.lineage, current.serial, &current.doc, &report);
        if args.json {
            ui::out_json(&plan)?;
        } else {
            ui::out(format!("\n{}", plan.render()));
        }
        if let Some(out) = &args.out {
            save_plan(out, &plan)?;
        } else if plan.has_changes() {
            let project = global.load()?;
            let decision = crate::policy::check(&project, &global.open_store()?, &plan)?;
            crate::policy::gate(&db, &decision, &plan, None)?;
            confirm("replace the drifted instances", args.auto_approve)?;
            let code = run_apply(global, plan, false)?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
        }
    }
    Ok(if args.detailed_exitcode && !report.is_clean() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
