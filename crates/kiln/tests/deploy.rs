//! Deploying on the local runtime, end to end: the real binary, its server in the background,
//! real sandboxed instances behind kiln's proxy on loopback, and load while things change.

#![allow(clippy::unwrap_used)]

mod harness;

use std::time::Duration;

use harness::{Project, Run, under_load};

/// The example app (busybox httpd) as a service of `instances`, with fast health checks so the
/// tests run in seconds. `health_path` lets a test make a release that never turns healthy.
fn app(instances: u32, health_path: &str) -> String {
    format!(
        r#"
project = "shop"

variable "greeting" {{ default = "hello" }}

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
  instances = {instances}
  port      = 8080
  env       = {{ GREETING = var.greeting }}
  health {{
    path              = "{health_path}"
    interval          = "100ms"
    timeout           = "500ms"
    healthy_threshold = 1
  }}
  rollout {{
    strategy         = "rolling"
    max_parallel     = 1
    min_healthy_time = "300ms"
    healthy_deadline = "3s"
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

fn shop(instances: u32) -> Project {
    let p = Project::new(&app(instances, "/healthz"));
    p.busybox_rootfs("rootfs");
    p.write("site/healthz", "ok\n");
    p.write("site/index.html", "<h1>shop</h1>\n");
    p.write(
        "site/cgi-bin/version",
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"$GREETING $KILN_RELEASE $KILN_INSTANCE_ID\"\n",
    );
    std::fs::set_permissions(
        p.path().join("site/cgi-bin/version"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    p
}

/// The balancer's URL printed by `kiln up`.
fn url(up: &Run) -> String {
    up.stdout
        .lines()
        .find_map(|l| l.strip_prefix("public: "))
        .unwrap_or_else(|| panic!("no URL in:\n{}", up.stdout))
        .to_owned()
}

fn get(url: &str) -> (u16, String, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let resp = client.get(url.parse().unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let release = resp
            .headers()
            .get("x-kiln-release")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, release, String::from_utf8_lossy(&body).into_owned())
    })
}

#[test]
fn up_serves_through_the_proxy_and_a_change_replaces_every_instance_with_no_failed_request() {
    let p = shop(2);
    let up = p.kiln(&["up"]).ok();
    let base = url(&up);
    let (status, release, body) = get(&format!("{base}cgi-bin/version"));
    assert_eq!((status, release.as_str()), (200, "v1"), "{body}");
    assert!(body.starts_with("hello v1 web-v1-"), "{body}");

    let (summary, ()) = under_load(&base, || {
        p.kiln(&["apply", "--auto-approve", "-var", "greeting=bonjour"])
            .ok();
    });
    assert_eq!(
        summary.failed(),
        0,
        "failed requests: {:?}",
        summary.failures
    );
    assert!(
        summary.releases.get("v2").copied().unwrap_or(0) > 0,
        "{:?}",
        summary.releases
    );

    let (_, release, body) = get(&format!("{base}cgi-bin/version"));
    assert_eq!(release, "v2");
    assert!(body.starts_with("bonjour v2 "), "{body}");
    let status: serde_json::Value =
        serde_json::from_str(&p.kiln(&["status", "--json"]).ok().stdout).unwrap();
    let instances = status["services"][0]["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{status}");
    assert!(instances.iter().all(|i| i["release"] == 2), "{status}");
    let releases = p.kiln(&["releases", "web"]).ok();
    assert!(
        releases.stdout.contains("v2       active"),
        "{}",
        releases.stdout
    );
    assert!(
        releases.stdout.contains("v1       retired"),
        "{}",
        releases.stdout
    );
}

#[test]
fn a_release_that_never_turns_healthy_is_reverted_with_no_failed_request() {
    let p = shop(2);
    let base = url(&p.kiln(&["up"]).ok());
    p.write("kiln.hcl", &app(2, "/missing-health-endpoint"));
    let mut apply = None;
    let (summary, ()) = under_load(&base, || {
        apply = Some(p.kiln(&["apply", "--auto-approve", "-var", "greeting=broken"]));
    });
    let apply = apply.unwrap().fails();
    assert!(apply.stderr.contains("reverted to v1"), "{}", apply.stderr);
    assert_eq!(
        summary.failed(),
        0,
        "failed requests: {:?}",
        summary.failures
    );
    assert_eq!(
        summary.releases.keys().collect::<Vec<_>>(),
        ["v1"],
        "v2 never served"
    );
    let (_, release, _) = get(&base);
    assert_eq!(release, "v1");
    let releases = p.kiln(&["releases", "web"]).ok();
    assert!(
        releases.stdout.contains("v2       failed"),
        "{}",
        releases.stdout
    );
}

#[test]
fn a_stale_plan_is_refused_and_a_second_apply_during_a_rollout_names_the_holder() {
    let p = shop(1);
    p.kiln(&["up"]).ok();
    p.kiln(&["plan", "-out", "old.plan", "-var", "greeting=one"])
        .ok();
    p.kiln(&["apply", "--auto-approve", "-var", "greeting=two"])
        .ok();
    let stale = p.kiln(&["apply", "old.plan"]).fails();
    assert!(
        stale.stderr.contains("the plan is stale"),
        "{}",
        stale.stderr
    );

    // A slow rollout holds the lock; a second apply meanwhile is refused.
    p.write("kiln.hcl", &app(1, "/missing-health-endpoint"));
    p.kiln(&[
        "apply",
        "--auto-approve",
        "--detach",
        "-var",
        "greeting=three",
    ])
    .ok();
    let second = p
        .kiln(&["apply", "--auto-approve", "-var", "greeting=four"])
        .fails();
    assert!(
        second.stderr.contains("state is locked by apply"),
        "{}",
        second.stderr
    );
}

#[test]
fn an_instance_killed_by_hand_is_replaced() {
    let p = shop(2);
    p.kiln(&["up"]).ok();
    let status: serde_json::Value =
        serde_json::from_str(&p.kiln(&["status", "--json"]).ok().stdout).unwrap();
    let victim = status["services"][0]["instances"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    harness::kill_instance(&p, &victim);
    let replaced = harness::wait_for(Duration::from_secs(10), || {
        let s: serde_json::Value =
            serde_json::from_str(&p.kiln(&["status", "--json"]).ok().stdout).unwrap();
        let ids: Vec<String> = s["services"][0]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["routable"] == true)
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect();
        ids.len() == 2 && !ids.contains(&victim)
    });
    assert!(replaced, "the killed instance was not replaced");
}

#[test]
fn killing_the_server_mid_rollout_resumes_with_no_orphan() {
    let p = shop(2);
    let base = url(&p.kiln(&["up"]).ok());
    p.kiln(&[
        "apply",
        "--auto-approve",
        "--detach",
        "-var",
        "greeting=after-crash",
    ])
    .ok();
    harness::kill_server(&p);
    // The next command starts a new server, which re-adopts instances and resumes.
    let done = harness::wait_for(Duration::from_secs(15), || {
        let r = p.kiln(&["status", "--json"]);
        if r.code != 0 {
            p.kiln(&["up"]);
            return false;
        }
        let s: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        s["services"][0]["rollout"].is_null()
            && s["services"][0]["instances"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["release"] == 2 && i["routable"] == true)
            && s["services"][0]["instances"].as_array().unwrap().len() == 2
    });
    assert!(done, "the rollout did not finish after the restart");
    let (_, release, _) = get(&base);
    assert_eq!(release, "v2");
    let p_ids = harness::instance_processes(&p);
    let status: serde_json::Value =
        serde_json::from_str(&p.kiln(&["status", "--json"]).ok().stdout).unwrap();
    let known: Vec<String> = status["services"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    for id in p_ids.iter().filter(|id| id.starts_with("web-")) {
        assert!(
            known.contains(id),
            "orphan instance process {id}; state knows {known:?}"
        );
    }
}

#[test]
fn down_leaves_no_process_and_released_images_are_kept() {
    let p = shop(2);
    p.kiln(&["up"]).ok();
    assert!(
        harness::instance_processes(&p).len() >= 2,
        "instances run under bwrap"
    );

    // A release pins its image: rm refuses, gc keeps it.
    let rm = p.kiln(&["images", "rm", "web"]).fails();
    assert!(
        rm.stderr.contains("is release v1 of service `web`"),
        "{}",
        rm.stderr
    );
    p.kiln(&["images", "gc"]).ok();
    p.kiln(&["images", "verify", "web"]).ok();

    let pid = std::fs::read_to_string(p.path().join(".kiln/server.pid")).unwrap();
    p.kiln(&["down", "--auto-approve"]).ok();
    assert!(
        !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "the server is gone"
    );
    assert_eq!(
        harness::instance_processes(&p),
        Vec::<String>::new(),
        "no instance outlives down"
    );

    // The state is kept: up brings the same release back.
    let up = p.kiln(&["up"]).ok();
    let (status, release, _) = get(&url(&up));
    assert_eq!((status, release.as_str()), (200, "v1"));
}

/// Regression: `kiln down` stopped instances one by one while the reconcile loop still ran, and
/// the loop relaunched them; with many instances every one of them survived the down.
#[test]
fn down_with_many_instances_stops_them_all_and_relaunches_none() {
    let p = Project::new(&app(24, "/healthz").replace(
        "min_healthy_time = \"300ms\"",
        "min_healthy_time = \"0s\"\n    max_surge = 24",
    ));
    p.busybox_rootfs("rootfs");
    p.write("site/healthz", "ok\n");
    p.kiln(&["up"]).ok();
    assert_eq!(
        harness::instance_processes(&p).len(),
        48,
        "24 instances, two bwrap processes each"
    );
    p.kiln(&["down", "--auto-approve"]).ok();
    assert_eq!(harness::instance_processes(&p), Vec::<String>::new());
}
