//! Policy sets: named bundles of Rego modules with an enforcement level.

use std::fmt;
use std::path::Path;

use kiln_core::Digest;
use kiln_core::digest::digest_json;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, parse_error};

/// How a set's denials are enforced (Sentinel's levels). The level belongs to the set, as
/// deployed, not to the policy text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Denials are reported and never block.
    Advisory,
    /// Denials block unless an operator overrides them (an override is logged).
    SoftMandatory,
    /// Denials block; nothing overrides them but changing the plan or the policy.
    HardMandatory,
}

impl Level {
    /// The snake_case name (`soft_mandatory`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Advisory => "advisory",
            Self::SoftMandatory => "soft_mandatory",
            Self::HardMandatory => "hard_mandatory",
        }
    }

    /// Whether a denial at this level blocks an apply.
    pub fn enforced(self) -> bool {
        self != Self::Advisory
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Rego file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    /// Its path relative to the set's directory, with `/` separators (`net/ports.rego`);
    /// errors name it, and it is part of the bundle hash.
    pub path: String,
    /// The Rego source (v1 syntax).
    pub source: String,
}

/// A named bundle of policies evaluated together at one [`Level`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySet {
    /// The set's name, as results and decisions report it (`builtin`, `team-web`).
    pub name: String,
    /// How its denials are enforced.
    pub level: Level,
    /// Its modules, sorted by path.
    pub modules: Vec<Module>,
    /// A data document merged into `data` for this set only (`null` for none). The built-in
    /// pack passes its settings here as `data.kiln.settings`.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl PolicySet {
    /// A set of `modules` without data; the modules are sorted by path.
    pub fn new(name: impl Into<String>, level: Level, mut modules: Vec<Module>) -> Self {
        modules.sort_by(|a, b| a.path.cmp(&b.path));
        Self {
            name: name.into(),
            level,
            modules,
            data: serde_json::Value::Null,
        }
    }

    /// The identity of what this set evaluates: the sha256 of the canonical JSON
    /// `[[[path, source], …], data]`, pairs sorted by path. The order in which files were
    /// found does not change it; any byte of a path, a source or the data does. Recorded with
    /// every decision.
    pub fn bundle_hash(&self) -> Digest {
        let mut pairs: Vec<(&str, &str)> = self
            .modules
            .iter()
            .map(|m| (m.path.as_str(), m.source.as_str()))
            .collect();
        pairs.sort_unstable();
        digest_json(&(pairs, &self.data))
    }
}

/// Loads every `*.rego` file under `dir` (recursively, not following symlinks), except tests
/// (`*_test.rego`), as the set `name` at `level`. Files are sorted by path and each is parsed
/// at once, so a syntax error is reported here with its file, line and column.
///
/// A directory without any policy is an error: an empty set would pass every plan.
pub fn load_dir(dir: &Path, name: &str, level: Level) -> Result<PolicySet> {
    let modules = read_dir(dir, false)?;
    if modules.is_empty() {
        return Err(Error::Io {
            path: dir.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no policy (*.rego other than *_test.rego) in this directory",
            ),
        });
    }
    for m in &modules {
        check_parses(dir, m)?;
    }
    Ok(PolicySet::new(name, level, modules))
}

/// Every `*.rego` under `dir`, sorted by relative path; `*_test.rego` only with `tests`.
pub(crate) fn read_dir(dir: &Path, tests: bool) -> Result<Vec<Module>> {
    let mut modules = Vec::new();
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| Error::Io {
            path: e.path().unwrap_or(dir).to_owned(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("directory loop or unreadable entry")),
        })?;
        let file_name = entry.file_name().to_string_lossy();
        let is_rego = entry.file_type().is_file() && file_name.ends_with(".rego");
        if !is_rego || (!tests && file_name.ends_with("_test.rego")) {
            continue;
        }
        let source = std::fs::read_to_string(entry.path()).map_err(|source| Error::Io {
            path: entry.path().to_owned(),
            source,
        })?;
        let relative = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        let path = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        modules.push(Module { path, source });
    }
    modules.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(modules)
}

/// Parses `module` alone, naming the file on disk in the error.
pub(crate) fn check_parses(dir: &Path, module: &Module) -> Result<()> {
    let mut engine = regorus::Engine::new();
    engine
        .add_policy(module.path.clone(), module.source.clone())
        .map_err(|e| parse_error(&dir.join(&module.path).display().to_string(), &e))?;
    Ok(())
}
