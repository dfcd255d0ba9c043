//! The policy gate every plan passes: the config's policy sets and the built-in pack, evaluated
//! in-process (regorus) against the plan and the facts of its images, before anything changes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use anyhow::{Context as _, Result, bail};
use kiln_bake::Store;
use kiln_core::Digest;
use kiln_core::model::{Config, Enforcement};
use kiln_core::plan::Plan;
use kiln_policy::{
    BuiltinSettings, Context, Decision, Environment, GitFacts, ImageFacts, Level, Limits,
    PolicySet, Revocation,
};
use kiln_state::StateStore;

use crate::project::Project;

fn level(e: Enforcement) -> Level {
    match e {
        Enforcement::Advisory => Level::Advisory,
        Enforcement::SoftMandatory => Level::SoftMandatory,
        Enforcement::HardMandatory => Level::HardMandatory,
    }
}

/// The policy sets of `project`: each `policy "NAME"` directory (or `./policies` when the config
/// names none and it exists, hard-mandatory), then the built-in pack.
pub fn sets(project: &Project) -> Result<Vec<PolicySet>> {
    let config = &project.config;
    let mut sets = Vec::new();
    if config.policies.is_empty() {
        let dir = project.dir.join("policies");
        if dir.is_dir() {
            sets.push(kiln_policy::load_dir(
                &dir,
                "policies",
                Level::HardMandatory,
            )?);
        }
    }
    for p in &config.policies {
        let dir = project.dir.join(&p.dir);
        if !dir.is_dir() {
            bail!(
                "policy \"{}\": directory {} does not exist (set `dir` in its block)",
                p.name,
                dir.display()
            );
        }
        sets.push(kiln_policy::load_dir(&dir, &p.name, level(p.enforcement))?);
    }
    sets.push(kiln_policy::builtin_pack(&builtin_settings(config)));
    Ok(sets)
}

/// The built-in pack's settings: advisory by default, soft-mandatory in a protected environment.
pub fn builtin_settings(config: &Config) -> BuiltinSettings {
    let b = &config.builtin_policy;
    let default = if config.environment.protected {
        Enforcement::SoftMandatory
    } else {
        Enforcement::Advisory
    };
    BuiltinSettings {
        disabled: b.disable.iter().cloned().collect::<BTreeSet<_>>(),
        max_image_age_days: u32::try_from(b.max_image_age.as_secs() / 86_400).unwrap_or(u32::MAX),
        level: level(b.enforcement.unwrap_or(default)),
    }
}

/// What the policies know of each image the plan's services use.
fn image_facts(store: &Store, digest: &Digest, now: SystemTime) -> Result<ImageFacts> {
    let Some(record) = store.image(digest)? else {
        return Ok(ImageFacts {
            name: String::new(),
            digest: digest.clone(),
            in_store: false,
            verified: false,
            labels: BTreeMap::new(),
            git: None,
            created: None,
            age_seconds: None,
            ancestry: Vec::new(),
            revoked: None,
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            exposed_ports: Vec::new(),
        });
    };
    // Present and named by its digest: the manifest blob hashes to it, and every layer blob
    // is there (`kiln images verify` re-hashes every layer; every launch does too).
    let verified = store
        .read_blob(&record.digest)
        .is_ok_and(|b| Digest::of(&b) == record.digest)
        && record.layers.iter().all(|l| store.has_blob(&l.digest));
    let config: kiln_bake::oci::ImageConfig = store.read_blob_json(&record.config_digest)?;
    let ancestry = store
        .ancestry(&record)?
        .into_iter()
        .map(|r| r.digest)
        .collect();
    let built = humantime::parse_rfc3339(&record.built_at).ok();
    let age_seconds = built
        .and_then(|b| now.duration_since(b).ok())
        .map(|d| d.as_secs());
    let revoked = store.revoked(&record, now)?.map(|r| Revocation {
        reason: r.to_string(),
        at: r.revocation.at,
    });
    Ok(ImageFacts {
        name: record.name.clone(),
        digest: digest.clone(),
        in_store: true,
        verified,
        labels: record.labels.clone(),
        git: record.git.as_ref().map(|g| GitFacts {
            commit: g.commit.clone(),
            dirty: g.dirty,
        }),
        created: Some(record.built_at),
        age_seconds,
        ancestry,
        revoked,
        entrypoint: config.config.entrypoint.clone().unwrap_or_default(),
        cmd: config.config.cmd.clone().unwrap_or_default(),
        exposed_ports: config
            .config
            .exposed_ports
            .keys()
            .filter_map(|p| p.split('/').next()?.parse().ok())
            .collect(),
    })
}

/// Evaluates every policy set of `project` against `plan`.
pub fn check(project: &Project, store: &Store, plan: &Plan) -> Result<Decision> {
    let now = kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock);
    let mut images = BTreeMap::new();
    for spec in plan.services.values() {
        if !images.contains_key(&spec.image_digest) {
            images.insert(
                spec.image_digest.clone(),
                image_facts(store, &spec.image_digest, now)?,
            );
        }
    }
    let context = Context {
        environment: Environment {
            name: project.config.environment.name.clone(),
            protected: project.config.environment.protected,
        },
        actor: kiln_engine::actor(),
        now: humantime::format_rfc3339_seconds(now).to_string(),
        images,
    };
    let input = kiln_policy::build_input(plan, &context);
    let sets = sets(project)?;
    kiln_policy::evaluate(&sets, &input, &Limits::default()).context("evaluating the policies")
}

/// The gate before an apply: shows the decision, records it in the audit log, and refuses a
/// blocked plan unless every blocking set is soft-mandatory and `override_reason` is given
/// (the override is recorded with its reason). Nothing has changed when it refuses.
pub fn gate(
    db: &StateStore,
    decision: &Decision,
    plan: &Plan,
    override_reason: Option<&str>,
) -> Result<()> {
    if !decision.results.is_empty() {
        eprint!("{}", decision.render());
    }
    let now = kiln_core::clock::Clock::now(&kiln_core::clock::SystemClock);
    let blocking = decision.blocking();
    let bundles: Vec<String> = decision
        .bundles
        .iter()
        .map(|(n, h)| format!("{n} {h}"))
        .collect();
    let mut entries = vec![crate::cmd::audit::entry(
        "policy",
        &format!("plan of config {}", plan.config_hash),
        serde_json::json!({
            "passed": decision.passed(),
            "blocking": blocking.iter().map(|o| format!("{}: {}", o.set, o.message)).collect::<Vec<_>>(),
            "results": decision.results.len(),
            "bundles": bundles,
        }),
    )];
    let refused = if blocking.is_empty() {
        None
    } else if let (true, Some(reason)) = (decision.overridable(), override_reason) {
        entries.push(crate::cmd::audit::entry(
            "policy_override",
            &format!("plan of config {}", plan.config_hash),
            serde_json::json!({
                "reason": reason,
                "overridden": blocking.iter().map(|o| format!("{}: {}", o.set, o.message)).collect::<Vec<_>>(),
            }),
        ));
        eprintln!(
            "policy: soft-mandatory denials overridden by {}: {reason}",
            kiln_engine::actor()
        );
        None
    } else if decision.overridable() {
        Some(format!(
            "refused by policy ({} soft-mandatory denial(s)); nothing was changed. Fix the plan, \
             or override with --override-policy \"reason\" (recorded in the audit log)",
            blocking.len()
        ))
    } else {
        Some(format!(
            "refused by policy ({} denial(s)); nothing was changed",
            blocking.len()
        ))
    };
    db.append_audit(&entries, now)?;
    if let Some(msg) = refused {
        bail!(msg);
    }
    Ok(())
}
