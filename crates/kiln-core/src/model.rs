//! The typed model a `kiln.hcl` evaluates to.
//!
//! Everything here is plain data: values are already evaluated (variables substituted, durations
//! parsed), references between blocks are names that [`crate::config::load`] has checked exist,
//! and paths are kept exactly as written, relative to the directory of the config file.
//! Locations ([`Loc`]) are kept where a later stage (bake, deploy) may need to point an error at
//! the config line.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::diag::Loc;

/// A whole evaluated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The project name; namespaces state, tags and resources.
    pub project: String,
    /// Every declared variable with the value it finally took.
    pub variables: BTreeMap<String, Variable>,
    /// Images by name.
    pub images: BTreeMap<String, Image>,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Balancers by name.
    pub balancers: BTreeMap<String, Balancer>,
    /// Top-level `notify` blocks: webhooks that receive the events of every service.
    #[serde(default)]
    pub notify: Vec<Notify>,
    /// How the server watches for drift (the top-level `drift` block).
    #[serde(default)]
    pub drift: DriftSettings,
    /// Where this config deploys (the `environment` block).
    #[serde(default)]
    pub environment: Environment,
    /// Policy sets (`policy "NAME"` blocks; `policy "builtin"` configures the built-in pack).
    #[serde(default)]
    pub policies: Vec<PolicySetConfig>,
    /// The built-in policy pack's settings (`policy "builtin"`).
    #[serde(default)]
    pub builtin_policy: BuiltinPolicyConfig,
    /// The `target "aws"` block, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsTarget>,
    /// The `backend` block; `None` keeps the state in SQLite under `.kiln/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
}

impl Config {
    /// The target every service runs on (the config allows one per project): the local
    /// runtime unless a service names `target.aws`.
    pub fn target(&self) -> TargetKind {
        self.services
            .values()
            .map(|s| s.target)
            .max()
            .unwrap_or_default()
    }
}

/// The environment a config deploys to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    /// Its name (`prod`), given to policies.
    pub name: String,
    /// A protected environment applies only saved plans approved with `kiln approve`, and the
    /// built-in policies are enforced there by default.
    pub protected: bool,
}

impl Default for Environment {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            protected: false,
        }
    }
}

/// How a policy set is enforced (Sentinel's levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Results are shown; nothing is blocked.
    Advisory,
    /// A denial blocks unless overridden with `kiln apply --override-policy "reason"`, which is
    /// recorded in the audit log.
    SoftMandatory,
    /// A denial blocks.
    HardMandatory,
}

/// A `policy "NAME"` block: a directory of Rego policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySetConfig {
    /// The set's name.
    pub name: String,
    /// The directory, relative to the config.
    pub dir: String,
    /// How it is enforced (default hard_mandatory).
    pub enforcement: Enforcement,
}

/// The `policy "builtin"` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltinPolicyConfig {
    /// How it is enforced; default advisory, or soft_mandatory in a protected environment.
    pub enforcement: Option<Enforcement>,
    /// Check ids that do not run.
    pub disable: Vec<String>,
    /// The oldest image a new release may ship.
    #[serde(with = "humantime_serde")]
    pub max_image_age: Duration,
}

impl Default for BuiltinPolicyConfig {
    fn default() -> Self {
        Self {
            enforcement: None,
            disable: Vec::new(),
            max_image_age: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// Where a service's instances run and where an image is published: kiln's local runtime
/// (the default) or the `target "aws"` block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// Sandboxed processes on this machine behind kiln's proxy.
    #[default]
    Local,
    /// EC2 instances in Auto Scaling groups behind an application load balancer.
    Aws,
}

impl TargetKind {
    /// Whether this is the local runtime.
    pub fn is_local(&self) -> bool {
        *self == Self::Local
    }

    /// The name used in config references (`target.aws`) and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Aws => "aws",
        }
    }
}

/// The `target "aws"` block: where and how instances and AMIs are made on AWS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwsTarget {
    /// The region, e.g. `eu-west-1`.
    pub region: String,
    /// Another endpoint for every AWS service (an emulator such as moto); `None` for AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// The VPC; taken from the first subnet when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    /// Subnets for instances and the load balancers (at least one; two zones for an ALB).
    pub subnets: Vec<String>,
    /// Security groups of instances and load balancers.
    pub security_groups: Vec<String>,
    /// The instance type of service instances, e.g. `t3.small`.
    pub instance_type: String,
    /// An EC2 key pair for SSH; `None` (the default) launches instances without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// The IAM instance profile of instances and AMI builders (it must allow SSM and reading
    /// the artifact bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// The S3 bucket that image archives are uploaded to for AMI builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_bucket: Option<String>,
    /// What AMIs are built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ami: Option<SourceAmi>,
    /// The instance type of AMI builders; `instance_type` when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_instance_type: Option<String>,
    /// Tags added to everything kiln creates (keys starting `kiln:` or `aws:` are reserved).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// The AMI an AWS image build starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceAmi {
    /// `source_ami = "ami-…"`.
    Id {
        /// The AMI id.
        id: String,
    },
    /// `source_ami_filter { … }`, as Packer's.
    Filter {
        /// DescribeImages filters, e.g. `name = "debian-12-amd64-*"`.
        filters: BTreeMap<String, Vec<String>>,
        /// Owner account ids or aliases (`amazon`, `self`).
        owners: Vec<String>,
        /// Take the newest match; without it, several matches are an error.
        most_recent: bool,
    },
}

/// Where the state is kept (the `backend` block); the default is SQLite in `.kiln/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backend {
    /// `backend "s3"`: the state in a versioned S3 bucket, the lock in DynamoDB.
    S3(S3Backend),
}

/// The `backend "s3"` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Backend {
    /// The versioned bucket.
    pub bucket: String,
    /// The state object's key.
    pub key: String,
    /// The bucket's region.
    pub region: String,
    /// The DynamoDB table holding the lock (string partition key `LockID`).
    pub dynamodb_table: String,
    /// Another endpoint (an emulator); `None` for AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

/// Continuous drift detection in `kiln server` (the `drift` block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftSettings {
    /// How often every check runs (`0s`: never on a timer).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Replace what drifted without asking (through the same plan `kiln drift --remediate`
    /// makes).
    pub auto_remediate: bool,
    /// Watch image roots for changes (inotify) and check at once when one changes.
    pub watch: bool,
    /// Every this many timed checks, hash every file again (the others trust files whose size,
    /// times and inode did not change since their last hash).
    pub full_every: u32,
}

impl Default for DriftSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            auto_remediate: false,
            watch: true,
            full_every: 10,
        }
    }
}

/// A declared input variable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variable {
    /// The value after overrides (`-var`, then `KILN_VAR_name`, then the default).
    pub value: serde_json::Value,
    /// Where the value came from.
    pub source: VarSource,
    /// Sensitive values are never printed.
    pub sensitive: bool,
    /// Where the variable is declared.
    pub loc: Loc,
}

/// Where a variable's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VarSource {
    /// The `default` in the `variable` block.
    Default,
    /// A `-var name=value` flag.
    Flag,
    /// A `KILN_VAR_name` environment variable.
    Env,
}

/// One variable override given outside the config: by the CLI from `-var` flags and
/// `KILN_VAR_*` environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarOverride {
    /// The variable's name.
    pub name: String,
    /// The raw text; converted to the variable's type (string, number, bool, or an HCL
    /// expression for lists and objects).
    pub value: String,
    /// Flag or environment (flags win).
    pub source: VarSource,
}

/// An image to bake.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Image {
    /// The image's name (the block label).
    pub name: String,
    /// What the image starts from.
    pub base: Base,
    /// Where `base` is written (for errors about it).
    pub base_loc: Loc,
    /// Steps, in order; each becomes one layer.
    pub provisioners: Vec<Provisioner>,
    /// How an instance of the image runs.
    pub run: RunConfig,
    /// Where else the image is published: `target.aws` also makes an AMI of it. Not part of
    /// the image's content, so it changes no digest.
    #[serde(skip)]
    pub target: TargetKind,
    /// Where the block starts.
    pub loc: Loc,
}

/// What an image starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Base {
    /// An empty root.
    Scratch,
    /// Another image of the same config, by name.
    Image {
        /// The image's name.
        name: String,
    },
    /// A tar archive (plain, gzip or zstd), relative to the config directory.
    Tar {
        /// The archive's path.
        path: String,
    },
    /// A directory, relative to the config directory.
    Dir {
        /// The directory's path.
        path: String,
    },
    /// An OCI image layout directory and optionally a tag in it.
    Oci {
        /// The layout directory.
        path: String,
        /// The `org.opencontainers.image.ref.name` to pick; the only image when absent.
        tag: Option<String>,
    },
}

/// One provisioner step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Provisioner {
    /// What the step does; this is what the step cache key hashes.
    pub step: Step,
    /// Where the `provisioner` block starts.
    #[serde(skip)]
    pub loc: Loc,
}

/// The definition of a provisioner step. Serialized into the step's cache key, so it holds only
/// what changes the step's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Step {
    /// Copy a file or directory from the build context into the image.
    File(FileStep),
    /// Run a shell script inside the image root, sandboxed.
    Shell(ShellStep),
}

/// `provisioner "file"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileStep {
    /// A file or directory, relative to the config directory.
    pub source: String,
    /// Where `source` is written (for "no such file" errors).
    #[serde(skip)]
    pub source_loc: Loc,
    /// The absolute path in the image. A directory source is copied to this path; a file source
    /// becomes this file, or goes inside it when it ends with `/`.
    pub destination: String,
    /// Permission bits for every copied file (`"0755"`); the source's bits when absent.
    pub mode: Option<u32>,
    /// Owner of every copied entry; root when absent.
    pub owner: Option<Owner>,
}

/// A numeric owner, written `"uid:gid"` or `"uid"` (gid = uid) in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// `provisioner "shell"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShellStep {
    /// The commands to run.
    pub script: Script,
    /// Extra environment for the script.
    pub environment: BTreeMap<String, String>,
    /// Whether the sandbox shares the host network (off by default).
    pub network: bool,
}

/// Where a shell step's commands come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Script {
    /// `inline = [...]`: run in order by `/bin/sh -e`.
    Inline(Vec<String>),
    /// `script = "path"`: a file relative to the config directory, copied into the sandbox.
    File {
        /// The script's path.
        path: String,
        /// Where `script` is written (for "no such file" errors).
        #[serde(skip)]
        loc: Loc,
    },
}

/// How an instance runs; the OCI image config. Unset fields inherit from the base image.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct RunConfig {
    /// `entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `cmd`: arguments to the entrypoint.
    pub cmd: Option<Vec<String>>,
    /// `env`, merged over the base image's.
    pub env: BTreeMap<String, String>,
    /// `workdir`.
    pub workdir: Option<String>,
    /// `user`, as `uid[:gid]` or a name in the image.
    pub user: Option<String>,
    /// `ports` the app listens on.
    pub ports: Vec<u16>,
    /// `labels`, merged over the base image's.
    pub labels: BTreeMap<String, String>,
}

/// A named set of identical instances serving one port.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    /// The service's name.
    pub name: String,
    /// The image, by name.
    pub image: String,
    /// How many instances.
    pub instances: u32,
    /// The port the app listens on inside the instance.
    pub port: u16,
    /// Environment for instances.
    pub env: BTreeMap<String, String>,
    /// Health check; instances without one count as healthy once started.
    pub health: Option<Health>,
    /// How new releases replace old ones.
    pub rollout: Rollout,
    /// The service's own `notify` blocks (the top-level ones apply as well).
    #[serde(default)]
    pub notify: Vec<Notify>,
    /// Where its instances run.
    #[serde(default, skip_serializing_if = "TargetKind::is_local")]
    pub target: TargetKind,
    /// Where the block starts.
    pub loc: Loc,
}

/// A `notify` block: where rollout events are posted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// An `http://` URL that receives each event as a JSON `POST`.
    pub webhook: String,
}

/// An HTTP health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Path requested (`/healthz`).
    pub path: String,
    /// Time between checks.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long one check may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passes before an instance is healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures before an instance is unhealthy.
    pub unhealthy_threshold: u32,
}

/// Rollout strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Replace instances in batches of `max_parallel`.
    Rolling,
    /// Bring up the new release at full size, then switch all traffic at once.
    BlueGreen,
    /// Shift traffic to the new release in weighted steps.
    Canary,
}

/// The `rollout` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Strategy (default `rolling`).
    pub strategy: Strategy,
    /// Canary steps.
    pub steps: Vec<CanaryStep>,
    /// Automated analysis.
    pub analysis: Option<Analysis>,
    /// Roll back by itself on failure (default true).
    pub auto_rollback: bool,
    /// Promote blue/green by itself once analysis passes (default false).
    pub auto_promote: bool,
    /// How long the old release stays warm after promotion (default 5m).
    #[serde(with = "humantime_serde")]
    pub scale_down_delay: Duration,
    /// The whole rollout must finish within this (default 10m).
    #[serde(with = "humantime_serde")]
    pub progress_deadline: Duration,
    /// Instances replaced at once in a rolling update (default 1).
    pub max_parallel: u32,
    /// How long an instance must stay healthy to count (default 10s).
    #[serde(with = "humantime_serde")]
    pub min_healthy_time: Duration,
    /// How long an instance has to become healthy (default 5m).
    #[serde(with = "humantime_serde")]
    pub healthy_deadline: Duration,
    /// Instances of the canary release (default: as many as the service).
    pub canary_instances: Option<u32>,
    /// Blue/green and canary: an address (`IP:port`, port 0 lets the system choose) where the
    /// proxy serves only the new release while it is previewed. `None`: no such listener (the
    /// `X-Kiln-Preview: 1` header and `kiln-preview=1` cookie work either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_listen: Option<String>,
}

/// One canary step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryStep {
    /// Share of requests for the new release, 0–100.
    pub weight: u8,
    /// How long to hold; `None` waits for `kiln rollout promote`.
    #[serde(default, with = "humantime_serde::option")]
    pub pause: Option<Duration>,
}

/// The `analysis` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// Time between measurements.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Highest acceptable share of failed requests (0–1).
    pub max_error_rate: Option<f64>,
    /// Highest acceptable median latency.
    #[serde(default, with = "humantime_serde::option")]
    pub max_p50_latency: Option<Duration>,
    /// Highest acceptable 99th-percentile latency.
    #[serde(default, with = "humantime_serde::option")]
    pub max_p99_latency: Option<Duration>,
    /// Highest acceptable error rate above the stable release's in the same window, as a
    /// difference of rates (`0.005`: half a percentage point more).
    #[serde(default)]
    pub max_error_rate_increase: Option<f64>,
    /// Highest acceptable 99th-percentile latency above the stable release's in the same
    /// window, as a fraction of it (`0.2`: at most 20 % slower).
    #[serde(default)]
    pub max_p99_increase: Option<f64>,
    /// Fewer requests than this in a window is inconclusive.
    pub min_requests: u64,
    /// Failed measurements tolerated before aborting.
    pub failure_limit: u32,
    /// Inconclusive measurements tolerated before pausing.
    pub inconclusive_limit: u32,
}

/// A listener of kiln's proxy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Balancer {
    /// The balancer's name.
    pub name: String,
    /// `host:port` to listen on.
    pub listen: String,
    /// Routes, tried most specific first.
    pub routes: Vec<Route>,
    /// Where the block starts.
    pub loc: Loc,
}

/// A route from requests to a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Match this `Host` only.
    pub host: Option<String>,
    /// Match paths starting with this (default `/`).
    pub path_prefix: String,
    /// The service, by name.
    pub service: String,
}
