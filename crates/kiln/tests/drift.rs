//! Drift end to end: the real binary and its server, real sandboxed instances (busybox httpd)
//! behind kiln's proxy. A file of an instance's root is edited on the host, a stray instance is
//! started in kiln's runtime directory, the state database is edited by hand; `kiln drift`
//! finds each, the server's watcher finds the edited file on its own, and `kiln drift
//! --remediate` replaces exactly the drifted instances under load with no failed request.

#![allow(clippy::unwrap_used)]
// Waits here are bounded polls of a real server from outside; there is no clock to move.
#![allow(clippy::disallowed_methods)]

mod harness;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::{Project, assert_no_failed_request, under_load};

const SLOW: Duration = Duration::from_secs(60);

fn config(drift: &str) -> String {
    format!(
        r#"
project = "shop"

image "web" {{
  base = "dir:./rootfs"
  provisioner "file" {{
    source      = "site"
    destination = "/www"
  }}
  entrypoint = ["/bin/sh", "-c", "exec httpd -f -p \"$PORT\" -h /www"]
}}

service "web" {{
  image     = image.web
  instances = 2
  port      = 8080
  env       = {{ GREETING = "hello" }}
  health {{
    path              = "/healthz"
    interval          = "100ms"
    timeout           = "500ms"
    healthy_threshold = 1
  }}
  rollout {{
    min_healthy_time = "200ms"
  }}
}}

balancer "public" {{
  listen = "127.0.0.1:0"
  route {{
    path_prefix = "/"
    service     = service.web
  }}
}}

{drift}
"#
    )
}

/// The project, up; returns it and the URL of its index page.
fn shop(drift: &str) -> (Project, String) {
    let p = Project::new(&config(drift));
    p.busybox_rootfs("rootfs");
    p.write("site/healthz", "ok\n");
    p.write("site/index.html", "<h1>shop</h1>\n");
    let up = p.kiln(&["up"]).ok();
    let base = up
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("public: "))
        .unwrap_or_else(|| panic!("no URL in:\n{}", up.stdout))
        .to_owned();
    (p, format!("{base}index.html"))
}

/// The one image root the instances run from.
fn image_root(p: &Project) -> PathBuf {
    let dir = p.path().join(".kiln/rootfs");
    let roots: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(roots.len(), 1, "{roots:?}");
    roots[0].clone()
}

fn drift_json(p: &Project) -> serde_json::Value {
    let run = p.kiln(&["drift", "--json"]).ok();
    serde_json::from_str(&run.stdout).unwrap()
}

fn instance_ids(p: &Project) -> Vec<String> {
    let status: serde_json::Value =
        serde_json::from_str(&p.kiln(&["status", "--json"]).ok().stdout).unwrap();
    status["services"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

fn get(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[test]
fn a_tampered_file_is_found_by_the_watcher_and_replaced_under_load_with_no_failed_request() {
    // Timed checks once an hour: only the watcher can find the change in time.
    let (p, url) = shop("drift {\n  interval = \"1h\"\n}\n");
    let clean = p.kiln(&["drift", "--detailed-exitcode"]);
    assert_eq!(clean.code, 0, "{}{}", clean.stdout, clean.stderr);
    assert!(
        clean.stdout.contains("No drift: 2 instances"),
        "{}",
        clean.stdout
    );
    let before = instance_ids(&p);

    let root = image_root(&p);
    std::fs::write(root.join("www/index.html"), "<h1>defaced</h1>\n").unwrap();
    let edited = Instant::now();
    // The server's watcher finds it and records it; `kiln status` shows it.
    let mut status = serde_json::Value::Null;
    let found = harness::wait_for(Duration::from_secs(10), || {
        status = serde_json::from_str(&p.kiln(&["status", "--json"]).ok().stdout).unwrap();
        status["services"][0]["drift"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
    });
    let latency = edited.elapsed();
    assert!(found, "the watcher never reported the edit: {status:#}");
    assert!(latency < Duration::from_secs(5), "found after {latency:?}");
    let events = p.kiln(&["status", "--json"]).ok();
    assert!(
        events.stdout.contains("/www/index.html"),
        "{}",
        events.stdout
    );

    // `kiln drift` reports it for each instance, with exit 2.
    let drift = p.kiln(&["drift", "--detailed-exitcode"]);
    assert_eq!(drift.code, 2, "{}{}", drift.stdout, drift.stderr);
    for id in &before {
        assert!(
            drift.stdout.contains(&format!(
                "file_tamper    web v1 {id} /www/index.html: expected content sha256:"
            )),
            "{}",
            drift.stdout
        );
    }

    // Remediation replaces both instances (and unpacks the root again) with no failed request.
    let (summary, remediate) =
        under_load(&url, || p.kiln(&["drift", "--remediate", "--auto-approve"]));
    let remediate = remediate.ok();
    assert_no_failed_request(&summary);
    assert!(
        remediate.stdout.contains("replace_because_drift")
            || remediate
                .stdout
                .contains("will be replaced because it drifted"),
        "{}",
        remediate.stdout
    );
    let after = instance_ids(&p);
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "{before:?} → {after:?}"
    );
    assert_eq!(get(&url), "<h1>shop</h1>\n", "served from a fresh root");
    let clean = p.kiln(&["drift", "--detailed-exitcode"]);
    assert_eq!(clean.code, 0, "{}{}", clean.stdout, clean.stderr);
    // The tampered root is kept aside for inspection.
    let aside = std::fs::read_dir(p.path().join(".kiln/rootfs/.tampered"))
        .unwrap()
        .count();
    assert_eq!(aside, 1);
    p.kiln(&["down", "--auto-approve"]).ok();
}

#[test]
fn a_stray_instance_a_hand_edited_state_and_a_hand_edited_audit_log_are_reported_precisely() {
    let (p, _url) = shop("");
    // A process started by kiln's runtime (in its runtime directory) that the state does not
    // know, as a crashed or foreign kiln would leave.
    let driver = kiln_driver_local::LocalDriver::new(
        p.path().join(".kiln/run"),
        std::sync::Arc::new(kiln_core::clock::SystemClock),
    );
    let port = kiln_driver::free_port().unwrap();
    let spec = kiln_driver::InstanceSpec::new("web-v9-stray0", "web", 9, port)
        .with_rootfs(image_root(&p))
        .with_args(["/bin/sh", "-c", "exec httpd -f -p \"$PORT\" -h /www"])
        .with_log_path(p.path().join("stray.log"));
    let stray = kiln_driver::Driver::start(&driver, &spec).unwrap();

    let report = drift_json(&p);
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{report:#}");
    assert_eq!(findings[0]["category"], "unmanaged");
    assert_eq!(findings[0]["instance"], "web-v9-stray0");
    let out = p.kiln(&["drift", "--remediate", "--auto-approve"]).ok();
    assert!(
        out.stdout
            .contains("instance[\"web-v9-stray0\"] will be stopped"),
        "{}",
        out.stdout
    );
    let gone = harness::wait_for(SLOW, || {
        matches!(
            kiln_driver::Driver::status(&driver, &stray),
            Ok(kiln_driver::Status::Gone | kiln_driver::Status::Exited { .. })
        )
    });
    assert!(gone, "the stray instance still runs");
    let clean = p.kiln(&["drift", "--detailed-exitcode"]);
    assert_eq!(clean.code, 0, "{}{}", clean.stdout, clean.stderr);

    // Every change so far is in the audit log, chained.
    let log = p.kiln(&["audit", "log"]).ok().stdout;
    for kind in ["apply", "lock", "launch", "drift", "state_version"] {
        assert!(log.contains(kind), "no {kind} entry in:\n{log}");
    }
    let verify = p.kiln(&["audit", "verify"]).ok();
    assert!(verify.stdout.contains("intact"), "{}", verify.stdout);

    // An audit entry edited by hand is named by `kiln audit verify`.
    let conn = rusqlite::Connection::open(p.path().join(".kiln/state.db")).unwrap();
    conn.execute(
        "UPDATE audit SET actor = 'nobody@nowhere' WHERE seq = 3",
        [],
    )
    .unwrap();
    let verify = p.kiln(&["audit", "verify"]);
    assert_eq!(verify.code, 1, "{}{}", verify.stdout, verify.stderr);
    assert!(
        verify.stdout.contains("broken at entry 3"),
        "{}",
        verify.stdout
    );

    // The state database edited by hand.
    conn.execute(
        "UPDATE versions SET doc = replace(doc, '\"hello\"', '\"hacked\"') \
         WHERE serial = (SELECT max(serial) FROM versions)",
        [],
    )
    .unwrap();
    drop(conn);
    let drift = p.kiln(&["drift", "--detailed-exitcode"]);
    assert_eq!(drift.code, 2, "{}{}", drift.stdout, drift.stderr);
    assert!(drift.stdout.contains("state "), "{}", drift.stdout);
    assert!(drift.stdout.contains("hashes to"), "{}", drift.stdout);
    p.kiln(&["down", "--auto-approve"]).ok();
}
