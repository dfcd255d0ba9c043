//! AMI bakes against a moto server (`$KILN_MOTO_URL`, started by `scripts/test.sh`). Every
//! test makes its own VPC, bucket, project and image digest, so tests run in parallel and never
//! reset the server.
//!
//! moto quirks these tests rely on or work around:
//! - instances are `running` as soon as RunInstances returns, and `stopped`/`terminated` as
//!   soon as StopInstances/TerminateInstances return; new AMIs are `available` at once;
//! - SendCommand never runs anything: every invocation is `Success` with empty output, and
//!   GetCommandInvocation answers at once. A command sent to one instance is recorded as sent
//!   to every instance in the region (moto expands the absent Targets to all of them). Failures after launch (a rejected SendCommand, a
//!   failed install, an invocation not there yet, a failed cleanup) are therefore injected by
//!   a small HTTP proxy in front of moto ([`Proxy`]);
//! - AMI creation dates have whole-second precision, and moto's public AMIs were all created
//!   when the server started (equal dates): "newest" among them is decided by the image id.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic on a broken moto setup"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_ec2::types::{Filter, Image, InstanceStateName, Tag};
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::operation::head_object::{HeadObjectError, HeadObjectOutput};
use kiln_aws::testing::{self, Network};
use kiln_aws::{
    AmiBake, BakedAmi, Error, SourceAmi, bake, deregister, find_baked, inputs_hash, resolve_source,
};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The service and operation of an [`Error::Aws`]; any other error fails the test.
fn aws_call(err: &Error) -> (&'static str, &'static str) {
    let Error::Aws {
        service, operation, ..
    } = err
    else {
        panic!("{err:?}")
    };
    (*service, *operation)
}

/// The filter of one of moto's public AMIs (two images match it).
fn moto_public_source() -> SourceAmi {
    SourceAmi::Filter {
        filters: BTreeMap::from([
            ("name".to_owned(), vec![testing::MOTO_AMI_NAME.to_owned()]),
            ("architecture".to_owned(), vec!["x86_64".to_owned()]),
        ]),
        owners: vec!["amazon".to_owned()],
        most_recent: true,
    }
}

/// A fresh VPC, subnet, security group, artifact bucket and image archive.
struct Env {
    conf: SdkConfig,
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
    s3: aws_sdk_s3::Client,
    project: String,
    bucket: String,
    subnet: String,
    security_group: String,
    archive: PathBuf,
    archive_len: usize,
    digest: String,
}

impl Env {
    async fn new() -> Self {
        let conf = testing::moto_conf().await;
        let id = testing::unique_id();
        let net = Network::create(&conf, &format!("builder-{id}")).await;
        let bucket = format!("kiln-ami-{}", &id[..20]);
        testing::bucket(&conf, &bucket).await;
        // moto never runs the install script, so the archive only has to be unique: its
        // digest names the image.
        let content = format!("not really an OCI archive {id}\n").repeat(64);
        let archive = std::env::temp_dir().join(format!("kiln-ami-test-{id}.tar"));
        std::fs::write(&archive, &content).unwrap();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(content.as_bytes())));
        Self {
            ec2: aws_sdk_ec2::Client::new(&conf),
            ssm: aws_sdk_ssm::Client::new(&conf),
            s3: testing::s3_client(&conf),
            conf,
            project: format!("p{}", &id[..12]),
            bucket,
            subnet: net.subnets[0].clone(),
            security_group: net.security_group,
            archive,
            archive_len: content.len(),
            digest,
        }
    }

    fn bake(&self, build_id: &str) -> AmiBake {
        AmiBake {
            project: self.project.clone(),
            image: "web".to_owned(),
            digest: self.digest.clone(),
            version: Some("1.0.0".to_owned()),
            commit: Some("4f2a9c1".to_owned()),
            source: moto_public_source(),
            instance_type: "t3.small".to_owned(),
            subnet: Some(self.subnet.clone()),
            security_groups: vec![self.security_group.clone()],
            iam_instance_profile: None,
            artifact_bucket: self.bucket.clone(),
            archive: self.archive.clone(),
            install: vec!["echo extra".to_owned()],
            build_id: build_id.to_owned(),
            tags: BTreeMap::from([("team".to_owned(), "payments".to_owned())]),
            poll: Duration::from_millis(10),
            max_polls: 50,
        }
    }

    fn object_key(&self) -> String {
        format!(
            "kiln/{}/images/{}.tar",
            self.project,
            self.digest.trim_start_matches("sha256:")
        )
    }

    /// HeadObject of the archive in the artifact bucket.
    async fn head_archive(&self) -> Result<HeadObjectOutput, SdkError<HeadObjectError>> {
        self.s3
            .head_object()
            .bucket(&self.bucket)
            .key(self.object_key())
            .send()
            .await
    }

    /// Every instance of this project tagged with `build_id`, with its state.
    async fn builders(&self, build_id: &str) -> Vec<(String, InstanceStateName)> {
        let filters = [
            filter("tag:kiln:project", &self.project),
            filter("tag:kiln:build-id", build_id),
        ];
        testing::instances(&self.ec2, filters)
            .await
            .iter()
            .map(|i| {
                (
                    i.instance_id().unwrap().to_owned(),
                    i.state().unwrap().name().unwrap().clone(),
                )
            })
            .collect()
    }

    /// Asserts that exactly one builder of `build_id` was launched and it is terminated.
    async fn assert_builder_terminated(&self, build_id: &str) -> String {
        let builders = self.builders(build_id).await;
        assert_eq!(
            builders.len(),
            1,
            "one builder for {build_id}: {builders:?}"
        );
        assert_eq!(builders[0].1, InstanceStateName::Terminated, "{builders:?}");
        builders[0].0.clone()
    }

    async fn image(&self, ami_id: &str) -> Image {
        let out = self
            .ec2
            .describe_images()
            .image_ids(ami_id)
            .send()
            .await
            .unwrap();
        out.images().first().unwrap().clone()
    }

    async fn parameter(&self, name: &str) -> Option<(String, Option<String>)> {
        match self.ssm.get_parameter().name(name).send().await {
            Ok(out) => {
                let p = out.parameter().unwrap();
                Some((
                    p.value().unwrap().to_owned(),
                    p.data_type().map(str::to_owned),
                ))
            }
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_parameter_not_found()) =>
            {
                None
            }
            Err(err) => panic!("GetParameter {name}: {err:?}"),
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.archive);
    }
}

#[tokio::test]
async fn resolve_source_picks_one_image_or_says_why_not() {
    let env = Env::new().await;
    let id = testing::unique_id();

    // Three images of our own, created a second apart (moto dates have whole seconds).
    let mut own = Vec::new();
    for n in 0..3 {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let out = env
            .ec2
            .register_image()
            .name(format!("kiln-src-{id}-{n}"))
            .send()
            .await
            .unwrap();
        own.push(out.image_id().unwrap().to_owned());
    }
    let ours = |most_recent| SourceAmi::Filter {
        filters: BTreeMap::from([("name".to_owned(), vec![format!("kiln-src-{id}-*")])]),
        owners: vec!["self".to_owned()],
        most_recent,
    };
    let newest = resolve_source(&env.ec2, &ours(true)).await.unwrap();
    assert_eq!(newest.id, own[2]);
    assert_eq!(
        newest.name.as_deref(),
        Some(format!("kiln-src-{id}-2").as_str())
    );
    assert!(newest.creation_date.is_some());

    // Several matches without most_recent: an error listing them, newest first.
    let err = resolve_source(&env.ec2, &ours(false)).await.unwrap_err();
    let Error::SourceAmi { detail } = &err else {
        panic!("{err:?}")
    };
    assert!(detail.starts_with("3 AMIs match"), "{detail}");
    for ami in &own {
        assert!(detail.contains(ami.as_str()), "{detail} lists {ami}");
    }
    assert!(
        detail.find(own[2].as_str()) < detail.find(own[0].as_str()),
        "{detail}"
    );
    assert!(detail.contains("most_recent"), "{detail}");

    // Many matches: five are listed, the rest counted.
    let many = SourceAmi::Filter {
        filters: BTreeMap::from([("name".to_owned(), vec!["al2022-ami-*".to_owned()])]),
        owners: vec!["amazon".to_owned()],
        most_recent: false,
    };
    let err = resolve_source(&env.ec2, &many)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(err.matches(", created ").count(), 5, "{err}");
    assert!(err.contains(" more; set most_recent = true"), "{err}");

    // moto's public AMIs share a creation date: the greatest id wins, every time.
    let public = resolve_source(&env.ec2, &moto_public_source())
        .await
        .unwrap();
    let out = env
        .ec2
        .describe_images()
        .owners("amazon")
        .filters(filter("name", testing::MOTO_AMI_NAME))
        .filters(filter("architecture", "x86_64"))
        .send()
        .await
        .unwrap();
    let expected = out
        .images()
        .iter()
        .max_by_key(|i| (i.creation_date(), i.image_id()))
        .unwrap();
    assert!(out.images().len() >= 2, "the filter matches several images");
    assert_eq!(Some(public.id.as_str()), expected.image_id());
    for _ in 0..3 {
        let again = resolve_source(&env.ec2, &moto_public_source())
            .await
            .unwrap();
        assert_eq!(again, public);
    }

    // Nothing matches: the error names the filters and owners.
    let none = SourceAmi::Filter {
        filters: BTreeMap::from([("name".to_owned(), vec![format!("kiln-nothing-{id}")])]),
        owners: vec!["self".to_owned()],
        most_recent: true,
    };
    let err = resolve_source(&env.ec2, &none).await.unwrap_err();
    assert!(matches!(err, Error::SourceAmi { .. }), "{err:?}");
    let err = err.to_string();
    assert!(err.contains(&format!("name=[kiln-nothing-{id}]")), "{err}");
    assert!(err.contains("owned by [self]"), "{err}");

    // An id: found, or an error naming it.
    let by_id = resolve_source(&env.ec2, &SourceAmi::Id(own[1].clone()))
        .await
        .unwrap();
    assert_eq!(by_id.id, own[1]);
    let err = resolve_source(&env.ec2, &SourceAmi::Id("ami-0000000000000000f".to_owned()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SourceAmi { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("ami-0000000000000000f does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn bake_builds_tags_and_publishes_the_ami() {
    let env = Env::new().await;
    let spec = env.bake("b1");
    let baked = bake(&env.conf, &spec).await.unwrap();

    let source = resolve_source(&env.ec2, &spec.source).await.unwrap();
    let hash = inputs_hash(&spec, &source.id);
    assert_eq!(
        baked,
        BakedAmi {
            ami_id: baked.ami_id.clone(),
            name: format!("kiln-{}-web-1.0.0-{}", env.project, &hash[..12]),
            source_ami: source.id.clone(),
            inputs_hash: hash.clone(),
            reused: false,
            parameters: vec![
                format!("/kiln/{}/web/latest", env.project),
                format!("/kiln/{}/web/1.0.0", env.project),
            ],
        }
    );

    // The AMI: available, named, described, and tagged.
    let image = env.image(&baked.ami_id).await;
    assert_eq!(image.state().unwrap().as_str(), "available");
    assert_eq!(image.name(), Some(baked.name.as_str()));
    assert!(image.description().unwrap().contains(&env.digest));
    let expected = BTreeMap::from(
        [
            ("Name", baked.name.as_str()),
            ("kiln:project", env.project.as_str()),
            ("kiln:image", "web"),
            ("kiln:digest", env.digest.as_str()),
            ("kiln:version", "1.0.0"),
            ("kiln:commit", "4f2a9c1"),
            ("kiln:inputs-hash", hash.as_str()),
            ("kiln:build-id", "b1"),
            ("kiln:source-ami", source.id.as_str()),
            ("kiln:managed-by", "kiln"),
            ("team", "payments"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    assert_eq!(tag_map(image.tags()), expected);
    // Its snapshots carry the same tags.
    let snapshots: Vec<String> = image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
        .map(str::to_owned)
        .collect();
    assert!(!snapshots.is_empty(), "moto gives every AMI a snapshot");
    let out = env
        .ec2
        .describe_snapshots()
        .set_snapshot_ids(Some(snapshots))
        .send()
        .await
        .unwrap();
    for snapshot in out.snapshots() {
        assert_eq!(tag_map(snapshot.tags()), expected, "{snapshot:?}");
    }

    // SSM: latest and the version hold the AMI id, as an aws:ec2:image parameter.
    for name in &baked.parameters {
        let (value, data_type) = env.parameter(name).await.unwrap();
        assert_eq!(value, baked.ami_id, "{name}");
        assert_eq!(data_type.as_deref(), Some("aws:ec2:image"), "{name}");
    }

    // The archive is in S3 under its digest.
    let head = env.head_archive().await.unwrap();
    assert_eq!(head.content_length(), Some(env.archive_len as i64));

    // The builder was tagged, ran the install through SSM, and is gone.
    let builder = env.assert_builder_terminated("b1").await;
    let out = env
        .ec2
        .describe_instances()
        .instance_ids(&builder)
        .send()
        .await
        .unwrap();
    let instance = &out.reservations()[0].instances()[0];
    assert_eq!(instance.image_id(), Some(source.id.as_str()));
    assert_eq!(instance.subnet_id(), Some(env.subnet.as_str()));
    let tags = tag_map(instance.tags());
    assert_eq!(tags["Name"], "kiln-builder-web-b1");
    assert_eq!(tags["kiln:role"], "builder");
    assert_eq!(tags["kiln:project"], env.project);

    // moto records every command as sent to every instance (it expands the missing Targets to
    // all of them), so pick ours by the archive it downloads.
    let out = env
        .ssm
        .list_commands()
        .instance_id(&builder)
        .send()
        .await
        .unwrap();
    let download = format!("s3://{}/{}", env.bucket, env.object_key());
    let ours: Vec<_> = out
        .commands()
        .iter()
        .filter(|c| {
            c.parameters()
                .and_then(|p| p.get("commands"))
                .is_some_and(|lines| lines.iter().any(|l| l.contains(&download)))
        })
        .collect();
    let [command] = ours.as_slice() else {
        panic!("one command for the builder: {ours:?}")
    };
    assert!(command.instance_ids().contains(&builder));
    assert_eq!(command.comment(), Some("kiln bake b1"));
    assert_eq!(command.document_name(), Some("AWS-RunShellScript"));
    let lines = &command.parameters().unwrap()["commands"];
    assert_eq!(lines[1], "set -eu");
    assert_eq!(lines.last().map(String::as_str), Some("echo extra"));
}

#[tokio::test]
async fn unchanged_inputs_reuse_the_ami_and_changed_ones_do_not() {
    let env = Env::new().await;
    let first = bake(&env.conf, &env.bake("b1")).await.unwrap();
    assert!(!first.reused);

    // Same inputs, another build and other tags: the same AMI, no builder.
    let mut again = env.bake("b2");
    again.tags.insert("owner".to_owned(), "bob".to_owned());
    let second = bake(&env.conf, &again).await.unwrap();
    assert!(second.reused);
    assert_eq!(second.ami_id, first.ami_id);
    assert_eq!(second.name, first.name);
    assert_eq!(second.inputs_hash, first.inputs_hash);
    assert!(env.builders("b2").await.is_empty());
    let latest = format!("/kiln/{}/web/latest", env.project);
    assert_eq!(env.parameter(&latest).await.unwrap().0, first.ami_id);

    // Another install line: a new AMI from a new builder, and the archive is not uploaded
    // again (watched through the proxy).
    let proxy = Proxy::start(|_, _| None).await;
    let mut changed = env.bake("b3");
    changed.install.push("echo more".to_owned());
    let third = bake(&proxy.conf().await, &changed).await.unwrap();
    assert!(!third.reused);
    assert_ne!(third.ami_id, first.ami_id);
    assert_ne!(third.inputs_hash, first.inputs_hash);
    env.assert_builder_terminated("b3").await;
    assert_eq!(env.parameter(&latest).await.unwrap().0, third.ami_id);
    let seen = proxy.seen();
    assert!(seen.contains(&"S3 HEAD".to_owned()), "{seen:?}");
    assert!(!seen.contains(&"S3 PUT".to_owned()), "{seen:?}");
    assert_eq!(proxy.count("RunInstances"), 1, "{seen:?}");
}

#[tokio::test]
async fn failures_before_launch_leave_no_builder() {
    let env = Env::new().await;

    // An unresolvable source: nothing is uploaded or launched.
    let mut spec = env.bake("b-nosource");
    spec.source = SourceAmi::Id("ami-0000000000000000f".to_owned());
    let err = bake(&env.conf, &spec).await.unwrap_err();
    assert!(matches!(err, Error::SourceAmi { .. }), "{err:?}");
    assert!(env.builders("b-nosource").await.is_empty());
    let head = env.head_archive().await;
    assert!(head.is_err(), "nothing uploaded: {head:?}");

    // Invalid inputs are refused before any call.
    let mut spec = env.bake("b-bad");
    spec.version = Some("1.0+build".to_owned());
    let err = bake(&env.conf, &spec).await.unwrap_err();
    assert!(matches!(err, Error::AmiBake { .. }), "{err:?}");

    // RunInstances refused (no such subnet): no builder left behind.
    let mut spec = env.bake("b-nosubnet");
    spec.subnet = Some("subnet-0000deadbeef0000".to_owned());
    let err = bake(&env.conf, &spec).await.unwrap_err();
    assert_eq!(aws_call(&err), ("EC2", "RunInstances"), "{err}");
    assert!(env.builders("b-nosubnet").await.is_empty());
    assert_eq!(
        find_baked(&env.ec2, &env.project, &env.digest)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn a_failure_after_launch_terminates_the_builder() {
    let env = Env::new().await;
    let proxy = Proxy::start(|op, _| {
        (op == "SendCommand").then(|| Canned::ssm_error("InvalidDocument", "injected by the test"))
    })
    .await;
    let err = bake(&proxy.conf().await, &env.bake("b1"))
        .await
        .unwrap_err();
    assert_eq!(aws_call(&err), ("SSM", "SendCommand"), "{err}");
    assert!(err.to_string().contains("injected by the test"), "{err}");
    env.assert_builder_terminated("b1").await;
    assert_eq!(proxy.count("TerminateInstances"), 1);
    assert_eq!(proxy.count("CreateImage"), 0);
    assert_eq!(
        find_baked(&env.ec2, &env.project, &env.digest)
            .await
            .unwrap(),
        None
    );
    let latest = format!("/kiln/{}/web/latest", env.project);
    assert_eq!(env.parameter(&latest).await, None);
}

#[tokio::test]
async fn a_failed_install_reports_its_output_and_terminates_the_builder() {
    let env = Env::new().await;
    let stderr = format!("{}tar: image.tar: Cannot open\n", "noise ".repeat(1000));
    let body = serde_json::json!({
        "CommandId": "c-1",
        "InstanceId": "i-0",
        "Status": "Failed",
        "StatusDetails": "Failed",
        "ResponseCode": 2,
        "StandardOutputContent": "downloading\n",
        "StandardErrorContent": stderr,
    })
    .to_string();
    let proxy = Proxy::start(move |op, _| {
        (op == "GetCommandInvocation").then(|| Canned::ssm(200, body.clone()))
    })
    .await;
    let err = bake(&proxy.conf().await, &env.bake("b1"))
        .await
        .unwrap_err();
    let builder = env.assert_builder_terminated("b1").await;
    let Error::AmiInstall {
        instance,
        status,
        output,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(instance, &builder);
    assert_eq!(status, "Failed");
    assert!(output.contains("exit code 2"), "{output}");
    assert!(output.contains("tar: image.tar: Cannot open"), "{output}");
    assert!(output.contains("stdout: downloading"), "{output}");
    assert!(output.len() < 2200, "output is cut: {} bytes", output.len());
    assert_eq!(proxy.count("CreateImage"), 0);
}

#[tokio::test]
async fn a_failed_cleanup_does_not_hide_the_original_error() {
    let env = Env::new().await;
    let proxy = Proxy::start(|op, _| match op {
        "SendCommand" => Some(Canned::ssm_error("InvalidDocument", "injected by the test")),
        "TerminateInstances" => Some(Canned::ec2_error("UnauthorizedOperation", "no terminating")),
        _ => None,
    })
    .await;
    let err = bake(&proxy.conf().await, &env.bake("b1"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Aws {
                operation: "SendCommand",
                ..
            }
        ),
        "the install's error, not the cleanup's: {err:?}"
    );
    assert_eq!(proxy.count("TerminateInstances"), 1);
    // The builder survived the failed cleanup; terminate it here.
    let builders = env.builders("b1").await;
    assert_eq!(builders.len(), 1);
    assert_eq!(builders[0].1, InstanceStateName::Running);
    env.ec2
        .terminate_instances()
        .instance_ids(&builders[0].0)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn ssm_answers_that_mean_not_yet_are_polled_again() {
    let env = Env::new().await;
    // The agent has not registered yet (first SendCommand), then the invocation does not
    // exist yet (first GetCommandInvocation), as on AWS right after launch.
    let proxy = Proxy::start(|op, nth| match (op, nth) {
        ("SendCommand", 1) => Some(Canned::ssm_error("InvalidInstanceId", "not registered")),
        ("GetCommandInvocation", 1) => Some(Canned::ssm_error("InvocationDoesNotExist", "not yet")),
        _ => None,
    })
    .await;
    let baked = bake(&proxy.conf().await, &env.bake("b1")).await.unwrap();
    assert_eq!(proxy.count("SendCommand"), 2);
    assert_eq!(proxy.count("GetCommandInvocation"), 2);
    assert_eq!(
        env.image(&baked.ami_id).await.state().unwrap().as_str(),
        "available"
    );
    env.assert_builder_terminated("b1").await;
}

#[tokio::test]
async fn an_install_that_never_finishes_times_out() {
    let env = Env::new().await;
    let running = serde_json::json!({"CommandId": "c-1", "Status": "InProgress"}).to_string();
    let proxy = Proxy::start(move |op, _| {
        (op == "GetCommandInvocation").then(|| Canned::ssm(200, running.clone()))
    })
    .await;
    let mut spec = env.bake("b1");
    spec.max_polls = 3;
    let err = bake(&proxy.conf().await, &spec).await.unwrap_err();
    let Error::AmiWait { what, polls, last } = &err else {
        panic!("{err:?}")
    };
    assert!(what.contains("the install"), "{what}");
    assert_eq!(*polls, 3);
    assert_eq!(last, "status InProgress");
    assert_eq!(proxy.count("GetCommandInvocation"), 3);
    env.assert_builder_terminated("b1").await;
}

#[tokio::test]
async fn find_baked_maps_a_digest_to_its_ami_and_deregister_removes_it() {
    let env = Env::new().await;
    let baked = bake(&env.conf, &env.bake("b1")).await.unwrap();
    assert_eq!(
        find_baked(&env.ec2, &env.project, &env.digest)
            .await
            .unwrap(),
        Some(baked.ami_id.clone())
    );
    let other = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        find_baked(&env.ec2, &env.project, &other).await.unwrap(),
        None
    );
    assert_eq!(
        find_baked(&env.ec2, "another-project", &env.digest)
            .await
            .unwrap(),
        None
    );

    // deregister refuses an AMI kiln did not make.
    let source = resolve_source(&env.ec2, &moto_public_source())
        .await
        .unwrap();
    let err = deregister(&env.ec2, &source.id).await.unwrap_err();
    assert!(matches!(err, Error::Ami { .. }), "{err:?}");
    assert!(err.to_string().contains("not made by kiln"), "{err}");

    // It removes kiln's, with its snapshots.
    let snapshots = deregister(&env.ec2, &baked.ami_id).await.unwrap();
    assert!(!snapshots.is_empty());
    assert_eq!(
        find_baked(&env.ec2, &env.project, &env.digest)
            .await
            .unwrap(),
        None
    );
    let left = env
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(filter("tag:kiln:project", &env.project))
        .send()
        .await
        .unwrap();
    assert!(left.snapshots().is_empty(), "{:?}", left.snapshots());
    let err = deregister(&env.ec2, &baked.ami_id).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// A fault-injecting proxy in front of moto

/// An answer the proxy gives instead of moto's.
struct Canned {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Canned {
    /// An SSM (JSON protocol) answer.
    fn ssm(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/x-amz-json-1.1",
            body,
        }
    }

    /// An SSM error with `code`.
    fn ssm_error(code: &str, message: &str) -> Self {
        Self::ssm(
            400,
            serde_json::json!({"__type": code, "message": message}).to_string(),
        )
    }

    /// An EC2 (query protocol) error with `code`.
    fn ec2_error(code: &str, message: &str) -> Self {
        Self {
            status: 400,
            content_type: "text/xml",
            body: format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>kiln-test</RequestID></Response>"
            ),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {} Canned\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.status,
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

/// Decides, from an operation name (`RunInstances`, `SendCommand`, `S3 PUT`…) and how many
/// times it has been seen (1 for the first), whether to answer it instead of moto.
type Rule = dyn Fn(&str, usize) -> Option<Canned> + Send + Sync;

/// An HTTP/1.1 proxy to moto that records every operation and answers some itself. One
/// request per connection (it answers `Connection: close`), bodies framed by Content-Length:
/// enough for the SDK's requests.
struct Proxy {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    async fn start(rule: impl Fn(&str, usize) -> Option<Canned> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = testing::moto_url()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rule: Arc<Rule> = Arc::new(rule);
        let (log, up) = (Arc::clone(&seen), upstream);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(
                    client,
                    up.clone(),
                    Arc::clone(&rule),
                    Arc::clone(&log),
                ));
            }
        });
        Self { url, seen }
    }

    async fn conf(&self) -> SdkConfig {
        testing::conf_at(&self.url).await
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self, op: &str) -> usize {
        self.seen().iter().filter(|o| *o == op).count()
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: String,
    rule: Arc<Rule>,
    seen: Arc<Mutex<Vec<String>>>,
) {
    let Some((head, body)) = read_message(&mut client).await else {
        return;
    };
    let op = operation(&head, &body);
    let nth = {
        let mut seen = seen.lock().unwrap();
        seen.push(op.clone());
        seen.iter().filter(|o| **o == op).count()
    };
    let answer = match rule(&op, nth) {
        Some(canned) => canned.to_bytes(),
        None => {
            let mut moto = TcpStream::connect(&upstream).await.unwrap();
            moto.write_all(&closing(&head)).await.unwrap();
            moto.write_all(&body).await.unwrap();
            let mut answer = Vec::new();
            moto.read_to_end(&mut answer).await.unwrap();
            let split = find(&answer, b"\r\n\r\n").unwrap() + 4;
            let mut out = closing(&String::from_utf8_lossy(&answer[..split]));
            out.extend_from_slice(&answer[split..]);
            out
        }
    };
    let _ = client.write_all(&answer).await;
    let _ = client.shutdown().await;
}

/// Reads one request: its head (up to the blank line) and its Content-Length body.
async fn read_message(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    assert!(
        header("transfer-encoding").is_none(),
        "the test proxy handles Content-Length bodies only: {head}"
    );
    if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .ok()?;
    }
    let len: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// `head` with `Connection: close` instead of any Connection or Expect header.
fn closing(head: &str) -> Vec<u8> {
    let mut out = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("expect") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// The API operation of a request: the `X-Amz-Target` operation (SSM), the `Action` (EC2),
/// or `S3 <method>`.
fn operation(head: &str, body: &[u8]) -> String {
    for line in head.lines() {
        if let Some((key, value)) = line.split_once(':')
            && key.trim().eq_ignore_ascii_case("x-amz-target")
        {
            return value
                .trim()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    }
    let body = String::from_utf8_lossy(body);
    if let Some(action) = body
        .split('&')
        .find_map(|pair| pair.strip_prefix("Action="))
    {
        return action.to_owned();
    }
    let method = head.split(' ').next().unwrap_or_default();
    format!("S3 {method}")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
