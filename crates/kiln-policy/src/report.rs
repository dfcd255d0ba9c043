//! Decisions for people ([`render`]) and for code-scanning tools ([`sarif`]).
//!
//! SARIF mapping: one run whose tool is `kiln policy`; one rule per (package, rule), with the
//! id `package/rule` (`kiln.builtin/deny_no_ssh`); one result per [`Outcome`] with the level
//!
//! | outcome | SARIF level |
//! |---|---|
//! | deny from a soft- or hard-mandatory set | `error` |
//! | deny from an advisory set, warn from an enforced set | `warning` |
//! | warn from an advisory set | `note` |
//!
//! An excepted result keeps its level and carries a `suppressions` entry (kind `external`:
//! the exception lives in the policy, not in the plan), which code-scanning tools show as
//! dismissed. Results have no `locations`: a plan is one document, and every kiln message
//! starts with the address it is about (`service.web: …`). The bundle hashes and the
//! duration are in the run's `properties`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::eval::{Decision, Kind, Outcome};
use crate::set::Level;

/// The SARIF 2.1.0 schema URI.
pub const SARIF_SCHEMA: &str = "https://json.schemastore.org/sarif-2.1.0.json";

/// The decision as text: one line per result, then a verdict.
///
/// ```text
/// DENY    builtin (soft_mandatory) kiln.builtin.deny_health_required: service.web: has no health check
/// WARN    builtin (soft_mandatory) kiln.builtin.warn_capacity: service.api: max_parallel 4 replaces …
/// ADVISE  team (advisory) team.web.deny: service.web: … (advisory: does not block)
/// EXCEPT  team (hard_mandatory) team.web.deny_ports: service.web: … (excepted)
///
/// Blocked by 1 soft-mandatory denial: an operator may override it. 1 warning, 1 advisory, 1 excepted.
/// Policy sets: builtin sha256:1a2b3c4d5e6f, team sha256:7a8b9c0d1e2f (3ms)
/// ```
pub fn render(d: &Decision) -> String {
    let mut out = String::new();
    for o in &d.results {
        let (tag, note) = match (o.kind, o.excepted, o.level) {
            (_, true, _) => ("EXCEPT", " (excepted)"),
            (Kind::Deny, false, Level::Advisory) => ("ADVISE", " (advisory: does not block)"),
            (Kind::Deny, false, _) => ("DENY", ""),
            (Kind::Warn, false, _) => ("WARN", ""),
        };
        let _ = writeln!(
            out,
            "{tag:<7} {} ({}) {}.{}: {}{note}",
            o.set, o.level, o.package, o.rule, o.message
        );
    }
    if !d.results.is_empty() {
        out.push('\n');
    }

    let blocking = d.blocking();
    let hard = blocking
        .iter()
        .filter(|o| o.level == Level::HardMandatory)
        .count();
    let soft = blocking.len() - hard;
    let verdict = if blocking.is_empty() {
        "Passed: nothing blocks.".to_owned()
    } else if hard == 0 {
        format!(
            "Blocked by {soft} soft-mandatory denial{}: an operator may override {}.",
            plural(soft),
            if soft == 1 { "it" } else { "them" }
        )
    } else {
        let mut s = format!("Blocked by {hard} hard-mandatory denial{}", plural(hard));
        if soft > 0 {
            let _ = write!(s, " and {soft} soft-mandatory");
        }
        s.push_str(": no override.");
        s
    };
    out.push_str(&verdict);
    let count = |f: &dyn Fn(&Outcome) -> bool| d.results.iter().filter(|o| f(o)).count();
    let warnings = count(&|o| o.kind == Kind::Warn && !o.excepted);
    let advisory = count(&|o| o.kind == Kind::Deny && !o.excepted && !o.level.enforced());
    let excepted = count(&|o| o.excepted);
    let mut extra = Vec::new();
    if warnings > 0 {
        extra.push(format!("{warnings} warning{}", plural(warnings)));
    }
    if advisory > 0 {
        extra.push(format!("{advisory} advisory"));
    }
    if excepted > 0 {
        extra.push(format!("{excepted} excepted"));
    }
    if !extra.is_empty() {
        let _ = write!(out, " {}.", extra.join(", "));
    }
    out.push('\n');
    let bundles: Vec<String> = d
        .bundles
        .iter()
        .map(|(name, hash)| format!("{name} sha256:{}", hash.short()))
        .collect();
    let _ = writeln!(
        out,
        "Policy sets: {} ({}ms)",
        if bundles.is_empty() {
            "none".to_owned()
        } else {
            bundles.join(", ")
        },
        d.duration.as_millis()
    );
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The SARIF level of a result (see the table in the module docs).
pub fn sarif_level(o: &Outcome) -> &'static str {
    match (o.kind, o.level.enforced()) {
        (Kind::Deny, true) => "error",
        (Kind::Deny, false) | (Kind::Warn, true) => "warning",
        (Kind::Warn, false) => "note",
    }
}

/// The decision as a SARIF 2.1.0 log (see the module docs).
pub fn sarif(d: &Decision) -> Value {
    // Rules in a stable order: by package, then rule.
    let mut rules: BTreeMap<(String, String), &Outcome> = BTreeMap::new();
    for o in &d.results {
        rules
            .entry((o.package.clone(), o.rule.clone()))
            .or_insert(o);
    }
    let index: BTreeMap<&(String, String), usize> =
        rules.keys().enumerate().map(|(i, k)| (k, i)).collect();
    let rule_json: Vec<Value> = rules
        .iter()
        .map(|((package, rule), o)| {
            json!({
                "id": format!("{package}/{rule}"),
                "name": rule,
                "shortDescription": { "text": format!("{} rule {rule} of package {package}", o.kind) },
                "properties": { "package": package, "kind": o.kind },
            })
        })
        .collect();
    let results: Vec<Value> = d
        .results
        .iter()
        .map(|o| {
            let key = (o.package.clone(), o.rule.clone());
            let mut r = json!({
                "ruleId": format!("{}/{}", o.package, o.rule),
                "ruleIndex": index[&key],
                "level": sarif_level(o),
                "message": { "text": o.message },
                "properties": {
                    "set": o.set,
                    "policy_level": o.level,
                    "kind": o.kind,
                    "blocking": o.blocks(),
                },
            });
            if o.excepted {
                r["suppressions"] = json!([{
                    "kind": "external",
                    "justification": format!("exception in package {}", o.package),
                }]);
            }
            r
        })
        .collect();
    let bundles: Vec<Value> = d
        .bundles
        .iter()
        .map(|(name, hash)| json!({ "set": name, "hash": hash }))
        .collect();
    json!({
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {
                "driver": {
                    "name": "kiln policy",
                    "version": env!("CARGO_PKG_VERSION"),
                    "rules": rule_json,
                },
            },
            "results": results,
            "properties": {
                "bundles": bundles,
                "duration_ms": u64::try_from(d.duration.as_millis()).unwrap_or(u64::MAX),
                "passed": d.passed(),
            },
        }],
    })
}
