//! `Plan::render`: the plan as people read it, shaped like `terraform plan` output so that it
//! feels familiar: a `#` line saying what happens and why, the symbol line, then the attributes
//! that change.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::{ChangeKind, Plan, ResourceChange, Schedule};
use crate::Digest;
use crate::model::Strategy;

/// Top-level fields in the order they are shown: what an instance runs first, then how many,
/// then how they are checked and rolled out. Fields not listed sort after these.
const FIELD_ORDER: [&str; 9] = [
    "image",
    "image_digest",
    "instances",
    "port",
    "env",
    "health",
    "rollout",
    "listen",
    "routes",
];

pub(super) fn render(plan: &Plan) -> String {
    if !plan.has_changes() && plan.drift.is_none() {
        return "No changes. The running services match the configuration.\n".to_owned();
    }
    let mut out = String::new();
    for change in &plan.resource_changes {
        if let Some(kind) = change.kind_of_change()
            && kind != ChangeKind::NoOp
        {
            resource(&mut out, change, kind);
            out.push('\n');
        }
    }
    let s = plan.summary();
    let _ = writeln!(
        out,
        "Plan: {} to create, {} to replace, {} to update, {} to delete.",
        s.create, s.replace, s.update, s.delete
    );
    if let Some(remedy) = &plan.drift {
        let left: Vec<_> = remedy
            .findings
            .iter()
            .filter(|f| {
                !f.instance.as_ref().is_some_and(|id| {
                    remedy.remove.contains_key(id)
                        || remedy.replace.values().any(|ids| ids.contains_key(id))
                })
            })
            .collect();
        if !left.is_empty() {
            let _ = writeln!(out, "\nNot answered by replacing instances:");
            for f in left {
                let _ = writeln!(out, "  {f}");
            }
        }
    }
    out
}

/// An instance replaced or stopped by a drift remediation.
fn instance(out: &mut String, change: &ResourceChange, kind: ChangeKind) {
    let before = change.change.before.as_ref();
    let why = before.and_then(|b| b["drift"].as_str()).unwrap_or_default();
    let release = before.and_then(|b| b["release"].as_u64());
    match kind {
        ChangeKind::Replace => {
            let v = release.map_or_else(String::new, |r| format!("v{r}"));
            let _ = writeln!(
                out,
                "  # {} will be replaced because it drifted: {why}",
                change.address
            );
            let _ = writeln!(
                out,
                "  +/- instance \"{}\": a new {v} instance starts first; this one is retired once it serves",
                change.name
            );
        }
        _ => {
            let _ = writeln!(out, "  # {} will be stopped: {why}", change.address);
            let _ = writeln!(out, "  - instance \"{}\"", change.name);
        }
    }
}

fn resource(out: &mut String, change: &ResourceChange, kind: ChangeKind) {
    if change.kind == "kiln_instance" {
        return instance(out, change, kind);
    }
    let what = change.address.split('.').next().unwrap_or_default();
    let release = change.rollout.as_ref().map(|s| s.to_release);
    let reason = change.action_reason.as_deref().unwrap_or_default();
    let (headline, symbol) = match (kind, release) {
        (ChangeKind::Create, Some(v)) => (format!("will be created as release v{v}"), "+"),
        (ChangeKind::Create, None) => ("will be created".to_owned(), "+"),
        (ChangeKind::Replace, Some(v)) => {
            (format!("will be replaced by release v{v}: {reason}"), "+/-")
        }
        (ChangeKind::Replace, None) => (format!("will be replaced: {reason}"), "+/-"),
        (ChangeKind::Update, _) => (format!("will be updated: {reason}"), "~"),
        (ChangeKind::Delete, _) => (format!("will be destroyed: {reason}"), "-"),
        (ChangeKind::NoOp, _) => return,
    };
    let _ = writeln!(out, "  # {} {headline}", change.address);
    let _ = writeln!(out, "  {symbol} {what} \"{}\"", change.name);
    // A new service's rollout settings are summed up by the rollout line below; listing every
    // default would bury the fields that matter.
    let hide_rollout = kind == ChangeKind::Create && change.rollout.is_some();
    if kind != ChangeKind::Delete {
        let before = flatten(change.change.before.as_ref());
        let after = flatten(change.change.after.as_ref());
        let keys: std::collections::BTreeSet<_> = before.keys().chain(after.keys()).collect();
        for key in keys {
            if hide_rollout && key.1.starts_with("rollout.") {
                continue;
            }
            let line = match (before.get(key), after.get(key)) {
                (Some(b), Some(a)) if a == b => continue,
                (Some(b), Some(a)) => format!("~ {}: {} -> {}", key.1, show(b), show(a)),
                (None, Some(a)) => format!("+ {}: {}", key.1, show(a)),
                (Some(b), None) => format!("- {}: {}", key.1, show(b)),
                (None, None) => continue,
            };
            let _ = writeln!(out, "      {line}");
        }
    }
    if let Some(schedule) = &change.rollout {
        let _ = writeln!(out, "        rollout: {}", describe(schedule));
    }
}

/// The leaves of a resource's JSON by `(field rank, dotted path)`, so that they come out in
/// [`FIELD_ORDER`]. Nulls and empty maps or lists are left out: an absent health check reads
/// better than `null`, and an emptied `env` shows as its removed variables. The `name` is left
/// out too: the symbol line shows it.
fn flatten(value: Option<&Value>) -> BTreeMap<(usize, String), Value> {
    let mut out = BTreeMap::new();
    if let Some(Value::Object(fields)) = value {
        for (name, v) in fields.iter().filter(|(name, _)| *name != "name") {
            let rank = FIELD_ORDER
                .iter()
                .position(|f| f == name)
                .unwrap_or(FIELD_ORDER.len());
            leaves(rank, name.clone(), v, &mut out);
        }
    }
    out
}

fn leaves(rank: usize, path: String, value: &Value, out: &mut BTreeMap<(usize, String), Value>) {
    match value {
        Value::Null => {}
        Value::Object(fields) => {
            for (name, v) in fields {
                leaves(rank, format!("{path}.{name}"), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                leaves(rank, format!("{path}[{i}]"), v, out);
            }
        }
        other => {
            out.insert((rank, path), other.clone());
        }
    }
}

/// A value as shown: digests shortened like `docker images` does, everything else as JSON.
fn show(value: &Value) -> String {
    if let Value::String(s) = value
        && let Ok(digest) = s.parse::<Digest>()
    {
        return format!("sha256:{}", digest.short());
    }
    value.to_string()
}

fn describe(s: &Schedule) -> String {
    let duration = humantime::format_duration(s.expected_duration);
    let batches = match s.batches.as_slice() {
        [one] => format!("1 batch of {one}"),
        all => {
            let largest = all.iter().copied().max().unwrap_or(0);
            let even = all.iter().all(|b| *b == largest);
            let of = if even { "of" } else { "of up to" };
            format!("{} batches {of} {largest}", all.len())
        }
    };
    let surge = if s.surge > 0 {
        format!(" (surge {})", s.surge)
    } else {
        String::new()
    };
    // A first deploy has nothing to protect and rolls out like a rolling update whatever
    // the strategy.
    let strategy = match s.from_release {
        Some(_) => s.strategy,
        None => Strategy::Rolling,
    };
    let how = match strategy {
        Strategy::Rolling => format!("rolling in {batches}{surge}, about {duration}"),
        Strategy::BlueGreen => {
            let promote = match (s.waits_for_promotion, &s.analysis) {
                (true, Some(_)) => "`kiln rollout promote` and a passing analysis",
                (true, None) => "`kiln rollout promote`",
                (false, Some(_)) => "a passing analysis",
                (false, None) => "they are healthy",
            };
            format!(
                "blue/green: {} new instances at once{surge}, about {duration}, \
                 then all traffic switches at once after {promote}{}{}",
                s.instances,
                analysis(s),
                warm(s)
            )
        }
        Strategy::Canary => {
            let steps: Vec<String> = s
                .steps
                .iter()
                .map(|step| match step.pause {
                    Some(p) => format!("{}% for {}", step.weight, humantime::format_duration(p)),
                    None => format!("{}% until promoted", step.weight),
                })
                .collect();
            let canary = s.batches.first().copied().unwrap_or(s.instances);
            let plural = if canary == 1 { "" } else { "s" };
            format!(
                "canary with {canary} instance{plural}, {} at promotion{surge}, about {duration}: \
                 {}, then 100%{}{}",
                s.instances,
                steps.join(", "),
                analysis(s),
                warm(s)
            )
        }
    };
    format!("{how}; {}", s.rollback)
}

/// The analysis that gates the steps: `; analysis every 5s: error rate ≤ 1%, p99 ≤ 300ms, …`.
fn analysis(s: &Schedule) -> String {
    let Some(a) = &s.analysis else {
        return String::new();
    };
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let pct = |r: f64| {
        let p = format!("{:.3}", r * 100.0);
        format!("{}%", p.trim_end_matches('0').trim_end_matches('.'))
    };
    let mut rules = Vec::new();
    if let Some(r) = a.max_error_rate {
        rules.push(format!("error rate <= {}", pct(r)));
    }
    if let Some(l) = a.max_p50_latency {
        rules.push(format!("p50 <= {}", d(l)));
    }
    if let Some(l) = a.max_p99_latency {
        rules.push(format!("p99 <= {}", d(l)));
    }
    if let Some(r) = a.max_error_rate_increase {
        rules.push(format!("error rate <= stable + {}", pct(r)));
    }
    if let Some(r) = a.max_p99_increase {
        rules.push(format!("p99 <= stable + {}", pct(r)));
    }
    rules.push(format!("at least {} requests", a.min_requests));
    format!(
        "; analysis every {}: {} (failure_limit {}, inconclusive_limit {}: too few requests \
         pauses, never promotes)",
        d(a.interval),
        rules.join(", "),
        a.failure_limit,
        a.inconclusive_limit
    )
}

/// `; v1 stays warm 5m after promotion`.
fn warm(s: &Schedule) -> String {
    match (s.warm_for, s.from_release) {
        (Some(w), Some(from)) => format!(
            "; v{from} stays warm {} after promotion",
            humantime::format_duration(w)
        ),
        _ => String::new(),
    }
}
