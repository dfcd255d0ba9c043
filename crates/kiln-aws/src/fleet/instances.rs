//! Instances and Auto Scaling groups: launching, terminating, reading back.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_autoscaling::types::AutoScalingInstanceDetails;
use aws_sdk_ec2::types::{
    Filter, Instance, LaunchTemplateSpecification, ResourceType, TagSpecification,
};
use sha2::{Digest, Sha256};

use super::release::ec2_tags;
use super::{
    Fleet, GroupView, InstanceState, InstanceView, ReleaseResources, TAG_AWS_LAUNCH_TEMPLATE_ID,
    TAG_AWS_LAUNCH_TEMPLATE_VERSION, TAG_INSTANCE, TAG_PROJECT, TAG_RELEASE, TAG_SERVICE, has_code,
    missing, says_not_found,
};
use crate::error::aws;
use crate::{Error, Result};

/// The instance states [`Fleet::instances`] lists: all but `terminated`.
const LIVE_STATES: [&str; 5] = ["pending", "running", "stopping", "stopped", "shutting-down"];
/// The states of an instance [`Fleet::launch`] takes as already launched.
const LAUNCHED_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];
/// The most instance ids DescribeAutoScalingInstances takes at once.
const ASG_INSTANCES_BATCH: usize = 50;

impl Fleet {
    /// Starts an instance of release `rel` for kiln's instance `kiln_instance_id` and returns
    /// its EC2 id, once it runs and belongs to the release's group and target group.
    ///
    /// An instance already tagged with `kiln_instance_id` (and not shutting down or
    /// terminated) is taken instead of starting another, so a launch interrupted by a crash can
    /// be repeated. The instance is placed in one of the target's subnets chosen by a hash of
    /// `kiln_instance_id`, tagged like the launch template version says plus
    /// [`super::TAG_INSTANCE`] and `Name` (both `kiln_instance_id`), then attached to the
    /// release's Auto Scaling group (which raises the group's desired capacity by one) and
    /// registered in the release's target group on its port.
    ///
    /// Fails with [`Error::Fleet`] when the instance stops or terminates while starting, or
    /// is not running after the wait set by [`Fleet::with_start_wait`]; kiln's engine then
    /// terminates it and tries another.
    pub async fn launch(&self, rel: &ReleaseResources, kiln_instance_id: &str) -> Result<String> {
        let instance_id = match self.find_launched(kiln_instance_id).await? {
            Some(id) => {
                tracing::info!(
                    project = self.project,
                    kiln_instance_id,
                    instance_id = id,
                    "instance already launched"
                );
                id
            }
            None => self.run_instance(rel, kiln_instance_id).await?,
        };
        self.wait_running(&instance_id, kiln_instance_id).await?;
        self.attach(rel, &instance_id).await?;
        self.register_target(&rel.target_group_arn, &instance_id, None)
            .await?;
        Ok(instance_id)
    }

    /// Terminates instance `ec2_instance_id`. An instance in an Auto Scaling group leaves it
    /// with the group's desired capacity lowered by one, so nothing replaces it. An instance
    /// already gone, or already terminating, is fine.
    pub async fn terminate(&self, ec2_instance_id: &str) -> Result<()> {
        let what = format!("instance {ec2_instance_id}");
        if let Some(details) = self.autoscaling_instance(ec2_instance_id).await? {
            if details
                .lifecycle_state()
                .is_some_and(|s| s.starts_with("Terminat"))
            {
                return Ok(());
            }
            match self
                .autoscaling
                .terminate_instance_in_auto_scaling_group()
                .instance_id(ec2_instance_id)
                .should_decrement_desired_capacity(true)
                .send()
                .await
            {
                Ok(_) => {
                    tracing::info!(
                        project = self.project,
                        instance_id = ec2_instance_id,
                        asg = details.auto_scaling_group_name(),
                        "instance terminating"
                    );
                    return Ok(());
                }
                // It left the group meanwhile: terminate it directly.
                Err(err) if says_not_found(&err) => {}
                Err(err) => {
                    return Err(aws(
                        "AutoScaling",
                        "TerminateInstanceInAutoScalingGroup",
                        &what,
                        &err,
                    ));
                }
            }
        }
        match self
            .ec2
            .terminate_instances()
            .instance_ids(ec2_instance_id)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(
                    project = self.project,
                    instance_id = ec2_instance_id,
                    "instance terminating"
                );
                Ok(())
            }
            Err(err) if has_code(&err, &["InvalidInstanceID.NotFound"]) => Ok(()),
            Err(err) => Err(aws("EC2", "TerminateInstances", &what, &err)),
        }
    }

    /// Every instance of the project (tagged [`super::TAG_PROJECT`]) that is not terminated,
    /// ordered by instance id.
    pub async fn instances(&self) -> Result<Vec<InstanceView>> {
        let what = format!("instances of project {}", self.project);
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(filter(
                &format!("tag:{TAG_PROJECT}"),
                [self.project.as_str()],
            ))
            .filters(filter("instance-state-name", LIVE_STATES))
            .into_paginator()
            .send();
        let mut instances = Vec::new();
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(|err| aws("EC2", "DescribeInstances", &what, &err))?
        {
            for reservation in page.reservations() {
                instances.extend(reservation.instances().iter().cloned());
            }
        }
        let ids: Vec<String> = instances
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect();
        let groups = self.groups_of(&ids).await?;
        let mut views: Vec<InstanceView> =
            instances.iter().filter_map(|i| view(i, &groups)).collect();
        views.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(views)
    }

    /// Instance `ec2_instance_id` in whatever state (terminated included, while AWS still
    /// reports it), or `None` when AWS does not know it.
    pub async fn instance(&self, ec2_instance_id: &str) -> Result<Option<InstanceView>> {
        let Some(instance) = self.describe_instance(ec2_instance_id).await? else {
            return Ok(None);
        };
        let groups = self.groups_of(&[ec2_instance_id.to_owned()]).await?;
        Ok(view(&instance, &groups))
    }

    /// Every Auto Scaling group of the project (tagged [`super::TAG_PROJECT`]), ordered by
    /// name.
    pub async fn groups(&self) -> Result<Vec<GroupView>> {
        let what = format!("auto scaling groups of project {}", self.project);
        let mut pages = self
            .autoscaling
            .describe_auto_scaling_groups()
            .filters(
                aws_sdk_autoscaling::types::Filter::builder()
                    .name(format!("tag:{TAG_PROJECT}"))
                    .values(&self.project)
                    .build(),
            )
            .into_paginator()
            .send();
        let mut groups = Vec::new();
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(|err| aws("AutoScaling", "DescribeAutoScalingGroups", &what, &err))?
        {
            for group in page.auto_scaling_groups() {
                let tags: BTreeMap<String, String> = group
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                    .collect();
                groups.push(GroupView {
                    name: group
                        .auto_scaling_group_name()
                        .unwrap_or_default()
                        .to_owned(),
                    service: tags.get(TAG_SERVICE).cloned(),
                    release: tags.get(TAG_RELEASE).and_then(|r| r.parse().ok()),
                    min: group.min_size().unwrap_or_default(),
                    max: group.max_size().unwrap_or_default(),
                    desired: group.desired_capacity().unwrap_or_default(),
                    instances: group
                        .instances()
                        .iter()
                        .filter_map(|i| i.instance_id().map(str::to_owned))
                        .collect(),
                    target_groups: group.target_group_arns().to_vec(),
                    suspended: group
                        .suspended_processes()
                        .iter()
                        .filter_map(|p| p.process_name().map(str::to_owned))
                        .collect(),
                    launch_template: group.launch_template().and_then(|lt| {
                        Some((
                            lt.launch_template_id()?.to_owned(),
                            lt.version()?.to_owned(),
                        ))
                    }),
                    tags,
                });
            }
        }
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(groups)
    }

    /// Sets the min size, max size and desired capacity of the Auto Scaling group `asg` (to
    /// remediate drift). AWS refuses a desired capacity outside `min..=max`.
    pub async fn set_capacity(&self, asg: &str, min: i32, max: i32, desired: i32) -> Result<()> {
        self.autoscaling
            .update_auto_scaling_group()
            .auto_scaling_group_name(asg)
            .min_size(min)
            .max_size(max)
            .desired_capacity(desired)
            .send()
            .await
            .map_err(|err| {
                aws(
                    "AutoScaling",
                    "UpdateAutoScalingGroup",
                    format!("auto scaling group {asg}"),
                    &err,
                )
            })?;
        tracing::info!(
            project = self.project,
            asg,
            min,
            max,
            desired,
            "group capacity set"
        );
        Ok(())
    }

    /// The id of the instance of the project tagged `kiln_instance_id` that is pending, running,
    /// stopping or stopped (the lowest id, should there be several).
    async fn find_launched(&self, kiln_instance_id: &str) -> Result<Option<String>> {
        let out = self
            .ec2
            .describe_instances()
            .filters(filter(
                &format!("tag:{TAG_PROJECT}"),
                [self.project.as_str()],
            ))
            .filters(filter(&format!("tag:{TAG_INSTANCE}"), [kiln_instance_id]))
            .filters(filter("instance-state-name", LAUNCHED_STATES))
            .send()
            .await
            .map_err(|err| {
                aws(
                    "EC2",
                    "DescribeInstances",
                    format!("kiln instance {kiln_instance_id}"),
                    &err,
                )
            })?;
        let mut ids: Vec<&str> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.instance_id())
            .collect();
        ids.sort_unstable();
        if ids.len() > 1 {
            tracing::warn!(
                project = self.project,
                kiln_instance_id,
                ?ids,
                "several instances carry one kiln instance id; using the first"
            );
        }
        Ok(ids.first().map(|id| (*id).to_owned()))
    }

    /// Starts one instance of `rel` for `kiln_instance_id`; returns its id.
    async fn run_instance(&self, rel: &ReleaseResources, kiln_instance_id: &str) -> Result<String> {
        let what = format!("kiln instance {kiln_instance_id}");
        let mut tags = self.launch_template_instance_tags(rel).await?;
        tags.insert(TAG_INSTANCE.into(), kiln_instance_id.into());
        tags.insert("Name".into(), kiln_instance_id.into());
        let tag_spec = |resource_type| {
            TagSpecification::builder()
                .resource_type(resource_type)
                .set_tags(Some(ec2_tags(&tags)))
                .build()
        };
        let out = self
            .ec2
            .run_instances()
            .min_count(1)
            .max_count(1)
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_id(&rel.launch_template_id)
                    .version(rel.launch_template_version.to_string())
                    .build(),
            )
            .subnet_id(self.subnet_for(kiln_instance_id)?)
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume))
            .send()
            .await
            .map_err(|err| aws("EC2", "RunInstances", &what, &err))?;
        let id = out
            .instances()
            .first()
            .and_then(Instance::instance_id)
            .ok_or_else(|| missing("EC2", "RunInstances", "instance id"))?;
        tracing::info!(
            project = self.project,
            kiln_instance_id,
            instance_id = id,
            launch_template_version = rel.launch_template_version,
            "instance started"
        );
        Ok(id.to_owned())
    }

    /// The instance tags of `rel`'s launch template version. They are repeated in RunInstances
    /// so that they are the instance's whether AWS merges request and template tags or not.
    async fn launch_template_instance_tags(
        &self,
        rel: &ReleaseResources,
    ) -> Result<BTreeMap<String, String>> {
        let out = self
            .ec2
            .describe_launch_template_versions()
            .launch_template_id(&rel.launch_template_id)
            .versions(rel.launch_template_version.to_string())
            .send()
            .await
            .map_err(|err| {
                aws(
                    "EC2",
                    "DescribeLaunchTemplateVersions",
                    format!(
                        "launch template {} version {}",
                        rel.launch_template_id, rel.launch_template_version
                    ),
                    &err,
                )
            })?;
        Ok(out
            .launch_template_versions()
            .iter()
            .filter_map(|v| v.launch_template_data())
            .flat_map(|data| data.tag_specifications())
            .filter(|spec| spec.resource_type() == Some(&ResourceType::Instance))
            .flat_map(|spec| spec.tags())
            .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
            .collect())
    }

    /// The subnet an instance of `kiln_instance_id` goes to: spread over the target's subnets
    /// by a hash of the id, the same every time.
    fn subnet_for(&self, kiln_instance_id: &str) -> Result<&str> {
        let first = self.first_subnet()?;
        let hash = Sha256::digest(kiln_instance_id.as_bytes());
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&hash[..8]);
        let count = self.target.subnets.len() as u64;
        let index = usize::try_from(u64::from_be_bytes(bytes) % count).unwrap_or(0);
        Ok(self.target.subnets.get(index).map_or(first, String::as_str))
    }

    /// Waits until instance `id` runs.
    async fn wait_running(&self, id: &str, kiln_instance_id: &str) -> Result<()> {
        let what = || format!("instance {id} (kiln instance {kiln_instance_id})");
        let mut last = None;
        for attempt in 0..self.start_polls {
            if attempt > 0 {
                tokio::time::sleep(self.start_poll).await;
            }
            // Just after RunInstances, EC2 may not know the instance yet.
            let Some(instance) = self.describe_instance(id).await? else {
                continue;
            };
            match InstanceState::from_ec2(instance.state()) {
                InstanceState::Running => return Ok(()),
                InstanceState::Pending => last = Some(InstanceState::Pending),
                state => {
                    let reason = instance
                        .state_reason()
                        .and_then(|r| r.message())
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default();
                    return Err(Error::Fleet {
                        what: what(),
                        detail: format!(
                            "it is {state}{reason} instead of running; terminate it and launch another"
                        ),
                    });
                }
            }
        }
        let seen = last.map_or_else(|| "unknown to EC2".to_owned(), |s| s.to_string());
        Err(Error::Fleet {
            what: what(),
            detail: format!(
                "it is still {seen} after {} checks {:?} apart; launch again to keep waiting, or terminate it",
                self.start_polls, self.start_poll
            ),
        })
    }

    /// Attaches instance `id` to `rel`'s group unless it is in it already.
    async fn attach(&self, rel: &ReleaseResources, id: &str) -> Result<()> {
        let what = format!("instance {id} in auto scaling group {}", rel.asg_name);
        if let Some(details) = self.autoscaling_instance(id).await? {
            return match details.auto_scaling_group_name() {
                Some(group) if group == rel.asg_name => Ok(()),
                other => Err(Error::Fleet {
                    what,
                    detail: format!(
                        "it belongs to auto scaling group {}; terminate it and launch another",
                        other.unwrap_or("(unnamed)")
                    ),
                }),
            };
        }
        self.autoscaling
            .attach_instances()
            .auto_scaling_group_name(&rel.asg_name)
            .instance_ids(id)
            .send()
            .await
            .map_err(|err| aws("AutoScaling", "AttachInstances", &what, &err))?;
        Ok(())
    }

    /// Instance `id` as EC2 describes it, or `None` when EC2 does not know it.
    async fn describe_instance(&self, id: &str) -> Result<Option<Instance>> {
        match self.ec2.describe_instances().instance_ids(id).send().await {
            Ok(out) => Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find(|i| i.instance_id() == Some(id))
                .cloned()),
            Err(err) if has_code(&err, &["InvalidInstanceID.NotFound"]) => Ok(None),
            Err(err) => Err(aws(
                "EC2",
                "DescribeInstances",
                format!("instance {id}"),
                &err,
            )),
        }
    }

    /// Instance `id`'s membership of an Auto Scaling group, if any.
    async fn autoscaling_instance(&self, id: &str) -> Result<Option<AutoScalingInstanceDetails>> {
        let out = self
            .autoscaling
            .describe_auto_scaling_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|err| {
                aws(
                    "AutoScaling",
                    "DescribeAutoScalingInstances",
                    format!("instance {id}"),
                    &err,
                )
            })?;
        Ok(out
            .auto_scaling_instances()
            .iter()
            .find(|i| i.instance_id() == Some(id))
            .cloned())
    }

    /// The Auto Scaling group of each of `ids` that is in one.
    async fn groups_of(&self, ids: &[String]) -> Result<HashMap<String, String>> {
        let mut groups = HashMap::new();
        for batch in ids.chunks(ASG_INSTANCES_BATCH) {
            let out = self
                .autoscaling
                .describe_auto_scaling_instances()
                .set_instance_ids(Some(batch.to_vec()))
                .max_records(i32::try_from(ASG_INSTANCES_BATCH).unwrap_or(i32::MAX))
                .send()
                .await
                .map_err(|err| {
                    aws(
                        "AutoScaling",
                        "DescribeAutoScalingInstances",
                        format!("instances of project {}", self.project),
                        &err,
                    )
                })?;
            for details in out.auto_scaling_instances() {
                if let (Some(id), Some(group)) =
                    (details.instance_id(), details.auto_scaling_group_name())
                {
                    groups.insert(id.to_owned(), group.to_owned());
                }
            }
        }
        Ok(groups)
    }
}

/// An EC2 filter.
fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(str::to_owned).collect()))
        .build()
}

/// `instance` as kiln sees it; `groups` maps instance ids to their Auto Scaling group.
fn view(instance: &Instance, groups: &HashMap<String, String>) -> Option<InstanceView> {
    let instance_id = instance.instance_id()?.to_owned();
    let tags: BTreeMap<String, String> = instance
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
        .collect();
    let launch_template = tags
        .get(TAG_AWS_LAUNCH_TEMPLATE_ID)
        .zip(tags.get(TAG_AWS_LAUNCH_TEMPLATE_VERSION))
        .map(|(id, version)| (id.clone(), version.clone()));
    // The group's own record, not the `aws:autoscaling:groupName` tag, which may outlive a
    // detachment.
    let asg = groups.get(&instance_id).cloned();
    Some(InstanceView {
        state: InstanceState::from_ec2(instance.state()),
        image_id: instance.image_id().map(str::to_owned),
        launch_template,
        asg,
        private_ip: instance.private_ip_address().map(str::to_owned),
        tags,
        instance_id,
    })
}
