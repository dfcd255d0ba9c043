//! A release's resources: its launch template version, target group and Auto Scaling group.

use std::collections::BTreeMap;

use aws_sdk_autoscaling::types::{AutoScalingGroup, LaunchTemplateSpecification};
use aws_sdk_ec2::types::{
    InstanceType, LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateTagSpecificationRequest, RequestLaunchTemplateData, ResourceType,
    TagSpecification,
};
use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, TargetGroupAttribute, TargetTypeEnum};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::{Fleet, ReleaseResources, ReleaseSpec, has_code, missing, says_not_found};
use crate::error::aws;
use crate::{Error, Result};

/// The processes a release's group must not run: kiln's engine alone launches and replaces
/// instances.
pub const SUSPENDED_PROCESSES: [&str; 3] = ["Launch", "ReplaceUnhealthy", "AZRebalance"];
/// The Auto Scaling group status while it is being deleted.
const DELETING: &str = "Delete in progress";
/// How long a target group lets requests in flight finish when a target leaves it.
const DEREGISTRATION_DELAY_SECS: &str = "30";

impl Fleet {
    /// Makes sure `spec`'s resources exist and returns them: a version of the service's launch
    /// template (created with the template if missing, found again by its description
    /// `kiln release v{N} deployment {id}`), the release's target group (HTTP on `spec.port`,
    /// health checks on `spec.health_path`, 30 s deregistration delay) and its Auto Scaling
    /// group (min 0, desired 0, max `spec.max_size`, attached to the target group, with
    /// `Launch`, `ReplaceUnhealthy` and `AZRebalance` suspended).
    ///
    /// Existing resources are reused as they are: a release is immutable, so a second call
    /// for the same release and deployment returns the same resources.
    pub async fn ensure_release(&self, spec: &ReleaseSpec) -> Result<ReleaseResources> {
        let tags = self.release_tags(spec);
        let (launch_template_id, launch_template_version) =
            self.ensure_launch_template_version(spec, &tags).await?;
        let target_group_arn = self.ensure_target_group(spec, &tags).await?;
        let asg_name = self
            .ensure_group(
                spec,
                &launch_template_id,
                launch_template_version,
                &target_group_arn,
                &tags,
            )
            .await?;
        tracing::debug!(
            project = self.project,
            service = spec.service,
            release = spec.release,
            launch_template_id,
            launch_template_version,
            target_group_arn,
            asg_name,
            "release resources ready"
        );
        Ok(ReleaseResources {
            launch_template_id,
            launch_template_version,
            target_group_arn,
            asg_name,
        })
    }

    /// Deletes the Auto Scaling group of `service`'s release `release` (forced: AWS terminates
    /// its instances) and the release's target group. Resources already gone are fine; the
    /// launch template version is kept, so that a rollback can re-create the release from it.
    ///
    /// AWS refuses to delete a target group that a listener or rule still forwards to
    /// (`ResourceInUse`): take the release out of the routes ([`Fleet::set_routes`]) first.
    pub async fn delete_release(&self, service: &str, release: u32) -> Result<()> {
        let asg = self.asg_name(service, release);
        match self.describe_group(&asg).await? {
            Some(group) if group.status() == Some(DELETING) => {}
            Some(_) => {
                match self
                    .autoscaling
                    .delete_auto_scaling_group()
                    .auto_scaling_group_name(&asg)
                    .force_delete(true)
                    .send()
                    .await
                {
                    Ok(_) => tracing::info!(project = self.project, asg, "deleting group"),
                    Err(err) if says_not_found(&err) => {}
                    Err(err) => {
                        return Err(aws(
                            "AutoScaling",
                            "DeleteAutoScalingGroup",
                            format!("auto scaling group {asg}"),
                            &err,
                        ));
                    }
                }
            }
            None => {}
        }

        let tg = self.target_group_name(service, release);
        if let Some(arn) = self.target_group_arn(&tg).await? {
            match self
                .elb
                .delete_target_group()
                .target_group_arn(&arn)
                .send()
                .await
            {
                Ok(_) => tracing::info!(project = self.project, arn, "target group deleted"),
                Err(err) if has_code(&err, &["TargetGroupNotFound"]) => {}
                Err(err) => {
                    return Err(aws(
                        "ELBv2",
                        "DeleteTargetGroup",
                        format!("target group {tg}"),
                        &err,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The id and version of `spec`'s launch template version, created if missing.
    async fn ensure_launch_template_version(
        &self,
        spec: &ReleaseSpec,
        tags: &BTreeMap<String, String>,
    ) -> Result<(String, i64)> {
        let name = self.launch_template_name(&spec.service);
        let what = format!("launch template {name}");
        let description = format!(
            "kiln release v{} deployment {}",
            spec.release, spec.deployment_id
        );
        let id = match self.launch_template_id(&name).await? {
            Some(id) => id,
            None => {
                let created = self
                    .ec2
                    .create_launch_template()
                    .launch_template_name(&name)
                    .version_description(&description)
                    .launch_template_data(self.launch_template_data(spec, tags))
                    .tag_specifications(
                        TagSpecification::builder()
                            .resource_type(ResourceType::LaunchTemplate)
                            .set_tags(Some(ec2_tags(tags)))
                            .build(),
                    )
                    .send()
                    .await;
                match created {
                    Ok(out) => {
                        let template = out.launch_template();
                        let id =
                            template
                                .and_then(|t| t.launch_template_id())
                                .ok_or_else(|| {
                                    missing("EC2", "CreateLaunchTemplate", "launch template id")
                                })?;
                        let version = template
                            .and_then(|t| t.latest_version_number())
                            .unwrap_or(1);
                        tracing::info!(project = self.project, name, id, "launch template created");
                        return Ok((id.to_owned(), version));
                    }
                    // Created meanwhile by another call: add the version to it.
                    Err(err)
                        if has_code(
                            &err,
                            &["InvalidLaunchTemplateName.AlreadyExistsException"],
                        ) =>
                    {
                        self.launch_template_id(&name)
                            .await?
                            .ok_or_else(|| aws("EC2", "CreateLaunchTemplate", &what, &err))?
                    }
                    Err(err) => return Err(aws("EC2", "CreateLaunchTemplate", &what, &err)),
                }
            }
        };

        if let Some(version) = self
            .find_launch_template_version(&id, &description, &what)
            .await?
        {
            return Ok((id, version));
        }
        let out = self
            .ec2
            .create_launch_template_version()
            .launch_template_id(&id)
            .version_description(&description)
            .launch_template_data(self.launch_template_data(spec, tags))
            .send()
            .await
            .map_err(|err| aws("EC2", "CreateLaunchTemplateVersion", &what, &err))?;
        let version = out
            .launch_template_version()
            .and_then(|v| v.version_number())
            .ok_or_else(|| missing("EC2", "CreateLaunchTemplateVersion", "version number"))?;
        tracing::info!(
            project = self.project,
            name,
            version,
            "launch template version created"
        );
        Ok((id, version))
    }

    /// The id of the launch template `name`, if it exists.
    async fn launch_template_id(&self, name: &str) -> Result<Option<String>> {
        match self
            .ec2
            .describe_launch_templates()
            .launch_template_names(name)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .launch_templates()
                .iter()
                .find(|t| t.launch_template_name() == Some(name))
                .and_then(|t| t.launch_template_id())
                .map(str::to_owned)),
            Err(err) if has_code(&err, &["InvalidLaunchTemplateName.NotFoundException"]) => {
                Ok(None)
            }
            Err(err) => Err(aws(
                "EC2",
                "DescribeLaunchTemplates",
                format!("launch template {name}"),
                &err,
            )),
        }
    }

    /// The lowest version of launch template `id` described as `description`.
    async fn find_launch_template_version(
        &self,
        id: &str,
        description: &str,
        what: &str,
    ) -> Result<Option<i64>> {
        let mut pages = self
            .ec2
            .describe_launch_template_versions()
            .launch_template_id(id)
            .max_results(200)
            .into_paginator()
            .send();
        let mut found: Option<i64> = None;
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(|err| aws("EC2", "DescribeLaunchTemplateVersions", what, &err))?
        {
            for version in page.launch_template_versions() {
                if version.version_description() == Some(description)
                    && let Some(number) = version.version_number()
                {
                    found = Some(found.map_or(number, |f| f.min(number)));
                }
            }
        }
        Ok(found)
    }

    /// What instances of `spec` are launched with.
    fn launch_template_data(
        &self,
        spec: &ReleaseSpec,
        tags: &BTreeMap<String, String>,
    ) -> RequestLaunchTemplateData {
        let tag_spec = |resource_type| {
            LaunchTemplateTagSpecificationRequest::builder()
                .resource_type(resource_type)
                .set_tags(Some(ec2_tags(tags)))
                .build()
        };
        let profile = self.target.iam_instance_profile.as_ref().map(|profile| {
            let builder = LaunchTemplateIamInstanceProfileSpecificationRequest::builder();
            if profile.starts_with("arn:") {
                builder.arn(profile).build()
            } else {
                builder.name(profile).build()
            }
        });
        RequestLaunchTemplateData::builder()
            .image_id(&spec.ami)
            .instance_type(InstanceType::from(self.target.instance_type.as_str()))
            .set_security_group_ids(
                (!self.target.security_groups.is_empty())
                    .then(|| self.target.security_groups.clone()),
            )
            .set_key_name(self.target.key_name.clone())
            .set_iam_instance_profile(profile)
            .set_user_data((!spec.user_data.is_empty()).then(|| BASE64.encode(&spec.user_data)))
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume))
            .build()
    }

    /// The ARN of `spec`'s target group, created if missing; its deregistration delay is set
    /// either way.
    async fn ensure_target_group(
        &self,
        spec: &ReleaseSpec,
        tags: &BTreeMap<String, String>,
    ) -> Result<String> {
        let name = self.target_group_name(&spec.service, spec.release);
        let what = format!("target group {name}");
        let arn = match self.target_group_arn(&name).await? {
            Some(arn) => arn,
            None => {
                let vpc = self.vpc_id().await?;
                let created = self
                    .elb
                    .create_target_group()
                    .name(&name)
                    .protocol(ProtocolEnum::Http)
                    .port(i32::from(spec.port))
                    .vpc_id(vpc)
                    .health_check_protocol(ProtocolEnum::Http)
                    .health_check_path(&spec.health_path)
                    .target_type(TargetTypeEnum::Instance)
                    .set_tags(Some(elb_tags(tags)))
                    .send()
                    .await;
                match created {
                    Ok(out) => {
                        let arn = out
                            .target_groups()
                            .first()
                            .and_then(|tg| tg.target_group_arn())
                            .ok_or_else(|| missing("ELBv2", "CreateTargetGroup", "ARN"))?;
                        tracing::info!(project = self.project, name, arn, "target group created");
                        arn.to_owned()
                    }
                    Err(err) if has_code(&err, &["DuplicateTargetGroupName"]) => self
                        .target_group_arn(&name)
                        .await?
                        .ok_or_else(|| aws("ELBv2", "CreateTargetGroup", &what, &err))?,
                    Err(err) => return Err(aws("ELBv2", "CreateTargetGroup", &what, &err)),
                }
            }
        };
        self.elb
            .modify_target_group_attributes()
            .target_group_arn(&arn)
            .attributes(
                TargetGroupAttribute::builder()
                    .key("deregistration_delay.timeout_seconds")
                    .value(DEREGISTRATION_DELAY_SECS)
                    .build(),
            )
            .send()
            .await
            .map_err(|err| aws("ELBv2", "ModifyTargetGroupAttributes", &what, &err))?;
        Ok(arn)
    }

    /// The ARN of the target group `name`, if it exists.
    pub(super) async fn target_group_arn(&self, name: &str) -> Result<Option<String>> {
        match self.elb.describe_target_groups().names(name).send().await {
            Ok(out) => Ok(out
                .target_groups()
                .iter()
                .find(|tg| tg.target_group_name() == Some(name))
                .and_then(|tg| tg.target_group_arn())
                .map(str::to_owned)),
            Err(err) if has_code(&err, &["TargetGroupNotFound"]) => Ok(None),
            Err(err) => Err(aws(
                "ELBv2",
                "DescribeTargetGroups",
                format!("target group {name}"),
                &err,
            )),
        }
    }

    /// The name of `spec`'s Auto Scaling group, created if missing; its processes are
    /// suspended either way.
    async fn ensure_group(
        &self,
        spec: &ReleaseSpec,
        launch_template_id: &str,
        launch_template_version: i64,
        target_group_arn: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<String> {
        let name = self.asg_name(&spec.service, spec.release);
        let what = format!("auto scaling group {name}");
        let suspended: Vec<String> = match self.describe_group(&name).await? {
            Some(group) if group.status() == Some(DELETING) => {
                return Err(Error::Fleet {
                    what,
                    detail: "it is being deleted; wait until it is gone, then retry".into(),
                });
            }
            Some(group) => group
                .suspended_processes()
                .iter()
                .filter_map(|p| p.process_name().map(str::to_owned))
                .collect(),
            None => {
                let max_size = i32::try_from(spec.max_size).unwrap_or(i32::MAX);
                let created = self
                    .autoscaling
                    .create_auto_scaling_group()
                    .auto_scaling_group_name(&name)
                    .launch_template(
                        LaunchTemplateSpecification::builder()
                            .launch_template_id(launch_template_id)
                            .version(launch_template_version.to_string())
                            .build(),
                    )
                    .min_size(0)
                    .desired_capacity(0)
                    .max_size(max_size)
                    .vpc_zone_identifier(self.target.subnets.join(","))
                    .target_group_arns(target_group_arn)
                    .health_check_type("ELB")
                    .set_tags(Some(asg_tags(&name, tags)))
                    .send()
                    .await;
                match created {
                    Ok(_) => tracing::info!(project = self.project, name, "group created"),
                    Err(err) if has_code(&err, &["AlreadyExists"]) => {}
                    Err(err) => {
                        return Err(aws("AutoScaling", "CreateAutoScalingGroup", &what, &err));
                    }
                }
                Vec::new()
            }
        };
        let missing: Vec<String> = SUSPENDED_PROCESSES
            .iter()
            .filter(|p| !suspended.iter().any(|s| s == *p))
            .map(|p| (*p).to_owned())
            .collect();
        if !missing.is_empty() {
            self.autoscaling
                .suspend_processes()
                .auto_scaling_group_name(&name)
                .set_scaling_processes(Some(missing))
                .send()
                .await
                .map_err(|err| aws("AutoScaling", "SuspendProcesses", &what, &err))?;
        }
        Ok(name)
    }

    /// Suspends the processes of group `name` that kiln needs suspended
    /// ([`crate::SUSPENDED_PROCESSES`]) again, e.g. after someone resumed them.
    pub async fn suspend_processes(&self, name: &str) -> Result<()> {
        self.autoscaling
            .suspend_processes()
            .auto_scaling_group_name(name)
            .set_scaling_processes(Some(
                SUSPENDED_PROCESSES
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect(),
            ))
            .send()
            .await
            .map_err(|err| {
                aws(
                    "AutoScaling",
                    "SuspendProcesses",
                    format!("auto scaling group {name}"),
                    &err,
                )
            })?;
        Ok(())
    }

    /// The Auto Scaling group `name`, if it exists.
    pub(super) async fn describe_group(&self, name: &str) -> Result<Option<AutoScalingGroup>> {
        let out = self
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .map_err(|err| {
                aws(
                    "AutoScaling",
                    "DescribeAutoScalingGroups",
                    format!("auto scaling group {name}"),
                    &err,
                )
            })?;
        Ok(out
            .auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(name))
            .cloned())
    }
}

/// `tags` as EC2 tags.
pub(super) fn ec2_tags(tags: &BTreeMap<String, String>) -> Vec<aws_sdk_ec2::types::Tag> {
    tags.iter()
        .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
        .collect()
}

/// `tags` as ELBv2 tags.
pub(super) fn elb_tags(
    tags: &BTreeMap<String, String>,
) -> Vec<aws_sdk_elasticloadbalancingv2::types::Tag> {
    tags.iter()
        .map(|(k, v)| {
            aws_sdk_elasticloadbalancingv2::types::Tag::builder()
                .key(k)
                .value(v)
                .build()
        })
        .collect()
}

/// `tags` as tags of the Auto Scaling group `group`, not copied to its instances (instances
/// get theirs from the launch template).
fn asg_tags(group: &str, tags: &BTreeMap<String, String>) -> Vec<aws_sdk_autoscaling::types::Tag> {
    tags.iter()
        .map(|(k, v)| {
            aws_sdk_autoscaling::types::Tag::builder()
                .resource_id(group)
                .resource_type("auto-scaling-group")
                .key(k)
                .value(v)
                .propagate_at_launch(false)
                .build()
        })
        .collect()
}
