//! `run_tests`: Rego unit tests, the way `opa test` runs them.

#![allow(clippy::unwrap_used, reason = "test helpers panic on broken fixtures")]

use std::path::Path;

use kiln_policy::{TestOutcome, run_tests};

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

const POLICY: &str = r#"package team.web

deny contains msg if {
	some name, s in input.services
	s.port == 22
	msg := sprintf("service.%s: port 22", [name])
}
"#;

#[test]
fn passing_tests_pass() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.rego", POLICY);
    write(
        dir.path(),
        "web_test.rego",
        r#"package team.web_test

import data.team.web

test_port_22_is_denied if {
	web.deny == {"service.api: port 22"} with input as {"services": {"api": {"port": 22}}}
}

test_port_8080_is_fine if {
	count(web.deny) == 0 with input as {"services": {"api": {"port": 8080}}}
}

# test_not_a_test: a comment is not a test
helper(test_x) := test_x
"#,
    );
    let report = run_tests(dir.path()).unwrap();
    let names: Vec<&str> = report.results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["test_port_22_is_denied", "test_port_8080_is_fine"]);
    assert!(report.success(), "{}", report.render());
    assert_eq!(report.passed(), 2);
    assert_eq!(report.results[0].file, "web_test.rego");
    assert_eq!(report.results[0].package, "team.web_test");
    assert_eq!(report.render(), "PASS: 2/2\n");
}

#[test]
fn failing_and_erroring_tests_are_reported_each() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.rego", POLICY);
    write(
        dir.path(),
        "web_test.rego",
        r#"package team.web_test

import data.team.web

test_passes if {
	count(web.deny) == 0 with input as {"services": {}}
}

test_fails if {
	count(web.deny) == 0 with input as {"services": {"api": {"port": 22}}}
}

test_undefined_fails if {
	input.nothing == 1
}

test_errors if {
	x := 1 / 0
	x > 0
}
"#,
    );
    let report = run_tests(dir.path()).unwrap();
    let by_name = |n: &str| &report.results.iter().find(|r| r.name == n).unwrap().outcome;
    assert_eq!(*by_name("test_passes"), TestOutcome::Pass);
    assert_eq!(*by_name("test_fails"), TestOutcome::Fail);
    assert_eq!(*by_name("test_undefined_fails"), TestOutcome::Fail);
    let TestOutcome::Error(e) = by_name("test_errors") else {
        panic!("expected an error");
    };
    assert!(e.contains("web_test.rego:18"), "{e}");
    assert!(!report.success());
    assert_eq!(
        (report.passed(), report.failed(), report.errored()),
        (1, 2, 1)
    );
    let text = report.render();
    assert!(text.starts_with("web_test.rego:\n"), "{text}");
    assert!(
        text.contains("data.team.web_test.test_fails: FAIL ("),
        "{text}"
    );
    assert!(
        text.contains("data.team.web_test.test_errors: ERROR ("),
        "{text}"
    );
    assert!(
        text.ends_with("PASS: 1/4\nFAIL: 2/4\nERROR: 1/4\n"),
        "{text}"
    );
}

#[test]
fn a_test_file_that_does_not_parse_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.rego", POLICY);
    write(
        dir.path(),
        "web_test.rego",
        "package team.web_test\n\ntest_x if {\n  x := \n}\n",
    );
    let err = run_tests(dir.path()).unwrap_err();
    let kiln_policy::Error::Parse {
        file, line, col, ..
    } = &err
    else {
        panic!("{err}");
    };
    assert!(file.ends_with("web_test.rego"), "{file}");
    assert_eq!((*line, *col), (4, 5), "{err}");
}

#[test]
fn the_builtin_packs_own_tests_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy/builtin");
    let report = run_tests(&dir).unwrap();
    assert_eq!(report.results.len(), 5, "{report:?}");
    assert!(report.success(), "{}", report.render());
}
