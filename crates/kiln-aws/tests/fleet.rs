//! `Fleet` against a moto server (`$KILN_MOTO_URL`, started by `scripts/test.sh`). Every test
//! makes its own VPC, subnets, security group and project name, so tests run in parallel and
//! never reset the server. Results are checked through the SDK, not only through `Fleet`'s
//! own readers.
//!
//! moto quirks met here (moto 5.2):
//! - AttachInstances raises the group's desired capacity by one (as AWS does) and refuses to
//!   go above the max size; it also tags the instance `aws:autoscaling:groupName`.
//! - Suspended processes are recorded and reported, but not honoured: raising a group's
//!   desired capacity above its instance count makes moto launch instances even with
//!   `Launch` suspended (AWS would not). The tests never raise desired above the number of
//!   attached instances.
//! - Instances launched from a launch template get the template's instance tags merged with
//!   the request's, plus `aws:ec2launchtemplate:id` and `aws:ec2launchtemplate:version`, like
//!   on AWS. DescribeInstances has no launch template field: those tags are all there is.
//! - RunInstances answers `pending`, but DescribeInstances says `running` right after;
//!   TerminateInstances makes an instance `terminated` at once. Registered running targets
//!   are `healthy` at once (never `initial`).
//! - TerminateInstanceInAutoScalingGroup for an instance in no group fails with an HTTP 500
//!   (AWS answers a ValidationError); `Fleet::terminate` asks DescribeAutoScalingInstances
//!   first, so it never sends that.
//! - Force-deleting a group terminates its instances at once.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic on a broken moto setup"
)]

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::{InstanceStateName, ResourceType};
use aws_sdk_elasticloadbalancingv2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_elasticloadbalancingv2::operation::describe_target_groups::{
    DescribeTargetGroupsError, DescribeTargetGroupsOutput,
};
use aws_sdk_elasticloadbalancingv2::types::{Action, ActionTypeEnum, Rule};
use base64::Engine as _;
use kiln_aws::testing::{self, Network};
use kiln_aws::{
    AwsTarget, Error, Fleet, InstanceState, ReleaseResources, ReleaseSpec, RouteSpec, TargetHealth,
};

/// A fresh VPC with two subnets and a security group, an AMI moto knows, and the fleet of a
/// fresh project on them.
struct Env {
    ec2: aws_sdk_ec2::Client,
    asg: aws_sdk_autoscaling::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    project: String,
    vpc: String,
    subnets: Vec<String>,
    sg: String,
    ami: String,
    fleet: Fleet,
}

impl Env {
    async fn new() -> Self {
        let conf = testing::moto_conf().await;
        let project = format!("t{}", &testing::unique_id()[..10]);
        let Network {
            vpc,
            subnets,
            security_group: sg,
            ami,
        } = Network::create(&conf, &project).await;
        let target = AwsTarget {
            vpc_id: None,
            subnets: subnets.clone(),
            security_groups: vec![sg.clone()],
            instance_type: "t3.micro".into(),
            key_name: None,
            iam_instance_profile: None,
            tags: BTreeMap::from([
                ("team".to_owned(), "qa".to_owned()),
                // Reserved by AWS: left out.
                ("aws:nope".to_owned(), "x".to_owned()),
                // kiln's own tags win.
                ("kiln:project".to_owned(), "not-this".to_owned()),
            ]),
        };
        let fleet = Fleet::new(&conf, &project, target);
        Self {
            ec2: aws_sdk_ec2::Client::new(&conf),
            asg: aws_sdk_autoscaling::Client::new(&conf),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&conf),
            project,
            vpc,
            subnets,
            sg,
            ami,
            fleet,
        }
    }

    fn spec(&self, service: &str, release: u32) -> ReleaseSpec {
        ReleaseSpec {
            service: service.into(),
            release,
            ami: self.ami.clone(),
            port: 8080,
            health_path: "/healthz".into(),
            user_data: "#!/bin/sh\nexport DB_PASSWORD=hunter2\n".into(),
            max_size: 3,
            deployment_id: format!("d-{service}-{release}"),
            commit: Some("0123abc".into()),
        }
    }

    async fn group(&self, name: &str) -> Option<aws_sdk_autoscaling::types::AutoScalingGroup> {
        self.asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .unwrap()
            .auto_scaling_groups()
            .first()
            .cloned()
    }

    /// DescribeTargetGroups for the one target group `arn`.
    async fn target_groups(
        &self,
        arn: &str,
    ) -> Result<DescribeTargetGroupsOutput, SdkError<DescribeTargetGroupsError>> {
        self.elb
            .describe_target_groups()
            .target_group_arns(arn)
            .send()
            .await
    }

    /// The target health of a target group, as the fleet reads it.
    async fn health(&self, tg_arn: &str) -> BTreeMap<String, TargetHealth> {
        self.fleet.target_health(tg_arn).await.unwrap()
    }

    async fn lt_versions(&self, lt_id: &str) -> Vec<aws_sdk_ec2::types::LaunchTemplateVersion> {
        self.ec2
            .describe_launch_template_versions()
            .launch_template_id(lt_id)
            .send()
            .await
            .unwrap()
            .launch_template_versions()
            .to_vec()
    }

    async fn ec2_instance(&self, id: &str) -> aws_sdk_ec2::types::Instance {
        self.ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap()
            .reservations()[0]
            .instances()[0]
            .clone()
    }

    /// The non-default rules of a listener by priority.
    async fn rules(&self, listener: &str) -> BTreeMap<String, Rule> {
        self.elb
            .describe_rules()
            .listener_arn(listener)
            .send()
            .await
            .unwrap()
            .rules()
            .iter()
            .filter(|r| r.is_default() != Some(true))
            .map(|r| (r.priority().unwrap().to_owned(), r.clone()))
            .collect()
    }

    /// The listener's default action.
    async fn default_action(&self, listener: &str) -> Action {
        let out = self
            .elb
            .describe_listeners()
            .listener_arns(listener)
            .send()
            .await
            .unwrap();
        let actions = out.listeners()[0].default_actions();
        assert_eq!(actions.len(), 1, "{actions:?}");
        actions[0].clone()
    }
}

fn tags_ec2(tags: &[aws_sdk_ec2::types::Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
        .collect()
}

/// The weights of a forward action, sorted by ARN.
fn weights(action: &Action) -> Vec<(String, i32)> {
    assert_eq!(
        action.r#type(),
        Some(&ActionTypeEnum::Forward),
        "{action:?}"
    );
    let mut weights: Vec<(String, i32)> = action
        .forward_config()
        .unwrap()
        .target_groups()
        .iter()
        .map(|t| {
            (
                t.target_group_arn().unwrap().to_owned(),
                t.weight().unwrap(),
            )
        })
        .collect();
    weights.sort();
    weights
}

/// The path patterns and `X-Kiln-Preview` header values of a rule.
fn conditions(rule: &Rule) -> (BTreeSet<String>, Option<Vec<String>>) {
    let mut paths = BTreeSet::new();
    let mut header = None;
    for c in rule.conditions() {
        match c.field().unwrap() {
            "path-pattern" => paths.extend(c.path_pattern_config().unwrap().values().to_vec()),
            "http-header" => {
                let h = c.http_header_config().unwrap();
                assert_eq!(h.http_header_name(), Some("X-Kiln-Preview"));
                header = Some(h.values().to_vec());
            }
            other => panic!("unexpected condition {other}"),
        }
    }
    (paths, header)
}

fn route(prefix: &str, weights: &[(&str, u32)], preview: Option<&str>) -> RouteSpec {
    RouteSpec {
        path_prefix: prefix.into(),
        weights: weights.iter().map(|(a, w)| ((*a).to_owned(), *w)).collect(),
        preview: preview.map(str::to_owned),
    }
}

/// Routes with their weights sorted, to compare read-backs.
fn sorted(mut routes: Vec<RouteSpec>) -> Vec<RouteSpec> {
    for r in &mut routes {
        r.weights.sort();
    }
    routes
}

#[tokio::test]
async fn ensure_release_creates_a_release_once() {
    let env = Env::new().await;
    let spec = env.spec("web", 1);
    let debug = format!("{spec:?}");
    assert!(
        !debug.contains("hunter2") && debug.contains("user_data: \"<37 bytes>\""),
        "{debug}"
    );

    let rel = env.fleet.ensure_release(&spec).await.unwrap();
    assert_eq!(rel.launch_template_version, 1);
    assert_eq!(rel.asg_name, format!("kiln-{}-web-v1", env.project));

    // The launch template and its one version.
    let lt_name = format!("kiln-{}-web", env.project);
    let lts = env
        .ec2
        .describe_launch_templates()
        .launch_template_names(&lt_name)
        .send()
        .await
        .unwrap();
    let lt = &lts.launch_templates()[0];
    assert_eq!(
        lt.launch_template_id(),
        Some(rel.launch_template_id.as_str())
    );
    let lt_tags = tags_ec2(lt.tags());
    assert_eq!(lt_tags["kiln:project"], env.project);
    assert_eq!(lt_tags["kiln:managed-by"], "kiln");
    let versions = env.lt_versions(&rel.launch_template_id).await;
    assert_eq!(versions.len(), 1);
    let version = &versions[0];
    assert_eq!(version.version_number(), Some(1));
    assert_eq!(
        version.version_description(),
        Some("kiln release v1 deployment d-web-1")
    );
    let data = version.launch_template_data().unwrap();
    assert_eq!(data.image_id(), Some(env.ami.as_str()));
    assert_eq!(data.instance_type().map(|t| t.as_str()), Some("t3.micro"));
    assert_eq!(data.security_group_ids(), std::slice::from_ref(&env.sg));
    let user_data = base64::engine::general_purpose::STANDARD
        .decode(data.user_data().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(user_data).unwrap(), spec.user_data);
    let instance_tags = data
        .tag_specifications()
        .iter()
        .find(|t| t.resource_type() == Some(&ResourceType::Instance))
        .unwrap();
    let expected_tags = BTreeMap::from([
        ("kiln:project".to_owned(), env.project.clone()),
        ("kiln:service".to_owned(), "web".to_owned()),
        ("kiln:release".to_owned(), "1".to_owned()),
        ("kiln:deployment".to_owned(), "d-web-1".to_owned()),
        ("kiln:commit".to_owned(), "0123abc".to_owned()),
        ("kiln:managed-by".to_owned(), "kiln".to_owned()),
        ("team".to_owned(), "qa".to_owned()),
    ]);
    assert_eq!(tags_ec2(instance_tags.tags()), expected_tags);
    assert!(
        data.tag_specifications()
            .iter()
            .any(|t| t.resource_type() == Some(&ResourceType::Volume))
    );

    // The target group.
    let tgs = env.target_groups(&rel.target_group_arn).await.unwrap();
    let tg = &tgs.target_groups()[0];
    assert_eq!(
        tg.target_group_name(),
        Some(format!("k-{}-web-v1", env.project).as_str())
    );
    assert_eq!(
        (tg.port(), tg.vpc_id()),
        (Some(8080), Some(env.vpc.as_str()))
    );
    assert_eq!(tg.protocol().map(|p| p.as_str()), Some("HTTP"));
    assert_eq!(tg.health_check_path(), Some("/healthz"));
    assert_eq!(tg.target_type().map(|t| t.as_str()), Some("instance"));
    let attributes = env
        .elb
        .describe_target_group_attributes()
        .target_group_arn(&rel.target_group_arn)
        .send()
        .await
        .unwrap();
    assert!(
        attributes
            .attributes()
            .iter()
            .any(|a| a.key() == Some("deregistration_delay.timeout_seconds")
                && a.value() == Some("30")),
        "{attributes:?}"
    );
    let tg_tags: BTreeMap<String, String> = env
        .elb
        .describe_tags()
        .resource_arns(&rel.target_group_arn)
        .send()
        .await
        .unwrap()
        .tag_descriptions()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
        .collect();
    assert_eq!(tg_tags, expected_tags);

    // The group.
    let group = env.group(&rel.asg_name).await.unwrap();
    assert_eq!(
        (group.min_size(), group.max_size(), group.desired_capacity()),
        (Some(0), Some(3), Some(0))
    );
    assert_eq!(
        group.target_group_arns(),
        std::slice::from_ref(&rel.target_group_arn)
    );
    assert_eq!(group.health_check_type(), Some("ELB"));
    assert_eq!(
        group.vpc_zone_identifier(),
        Some(env.subnets.join(",").as_str())
    );
    let lt_spec = group.launch_template().unwrap();
    assert_eq!(
        (lt_spec.launch_template_id(), lt_spec.version()),
        (Some(rel.launch_template_id.as_str()), Some("1"))
    );
    let suspended: BTreeSet<&str> = group
        .suspended_processes()
        .iter()
        .filter_map(|p| p.process_name())
        .collect();
    assert_eq!(
        suspended,
        BTreeSet::from(["AZRebalance", "Launch", "ReplaceUnhealthy"])
    );
    let group_tags: BTreeMap<String, String> = group
        .tags()
        .iter()
        .map(|t| {
            assert_eq!(t.propagate_at_launch(), Some(false), "{t:?}");
            (t.key().unwrap().to_owned(), t.value().unwrap().to_owned())
        })
        .collect();
    assert_eq!(group_tags, expected_tags);

    // Again: the same resources, no new version.
    let again = env.fleet.ensure_release(&spec).await.unwrap();
    assert_eq!(again, rel);
    assert_eq!(env.lt_versions(&rel.launch_template_id).await.len(), 1);

    // The next release is a new version of the same template, with its own group and target
    // group.
    let rel2 = env.fleet.ensure_release(&env.spec("web", 2)).await.unwrap();
    assert_eq!(rel2.launch_template_id, rel.launch_template_id);
    assert_eq!(rel2.launch_template_version, 2);
    assert_ne!(rel2.target_group_arn, rel.target_group_arn);
    assert_eq!(rel2.asg_name, format!("kiln-{}-web-v2", env.project));
    assert_eq!(env.lt_versions(&rel.launch_template_id).await.len(), 2);
    assert_eq!(env.fleet.ensure_release(&spec).await.unwrap(), rel);
    assert_eq!(env.lt_versions(&rel.launch_template_id).await.len(), 2);

    // The state stores it as JSON.
    let json = serde_json::to_string(&rel).unwrap();
    assert_eq!(
        serde_json::from_str::<ReleaseResources>(&json).unwrap(),
        rel
    );
}

#[tokio::test]
async fn instances_are_launched_once_and_terminated() {
    let env = Env::new().await;
    let rel = env.fleet.ensure_release(&env.spec("web", 1)).await.unwrap();

    let a = env.fleet.launch(&rel, "web-1").await.unwrap();
    let b = env.fleet.launch(&rel, "web-2").await.unwrap();
    assert_ne!(a, b);
    for (id, kiln_id) in [(&a, "web-1"), (&b, "web-2")] {
        let instance = env.ec2_instance(id).await;
        assert_eq!(
            instance.state().and_then(|s| s.name()),
            Some(&InstanceStateName::Running)
        );
        assert_eq!(instance.image_id(), Some(env.ami.as_str()));
        assert!(
            env.subnets
                .iter()
                .any(|s| Some(s.as_str()) == instance.subnet_id())
        );
        let tags = tags_ec2(instance.tags());
        assert_eq!(tags["kiln:instance"], kiln_id);
        assert_eq!(tags["Name"], kiln_id);
        assert_eq!(tags["kiln:project"], env.project);
        assert_eq!(tags["kiln:release"], "1");
        assert_eq!(tags["team"], "qa");
        assert_eq!(tags["aws:ec2launchtemplate:id"], rel.launch_template_id);
        assert_eq!(tags["aws:ec2launchtemplate:version"], "1");
    }

    // In the group, which counts them, and registered in the target group.
    let group = env.group(&rel.asg_name).await.unwrap();
    assert_eq!(group.desired_capacity(), Some(2));
    let members: BTreeSet<&str> = group
        .instances()
        .iter()
        .filter_map(|i| i.instance_id())
        .collect();
    assert_eq!(members, BTreeSet::from([a.as_str(), b.as_str()]));
    let health = env
        .elb
        .describe_target_health()
        .target_group_arn(&rel.target_group_arn)
        .send()
        .await
        .unwrap();
    let registered: BTreeMap<&str, Option<i32>> = health
        .target_health_descriptions()
        .iter()
        .map(|d| {
            (
                d.target().unwrap().id().unwrap(),
                d.target().unwrap().port(),
            )
        })
        .collect();
    assert_eq!(
        registered,
        BTreeMap::from([(a.as_str(), Some(8080)), (b.as_str(), Some(8080))])
    );
    let by_fleet = env.health(&rel.target_group_arn).await;
    assert_eq!(
        by_fleet.keys().collect::<Vec<_>>(),
        BTreeSet::from([&a, &b]).into_iter().collect::<Vec<_>>()
    );
    assert!(
        by_fleet
            .values()
            .all(|h| matches!(h, TargetHealth::Healthy | TargetHealth::Initial)),
        "{by_fleet:?}"
    );

    // Launching web-1 again (say after a crash) finds its instance.
    assert_eq!(env.fleet.launch(&rel, "web-1").await.unwrap(), a);
    let group = env.group(&rel.asg_name).await.unwrap();
    assert_eq!(
        (group.desired_capacity(), group.instances().len()),
        (Some(2), 2)
    );
    let by_tag = aws_sdk_ec2::types::Filter::builder()
        .name("tag:kiln:project")
        .values(&env.project)
        .build();
    assert_eq!(testing::instances(&env.ec2, [by_tag]).await.len(), 2);

    // What the fleet reads back.
    let views = env.fleet.instances().await.unwrap();
    assert_eq!(views.len(), 2);
    for view in &views {
        assert_eq!(view.state, InstanceState::Running);
        assert_eq!(view.asg.as_deref(), Some(rel.asg_name.as_str()));
        assert_eq!(
            view.launch_template,
            Some((rel.launch_template_id.clone(), "1".to_owned()))
        );
        assert_eq!(view.image_id.as_deref(), Some(env.ami.as_str()));
        assert!(view.private_ip.is_some());
        assert_eq!(view.tags["kiln:service"], "web");
    }
    let view_a = env.fleet.instance(&a).await.unwrap().unwrap();
    assert_eq!(view_a.tags["kiln:instance"], "web-1");

    // Terminating one lowers the group's desired capacity; again is fine.
    env.fleet.terminate(&a).await.unwrap();
    let group = env.group(&rel.asg_name).await.unwrap();
    assert_eq!(group.desired_capacity(), Some(1));
    assert_eq!(group.instances().len(), 1);
    assert_eq!(group.instances()[0].instance_id(), Some(b.as_str()));
    let gone = env.ec2_instance(&a).await;
    assert_eq!(
        gone.state().and_then(|s| s.name()),
        Some(&InstanceStateName::Terminated)
    );
    env.fleet.terminate(&a).await.unwrap();
    env.fleet.terminate("i-0123456789abcdef0").await.unwrap();
    assert_eq!(
        env.group(&rel.asg_name).await.unwrap().desired_capacity(),
        Some(1)
    );
    assert_eq!(
        env.fleet
            .instances()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.instance_id)
            .collect::<Vec<_>>(),
        std::slice::from_ref(&b)
    );
    assert_eq!(
        env.fleet.instance(&a).await.unwrap().unwrap().state,
        InstanceState::Terminated
    );
    assert_eq!(
        env.fleet.instance("i-0123456789abcdef0").await.unwrap(),
        None
    );

    // A terminated kiln instance is launched anew.
    let a2 = env.fleet.launch(&rel, "web-1").await.unwrap();
    assert_ne!(a2, a);
    assert_eq!(
        env.group(&rel.asg_name).await.unwrap().desired_capacity(),
        Some(2)
    );

    // Register and deregister by hand.
    env.fleet
        .deregister(&rel.target_group_arn, &b)
        .await
        .unwrap();
    let health = env.health(&rel.target_group_arn).await;
    assert!(
        !matches!(health.get(&b), Some(TargetHealth::Healthy)),
        "{health:?}"
    );
    env.fleet
        .register(&rel.target_group_arn, &b, 8080)
        .await
        .unwrap();
    let health = env.health(&rel.target_group_arn).await;
    assert!(health.contains_key(&b), "{health:?}");
}

#[tokio::test]
async fn balancers_route_by_weight_path_and_preview() {
    let env = Env::new().await;
    let web1 = env.fleet.ensure_release(&env.spec("web", 1)).await.unwrap();
    let web2 = env.fleet.ensure_release(&env.spec("web", 2)).await.unwrap();
    let api1 = env.fleet.ensure_release(&env.spec("api", 1)).await.unwrap();
    let (t1, t2, t3) = (
        web1.target_group_arn.as_str(),
        web2.target_group_arn.as_str(),
        api1.target_group_arn.as_str(),
    );

    let bal = env.fleet.ensure_balancer("public", 80).await.unwrap();
    let lbs = env
        .elb
        .describe_load_balancers()
        .load_balancer_arns(&bal.arn)
        .send()
        .await
        .unwrap();
    let lb = &lbs.load_balancers()[0];
    assert_eq!(
        lb.load_balancer_name(),
        Some(format!("k-{}-public", env.project).as_str())
    );
    assert_eq!(lb.scheme().map(|s| s.as_str()), Some("internet-facing"));
    assert_eq!(lb.r#type().map(|t| t.as_str()), Some("application"));
    assert_eq!(lb.security_groups(), std::slice::from_ref(&env.sg));
    assert_eq!(lb.dns_name(), Some(bal.dns_name.as_str()));
    let listeners = env
        .elb
        .describe_listeners()
        .load_balancer_arn(&bal.arn)
        .send()
        .await
        .unwrap();
    assert_eq!(listeners.listeners().len(), 1);
    let listener = &listeners.listeners()[0];
    assert_eq!(listener.listener_arn(), Some(bal.listener_arn.as_str()));
    assert_eq!(listener.port(), Some(80));
    assert_eq!(listener.protocol().map(|p| p.as_str()), Some("HTTP"));
    let fixed = env.default_action(&bal.listener_arn).await;
    let config = fixed.fixed_response_config().unwrap();
    assert_eq!(
        (config.status_code(), config.message_body()),
        (Some("503"), Some("no release is serving"))
    );
    assert_eq!(env.fleet.routes(&bal).await.unwrap(), []);
    assert_eq!(env.fleet.ensure_balancer("public", 80).await.unwrap(), bal);

    // 90/10 between the two releases of web.
    let routes = [route("/", &[(t1, 90), (t2, 10)], None)];
    env.fleet.set_routes(&bal, &routes).await.unwrap();
    let action = env.default_action(&bal.listener_arn).await;
    let mut expected = vec![(t1.to_owned(), 90), (t2.to_owned(), 10)];
    expected.sort();
    assert_eq!(weights(&action), expected);
    assert!(env.rules(&bal.listener_arn).await.is_empty());
    assert_eq!(
        sorted(env.fleet.routes(&bal).await.unwrap()),
        sorted(routes.to_vec())
    );

    // 0/100: the default action changes, nothing else.
    let routes = [route("/", &[(t1, 0), (t2, 100)], None)];
    env.fleet.set_routes(&bal, &routes).await.unwrap();
    let mut expected = vec![(t1.to_owned(), 0), (t2.to_owned(), 100)];
    expected.sort();
    assert_eq!(
        weights(&env.default_action(&bal.listener_arn).await),
        expected
    );
    assert!(env.rules(&bal.listener_arn).await.is_empty());

    // A second route, and previews for both.
    let routes = [
        route("/", &[(t1, 0), (t2, 100)], Some(t1)),
        route("/api", &[(t3, 100)], Some(t2)),
    ];
    env.fleet.set_routes(&bal, &routes).await.unwrap();
    let rules = env.rules(&bal.listener_arn).await;
    assert_eq!(
        rules.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["10", "5", "50000"])
    );
    let api_paths = BTreeSet::from(["/api".to_owned(), "/api*".to_owned()]);
    assert_eq!(conditions(&rules["10"]), (api_paths.clone(), None));
    assert_eq!(weights(&rules["10"].actions()[0]), [(t3.to_owned(), 100)]);
    assert_eq!(
        conditions(&rules["5"]),
        (api_paths.clone(), Some(vec!["1".to_owned()]))
    );
    assert_eq!(weights(&rules["5"].actions()[0]), [(t2.to_owned(), 1)]);
    assert_eq!(
        conditions(&rules["50000"]),
        (
            BTreeSet::from(["/".to_owned(), "/*".to_owned()]),
            Some(vec!["1".to_owned()])
        )
    );
    assert_eq!(weights(&rules["50000"].actions()[0]), [(t1.to_owned(), 1)]);
    assert_eq!(
        sorted(env.fleet.routes(&bal).await.unwrap()),
        sorted(routes.to_vec())
    );

    // Setting the same routes again changes nothing; a weight change modifies the rule in
    // place (same ARN).
    env.fleet.set_routes(&bal, &routes).await.unwrap();
    assert_eq!(env.rules(&bal.listener_arn).await, rules);
    let routes = [
        route("/", &[(t1, 0), (t2, 100)], Some(t1)),
        route("/api", &[(t3, 50), (t1, 50)], Some(t2)),
    ];
    env.fleet.set_routes(&bal, &routes).await.unwrap();
    let changed = env.rules(&bal.listener_arn).await;
    assert_eq!(changed["10"].rule_arn(), rules["10"].rule_arn());
    let mut expected = vec![(t1.to_owned(), 50), (t3.to_owned(), 50)];
    expected.sort();
    assert_eq!(weights(&changed["10"].actions()[0]), expected);
    assert_eq!(changed["5"], rules["5"]);
    assert_eq!(changed["50000"], rules["50000"]);
    assert_eq!(
        sorted(env.fleet.routes(&bal).await.unwrap()),
        sorted(routes.to_vec())
    );

    // A release still routed to keeps its target group: AWS refuses to delete it.
    let in_use = env.fleet.delete_release("api", 1).await;
    assert!(
        matches!(
            &in_use,
            Err(Error::Aws {
                operation: "DeleteTargetGroup",
                ..
            })
        ),
        "{in_use:?}"
    );

    // Removing the route (and the previews) deletes their rules.
    let routes = [route("/", &[(t2, 100)], None)];
    env.fleet.set_routes(&bal, &routes).await.unwrap();
    assert!(env.rules(&bal.listener_arn).await.is_empty());
    assert_eq!(
        weights(&env.default_action(&bal.listener_arn).await),
        [(t2.to_owned(), 100)]
    );
    assert_eq!(env.fleet.routes(&bal).await.unwrap(), routes);
    // Now the release can go, its group having gone on the first try.
    env.fleet.delete_release("api", 1).await.unwrap();
    let gone = env.target_groups(t3).await.unwrap_err();
    assert_eq!(gone.code(), Some("TargetGroupNotFound"));

    // No routes: the fixed 503 again.
    env.fleet.set_routes(&bal, &[]).await.unwrap();
    let fixed = env.default_action(&bal.listener_arn).await;
    assert_eq!(
        fixed.fixed_response_config().unwrap().status_code(),
        Some("503")
    );
    assert_eq!(env.fleet.routes(&bal).await.unwrap(), []);

    // Routes the listener cannot express are refused before anything changes.
    let bad = env
        .fleet
        .set_routes(&bal, &[route("/", &[(t1, 1000)], None)])
        .await;
    assert!(matches!(bad, Err(Error::Fleet { .. })), "{bad:?}");
}

#[tokio::test]
async fn groups_show_capacity_and_releases_are_deleted() {
    let env = Env::new().await;
    let rel = env
        .fleet
        .ensure_release(&env.spec("worker", 1))
        .await
        .unwrap();
    let instance = env.fleet.launch(&rel, "worker-1").await.unwrap();

    // Desired stays at the one attached instance: moto would launch more (see the top).
    env.fleet
        .set_capacity(&rel.asg_name, 1, 5, 1)
        .await
        .unwrap();
    let group = env.group(&rel.asg_name).await.unwrap();
    assert_eq!(
        (group.min_size(), group.max_size(), group.desired_capacity()),
        (Some(1), Some(5), Some(1))
    );
    let groups = env.fleet.groups().await.unwrap();
    assert_eq!(groups.len(), 1, "{groups:?}");
    let view = &groups[0];
    assert_eq!(view.name, rel.asg_name);
    assert_eq!(
        (view.service.as_deref(), view.release),
        (Some("worker"), Some(1))
    );
    assert_eq!((view.min, view.max, view.desired), (1, 5, 1));
    assert_eq!(view.instances, std::slice::from_ref(&instance));
    assert_eq!(
        view.target_groups,
        std::slice::from_ref(&rel.target_group_arn)
    );
    assert_eq!(
        view.suspended
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["AZRebalance", "Launch", "ReplaceUnhealthy"])
    );
    assert_eq!(
        view.launch_template,
        Some((rel.launch_template_id.clone(), "1".to_owned()))
    );
    assert_eq!(view.tags["kiln:deployment"], "d-worker-1");

    // Deleting the release removes its group (and instances) and target group, not its
    // launch template version.
    env.fleet.delete_release("worker", 1).await.unwrap();
    assert!(env.group(&rel.asg_name).await.is_none());
    let gone = env.target_groups(&rel.target_group_arn).await.unwrap_err();
    assert_eq!(gone.code(), Some("TargetGroupNotFound"));
    let versions = env.lt_versions(&rel.launch_template_id).await;
    assert_eq!(versions.len(), 1);
    assert_eq!(
        versions[0].version_description(),
        Some("kiln release v1 deployment d-worker-1")
    );
    assert_eq!(
        env.ec2_instance(&instance)
            .await
            .state()
            .and_then(|s| s.name()),
        Some(&InstanceStateName::Terminated)
    );
    assert_eq!(env.fleet.groups().await.unwrap(), []);
    assert_eq!(env.fleet.instances().await.unwrap(), []);

    // Again, and for a release that never existed: nothing to do.
    env.fleet.delete_release("worker", 1).await.unwrap();
    env.fleet.delete_release("worker", 9).await.unwrap();

    // A rollback re-creates the release from the kept version.
    let again = env
        .fleet
        .ensure_release(&env.spec("worker", 1))
        .await
        .unwrap();
    assert_eq!(
        (
            again.launch_template_id.as_str(),
            again.launch_template_version
        ),
        (rel.launch_template_id.as_str(), 1)
    );
    assert_eq!(env.lt_versions(&rel.launch_template_id).await.len(), 1);
    assert!(env.group(&again.asg_name).await.is_some());
}
