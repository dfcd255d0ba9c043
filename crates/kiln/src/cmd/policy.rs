//! `kiln policy check | test`: the policy gate on its own.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::project::GlobalArgs;
use crate::ui;

/// Policy subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Evaluate the policies on a saved plan, or on a fresh plan of the config; exit 1 when
    /// applying it would be refused.
    Check {
        /// A plan saved by `kiln plan -out FILE`.
        plan: Option<PathBuf>,
        /// Print the decision as JSON.
        #[arg(long, conflicts_with = "sarif")]
        json: bool,
        /// Print the decision as SARIF 2.1.0 (for code-scanning tools).
        #[arg(long)]
        sarif: bool,
    },
    /// Run the policies' tests (`*_test.rego`, rules named `test_*`) in each policy directory.
    Test,
}

/// Runs a policy subcommand.
pub fn run(global: &GlobalArgs, command: Command) -> Result<ExitCode> {
    let project = global.load()?;
    match command {
        Command::Check { plan, json, sarif } => {
            let plan = match plan {
                Some(path) => crate::cmd::deploy::read_plan_file(&path)?,
                None => crate::cmd::deploy::make_plan(global)?,
            };
            let decision = crate::policy::check(&project, &global.open_store()?, &plan)?;
            if json {
                ui::out_json(&decision)?;
            } else if sarif {
                ui::out_json(&decision.to_sarif())?;
            } else {
                ui::out(decision.render());
            }
            Ok(if decision.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Test => {
            let mut dirs: Vec<PathBuf> = project
                .config
                .policies
                .iter()
                .map(|p| project.dir.join(&p.dir))
                .collect();
            if dirs.is_empty() && project.dir.join("policies").is_dir() {
                dirs.push(project.dir.join("policies"));
            }
            if dirs.is_empty() {
                bail!(
                    "no policy directory: add `policy \"NAME\" {{ dir = \"…\" }}` or a ./policies directory"
                );
            }
            let mut ok = true;
            for dir in dirs {
                let report = kiln_policy::run_tests(&dir)?;
                ui::out(format!("{}:\n{}", dir.display(), report.render()));
                ok &= report.success();
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
