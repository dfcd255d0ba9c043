use std::time::Duration;

use super::*;

const MS: u64 = 1_000;

fn red(requests: u64, errors: u64, p50_ms: Option<u64>, p99_ms: Option<u64>) -> Red {
    Red {
        requests,
        errors,
        p50_us: p50_ms.map(|v| v * MS),
        p99_us: p99_ms.map(|v| v * MS),
    }
}

fn window(canary: Red, stable: Option<Red>) -> Samples {
    Samples {
        from_ms: 10_000,
        to_ms: 15_000,
        canary,
        stable,
    }
}

/// Every absolute rule set: 1 % errors, p50 100 ms, p99 300 ms, 50 requests.
fn absolute() -> AnalysisRules {
    AnalysisRules {
        max_error_rate: Some(0.01),
        max_p50_us: Some(100 * MS),
        max_p99_us: Some(300 * MS),
        min_requests: 50,
        ..AnalysisRules::default()
    }
}

/// Only the rules relative to stable: half a point more errors, 20 % slower p99.
fn relative() -> AnalysisRules {
    AnalysisRules {
        max_error_rate_increase: Some(0.005),
        max_p99_increase: Some(0.2),
        min_requests: 50,
        ..AnalysisRules::default()
    }
}

/// The verdict in a short form for the table: `pass`, `fail: …`, `inconclusive: …`.
fn verdict(samples: &Samples, rules: &AnalysisRules) -> String {
    judge(samples, rules).to_string()
}

#[test]
fn judge_table() {
    let ok = red(1_000, 0, Some(50), Some(200));
    #[rustfmt::skip]
    let cases: Vec<(&str, Samples, AnalysisRules, &str)> = vec![
        // Traffic: none, too little, just enough.
        ("no data at all", window(Red::default(), None), absolute(),
            "inconclusive: no requests to the release in the window"),
        ("clean but too few", window(red(49, 0, Some(1), Some(1)), None), absolute(),
            "inconclusive: 49 requests to the release, fewer than min_requests 50"),
        ("exactly min_requests", window(red(50, 0, Some(1), Some(1)), None), absolute(), "pass"),
        ("min_requests 0 still needs one request", window(Red::default(), None),
            AnalysisRules::default(), "inconclusive: no requests to the release in the window"),
        ("thresholds absent: enough traffic passes", window(red(1, 1, None, None), None),
            AnalysisRules { min_requests: 1, ..AnalysisRules::default() }, "pass"),
        ("more errors than requests", window(red(100, 101, Some(1), Some(1)), None), absolute(),
            "inconclusive: 101 errors in 100 requests to the release: inconsistent counts"),
        // Error rate: at the bound passes, just above fails.
        ("error rate at the bound", window(red(100, 1, Some(50), Some(200)), None), absolute(), "pass"),
        ("error rate at the bound, other counts", window(red(700, 7, Some(50), Some(200)), None),
            absolute(), "pass"),
        ("error rate above", window(red(100, 2, Some(50), Some(200)), None), absolute(),
            "fail: error rate 2% above 1%"),
        ("every request failed", window(red(100, 100, Some(50), Some(200)), None), absolute(),
            "fail: error rate 100% above 1%"),
        // Latency: at the bound passes, a microsecond above fails, absent is inconclusive.
        ("p50 at the bound", window(red(100, 0, Some(100), Some(200)), None), absolute(), "pass"),
        ("p50 above", window(Red { p50_us: Some(100 * MS + 1), ..red(100, 0, None, Some(200)) }, None),
            absolute(), "fail: p50 latency 100ms 1us above 100ms"),
        ("p99 at the bound", window(red(100, 0, Some(50), Some(300)), None), absolute(), "pass"),
        ("p99 above", window(red(100, 0, Some(50), Some(301)), None), absolute(),
            "fail: p99 latency 301ms above 300ms"),
        ("no latency measured", window(red(100, 0, None, None), None), absolute(),
            "inconclusive: no p50 latency measured; no p99 latency measured"),
        ("latency rules off: no histogram needed", window(red(100, 0, None, None), None),
            AnalysisRules { max_error_rate: Some(0.01), min_requests: 50, ..AnalysisRules::default() },
            "pass"),
        // A broken rule fails the window even when another rule lacks data.
        ("fail wins over missing data", window(red(100, 5, None, Some(900)), None), absolute(),
            "fail: error rate 5% above 1%; p99 latency 900ms above 300ms"),
        // Relative to stable.
        ("same as stable", window(red(1_000, 10, None, Some(200)), Some(red(1_000, 10, None, Some(200)))),
            relative(), "pass"),
        ("error rate increase at the bound",
            window(red(1_000, 15, None, Some(200)), Some(red(1_000, 10, None, Some(200)))),
            relative(), "pass"),
        ("error rate increase above",
            window(red(1_000, 16, None, Some(200)), Some(red(1_000, 10, None, Some(200)))),
            relative(), "fail: error rate 1.6% is more than 0.5% above stable's 1%"),
        ("a bad stable lifts the bar: 3% is fine next to 2.6%",
            window(red(1_000, 30, None, Some(200)), Some(red(1_000, 26, None, Some(200)))),
            relative(), "pass"),
        ("better than stable", window(red(1_000, 0, None, Some(100)), Some(red(1_000, 50, None, Some(900)))),
            relative(), "pass"),
        ("p99 increase at the bound",
            window(red(1_000, 0, None, Some(240)), Some(red(1_000, 0, None, Some(200)))),
            relative(), "pass"),
        ("p99 increase above",
            window(Red { p99_us: Some(240 * MS + 1), ..red(1_000, 0, None, None) },
                Some(red(1_000, 0, None, Some(200)))),
            relative(), "fail: p99 latency 240ms 1us is more than 20% above stable's 200ms"),
        ("no stable measured", window(red(1_000, 0, None, Some(200)), None), relative(),
            "inconclusive: no stable release measured to compare with"),
        ("stable without traffic", window(red(1_000, 0, None, Some(200)), Some(Red::default())),
            relative(), "inconclusive: no requests to stable in the window"),
        ("stable with too little traffic",
            window(red(1_000, 0, None, Some(200)), Some(red(10, 0, None, Some(200)))),
            relative(), "inconclusive: 10 requests to stable, fewer than min_requests 50"),
        ("stable without a p99", window(red(1_000, 0, None, Some(200)), Some(red(1_000, 0, None, None))),
            relative(), "inconclusive: no p99 latency measured for stable"),
        ("canary without a p99", window(red(1_000, 0, None, None), Some(red(1_000, 0, None, Some(200)))),
            relative(), "inconclusive: no p99 latency measured"),
        ("relative fails even with a stable short of data on the other rule",
            window(red(1_000, 100, None, None), Some(red(1_000, 0, None, None))),
            relative(), "fail: error rate 10% is more than 0.5% above stable's 0%"),
        // Absolute and relative together: both must hold.
        ("absolute holds, relative broken",
            window(red(1_000, 9, Some(50), Some(290)), Some(red(1_000, 0, Some(50), Some(100)))),
            AnalysisRules { max_error_rate_increase: Some(0.005), max_p99_increase: Some(0.2), ..absolute() },
            "fail: error rate 0.9% is more than 0.5% above stable's 0%; \
             p99 latency 290ms is more than 20% above stable's 100ms"),
        ("both hold", window(ok, Some(ok)),
            AnalysisRules { max_error_rate_increase: Some(0.005), max_p99_increase: Some(0.2), ..absolute() },
            "pass"),
    ];
    let mut failures = Vec::new();
    for (name, samples, rules, want) in &cases {
        let got = verdict(samples, rules);
        if got != *want {
            failures.push(format!("{name}:\n   got  {got}\n   want {want}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn rules_come_from_the_analysis_block() {
    let analysis = Analysis {
        interval: Duration::from_secs(5),
        max_error_rate: Some(0.01),
        max_p50_latency: Some(Duration::from_millis(80)),
        max_p99_latency: Some(Duration::from_millis(300)),
        max_error_rate_increase: Some(0.005),
        max_p99_increase: Some(0.5),
        min_requests: 50,
        failure_limit: 1,
        inconclusive_limit: 2,
    };
    let run = AnalysisRun::new(&analysis);
    assert_eq!(
        run.rules,
        AnalysisRules {
            max_error_rate: Some(0.01),
            max_p50_us: Some(80_000),
            max_p99_us: Some(300_000),
            max_error_rate_increase: Some(0.005),
            max_p99_increase: Some(0.5),
            min_requests: 50,
        }
    );
    assert_eq!(
        (run.interval_ms, run.failure_limit, run.inconclusive_limit),
        (5_000, 1, 2)
    );
}

fn run(failure_limit: u32, inconclusive_limit: u32) -> AnalysisRun {
    AnalysisRun::new(&Analysis {
        interval: Duration::from_secs(5),
        max_error_rate: Some(0.01),
        max_p50_latency: None,
        max_p99_latency: None,
        max_error_rate_increase: None,
        max_p99_increase: None,
        min_requests: 50,
        failure_limit,
        inconclusive_limit,
    })
}

/// Feeds verdicts (`P`ass, `F`ail, `I`nconclusive) and returns the outcome after each.
fn feed(run: &mut AnalysisRun, script: &str) -> String {
    let mut out = Vec::new();
    for (k, c) in script.chars().enumerate() {
        let verdict = match c {
            'P' => Verdict::Pass,
            'F' => Verdict::Fail {
                reasons: vec!["bad".into()],
            },
            _ => Verdict::Inconclusive {
                reason: "thin".into(),
            },
        };
        out.push(match run.record(verdict, None, k as u64) {
            Outcome::Continue => "-",
            Outcome::Abort { .. } => "abort",
            Outcome::Pause { .. } => "pause",
        });
    }
    out.join(" ")
}

#[test]
fn failures_beyond_the_limit_abort_and_a_pass_resets_them() {
    // failure_limit 0: the first failure aborts.
    assert_eq!(feed(&mut run(0, 5), "PF"), "- abort");
    // failure_limit 2: the third failure in a row aborts; a pass between starts over.
    assert_eq!(feed(&mut run(2, 5), "FFPFFPFF"), "- - - - - - - -");
    assert_eq!(feed(&mut run(2, 5), "FFF"), "- - abort");
    // Inconclusive windows neither reset nor add to the failure streak.
    assert_eq!(feed(&mut run(1, 5), "FIF"), "- - abort");
}

#[test]
fn inconclusive_beyond_the_limit_pauses_and_never_counts_as_a_pass() {
    let mut r = run(0, 2);
    assert_eq!(feed(&mut r, "III"), "- - pause");
    assert!(!r.passed_since(0), "inconclusive is not a pass");
    // A resume starts the inconclusive count again.
    r.resume();
    assert_eq!(feed(&mut r, "IIP"), "- - -");
    assert!(r.passed_since(0));
    // A conclusive failure ends the inconclusive streak (and here, within its limit, goes on).
    let mut r = run(3, 1);
    assert_eq!(feed(&mut r, "IFIFI"), "- - - - -");
    assert_eq!(feed(&mut r, "I"), "pause");
    assert_eq!((r.consecutive_failures, r.totals), (2, [0, 2, 4]));
}

#[test]
fn passed_since_needs_the_latest_verdict_to_be_a_recent_pass() {
    let mut r = run(5, 5);
    r.record(Verdict::Pass, None, 100);
    assert!(r.passed_since(100));
    assert!(
        !r.passed_since(101),
        "a pass from before the step does not count"
    );
    r.record(
        Verdict::Fail {
            reasons: vec!["bad".into()],
        },
        None,
        200,
    );
    assert!(!r.passed_since(0), "a later failure takes the pass back");
}

#[test]
fn measure_judges_only_fresh_windows_and_calls_the_rest_inconclusive() {
    let mut r = run(5, 5);
    assert!(
        !r.due(u64::MAX),
        "nothing is due before a split is measured"
    );
    r.measure_from(10_000);
    assert!(!r.due(14_999));
    assert!(r.due(15_000));
    let good = Samples {
        from_ms: 10_000,
        to_ms: 15_000,
        canary: red(100, 0, None, None),
        stable: None,
    };
    // No samples at all.
    let (v, _) = r.measure(None, 15_000);
    assert_eq!(
        v.to_string(),
        "inconclusive: no samples reported for the window"
    );
    assert_eq!(r.next_ms, Some(20_000));
    // A window that began before the split was set mixes two splits.
    let early = Samples {
        from_ms: 9_000,
        ..good
    };
    let (v, _) = r.measure(Some(&early), 20_000);
    assert!(matches!(v, Verdict::Inconclusive { .. }), "{v}");
    // A fresh window is judged, and the same window again is stale.
    assert_eq!(r.measure(Some(&good), 25_000).0, Verdict::Pass);
    assert_eq!(r.window_floor_ms, 15_000);
    let (v, _) = r.measure(Some(&good), 30_000);
    assert!(matches!(v, Verdict::Inconclusive { .. }), "{v}");
    assert_eq!(r.totals, [1, 0, 3]);
    assert_eq!(r.last.as_ref().map(|m| m.at_ms), Some(30_000));
}

#[test]
fn verdicts_round_trip_through_json() {
    for v in [
        Verdict::Pass,
        Verdict::Fail {
            reasons: vec!["a".into(), "b".into()],
        },
        Verdict::Inconclusive { reason: "c".into() },
    ] {
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<Verdict>(&text).unwrap(), v);
    }
    let r = run(1, 1);
    let text = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<AnalysisRun>(&text).unwrap(), r);
}

#[test]
fn latencies_read_as_three_digits() {
    let cases = [
        (0, "0us"),
        (870, "870us"),
        (4_096, "4.1ms"),
        (90_000, "90ms"),
        (12_500, "12.5ms"),
        (300_000, "300ms"),
        (1_250_000, "1.25s"),
    ];
    for (micros, shown) in cases {
        assert_eq!(latency(micros), shown, "{micros}us");
    }
}
