//! `kiln status`, `kiln releases`, `kiln logs`, `kiln state …`: reading what runs and what was
//! recorded. Only `status` needs the server; the rest read the state database and log files.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_core::state::State;
use kiln_engine::api::Status;
use kiln_engine::client::Client;
use kiln_state::StateStore;

use crate::cmd::deploy::{paths, runtime};
use crate::project::GlobalArgs;
use crate::ui;

/// `kiln status` options.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this service.
    service: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Refresh every second until interrupted.
    #[arg(long)]
    watch: bool,
}

/// `kiln releases` options.
#[derive(Debug, clap::Args)]
pub struct ReleasesArgs {
    /// The service.
    service: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `kiln logs` options.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The service.
    service: String,
    /// Only this instance.
    #[arg(long)]
    instance: Option<String>,
    /// Keep printing new lines.
    #[arg(short, long)]
    follow: bool,
}

/// `kiln state` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum StateCommand {
    /// Print the state (the latest version, or `--serial N`).
    Show {
        /// A past version.
        #[arg(long)]
        serial: Option<u64>,
    },
    /// List every state version.
    Versions {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show who holds the state lock.
    LockInfo {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a lock whose holder is gone; give its id exactly.
    ForceUnlock {
        /// The lock's id, from `kiln state lock-info`.
        id: String,
    },
    /// Copy the state between this machine (SQLite under .kiln/) and the config's
    /// `backend "s3"`, under the backend's lock. Stop the server first.
    Migrate {
        /// Where to: `s3` (the config's backend block) or `local`.
        #[arg(long, value_parser = ["s3", "local"])]
        to: String,
        /// Replace a state the destination already holds.
        #[arg(long)]
        force: bool,
        /// How long to wait for the backend's lock.
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
        lock_timeout: Duration,
    },
}

fn open_state(global: &GlobalArgs) -> Result<StateStore> {
    let paths = paths(global);
    if !paths.state_db().exists() {
        bail!(
            "this project has no state yet ({} does not exist); run `kiln up` or `kiln apply`",
            paths.state_db().display()
        );
    }
    StateStore::open(
        &paths.state_db(),
        kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock),
    )
    .with_context(|| format!("cannot open {}", paths.state_db().display()))
}

/// `kiln status`.
pub fn status(global: &GlobalArgs, args: &StatusArgs) -> Result<ExitCode> {
    let paths = paths(global);
    let client = Client::new(&paths.socket());
    let rt = runtime()?;
    let mut last = String::new();
    loop {
        let status: Status = rt.block_on(client.get("/v1/status"))?;
        let text = if args.json {
            serde_json::to_string_pretty(&filter(status, args.service.as_deref()))?
        } else {
            render_status(&filter(status, args.service.as_deref()))
        };
        if text != last {
            ui::out(&text);
            last = text;
        }
        if !args.watch {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn filter(mut status: Status, service: Option<&str>) -> Status {
    if let Some(name) = service {
        status.services.retain(|s| s.name == name);
    }
    status
}

fn render_status(status: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "kiln server pid {} ({} driver), state serial {}\n",
        status.server.pid, status.server.driver, status.serial
    ));
    if let Some(lock) = &status.lock {
        out.push_str(&format!(
            "state locked by {} ({}) since {}\n",
            lock.operation, lock.who, lock.created
        ));
    }
    for b in &status.balancers {
        out.push_str(&format!(
            "balancer {}: http://{}/\n",
            b.name,
            b.bound.as_deref().unwrap_or(&b.listen)
        ));
    }
    for s in &status.services {
        let traffic: Vec<String> = s
            .traffic
            .iter()
            .map(|(r, p)| format!("v{r} {p:.0}%"))
            .collect();
        out.push_str(&format!(
            "\nservice {}: stable {}, {} of {} instances routable, traffic {}\n",
            s.name,
            s.stable.map_or("-".to_owned(), |v| format!("v{v}")),
            // The stable release's: a warm or new release's instances are listed below.
            s.instances
                .iter()
                .filter(|i| i.routable && Some(i.release) == s.stable)
                .count(),
            s.target,
            if traffic.is_empty() {
                "none".to_owned()
            } else {
                traffic.join(", ")
            }
        ));
        if !s.drift.is_empty() {
            out.push_str(&format!(
                "  drift: {} finding(s) at the last check (`kiln drift` for details)\n",
                s.drift.len()
            ));
            for f in s.drift.iter().take(5) {
                out.push_str(&format!("    {f}\n"));
            }
        }
        if let Some(r) = &s.rollout {
            out.push_str(&format!(
                "  rollout {} → v{}: {}\n",
                r.from.map_or("-".to_owned(), |v| format!("v{v}")),
                r.to,
                // A canary or blue/green says more by its stage (`step 1 of 2`, `promoted; …`)
                // while it runs as planned.
                match &r.stage {
                    Some(stage) if r.phase == "rolling" => stage,
                    _ => &r.phase,
                }
            ));
            if let Some(addr) = &s.preview {
                out.push_str(&format!("  preview of v{}: http://{addr}/\n", r.to));
            }
            for line in &r.log {
                out.push_str(&format!("    {line}\n"));
            }
        }
        for i in &s.instances {
            out.push_str(&format!(
                "  {:<24} v{:<3} :{:<5} {:<9} {}{}\n",
                i.id,
                i.release,
                i.port,
                i.health,
                if i.routable { "routable" } else { "" },
                if i.retiring { " retiring" } else { "" }
            ));
        }
    }
    out.trim_end().to_owned()
}

/// `kiln releases SERVICE`.
pub fn releases(global: &GlobalArgs, args: &ReleasesArgs) -> Result<ExitCode> {
    let db = open_state(global)?;
    let state = db.read::<State>()?.doc;
    let Some(service) = state.services.get(&args.service) else {
        bail!("no service `{}` in the state", args.service);
    };
    if args.json {
        ui::out_json(&service.releases)?;
        return Ok(ExitCode::SUCCESS);
    }
    ui::out(format!(
        "{:<8} {:<11} {:<19} {:<20} {:<22} {}",
        "RELEASE", "STATUS", "IMAGE", "CREATED", "ACTOR", "COMMIT"
    ));
    for r in service.releases.iter().rev() {
        let status = serde_json::to_value(r.status)?
            .as_str()
            .unwrap_or_default()
            .replace('_', " ");
        ui::out(format!(
            "v{:<7} {:<11} sha256:{} {:<20} {:<22} {}",
            r.number,
            status,
            r.image_digest.short(),
            r.created_at,
            r.actor,
            r.git_commit
                .as_deref()
                .map_or("-", |c| &c[..c.len().min(12)])
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln logs SERVICE`.
pub fn logs(global: &GlobalArgs, args: &LogsArgs) -> Result<ExitCode> {
    let dir = paths(global).logs().join(&args.service);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "no logs for service `{}` (looked in {})",
                args.service,
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter(|p| {
            args.instance
                .as_deref()
                .is_none_or(|id| p.file_stem().is_some_and(|s| s == id))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "no logs found for `{}`",
            args.instance.as_deref().unwrap_or(&args.service)
        );
    }
    let mut readers = Vec::new();
    for path in files {
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = std::fs::File::open(&path)?;
        readers.push((id, BufReader::new(file)));
    }
    loop {
        let mut any = false;
        for (id, reader) in &mut readers {
            let mut line = String::new();
            while reader.read_line(&mut line)? > 0 {
                if line.ends_with('\n') {
                    ui::out(format!("{id} | {}", line.trim_end()));
                    line.clear();
                    any = true;
                } else {
                    // A half-written line: read it again whole next time.
                    let back = i64::try_from(line.len()).unwrap_or(0);
                    reader.seek(SeekFrom::Current(-back))?;
                    break;
                }
            }
        }
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        if !any {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `kiln state …`.
pub fn state(global: &GlobalArgs, command: StateCommand) -> Result<ExitCode> {
    if let StateCommand::Migrate {
        to,
        force,
        lock_timeout,
    } = &command
    {
        return migrate(global, to, *force, *lock_timeout);
    }
    if let StateCommand::ForceUnlock { id } = &command
        && let Some(backend) = global.load().ok().and_then(|p| p.config.backend)
    {
        return force_unlock_backend(&backend, id);
    }
    let db = open_state(global)?;
    match command {
        StateCommand::Show { serial } => {
            let v = match serial {
                Some(n) => db.read_version::<serde_json::Value>(n)?,
                None => db.read::<serde_json::Value>()?,
            };
            ui::out_json(&serde_json::json!({
                "lineage": v.lineage,
                "serial": v.serial,
                "written_at": v.written_at,
                "state": v.doc,
            }))?;
        }
        StateCommand::Versions { json } => {
            let versions = db.versions()?;
            if json {
                ui::out_json(&versions)?;
            } else {
                ui::out(format!(
                    "{:<7} {:<20} {:<12} {}",
                    "SERIAL", "WRITTEN", "OPERATION", "ACTOR"
                ));
                for v in versions {
                    ui::out(format!(
                        "{:<7} {:<20} {:<12} {}",
                        v.serial, v.written_at, v.operation, v.actor
                    ));
                }
            }
        }
        StateCommand::LockInfo { json } => match db.lock_info()? {
            Some(info) if json => ui::out_json(&info)?,
            Some(info) => ui::out(format!(
                "locked by {} ({}, pid {} on {}) since {}, expires {}\nlock id {}",
                info.operation, info.who, info.pid, info.host, info.created, info.expires, info.id
            )),
            None if json => ui::out("null"),
            None => ui::out("The state is not locked."),
        },
        StateCommand::Migrate { .. } => unreachable!("handled above"),
        StateCommand::ForceUnlock { id } => {
            let info = db.force_unlock(&id)?;
            crate::cmd::audit::record(
                &db,
                "lock_forced",
                "state lock",
                serde_json::json!({ "lock": info.id, "held_by": info.who, "operation": info.operation }),
            )?;
            ui::out(format!(
                "Removed the lock {} held by {} ({}).",
                info.id, info.operation, info.who
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln state migrate --to s3|local`.
fn migrate(global: &GlobalArgs, to: &str, force: bool, lock_timeout: Duration) -> Result<ExitCode> {
    let paths = paths(global);
    if std::os::unix::net::UnixStream::connect(paths.socket()).is_ok() {
        bail!(
            "a kiln server is running for this project; stop it first (`kiln down`, or Ctrl-C on `kiln server`): it writes the state"
        );
    }
    let project = global.load()?;
    let Some(backend) = project.config.backend.as_ref() else {
        bail!(
            "the config has no `backend \"s3\"` block: add one (bucket, key, region, dynamodb_table) to say where the state goes"
        );
    };
    migrate_with(global, backend, to, force, lock_timeout)
}

#[cfg(feature = "aws")]
fn migrate_with(
    global: &GlobalArgs,
    backend: &kiln_core::model::Backend,
    to: &str,
    force: bool,
    lock_timeout: Duration,
) -> Result<ExitCode> {
    use kiln_engine::remote::RemoteState;
    let kiln_core::model::Backend::S3(s3) = backend;
    let remote = crate::aws::S3Remote::new(s3)?;
    let now = || kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock);
    let who = format!("kiln state migrate ({})", kiln_engine::actor());
    let found = remote
        .acquire(&who, lock_timeout, now())
        .map_err(|e| anyhow::anyhow!("{}: {e}", remote.describe()))?;
    let result = (|| -> Result<String> {
        let paths = paths(global);
        paths.create()?;
        let db = StateStore::open(&paths.state_db(), now())
            .with_context(|| format!("cannot open {}", paths.state_db().display()))?;
        let local = db.read::<serde_json::Value>()?;
        if to == "s3" {
            if let Some(r) = &found
                && r.doc != local.doc
                && !force
            {
                bail!(
                    "{} already holds a different state (serial {}); `kiln state migrate --to local` takes it here, --force replaces it",
                    remote.describe(),
                    r.serial
                );
            }
            let written = remote
                .write(&local.doc, &kiln_engine::actor(), "migrate", now())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(format!(
                "Copied state serial {} of {} to {} (its serial {}).",
                local.serial,
                paths.state_db().display(),
                remote.describe(),
                written.serial
            ))
        } else {
            let Some(r) = found.clone() else {
                bail!("{} holds no state yet; nothing to copy", remote.describe());
            };
            if r.doc == local.doc {
                return Ok("The local state already equals the backend's.".to_owned());
            }
            let meta = kiln_state::WriteMeta {
                actor: kiln_engine::actor(),
                operation: format!("migrate from {}", remote.describe()),
            };
            let serial = db.write(local.serial, &r.doc, &meta, &[], now())?;
            Ok(format!(
                "Copied serial {} of {} here as serial {serial}; remove the backend block to keep the state on this machine only.",
                r.serial,
                remote.describe()
            ))
        }
    })();
    let released = remote.release();
    let message = result?;
    released.map_err(|e| anyhow::anyhow!("releasing the lock of {}: {e}", remote.describe()))?;
    ui::out(message);
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "aws"))]
fn migrate_with(
    _global: &GlobalArgs,
    _backend: &kiln_core::model::Backend,
    _to: &str,
    _force: bool,
    _lock_timeout: Duration,
) -> Result<ExitCode> {
    Err(crate::without_aws("backend \"s3\""))
}

/// `kiln state force-unlock ID` on a team backend: removes the backend's lock.
#[cfg(feature = "aws")]
fn force_unlock_backend(backend: &kiln_core::model::Backend, id: &str) -> Result<ExitCode> {
    let kiln_core::model::Backend::S3(s3) = backend;
    let remote = crate::aws::S3Remote::new(s3)?;
    let info = remote.force_unlock(id)?;
    ui::out(format!(
        "Removed the lock {} held by {} ({}).",
        info.id, info.operation, info.who
    ));
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "aws"))]
fn force_unlock_backend(_backend: &kiln_core::model::Backend, _id: &str) -> Result<ExitCode> {
    Err(crate::without_aws("backend \"s3\""))
}
