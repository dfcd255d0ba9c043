//! The input document: kiln's plan plus what kiln knows about the environment and the images.
//! The document is described in the [crate docs](crate#the-input-document).

use std::collections::BTreeMap;

use kiln_core::Digest;
use kiln_core::plan::Plan;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `kiln` object of the input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// Where the plan is to be applied.
    pub environment: Environment,
    /// Who asks (`user@host`).
    pub actor: String,
    /// The time of the check (RFC 3339, UTC); policies compare against it rather than read a
    /// clock, so that a decision can be replayed.
    pub now: String,
    /// What kiln knows of every image a service of the plan uses, and of their ancestors, by
    /// digest.
    pub images: BTreeMap<Digest, ImageFacts>,
}

/// `kiln.environment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    /// Its name (`prod`).
    pub name: String,
    /// Whether it is protected (stricter built-in checks).
    pub protected: bool,
}

/// `kiln.images[digest]`: one image as kiln's store records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageFacts {
    /// The image's name in the config (`web`).
    pub name: String,
    /// Its digest (the key it is found under).
    pub digest: Digest,
    /// Whether kiln's store holds it.
    pub in_store: bool,
    /// Whether its blobs were verified against their digests.
    pub verified: bool,
    /// Its OCI config labels.
    pub labels: BTreeMap<String, String>,
    /// The git state it was baked from, when kiln knew it.
    pub git: Option<GitFacts>,
    /// When it was created (RFC 3339), when known.
    pub created: Option<String>,
    /// Seconds from `created` to `now` (0 when `created` is in the future), when known.
    pub age_seconds: Option<u64>,
    /// Its base images, nearest first.
    pub ancestry: Vec<Digest>,
    /// Set when it, or an image it is built on, was revoked.
    pub revoked: Option<Revocation>,
    /// The OCI config's entrypoint.
    pub entrypoint: Vec<String>,
    /// The OCI config's cmd.
    pub cmd: Vec<String>,
    /// The ports the OCI config exposes.
    pub exposed_ports: Vec<u16>,
}

/// `kiln.images[digest].git`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitFacts {
    /// The commit.
    pub commit: String,
    /// Whether the work tree had uncommitted changes.
    pub dirty: bool,
}

/// `kiln.images[digest].revoked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Why (`CVE-2026-1234 in openssl`).
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// How an environment value is shown to policies: `sha256:` and the first 12 hex digits of
/// the sha256 of the value. Policies can test which keys are set and whether a value changed,
/// not read it. (A short unsalted hash of a guessable value can be guessed: it hides secrets
/// from policy output and logs, it does not protect a weak secret.)
pub fn mask_env_value(value: &str) -> String {
    format!("sha256:{}", Digest::of(value.as_bytes()).short())
}

/// The input document for `plan` in `context`: the plan's JSON with every environment value
/// masked ([`mask_env_value`]) in `services.*.env` and in `resource_changes[*].change.before`
/// and `.after`, plus the `kiln` object.
pub fn build_input(plan: &Plan, context: &Context) -> Value {
    let mut doc = serde_json::to_value(plan).unwrap_or(Value::Null);
    if let Some(services) = doc.get_mut("services").and_then(Value::as_object_mut) {
        for spec in services.values_mut() {
            mask_env(spec);
        }
    }
    if let Some(changes) = doc
        .get_mut("resource_changes")
        .and_then(Value::as_array_mut)
    {
        for change in changes {
            for side in ["before", "after"] {
                if let Some(v) = change.get_mut("change").and_then(|c| c.get_mut(side)) {
                    mask_env(v);
                }
            }
        }
    }
    if let Some(fields) = doc.as_object_mut() {
        fields.insert(
            "kiln".to_owned(),
            serde_json::to_value(context).unwrap_or(Value::Null),
        );
    }
    doc
}

fn mask_env(spec: &mut Value) {
    if let Some(env) = spec.get_mut("env").and_then(Value::as_object_mut) {
        for v in env.values_mut() {
            if let Some(s) = v.as_str() {
                *v = Value::String(mask_env_value(s));
            }
        }
    }
}
