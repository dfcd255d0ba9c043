//! The `kiln` command line: the only crate that knows about flags, terminals and exit codes.

#[cfg(feature = "aws")]
mod aws;
mod cmd;

/// What a kiln built without the `aws` feature says when the config needs AWS.
#[cfg(not(feature = "aws"))]
pub(crate) fn without_aws(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} needs a kiln built with AWS support: `cargo build --release --features aws`"
    )
}
mod policy;
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
    /// Show what applying the config would change.
    Plan(cmd::deploy::PlanArgs),
    /// Apply a plan (a saved one, or a fresh one after confirmation).
    Apply(cmd::deploy::ApplyArgs),
    /// Bake, start the local server if needed, and apply without asking.
    Up,
    /// Stop every instance and the server, keeping the state.
    Down(cmd::deploy::DownArgs),
    /// Run the control plane in the foreground.
    Server(cmd::server::Args),
    /// Show services, releases, instances, health and traffic.
    Status(cmd::inspect::StatusArgs),
    /// Watch and steer the rollout in progress: status, promote, abort, pause, resume.
    #[command(subcommand)]
    Rollout(cmd::rollout::Command),
    /// Go back to the previous release, or any release the state keeps.
    Rollback(cmd::rollout::RollbackArgs),
    /// List a service's releases.
    Releases(cmd::inspect::ReleasesArgs),
    /// Print instance logs.
    Logs(cmd::inspect::LogsArgs),
    /// Evaluate the policies on a plan, or run their tests.
    #[command(subcommand)]
    Policy(cmd::policy::Command),
    /// Approve a saved plan for a protected environment (recorded in the audit log).
    Approve {
        /// A plan saved by `kiln plan -out FILE`.
        plan: std::path::PathBuf,
    },
    /// The audit log of every change and decision: log, verify.
    #[command(subcommand)]
    Audit(cmd::audit::Command),
    /// Compare what runs with the state; --remediate replaces what drifted.
    Drift(cmd::drift::Args),
    /// Inspect the state: versions, lock.
    #[command(subcommand)]
    State(cmd::inspect::StateCommand),
}

/// Exit codes: 0 success, 1 error; `--detailed-exitcode` adds 2 (changes) where documented.
fn main() -> ExitCode {
    let cli = Cli::parse_from(project::terraform_style_args(std::env::args_os()));
    ui::init_tracing();
    let result = match cli.command {
        Command::Validate(args) => cmd::validate::run(&cli.global, &args),
        Command::Bake(args) => cmd::bake::run(&cli.global, &args),
        Command::Images(command) => cmd::images::run(&cli.global, command),
        Command::Plan(args) => cmd::deploy::plan(&cli.global, &args),
        Command::Apply(args) => cmd::deploy::apply(&cli.global, &args),
        Command::Up => cmd::deploy::up(&cli.global),
        Command::Down(args) => cmd::deploy::down(&cli.global, &args),
        Command::Server(args) => cmd::server::run(&cli.global, &args),
        Command::Status(args) => cmd::inspect::status(&cli.global, &args),
        Command::Rollout(command) => cmd::rollout::run(&cli.global, command),
        Command::Rollback(args) => cmd::rollout::rollback(&cli.global, &args),
        Command::Releases(args) => cmd::inspect::releases(&cli.global, &args),
        Command::Logs(args) => cmd::inspect::logs(&cli.global, &args),
        Command::Drift(args) => cmd::drift::run(&cli.global, &args),
        Command::Audit(command) => cmd::audit::run(&cli.global, command),
        Command::Policy(command) => cmd::policy::run(&cli.global, command),
        Command::Approve { plan } => cmd::deploy::approve(&cli.global, &plan),
        Command::State(command) => cmd::inspect::state(&cli.global, command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            ui::print_error(&err);
            ExitCode::FAILURE
        }
    }
}
