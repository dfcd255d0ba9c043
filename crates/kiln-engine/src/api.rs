//! The control API between the `kiln` CLI and `kiln server`: JSON over HTTP/1.1 on a Unix
//! socket that only the owner can open.
//!
//! | request | body | answer |
//! |---|---|---|
//! | `GET /v1/status` | | [`Status`] |
//! | `POST /v1/apply` | [`ApplyRequest`] | [`ApplyResponse`] |
//! | `GET /v1/events?after=N` | | `[Event]` |
//! | `POST /v1/rollout` | [`RolloutCommand`] | `{}` once queued for the rollout |
//! | `POST /v1/rollback` | [`RollbackRequest`] | [`RollbackResponse`] |
//! | `POST /v1/shutdown` | [`ShutdownRequest`] | `{}`, then the server stops |
//!
//! Errors answer with a non-2xx status and an [`ApiError`] body.

use std::collections::BTreeMap;

use kiln_core::plan::Plan;
use serde::{Deserialize, Serialize};

/// Ask the server to apply a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The plan, exactly as shown to the user.
    pub plan: Plan,
    /// Who applies it (`user@host`).
    pub actor: String,
    /// The git commit of the config, if known.
    pub git_commit: Option<String>,
}

/// The server accepted a plan; rollouts run in the server from now on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// The deployment's id.
    pub deployment_id: String,
    /// The release each changed service is moving to.
    pub releases: BTreeMap<String, u32>,
    /// The state serial after the apply was recorded.
    pub serial: u64,
}

/// Ask the server to stop.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShutdownRequest {
    /// Also stop every instance (`kiln down`); otherwise instances keep running and are
    /// re-adopted by the next server.
    pub stop_instances: bool,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What kind: `locked`, `stale_plan`, `not_found`, `conflict`, `internal`.
    pub kind: String,
    /// The message, ready for a person.
    pub message: String,
}

/// What the server runs, for `kiln status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The state's lineage.
    pub lineage: String,
    /// The state's serial.
    pub serial: u64,
    /// The server process.
    pub server: ServerInfo,
    /// Services by name.
    pub services: Vec<ServiceStatus>,
    /// Balancers by name.
    pub balancers: Vec<BalancerStatus>,
    /// The state lock, if held.
    pub lock: Option<kiln_state::LockInfo>,
}

/// The server process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Its pid.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// The runtime driver (`local`, `fake`).
    pub driver: String,
    /// How instances are isolated (`bubblewrap` or a warning).
    pub sandbox: String,
}

/// One service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// The release that takes traffic.
    pub stable: Option<u32>,
    /// Instances wanted.
    pub target: u32,
    /// The rollout in progress.
    pub rollout: Option<RolloutStatus>,
    /// Live instances.
    pub instances: Vec<InstanceStatus>,
    /// Share of requests per release, in percent, as the proxy routes them now.
    pub traffic: BTreeMap<u32, f64>,
    /// Where the rollout's `preview_listen` listener really listens while it previews the new
    /// release (every request there is served by that release).
    #[serde(default)]
    pub preview: Option<String>,
    /// The findings of the last drift check that concern this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<kiln_core::drift::Finding>,
}

/// A rollout in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The deployment.
    pub deployment_id: String,
    /// From which release.
    pub from: Option<u32>,
    /// To which release.
    pub to: u32,
    /// `rolling`, `reverting`, …
    pub phase: String,
    /// Canary / blue-green: where it stands (`step 2 of 3`, `preview`, `warm`, …) and whether
    /// it is paused.
    pub stage: Option<String>,
    /// The traffic split it set, percent per release.
    pub weights: BTreeMap<u32, u32>,
    /// The new release takes every request and only the old release's warm period
    /// (`scale_down_delay`) is left: nothing more to wait for unless someone rolls back.
    #[serde(default)]
    pub promoted: bool,
    /// Its decisions, oldest first (the last 20).
    pub log: Vec<String>,
}

/// An operator command for a service's rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutCommand {
    /// The service.
    pub service: String,
    /// `promote`, `abort`, `pause` or `resume`.
    pub command: String,
    /// Who gives it (`user@host`), for the audit log.
    #[serde(default)]
    pub actor: Option<String>,
}

/// One instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Id.
    pub id: String,
    /// Release number.
    pub release: u32,
    /// Host port.
    pub port: u16,
    /// `starting`, `healthy`, `unhealthy`, `exited`.
    pub health: String,
    /// Gets requests.
    pub routable: bool,
    /// Being drained and stopped.
    pub retiring: bool,
    /// When it started.
    pub started_at: String,
    /// Why it is being replaced (drift), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacing: Option<String>,
}

/// One balancer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BalancerStatus {
    /// Name.
    pub name: String,
    /// The configured address.
    pub listen: String,
    /// Where it really listens (the configured port may be 0).
    pub bound: Option<String>,
}

/// Ask the server to roll a service back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The service.
    pub service: String,
    /// The release to return to; the previous one when absent.
    pub to: Option<u32>,
    /// Who asks (`user@host`).
    pub actor: String,
}

/// A rollback under way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackResponse {
    /// The release that will serve: the warm one itself, or the new release repeating it.
    pub release: u32,
    /// True when the old release was still warm and only traffic moved.
    pub warm: bool,
}
