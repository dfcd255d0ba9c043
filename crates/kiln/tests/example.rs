//! The example's tour (`examples/hello/tour.sh`, shown in `examples/hello/README.md`) run as it
//! is, on a copy of the example: a canary that promotes, a canary aborted by analysis, a
//! blue/green release previewed and promoted, a warm and a cold rollback, all under load. The
//! test holds the README to what really happens.
//!
//! The example listens on the fixed ports 127.0.0.1:8080 and :8081, so nothing else may use
//! them while this runs (no other test does).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello")
}

/// `kiln-load` is built beside `kiln` (`scripts/test.sh` builds it before the tests).
fn kiln_load() -> PathBuf {
    let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
    let load = kiln.with_file_name("kiln-load");
    assert!(
        load.exists(),
        "{} is missing: `cargo build -p kiln-load` first",
        load.display()
    );
    load
}

fn copy_example(to: &Path) {
    let from = example_dir();
    for file in ["kiln.hcl", "make-rootfs.sh", "tour.sh"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
    let status = Command::new("cp")
        .arg("-a")
        .arg(from.join("site"))
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

fn summary(dir: &Path, name: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(".kiln").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect()
}

#[test]
fn the_example_tour_does_what_its_readme_shows() {
    let dir = tempfile::tempdir().unwrap();
    copy_example(dir.path());
    let out = Command::new(dir.path().join("tour.sh"))
        .env("KILN", env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_LOAD", kiln_load())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{stdout}\n{stderr}");
    assert!(out.status.success(), "tour.sh failed:\n{all}");

    // The steps the README shows, in its words.
    for line in [
        "web: step 1 of 2: 20% of requests to v2",
        "web: promoted: v2 takes every request; v1 stays warm for 2m",
        "web: analysis: fail: error rate",
        "web: rollout to v3 failed",
        "v3       failed",
        "bonjour from web v2",
        "hallo from web v4",
        "preview: waiting for promotion",
        "web: v2 was still warm; every request goes to it",
        "web: rolling back as release v5",
        "hello from kiln from web v5",
        "v4       rolled back",
    ] {
        assert!(all.contains(line), "no `{line}` in the tour:\n{all}");
    }
    // Before promotion the public route serves v2 and the preview route v4.
    let public_before = all.find("bonjour from web v2").unwrap();
    let promote = all.find("$ kiln rollout promote web").unwrap();
    assert!(public_before < promote);

    // The load: the only failures are the bad canary's own 500s, and it served only its first
    // step's share; every release served.
    let load = summary(dir.path(), "tour-load.json");
    let failed = counts(&load["failed_by_release"]);
    assert_eq!(
        failed.keys().collect::<Vec<_>>(),
        ["v3"],
        "only v3 fails: {load}"
    );
    let statuses = counts(&load["statuses"]);
    assert!(
        statuses.keys().all(|s| s == "200" || s == "500"),
        "no connection error or other status: {load}"
    );
    let served = counts(&load["releases"]);
    for release in ["v1", "v2", "v3", "v4", "v5"] {
        assert!(
            served.get(release).copied().unwrap_or(0) > 0,
            "{release} served: {load}"
        );
    }
    let v3 = served["v3"] + failed["v3"];
    let total = load["requests"].as_u64().unwrap();
    assert!(
        v3 * 100 < total * 20,
        "v3 served {v3} of {total} requests, more than its 20 % step could"
    );
    // The preview smoke test reached v4 only, without a failure.
    let preview = summary(dir.path(), "tour-preview.json");
    assert_eq!(preview["failed"], 0, "{preview}");
    assert_eq!(
        counts(&preview["releases"]).keys().collect::<Vec<_>>(),
        ["v4"],
        "{preview}"
    );
}
