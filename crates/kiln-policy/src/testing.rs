//! Unit tests for policies, the way `opa test` runs them.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use kiln_core::clock::{Clock, SystemClock};
use regorus::utils::limits::ExecutionTimerConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, parse_error};
use crate::eval::{Limits, is_timeout, package_query, rule_heads};
use crate::set::read_dir;

/// How one test ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "error")]
pub enum TestOutcome {
    /// The rule is `true`.
    Pass,
    /// The rule is undefined or not `true`.
    Fail,
    /// Evaluating the rule failed (the message names file, line and column).
    Error(String),
}

/// One `test_*` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    /// The file that declares it, relative to the directory.
    pub file: String,
    /// Its package, dotted (`kiln.builtin`).
    pub package: String,
    /// The rule (`test_denies_port_22`).
    pub name: String,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: TestOutcome,
    /// How long it took.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

/// Every test of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TestReport {
    /// By file, then package, then name.
    pub results: Vec<TestResult>,
}

impl TestReport {
    /// Tests that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| *o == TestOutcome::Pass)
    }

    /// Tests that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| *o == TestOutcome::Fail)
    }

    /// Tests that could not be evaluated.
    pub fn errored(&self) -> usize {
        self.count(|o| matches!(o, TestOutcome::Error(_)))
    }

    /// Whether every test passed.
    pub fn success(&self) -> bool {
        self.passed() == self.results.len()
    }

    fn count(&self, f: impl Fn(&TestOutcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }

    /// The report as `opa test` prints it: failures and errors by file, then the counts.
    ///
    /// ```text
    /// policy/web_test.rego:
    /// data.team.web.test_denies_ssh: FAIL (1.2ms)
    /// --------------------------------------------------------------------------------
    /// PASS: 4/5
    /// FAIL: 1/5
    /// ```
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut file = None;
        for r in self
            .results
            .iter()
            .filter(|r| r.outcome != TestOutcome::Pass)
        {
            if file != Some(&r.file) {
                let _ = writeln!(out, "{}:", r.file);
                file = Some(&r.file);
            }
            let ms = r.duration.as_secs_f64() * 1000.0;
            match &r.outcome {
                TestOutcome::Pass => {}
                TestOutcome::Fail => {
                    let _ = writeln!(out, "data.{}.{}: FAIL ({ms:.1}ms)", r.package, r.name);
                }
                TestOutcome::Error(e) => {
                    let _ = writeln!(out, "data.{}.{}: ERROR ({ms:.1}ms)", r.package, r.name);
                    for line in e.lines() {
                        let _ = writeln!(out, "  {line}");
                    }
                }
            }
        }
        let total = self.results.len();
        if total == 0 {
            out.push_str("no tests found\n");
            return out;
        }
        if !out.is_empty() {
            out.push_str(&"-".repeat(80));
            out.push('\n');
        }
        for (label, n) in [
            ("PASS", self.passed()),
            ("FAIL", self.failed()),
            ("ERROR", self.errored()),
        ] {
            if n > 0 {
                let _ = writeln!(out, "{label}: {n}/{total}");
            }
        }
        out
    }
}

/// Runs the tests of `dir`: every `*.rego` under it (tests and policies alike) is loaded into
/// one engine, and every rule named `test_*` is evaluated on its own; it passes when it is
/// `true`. One test failing or erroring does not stop the others. Each test has the default
/// [`Limits`].
pub fn run_tests(dir: &Path) -> Result<TestReport> {
    let modules = read_dir(dir, true)?;
    let mut engine = regorus::Engine::new();
    for m in &modules {
        engine
            .add_policy(m.path.clone(), m.source.clone())
            .map_err(|e| parse_error(&dir.join(&m.path).display().to_string(), &e))?;
    }
    let packages = engine
        .get_policy_package_components()
        .map_err(|e| Error::Eval {
            set: dir.display().to_string(),
            package: "*".to_owned(),
            message: e.to_string(),
        })?;

    // Test rules, each once (a rule may be split across files of one package).
    let mut seen = BTreeSet::new();
    let mut tests = Vec::new();
    for (m, package) in modules.iter().zip(&packages) {
        for name in rule_heads(&m.source)
            .into_iter()
            .filter(|n| n.starts_with("test_"))
        {
            let declared = engine
                .has_declared_rule_rooted_at(&m.path, &name)
                .unwrap_or(false);
            let dotted = package.components.join(".");
            if declared && seen.insert((dotted.clone(), name.clone())) {
                let query = format!("{}.{name}", package_query(&package.components));
                tests.push((m.path.clone(), dotted, name, query));
            }
        }
    }

    let clock = SystemClock;
    let limit = Limits::default().timeout;
    let mut results = Vec::new();
    for (file, package, name, query) in tests {
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit,
            check_interval: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
        });
        let start = clock.now();
        let outcome = match engine.eval_query(query, false) {
            Ok(r) => {
                let value = r
                    .result
                    .first()
                    .and_then(|r| r.expressions.first())
                    .map(|e| &e.value);
                if value == Some(&regorus::Value::Bool(true)) {
                    TestOutcome::Pass
                } else {
                    TestOutcome::Fail
                }
            }
            Err(e) if is_timeout(&e) => {
                TestOutcome::Error(format!("stopped after {}ms", limit.as_millis()))
            }
            Err(e) => TestOutcome::Error(e.to_string().trim().to_owned()),
        };
        results.push(TestResult {
            file,
            package,
            name,
            outcome,
            duration: clock.now().duration_since(start).unwrap_or_default(),
        });
    }
    results.sort_by(|a, b| (&a.file, &a.package, &a.name).cmp(&(&b.file, &b.package, &b.name)));
    Ok(TestReport { results })
}
