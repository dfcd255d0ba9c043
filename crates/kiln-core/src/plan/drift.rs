//! The plan that answers drift: replace what drifted, stop what kiln does not manage.
//!
//! Its services and balancers are the state's own, so applying it changes no release; the
//! only changes are instances, each with its `action_reason`: `replace_because_drift` (a new
//! instance of the same release is started, and the drifted one retired once the new one
//! serves) or `delete_because_unmanaged`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ChangeKind, FORMAT_VERSION, Plan, ResourceChange};
use crate::digest::digest_json;
use crate::drift::{Category, Finding, Report};
use crate::state::State;

/// The subject of a finding about a backend in the proxy's tables.
pub const PROXY_BACKEND: &str = "proxy backend";

/// How the subject of a finding about a runtime's group of instances starts
/// (`group kiln-shop-web-v2 desired capacity`).
pub const GROUP_SUBJECT: &str = "group ";

/// What a drift remediation changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftRemediation {
    /// Instances to replace, by service then id, with why (their findings, `; `-joined).
    pub replace: BTreeMap<String, BTreeMap<String, String>>,
    /// Processes kiln started that the state does not know, by id, to stop.
    pub remove: BTreeMap<String, String>,
    /// Services whose proxy table drifted, with why: kiln's table is handed over again.
    #[serde(default)]
    pub reroute: BTreeMap<String, String>,
    /// Releases whose group of instances in the runtime (an Auto Scaling group) was
    /// resized or changed outside kiln, by service then release, with why: the group is
    /// set back to what kiln expects.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regroup: BTreeMap<String, BTreeMap<u32, String>>,
    /// The findings the plan answers, and those it cannot (shown, not acted on).
    pub findings: Vec<Finding>,
}

impl DriftRemediation {
    /// Whether it changes anything.
    pub fn is_empty(&self) -> bool {
        self.replace.is_empty()
            && self.remove.is_empty()
            && self.reroute.is_empty()
            && self.regroup.is_empty()
    }
}

/// The plan answering `report` against `state` (at `lineage`/`serial`).
pub fn drift_plan(lineage: &str, serial: u64, state: &State, report: &Report) -> Plan {
    let mut remedy = DriftRemediation {
        findings: report.findings.clone(),
        ..DriftRemediation::default()
    };
    for f in &report.findings {
        let (Some(service), Some(id)) = (&f.service, &f.instance) else {
            if let (Category::Unmanaged, Some(id)) = (f.category, &f.instance) {
                remedy.remove.insert(id.clone(), unmanaged(f));
            }
            continue;
        };
        let known = state
            .services
            .get(service)
            .is_some_and(|s| s.instances.iter().any(|i| &i.id == id && !i.retiring));
        if f.replaceable() && known {
            let why = remedy
                .replace
                .entry(service.clone())
                .or_default()
                .entry(id.clone())
                .or_default();
            if !why.is_empty() {
                why.push_str("; ");
            }
            why.push_str(&reason(f));
        } else if f.category == Category::Unmanaged
            && !known
            && f.subject.as_deref() != Some(PROXY_BACKEND)
        {
            remedy.remove.insert(id.clone(), unmanaged(f));
        }
    }

    // A proxy table changed behind kiln's back is answered by handing kiln's table over again:
    // an update of the service that changes nothing else.
    for f in &report.findings {
        let routing = f.category == Category::Routing
            || (f.category == Category::Unmanaged && f.subject.as_deref() == Some(PROXY_BACKEND));
        if let (true, Some(service)) = (routing, &f.service)
            && state.services.contains_key(service)
        {
            let why = remedy.reroute.entry(service.clone()).or_default();
            if !why.is_empty() {
                why.push_str("; ");
            }
            why.push_str(&reason(f));
        }
    }

    // A group resized behind kiln's back is set back: an update of the service as well.
    for f in &report.findings {
        let group = f.category == Category::Config
            && f.instance.is_none()
            && f.subject
                .as_deref()
                .is_some_and(|s| s.starts_with(GROUP_SUBJECT));
        if let (true, Some(service), Some(release)) = (group, &f.service, f.release)
            && state.services.contains_key(service)
        {
            let why = remedy
                .regroup
                .entry(service.clone())
                .or_default()
                .entry(release)
                .or_default();
            if !why.is_empty() {
                why.push_str("; ");
            }
            why.push_str(&reason(f));
        }
    }

    let mut changes = Vec::new();
    for (name, s) in &state.services {
        let json = super::service_json(&s.spec);
        let regroup = remedy.regroup.get(name).map(|releases| {
            releases
                .iter()
                .map(|(r, why)| format!("v{r}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
        let why = match (remedy.reroute.get(name), regroup) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (Some(a), None) => Some(a.clone()),
            (None, b) => b,
        };
        let (kind, why) = match why {
            Some(why) => (
                ChangeKind::Update,
                Some(format!("update_because_drift: {why}")),
            ),
            None => (ChangeKind::NoOp, None),
        };
        changes.push(super::resource_change(
            "service",
            "kiln_service",
            name,
            kind,
            Some(json.clone()),
            Some(json),
            why,
            None,
        ));
    }
    for (name, b) in &state.balancers {
        let json = super::balancer_json(b);
        changes.push(super::resource_change(
            "balancer",
            "kiln_balancer",
            name,
            ChangeKind::NoOp,
            Some(json.clone()),
            Some(json),
            None,
            None,
        ));
    }
    for (service, ids) in &remedy.replace {
        for (id, why) in ids {
            let release = state.services[service]
                .instances
                .iter()
                .find(|i| &i.id == id)
                .map(|i| i.release);
            changes.push(instance_change(
                Some(service),
                id,
                ChangeKind::Replace,
                json!({ "release": release, "drift": why }),
                "replace_because_drift",
            ));
        }
    }
    for (id, why) in &remedy.remove {
        changes.push(instance_change(
            None,
            id,
            ChangeKind::Delete,
            json!({ "drift": why }),
            "delete_because_unmanaged",
        ));
    }
    changes.sort_by(|a, b| a.address.cmp(&b.address));

    let services: BTreeMap<_, _> = state
        .services
        .iter()
        .map(|(n, s)| (n.clone(), s.spec.clone()))
        .collect();
    let balancers = state.balancers.clone();
    Plan {
        format_version: FORMAT_VERSION.to_owned(),
        lineage: lineage.to_owned(),
        serial,
        config_hash: digest_json(&(&services, &balancers)),
        resource_changes: changes,
        services,
        balancers,
        drift: Some(remedy),
        drift_settings: None,
    }
}

/// Why an unmanaged instance is stopped.
fn unmanaged(f: &Finding) -> String {
    format!("not in the state ({})", f.found)
}

/// A finding as one reason: `file_tamper /var/www/index.html`.
fn reason(f: &Finding) -> String {
    match &f.subject {
        Some(s) => format!("{} {s}", f.category),
        None => f.category.to_string(),
    }
}

fn instance_change(
    service: Option<&String>,
    id: &str,
    kind: ChangeKind,
    before: serde_json::Value,
    reason: &str,
) -> ResourceChange {
    let prefix = match service {
        Some(s) => format!("service.{s}.instance"),
        None => "instance".to_owned(),
    };
    let after = (kind == ChangeKind::Replace).then(|| json!({ "release": before["release"] }));
    let mut change = super::resource_change(
        &prefix,
        "kiln_instance",
        id,
        kind,
        Some(before),
        after,
        Some(reason.to_owned()),
        None,
    );
    change.address = format!("{prefix}[\"{id}\"]");
    change
}
