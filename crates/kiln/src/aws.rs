//! The commands' AWS parts (the `aws` feature): the config's `target "aws"` block as the
//! AWS crate takes it, the AMI step of `kiln bake`, and the `backend "s3"` block as the
//! engine's team state backend.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use kiln_bake::{ExportFormat, ImageRecord, Store};
use kiln_core::model::{AwsTarget, S3Backend, SourceAmi};
use kiln_engine::remote::{RemoteDoc, RemoteState};

use crate::project::Project;

/// Between two looks at a builder instance, command or AMI.
const POLL: Duration = Duration::from_secs(5);
/// How many looks before giving up (an hour).
const MAX_POLLS: u32 = 720;

/// The config's target as the fleet takes it.
pub fn fleet_target(target: &AwsTarget) -> kiln_aws::AwsTarget {
    kiln_aws::AwsTarget {
        vpc_id: target.vpc_id.clone(),
        subnets: target.subnets.clone(),
        security_groups: target.security_groups.clone(),
        instance_type: target.instance_type.clone(),
        key_name: target.key_name.clone(),
        iam_instance_profile: target.iam_instance_profile.clone(),
        tags: target.tags.clone(),
    }
}

/// An AMI made (or found again) by `kiln bake`.
#[derive(Debug)]
pub struct Ami {
    /// The AMI id.
    pub id: String,
    /// Whether an AMI of the same inputs already existed.
    pub reused: bool,
}

/// Makes the AMI of a baked image whose block says `target = target.aws`: uploads its OCI
/// archive, builds the AMI from the source AMI, publishes its id in SSM Parameter Store.
pub fn bake_ami(project: &Project, store: &Store, record: &ImageRecord) -> Result<Ami> {
    let config = &project.config;
    let target = config
        .aws
        .as_ref()
        .context("an image on target.aws needs a target \"aws\" block")?;
    let source = match target.source_ami.as_ref() {
        Some(SourceAmi::Id { id }) => kiln_aws::SourceAmi::Id(id.clone()),
        Some(SourceAmi::Filter {
            filters,
            owners,
            most_recent,
        }) => kiln_aws::SourceAmi::Filter {
            filters: filters.clone(),
            owners: owners.clone(),
            most_recent: *most_recent,
        },
        None => anyhow::bail!("target \"aws\" needs source_ami or source_ami_filter to bake AMIs"),
    };
    let bucket = target
        .artifact_bucket
        .clone()
        .context("target \"aws\" needs artifact_bucket to bake AMIs")?;
    let dir = tempfile::tempdir().context("making a temporary directory")?;
    let archive = dir.path().join("image.tar");
    let file = std::fs::File::create(&archive)
        .with_context(|| format!("cannot create {}", archive.display()))?;
    kiln_bake::export::export(
        store,
        record,
        ExportFormat::Oci,
        &format!("kiln/{}", record.name),
        std::io::BufWriter::new(file),
    )
    .with_context(|| format!("exporting image {} for its AMI", record.name))?;
    let bake = kiln_aws::AmiBake {
        project: config.project.clone(),
        image: record.name.clone(),
        digest: record.digest.to_string(),
        version: record.labels.get("version").cloned(),
        commit: record.git.as_ref().map(|g| g.commit.clone()),
        source,
        instance_type: target
            .builder_instance_type
            .clone()
            .unwrap_or_else(|| target.instance_type.clone()),
        subnet: target.subnets.first().cloned(),
        security_groups: target.security_groups.clone(),
        iam_instance_profile: target.iam_instance_profile.clone(),
        artifact_bucket: bucket,
        archive,
        install: Vec::new(),
        build_id: uuid_like(),
        tags: target.tags.clone(),
        poll: poll_interval(target),
        max_polls: MAX_POLLS,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let baked = rt.block_on(async {
        let conf = kiln_aws::sdk_config(&kiln_aws::AwsSettings {
            region: target.region.clone(),
            endpoint_url: target.endpoint_url.clone(),
        })
        .await;
        kiln_aws::bake(&conf, &bake).await
    })?;
    Ok(Ami {
        id: baked.ami_id,
        reused: baked.reused,
    })
}

/// Emulators answer at once: poll them fast.
fn poll_interval(target: &AwsTarget) -> Duration {
    if target.endpoint_url.is_some() {
        Duration::from_millis(100)
    } else {
        POLL
    }
}

/// A build id: 12 hex characters, unique enough to tell builds apart in tags and names.
fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The lease a server holds on the team backend; renewed every
/// [`kiln_engine::remote::RENEW_EVERY`].
const LEASE: Duration = Duration::from_secs(60);
/// Between two tries for a lease someone else holds.
const LOCK_RETRY: Duration = Duration::from_secs(1);

/// The `backend "s3"` block as the engine's team state backend: the state in S3, the lease
/// in DynamoDB.
#[derive(Debug)]
pub struct S3Remote {
    state: Arc<kiln_aws::S3State>,
    blocker: kiln_aws::Blocker,
    held: std::sync::Mutex<Held>,
}

/// What the holder knows: its lease and the version it last read or wrote.
#[derive(Debug, Default)]
struct Held {
    lease: Option<kiln_aws::Lease>,
    current: Option<kiln_aws::Current>,
}

impl S3Remote {
    /// The backend of `backend`, reached with the standard credential chain.
    pub fn new(backend: &S3Backend) -> Result<Self> {
        let blocker = kiln_aws::Blocker::new("kiln-state")?;
        let settings = kiln_aws::AwsSettings {
            region: backend.region.clone(),
            endpoint_url: backend.endpoint_url.clone(),
        };
        let conf = blocker.block(async move { kiln_aws::sdk_config(&settings).await });
        let state = kiln_aws::S3State::new(
            &conf,
            &backend.bucket,
            &backend.key,
            &backend.dynamodb_table,
        );
        Ok(Self {
            state: Arc::new(state),
            blocker,
            held: std::sync::Mutex::new(Held::default()),
        })
    }

    /// Removes the backend's lock held by lease `id` (its holder is gone); returns who held it.
    pub fn force_unlock(&self, id: &str) -> Result<kiln_aws::LockInfo> {
        let state = self.state.clone();
        let id = id.to_owned();
        Ok(self
            .blocker
            .block(async move { state.lock().force_release(&id).await })?)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl RemoteState for S3Remote {
    fn describe(&self) -> String {
        format!(
            "s3://{}/{} (lock: {})",
            self.state.bucket(),
            self.state.key(),
            self.state.lock().lock_id()
        )
    }

    fn acquire(
        &self,
        who: &str,
        wait: Duration,
        now: SystemTime,
    ) -> std::result::Result<Option<RemoteDoc>, String> {
        let state = self.state.clone();
        let req = kiln_aws::LockRequest {
            operation: "server".to_owned(),
            who: who.to_owned(),
            info: "a kiln server drives the project while it runs".to_owned(),
        };
        let taken = self.blocker.block(async move {
            let start = tokio::time::Instant::now();
            let mut told = false;
            let lease = loop {
                let at = now + start.elapsed();
                match state.lock().acquire(&req, LEASE, at).await {
                    Ok(lease) => break lease,
                    Err(kiln_aws::Error::Locked(holder)) if start.elapsed() < wait => {
                        if !told {
                            eprintln!(
                                "waiting up to {} for the state lock held by {} ({} since {})",
                                humantime::format_duration(wait),
                                holder.who,
                                holder.operation,
                                holder.created
                            );
                            told = true;
                        }
                        tokio::time::sleep(LOCK_RETRY).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let current = state.read().await?;
            Ok((lease, current))
        });
        let (lease, current) = taken.map_err(|e| e.to_string())?;
        let doc = current.as_ref().map(|c| RemoteDoc {
            lineage: c.lineage.clone(),
            serial: c.serial,
            doc: c.doc.clone(),
        });
        let mut held = self.held();
        held.lease = Some(lease);
        held.current = current;
        Ok(doc)
    }

    fn renew(&self, now: SystemTime) -> std::result::Result<(), String> {
        let Some(lease) = self.held().lease.clone() else {
            return Err("no lease is held".to_owned());
        };
        let state = self.state.clone();
        let renewed = self
            .blocker
            .block(async move { state.lock().renew(&lease, LEASE, now).await })
            .map_err(|e| e.to_string())?;
        self.held().lease = Some(renewed);
        Ok(())
    }

    fn write(
        &self,
        doc: &serde_json::Value,
        actor: &str,
        operation: &str,
        now: SystemTime,
    ) -> std::result::Result<RemoteDoc, String> {
        let (lease, current) = {
            let held = self.held();
            (held.lease.clone(), held.current.clone())
        };
        let Some(lease) = lease else {
            return Err("no lease is held".to_owned());
        };
        let state = self.state.clone();
        let doc = doc.clone();
        let meta = kiln_aws::WriteMeta {
            actor: actor.to_owned(),
            operation: operation.to_owned(),
        };
        let written = self
            .blocker
            .block(async move {
                match current {
                    Some(current) => state.write(&current, &doc, &meta, &lease, now).await,
                    None => {
                        let lineage = uuid::Uuid::new_v4().to_string();
                        state.create(&lineage, &doc, now).await
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        let out = RemoteDoc {
            lineage: written.lineage.clone(),
            serial: written.serial,
            doc: written.doc.clone(),
        };
        self.held().current = Some(written);
        Ok(out)
    }

    fn release(&self) -> std::result::Result<(), String> {
        let Some(lease) = self.held().lease.take() else {
            return Ok(());
        };
        let state = self.state.clone();
        self.blocker
            .block(async move { state.lock().release(&lease).await })
            .map_err(|e| e.to_string())
    }
}
