//! kiln's servers on AWS: launch templates, Auto Scaling groups, instances, target groups and
//! application load balancers, managed through a [`Fleet`].

mod balancer;
mod instances;
mod names;
mod release;

pub use release::SUSPENDED_PROCESSES;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::error::aws;
use crate::{Error, Result};

/// The project a resource belongs to.
pub const TAG_PROJECT: &str = "kiln:project";
/// The service a resource belongs to.
pub const TAG_SERVICE: &str = "kiln:service";
/// The release number of a resource, in decimal.
pub const TAG_RELEASE: &str = "kiln:release";
/// The deployment that created a resource.
pub const TAG_DEPLOYMENT: &str = "kiln:deployment";
/// The commit a release was built from, when known.
pub const TAG_COMMIT: &str = "kiln:commit";
/// Always [`MANAGED_BY`]: marks what kiln created.
pub const TAG_MANAGED_BY: &str = "kiln:managed-by";
/// kiln's id of an instance (instances only).
pub const TAG_INSTANCE: &str = "kiln:instance";
/// The kiln balancer a load balancer serves (load balancers and listeners only).
pub const TAG_BALANCER: &str = "kiln:balancer";
/// The value of [`TAG_MANAGED_BY`].
pub const MANAGED_BY: &str = "kiln";
/// The request header that selects a route's preview release when its value is `1`.
pub const PREVIEW_HEADER: &str = "X-Kiln-Preview";

/// The launch template AWS records on an instance launched from one.
const TAG_AWS_LAUNCH_TEMPLATE_ID: &str = "aws:ec2launchtemplate:id";
/// The launch template version AWS records on an instance launched from one.
const TAG_AWS_LAUNCH_TEMPLATE_VERSION: &str = "aws:ec2launchtemplate:version";

/// How long [`Fleet::launch`] waits between two looks at a starting instance, by default.
const START_POLL: Duration = Duration::from_secs(5);
/// How many times [`Fleet::launch`] looks at a starting instance, by default (5 minutes).
const START_POLLS: u32 = 60;

/// Where and how a project's servers run on AWS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsTarget {
    /// The VPC; when `None`, the VPC of the first subnet.
    pub vpc_id: Option<String>,
    /// The subnets instances and load balancers are placed in (load balancers need two
    /// availability zones).
    pub subnets: Vec<String>,
    /// The security groups of instances and load balancers.
    pub security_groups: Vec<String>,
    /// The EC2 instance type, e.g. `t3.small`.
    pub instance_type: String,
    /// The EC2 key pair instances accept for SSH, if any.
    pub key_name: Option<String>,
    /// The IAM instance profile of instances, by name or ARN (`arn:…`).
    pub iam_instance_profile: Option<String>,
    /// Extra tags for every resource kiln creates. kiln's own tags win over them, and keys
    /// starting with `aws:` (reserved by AWS) are left out.
    pub tags: BTreeMap<String, String>,
}

/// One release of a service, as the engine wants it on AWS.
#[derive(Clone, PartialEq, Eq)]
pub struct ReleaseSpec {
    /// The service, e.g. `web`.
    pub service: String,
    /// The release number.
    pub release: u32,
    /// The AMI its instances boot.
    pub ami: String,
    /// The port its instances serve HTTP on.
    pub port: u16,
    /// The path the load balancer checks health on, e.g. `/healthz`.
    pub health_path: String,
    /// The instances' user data, as text (it is base64-encoded here). It may carry secrets, so
    /// `Debug` shows only its length.
    pub user_data: String,
    /// The most instances the release's group may hold.
    pub max_size: u32,
    /// The deployment creating it.
    pub deployment_id: String,
    /// The commit it was built from, when known.
    pub commit: Option<String>,
}

impl fmt::Debug for ReleaseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseSpec")
            .field("service", &self.service)
            .field("release", &self.release)
            .field("ami", &self.ami)
            .field("port", &self.port)
            .field("health_path", &self.health_path)
            .field(
                "user_data",
                &format_args!("\"<{} bytes>\"", self.user_data.len()),
            )
            .field("max_size", &self.max_size)
            .field("deployment_id", &self.deployment_id)
            .field("commit", &self.commit)
            .finish()
    }
}

/// The AWS resources of one release, as [`Fleet::ensure_release`] made or found them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResources {
    /// The service's launch template.
    pub launch_template_id: String,
    /// The release's version of it.
    pub launch_template_version: i64,
    /// The release's target group.
    pub target_group_arn: String,
    /// The release's Auto Scaling group.
    pub asg_name: String,
}

/// The state of an EC2 instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    /// Starting.
    Pending,
    /// Running.
    Running,
    /// Stopping.
    Stopping,
    /// Stopped.
    Stopped,
    /// Terminating.
    ShuttingDown,
    /// Gone.
    Terminated,
    /// A state this version of kiln does not know.
    Other(String),
}

impl InstanceState {
    fn from_ec2(state: Option<&aws_sdk_ec2::types::InstanceState>) -> Self {
        use aws_sdk_ec2::types::InstanceStateName as Name;
        match state.and_then(|s| s.name()) {
            Some(Name::Pending) => Self::Pending,
            Some(Name::Running) => Self::Running,
            Some(Name::Stopping) => Self::Stopping,
            Some(Name::Stopped) => Self::Stopped,
            Some(Name::ShuttingDown) => Self::ShuttingDown,
            Some(Name::Terminated) => Self::Terminated,
            Some(other) => Self::Other(other.as_str().to_owned()),
            None => Self::Other(String::new()),
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::ShuttingDown => "shutting-down",
            Self::Terminated => "terminated",
            Self::Other(state) => state,
        })
    }
}

/// An EC2 instance, as AWS reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    /// The EC2 instance id.
    pub instance_id: String,
    /// Its state.
    pub state: InstanceState,
    /// The AMI it booted.
    pub image_id: Option<String>,
    /// The launch template id and version it was launched from.
    pub launch_template: Option<(String, String)>,
    /// The Auto Scaling group it is in, as the group reports it.
    pub asg: Option<String>,
    /// Its private IP address.
    pub private_ip: Option<String>,
    /// All its tags.
    pub tags: BTreeMap<String, String>,
}

/// An Auto Scaling group of the project, as AWS reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// The group's name.
    pub name: String,
    /// Its [`TAG_SERVICE`].
    pub service: Option<String>,
    /// Its [`TAG_RELEASE`].
    pub release: Option<u32>,
    /// Minimum size.
    pub min: i32,
    /// Maximum size.
    pub max: i32,
    /// Desired capacity.
    pub desired: i32,
    /// The EC2 ids of its instances.
    pub instances: Vec<String>,
    /// Its target groups' ARNs.
    pub target_groups: Vec<String>,
    /// Its suspended processes, e.g. `Launch`.
    pub suspended: Vec<String>,
    /// Its launch template id and version.
    pub launch_template: Option<(String, String)>,
    /// All its tags.
    pub tags: BTreeMap<String, String>,
}

/// An application load balancer and its HTTP listener, as [`Fleet::ensure_balancer`] made or
/// found them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balancer {
    /// The load balancer's ARN.
    pub arn: String,
    /// Its public DNS name.
    pub dns_name: String,
    /// Its HTTP listener's ARN.
    pub listener_arn: String,
}

/// Where a balancer sends the requests under a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    /// The path prefix, e.g. `/api`; `/` is the listener's default.
    pub path_prefix: String,
    /// Target group ARNs and their weights (0 to 999). When no weight is above 0 the route
    /// answers 503 "no release is serving".
    pub weights: Vec<(String, u32)>,
    /// The target group that requests with the header `X-Kiln-Preview: 1` go to.
    pub preview: Option<String>,
}

/// The health of a target in a target group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHealth {
    /// Registered, its first health checks still running.
    Initial,
    /// Passing its health checks.
    Healthy,
    /// Failing its health checks, with AWS's description of why.
    Unhealthy(String),
    /// Being deregistered.
    Draining,
    /// Not receiving traffic: not registered, or the target group is not used by a listener.
    Unused,
    /// Another state, e.g. `unavailable`.
    Other(String),
}

/// A project's servers on AWS: launch templates, Auto Scaling groups, instances, target
/// groups and application load balancers.
///
/// kiln's engine decides everything (which instance to start or stop, how traffic is
/// weighted); a `Fleet` carries those decisions out and reads back what really exists, for
/// health and drift checks. Every call is idempotent: after a crash it can simply be repeated.
///
/// - **Release.** A service's release is one version of the service's launch template (found
///   again by its description, `kiln release v{N} deployment {id}`), one target group and one
///   Auto Scaling group. The group launches and replaces nothing itself (`Launch`,
///   `ReplaceUnhealthy` and `AZRebalance` are suspended): it groups the release's instances,
///   ties them to its target group and holds the min/desired/max that drift checks compare.
/// - **Instances.** [`Fleet::launch`] starts one instance from the release's launch template
///   version, tagged with kiln's instance id, and attaches it to the release's group;
///   [`Fleet::terminate`] takes it out and lowers the group's desired capacity.
/// - **Traffic.** A balancer is an internet-facing application load balancer with one HTTP
///   listener; [`Fleet::set_routes`] makes the listener's default action and rules match the
///   engine's weighted routes exactly.
///
/// Everything kiln creates carries the tags [`TAG_PROJECT`], [`TAG_SERVICE`], [`TAG_RELEASE`],
/// [`TAG_DEPLOYMENT`], [`TAG_COMMIT`] (when known) and [`TAG_MANAGED_BY`], plus the target's
/// own tags ([`AwsTarget::tags`]); instances also carry [`TAG_INSTANCE`] and `Name`, both
/// kiln's instance id, and load balancers [`TAG_BALANCER`]. Load balancers and listeners carry
/// no service or release tags.
#[derive(Debug, Clone)]
pub struct Fleet {
    ec2: aws_sdk_ec2::Client,
    autoscaling: aws_sdk_autoscaling::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    project: String,
    target: AwsTarget,
    /// The target's VPC, looked up once.
    vpc_id: OnceCell<String>,
    start_poll: Duration,
    start_polls: u32,
}

impl Fleet {
    /// The fleet of `project` on `target`. Nothing is called until the first operation.
    pub fn new(conf: &SdkConfig, project: &str, target: AwsTarget) -> Self {
        Self {
            ec2: aws_sdk_ec2::Client::new(conf),
            autoscaling: aws_sdk_autoscaling::Client::new(conf),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(conf),
            project: project.to_owned(),
            vpc_id: target
                .vpc_id
                .clone()
                .map(OnceCell::from)
                .unwrap_or_default(),
            target,
            start_poll: START_POLL,
            start_polls: START_POLLS,
        }
    }

    /// How [`Fleet::launch`] waits for a new instance to run: it looks `polls` times, `poll`
    /// apart (by default every 5 seconds for 5 minutes).
    #[must_use]
    pub fn with_start_wait(mut self, poll: Duration, polls: u32) -> Self {
        self.start_poll = poll;
        self.start_polls = polls.max(1);
        self
    }

    /// The project.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The target.
    pub fn target(&self) -> &AwsTarget {
        &self.target
    }

    /// The name of `service`'s launch template.
    pub fn launch_template_name(&self, service: &str) -> String {
        names::launch_template(&self.project, service)
    }

    /// The name of the Auto Scaling group of `service`'s release `release`.
    pub fn asg_name(&self, service: &str, release: u32) -> String {
        names::auto_scaling_group(&self.project, service, release)
    }

    /// The name of the target group of `service`'s release `release`.
    pub fn target_group_name(&self, service: &str, release: u32) -> String {
        names::target_group(&self.project, service, release)
    }

    /// The name of the load balancer of `balancer`.
    pub fn load_balancer_name(&self, balancer: &str) -> String {
        names::load_balancer(&self.project, balancer)
    }

    /// The target's VPC: [`AwsTarget::vpc_id`], or the VPC of its first subnet.
    pub async fn vpc_id(&self) -> Result<String> {
        self.vpc_id
            .get_or_try_init(|| async {
                let subnet = self.first_subnet()?;
                let what = format!("subnet {subnet}");
                let out = self
                    .ec2
                    .describe_subnets()
                    .subnet_ids(subnet)
                    .send()
                    .await
                    .map_err(|err| aws("EC2", "DescribeSubnets", &what, &err))?;
                out.subnets()
                    .first()
                    .and_then(|s| s.vpc_id())
                    .map(str::to_owned)
                    .ok_or_else(|| Error::Fleet {
                        what,
                        detail: "AWS reports no VPC for it; check the target's subnets".into(),
                    })
            })
            .await
            .cloned()
    }

    /// The first of the target's subnets.
    fn first_subnet(&self) -> Result<&str> {
        self.target
            .subnets
            .first()
            .map(String::as_str)
            .ok_or_else(|| Error::Fleet {
                what: format!("target of project {}", self.project),
                detail: "it names no subnets; list at least one (two in distinct availability zones for load balancers)".into(),
            })
    }

    /// The tags of every resource kiln creates for `spec`: the target's, then kiln's.
    fn release_tags(&self, spec: &ReleaseSpec) -> BTreeMap<String, String> {
        let mut tags = self.base_tags();
        tags.insert(TAG_SERVICE.into(), spec.service.clone());
        tags.insert(TAG_RELEASE.into(), spec.release.to_string());
        tags.insert(TAG_DEPLOYMENT.into(), spec.deployment_id.clone());
        if let Some(commit) = &spec.commit {
            tags.insert(TAG_COMMIT.into(), commit.clone());
        }
        tags
    }

    /// The target's tags plus [`TAG_PROJECT`] and [`TAG_MANAGED_BY`].
    fn base_tags(&self) -> BTreeMap<String, String> {
        let mut tags: BTreeMap<String, String> = self
            .target
            .tags
            .iter()
            .filter(|(key, _)| !key.starts_with("aws:"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tags.insert(TAG_PROJECT.into(), self.project.clone());
        tags.insert(TAG_MANAGED_BY.into(), MANAGED_BY.into());
        tags
    }
}

/// Whether an SDK error is one of the service error `codes`.
fn has_code<E: ProvideErrorMetadata>(err: &E, codes: &[&str]) -> bool {
    err.code().is_some_and(|code| codes.contains(&code))
}

/// Whether an SDK error's message says something was not found (the Auto Scaling API reports
/// missing groups and instances as a `ValidationError` saying so).
fn says_not_found<E: ProvideErrorMetadata>(err: &E) -> bool {
    err.code() == Some("ValidationError")
        && err
            .message()
            .is_some_and(|m| m.to_ascii_lowercase().contains("not found"))
}

/// An [`Error::Damaged`] for an AWS response without a field kiln needs.
fn missing(service: &str, operation: &str, field: &str) -> Error {
    Error::Damaged {
        what: format!("the {service} {operation} response"),
        detail: format!("it has no {field}"),
    }
}
