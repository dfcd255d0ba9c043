//! `kiln audit log | verify`: the hash-chained record of every change and decision.

use std::process::ExitCode;

use anyhow::Result;
use kiln_state::{AuditCheck, NewAuditEntry, StateStore};

use crate::cmd::deploy::{open_state, paths};
use crate::project::GlobalArgs;
use crate::ui;

/// Audit subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the audit log, oldest first.
    Log {
        /// Only entries at or after this time (RFC 3339, UTC: 2026-11-29T12:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain and every state version against it; names the first broken entry.
    Verify {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an audit subcommand.
pub fn run(global: &GlobalArgs, command: Command) -> Result<ExitCode> {
    let db = open_state(&paths(global))?;
    match command {
        Command::Log { since, json } => {
            let entries = db.audit(since.as_deref())?;
            if json {
                ui::out_json(&entries)?;
            } else {
                for e in &entries {
                    let message = e
                        .data
                        .get("message")
                        .and_then(|m| m.as_str())
                        .map_or_else(|| e.data.to_string(), str::to_owned);
                    ui::out(format!(
                        "{:>5}  {}  {:<14} {:<22} {:<16} {message}",
                        e.seq, e.time, e.kind, e.actor, e.subject
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { json } => {
            let check = db.verify_audit()?;
            if json {
                ui::out_json(&check)?;
            }
            match check {
                AuditCheck::Ok { entries, head } => {
                    if !json {
                        ui::out(format!(
                            "The audit log is intact: {entries} entries, every state version \
                             chained in. Head: {head}\n(keep a copy of the head elsewhere: only \
                             it shows that the log was not rewritten as a whole or cut short)"
                        ));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                AuditCheck::Broken { seq, reason } => {
                    if !json {
                        ui::out(format!("The audit log is broken at entry {seq}: {reason}"));
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

/// Records one entry of the CLI's own (a revocation, a forced unlock, a saved plan, an
/// approval), with the git commit of the config's directory when there is one.
pub fn record(db: &StateStore, kind: &str, subject: &str, data: serde_json::Value) -> Result<()> {
    let now = kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock);
    db.append_audit(&[entry(kind, subject, data)], now)?;
    Ok(())
}

/// An entry by the person running this command.
pub fn entry(kind: &str, subject: &str, data: serde_json::Value) -> NewAuditEntry {
    NewAuditEntry {
        actor: kiln_engine::actor(),
        kind: kind.to_owned(),
        subject: subject.to_owned(),
        git_commit: crate::project::git_info(std::path::Path::new(".")).map(|g| g.commit),
        data,
    }
}
