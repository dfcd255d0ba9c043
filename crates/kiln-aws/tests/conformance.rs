//! The shared driver conformance suite, run on [`AwsDriver`] against moto as far as moto
//! allows: moto boots nothing, so the cases check what the AWS API reports (start, status,
//! the runtime's list, stop, re-adoption by a second driver, what an instance was launched
//! with), and leave out what needs the app to answer HTTP, write logs or exit by itself.

use std::sync::Arc;

use kiln_aws::testing::{self, Network};
use kiln_aws::{AwsDriver, AwsRuntime, AwsTarget, Fleet};
use kiln_driver::conformance::{self, Fixture};
use kiln_driver::{Driver, ReleaseInfo};

/// The image digest the fixture's AMI holds.
const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000c0ffee";

/// A project of its own on a fresh network, an AMI tagged as kiln's bake of [`DIGEST`], and a
/// way to open drivers on it.
struct Setup {
    conf: aws_config::SdkConfig,
    project: String,
    target: AwsTarget,
    fixture: Fixture,
}

impl Setup {
    fn new(rt: &tokio::runtime::Runtime) -> Self {
        let conf = rt.block_on(testing::moto_conf());
        let project = format!("conf{}", &testing::unique_id()[..10]);
        let network = rt.block_on(Network::create(&conf, &project));
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        rt.block_on(async {
            // What `kiln bake` leaves: an AMI of this project tagged with the image digest.
            let builder = ec2
                .run_instances()
                .image_id(&network.ami)
                .min_count(1)
                .max_count(1)
                .subnet_id(&network.subnets[0])
                .send()
                .await
                .expect("moto setup: RunInstances of a builder");
            let builder = builder.instances()[0]
                .instance_id()
                .expect("moto setup: an instance id")
                .to_owned();
            let ami = ec2
                .create_image()
                .instance_id(&builder)
                .name(format!("kiln-{project}-conformance"))
                .send()
                .await
                .expect("moto setup: CreateImage")
                .image_id()
                .expect("moto setup: an image id")
                .to_owned();
            let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
            ec2.create_tags()
                .resources(&ami)
                .tags(tag("kiln:project", &project))
                .tags(tag("kiln:digest", DIGEST))
                .send()
                .await
                .expect("moto setup: CreateTags on the AMI");
            ec2.terminate_instances()
                .instance_ids(&builder)
                .send()
                .await
                .expect("moto setup: TerminateInstances of the builder");
        });
        let target = AwsTarget {
            vpc_id: Some(network.vpc.clone()),
            subnets: network.subnets.clone(),
            security_groups: vec![network.security_group],
            instance_type: "t3.micro".to_owned(),
            key_name: None,
            iam_instance_profile: None,
            tags: std::collections::BTreeMap::new(),
        };
        let dir = std::env::temp_dir();
        let fixture = Fixture {
            rootfs: dir.clone(),
            args: vec!["/bin/httpd".to_owned(), "-f".to_owned()],
            exit_args: vec!["/bin/false".to_owned()],
            log_dir: dir,
            reachable: false,
            release_info: ReleaseInfo {
                image_digest: DIGEST.to_owned(),
                health_path: Some("/".to_owned()),
                max_instances: 4,
                deployment_id: "conformance".to_owned(),
                commit: None,
            },
        };
        Self {
            conf,
            project,
            target,
            fixture,
        }
    }

    /// A driver as a (re)started kiln server opens one: its own runtime, learning what the
    /// project already has on AWS.
    fn driver(&self) -> Box<dyn Driver> {
        let fleet = Fleet::new(&self.conf, &self.project, self.target.clone())
            .with_start_wait(std::time::Duration::from_millis(50), 100);
        let rt: Arc<AwsRuntime> =
            AwsRuntime::new(&self.conf, fleet).expect("the AWS driver's runtime");
        Box::new(AwsDriver::new(rt).expect("a driver that learnt the project's instances"))
    }
}

fn setup() -> (tokio::runtime::Runtime, Setup) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the setup");
    let setup = Setup::new(&rt);
    (rt, setup)
}

#[test]
fn conformance_lifecycle() {
    let (_rt, s) = setup();
    conformance::lifecycle(&*s.driver(), &s.fixture);
}

#[test]
fn conformance_two_releases_at_once() {
    let (_rt, s) = setup();
    conformance::two_releases_at_once(&*s.driver(), &s.fixture);
}

#[test]
fn conformance_stop_is_idempotent() {
    let (_rt, s) = setup();
    conformance::stop_is_idempotent(&*s.driver(), &s.fixture);
}

#[test]
fn conformance_readoption() {
    let (_rt, s) = setup();
    conformance::readoption(&*s.driver(), &|| s.driver(), &s.fixture);
}

#[test]
fn conformance_observe_reports_what_runs() {
    let (_rt, s) = setup();
    conformance::observe_reports_what_runs(&*s.driver(), &s.fixture);
}
