//! Evaluating policy sets against an input document, the conftest way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use kiln_core::Digest;
use kiln_core::clock::{Clock, SystemClock};
use regorus::utils::limits::ExecutionTimerConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result, parse_error};
use crate::set::{Level, PolicySet};

/// Bounds on one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock budget for evaluating every set of one [`evaluate`] call (compiling
    /// included). regorus checks it cooperatively in its evaluation loops, so a runaway
    /// iteration is stopped within moments of the limit; one long builtin call (a huge
    /// `numbers.range`) is not interrupted until it returns.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Limits {
    /// Five seconds: about a thousand times what kiln's built-in pack needs for a large plan.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
        }
    }
}

/// Work units between two looks at the clock: small enough that the limit is kept within
/// microseconds of work, large enough that the clock costs nothing measurable.
const CHECK_INTERVAL: NonZeroU32 = NonZeroU32::new(64).expect("64 is not zero");

/// Whether a result denies or warns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// From `deny`, `violation`, `deny_*`, `violation_*`.
    Deny,
    /// From `warn`, `warn_*`.
    Warn,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Deny => "deny",
            Self::Warn => "warn",
        })
    }
}

/// One message of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The policy set.
    pub set: String,
    /// The set's level.
    pub level: Level,
    /// The package, dotted, without `data.` (`kiln.builtin`).
    pub package: String,
    /// The rule (`deny_health_required`).
    pub rule: String,
    /// Deny or warn.
    pub kind: Kind,
    /// The message (a string result, or the `msg` of an object result).
    pub message: String,
    /// Suppressed by an `exception` of the package: reported, never blocking.
    pub excepted: bool,
}

impl Outcome {
    /// Whether this result blocks an apply: a denial, not excepted, from an enforced set.
    pub fn blocks(&self) -> bool {
        self.kind == Kind::Deny && !self.excepted && self.level.enforced()
    }
}

/// The result of evaluating policy sets against one input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Every result, by set (in the order given), package, rule and message.
    pub results: Vec<Outcome>,
    /// Each set's name and [`PolicySet::bundle_hash`], in the order given: exactly which
    /// policies made this decision.
    pub bundles: Vec<(String, Digest)>,
    /// How long the evaluation took.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

impl Decision {
    /// The results that block an apply: denials that are not excepted, from soft- or
    /// hard-mandatory sets. Advisory denials never block.
    pub fn blocking(&self) -> Vec<&Outcome> {
        self.results.iter().filter(|o| o.blocks()).collect()
    }

    /// Whether the plan is blocked only by soft-mandatory sets, so that an operator's
    /// (logged) override may let it through. `false` when nothing blocks (no override is
    /// needed) or when any hard-mandatory denial blocks.
    pub fn overridable(&self) -> bool {
        let blocking = self.blocking();
        !blocking.is_empty() && blocking.iter().all(|o| o.level == Level::SoftMandatory)
    }

    /// Whether nothing blocks.
    pub fn passed(&self) -> bool {
        self.blocking().is_empty()
    }

    /// The decision as text for people; see [`crate::report`].
    pub fn render(&self) -> String {
        crate::report::render(self)
    }

    /// The decision as a SARIF 2.1.0 log; see [`crate::report`].
    pub fn to_sarif(&self) -> Value {
        crate::report::sarif(self)
    }
}

/// Evaluates `sets` against `input` within `limits`: parses and compiles every set, then
/// [`Evaluator::evaluate`]. To evaluate the same sets again, keep an [`Evaluator`].
pub fn evaluate(sets: &[PolicySet], input: &Value, limits: &Limits) -> Result<Decision> {
    let start = SystemClock.now();
    let mut evaluator = Evaluator::new(sets)?;
    evaluator.evaluate_since(input, limits, start)
}

/// Policy sets parsed into engines, ready to evaluate any number of inputs. Each set has its
/// own engine, so packages of different sets never merge and data of one set is invisible to
/// the others.
pub struct Evaluator {
    sets: Vec<Prepared>,
}

struct Prepared {
    name: String,
    level: Level,
    hash: Digest,
    engine: regorus::Engine,
    /// Each package (dotted name, sorted) with its query and the result rules it declares.
    packages: BTreeMap<String, Package>,
}

#[derive(Debug, Default)]
struct Package {
    /// `data["a"]["b"]`.
    query: String,
    /// Whether it declares `exception`.
    exception: bool,
    /// Its `deny`/`violation`/`warn` rules, sorted.
    rules: BTreeSet<String>,
}

impl fmt::Debug for Evaluator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.sets.iter().map(|s| (&s.name, s.level, &s.hash)))
            .finish()
    }
}

impl Evaluator {
    /// Parses every module of every set (a syntax error names the module's path, line and
    /// column) and loads each set's data.
    pub fn new(sets: &[PolicySet]) -> Result<Self> {
        let sets = sets
            .iter()
            .map(|set| {
                let mut engine = regorus::Engine::new();
                for m in &set.modules {
                    engine
                        .add_policy(m.path.clone(), m.source.clone())
                        .map_err(|e| parse_error(&m.path, &e))?;
                }
                if !set.data.is_null() {
                    let data =
                        regorus::Value::deserialize(&set.data).map_err(|e| Error::Document {
                            set: set.name.clone(),
                            message: format!("data: {e}"),
                        })?;
                    engine.add_data(data).map_err(|e| Error::Document {
                        set: set.name.clone(),
                        message: format!("data: {e}"),
                    })?;
                }
                let packages = result_rules(&engine, set).map_err(|e| Error::Eval {
                    set: set.name.clone(),
                    package: "*".to_owned(),
                    message: e.to_string(),
                })?;
                Ok(Prepared {
                    name: set.name.clone(),
                    level: set.level,
                    hash: set.bundle_hash(),
                    engine,
                    packages,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { sets })
    }

    /// Evaluates every set against `input` within `limits`.
    ///
    /// In each package of each set, the rules `deny`, `violation`, `warn`, `deny_*`,
    /// `violation_*` and `warn_*` (conftest's names) are read; each must be a set (or array)
    /// of strings or of objects with a string `msg`. A package's `exception` rule (a set of
    /// arrays of names, `exception contains ["foo"] if …`, or of names) suppresses the rules
    /// whose name without its `deny_`/`violation_`/`warn_` prefix is listed; their results are
    /// still reported, with `excepted` set.
    ///
    /// Any error (a rule that fails, the limit) fails the whole evaluation: a policy that could
    /// not be evaluated never passes a plan.
    pub fn evaluate(&mut self, input: &Value, limits: &Limits) -> Result<Decision> {
        self.evaluate_since(input, limits, SystemClock.now())
    }

    fn evaluate_since(
        &mut self,
        input: &Value,
        limits: &Limits,
        start: SystemTime,
    ) -> Result<Decision> {
        let clock = SystemClock;
        let elapsed = || clock.now().duration_since(start).unwrap_or_default();
        let input = regorus::Value::deserialize(input).map_err(|e| Error::Document {
            set: "*".to_owned(),
            message: format!("input: {e}"),
        })?;
        let mut results = Vec::new();
        for set in &mut self.sets {
            set.engine.set_input(input.clone());
            for (package, p) in &set.packages {
                // Evaluates `query` and returns the values of its expressions, or `None` when
                // it is undefined.
                let mut run = |query: String| -> Result<Option<Vec<regorus::Value>>> {
                    let timeout = || Error::Timeout {
                        set: set.name.clone(),
                        package: package.clone(),
                        elapsed: elapsed(),
                        limit: limits.timeout,
                    };
                    let remaining = limits.timeout.saturating_sub(elapsed());
                    if remaining.is_zero() {
                        return Err(timeout());
                    }
                    set.engine.set_execution_timer_config(ExecutionTimerConfig {
                        limit: remaining,
                        check_interval: CHECK_INTERVAL,
                    });
                    match set.engine.eval_query(query, false) {
                        Ok(r) => Ok(r
                            .result
                            .into_iter()
                            .next()
                            .map(|r| r.expressions.into_iter().map(|e| e.value).collect())),
                        Err(e) if is_timeout(&e) => Err(timeout()),
                        Err(e) => Err(Error::Eval {
                            set: set.name.clone(),
                            package: package.clone(),
                            message: e.to_string().trim().to_owned(),
                        }),
                    }
                };
                let names: Vec<&str> = p
                    .exception
                    .then_some("exception")
                    .into_iter()
                    .chain(p.rules.iter().map(String::as_str))
                    .collect();
                if names.is_empty() {
                    continue;
                }
                // Fast path: every rule of the package in one query, so that the helpers they
                // share are computed once. Such a query is undefined as a whole when one of its
                // rules is undefined (or `false`); then each rule is evaluated on its own.
                let query = names
                    .iter()
                    .map(|n| format!("{}.{n}", p.query))
                    .collect::<Vec<_>>()
                    .join("; ");
                let values: Vec<(&str, regorus::Value)> = match run(query)? {
                    Some(values) if values.len() == names.len() => {
                        names.iter().copied().zip(values).collect()
                    }
                    _ => {
                        let mut values = Vec::new();
                        for name in &names {
                            if let Some(v) = run(format!("{}.{name}", p.query))?
                                .and_then(|v| v.into_iter().next())
                            {
                                values.push((*name, v));
                            }
                        }
                        values
                    }
                };
                let (exception, rules): (Vec<_>, Vec<_>) =
                    values.into_iter().partition(|(n, _)| *n == "exception");
                let exception = exception.into_iter().next().map(|(_, v)| v);
                collect(set, package, exception.as_ref(), &rules, &mut results)?;
            }
        }
        Ok(Decision {
            results,
            bundles: self
                .sets
                .iter()
                .map(|s| (s.name.clone(), s.hash.clone()))
                .collect(),
            duration: elapsed(),
        })
    }
}

/// The result rules of each package of `set`'s modules. Rule names are found by
/// [`rule_heads`] and each is confirmed by the engine as a rule its module declares.
fn result_rules(
    engine: &regorus::Engine,
    set: &PolicySet,
) -> anyhow::Result<BTreeMap<String, Package>> {
    let mut out: BTreeMap<String, Package> = BTreeMap::new();
    // One row per module, in the order they were added.
    let packages = engine.get_policy_package_components()?;
    for (m, package) in set.modules.iter().zip(packages) {
        let p = out
            .entry(package.components.join("."))
            .or_insert_with(|| Package {
                query: package_query(&package.components),
                ..Package::default()
            });
        for name in rule_heads(&m.source) {
            let wanted = name == "exception" || rule_kind(&name).is_some();
            if wanted && engine.has_declared_rule_rooted_at(&m.path, &name)? {
                if name == "exception" {
                    p.exception = true;
                } else {
                    p.rules.insert(name);
                }
            }
        }
    }
    Ok(out)
}

/// The names that start a line (after indentation and an optional `default`), other than
/// functions' (`f(x) …`): where Rego rule heads are. Callers confirm each with the engine
/// (`has_declared_rule_rooted_at`), so a name in a comment or inside a body is never taken
/// for a rule.
///
/// regorus 0.14 has no public API to list a module's rules, and evaluating a whole package
/// (`data.pkg`) is not reliable in it: with several modules in a package, a rule that refers
/// to one defined after it can come out empty. So rules are found here and evaluated one by
/// one.
pub(crate) fn rule_heads(source: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in source.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix("default ").map_or(line, str::trim_start);
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let first_is_letter = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
        let function = line[name.len()..].trim_start().starts_with('(');
        if first_is_letter && !function && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// `data["a"]["b"]` for the package `a.b`.
pub(crate) fn package_query(components: &[String]) -> String {
    let mut q = "data".to_owned();
    for c in components {
        q.push('[');
        q.push_str(&Value::String(c.clone()).to_string());
        q.push(']');
    }
    q
}

pub(crate) fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<regorus::LimitError>(),
            Some(regorus::LimitError::TimeLimitExceeded { .. })
        )
    }) || e.to_string().contains("exceeded time limit")
}

/// conftest's classification of a rule name: `^(deny|violation)(_[a-zA-Z0-9]+)*$` and
/// `^warn(_[a-zA-Z0-9]+)*$`.
pub(crate) fn rule_kind(rule: &str) -> Option<Kind> {
    let (kind, rest) = if let Some(rest) = rule.strip_prefix("deny") {
        (Kind::Deny, rest)
    } else if let Some(rest) = rule.strip_prefix("violation") {
        (Kind::Deny, rest)
    } else if let Some(rest) = rule.strip_prefix("warn") {
        (Kind::Warn, rest)
    } else {
        return None;
    };
    let well_formed = rest.is_empty()
        || rest.strip_prefix('_').is_some_and(|r| {
            r.split('_')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
        });
    well_formed.then_some(kind)
}

/// The name an `exception` lists for `rule`: conftest strips one severity prefix.
pub(crate) fn exception_name(rule: &str) -> &str {
    ["violation_", "deny_", "warn_"]
        .iter()
        .find_map(|p| rule.strip_prefix(p))
        .unwrap_or(rule)
}

/// Reads the results of one package's rules (`values`, by name) into `out`, with the
/// package's `exception` value.
fn collect(
    set: &Prepared,
    package: &str,
    exception: Option<&regorus::Value>,
    values: &[(&str, regorus::Value)],
    out: &mut Vec<Outcome>,
) -> Result<()> {
    let shape = |rule: &str, message: String| Error::Shape {
        set: set.name.clone(),
        package: package.to_owned(),
        rule: rule.to_owned(),
        message,
    };
    let to_json = |rule: &str, v: &regorus::Value| {
        serde_json::to_value(v).map_err(|e| shape(rule, e.to_string()))
    };

    let mut exceptions = BTreeSet::new();
    if let Some(v) = exception {
        let v = to_json("exception", v)?;
        for item in items(&v).ok_or_else(|| shape("exception", expected_names(&v)))? {
            match item {
                Value::String(s) => {
                    exceptions.insert(s.clone());
                }
                Value::Array(names) if names.iter().all(Value::is_string) => {
                    exceptions.extend(names.iter().filter_map(|n| n.as_str().map(str::to_owned)));
                }
                other => {
                    return Err(shape(
                        "exception",
                        format!(
                            "yields {other}, which is neither a rule name nor an array of rule names"
                        ),
                    ));
                }
            }
        }
    }

    for (rule, v) in values {
        let Some(kind) = rule_kind(rule) else {
            continue;
        };
        let v = to_json(rule, v)?;
        let excepted = exceptions.contains(exception_name(rule));
        let items = items(&v).ok_or_else(|| shape(rule, expected("a set", &v)))?;
        let mut messages = BTreeSet::new();
        for item in items {
            let message = match item {
                Value::String(s) => s.clone(),
                Value::Object(o) => match o.get("msg") {
                    Some(Value::String(s)) => s.clone(),
                    _ => {
                        return Err(shape(
                            rule,
                            format!("yields {item}, an object without a string msg"),
                        ));
                    }
                },
                other => {
                    return Err(shape(
                        rule,
                        format!(
                            "yields {other}, which is neither a string nor an object with a msg"
                        ),
                    ));
                }
            };
            messages.insert(message);
        }
        out.extend(messages.into_iter().map(|message| Outcome {
            set: set.name.clone(),
            level: set.level,
            package: package.to_owned(),
            rule: (*rule).to_owned(),
            kind,
            message,
            excepted,
        }));
    }
    Ok(())
}

/// The members of a set (serialised as an array) or an array.
fn items(v: &Value) -> Option<&Vec<Value>> {
    v.as_array()
}

fn expected(what: &str, got: &Value) -> String {
    format!("must be {what} of strings or of objects with a msg, but is {got}")
}

fn expected_names(got: &Value) -> String {
    format!("must be a set of rule names or of arrays of rule names, but is {got}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_names_are_classified_like_conftest() {
        for (rule, kind) in [
            ("deny", Some(Kind::Deny)),
            ("violation", Some(Kind::Deny)),
            ("warn", Some(Kind::Warn)),
            ("deny_ports", Some(Kind::Deny)),
            ("deny_no_ssh", Some(Kind::Deny)),
            ("violation_x1", Some(Kind::Deny)),
            ("warn_a_b_c", Some(Kind::Warn)),
            ("deny_", None),
            ("deny__x", None),
            ("denyx", None),
            ("warning", None),
            ("my_deny", None),
            ("deny_x-y", None),
            ("exception", None),
        ] {
            assert_eq!(rule_kind(rule), kind, "{rule}");
        }
    }

    #[test]
    fn exceptions_name_rules_without_their_prefix() {
        assert_eq!(exception_name("deny_ports"), "ports");
        assert_eq!(exception_name("violation_ports"), "ports");
        assert_eq!(exception_name("warn_ports"), "ports");
        assert_eq!(exception_name("deny"), "deny");
    }

    #[test]
    fn rule_heads_are_names_that_start_a_line() {
        let src = "package p\n\nimport rego.v1\n\n# deny_in_comment is not a head\ndeny contains x if {\n\tdeny_inner == 1\n}\ndefault warn_x := false\n  violation[msg] {\n}\ntest_f(x) := x\n\"deny_str\"\n";
        assert_eq!(
            rule_heads(src),
            [
                "package",
                "import",
                "deny",
                "deny_inner",
                "warn_x",
                "violation"
            ]
        );
    }

    #[test]
    fn package_queries_quote_every_component() {
        assert_eq!(
            package_query(&["kiln".into(), "a\"b".into()]),
            r#"data["kiln"]["a\"b"]"#
        );
    }
}
