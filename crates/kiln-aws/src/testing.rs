//! Shared by kiln-aws's own tests and the CLI's AWS end-to-end test.
//!
//! Every helper panics when the emulator refuses the setup, with a message naming the step:
//! a test cannot go on without it. Names are the caller's to make unique (see
//! [`unique_id`](crate::testing::unique_id)), so tests run in parallel against one server and
//! never reset it.

use aws_config::SdkConfig;
use aws_config::retry::RetryConfig;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use aws_sdk_ec2::types::{Filter, Instance};
use aws_sdk_s3::config::{Credentials, SharedCredentialsProvider};
use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};

use crate::config::{AwsSettings, sdk_config};

/// The environment variable that holds the emulator's URL, e.g. `http://127.0.0.1:5055`.
pub const MOTO_URL_VAR: &str = "KILN_MOTO_URL";

/// The region every test works in.
pub const REGION: &str = "us-east-1";

/// The name of Amazon-owned AMIs moto ships (two images, x86_64). Asking for them by name is
/// fast; listing all of moto's Amazon AMIs takes seconds.
pub const MOTO_AMI_NAME: &str = "al2022-ami-2022.0.20220728.1-kernel-5.15-x86_64";

/// The emulator's URL, from [`MOTO_URL_VAR`].
///
/// # Panics
/// When the variable is not set, saying how to start a moto server.
pub fn moto_url() -> String {
    let Ok(url) = std::env::var(MOTO_URL_VAR) else {
        panic!(
            "{MOTO_URL_VAR} is not set: these tests need a moto server. Run them through \
             scripts/test.sh, which installs and starts one, or start one yourself \
             (moto_server -H 127.0.0.1 -p 5055) and export {MOTO_URL_VAR}=http://127.0.0.1:5055"
        );
    };
    url
}

/// The SDK configured for an emulator at `endpoint_url` (moto, or a proxy in front of it):
/// region [`REGION`], static fake credentials `test`/`test`, no retries.
pub async fn conf_at(endpoint_url: &str) -> SdkConfig {
    let settings = AwsSettings {
        region: REGION.to_owned(),
        endpoint_url: Some(endpoint_url.to_owned()),
    };
    sdk_config(&settings)
        .await
        .into_builder()
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "test",
            "test",
            None,
            None,
            "kiln-tests",
        )))
        .retry_config(RetryConfig::standard().with_max_attempts(1))
        .build()
}

/// The SDK configured for the moto server at [`moto_url`].
///
/// # Panics
/// When [`MOTO_URL_VAR`] is not set.
pub async fn moto_conf() -> SdkConfig {
    conf_at(&moto_url()).await
}

/// 32 fresh hex digits, to make names no other test uses.
pub fn unique_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A fresh VPC with two subnets (in `us-east-1a` and `us-east-1b`) and a security group, and
/// an Amazon-owned AMI the emulator knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The VPC, `10.20.0.0/16`.
    pub vpc: String,
    /// `10.20.1.0/24` in `us-east-1a`, then `10.20.2.0/24` in `us-east-1b`.
    pub subnets: Vec<String>,
    /// `kiln-<name>`, in the VPC.
    pub security_group: String,
    /// The smallest id among the Amazon-owned AMIs named [`MOTO_AMI_NAME`].
    pub ami: String,
}

impl Network {
    /// Makes the network; `name` names the security group (`kiln-<name>`).
    ///
    /// # Panics
    /// When the emulator refuses a step, or knows no Amazon AMI named [`MOTO_AMI_NAME`].
    pub async fn create(conf: &SdkConfig, name: &str) -> Self {
        let ec2 = aws_sdk_ec2::Client::new(conf);
        let vpc = ec2.create_vpc().cidr_block("10.20.0.0/16").send().await;
        let vpc = vpc.expect("moto setup: CreateVpc failed").vpc;
        let vpc = vpc
            .and_then(|v| v.vpc_id)
            .expect("moto setup: CreateVpc returned no VPC id");
        let mut subnets = Vec::new();
        for (cidr, zone) in [
            ("10.20.1.0/24", "us-east-1a"),
            ("10.20.2.0/24", "us-east-1b"),
        ] {
            let out = ec2
                .create_subnet()
                .vpc_id(&vpc)
                .cidr_block(cidr)
                .availability_zone(zone)
                .send()
                .await
                .expect("moto setup: CreateSubnet failed");
            let subnet = out.subnet.and_then(|s| s.subnet_id);
            subnets.push(subnet.expect("moto setup: CreateSubnet returned no subnet id"));
        }
        let security_group = ec2
            .create_security_group()
            .group_name(format!("kiln-{name}"))
            .description("kiln tests")
            .vpc_id(&vpc)
            .send()
            .await
            .expect("moto setup: CreateSecurityGroup failed")
            .group_id()
            .expect("moto setup: CreateSecurityGroup returned no group id")
            .to_owned();
        let images = ec2
            .describe_images()
            .owners("amazon")
            .filters(Filter::builder().name("name").values(MOTO_AMI_NAME).build())
            .send()
            .await
            .expect("moto setup: DescribeImages (owner amazon) failed");
        let ami = images
            .images()
            .iter()
            .filter_map(|i| i.image_id())
            .min()
            .unwrap_or_else(|| panic!("moto setup: the emulator knows no AMI {MOTO_AMI_NAME}"))
            .to_owned();
        Self {
            vpc,
            subnets,
            security_group,
            ami,
        }
    }
}

/// The instances DescribeInstances finds with `filters`, from every reservation.
///
/// # Panics
/// When the emulator refuses the call.
pub async fn instances(
    ec2: &aws_sdk_ec2::Client,
    filters: impl IntoIterator<Item = Filter>,
) -> Vec<Instance> {
    let out = ec2
        .describe_instances()
        .set_filters(Some(filters.into_iter().collect()))
        .send()
        .await
        .expect("moto: DescribeInstances failed");
    out.reservations
        .unwrap_or_default()
        .into_iter()
        .flat_map(|r| r.instances.unwrap_or_default())
        .collect()
}

/// An S3 client for `conf`, path-style (an emulator has no per-bucket host names).
pub fn s3_client(conf: &SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(conf)
            .force_path_style(true)
            .build(),
    )
}

/// Makes the bucket `name`.
///
/// # Panics
/// When the emulator refuses it.
pub async fn bucket(conf: &SdkConfig, name: &str) {
    s3_client(conf)
        .create_bucket()
        .bucket(name)
        .send()
        .await
        .expect("moto setup: CreateBucket failed");
}

/// Makes the bucket `name` with versioning enabled, as the state backend needs.
///
/// # Panics
/// When the emulator refuses it.
pub async fn versioned_bucket(conf: &SdkConfig, name: &str) {
    bucket(conf, name).await;
    s3_client(conf)
        .put_bucket_versioning()
        .bucket(name)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .expect("moto setup: PutBucketVersioning failed");
}

/// Makes the DynamoDB table `name` for the state lock: string hash key `LockID`, billed per
/// request.
///
/// # Panics
/// When the emulator refuses it.
pub async fn lock_table(conf: &SdkConfig, name: &str) {
    aws_sdk_dynamodb::Client::new(conf)
        .create_table()
        .table_name(name)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("LockID")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("moto setup: the LockID attribute definition is complete"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("LockID")
                .key_type(KeyType::Hash)
                .build()
                .expect("moto setup: the LockID key schema is complete"),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("moto setup: CreateTable (the lock table) failed");
}
