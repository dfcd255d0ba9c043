//! Progressive delivery end to end: canary steps judged by analysis, blue/green with a preview,
//! promotion, warm and cold rollback — the real binary and its server, real sandboxed instances
//! (busybox httpd + a CGI app) behind kiln's proxy on loopback, and `kiln-load` while it happens.

#![allow(clippy::unwrap_used)]
// Waits here are bounded polls of a real server from outside; there is no clock to move.
#![allow(clippy::disallowed_methods)]

mod harness;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use harness::{Project, Run, assert_no_failed_request, under_load};

/// Generous bound for anything the server does in a second or two on a quiet machine.
const SLOW: Duration = Duration::from_secs(60);

/// The app: busybox httpd serving `/healthz` as a static file (health passes whatever the app
/// does) and `/cgi-bin/app`, a CGI that answers `500` to about one request in five when
/// `FLAKY` is set (`$RANDOM % 5 == 0`), else `200` with `GREETING` and the release.
/// `FLAKY` and `GREETING` are service env set from variables, so `-var flaky=1` makes a new,
/// bad release. `rollout` is the body of the service's `rollout` block.
fn config(rollout: &str) -> String {
    format!(
        r#"
project = "shop"

variable "greeting" {{ default = "hello" }}
variable "flaky" {{ default = "" }}

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
  env       = {{ GREETING = var.greeting, FLAKY = var.flaky }}
  health {{
    path              = "/healthz"
    interval          = "100ms"
    timeout           = "500ms"
    healthy_threshold = 1
  }}
  rollout {{
    min_healthy_time = "200ms"
    healthy_deadline = "10s"
{rollout}
  }}
}}

balancer "public" {{
  listen = "127.0.0.1:0"
  route {{
    path_prefix = "/"
    service     = service.web
  }}
}}
"#
    )
}

const APP: &str = r#"#!/bin/sh
if [ -n "$FLAKY" ] && [ $((RANDOM % 5)) -eq 0 ]; then
  echo 'Status: 500 Internal Server Error'
  echo 'Content-Type: text/plain'
  echo
  echo "flaky $KILN_RELEASE"
  exit 0
fi
echo 'Content-Type: text/plain'
echo
echo "$GREETING $KILN_RELEASE"
"#;

fn shop(rollout: &str) -> Project {
    let p = Project::new(&config(rollout));
    p.busybox_rootfs("rootfs");
    p.write("site/healthz", "ok\n");
    p.write("site/cgi-bin/app", APP);
    std::fs::set_permissions(
        p.path().join("site/cgi-bin/app"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    p
}

/// `kiln up`, then the app's URL on the balancer.
fn up(p: &Project) -> String {
    let up = p.kiln(&["up"]).ok();
    let base = up
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("public: "))
        .unwrap_or_else(|| panic!("no URL in:\n{}", up.stdout))
        .to_owned();
    format!("{base}cgi-bin/app")
}

/// One response, as a browser without cookies would get it.
#[derive(Debug)]
struct Response {
    status: u16,
    release: String,
    body: String,
}

/// `GET url` over a fresh HTTP/1.0 connection (no keep-alive, so nothing is chunked), with
/// `X-Kiln-Preview: 1` when `preview`.
fn get(url: &str, preview: bool) -> Response {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let extra = if preview { "X-Kiln-Preview: 1\r\n" } else { "" };
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n").unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let release = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-kiln-release")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Response {
        status,
        release,
        body: body.to_owned(),
    }
}

/// The service's entry in `kiln status --json`.
fn service(p: &Project) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&p.kiln(&["status", "--json"]).ok().stdout).unwrap();
    status["services"][0].clone()
}

/// The proxy's live traffic split, percent per release (`{1: 100.0}`).
fn traffic(service: &serde_json::Value) -> BTreeMap<u32, f64> {
    service["traffic"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.parse().unwrap(), v.as_f64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `kiln status` until every request goes to `release` and no rollout runs.
fn wait_settled_on(p: &Project, release: u32) {
    let mut last = serde_json::Value::Null;
    let settled = harness::wait_for(SLOW, || {
        last = service(p);
        last["rollout"].is_null() && traffic(&last) == BTreeMap::from([(release, 100.0)])
    });
    assert!(settled, "not settled on v{release}:\n{last:#}");
}

/// `kiln releases web` as `(release, status)` rows, newest first.
fn releases(p: &Project) -> Vec<(String, String)> {
    let out = p.kiln(&["releases", "web"]).ok().stdout;
    out.lines()
        .skip(1)
        .map(|l| {
            let release = l[..9].trim().to_owned();
            let status = l[9..21].trim().to_owned();
            (release, status)
        })
        .collect()
}

fn release_status(p: &Project, release: &str) -> String {
    releases(p)
        .into_iter()
        .find(|(r, _)| r == release)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no {release} in {:?}", releases(p)))
}

#[test]
fn a_canary_that_fails_a_fifth_of_its_requests_is_aborted_by_analysis_within_its_first_step() {
    let p = shop(
        r#"
    strategy         = "canary"
    steps            = [{ weight = 20, pause = "60s" }, { weight = 50, pause = "60s" }]
    scale_down_delay = "300ms"
    analysis {
      interval           = "500ms"
      max_error_rate     = 0.05
      min_requests       = 20
      inconclusive_limit = 100
    }
"#,
    );
    let url = up(&p);
    assert_eq!(get(&url, false).release, "v1");

    let (summary, apply) = under_load(&url, || {
        p.kiln(&["apply", "--auto-approve", "-var", "flaky=1"])
    });
    let apply: Run = apply.fails();

    // Aborted by analysis during step 1, in one switch back: step 2 never began.
    assert!(
        apply.stderr.contains("step 1 of 2"),
        "the canary never reached its first step:\n{}",
        apply.stderr
    );
    assert!(
        apply.stderr.contains("aborting: analysis failed"),
        "{}",
        apply.stderr
    );
    assert!(!apply.stderr.contains("step 2 of 2"), "{}", apply.stderr);
    assert!(apply.stderr.contains("reverted to v1"), "{}", apply.stderr);

    // Traffic is back on stable, the canary is recorded as failed, and its instances are gone.
    let s = service(&p);
    assert_eq!(traffic(&s), BTreeMap::from([(1, 100.0)]), "{s:#}");
    assert_eq!(s["stable"], 1, "{s:#}");
    assert_eq!(release_status(&p, "v2"), "failed");
    assert_eq!(release_status(&p, "v1"), "active");
    let gone = harness::wait_for(SLOW, || {
        service(&p)["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["release"] == 1)
    });
    assert!(gone, "v2 instances still run: {:#}", service(&p));
    for _ in 0..5 {
        let r = get(&url, false);
        assert_eq!((r.status, r.release.as_str()), (200, "v1"), "{}", r.body);
    }

    // Every failed request came from the canary (the stable release never failed one), and
    // the canary's failures stay within its first step's share. The canary got at most 20 %
    // of the requests, and fails about 20 % of those, so at most ~4 % of all the load's
    // requests can have failed even if the canary had held its step through the whole load;
    // it held it for about one analysis window (500 ms) of a load that also ran through the
    // bring-up and 300 ms on each side, so the real figure is far below. The margin of 1.5×
    // covers the binomial noise of the CGI's one-in-five draw (with ~100 canary requests, its
    // standard deviation is 4 points of the 20 %).
    let failed = summary.failed();
    let canary = failed + summary.releases.get("v2").copied().unwrap_or(0);
    let bound = (0.2 * 0.2 * summary.requests as f64 * 1.5).ceil() as u64;
    assert!(
        failed >= 1,
        "analysis failed, so the load must have seen an error: {summary:?}"
    );
    assert!(
        failed <= bound,
        "{failed} failed of {} requests: more than the first step's share allows ({bound})",
        summary.requests
    );
    // The canary's share of all requests never exceeded its step's 20 %, and about one in
    // five of its requests failed (0.45: over 6 standard deviations above 0.2 for the ≥ 20
    // requests analysis needed to judge).
    assert!(
        canary as f64 <= 0.2 * summary.requests as f64,
        "the canary served {canary} of {} requests",
        summary.requests
    );
    assert!(
        failed as f64 <= 0.45 * canary as f64,
        "{failed} of the canary's {canary} requests failed"
    );
    assert_eq!(
        summary.statuses.keys().copied().collect::<Vec<_>>(),
        [200, 500],
        "{summary:?}"
    );
    assert!(
        summary.failures.iter().all(|f| f == "status 500 from v2"),
        "{:?}",
        summary.failures
    );
}

#[test]
fn a_good_canary_walks_its_steps_and_is_promoted_under_load_with_no_failed_request() {
    let p = shop(
        r#"
    strategy         = "canary"
    steps            = [{ weight = 25, pause = "1s" }, { weight = 50, pause = "1s" }]
    scale_down_delay = "300ms"
    analysis {
      interval           = "500ms"
      max_error_rate     = 0.05
      min_requests       = 10
      inconclusive_limit = 100
    }
"#,
    );
    let url = up(&p);

    let (summary, apply) = under_load(&url, || {
        p.kiln(&["apply", "--auto-approve", "-var", "greeting=bonjour"])
    });
    let apply = apply.ok();
    assert_no_failed_request(&summary);
    for step in ["step 1 of 2", "step 2 of 2", "analysis: pass", "promoted"] {
        assert!(
            apply.stderr.contains(step),
            "no {step:?} in:\n{}",
            apply.stderr
        );
    }
    assert!(
        summary.releases.get("v1").copied().unwrap_or(0) > 0
            && summary.releases.get("v2").copied().unwrap_or(0) > 0,
        "{:?}",
        summary.releases
    );

    wait_settled_on(&p, 2);
    let r = get(&url, false);
    assert_eq!((r.status, r.release.as_str()), (200, "v2"));
    assert!(r.body.contains("bonjour v2"), "{}", r.body);
    assert_eq!(release_status(&p, "v2"), "active");
    assert_eq!(release_status(&p, "v1"), "retired");
}

#[test]
fn blue_green_previews_then_promotes_then_rolls_back_warm_with_no_failed_request() {
    let p = shop(
        r#"
    strategy         = "blue_green"
    auto_promote     = false
    scale_down_delay = "5m"
"#,
    );
    let url = up(&p);

    let (summary, ()) = under_load(&url, || {
        p.kiln(&[
            "apply",
            "--auto-approve",
            "--detach",
            "-var",
            "greeting=green",
        ])
        .ok();

        // Preview: the header reaches v2, everyone else still gets v1.
        let mut last = None;
        let previewed = harness::wait_for(SLOW, || {
            let r = get(&url, true);
            let ok = r.status == 200 && r.release == "v2";
            last = Some(r);
            ok
        });
        assert!(previewed, "preview never reached v2: {last:?}");
        // The preview route opens while v2 comes up; the stage turns to preview once every
        // v2 instance is ready.
        let mut s = service(&p);
        let waiting = harness::wait_for(SLOW, || {
            s = service(&p);
            s["rollout"]["stage"] == "preview: waiting for promotion"
        });
        assert!(waiting, "{s:#}");
        assert_eq!(traffic(&s), BTreeMap::from([(1, 100.0)]), "{s:#}");
        let r = get(&url, true);
        assert!(r.body.contains("green v2"), "{}", r.body);
        for _ in 0..10 {
            let r = get(&url, false);
            assert_eq!((r.status, r.release.as_str()), (200, "v1"), "{}", r.body);
        }

        // Promotion: one switch; v1 stays warm.
        p.kiln(&["rollout", "promote", "web", "--auto-approve"])
            .ok();
        let mut last = serde_json::Value::Null;
        let promoted = harness::wait_for(SLOW, || {
            last = service(&p);
            traffic(&last) == BTreeMap::from([(2, 100.0)])
        });
        assert!(promoted, "not promoted:\n{last:#}");
        assert_eq!(get(&url, false).release, "v2");
        assert_eq!(get(&url, true).release, "v2", "the preview has ended");
        assert_eq!(release_status(&p, "v1"), "warm");

        // Warm rollback: traffic only.
        let rollback = p.kiln(&["rollback", "web", "--auto-approve"]).ok();
        assert!(
            rollback.stdout.contains("v1 was still warm"),
            "{}",
            rollback.stdout
        );
        wait_settled_on(&p, 1);
        assert_eq!(get(&url, false).release, "v1");
    });
    assert_no_failed_request(&summary);
    assert!(
        summary.releases.get("v1").copied().unwrap_or(0) > 0
            && summary.releases.get("v2").copied().unwrap_or(0) > 0,
        "{:?}",
        summary.releases
    );
    assert_eq!(release_status(&p, "v1"), "active");
    assert_eq!(release_status(&p, "v2"), "rolled back");
    // The rollback launched nothing: v1's instances are the ones that served before.
    let s = service(&p);
    assert!(
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["release"] == 1)
            .count()
            == 2,
        "{s:#}"
    );
}

#[test]
fn a_rollback_after_the_old_release_retired_relaunches_it_from_the_store_with_no_failed_request() {
    let p = shop(
        r#"
    strategy         = "blue_green"
    auto_promote     = true
    scale_down_delay = "300ms"
"#,
    );
    let url = up(&p);
    // `kiln apply` follows the rollout to its end, warm period included.
    p.kiln(&["apply", "--auto-approve", "-var", "greeting=two"])
        .ok();
    wait_settled_on(&p, 2);
    let retired = harness::wait_for(SLOW, || {
        service(&p)["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["release"] == 2)
    });
    assert!(retired, "v1 still runs: {:#}", service(&p));
    assert_eq!(release_status(&p, "v1"), "retired");

    let (summary, rollback) = under_load(&url, || {
        let rollback = p.kiln(&["rollback", "web", "--auto-approve"]).ok();
        wait_settled_on(&p, 3);
        rollback
    });
    assert!(
        rollback
            .stdout
            .contains("rolling back as release v3: launched from the stored image"),
        "{}",
        rollback.stdout
    );
    assert_no_failed_request(&summary);
    assert!(
        summary.releases.get("v3").copied().unwrap_or(0) > 0,
        "{:?}",
        summary.releases
    );
    let r = get(&url, false);
    assert_eq!((r.status, r.release.as_str()), (200, "v3"));
    assert!(r.body.contains("hello v3"), "v1's env: {}", r.body);

    assert_eq!(
        releases(&p),
        [
            ("v3".to_owned(), "active".to_owned()),
            ("v2".to_owned(), "rolled back".to_owned()),
            ("v1".to_owned(), "retired".to_owned()),
        ]
    );
    let json: serde_json::Value =
        serde_json::from_str(&p.kiln(&["releases", "web", "--json"]).ok().stdout).unwrap();
    let v3 = json
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["number"] == 3)
        .unwrap();
    let v1 = json
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["number"] == 1)
        .unwrap();
    assert_eq!(v3["rollback_of"], 1, "{json:#}");
    assert_eq!(v3["image_digest"], v1["image_digest"], "{json:#}");
}

/// `kiln rollback` without `--to` goes back to "the release that served before the current
/// one" (docs/deploy.md). After a warm rollback from v2 to v1 and a new release v3, that is v1,
/// still warm — not v2, which was itself rolled back.
#[test]
fn a_second_rollback_goes_back_to_the_release_that_served_before_not_to_one_rolled_back() {
    let p = shop(
        r#"
    strategy         = "blue_green"
    auto_promote     = true
    scale_down_delay = "5m"
"#,
    );
    let url = up(&p);
    // Applies a new release and waits until it takes every request (the old one stays warm).
    let promote = |greeting: &str, release: u32| {
        p.kiln(&[
            "apply",
            "--auto-approve",
            "--detach",
            "-var",
            &format!("greeting={greeting}"),
        ])
        .ok();
        let mut last = serde_json::Value::Null;
        let promoted = harness::wait_for(SLOW, || {
            last = service(&p);
            traffic(&last) == BTreeMap::from([(release, 100.0)])
        });
        assert!(promoted, "v{release} not promoted:\n{last:#}");
    };
    promote("two", 2);
    let back = p.kiln(&["rollback", "web", "--auto-approve"]).ok();
    assert!(back.stdout.contains("v1 was still warm"), "{}", back.stdout);
    wait_settled_on(&p, 1);
    assert_eq!(release_status(&p, "v2"), "rolled back");

    promote("three", 3);
    let back = p.kiln(&["rollback", "web", "--auto-approve"]).ok();
    assert!(
        back.stdout.contains("v1 was still warm"),
        "rolled back to the wrong release:\n{}\n{:?}",
        back.stdout,
        releases(&p)
    );
    wait_settled_on(&p, 1);
    assert_eq!(get(&url, false).release, "v1");
}
