//! `kiln validate`: parse and check the config, every diagnostic at once.

use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;

use crate::project::GlobalArgs;
use crate::ui;

/// `kiln validate` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print `{"valid": bool, "error_count": n, "diagnostics": [...]}`.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    valid: bool,
    error_count: usize,
    warning_count: usize,
    diagnostics: &'a [kiln_core::Diagnostic],
}

/// Exit 0 when the config has no error, 1 otherwise.
pub fn run(global: &GlobalArgs, args: &Args) -> Result<ExitCode> {
    let (project, diagnostics) = global.load_with_diagnostics()?;
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = diagnostics.len() - errors;
    if args.json {
        ui::out_json(&Report {
            valid: project.is_some(),
            error_count: errors,
            warning_count: warnings,
            diagnostics: &diagnostics,
        })?;
    } else {
        for d in &diagnostics {
            eprintln!("{d}\n");
        }
        let file = global.config.display();
        match &project {
            Some(p) => ui::out(format!(
                "{file} is valid: {} image{}, {} service{}, {} balancer{}{}",
                p.config.images.len(),
                s(p.config.images.len()),
                p.config.services.len(),
                s(p.config.services.len()),
                p.config.balancers.len(),
                s(p.config.balancers.len()),
                if warnings > 0 {
                    format!(" ({warnings} warning{})", s(warnings))
                } else {
                    String::new()
                }
            )),
            None => eprintln!(
                "{file}: {errors} error{}, {warnings} warning{}",
                s(errors),
                s(warnings)
            ),
        }
    }
    Ok(if project.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn s(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
