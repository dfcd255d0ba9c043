//! The conventions of `evaluate`: rule names, result shapes, exceptions, levels, errors and
//! limits; bundle hashes; SARIF and text output.

#![allow(clippy::unwrap_used, reason = "test helpers panic on broken fixtures")]

use std::path::Path;
use std::time::Duration;

use kiln_policy::{
    Decision, Error, Evaluator, Kind, Level, Limits, Module, PolicySet, evaluate, load_dir,
};
use serde_json::{Value, json};

fn set(name: &str, level: Level, modules: &[(&str, &str)]) -> PolicySet {
    PolicySet::new(
        name,
        level,
        modules
            .iter()
            .map(|(path, source)| Module {
                path: (*path).into(),
                source: (*source).into(),
            })
            .collect(),
    )
}

fn eval(sets: &[PolicySet], input: &Value) -> Decision {
    evaluate(sets, input, &Limits::default()).unwrap()
}

/// `(rule, kind, message, excepted)` of every result.
fn rows(d: &Decision) -> Vec<(String, Kind, String, bool)> {
    d.results
        .iter()
        .map(|o| (o.rule.clone(), o.kind, o.message.clone(), o.excepted))
        .collect()
}

const CONVENTIONS: &str = r#"package team.web

deny contains "plain deny" if input.bad
violation contains "a violation" if input.bad
deny_ports contains msg if {
	some name, s in input.services
	s.port == 22
	msg := sprintf("service.%s: port 22", [name])
}
warn contains {"msg": "an object warning", "severity": "low"} if input.bad
warn_latency_budget contains "a named warning" if input.bad

# Not results: conftest's names only.
denied contains "no" if true
deny_ contains "no" if true
helper_deny contains "no" if true
"#;

#[test]
fn rule_names_and_result_shapes_follow_conftest() {
    let d = eval(
        &[set(
            "team",
            Level::HardMandatory,
            &[("web.rego", CONVENTIONS)],
        )],
        &json!({ "bad": true, "services": { "web": { "port": 22 } } }),
    );
    let k = |r: &str, kind, m: &str| (r.to_owned(), kind, m.to_owned(), false);
    assert_eq!(
        rows(&d),
        [
            k("deny", Kind::Deny, "plain deny"),
            k("deny_ports", Kind::Deny, "service.web: port 22"),
            k("violation", Kind::Deny, "a violation"),
            k("warn", Kind::Warn, "an object warning"),
            k("warn_latency_budget", Kind::Warn, "a named warning"),
        ]
    );
    assert!(
        d.results
            .iter()
            .all(|o| o.package == "team.web" && o.set == "team")
    );
    assert_eq!(d.blocking().len(), 3);

    let clean = eval(
        &[set(
            "team",
            Level::HardMandatory,
            &[("web.rego", CONVENTIONS)],
        )],
        &json!({ "bad": false, "services": {} }),
    );
    assert!(clean.results.is_empty());
    assert!(clean.passed());
}

#[test]
fn exceptions_suppress_rules_by_name_and_are_still_reported() {
    let policy = r#"package team.web

deny_ports contains "port 22" if true
warn_ports contains "port 8080 is unusual" if true
deny_labels contains "no version label" if true

exception contains ["ports"] if input.allow_ports
"#;
    let s = set("team", Level::HardMandatory, &[("web.rego", policy)]);
    let d = eval(std::slice::from_ref(&s), &json!({ "allow_ports": true }));
    assert_eq!(
        rows(&d),
        [
            (
                "deny_labels".to_owned(),
                Kind::Deny,
                "no version label".to_owned(),
                false
            ),
            (
                "deny_ports".to_owned(),
                Kind::Deny,
                "port 22".to_owned(),
                true
            ),
            (
                "warn_ports".to_owned(),
                Kind::Warn,
                "port 8080 is unusual".to_owned(),
                true
            ),
        ]
    );
    let blocking: Vec<&str> = d.blocking().iter().map(|o| o.rule.as_str()).collect();
    assert_eq!(blocking, ["deny_labels"]);

    // Without the exception, both deny.
    let d = eval(&[s], &json!({ "allow_ports": false }));
    assert_eq!(d.blocking().len(), 2);
    assert!(d.results.iter().all(|o| !o.excepted));
}

#[test]
fn an_exception_may_list_plain_names() {
    let policy = r#"package p
deny_a contains "a" if true
deny_b contains "b" if true
exception contains "a" if true
"#;
    let d = eval(
        &[set("s", Level::HardMandatory, &[("p.rego", policy)])],
        &json!({}),
    );
    let excepted: Vec<(&str, bool)> = d
        .results
        .iter()
        .map(|o| (o.rule.as_str(), o.excepted))
        .collect();
    assert_eq!(excepted, [("deny_a", true), ("deny_b", false)]);
}

#[test]
fn levels_decide_what_blocks_and_what_can_be_overridden() {
    let deny = |pkg: &str| format!("package {pkg}\ndeny contains \"no ({pkg})\" if true\n");
    let warn = "package w\nwarn contains \"careful\" if true\n";
    let (adv, soft, hard) = (deny("adv"), deny("soft"), deny("hard"));
    let advisory = set("advisory", Level::Advisory, &[("a.rego", &adv)]);
    let soft = set("soft", Level::SoftMandatory, &[("s.rego", &soft)]);
    let hard = set("hard", Level::HardMandatory, &[("h.rego", &hard)]);
    let warns = set("warns", Level::HardMandatory, &[("w.rego", warn)]);
    let input = json!({});

    // (sets, blocking sets, overridable)
    let table: Vec<(Vec<&PolicySet>, Vec<&str>, bool)> = vec![
        (vec![&advisory], vec![], false),
        (vec![&warns], vec![], false),
        (vec![&advisory, &warns], vec![], false),
        (vec![&soft], vec!["soft"], true),
        (vec![&advisory, &soft], vec!["soft"], true),
        (vec![&hard], vec!["hard"], false),
        (vec![&soft, &hard], vec!["soft", "hard"], false),
    ];
    for (sets, blocking, overridable) in table {
        let sets: Vec<PolicySet> = sets.into_iter().cloned().collect();
        let d = eval(&sets, &input);
        let names: Vec<&str> = sets.iter().map(|s| s.name.as_str()).collect();
        let got: Vec<&str> = d.blocking().iter().map(|o| o.set.as_str()).collect();
        assert_eq!(got, blocking, "{names:?}");
        assert_eq!(d.overridable(), overridable, "{names:?}");
        assert_eq!(d.passed(), blocking.is_empty(), "{names:?}");
        // Every set's bundle is recorded, in order.
        let bundles: Vec<&str> = d.bundles.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(bundles, names);
    }
}

#[test]
fn sets_are_evaluated_apart() {
    // Same package in two sets: rules do not merge, and each set sees only its own data.
    let a = "package shared\ndeny contains sprintf(\"a sees %v\", [data.limit]) if data.limit\n";
    let b = "package shared\nwarn contains \"b has no limit\" if not data.limit\n";
    let mut first = set("first", Level::HardMandatory, &[("x.rego", a)]);
    first.data = json!({ "limit": 3 });
    let second = set("second", Level::Advisory, &[("x.rego", b)]);
    let d = eval(&[first, second], &json!({}));
    let got: Vec<(&str, &str)> = d
        .results
        .iter()
        .map(|o| (o.set.as_str(), o.message.as_str()))
        .collect();
    assert_eq!(got, [("first", "a sees 3"), ("second", "b has no limit")]);
}

#[test]
fn packages_split_over_files_and_several_packages_per_set() {
    let lib = "package team.lib\nprivileged(port) if port < 1024\n";
    let web_a = "package team.web\ndeny contains msg if {\n\tsome name, s in input.services\n\tdata.team.lib.privileged(s.port)\n\tmsg := sprintf(\"%s: privileged port\", [name])\n}\n";
    let web_b = "package team.web\nwarn contains \"second file\" if true\n";
    let d = eval(
        &[set(
            "team",
            Level::HardMandatory,
            &[
                ("lib.rego", lib),
                ("web/a.rego", web_a),
                ("web/b.rego", web_b),
            ],
        )],
        &json!({ "services": { "api": { "port": 80 } } }),
    );
    let got: Vec<(&str, &str)> = d
        .results
        .iter()
        .map(|o| (o.rule.as_str(), o.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [("deny", "api: privileged port"), ("warn", "second file")]
    );
}

#[test]
fn a_rule_that_errors_fails_the_evaluation_and_names_the_file() {
    let policy = "package team.web\n\ndeny contains msg if {\n\tx := input.n / 0\n\tmsg := sprintf(\"%v\", [x])\n}\n";
    let err = evaluate(
        &[set("team", Level::Advisory, &[("web/div.rego", policy)])],
        &json!({ "n": 1 }),
        &Limits::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Eval { .. }), "{text}");
    assert!(text.contains("policy set team: package team.web"), "{text}");
    assert!(text.contains("web/div.rego:4:"), "{text}");
}

#[test]
fn a_result_of_the_wrong_shape_is_an_error_not_a_pass() {
    for (policy, needle) in [
        ("package p\ndeny := true\n", "deny: must be a set"),
        ("package p\ndeny contains 42 if true\n", "yields 42"),
        (
            "package p\ndeny contains {\"message\": \"x\"} if true\n",
            "an object without a string msg",
        ),
        (
            "package p\ndeny contains \"x\" if true\nexception := 1\n",
            "exception: must be a set of rule names",
        ),
    ] {
        let err = evaluate(
            &[set("s", Level::HardMandatory, &[("p.rego", policy)])],
            &json!({}),
            &Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn a_policy_that_runs_too_long_is_stopped() {
    let policy = r#"package slow

deny contains "never" if {
	some i in numbers.range(1, 5000)
	some j in numbers.range(1, 5000)
	i * j < 0
}
"#;
    let limits = Limits {
        timeout: Duration::from_millis(200),
    };
    #[allow(clippy::disallowed_methods, reason = "measuring the test itself")]
    let start = std::time::Instant::now();
    let err = evaluate(
        &[set("slow", Level::HardMandatory, &[("slow.rego", policy)])],
        &json!({}),
        &limits,
    )
    .unwrap_err();
    let took = start.elapsed();
    let Error::Timeout {
        set,
        package,
        limit,
        ..
    } = &err
    else {
        panic!("expected a timeout, got {err}");
    };
    assert_eq!((set.as_str(), package.as_str()), ("slow", "slow"));
    assert_eq!(*limit, Duration::from_millis(200));
    assert!(took < Duration::from_secs(3), "stopped after {took:?}");
    assert!(err.to_string().contains("limit 200ms"), "{err}");
}

#[test]
fn hermetic_http_send_does_not_exist() {
    let policy = "package net\ndeny contains \"x\" if {\n\tr := http.send({\"method\": \"get\", \"url\": \"http://127.0.0.1:1\"})\n\tr.status_code == 200\n}\n";
    let err = evaluate(
        &[set("net", Level::HardMandatory, &[("net.rego", policy)])],
        &json!({}),
        &Limits::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("http.send"), "{err}");
}

#[test]
fn an_evaluator_evaluates_many_inputs() {
    let mut e = Evaluator::new(&[set(
        "team",
        Level::HardMandatory,
        &[("web.rego", CONVENTIONS)],
    )])
    .unwrap();
    let bad = e
        .evaluate(&json!({ "bad": true, "services": {} }), &Limits::default())
        .unwrap();
    let good = e
        .evaluate(&json!({ "bad": false, "services": {} }), &Limits::default())
        .unwrap();
    assert_eq!(bad.results.len(), 4);
    assert!(good.results.is_empty());
    assert_eq!(bad.bundles, good.bundles);
}

// Loading and parse errors

#[test]
fn a_parse_error_names_file_line_and_column() {
    let bad = "package p\n\ndeny contains msg if {\n  msg := \n}\n";
    let err = Evaluator::new(&[set("s", Level::Advisory, &[("dir/bad.rego", bad)])]).unwrap_err();
    let Error::Parse {
        file,
        line,
        col,
        message,
        snippet,
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!((file.as_str(), *line, *col), ("dir/bad.rego", 4, 7));
    assert!(!message.is_empty());
    assert!(snippet.contains("msg := "), "{snippet}");
    assert!(err.to_string().starts_with("dir/bad.rego:4:7: "), "{err}");
}

fn write(dir: &Path, path: &str, text: &str) {
    let p = dir.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn load_dir_reads_policies_sorted_and_skips_tests() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "z.rego", "package z\n");
    write(dir.path(), "a/b.rego", "package a.b\n");
    write(dir.path(), "a/b_test.rego", "package a.b_test\n");
    write(dir.path(), "README.md", "not rego");
    let s = load_dir(dir.path(), "team", Level::SoftMandatory).unwrap();
    let paths: Vec<&str> = s.modules.iter().map(|m| m.path.as_str()).collect();
    assert_eq!(paths, ["a/b.rego", "z.rego"]);
    assert_eq!((s.name.as_str(), s.level), ("team", Level::SoftMandatory));
}

#[test]
fn load_dir_reports_a_parse_error_with_the_path_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ok.rego", "package ok\n");
    write(
        dir.path(),
        "sub/bad.rego",
        "package bad\n\nwarn contains x if {\n  x := [\n}\n",
    );
    let err = load_dir(dir.path(), "team", Level::Advisory).unwrap_err();
    let Error::Parse {
        file, line, col, ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*file, dir.path().join("sub/bad.rego").display().to_string());
    assert_eq!((*line, *col), (4, 5), "{err}");
}

#[test]
fn load_dir_refuses_a_directory_without_policies() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "only_test.rego", "package t\n");
    assert!(matches!(
        load_dir(dir.path(), "x", Level::Advisory),
        Err(Error::Io { .. })
    ));
}

// Bundle hashes

#[test]
fn the_bundle_hash_ignores_file_order_and_follows_content() {
    let a = ("a.rego", "package a\n");
    let b = ("b.rego", "package b\n");
    let one = set("x", Level::Advisory, &[a, b]);
    let mut two = set("y", Level::HardMandatory, &[b, a]);
    // Even modules left unsorted by hand hash the same.
    two.modules.reverse();
    assert_eq!(
        one.bundle_hash(),
        two.bundle_hash(),
        "order, name and level do not count"
    );

    let changed = set("x", Level::Advisory, &[a, ("b.rego", "package b \n")]);
    assert_ne!(one.bundle_hash(), changed.bundle_hash(), "a byte of source");
    let renamed = set("x", Level::Advisory, &[a, ("c.rego", "package b\n")]);
    assert_ne!(one.bundle_hash(), renamed.bundle_hash(), "a path");
    let mut with_data = one.clone();
    with_data.data = json!({ "limit": 1 });
    assert_ne!(one.bundle_hash(), with_data.bundle_hash(), "the data");
}

#[test]
fn the_bundle_hash_of_a_directory_is_stable() {
    let files = [
        ("b/x.rego", "package b\n"),
        ("a.rego", "package a\n"),
        ("c.rego", "package c\n"),
    ];
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    for (p, t) in files {
        write(first.path(), p, t);
    }
    for (p, t) in files.iter().rev() {
        write(second.path(), p, t);
    }
    let h1 = load_dir(first.path(), "t", Level::Advisory)
        .unwrap()
        .bundle_hash();
    let h2 = load_dir(second.path(), "t", Level::Advisory)
        .unwrap()
        .bundle_hash();
    assert_eq!(h1, h2);
    assert_eq!(
        h1,
        load_dir(first.path(), "t", Level::Advisory)
            .unwrap()
            .bundle_hash()
    );
}

#[test]
fn the_builtin_pack_hash_follows_its_settings() {
    use kiln_policy::{BuiltinSettings, builtin_pack};
    let default = builtin_pack(&BuiltinSettings::default()).bundle_hash();
    assert_eq!(
        default,
        builtin_pack(&BuiltinSettings::default()).bundle_hash()
    );
    let strict = BuiltinSettings {
        max_image_age_days: 30,
        ..BuiltinSettings::default()
    };
    assert_ne!(default, builtin_pack(&strict).bundle_hash());
    // The level is not content.
    let hard = BuiltinSettings {
        level: Level::HardMandatory,
        ..BuiltinSettings::default()
    };
    assert_eq!(default, builtin_pack(&hard).bundle_hash());
}

// Output

fn mixed_decision() -> Decision {
    let enforced = r#"package team.web
deny_ports contains "service.web: port 22" if true
deny_labels contains "service.web: no version label" if true
warn contains "service.web: one instance" if true
exception contains ["labels"] if true
"#;
    let advisory = "package team.style\ndeny contains \"service.web: name too short\" if true\nwarn contains \"service.web: no owner\" if true\n";
    eval(
        &[
            set("team", Level::HardMandatory, &[("web.rego", enforced)]),
            set("style", Level::Advisory, &[("style.rego", advisory)]),
        ],
        &json!({}),
    )
}

#[test]
fn sarif_has_one_run_a_rule_per_package_rule_and_mapped_levels() {
    let d = mixed_decision();
    let s = d.to_sarif();
    assert_eq!(s["version"], "2.1.0");
    assert_eq!(s["$schema"], kiln_policy::report::SARIF_SCHEMA);
    let runs = s["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run["tool"]["driver"]["name"], "kiln policy");
    let rules: Vec<&str> = run["tool"]["driver"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        rules,
        [
            "team.style/deny",
            "team.style/warn",
            "team.web/deny_labels",
            "team.web/deny_ports",
            "team.web/warn",
        ]
    );
    let results = run["results"].as_array().unwrap();
    assert_eq!(results.len(), d.results.len());
    let got: Vec<(&str, &str, bool)> = results
        .iter()
        .map(|r| {
            let index = usize::try_from(r["ruleIndex"].as_u64().unwrap()).unwrap();
            assert_eq!(r["ruleId"].as_str().unwrap(), rules[index]);
            (
                r["ruleId"].as_str().unwrap(),
                r["level"].as_str().unwrap(),
                r.get("suppressions").is_some(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("team.web/deny_labels", "error", true),
            ("team.web/deny_ports", "error", false),
            ("team.web/warn", "warning", false),
            ("team.style/deny", "warning", false),
            ("team.style/warn", "note", false),
        ]
    );
    assert_eq!(results[1]["message"]["text"], "service.web: port 22");
    assert_eq!(run["properties"]["bundles"][0]["set"], "team");
    assert_eq!(run["properties"]["passed"], false);
}

#[test]
fn render_lists_results_and_the_verdict() {
    let text = mixed_decision().render();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..5],
        [
            "EXCEPT  team (hard_mandatory) team.web.deny_labels: service.web: no version label (excepted)",
            "DENY    team (hard_mandatory) team.web.deny_ports: service.web: port 22",
            "WARN    team (hard_mandatory) team.web.warn: service.web: one instance",
            "ADVISE  style (advisory) team.style.deny: service.web: name too short (advisory: does not block)",
            "WARN    style (advisory) team.style.warn: service.web: no owner",
        ]
    );
    assert_eq!(
        lines[6],
        "Blocked by 1 hard-mandatory denial: no override. 2 warnings, 1 advisory, 1 excepted."
    );
    assert!(lines[7].starts_with("Policy sets: team sha256:"), "{text}");

    let passed = eval(&[], &json!({})).render();
    assert!(
        passed.starts_with("Passed: nothing blocks.\nPolicy sets: none ("),
        "{passed}"
    );
}

#[test]
fn a_decision_serialises_for_the_record() {
    let d = mixed_decision();
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(v["results"][0]["level"], "hard_mandatory");
    assert_eq!(v["results"][0]["kind"], "deny");
    assert_eq!(v["results"][0]["excepted"], true);
    assert!(v["bundles"][0][1].as_str().unwrap().starts_with("sha256:"));
    let back: Decision = serde_json::from_value(v).unwrap();
    assert_eq!(back.results, d.results);
}

#[test]
fn an_undefined_rule_gives_no_results_and_the_others_still_count() {
    // `warn` is a complete rule that is undefined here: the package's rules are then read one
    // by one.
    let policy = "package p\ndeny contains \"a\" if true\nwarn := {\"w\"} if input.nope\nexception := {\"x\"} if input.nope\n";
    let d = eval(
        &[set("s", Level::HardMandatory, &[("p.rego", policy)])],
        &json!({}),
    );
    assert_eq!(
        rows(&d),
        [("deny".to_owned(), Kind::Deny, "a".to_owned(), false)]
    );
}
