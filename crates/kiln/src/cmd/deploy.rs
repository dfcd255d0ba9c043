//! `kiln plan`, `kiln apply`, `kiln up`, `kiln down`: from config to running services.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_core::Digest;
use kiln_core::plan::Plan;
use kiln_core::state::{State, desired};
use kiln_engine::api::{ApplyRequest, ApplyResponse, ShutdownRequest, Status};
use kiln_engine::client::Client;
use kiln_engine::{Paths, actor};
use kiln_state::StateStore;
use serde::{Deserialize, Serialize};

use crate::project::{GlobalArgs, Project, git_info};
use crate::ui;

/// `kiln plan` options.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Save the plan to FILE, for `kiln apply FILE`.
    #[arg(long = "out", value_name = "FILE")]
    out: Option<PathBuf>,
    /// Print the plan as JSON (Terraform's plan field names).
    #[arg(long)]
    json: bool,
    /// Exit 0 when there are no changes, 2 when there are, 1 on error.
    #[arg(long)]
    detailed_exitcode: bool,
}

/// `kiln apply` options.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// A plan saved by `kiln plan -out FILE`; without it, a fresh plan is made and shown.
    plan: Option<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long)]
    auto_approve: bool,
    /// Return once the server accepted the plan, without following the rollout.
    #[arg(long)]
    detach: bool,
    /// Apply although soft-mandatory policies deny the plan; the reason is recorded in the
    /// audit log. Hard-mandatory denials cannot be overridden.
    #[arg(long, value_name = "REASON")]
    override_policy: Option<String>,
}

/// `kiln down` options.
#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// Do not ask for confirmation.
    #[arg(long)]
    auto_approve: bool,
}

/// A plan as saved to a file.
#[derive(Debug, Serialize, Deserialize)]
struct PlanFile {
    kiln_plan: u32,
    kiln_version: String,
    plan: Plan,
}

/// The latest baked digest of every image the config's services use.
fn image_digests(global: &GlobalArgs, project: &Project) -> Result<BTreeMap<String, Digest>> {
    let store = global.open_store()?;
    let tags = store.tagged()?;
    let mut digests = BTreeMap::new();
    for service in project.config.services.values() {
        match tags.get(&service.image) {
            Some(d) => {
                digests.insert(service.image.clone(), d.clone());
            }
            None => bail!(
                "image `{}` of service `{}` has not been baked; run `kiln bake {}` (or `kiln up`)",
                service.image,
                service.name,
                service.image
            ),
        }
    }
    Ok(digests)
}

/// The project's local state directory.
pub fn paths(global: &GlobalArgs) -> Paths {
    Paths::for_config(&global.config)
}

pub fn open_state(paths: &Paths) -> Result<StateStore> {
    paths
        .create()
        .context("cannot create the .kiln directory")?;
    StateStore::open(
        &paths.state_db(),
        kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock),
    )
    .with_context(|| format!("cannot open the state at {}", paths.state_db().display()))
}

/// Makes a plan of the config against the current state.
pub fn make_plan(global: &GlobalArgs) -> Result<Plan> {
    let project = global.load()?;
    let digests = image_digests(global, &project)?;
    let (services, balancers, _) = desired(&project.config, &digests);
    let paths = paths(global);
    if project.config.backend.is_some() {
        // The team's state is the backend's: this project's server takes its lock and
        // brings it here before anything is planned against it.
        runtime()?.block_on(ensure_server(global, &paths))?;
    }
    let db = open_state(&paths)?;
    let current = db.read::<State>()?;
    Ok(kiln_core::plan::plan(
        &current.lineage,
        current.serial,
        &services,
        &balancers,
        &current.doc,
    )
    .with_drift_settings(project.config.drift, &current.doc))
}

/// `kiln plan`.
pub fn plan(global: &GlobalArgs, args: &PlanArgs) -> Result<ExitCode> {
    let plan = make_plan(global)?;
    if args.json {
        ui::out_json(&plan)?;
    } else {
        ui::out(plan.render());
    }
    let project = global.load()?;
    let decision = crate::policy::check(&project, &global.open_store()?, &plan)?;
    if !decision.results.is_empty() {
        eprint!("{}", decision.render());
    }
    let blocked = !decision.passed();
    if blocked {
        eprintln!("policy: applying this plan will be refused (see above)");
    }
    if let Some(out) = &args.out {
        save_plan(out, &plan)?;
        let db = open_state(&paths(global))?;
        crate::cmd::audit::record(
            &db,
            "plan",
            &out.display().to_string(),
            serde_json::json!({
                "config_hash": plan.config_hash,
                "serial": plan.serial,
                "summary": plan.summary(),
            }),
        )?;
    }
    Ok(if blocked {
        ExitCode::FAILURE
    } else if args.detailed_exitcode && plan.has_changes() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Writes `plan` as a plan file that `kiln apply FILE` takes.
pub fn save_plan(out: &Path, plan: &Plan) -> Result<()> {
    let file = PlanFile {
        kiln_plan: 1,
        kiln_version: env!("CARGO_PKG_VERSION").to_owned(),
        plan: plan.clone(),
    };
    std::fs::write(out, serde_json::to_vec_pretty(&file)?)
        .with_context(|| format!("cannot write the plan to {}", out.display()))?;
    eprintln!(
        "Saved the plan to {}; apply it with `kiln apply {}`",
        out.display(),
        out.display()
    );
    Ok(())
}

pub fn read_plan_file(path: &Path) -> Result<Plan> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read plan file {}", path.display()))?;
    let file: PlanFile = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a kiln plan file", path.display()))?;
    Ok(file.plan)
}

/// Asks on a terminal; without one, refuses unless `auto_approve`.
pub fn confirm(question: &str, auto_approve: bool) -> Result<()> {
    if auto_approve {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to {question} without confirmation: there is no terminal to ask on; pass --auto-approve"
        );
    }
    eprint!("Do you want to {question}? Only 'yes' will be accepted: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        bail!("cancelled");
    }
    Ok(())
}

/// `kiln apply`.
pub fn apply(global: &GlobalArgs, args: &ApplyArgs) -> Result<ExitCode> {
    let project = global.load()?;
    let plan = match &args.plan {
        Some(path) => read_plan_file(path)?,
        None => make_plan(global)?,
    };
    ui::out(plan.render());
    if !plan.has_changes() {
        return Ok(ExitCode::SUCCESS);
    }
    let db = open_state(&paths(global))?;
    if project.config.environment.protected {
        check_approval(&db, &project, args.plan.as_deref(), &plan)?;
    }
    let decision = crate::policy::check(&project, &global.open_store()?, &plan)?;
    crate::policy::gate(&db, &decision, &plan, args.override_policy.as_deref())?;
    drop(db);
    if args.plan.is_none() {
        confirm("apply these changes", args.auto_approve)?;
    }
    run_apply(global, plan, args.detach)
}

/// The digest that names a plan exactly (its canonical JSON), as `kiln approve` records it.
pub fn plan_hash(plan: &Plan) -> Digest {
    kiln_core::digest::digest_json(plan)
}

/// A protected environment applies only a saved plan that `kiln approve` approved, exactly.
fn check_approval(
    db: &StateStore,
    project: &Project,
    file: Option<&Path>,
    plan: &Plan,
) -> Result<()> {
    let env = &project.config.environment.name;
    let Some(file) = file else {
        bail!(
            "environment `{env}` is protected: apply a saved plan (`kiln plan -out FILE`) once it \
             is approved (`kiln approve FILE`); nothing was changed"
        );
    };
    let hash = plan_hash(plan).to_string();
    let approvals: Vec<String> = db
        .audit(None)?
        .into_iter()
        .filter(|e| e.kind == "approval")
        .filter_map(|e| {
            let h = e.data.get("plan_hash")?.as_str()?.to_owned();
            (h == hash).then_some(e.actor)
        })
        .collect();
    match approvals.first() {
        Some(approver) => {
            eprintln!("{}: approved by {approver}", file.display());
            Ok(())
        }
        None => bail!(
            "environment `{env}` is protected and plan {} ({hash}) has no approval: `kiln approve \
             {}` records one (an approval of another plan does not count); nothing was changed",
            file.display(),
            file.display()
        ),
    }
}

/// `kiln approve PLANFILE`: records the approver and the plan's hash in the audit log.
pub fn approve(global: &GlobalArgs, file: &Path) -> Result<ExitCode> {
    let plan = read_plan_file(file)?;
    let db = open_state(&paths(global))?;
    let current = db.read::<State>()?;
    if plan.lineage != current.lineage || plan.serial != current.serial {
        bail!(
            "{} was made against state serial {} and the state is now at serial {}: make and \
             approve a new plan",
            file.display(),
            plan.serial,
            current.serial
        );
    }
    let hash = plan_hash(&plan);
    crate::cmd::audit::record(
        &db,
        "approval",
        &format!("plan {hash}"),
        serde_json::json!({
            "plan_hash": hash,
            "file": file.display().to_string(),
            "config_hash": plan.config_hash,
            "serial": plan.serial,
            "summary": plan.summary(),
        }),
    )?;
    ui::out(format!(
        "approved {} ({hash}) as {}; `kiln apply {}` may apply it",
        file.display(),
        actor(),
        file.display()
    ));
    Ok(ExitCode::SUCCESS)
}

pub fn run_apply(global: &GlobalArgs, plan: Plan, detach: bool) -> Result<ExitCode> {
    let paths = paths(global);
    let rt = runtime()?;
    let plan_replaces_instances = plan.drift.as_ref().is_some_and(|d| !d.replace.is_empty());
    rt.block_on(async {
        let client = ensure_server(global, &paths).await?;
        let commit = git_info(global.config.parent().unwrap_or(Path::new("."))).map(|g| g.commit);
        let resp: ApplyResponse = client
            .post(
                "/v1/apply",
                &ApplyRequest {
                    plan,
                    actor: actor(),
                    git_commit: commit,
                },
            )
            .await?;
        for (service, release) in &resp.releases {
            eprintln!(
                "{service}: release v{release} (deployment {})",
                resp.deployment_id
            );
        }
        if detach {
            return Ok(ExitCode::SUCCESS);
        }
        if plan_replaces_instances {
            return follow_replacements(&client).await;
        }
        follow(&client, &resp.releases, "apply").await
    })
}

/// Prints events until no instance is waiting to be replaced (a drift remediation), for at
/// most 10 minutes.
async fn follow_replacements(client: &Client) -> Result<ExitCode> {
    let waiting = |status: &Status| {
        status
            .services
            .iter()
            .flat_map(|s| &s.instances)
            .any(|i| i.replacing.is_some())
    };
    let deadline = Some(Duration::from_secs(600));
    follow_while(client, "apply", waiting, deadline, "the replacements").await
}

/// Prints events, from the newest event of kind `start` on, until the rollout of every service
/// in `releases` has finished or promoted (the old release's warm period is not waited for).
/// Interrupting only stops following: the rollout goes on in the server (`kiln status`
/// re-attaches).
pub async fn follow(
    client: &Client,
    releases: &BTreeMap<String, u32>,
    start: &str,
) -> Result<ExitCode> {
    let busy = |status: &Status| {
        status.services.iter().any(|s| {
            releases.contains_key(&s.name) && s.rollout.as_ref().is_some_and(|r| !r.promoted)
        })
    };
    follow_while(client, start, busy, None, "the rollout").await
}

/// Prints the server's events from the newest of kind `start` on while `busy` holds, then one
/// more round; exit 1 if a rollout failed meanwhile. `what` names the work for the messages.
async fn follow_while(
    client: &Client,
    start: &str,
    busy: impl Fn(&Status) -> bool,
    limit: Option<Duration>,
    what: &str,
) -> Result<ExitCode> {
    let events: Vec<kiln_state::Event> = client.get("/v1/events?after=0").await?;
    let mut after = events
        .iter()
        .rev()
        .find(|e| e.kind == start)
        .map_or(0, |e| e.id);
    let deadline = limit.map(|l| tokio::time::Instant::now() + l);
    let mut failed = false;
    let mut finished = false;
    loop {
        // Status first, then events: work that ends between the two calls still has its last
        // events (and a rollout its verdict) read before the loop stops.
        let status: Status = client.get("/v1/status").await?;
        let still = busy(&status);
        let events: Vec<kiln_state::Event> =
            client.get(&format!("/v1/events?after={after}")).await?;
        for e in &events {
            after = e.id;
            // The rollout's own notes already say each change of the split.
            if e.kind == "traffic" {
                continue;
            }
            let who = e.service.as_deref().unwrap_or("kiln");
            eprintln!("{who}: {}", e.message);
            if e.kind == "rollout" && e.message.contains("failed") {
                failed = true;
            }
        }
        if finished {
            break;
        }
        if !still {
            // One more round, so that events written as the work ended are shown too.
            finished = true;
            continue;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() > d) {
            bail!("{what} did not finish in time; see `kiln status`");
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                eprintln!("stopped following; {what} goes on in the server (`kiln status --watch` to follow again)");
                return Ok(ExitCode::SUCCESS);
            }
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    if failed {
        eprintln!("the deployment failed; see `kiln status` and `kiln logs`");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln up`: bake, start the server if needed, apply without asking, print where to go.
pub fn up(global: &GlobalArgs) -> Result<ExitCode> {
    let project = global.load()?;
    let store = global.open_store()?;
    crate::cmd::bake::bake(&store, &project.config, &project.dir, &[], false)?;
    let plan = make_plan(global)?;
    ui::out(plan.render());
    let code = if plan.has_changes() {
        if project.config.environment.protected {
            bail!(
                "environment `{}` is protected: `kiln up` does not apply there; make a plan \
                 (`kiln plan -out FILE`), approve it (`kiln approve FILE`), then `kiln apply FILE`",
                project.config.environment.name
            );
        }
        let db = open_state(&paths(global))?;
        let decision = crate::policy::check(&project, &store, &plan)?;
        crate::policy::gate(&db, &decision, &plan, None)?;
        drop(db);
        run_apply(global, plan, false)?
    } else {
        // Nothing to change, but the server must run for the services to run.
        let paths = paths(global);
        runtime()?.block_on(ensure_server(global, &paths))?;
        ExitCode::SUCCESS
    };
    let paths = paths(global);
    let status = runtime()?.block_on(wait_until_serving(&Client::new(&paths.socket())))?;
    for b in &status.balancers {
        if let Some(addr) = &b.bound {
            ui::out(format!("{}: http://{addr}/", b.name));
        }
    }
    Ok(code)
}

/// Waits until every service has as many routable instances as it wants and no rollout runs
/// (after a restart, instances are launched again and must pass health first).
async fn wait_until_serving(client: &Client) -> Result<Status> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let status: Status = client.get("/v1/status").await?;
        let serving = status.services.iter().all(|s| {
            s.rollout.as_ref().is_none_or(|r| r.promoted)
                && s.instances
                    .iter()
                    .filter(|i| i.routable && !i.retiring && i.health == "healthy")
                    .count()
                    >= s.target as usize
        });
        if serving {
            return Ok(status);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the services did not all serve within 5 minutes; see `kiln status` and `kiln logs`"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kiln down`: stop every instance and the server; state stays.
pub fn down(global: &GlobalArgs, args: &DownArgs) -> Result<ExitCode> {
    let paths = paths(global);
    let rt = runtime()?;
    let client = Client::new(&paths.socket());
    if !rt.block_on(client.is_running()) {
        ui::out("No kiln server is running for this project.");
        return Ok(ExitCode::SUCCESS);
    }
    confirm("stop every instance and the server", args.auto_approve)?;
    let pid = std::fs::read_to_string(paths.pid_file())
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    rt.block_on(client.post::<_, serde_json::Value>(
        "/v1/shutdown",
        &ShutdownRequest {
            stop_instances: true,
        },
    ))?;
    // Wait for the server process to be gone: it exits only after every instance stopped, so
    // that nothing of kiln's remains.
    if let Some(pid) = pid {
        let gone = || !Path::new(&format!("/proc/{pid}")).exists();
        for _ in 0..2400 {
            if gone() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !gone() {
            bail!(
                "kiln server (pid {pid}) is still stopping instances after 2 minutes; see {}",
                paths.server_log().display()
            );
        }
    }
    ui::out("Stopped every instance and the server; the state is kept (`kiln up` brings it back).");
    Ok(ExitCode::SUCCESS)
}

/// A client of the project's server, starting one in the background first if none runs.
pub async fn ensure_server(global: &GlobalArgs, paths: &Paths) -> Result<Client> {
    let client = Client::new(&paths.socket());
    if client.is_running().await {
        return Ok(client);
    }
    paths.create()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.server_log())
        .with_context(|| format!("cannot open {}", paths.server_log().display()))?;
    let exe = std::env::current_exe().context("cannot find the kiln executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--config").arg(&global.config);
    // The server reads the config for its target: with the same variables.
    for var in &global.vars {
        cmd.arg("--var").arg(var);
    }
    if let Some(store) = &global.store {
        cmd.arg("--store").arg(store);
    }
    cmd.arg("server");
    // On a team backend the server holds the state's lease: one started for a command
    // stops once idle, so that the next machine's server can take the lease.
    let team = global
        .load()
        .ok()
        .is_some_and(|p| p.config.backend.is_some());
    if team {
        let idle = std::env::var("KILN_IDLE_EXIT").unwrap_or_else(|_| "60s".to_owned());
        cmd.arg("--idle-exit").arg(idle);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own process group: a Ctrl-C in this terminal must not reach the server.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("cannot start kiln server")?;
    // A server on a team backend may first wait for another's lease (up to its
    // --lock-timeout, 5 minutes).
    let polls = if team { 6200 } else { 200 };
    for poll in 0..polls {
        if poll == 200 {
            eprintln!(
                "kiln server is waiting for the team state lock; see {}",
                paths.server_log().display()
            );
        }
        if client.is_running().await {
            eprintln!(
                "started kiln server (pid {}, log {})",
                child.id(),
                paths.server_log().display()
            );
            return Ok(client);
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "kiln server exited at once ({status}); see {}",
                paths.server_log().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "kiln server did not start listening within {} s; see {}",
        polls / 20,
        paths.server_log().display()
    )
}

/// A runtime for the commands that talk to the server.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
