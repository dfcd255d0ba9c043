//! The `kiln` command line: the only crate that knows about flags, terminals and exit codes.

mod cmd;
mod project;
mod ui;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Immutable infrastructure in one binary: bake, plan, roll out, detect drift, replace.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: project::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse and check the config, reporting every problem at once.
    Validate(cmd::validate::Args),
    /// Build images (cached per step, reproducible) and print their digests.
    Bake(cmd::bake::Args),
    /// List, inspect, verify, export and remove images in the store.
    #[command(subcommand)]
    Images(cmd::images::Command),
}

/// Exit codes: 0 success, 1 error. (`--detailed-exitcode` adds 2 where a command documents it.)
fn main() -> ExitCode {
    let cli = Cli::parse_from(project::terraform_style_args(std::env::args_os()));
    ui::init_tracing();
    let result = match cli.command {
        Command::Validate(args) => cmd::validate::run(&cli.global, &args),
        Command::Bake(args) => cmd::bake::run(&cli.global, &args),
        Command::Images(command) => cmd::images::run(&cli.global, command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            ui::print_error(&err);
            ExitCode::FAILURE
        }
    }
}
