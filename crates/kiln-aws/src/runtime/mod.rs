//! kiln's engine on AWS: [`AwsDriver`] (kiln's `Driver`: instances of a release are EC2
//! instances in the release's Auto Scaling group) and [`AlbTraffic`] (kiln's `Traffic`: the
//! release pools and weights the engine hands its proxy become target groups and the
//! weighted forward actions of an application load balancer's listener).
//!
//! Both share one [`AwsRuntime`]: the [`Fleet`], the releases' resources and the mapping of
//! kiln's instance ids to EC2 instance ids. The engine calls drivers synchronously, from its
//! own tokio runtime; AWS calls run on a small runtime of their own here, and the calling
//! thread waits for them. The traffic layer never blocks the engine: its calls record what
//! is wanted and a background task makes the load balancer match (the newest wish wins, so
//! a burst of weight changes ends in one `ModifyListener` with the last weights).

mod alb;
mod driver;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aws_config::SdkConfig;

pub use alb::AlbTraffic;
pub use driver::{AwsDriver, user_data};

use crate::Blocker;
use crate::fleet::{Fleet, InstanceState, ReleaseResources};

/// What [`AwsDriver`] and [`AlbTraffic`] share.
#[derive(Debug)]
pub struct AwsRuntime {
    fleet: Arc<Fleet>,
    ec2: aws_sdk_ec2::Client,
    /// The AWS calls' own runtime.
    rt: Blocker,
    known: Mutex<Known>,
    /// One look at every instance of the project, answering `status` calls for a moment:
    /// the engine asks about each instance on every tick, and one DescribeInstances for all
    /// of them keeps that within AWS's request limits.
    states: Mutex<States>,
}

/// How long one look at every instance answers `status` calls.
const STATES_TTL: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct States {
    at: Option<tokio::time::Instant>,
    /// EC2 id → state; an instance not listed was not seen (terminated, or launched since).
    states: BTreeMap<String, InstanceState>,
}

/// What was learnt from AWS or made there, kept to avoid asking again.
#[derive(Debug, Default)]
struct Known {
    /// `(service, release)` → its launch template version, target group and group.
    releases: BTreeMap<(String, u32), ReleaseResources>,
    /// kiln instance id → EC2 instance id.
    instances: BTreeMap<String, String>,
    /// image digest → AMI id.
    amis: BTreeMap<String, String>,
    /// `(service, release)` → the AMI its instances boot.
    release_amis: BTreeMap<(String, u32), String>,
}

impl AwsRuntime {
    /// A runtime for `project` on `fleet`'s target. Starts one worker thread for AWS calls.
    pub fn new(conf: &SdkConfig, fleet: Fleet) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            fleet: Arc::new(fleet),
            ec2: aws_sdk_ec2::Client::new(conf),
            rt: Blocker::new("kiln-aws")?,
            known: Mutex::new(Known::default()),
            states: Mutex::new(States::default()),
        }))
    }

    /// The fleet.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Runs `fut` on the AWS runtime and waits for it (see [`Blocker::block`]).
    pub(crate) fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> T {
        self.rt.block(fut)
    }

    /// Spawns `fut` on the AWS runtime.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.rt.spawn(fut);
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The resources of a release, as last made or found.
    pub(crate) fn release(&self, service: &str, release: u32) -> Option<ReleaseResources> {
        self.known()
            .releases
            .get(&(service.to_owned(), release))
            .cloned()
    }

    pub(crate) fn remember_release(&self, service: &str, release: u32, res: ReleaseResources) {
        self.known()
            .releases
            .insert((service.to_owned(), release), res);
    }

    /// The state of EC2 instance `id`, from a look at every instance of the project at
    /// most [`STATES_TTL`] old; an instance that look did not see is asked about alone.
    pub(crate) async fn state_of(&self, id: &str) -> crate::Result<Option<InstanceState>> {
        let fresh = |s: &States| s.at.is_some_and(|at| at.elapsed() < STATES_TTL);
        {
            let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
            if fresh(&states)
                && let Some(state) = states.states.get(id)
            {
                return Ok(Some(state.clone()));
            }
        }
        let all = self.fleet.instances().await?;
        let listed = {
            let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
            states.states = all.into_iter().map(|i| (i.instance_id, i.state)).collect();
            states.at = Some(tokio::time::Instant::now());
            states.states.get(id).cloned()
        };
        if listed.is_some() {
            return Ok(listed);
        }
        // Not in the project's list: gone, or too new to be listed; ask.
        let one = self.fleet.instance(id).await?.map(|v| v.state);
        if let Some(state) = &one {
            self.set_state(id, state.clone());
        }
        Ok(one)
    }

    /// Records what kiln just did to an instance, so the next `status` says so at once.
    pub(crate) fn set_state(&self, id: &str, state: InstanceState) {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .states
            .insert(id.to_owned(), state);
    }

    pub(crate) fn forget_release(&self, service: &str, release: u32) {
        let key = (service.to_owned(), release);
        let mut known = self.known();
        known.releases.remove(&key);
        known.release_amis.remove(&key);
    }

    /// The AMI a release's instances boot, as recorded at its first launch.
    pub(crate) fn release_ami(&self, service: &str, release: u32) -> Option<String> {
        self.known()
            .release_amis
            .get(&(service.to_owned(), release))
            .cloned()
    }

    pub(crate) fn remember_release_ami(&self, service: &str, release: u32, ami: &str) {
        self.known()
            .release_amis
            .insert((service.to_owned(), release), ami.to_owned());
    }

    /// The EC2 instance id of a kiln instance, if known.
    pub(crate) fn ec2_id(&self, kiln_id: &str) -> Option<String> {
        self.known().instances.get(kiln_id).cloned()
    }

    pub(crate) fn remember_instance(&self, kiln_id: &str, ec2_id: &str) {
        self.known()
            .instances
            .insert(kiln_id.to_owned(), ec2_id.to_owned());
    }

    pub(crate) fn forget_instance(&self, kiln_id: &str) {
        self.known().instances.remove(kiln_id);
    }

    /// Learns the resources of every release and the EC2 id of every instance the project
    /// has on AWS (after a restart, before the engine re-adopts them).
    pub(crate) async fn learn(self: &Arc<Self>) -> crate::Result<()> {
        let groups = self.fleet.groups().await?;
        let instances = self.fleet.instances().await?;
        let mut known = self.known();
        for g in groups {
            let (Some(service), Some(release), Some((lt_id, lt_version)), Some(tg)) = (
                g.service.clone(),
                g.release,
                g.launch_template.clone(),
                g.target_groups.first().cloned(),
            ) else {
                continue;
            };
            let Ok(version) = lt_version.parse::<i64>() else {
                continue;
            };
            known
                .releases
                .entry((service, release))
                .or_insert_with(|| ReleaseResources {
                    launch_template_id: lt_id,
                    launch_template_version: version,
                    target_group_arn: tg,
                    asg_name: g.name.clone(),
                });
        }
        for i in instances {
            if let Some(kiln_id) = i.tags.get(crate::fleet::TAG_INSTANCE) {
                known
                    .instances
                    .insert(kiln_id.clone(), i.instance_id.clone());
            }
        }
        Ok(())
    }

    /// The AMI holding image `digest`, from the cache or AWS.
    pub(crate) async fn ami(self: &Arc<Self>, digest: &str) -> crate::Result<Option<String>> {
        if let Some(ami) = self.known().amis.get(digest) {
            return Ok(Some(ami.clone()));
        }
        let found = crate::ami::find_baked(&self.ec2, self.fleet.project(), digest).await?;
        if let Some(ami) = &found {
            self.known().amis.insert(digest.to_owned(), ami.clone());
        }
        Ok(found)
    }
}

impl AwsRuntime {
    /// The user data of a launch template version, decoded; `None` when it has none.
    pub(crate) async fn launch_user_data(
        &self,
        launch_template: &str,
        version: &str,
    ) -> crate::Result<Option<String>> {
        use base64::Engine as _;
        let what = format!("launch template {launch_template} version {version}");
        let out = self
            .ec2
            .describe_launch_template_versions()
            .launch_template_id(launch_template)
            .versions(version)
            .send()
            .await
            .map_err(|e| crate::error::aws("EC2", "DescribeLaunchTemplateVersions", &what, &e))?;
        let encoded = out
            .launch_template_versions()
            .first()
            .and_then(|v| v.launch_template_data())
            .and_then(|d| d.user_data());
        let Some(encoded) = encoded else {
            return Ok(None);
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| crate::Error::Damaged {
                what: format!("user data of {what}"),
                detail: e.to_string(),
            })?;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }
}
