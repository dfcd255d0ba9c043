//! The plan: what `apply` will do to make the running services and balancers match the config,
//! with the reason for every change and the rollout schedule of every new release.
//!
//! [`plan`] is a pure function of the desired side ([`ServiceSpec`]/[`BalancerSpec`]) and the
//! [`State`]. Its JSON uses Terraform's plan field names (`resource_changes`, `change.actions`,
//! `before`, `after`, `action_reason`) so that conftest and Checkov rules written for Terraform
//! plans read it unchanged. Instances are never updated in place: a change to what an instance
//! runs is a replacement (`["create","delete"]`, create-before-destroy), anything else is an
//! `update` of how many instances run or how they are checked and rolled out.
//!
//! ```
//! use std::collections::BTreeMap;
//! use kiln_core::plan::plan;
//! use kiln_core::state::State;
//!
//! let empty = plan("lineage", 0, &BTreeMap::new(), &BTreeMap::new(), &State::default());
//! assert!(!empty.has_changes());
//! assert_eq!(empty.render(), "No changes. The running services match the configuration.\n");
//! ```

mod drift;
mod render;
mod schedule;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use drift::{DriftRemediation, GROUP_SUBJECT, PROXY_BACKEND, drift_plan};
pub use schedule::{Schedule, schedule};

use crate::Digest;
use crate::digest::digest_json;
use crate::state::{BalancerSpec, ReleaseStatus, ServiceSpec, ServiceState, State};

/// The version of the plan's JSON shape. Bumped when a field changes meaning or goes away.
pub const FORMAT_VERSION: &str = "1.0";

/// What `apply` will do, made against one version of the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// [`FORMAT_VERSION`] of the JSON.
    pub format_version: String,
    /// The lineage of the state the plan was made against; apply refuses a foreign plan.
    pub lineage: String,
    /// The serial of that state; apply refuses a plan made against an older serial (stale).
    pub serial: u64,
    /// [`digest_json`] of `(services, balancers)`: identifies the desired config, so a policy
    /// decision or an approval can name exactly what it approved.
    pub config_hash: Digest,
    /// One entry per service and balancer on either side, sorted by address; unchanged ones are
    /// listed as `no-op` so that policies can see the whole picture.
    pub resource_changes: Vec<ResourceChange>,
    /// The desired services, so that apply executes exactly what was planned.
    pub services: BTreeMap<String, ServiceSpec>,
    /// The desired balancers.
    pub balancers: BTreeMap<String, BalancerSpec>,
    /// A drift remediation (`kiln drift --remediate`): the instances to replace and the
    /// unmanaged ones to stop. Its services and balancers are the state's own, unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftRemediation>,
    /// The `drift` block's settings the config wants, when they differ from the state's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_settings: Option<crate::model::DriftSettings>,
}

/// The change to one resource, in Terraform's `resource_changes[]` shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceChange {
    /// `service.web`, `balancer.public`.
    pub address: String,
    /// Always `managed` (kiln has no data sources); kept for Terraform-plan tooling.
    pub mode: String,
    /// `kiln_service` or `kiln_balancer`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The resource's name.
    pub name: String,
    /// What happens and the values on both sides.
    pub change: Change,
    /// Why, in words: every cause, in a fixed order (`"image changed, env changed"`).
    pub action_reason: Option<String>,
    /// How the new release rolls out, for services that are created or get a new release.
    pub rollout: Option<Schedule>,
}

/// Terraform's `change` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// One of `["no-op"]`, `["create"]`, `["create","delete"]` (replace, create before
    /// destroy), `["update"]`, `["delete"]`; see [`ChangeKind`].
    pub actions: Vec<String>,
    /// The resource as the state has it; `None` when it is created.
    pub before: Option<Value>,
    /// The resource as the config wants it; `None` when it is deleted.
    pub after: Option<Value>,
}

/// The kinds of change a plan makes, the typed form of [`Change::actions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Nothing to do.
    NoOp,
    /// A new resource; for a service, its first release.
    Create,
    /// A new release whose instances replace the running ones (create before destroy).
    Replace,
    /// The same release, scaled or with other health or rollout settings; no instance changes.
    Update,
    /// The resource goes away.
    Delete,
}

impl ChangeKind {
    /// Terraform's `actions` for this kind.
    pub fn actions(self) -> Vec<String> {
        let actions: &[&str] = match self {
            Self::NoOp => &["no-op"],
            Self::Create => &["create"],
            Self::Replace => &["create", "delete"],
            Self::Update => &["update"],
            Self::Delete => &["delete"],
        };
        actions.iter().map(|a| (*a).to_owned()).collect()
    }

    /// The kind that `actions` spells, if any. Plans are read back from files, so this does not
    /// assume the actions are well-formed.
    pub fn from_actions(actions: &[String]) -> Option<Self> {
        let actions: Vec<&str> = actions.iter().map(String::as_str).collect();
        Some(match actions.as_slice() {
            ["no-op"] => Self::NoOp,
            ["create"] => Self::Create,
            ["create", "delete"] => Self::Replace,
            ["update"] => Self::Update,
            ["delete"] => Self::Delete,
            _ => return None,
        })
    }
}

impl ResourceChange {
    /// The typed kind of this change; `None` for actions kiln never plans.
    pub fn kind_of_change(&self) -> Option<ChangeKind> {
        ChangeKind::from_actions(&self.change.actions)
    }
}

/// How many resources each kind of change touches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Created.
    pub create: usize,
    /// Replaced by a new release.
    pub replace: usize,
    /// Updated (scaled, or health/rollout settings).
    pub update: usize,
    /// Deleted.
    pub delete: usize,
}

impl Summary {
    /// Every change counted.
    pub fn total(&self) -> usize {
        self.create + self.replace + self.update + self.delete
    }
}

impl Plan {
    /// Whether applying the plan would change anything.
    pub fn has_changes(&self) -> bool {
        self.resource_changes
            .iter()
            .any(|c| c.kind_of_change() != Some(ChangeKind::NoOp))
    }

    /// Counts of each kind of change.
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for change in &self.resource_changes {
            match change.kind_of_change() {
                Some(ChangeKind::Create) => s.create += 1,
                Some(ChangeKind::Replace) => s.replace += 1,
                Some(ChangeKind::Update) => s.update += 1,
                Some(ChangeKind::Delete) => s.delete += 1,
                Some(ChangeKind::NoOp) | None => {}
            }
        }
        s
    }

    /// Adds the change of the `drift` block's settings, if `want` differs from the state's:
    /// an update of how the server watches, which touches no instance.
    #[must_use]
    pub fn with_drift_settings(mut self, want: crate::model::DriftSettings, state: &State) -> Plan {
        if want != state.drift {
            self.resource_changes.push(resource_change(
                "drift",
                "kiln_drift",
                "settings",
                ChangeKind::Update,
                Some(json!(state.drift)),
                Some(json!(want)),
                Some("drift settings changed".to_owned()),
                None,
            ));
            self.resource_changes
                .sort_by(|a, b| a.address.cmp(&b.address));
            self.drift_settings = Some(want);
        }
        self
    }

    /// The plan as text for people, in the manner of `terraform plan`.
    pub fn render(&self) -> String {
        render::render(self)
    }
}

/// The plan that takes `state` (at `lineage`/`serial`) to the desired `services` and
/// `balancers`.
pub fn plan(
    lineage: &str,
    serial: u64,
    services: &BTreeMap<String, ServiceSpec>,
    balancers: &BTreeMap<String, BalancerSpec>,
    state: &State,
) -> Plan {
    let mut resource_changes = Vec::new();
    let names: BTreeSet<&String> = services.keys().chain(state.services.keys()).collect();
    for name in names {
        resource_changes.push(service_change(
            name,
            services.get(name),
            state.services.get(name),
        ));
    }
    let names: BTreeSet<&String> = balancers.keys().chain(state.balancers.keys()).collect();
    for name in names {
        resource_changes.push(balancer_change(
            name,
            balancers.get(name),
            state.balancers.get(name),
        ));
    }
    resource_changes.sort_by(|a, b| a.address.cmp(&b.address));
    Plan {
        format_version: FORMAT_VERSION.to_owned(),
        lineage: lineage.to_owned(),
        serial,
        config_hash: digest_json(&(services, balancers)),
        resource_changes,
        services: services.clone(),
        balancers: balancers.clone(),
        drift: None,
        drift_settings: None,
    }
}

/// The `before`/`after` object of a service: the fields a reviewer or a policy cares about.
pub(super) fn service_json(spec: &ServiceSpec) -> Value {
    let mut value = json!({
        "image": spec.image,
        "image_digest": spec.image_digest,
        "instances": spec.instances,
        "port": spec.port,
        "env": spec.env,
        "health": spec.health,
        "rollout": spec.rollout,
    });
    // Only when set, so that plans of services without webhooks read as before.
    if let (Some(fields), false) = (value.as_object_mut(), spec.notify.is_empty()) {
        fields.insert("notify".to_owned(), json!(spec.notify));
    }
    value
}

pub(super) fn balancer_json(spec: &BalancerSpec) -> Value {
    json!(spec)
}

pub(super) fn service_change(
    name: &str,
    desired: Option<&ServiceSpec>,
    current: Option<&ServiceState>,
) -> ResourceChange {
    let (kind, reason, rollout) = match (desired, current) {
        (Some(want), None) => (ChangeKind::Create, None, Some(schedule(want, None, 1))),
        (None, _) => (ChangeKind::Delete, Some("not in config".to_owned()), None),
        (Some(want), Some(have)) => {
            let mut replace = replace_causes(want, &have.spec);
            // After a failed or reverted rollout the state's spec is the failed one while the
            // stable release still runs the old config; the same config must then roll out
            // again rather than plan as "no changes" (Terraform replaces a tainted resource the
            // same way). A rollout still running is left alone: it is already on its way.
            if replace.is_empty() && have.rollout.is_none() && !stable_runs(have, want) {
                replace.push(retry_cause(have));
            }
            let update = update_causes(want, &have.spec);
            if !replace.is_empty() {
                let next = have.releases.iter().map(|r| r.number).max().unwrap_or(0) + 1;
                let causes = [replace, update].concat().join(", ");
                let rollout = schedule(want, have.stable, next);
                (ChangeKind::Replace, Some(causes), Some(rollout))
            } else if !update.is_empty() {
                (ChangeKind::Update, Some(update.join(", ")), None)
            } else {
                (ChangeKind::NoOp, None, None)
            }
        }
    };
    let before = current.map(|c| service_json(&c.spec));
    let after = desired.map(service_json);
    resource_change(
        "service",
        "kiln_service",
        name,
        kind,
        before,
        after,
        reason,
        rollout,
    )
}

/// Changes to what an instance runs, in the order they are reported.
fn replace_causes(want: &ServiceSpec, have: &ServiceSpec) -> Vec<String> {
    let mut causes = Vec::new();
    if want.image_digest != have.image_digest {
        causes.push("image changed".to_owned());
    }
    if want.port != have.port {
        causes.push("port changed".to_owned());
    }
    if want.env != have.env {
        causes.push("env changed".to_owned());
    }
    causes
}

/// Changes that keep the release, in the order they are reported.
fn update_causes(want: &ServiceSpec, have: &ServiceSpec) -> Vec<String> {
    let mut causes = Vec::new();
    if want.instances != have.instances {
        causes.push("instances changed".to_owned());
    }
    if want.health != have.health {
        causes.push("health check changed".to_owned());
    }
    if want.rollout != have.rollout {
        causes.push("rollout settings changed".to_owned());
    }
    if want.notify != have.notify {
        causes.push("notifications changed".to_owned());
    }
    // The same digest under another image name runs the same bytes: only the record changes.
    if want.image != have.image && want.image_digest == have.image_digest {
        causes.push("image renamed".to_owned());
    }
    causes
}

/// Whether the stable release runs `want`'s config.
fn stable_runs(have: &ServiceState, want: &ServiceSpec) -> bool {
    let hash = want.config_hash();
    have.stable.is_some_and(|stable| {
        have.releases
            .iter()
            .any(|r| r.number == stable && r.config_hash == hash)
    })
}

fn retry_cause(have: &ServiceState) -> String {
    match have.releases.last() {
        Some(r) if matches!(r.status, ReleaseStatus::Failed | ReleaseStatus::RolledBack) => {
            format!("v{} did not roll out", r.number)
        }
        _ => "no stable release".to_owned(),
    }
}

pub(super) fn balancer_change(
    name: &str,
    desired: Option<&BalancerSpec>,
    current: Option<&BalancerSpec>,
) -> ResourceChange {
    let (kind, reason) = match (desired, current) {
        (Some(_), None) => (ChangeKind::Create, None),
        (None, _) => (ChangeKind::Delete, Some("not in config".to_owned())),
        (Some(want), Some(have)) => {
            let mut causes = Vec::new();
            if want.listen != have.listen {
                causes.push("listen changed");
            }
            if want.routes != have.routes {
                causes.push("routes changed");
            }
            if causes.is_empty() {
                (ChangeKind::NoOp, None)
            } else {
                (ChangeKind::Update, Some(causes.join(", ")))
            }
        }
    };
    let before = current.map(balancer_json);
    let after = desired.map(balancer_json);
    resource_change(
        "balancer",
        "kiln_balancer",
        name,
        kind,
        before,
        after,
        reason,
        None,
    )
}

#[allow(clippy::too_many_arguments)] // One flat constructor reads better than a builder here.
pub(super) fn resource_change(
    prefix: &str,
    kind: &str,
    name: &str,
    change: ChangeKind,
    before: Option<Value>,
    after: Option<Value>,
    action_reason: Option<String>,
    rollout: Option<Schedule>,
) -> ResourceChange {
    ResourceChange {
        address: format!("{prefix}.{name}"),
        mode: "managed".to_owned(),
        kind: kind.to_owned(),
        name: name.to_owned(),
        change: Change {
            actions: change.actions(),
            before,
            after,
        },
        action_reason,
        rollout,
    }
}
