//! kiln's built-in checks: one Rego package (`kiln.builtin`) embedded in the binary.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::set::{Level, Module, PolicySet};

/// The name of the built-in set in decisions.
pub const BUILTIN_SET: &str = "builtin";

/// The built-in checks: `(id, what it requires)`. Each check's rules are `deny_<id>` (and
/// `warn_<id>` for `capacity`) in the package `kiln.builtin`; its id disables it
/// ([`BuiltinSettings::disabled`]) or names it in an `exception`.
pub const BUILTIN_CHECKS: &[(&str, &str)] = &[
    (
        "image_from_store",
        "every image a service starts from is in kiln's store with a verified digest",
    ),
    (
        "image_labels",
        "a released image has a version label and a git commit; not built from a dirty tree in a protected environment",
    ),
    (
        "no_ssh",
        "nothing listens on or exposes port 22, and no image runs sshd or dropbear",
    ),
    (
        "health_required",
        "every service the plan changes has a health check",
    ),
    (
        "capacity",
        "a canary step sends no more of the requests than its share of the instances (warns when a rolling update replaces every instance at once)",
    ),
    (
        "protected_progressive",
        "in a protected environment, new releases roll out as canary or blue_green with analysis",
    ),
    (
        "max_image_age",
        "a new release ships no image older than max_image_age_days",
    ),
    (
        "revoked",
        "no instance starts from a revoked image or one built on a revoked image",
    ),
];

/// The Rego of the pack, by path; `lib.rego` holds the shared helpers.
const SOURCES: &[(&str, &str)] = &[
    (
        "builtin/capacity.rego",
        include_str!("../policy/builtin/capacity.rego"),
    ),
    (
        "builtin/health_required.rego",
        include_str!("../policy/builtin/health_required.rego"),
    ),
    (
        "builtin/image_from_store.rego",
        include_str!("../policy/builtin/image_from_store.rego"),
    ),
    (
        "builtin/image_labels.rego",
        include_str!("../policy/builtin/image_labels.rego"),
    ),
    (
        "builtin/lib.rego",
        include_str!("../policy/builtin/lib.rego"),
    ),
    (
        "builtin/max_image_age.rego",
        include_str!("../policy/builtin/max_image_age.rego"),
    ),
    (
        "builtin/no_ssh.rego",
        include_str!("../policy/builtin/no_ssh.rego"),
    ),
    (
        "builtin/protected_progressive.rego",
        include_str!("../policy/builtin/protected_progressive.rego"),
    ),
    (
        "builtin/revoked.rego",
        include_str!("../policy/builtin/revoked.rego"),
    ),
];

/// How the built-in pack runs. Handed to the policies as `data.kiln.settings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BuiltinSettings {
    /// Check ids ([`BUILTIN_CHECKS`]) that do not run.
    pub disabled: BTreeSet<String>,
    /// `max_image_age`: the oldest image, in days, a new release may ship (default 90).
    pub max_image_age_days: u32,
    /// The set's level (default [`Level::SoftMandatory`]: the checks block, and an operator
    /// can override them with a logged override, e.g. to ship a hotfix on an old image).
    pub level: Level,
}

impl Default for BuiltinSettings {
    fn default() -> Self {
        Self {
            disabled: BTreeSet::new(),
            max_image_age_days: 90,
            level: Level::SoftMandatory,
        }
    }
}

impl BuiltinSettings {
    /// Ids in [`Self::disabled`] that name no built-in check (probably a typo: say so).
    pub fn unknown_checks(&self) -> Vec<&str> {
        self.disabled
            .iter()
            .map(String::as_str)
            .filter(|d| !BUILTIN_CHECKS.iter().any(|(id, _)| id == d))
            .collect()
    }
}

/// The built-in checks as the policy set [`BUILTIN_SET`], with `settings` as its data.
pub fn builtin_pack(settings: &BuiltinSettings) -> PolicySet {
    let modules = SOURCES
        .iter()
        .map(|(path, source)| Module {
            path: (*path).to_owned(),
            source: (*source).to_owned(),
        })
        .collect();
    let mut set = PolicySet::new(BUILTIN_SET, settings.level, modules);
    set.data = json!({
        "kiln": {
            "settings": {
                "disabled": settings.disabled,
                "max_image_age_days": settings.max_image_age_days,
            }
        }
    });
    set
}
