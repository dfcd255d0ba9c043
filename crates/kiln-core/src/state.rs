//! The record of what kiln runs: services, their releases and instances, and rollouts in
//! progress. Plain data, serialised as one JSON document that state backends version with a
//! `lineage` and a monotonic `serial`.
//!
//! The desired side is [`ServiceSpec`]/[`BalancerSpec`], built from the config by
//! [`desired`]; the plan compares it with what [`State`] says was applied.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::digest::digest_json;
use crate::model::{Config, Health, Rollout, Route};

/// Everything kiln knows it runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Services by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceState>,
    /// Balancers as last applied, by name.
    #[serde(default)]
    pub balancers: BTreeMap<String, BalancerSpec>,
    /// Continuous drift detection, as last applied.
    #[serde(default)]
    pub drift: crate::model::DriftSettings,
    /// Where each balancer really listened last (its `listen` port may be 0), so a restarted
    /// server listens on the same address again.
    #[serde(default)]
    pub listeners: BTreeMap<String, String>,
}

/// One service: the spec last applied, every release, every instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    /// The spec the newest release was made from.
    pub spec: ServiceSpec,
    /// Releases, oldest first; numbers start at 1 and never repeat.
    pub releases: Vec<Release>,
    /// The release that takes traffic when no rollout runs.
    pub stable: Option<u32>,
    /// Instances kiln started and has not yet seen stopped.
    pub instances: Vec<Instance>,
    /// The rollout in progress, if any (its journal).
    pub rollout: Option<crate::rollout::Journal>,
}

/// What a service should be, as the config says it (with images resolved to digests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Service name.
    pub name: String,
    /// Image name in the config.
    pub image: String,
    /// The image's digest.
    pub image_digest: Digest,
    /// How many instances.
    pub instances: u32,
    /// The app's port inside the instance.
    pub port: u16,
    /// Environment for instances (secrets never here: only references).
    pub env: BTreeMap<String, String>,
    /// Health check.
    pub health: Option<Health>,
    /// Rollout settings.
    pub rollout: Rollout,
    /// Webhooks that receive the service's events: the top-level `notify` blocks, then the
    /// service's own, without repeats. Not part of a release: changing them is an update.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
}

impl ServiceSpec {
    /// The hash of everything that defines what an instance runs: image, port and env. Two
    /// specs with the same hash run identical instances; a different hash needs a new release.
    pub fn config_hash(&self) -> Digest {
        digest_json(&(&self.image_digest, self.port, &self.env))
    }
}

/// One immutable version of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// v1, v2, …
    pub number: u32,
    /// The image's name when released.
    pub image: String,
    /// The image's digest.
    pub image_digest: Digest,
    /// [`ServiceSpec::config_hash`] of the spec released.
    pub config_hash: Digest,
    /// The app's port.
    pub port: u16,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// The health check its instances answer (a new release may move its health endpoint
    /// while the old one still answers at the old path).
    #[serde(default)]
    pub health: Option<Health>,
    /// The git commit of the config, if known.
    pub git_commit: Option<String>,
    /// The deployment (apply) that made it.
    pub deployment_id: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// Who made it (`user@host`).
    pub actor: String,
    /// Where it stands.
    pub status: ReleaseStatus,
    /// Made by `kiln rollback`: the earlier release whose image and config it runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u32>,
}

/// Where a release stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Being rolled out.
    Pending,
    /// Takes traffic.
    Active,
    /// Replaced, instances still running for a quick rollback.
    Warm,
    /// Replaced; no instances.
    Retired,
    /// Never became healthy, or was aborted.
    Failed,
    /// Traffic moved back from it.
    RolledBack,
}

/// One running copy of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique id (`web-v2-3f9a1c`).
    pub id: String,
    /// The release it runs.
    pub release: u32,
    /// The host port kiln assigned (the app reads it from `PORT`).
    pub port: u16,
    /// What the driver needs to find it again after a restart (`null` while it is being
    /// started: the record is written before the process exists, so a crash leaves no orphan
    /// that state does not know).
    pub handle: serde_json::Value,
    /// Whether the proxy sends it requests.
    #[serde(default)]
    pub routable: bool,
    /// Being drained and stopped.
    #[serde(default)]
    pub retiring: bool,
    /// When it was started (RFC 3339).
    pub started_at: String,
    /// Why it must be replaced (a drift finding it answers to): a replacement of the same
    /// release is started first and this one retired once the replacement serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_because: Option<String>,
}

/// A balancer as applied: where it listens and its routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancerSpec {
    /// Name.
    pub name: String,
    /// `ip:port`.
    pub listen: String,
    /// Routes.
    pub routes: Vec<Route>,
}

/// The desired services and balancers of a config, with each service's image resolved through
/// `digests` (image name → digest). A service whose image has no digest is left out and
/// named in the error list.
pub fn desired(
    config: &Config,
    digests: &BTreeMap<String, Digest>,
) -> (
    BTreeMap<String, ServiceSpec>,
    BTreeMap<String, BalancerSpec>,
    Vec<String>,
) {
    let mut missing = Vec::new();
    let mut services = BTreeMap::new();
    for (name, s) in &config.services {
        let Some(digest) = digests.get(&s.image) else {
            missing.push(s.image.clone());
            continue;
        };
        services.insert(
            name.clone(),
            ServiceSpec {
                name: name.clone(),
                image: s.image.clone(),
                image_digest: digest.clone(),
                instances: s.instances,
                port: s.port,
                env: s.env.clone(),
                health: s.health.clone(),
                rollout: s.rollout.clone(),
                notify: webhooks(config, s),
            },
        );
    }
    let balancers = config
        .balancers
        .iter()
        .map(|(name, b)| {
            (
                name.clone(),
                BalancerSpec {
                    name: name.clone(),
                    listen: b.listen.clone(),
                    routes: b.routes.clone(),
                },
            )
        })
        .collect();
    (services, balancers, missing)
}

/// The webhooks of `service`: the config's top-level ones first, then its own, each once.
fn webhooks(config: &Config, service: &crate::model::Service) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in config.notify.iter().chain(&service.notify) {
        if !out.contains(&n.webhook) {
            out.push(n.webhook.clone());
        }
    }
    out
}
