//! kiln on AWS end to end, through the real binary against a moto server (`$KILN_MOTO_URL`,
//! started by `scripts/test.sh`): `kiln bake` makes the AMI (and reuses it), `kiln apply`
//! makes the launch template, Auto Scaling groups, target groups and the weighted listener
//! the plan promised, a canary moves the listener's weights step by step, and `kiln rollback`
//! puts them back. Everything is checked through the AWS SDK, not through kiln.
//!
//! moto boots nothing: instances are records, targets are always healthy, and no request
//! reaches an app. What is checked here is what kiln asks AWS for, in what order.

#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used)]
// Waits here are bounded polls of moto from outside; there is no clock to move.
#![allow(clippy::disallowed_methods)]

mod harness;

use std::collections::BTreeMap;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_ec2::types::Filter;
use harness::{Project, Run, wait_for};
use kiln_aws::testing::{self, Network};

/// The network, bucket and source AMI a project on AWS needs, made with the SDK.
struct Account {
    rt: tokio::runtime::Runtime,
    conf: SdkConfig,
    project: String,
    subnets: Vec<String>,
    security_group: String,
    bucket: String,
    source_ami: String,
}

impl Account {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conf = rt.block_on(testing::moto_conf());
        let suffix = &testing::unique_id()[..8];
        let project = format!("shop{suffix}");
        let bucket = format!("kiln-artifacts-{suffix}");
        let network = rt.block_on(async {
            testing::bucket(&conf, &bucket).await;
            Network::create(&conf, suffix).await
        });
        Self {
            rt,
            conf,
            project,
            subnets: network.subnets,
            security_group: network.security_group,
            bucket,
            source_ami: network.ami,
        }
    }

    fn config(&self) -> String {
        format!(
            r#"
project = "{project}"

variable "greeting" {{ default = "one" }}
variable "strategy" {{ default = "canary" }}

target "aws" {{
  region          = "us-east-1"
  endpoint_url    = "{moto}"
  subnets         = ["{s1}", "{s2}"]
  security_groups = ["{sg}"]
  instance_type   = "t3.micro"
  artifact_bucket = "{bucket}"
  source_ami      = "{ami}"
  tags            = {{ team = "storefront" }}
}}

image "web" {{
  target = target.aws
  provisioner "file" {{
    source      = "site"
    destination = "/www"
  }}
  entrypoint = ["/bin/httpd", "-f", "-h", "/www"]
  labels     = {{ version = "1.0.0" }}
}}

service "web" {{
  target    = target.aws
  image     = image.web
  instances = 2
  port      = 8080
  env       = {{ GREETING = var.greeting }}
  health {{
    path     = "/healthz"
    interval = "1s"
  }}
  rollout {{
    strategy         = var.strategy
    auto_promote     = false
    steps            = [{{ weight = 25, pause = "3s" }}]
    min_healthy_time = "0s"
    scale_down_delay = "10m"
  }}
}}

balancer "public" {{
  listen = "0.0.0.0:80"
  route {{
    path_prefix = "/"
    service     = service.web
  }}
}}
"#,
            project = self.project,
            moto = testing::moto_url(),
            s1 = self.subnets[0],
            s2 = self.subnets[1],
            sg = self.security_group,
            bucket = self.bucket,
            ami = self.source_ami,
        )
    }

    fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.conf)
    }

    /// The balancer's listener, once kiln made it.
    async fn listener(
        &self,
        elb: &aws_sdk_elasticloadbalancingv2::Client,
    ) -> Option<aws_sdk_elasticloadbalancingv2::types::Listener> {
        let name = format!("k-{}-public", self.project);
        let lbs = elb
            .describe_load_balancers()
            .names(&name)
            .send()
            .await
            .ok()?;
        let lb = lbs.load_balancers().first()?;
        let listeners = elb
            .describe_listeners()
            .load_balancer_arn(lb.load_balancer_arn()?)
            .send()
            .await
            .unwrap();
        listeners.listeners().first().cloned()
    }

    /// The release a target group belongs to (its `kiln:release` tag).
    async fn release_of(elb: &aws_sdk_elasticloadbalancingv2::Client, arn: &str) -> u32 {
        let tags = elb.describe_tags().resource_arns(arn).send().await.unwrap();
        tags.tag_descriptions()[0]
            .tags()
            .iter()
            .find(|t| t.key() == Some("kiln:release"))
            .and_then(|t| t.value()?.parse().ok())
            .unwrap()
    }

    /// The listener's forward weights, by release.
    fn listener_weights(&self) -> BTreeMap<u32, i32> {
        let elb = aws_sdk_elasticloadbalancingv2::Client::new(&self.conf);
        self.rt.block_on(async {
            let mut weights = BTreeMap::new();
            let Some(listener) = self.listener(&elb).await else {
                return weights;
            };
            for a in listener.default_actions() {
                let Some(fwd) = a.forward_config() else {
                    continue;
                };
                for t in fwd.target_groups() {
                    let release = Self::release_of(&elb, t.target_group_arn().unwrap()).await;
                    weights.insert(release, t.weight().unwrap_or(1));
                }
            }
            weights
        })
    }

    /// Sets the listener's weights by hand, as someone in the console would: `weights` by
    /// release, for the target groups the listener forwards to now.
    fn set_weights_by_hand(&self, weights: &BTreeMap<u32, i32>) {
        use aws_sdk_elasticloadbalancingv2::types::{
            Action, ActionTypeEnum, ForwardActionConfig, TargetGroupTuple,
        };
        let elb = aws_sdk_elasticloadbalancingv2::Client::new(&self.conf);
        self.rt.block_on(async {
            let listener = self.listener(&elb).await.unwrap();
            let mut forward = ForwardActionConfig::builder();
            for a in listener.default_actions() {
                for t in a
                    .forward_config()
                    .map(|f| f.target_groups())
                    .unwrap_or_default()
                {
                    let arn = t.target_group_arn().unwrap();
                    let release = Self::release_of(&elb, arn).await;
                    forward = forward.target_groups(
                        TargetGroupTuple::builder()
                            .target_group_arn(arn)
                            .weight(weights.get(&release).copied().unwrap_or(0))
                            .build(),
                    );
                }
            }
            elb.modify_listener()
                .listener_arn(listener.listener_arn().unwrap())
                .default_actions(
                    Action::builder()
                        .r#type(ActionTypeEnum::Forward)
                        .forward_config(forward.build())
                        .build(),
                )
                .send()
                .await
                .unwrap();
        });
    }

    /// The release the listener's preview rule (`X-Kiln-Preview: 1`) sends requests to.
    fn preview_release(&self) -> Option<u32> {
        let elb = aws_sdk_elasticloadbalancingv2::Client::new(&self.conf);
        self.rt.block_on(async {
            let listener = self.listener(&elb).await?;
            let rules = elb
                .describe_rules()
                .listener_arn(listener.listener_arn()?)
                .send()
                .await
                .unwrap();
            for rule in rules.rules() {
                let header = rule.conditions().iter().any(|c| {
                    c.http_header_config().is_some_and(|h| {
                        h.http_header_name() == Some("X-Kiln-Preview") && h.values() == ["1"]
                    })
                });
                if header {
                    let fwd = rule.actions().first()?.forward_config()?;
                    let arn = fwd.target_groups().first()?.target_group_arn()?;
                    return Some(Self::release_of(&elb, arn).await);
                }
            }
            None
        })
    }

    /// The release's Auto Scaling group: (desired, instance ids).
    fn group(&self, release: u32) -> Option<(i32, Vec<String>)> {
        let asg = aws_sdk_autoscaling::Client::new(&self.conf);
        let name = format!("kiln-{}-web-v{release}", self.project);
        self.rt.block_on(async {
            let out = asg
                .describe_auto_scaling_groups()
                .auto_scaling_group_names(&name)
                .send()
                .await
                .unwrap();
            out.auto_scaling_groups().first().map(|g| {
                (
                    g.desired_capacity().unwrap(),
                    g.instances()
                        .iter()
                        .filter_map(|i| i.instance_id().map(str::to_owned))
                        .collect(),
                )
            })
        })
    }

    /// The running instances of the project: (EC2 id, AMI, `kiln:release`).
    fn instances(&self) -> Vec<(String, String, String)> {
        let ec2 = self.ec2();
        self.rt.block_on(async {
            let filters = [
                Filter::builder()
                    .name("tag:kiln:project")
                    .values(&self.project)
                    .build(),
                Filter::builder()
                    .name("instance-state-name")
                    .values("running")
                    .values("pending")
                    .build(),
            ];
            testing::instances(&ec2, filters)
                .await
                .iter()
                .map(|i| {
                    let tag = |k: &str| {
                        i.tags()
                            .iter()
                            .find(|t| t.key() == Some(k))
                            .and_then(|t| t.value())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    (
                        i.instance_id().unwrap().to_owned(),
                        i.image_id().unwrap_or_default().to_owned(),
                        tag("kiln:release"),
                    )
                })
                .collect()
        })
    }
}

const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_MAX_ATTEMPTS", "2"),
];

fn kiln(p: &Project, args: &[&str]) -> Run {
    p.kiln_env(args, AWS_ENV)
}

#[test]
fn bake_deploy_canary_and_rollback_on_aws() {
    let aws = Account::new();
    let p = Project::new(&aws.config());
    p.write("site/healthz", "ok\n");
    p.write("site/index.html", "hello\n");

    // Bake: the image, then its AMI, tagged with the image's digest.
    let baked = kiln(&p, &["bake"]).ok();
    let digest = baked.digest_of("web");
    let ec2 = aws.ec2();
    let amis = aws.rt.block_on(async {
        ec2.describe_images()
            .owners("self")
            .filters(
                Filter::builder()
                    .name("tag:kiln:digest")
                    .values(&digest)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("tag:kiln:project")
                    .values(&aws.project)
                    .build(),
            )
            .send()
            .await
            .unwrap()
    });
    assert_eq!(amis.images().len(), 1, "{:?}", amis.images());
    let ami = amis.images()[0].image_id().unwrap().to_owned();
    assert!(baked.stderr.contains(&ami), "{}", baked.stderr);
    let ssm = aws_sdk_ssm::Client::new(&aws.conf);
    let latest = aws.rt.block_on(async {
        ssm.get_parameter()
            .name(format!("/kiln/{}/web/latest", aws.project))
            .send()
            .await
            .unwrap()
    });
    assert_eq!(latest.parameter().unwrap().value(), Some(ami.as_str()));
    // Unchanged inputs: the same AMI, no second build.
    let again = kiln(&p, &["bake"]).ok();
    assert!(again.stderr.contains("reused"), "{}", again.stderr);

    // The first release: two instances of the AMI in the v1 group, all traffic to v1.
    kiln(&p, &["apply", "--auto-approve"]).ok();
    let (desired, members) = aws.group(1).expect("the v1 Auto Scaling group");
    assert_eq!(desired, 2);
    assert_eq!(members.len(), 2);
    let running = aws.instances();
    assert_eq!(running.len(), 2, "{running:?}");
    assert!(
        running
            .iter()
            .all(|(_, image, release)| image == &ami && release == "1")
    );
    assert_eq!(
        aws.listener_weights().keys().copied().collect::<Vec<_>>(),
        [1]
    );

    // A canary: v2 at 25 % for 3 s, then everything; the listener is watched meanwhile.
    let watcher = std::thread::scope(|s| {
        let apply = s.spawn(|| kiln(&p, &["apply", "-var", "greeting=two", "--auto-approve"]));
        let mut seen = Vec::new();
        while !apply.is_finished() {
            let w = aws.listener_weights();
            if seen.last() != Some(&w) {
                seen.push(w);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        apply.join().unwrap().ok();
        // The listener follows the engine's tables a moment later.
        wait_for(Duration::from_secs(30), || {
            let w = aws.listener_weights();
            if seen.last() != Some(&w) {
                seen.push(w.clone());
            }
            w.get(&1) == Some(&0)
        });
        seen
    });
    // The weights moved in steps, v2's share never going back: 0 → 25 % → 100 %.
    let shares: Vec<u32> = watcher
        .iter()
        .filter(|w| w.contains_key(&2))
        .map(|w| {
            let total: i32 = w.values().sum();
            u32::try_from(w[&2] * 100 / total.max(1)).unwrap()
        })
        .collect();
    assert!(shares.contains(&25), "no 25 % step seen: {watcher:?}");
    assert!(shares.windows(2).all(|p| p[0] <= p[1]), "{watcher:?}");
    assert_eq!(shares.last(), Some(&100), "{watcher:?}");
    let last = aws.listener_weights();
    assert_eq!(
        last.iter()
            .filter(|(_, w)| **w > 0)
            .map(|(r, _)| *r)
            .collect::<Vec<_>>(),
        [2],
        "{last:?}"
    );
    let (desired, _) = aws.group(2).expect("the v2 Auto Scaling group");
    assert_eq!(desired, 2);
    // v1 stays warm for scale_down_delay.
    assert_eq!(aws.group(1).map(|g| g.0), Some(2));

    // A warm rollback: the weights go back to v1 in one switch.
    kiln(&p, &["rollback", "web", "--auto-approve"]).ok();
    assert!(
        wait_for(Duration::from_secs(30), || {
            let w = aws.listener_weights();
            w.iter()
                .filter(|(_, w)| **w > 0)
                .map(|(r, _)| *r)
                .collect::<Vec<_>>()
                == [1]
        }),
        "{:?}",
        aws.listener_weights()
    );

    // Drift: the v1 group resized by hand is reported, then set back by --remediate.
    let autoscaling = aws_sdk_autoscaling::Client::new(&aws.conf);
    let v1 = format!("kiln-{}-web-v1", aws.project);
    aws.rt.block_on(async {
        autoscaling
            .update_auto_scaling_group()
            .auto_scaling_group_name(&v1)
            .desired_capacity(4)
            .max_size(5)
            .send()
            .await
            .unwrap()
    });
    let drift = kiln(&p, &["drift", "--detailed-exitcode"]);
    assert_eq!(drift.code, 2, "{drift:?}");
    assert!(
        drift
            .stdout
            .contains(&format!("group {v1} desired capacity")),
        "{}",
        drift.stdout
    );
    kiln(&p, &["drift", "--remediate", "--auto-approve"]).ok();
    assert!(
        wait_for(Duration::from_secs(60), || {
            aws.group(1)
                .is_some_and(|(desired, members)| desired == 2 && members.len() == 2)
        }),
        "{:?}",
        aws.group(1)
    );
    // Only kiln's own instances are left in it.
    let running = aws.instances();
    assert_eq!(
        running.iter().filter(|(_, _, r)| r == "1").count(),
        2,
        "{running:?}"
    );
    assert!(
        wait_for(Duration::from_secs(30), || {
            kiln(&p, &["drift", "--detailed-exitcode"]).code == 0
        }),
        "{:?}",
        kiln(&p, &["drift"])
    );

    // Blue/green: v3 comes up at full size behind a preview rule while v1 keeps every
    // request, then `kiln rollout promote` moves everything in one switch.
    kiln(
        &p,
        &[
            "apply",
            "-var",
            "greeting=three",
            "-var",
            "strategy=blue_green",
            "--auto-approve",
            "--detach",
        ],
    )
    .ok();
    assert!(
        wait_for(Duration::from_secs(60), || {
            aws.preview_release() == Some(3) && aws.group(3).is_some_and(|(d, _)| d == 2)
        }),
        "preview {:?}, v3 group {:?}",
        aws.preview_release(),
        aws.group(3)
    );
    let before = aws.listener_weights();
    assert_eq!(
        before
            .iter()
            .filter(|(_, w)| **w > 0)
            .map(|(r, _)| *r)
            .collect::<Vec<_>>(),
        [1],
        "v1 serves everything during the preview: {before:?}"
    );
    let switch = std::thread::scope(|s| {
        let promote = s.spawn(|| kiln(&p, &["rollout", "promote", "web", "--auto-approve"]));
        let mut seen = vec![before.clone()];
        let done = wait_for(Duration::from_secs(60), || {
            let w = aws.listener_weights();
            if seen.last() != Some(&w) {
                seen.push(w.clone());
            }
            w.iter()
                .filter(|(_, w)| **w > 0)
                .map(|(r, _)| *r)
                .collect::<Vec<_>>()
                == [3]
        });
        promote.join().unwrap().ok();
        assert!(done, "{seen:?}");
        seen
    });
    // One switch: no state in between where both releases take requests.
    assert!(
        switch
            .iter()
            .all(|w| w.values().filter(|weight| **weight > 0).count() <= 1),
        "{switch:?}"
    );
    assert!(
        wait_for(Duration::from_secs(30), || aws.preview_release().is_none()),
        "the preview rule goes once v3 is promoted"
    );

    // Routing drift: the listener sent back to v1 by hand is found and set back.
    let serving = |w: &BTreeMap<u32, i32>| {
        w.iter()
            .filter(|(_, w)| **w > 0)
            .map(|(r, _)| *r)
            .collect::<Vec<_>>()
    };
    aws.set_weights_by_hand(&BTreeMap::from([(1, 1)]));
    assert_eq!(serving(&aws.listener_weights()), [1]);
    let mut found = None;
    assert!(
        wait_for(Duration::from_secs(30), || {
            let r = kiln(&p, &["drift", "--detailed-exitcode"]);
            let routing = r.code == 2 && r.stdout.contains("routing");
            found = Some(r);
            routing
        }),
        "{found:?}"
    );
    kiln(&p, &["drift", "--remediate", "--auto-approve"]).ok();
    assert!(
        wait_for(Duration::from_secs(30), || serving(&aws.listener_weights())
            == [3]),
        "{:?}",
        aws.listener_weights()
    );
}

impl Account {
    /// A versioned state bucket and a lock table; returns the `backend "s3"` block.
    fn backend(&self) -> String {
        let suffix = &testing::unique_id()[..8];
        let bucket = format!("kiln-state-{suffix}");
        let table = format!("kiln-locks-{suffix}");
        self.rt.block_on(async {
            testing::versioned_bucket(&self.conf, &bucket).await;
            testing::lock_table(&self.conf, &table).await;
        });
        format!(
            r#"
backend "s3" {{
  bucket         = "{bucket}"
  key            = "{project}/kiln.json"
  region         = "us-east-1"
  dynamodb_table = "{table}"
  endpoint_url   = "{moto}"
}}
"#,
            project = self.project,
            moto = testing::moto_url(),
        )
    }

    /// The state document in the backend and how many versions the bucket keeps of it.
    fn remote_state(&self, backend: &str) -> (serde_json::Value, usize) {
        let field = |name: &str| {
            backend
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
                })
                .unwrap()
        };
        let (bucket, key) = (field("bucket"), field("key"));
        let s3 = testing::s3_client(&self.conf);
        self.rt.block_on(async {
            let object = s3
                .get_object()
                .bucket(&bucket)
                .key(&key)
                .send()
                .await
                .unwrap();
            let body = object.body.collect().await.unwrap().into_bytes();
            let versions = s3
                .list_object_versions()
                .bucket(&bucket)
                .prefix(&key)
                .send()
                .await
                .unwrap();
            (
                serde_json::from_slice(&body).unwrap(),
                versions.versions().len(),
            )
        })
    }
}

/// The GREETING of each release in a state document, by release number.
fn greetings(doc: &serde_json::Value) -> Vec<(u64, String)> {
    doc["doc"]["services"]["web"]["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["number"].as_u64().unwrap(),
                r["env"]["GREETING"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn two_machines_share_the_state_in_s3_one_apply_at_a_time() {
    let aws = Account::new();
    let config = aws.config() + &aws.backend();
    let machine = || {
        let p = Project::new(&config);
        p.write("site/healthz", "ok\n");
        p.write("site/index.html", "hello\n");
        kiln(&p, &["bake"]).ok();
        p
    };
    let (a, b) = (machine(), machine());
    let env: Vec<(&str, &str)> = AWS_ENV
        .iter()
        .copied()
        .chain([("KILN_IDLE_EXIT", "5s")])
        .collect();

    // Both apply at once: the DynamoDB lock lets one server drive the project; the other
    // waits for it, starts from what the first wrote, and makes the next release.
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| {
            a.kiln_env(
                &["apply", "-var", "greeting=from-a", "--auto-approve"],
                &env,
            )
        });
        let tb = s.spawn(|| {
            b.kiln_env(
                &["apply", "-var", "greeting=from-b", "--auto-approve"],
                &env,
            )
        });
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let (ra, rb) = (ra.ok(), rb.ok());
    let log = |p: &Project| std::fs::read_to_string(p.path().join(".kiln/server.log")).unwrap();
    let waits =
        |p: &Project| log(p).contains("waiting up to 5m for the state lock held by kiln server");
    assert!(
        waits(&a) != waits(&b),
        "exactly one server waits:\n{}\n{}\n{ra:?}\n{rb:?}",
        log(&a),
        log(&b)
    );
    let (first, second) = if waits(&b) { (&a, &b) } else { (&b, &a) };

    let backend = config.split("backend").nth(1).unwrap().to_owned();
    let (state, versions) = aws.remote_state(&backend);
    let mut got = greetings(&state);
    got.sort();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2]);
    let mut names: Vec<&str> = got.iter().map(|(_, g)| g.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["from-a", "from-b"]);
    assert!(versions >= 3, "every version is kept: {versions}");
    // Two releases, one group each; the second machine's release took over all traffic.
    assert!(aws.group(1).is_some() && aws.group(2).is_some());

    // The state comes back to a machine with `kiln state migrate --to local` (the first
    // machine's server stopped once idle, so it may copy it; the second's keeps its old
    // release warm).
    assert!(
        wait_for(Duration::from_secs(30), || !first
            .path()
            .join(".kiln/kiln.sock")
            .exists()),
        "the first server stops once idle"
    );
    assert!(second.path().join(".kiln/kiln.sock").exists());
    // The second server holds the lock while it keeps v1 warm: the copy waits for it.
    let locked = kiln(first, &["state", "migrate", "--to", "local"]).fails();
    assert!(
        locked.stderr.contains("state is locked by server"),
        "{locked:?}"
    );
    kiln(second, &["down", "--auto-approve"]).ok();
    kiln(first, &["state", "migrate", "--to", "local"]).ok();
    let shown = kiln(first, &["state", "show"]).ok();
    let shown: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(
        shown["state"]["services"]["web"]["releases"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // A machine with another state is refused unless told to replace the team's (once
    // the server that holds the lease stopped).
    let c = Project::new(&config);
    let refused = kiln(
        &c,
        &["state", "migrate", "--to", "s3", "--lock-timeout", "60s"],
    )
    .fails();
    assert!(
        refused.stderr.contains("already holds a different state"),
        "{refused:?}"
    );
}
