//! Baking a kiln image into an AMI, the way Packer builds one.
//!
//! An AMI carries exactly one kiln image, named by its digest. [`bake`] uploads the image's
//! OCI archive to S3 (content-addressed: `kiln/{project}/images/{digest hex}.tar`, never
//! uploaded twice), launches a *builder* instance from the source AMI, runs
//! [`install_script`] on it through SSM Run Command, stops it, creates the AMI, tags it, and
//! always terminates the builder. Every AMI is tagged with a hash of what went into it
//! ([`inputs_hash`]), so baking unchanged inputs again reuses the AMI instead of building a
//! new one. Either way the AMI id is published in SSM Parameter Store as
//! `/kiln/{project}/{image}/latest` (and `/kiln/{project}/{image}/{version}`), with the
//! `aws:ec2:image` data type, so launch templates can say `resolve:ssm:/kiln/…`.
//!
//! On the AMI, the image is unpacked into `/opt/kiln/images/{digest hex}/rootfs`, and the
//! systemd unit `kiln-app.service` runs its command there (`RootDirectory=`, read-only). The
//! command comes from `/etc/kiln/app.cmd`, one argument per line, which the launch template's
//! user data writes; without it the image's own entrypoint and command run. The environment
//! is the image's, overridden by `/etc/kiln/app.env` (`KEY=value` lines). The image needs a
//! `/bin/sh`: the small launcher that reads the command runs inside it.
//!
//! Nothing here reads the clock: waits count polls (`poll` apart, at most `max_polls`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, Image, ImageState,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceStateName, InstanceType,
    ResourceType, Tag, TagSpecification,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_ssm::types::{CommandInvocationStatus, ParameterType};
use kiln_core::Digest;
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use crate::config::s3_client;
use crate::error::aws;
use crate::{Error, Result};

/// The version of [`install_script`]'s output. It is part of [`inputs_hash`]: bump it whenever
/// the generated script changes, so AMIs baked by the old script are not reused.
pub const INSTALL_SCRIPT_VERSION: u32 = 1;

/// The most output of a failed install kept in [`Error::AmiInstall`], per stream.
const OUTPUT_LIMIT: usize = 2048;

/// S3's limit for a single PUT; bigger archives would need a multipart upload.
const MAX_ARCHIVE_BYTES: u64 = 5 * 1024 * 1024 * 1024;

/// EC2 allows 50 tags per resource.
const MAX_TAGS: usize = 50;

/// The AMI a builder starts from, like Packer's `source_ami` / `source_ami_filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAmi {
    /// This image, e.g. `ami-0abc1234def567890`.
    Id(String),
    /// The image matching DescribeImages filters.
    Filter {
        /// DescribeImages filters, e.g. `name` → `["al2023-ami-2023.*-x86_64"]`,
        /// `architecture` → `["x86_64"]`.
        filters: BTreeMap<String, Vec<String>>,
        /// Who must own the image: account ids, `self`, `amazon`, `aws-marketplace`. Empty
        /// means anyone (risky: anyone can publish an AMI with a matching name).
        owners: Vec<String>,
        /// Pick the newest of several matches. When off, several matches are an error.
        most_recent: bool,
    },
}

/// A source AMI as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedAmi {
    /// The image id.
    pub id: String,
    /// Its name.
    pub name: Option<String>,
    /// When it was created (ISO 8601, as EC2 reports it).
    pub creation_date: Option<String>,
}

/// What to bake: one kiln image into one AMI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmiBake {
    /// The kiln project; namespaces tags, S3 keys and SSM parameters. Letters, digits, `.`,
    /// `_` and `-`.
    pub project: String,
    /// The kiln image's name. Letters, digits, `.`, `_` and `-`.
    pub image: String,
    /// The kiln image's digest, `sha256:<64 hex digits>`.
    pub digest: String,
    /// The image's version label, if it has one. Letters, digits, `.`, `_` and `-`.
    pub version: Option<String>,
    /// The source commit the image was built from, if known.
    pub commit: Option<String>,
    /// The AMI the builder starts from.
    pub source: SourceAmi,
    /// The builder's instance type, e.g. `t3.small`.
    pub instance_type: String,
    /// The builder's subnet; the default VPC's when `None`. It needs a route to S3 and SSM.
    pub subnet: Option<String>,
    /// The builder's security groups (ids); the VPC's default group when empty.
    pub security_groups: Vec<String>,
    /// The builder's instance profile, by name or ARN. It must allow SSM
    /// (`AmazonSSMManagedInstanceCore`) and reading the archive from `artifact_bucket`.
    pub iam_instance_profile: Option<String>,
    /// The bucket the archive is uploaded to and the builder downloads it from.
    pub artifact_bucket: String,
    /// The image exported as an OCI archive (`kiln images export --format oci`).
    pub archive: PathBuf,
    /// Extra shell lines run on the builder after the image is installed (`set -eu` applies).
    pub install: Vec<String>,
    /// This build's unique id, recorded on the builder and the AMI. Letters, digits, `.`,
    /// `_` and `-`.
    pub build_id: String,
    /// More tags for the AMI and its snapshots. `Name`, `aws:…` and `kiln:…` are reserved.
    pub tags: BTreeMap<String, String>,
    /// How long to wait between two status polls.
    pub poll: Duration,
    /// How many times to poll one status before giving up (at least 1).
    pub max_polls: u32,
}

/// The result of [`bake`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BakedAmi {
    /// The AMI id.
    pub ami_id: String,
    /// The AMI's name.
    pub name: String,
    /// The source AMI it was (or would have been) built from.
    pub source_ami: String,
    /// [`inputs_hash`] of the bake.
    pub inputs_hash: String,
    /// `true` when an existing AMI with the same inputs was reused and nothing was built.
    pub reused: bool,
    /// The SSM parameters now holding the AMI id.
    pub parameters: Vec<String>,
}

/// Finds the single image `source` names.
///
/// Fails with [`Error::SourceAmi`] when an id does not exist (or is not visible to the
/// account), when no image matches the filters, or when several do and `most_recent` is off.
/// `most_recent` picks the newest creation date; ties go to the greatest image id, so the
/// choice is stable.
pub async fn resolve_source(ec2: &aws_sdk_ec2::Client, source: &SourceAmi) -> Result<ResolvedAmi> {
    match source {
        SourceAmi::Id(id) => {
            let images = match ec2.describe_images().image_ids(id).send().await {
                Ok(out) => out.images.unwrap_or_default(),
                Err(err) if err.code().is_some_and(|c| c.starts_with("InvalidAMIID.")) => {
                    Vec::new()
                }
                Err(err) => return Err(aws("EC2", "DescribeImages", id.clone(), &err)),
            };
            images.iter().find(|i| i.image_id() == Some(id)).map_or_else(
                || {
                    Err(Error::SourceAmi {
                        detail: format!(
                            "{id} does not exist, or this account cannot see it in this region; check the id and the region"
                        ),
                    })
                },
                |image| Ok(resolved(image)),
            )
        }
        SourceAmi::Filter {
            filters,
            owners,
            most_recent,
        } => {
            let wanted = describe_filters(filters, owners);
            let mut request = ec2.describe_images().set_owners(if owners.is_empty() {
                None
            } else {
                Some(owners.clone())
            });
            for (name, values) in filters {
                request = request.filters(filter(name, values.iter().cloned()));
            }
            let mut images = describe_all_images(request, &wanted).await?;
            // Newest first: by creation date, then by id for equal dates.
            images.sort_by(|a, b| {
                (b.creation_date(), b.image_id()).cmp(&(a.creation_date(), a.image_id()))
            });
            match images.as_slice() {
                [] => Err(Error::SourceAmi {
                    detail: format!(
                        "no AMI matches {wanted}; check the filter names and values (they are DescribeImages filters) and the owners"
                    ),
                }),
                [only] => Ok(resolved(only)),
                [newest, ..] if *most_recent => Ok(resolved(newest)),
                several => {
                    let mut listed: Vec<String> =
                        several.iter().take(5).map(describe_image).collect();
                    if several.len() > 5 {
                        listed.push(format!("and {} more", several.len() - 5));
                    }
                    Err(Error::SourceAmi {
                        detail: format!(
                            "{} AMIs match {wanted}: {}; set most_recent = true to take the newest, or narrow the filters",
                            several.len(),
                            listed.join(", ")
                        ),
                    })
                }
            }
        }
    }
}

/// A stable hash (64 hex digits) of everything that decides an AMI's content: the image
/// digest, the resolved source AMI, the instance type, the install lines and
/// [`INSTALL_SCRIPT_VERSION`]. Not the build id, the tags, or where the builder runs.
pub fn inputs_hash(bake: &AmiBake, source_ami_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"kiln-ami-inputs\0");
    let mut field = |name: &str, value: &[u8]| {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update((value.len() as u64).to_le_bytes());
        hasher.update(value);
    };
    field(
        "script-version",
        INSTALL_SCRIPT_VERSION.to_string().as_bytes(),
    );
    field("digest", bake.digest.as_bytes());
    field("source-ami", source_ami_id.as_bytes());
    field("instance-type", bake.instance_type.as_bytes());
    field("install-lines", bake.install.len().to_string().as_bytes());
    for line in &bake.install {
        field("install", line.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The shell script (POSIX `sh`, run as root by SSM's `AWS-RunShellScript`) that installs the
/// image on the builder:
///
/// 1. download `s3://{artifact_bucket}/{object_key}` with the aws CLI and unpack the OCI
///    layout;
/// 2. with python3, check every blob against its digest and apply the layers in order into
///    `/opt/kiln/images/{digest hex}/rootfs` (gzip, zstd through the `zstd` command, or plain
///    tar; whiteouts applied; symlinks resolved inside the rootfs, never out of it);
/// 3. write `/etc/kiln/image` (the digest) and `/etc/kiln/image.cmd` (the image's command),
///    the launcher `/opt/kiln/bin/kiln-app`, and `kiln-app.service` with a drop-in for the
///    image's environment, working directory and user, and enable it;
/// 4. run `bake.install`.
///
/// The builder needs `aws`, `python3` (3.6 or later), `tar` and systemd, and `zstd` for zstd
/// layers; Amazon Linux 2023 has them all. [`bake`] checks the digest first; for an invalid
/// one the script only fails.
pub fn install_script(bake: &AmiBake, object_key: &str) -> String {
    let digest: Digest = match bake.digest.parse() {
        Ok(digest) => digest,
        Err(err) => {
            return format!("echo {} >&2\nexit 1\n", sh_quote(&format!("kiln: {err}")));
        }
    };
    let hex = digest.hex();
    let root = format!("/opt/kiln/images/{hex}");
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# kiln install script v{INSTALL_SCRIPT_VERSION}: image {digest}"
    );
    s.push_str("set -eu\n");
    s.push_str("umask 022\n");
    s.push_str("for tool in aws python3 tar systemctl; do\n");
    s.push_str("  if ! command -v \"$tool\" >/dev/null 2>&1; then\n");
    s.push_str("    echo \"kiln: the builder has no $tool; use a source AMI that has aws, python3, tar and systemd (Amazon Linux 2023 has them)\" >&2\n");
    s.push_str("    exit 1\n");
    s.push_str("  fi\n");
    s.push_str("done\n");
    let _ = writeln!(s, "kiln_digest={}", sh_quote(&digest.to_string()));
    let _ = writeln!(s, "kiln_root={}", sh_quote(&root));
    s.push_str("kiln_work=\"$(mktemp -d /var/tmp/kiln-install.XXXXXX)\"\n");
    s.push_str("trap 'rm -rf \"$kiln_work\"' EXIT\n");
    let _ = writeln!(
        s,
        "aws s3 cp --only-show-errors {} \"$kiln_work/image.tar\"",
        sh_quote(&format!("s3://{}/{object_key}", bake.artifact_bucket))
    );
    s.push_str("mkdir \"$kiln_work/layout\"\n");
    s.push_str("tar -xf \"$kiln_work/image.tar\" -C \"$kiln_work/layout\" --no-same-owner\n");
    s.push_str("rm -f \"$kiln_work/image.tar\"\n");
    s.push_str("rm -rf \"$kiln_root/rootfs.partial\"\n");
    s.push_str("mkdir -p \"$kiln_root/rootfs.partial\" /etc/kiln /opt/kiln/bin /etc/systemd/system/kiln-app.service.d\n");
    s.push_str("python3 - \"$kiln_work/layout\" \"$kiln_digest\" \"$kiln_root/rootfs.partial\" /etc/systemd/system/kiln-app.service.d/10-image.conf /etc/kiln/image.cmd <<'KILN_UNPACK'\n");
    s.push_str(UNPACK_PY);
    s.push_str("KILN_UNPACK\n");
    s.push_str("rm -rf \"$kiln_root/rootfs\"\n");
    s.push_str("mv \"$kiln_root/rootfs.partial\" \"$kiln_root/rootfs\"\n");
    s.push_str("printf '%s\\n' \"$kiln_digest\" > /etc/kiln/image\n");
    s.push_str("cat > /opt/kiln/bin/kiln-app <<'KILN_APP'\n");
    s.push_str(LAUNCHER_SH);
    s.push_str("KILN_APP\n");
    s.push_str("chmod 0755 /opt/kiln/bin/kiln-app\n");
    s.push_str("cat > /etc/systemd/system/kiln-app.service <<'KILN_UNIT'\n");
    s.push_str(&unit_file(&digest, &root));
    s.push_str("KILN_UNIT\n");
    s.push_str("systemctl daemon-reload\n");
    s.push_str("systemctl enable kiln-app.service\n");
    if !bake.install.is_empty() {
        s.push_str("# install lines\n");
        for line in &bake.install {
            s.push_str(line);
            s.push('\n');
        }
    }
    s
}

/// Bakes `bake` into an AMI, or reuses the AMI an earlier bake of the same inputs made, and
/// publishes its id in SSM Parameter Store.
///
/// Once the builder instance is launched it is always terminated, whatever happens next; a
/// failure to terminate it is logged and does not replace the original error. (If the
/// returned future is dropped midway, the builder keeps running: it is tagged
/// `kiln:role=builder` and `kiln:build-id` so it can be found.)
pub async fn bake(conf: &SdkConfig, bake: &AmiBake) -> Result<BakedAmi> {
    let digest = check(bake)?;
    let ec2 = aws_sdk_ec2::Client::new(conf);
    let ssm = aws_sdk_ssm::Client::new(conf);
    let source = resolve_source(&ec2, &bake.source).await?;
    let hash = inputs_hash(bake, &source.id);
    let (ami_id, name, reused) = match find_by_inputs(&ec2, &bake.project, &hash).await? {
        Some(image) => {
            let ami_id = image.image_id().unwrap_or_default().to_owned();
            info!(ami = %ami_id, inputs_hash = %hash, "reusing the AMI baked from the same inputs");
            (ami_id, image.name().unwrap_or_default().to_owned(), true)
        }
        None => {
            upload_archive(&s3_client(conf), bake, &digest).await?;
            let builder = launch_builder(&ec2, bake, &source.id).await?;
            let built = build(&ec2, &ssm, bake, &digest, &builder, &source.id, &hash).await;
            terminate_builder(&ec2, &builder).await;
            let (ami_id, name) = built?;
            (ami_id, name, false)
        }
    };
    let parameters = publish(&ssm, bake, &ami_id).await?;
    Ok(BakedAmi {
        ami_id,
        name,
        source_ami: source.id,
        inputs_hash: hash,
        reused,
        parameters,
    })
}

/// The newest available AMI of `project` holding the image `digest` (owned by this account),
/// if any: how a release's image digest maps to the AMI its instances boot.
pub async fn find_baked(
    ec2: &aws_sdk_ec2::Client,
    project: &str,
    digest: &str,
) -> Result<Option<String>> {
    let request = ec2
        .describe_images()
        .owners("self")
        .filters(filter("tag:kiln:project", [project.to_owned()]))
        .filters(filter("tag:kiln:digest", [digest.to_owned()]))
        .filters(filter("state", ["available".to_owned()]));
    let what = format!("AMIs of {project} with image {digest}");
    let images = describe_all_images(request, &what).await?;
    Ok(newest(&images).and_then(|i| i.image_id().map(str::to_owned)))
}

/// Deregisters the kiln AMI `ami_id` and deletes its EBS snapshots; returns the snapshot ids
/// deleted.
///
/// Refuses ([`Error::Ami`]) an AMI that does not exist or that kiln did not make (no
/// `kiln:managed-by=kiln` tag).
pub async fn deregister(ec2: &aws_sdk_ec2::Client, ami_id: &str) -> Result<Vec<String>> {
    let images = match ec2.describe_images().image_ids(ami_id).send().await {
        Ok(out) => out.images.unwrap_or_default(),
        Err(err) if err.code().is_some_and(|c| c.starts_with("InvalidAMIID.")) => Vec::new(),
        Err(err) => return Err(aws("EC2", "DescribeImages", ami_id, &err)),
    };
    let Some(image) = images.iter().find(|i| i.image_id() == Some(ami_id)) else {
        return Err(Error::Ami {
            ami_id: ami_id.to_owned(),
            detail: "does not exist in this account and region (already deregistered?)".to_owned(),
        });
    };
    let managed = image
        .tags()
        .iter()
        .any(|t| t.key() == Some("kiln:managed-by") && t.value() == Some("kiln"));
    if !managed {
        return Err(Error::Ami {
            ami_id: ami_id.to_owned(),
            detail: "was not made by kiln (no kiln:managed-by=kiln tag); kiln leaves it alone, deregister it with the AWS console or CLI if you mean to".to_owned(),
        });
    }
    let snapshots = snapshot_ids(image);
    ec2.deregister_image()
        .image_id(ami_id)
        .send()
        .await
        .map_err(|err| aws("EC2", "DeregisterImage", ami_id, &err))?;
    for snapshot in &snapshots {
        ec2.delete_snapshot()
            .snapshot_id(snapshot)
            .send()
            .await
            .map_err(|err| {
                aws(
                    "EC2",
                    "DeleteSnapshot",
                    format!("{snapshot} of {ami_id}"),
                    &err,
                )
            })?;
    }
    info!(ami = %ami_id, snapshots = ?snapshots, "deregistered the AMI");
    Ok(snapshots)
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// Checks everything that can be checked before anything is created; returns the digest.
fn check(bake: &AmiBake) -> Result<Digest> {
    let bad = |detail: String| Error::AmiBake { detail };
    let digest: Digest = bake.digest.parse().map_err(|err| bad(format!("{err}")))?;
    name_ok("project", &bake.project)?;
    name_ok("image", &bake.image)?;
    name_ok("build id", &bake.build_id)?;
    if let Some(version) = &bake.version {
        name_ok("version", version)?;
    }
    if let Some(commit) = &bake.commit
        && (commit.is_empty() || commit.chars().count() > 256)
    {
        return Err(bad(format!(
            "commit `{commit}` must be 1 to 256 characters (it becomes a tag value)"
        )));
    }
    if bake.instance_type.is_empty() {
        return Err(bad("the builder's instance type is empty".to_owned()));
    }
    if bake.artifact_bucket.is_empty() {
        return Err(bad("the artifact bucket is empty".to_owned()));
    }
    if bake.max_polls == 0 {
        return Err(bad(
            "max_polls is 0: every wait would give up at once; use at least 1".to_owned(),
        ));
    }
    for (key, value) in &bake.tags {
        let reserved = key == "Name"
            || key.starts_with("kiln:")
            || key.to_ascii_lowercase().starts_with("aws:");
        if reserved {
            return Err(bad(format!(
                "tag `{key}` is reserved (Name, kiln:… and aws:… are set by kiln or AWS); rename it"
            )));
        }
        if key.is_empty() || key.chars().count() > 128 || value.chars().count() > 256 {
            return Err(bad(format!(
                "tag `{key}`: keys must be 1 to 128 characters and values at most 256"
            )));
        }
    }
    let total = ami_tags(bake, &digest, "", "", "").len();
    if total > MAX_TAGS {
        return Err(bad(format!(
            "the AMI would get {total} tags, over EC2's {MAX_TAGS}; drop {} of the extra tags",
            total - MAX_TAGS
        )));
    }
    let archive = &bake.archive;
    let meta = std::fs::metadata(archive).map_err(|err| {
        bad(format!(
            "cannot read the archive {}: {err}",
            archive.display()
        ))
    })?;
    if !meta.is_file() {
        return Err(bad(format!(
            "the archive {} is not a file",
            archive.display()
        )));
    }
    if meta.len() > MAX_ARCHIVE_BYTES {
        return Err(bad(format!(
            "the archive {} is {} bytes, over S3's 5 GiB single-upload limit; kiln does not upload in parts yet, so make the image smaller",
            archive.display(),
            meta.len()
        )));
    }
    Ok(digest)
}

/// Fails unless `value` is 1 to 128 letters, digits, `.`, `_` or `-`: safe in SSM parameter
/// names, AMI names, S3 keys and tags alike.
fn name_ok(what: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::AmiBake {
            detail: format!(
                "{what} `{value}` must be 1 to 128 letters, digits, `.`, `_` or `-` (it is part of SSM parameter names and AMI names)"
            ),
        })
    }
}

/// Where the archive goes: content-addressed, one object per image digest.
fn object_key(bake: &AmiBake, digest: &Digest) -> String {
    format!("kiln/{}/images/{}.tar", bake.project, digest.hex())
}

/// `kiln-{project}-{image}-{version or untagged}-{12 of the inputs hash}`, at most 128
/// characters (AMI names' limit): a long prefix is cut, the hash is kept.
fn ami_name(bake: &AmiBake, hash: &str) -> String {
    let version = bake.version.as_deref().unwrap_or("untagged");
    let mut prefix = format!("kiln-{}-{}-{version}", bake.project, bake.image);
    let short = &hash[..hash.len().min(12)];
    prefix.truncate(128 - 1 - short.len());
    format!("{prefix}-{short}")
}

/// The tags of the AMI and its snapshots.
fn ami_tags(
    bake: &AmiBake,
    digest: &Digest,
    name: &str,
    hash: &str,
    source: &str,
) -> BTreeMap<String, String> {
    let mut tags = bake.tags.clone();
    let mut put = |key: &str, value: &str| {
        tags.insert(key.to_owned(), value.to_owned());
    };
    put("Name", name);
    put("kiln:project", &bake.project);
    put("kiln:image", &bake.image);
    put("kiln:digest", &digest.to_string());
    if let Some(version) = &bake.version {
        put("kiln:version", version);
    }
    if let Some(commit) = &bake.commit {
        put("kiln:commit", commit);
    }
    put("kiln:inputs-hash", hash);
    put("kiln:build-id", &bake.build_id);
    put("kiln:source-ami", source);
    put("kiln:managed-by", "kiln");
    tags
}

// ---------------------------------------------------------------------------------------------
// The steps of a bake

/// The newest available AMI of `project` baked from inputs hashing to `hash`.
async fn find_by_inputs(
    ec2: &aws_sdk_ec2::Client,
    project: &str,
    hash: &str,
) -> Result<Option<Image>> {
    let request = ec2
        .describe_images()
        .owners("self")
        .filters(filter("tag:kiln:inputs-hash", [hash.to_owned()]))
        .filters(filter("tag:kiln:project", [project.to_owned()]))
        .filters(filter("state", ["available".to_owned()]));
    let images = describe_all_images(request, &format!("AMIs with inputs hash {hash}")).await?;
    Ok(newest(&images).cloned())
}

/// Uploads the archive unless its content-addressed key already exists.
async fn upload_archive(s3: &aws_sdk_s3::Client, bake: &AmiBake, digest: &Digest) -> Result<()> {
    let key = &object_key(bake, digest);
    let target = format!("s3://{}/{key}", bake.artifact_bucket);
    match s3
        .head_object()
        .bucket(&bake.artifact_bucket)
        .key(key)
        .send()
        .await
    {
        Ok(_) => {
            info!(archive = %target, "the image archive is already uploaded");
            return Ok(());
        }
        Err(err) if err.as_service_error().is_some_and(|e| e.is_not_found()) => {}
        Err(err) => return Err(aws("S3", "HeadObject", target, &err)),
    }
    let body = ByteStream::from_path(&bake.archive)
        .await
        .map_err(|err| Error::AmiBake {
            detail: format!("cannot read the archive {}: {err}", bake.archive.display()),
        })?;
    info!(archive = %target, "uploading the image archive");
    s3.put_object()
        .bucket(&bake.artifact_bucket)
        .key(key)
        .body(body)
        .content_type("application/x-tar")
        .metadata("kiln-digest", digest.to_string())
        .send()
        .await
        .map_err(|err| aws("S3", "PutObject", target, &err))?;
    Ok(())
}

/// Launches the builder instance and returns its id.
async fn launch_builder(
    ec2: &aws_sdk_ec2::Client,
    bake: &AmiBake,
    source_ami: &str,
) -> Result<String> {
    let builder_tags = [
        (
            "Name".to_owned(),
            format!("kiln-builder-{}-{}", bake.image, bake.build_id),
        ),
        ("kiln:role".to_owned(), "builder".to_owned()),
        ("kiln:build-id".to_owned(), bake.build_id.clone()),
        ("kiln:project".to_owned(), bake.project.clone()),
    ];
    let mut request = ec2
        .run_instances()
        .image_id(source_ami)
        .instance_type(InstanceType::from(bake.instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .set_subnet_id(bake.subnet.clone())
        .set_security_group_ids(if bake.security_groups.is_empty() {
            None
        } else {
            Some(bake.security_groups.clone())
        })
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .http_tokens(HttpTokensState::Required)
                .build(),
        )
        .tag_specifications(tag_spec(ResourceType::Instance, &builder_tags))
        .tag_specifications(tag_spec(ResourceType::Volume, &builder_tags));
    if let Some(profile) = &bake.iam_instance_profile {
        let spec = IamInstanceProfileSpecification::builder();
        let spec = if profile.starts_with("arn:") {
            spec.arn(profile)
        } else {
            spec.name(profile)
        };
        request = request.iam_instance_profile(spec.build());
    }
    let target = format!("builder for {} from {source_ami}", bake.image);
    let out = match request.send().await {
        Ok(out) => out,
        Err(err) => {
            // The request may have launched an instance even though its answer was lost.
            sweep_builders(ec2, bake).await;
            return Err(aws("EC2", "RunInstances", target, &err));
        }
    };
    let Some(id) = out.instances().first().and_then(|i| i.instance_id()) else {
        sweep_builders(ec2, bake).await;
        return Err(Error::Aws {
            service: "EC2",
            operation: "RunInstances",
            target,
            detail: "the answer names no instance".to_owned(),
        });
    };
    info!(instance = %id, build_id = %bake.build_id, "launched the builder instance");
    Ok(id.to_owned())
}

/// Everything done with a launched builder: wait for it, install, stop, create and tag the
/// AMI. Returns the AMI's id and name. The caller terminates the builder.
async fn build(
    ec2: &aws_sdk_ec2::Client,
    ssm: &aws_sdk_ssm::Client,
    bake: &AmiBake,
    digest: &Digest,
    builder: &str,
    source_ami: &str,
    hash: &str,
) -> Result<(String, String)> {
    wait_instance(ec2, bake, builder, InstanceStateName::Running).await?;
    run_install(ssm, bake, builder, &object_key(bake, digest)).await?;
    ec2.stop_instances()
        .instance_ids(builder)
        .send()
        .await
        .map_err(|err| {
            aws(
                "EC2",
                "StopInstances",
                format!("builder instance {builder}"),
                &err,
            )
        })?;
    wait_instance(ec2, bake, builder, InstanceStateName::Stopped).await?;

    let name = ami_name(bake, hash);
    let tags: Vec<(String, String)> = ami_tags(bake, digest, &name, hash, source_ami)
        .into_iter()
        .collect();
    let mut description = format!(
        "kiln image {digest} ({}/{} {}), build {}",
        bake.project,
        bake.image,
        bake.version.as_deref().unwrap_or("untagged"),
        bake.build_id
    );
    truncate_chars(&mut description, 255);
    // Tagged as it is created, so even an AMI whose bake dies midway is attributable.
    let created = ec2
        .create_image()
        .instance_id(builder)
        .name(&name)
        .description(description)
        .tag_specifications(tag_spec(ResourceType::Image, &tags))
        .send()
        .await
        .map_err(|err| {
            aws(
                "EC2",
                "CreateImage",
                format!("AMI {name} from {builder}"),
                &err,
            )
        })?;
    let Some(ami_id) = created.image_id().map(str::to_owned) else {
        return Err(Error::Aws {
            service: "EC2",
            operation: "CreateImage",
            target: format!("AMI {name} from {builder}"),
            detail: "the answer names no image".to_owned(),
        });
    };
    info!(ami = %ami_id, name = %name, "creating the AMI");
    let image = wait_image(ec2, bake, &ami_id).await?;

    let mut resources = vec![ami_id.clone()];
    resources.extend(snapshot_ids(&image));
    ec2.create_tags()
        .set_resources(Some(resources))
        .set_tags(Some(tags.iter().map(|(k, v)| tag(k, v)).collect()))
        .send()
        .await
        .map_err(|err| {
            aws(
                "EC2",
                "CreateTags",
                format!("AMI {ami_id} and its snapshots"),
                &err,
            )
        })?;
    info!(ami = %ami_id, "the AMI is available");
    Ok((ami_id, name))
}

/// Runs the install script on the builder through SSM and waits for it to succeed.
async fn run_install(
    ssm: &aws_sdk_ssm::Client,
    bake: &AmiBake,
    builder: &str,
    key: &str,
) -> Result<()> {
    let script = install_script(bake, key);
    let commands: Vec<String> = script.lines().map(str::to_owned).collect();
    let mut comment = format!("kiln bake {}", bake.build_id);
    truncate_chars(&mut comment, 100);
    // The SSM agent registers a while after the instance runs; until then SendCommand
    // answers InvalidInstanceId.
    let command_id = wait_for(
        &format!("builder instance {builder} to register with SSM (its instance profile needs AmazonSSMManagedInstanceCore, its subnet a route to SSM)"),
        bake,
        async || match ssm
            .send_command()
            .instance_ids(builder)
            .document_name("AWS-RunShellScript")
            .comment(&comment)
            .parameters("commands", commands.clone())
            .send()
            .await
        {
            Ok(out) => match out.command().and_then(|c| c.command_id()) {
                Some(id) => Ok(Seen::Done(id.to_owned())),
                None => Err(Error::Aws {
                    service: "SSM",
                    operation: "SendCommand",
                    target: format!("builder instance {builder}"),
                    detail: "the answer names no command".to_owned(),
                }),
            },
            Err(err) if err.as_service_error().is_some_and(|e| e.is_invalid_instance_id()) => {
                Ok(Seen::Not("not registered with SSM yet".to_owned()))
            }
            Err(err) => Err(aws("SSM", "SendCommand", format!("builder instance {builder}"), &err)),
        },
    )
    .await?;
    info!(instance = %builder, command = %command_id, "installing the image on the builder");

    let invocation = wait_for(
        &format!("the install (SSM command {command_id}) on builder instance {builder} to finish"),
        bake,
        async || match ssm
            .get_command_invocation()
            .command_id(&command_id)
            .instance_id(builder)
            .send()
            .await
        {
            Ok(out) => {
                let status = out
                    .status()
                    .cloned()
                    .unwrap_or(CommandInvocationStatus::Pending);
                match status {
                    CommandInvocationStatus::Pending
                    | CommandInvocationStatus::InProgress
                    | CommandInvocationStatus::Delayed
                    | CommandInvocationStatus::Cancelling => {
                        Ok(Seen::Not(format!("status {}", status.as_str())))
                    }
                    _ => Ok(Seen::Done(out)),
                }
            }
            // Right after SendCommand the invocation may not exist yet.
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_invocation_does_not_exist()) =>
            {
                Ok(Seen::Not("the invocation does not exist yet".to_owned()))
            }
            Err(err) => Err(aws(
                "SSM",
                "GetCommandInvocation",
                format!("command {command_id} on {builder}"),
                &err,
            )),
        },
    )
    .await?;
    let status = invocation
        .status()
        .map_or("Unknown", CommandInvocationStatus::as_str);
    if status == CommandInvocationStatus::Success.as_str() {
        return Ok(());
    }
    let stdout = tail(invocation.standard_output_content().unwrap_or_default());
    let stderr = tail(invocation.standard_error_content().unwrap_or_default());
    Err(Error::AmiInstall {
        instance: builder.to_owned(),
        command_id,
        status: status.to_owned(),
        output: format!(
            "exit code {}; stderr: {}; stdout: {}",
            invocation.response_code(),
            if stderr.is_empty() {
                "(empty)"
            } else {
                stderr.as_str()
            },
            if stdout.is_empty() {
                "(empty)"
            } else {
                stdout.as_str()
            },
        ),
    })
}

/// Waits until the builder is in `want` (`running` or `stopped`).
async fn wait_instance(
    ec2: &aws_sdk_ec2::Client,
    bake: &AmiBake,
    builder: &str,
    want: InstanceStateName,
) -> Result<()> {
    let what = format!("builder instance {builder} to be {}", want.as_str());
    wait_for(&what, bake, async || {
        let out = match ec2.describe_instances().instance_ids(builder).send().await {
            Ok(out) => out,
            // A new instance can take a moment to be visible.
            Err(err) if err.code() == Some("InvalidInstanceID.NotFound") => {
                return Ok(Seen::Not("not visible yet".to_owned()));
            }
            Err(err) => {
                return Err(aws(
                    "EC2",
                    "DescribeInstances",
                    format!("builder instance {builder}"),
                    &err,
                ));
            }
        };
        let instance = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(builder));
        let Some(instance) = instance else {
            return Ok(Seen::Not("not visible yet".to_owned()));
        };
        let Some(state) = instance.state().and_then(|s| s.name()) else {
            return Ok(Seen::Not("no state yet".to_owned()));
        };
        if *state == want {
            return Ok(Seen::Done(()));
        }
        // Right after StopInstances the instance may still look running.
        let on_the_way = if want == InstanceStateName::Running {
            matches!(state, InstanceStateName::Pending)
        } else {
            matches!(
                state,
                InstanceStateName::Pending
                    | InstanceStateName::Running
                    | InstanceStateName::Stopping
            )
        };
        if on_the_way {
            return Ok(Seen::Not(format!("state {}", state.as_str())));
        }
        let reason = instance
            .state_reason()
            .and_then(|r| r.message())
            .or(instance.state_transition_reason())
            .filter(|r| !r.is_empty())
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        Err(Error::AmiBuilder {
            instance: builder.to_owned(),
            detail: format!(
                "is {} while kiln waits for it to be {}{reason}",
                state.as_str(),
                want.as_str()
            ),
        })
    })
    .await
}

/// Waits until the new AMI is available; returns it.
async fn wait_image(ec2: &aws_sdk_ec2::Client, bake: &AmiBake, ami_id: &str) -> Result<Image> {
    wait_for(&format!("AMI {ami_id} to be available"), bake, async || {
        let images = match ec2.describe_images().image_ids(ami_id).send().await {
            Ok(out) => out.images.unwrap_or_default(),
            Err(err) if err.code() == Some("InvalidAMIID.NotFound") => Vec::new(),
            Err(err) => return Err(aws("EC2", "DescribeImages", format!("AMI {ami_id}"), &err)),
        };
        let Some(image) = images.into_iter().find(|i| i.image_id() == Some(ami_id)) else {
            return Ok(Seen::Not("not visible yet".to_owned()));
        };
        match image.state() {
            Some(ImageState::Available) => Ok(Seen::Done(image)),
            Some(ImageState::Pending) | None => Ok(Seen::Not("state pending".to_owned())),
            Some(state) => Err(Error::Ami {
                ami_id: ami_id.to_owned(),
                detail: format!(
                    "is {} instead of available{}; look at it in the EC2 console, deregister it, and bake again",
                    state.as_str(),
                    image
                        .state_reason()
                        .and_then(|r| r.message())
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ),
            }),
        }
    })
    .await
}

/// Terminates the builder; a failure is logged, never returned.
async fn terminate_builder(ec2: &aws_sdk_ec2::Client, builder: &str) {
    match ec2.terminate_instances().instance_ids(builder).send().await {
        Ok(_) => info!(instance = %builder, "terminated the builder instance"),
        Err(err) => warn!(
            instance = %builder,
            error = %aws("EC2", "TerminateInstances", format!("builder instance {builder}"), &err),
            "could not terminate the builder instance; terminate it by hand"
        ),
    }
}

/// After a failed RunInstances, terminates any builder of this build that was launched anyway.
async fn sweep_builders(ec2: &aws_sdk_ec2::Client, bake: &AmiBake) {
    let found = ec2
        .describe_instances()
        .filters(filter("tag:kiln:build-id", [bake.build_id.clone()]))
        .filters(filter("tag:kiln:project", [bake.project.clone()]))
        .filters(filter("tag:kiln:role", ["builder".to_owned()]))
        .filters(filter(
            "instance-state-name",
            ["pending", "running", "stopping", "stopped"].map(str::to_owned),
        ))
        .send()
        .await;
    match found {
        Ok(out) => {
            let ids = out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter_map(|i| i.instance_id());
            for id in ids {
                terminate_builder(ec2, id).await;
            }
        }
        Err(err) => warn!(
            build_id = %bake.build_id,
            error = %aws("EC2", "DescribeInstances", format!("builders of build {}", bake.build_id), &err),
            "could not look for builder instances to clean up"
        ),
    }
}

/// Writes the AMI id to `/kiln/{project}/{image}/latest` and, with a version,
/// `/kiln/{project}/{image}/{version}`; returns the names written.
async fn publish(ssm: &aws_sdk_ssm::Client, bake: &AmiBake, ami_id: &str) -> Result<Vec<String>> {
    let base = format!("/kiln/{}/{}", bake.project, bake.image);
    let mut names = vec![format!("{base}/latest")];
    if let Some(version) = &bake.version {
        names.push(format!("{base}/{version}"));
    }
    for name in &names {
        ssm.put_parameter()
            .name(name)
            .value(ami_id)
            .r#type(ParameterType::String)
            // Launch templates resolve `resolve:ssm:` image ids only from this data type.
            .data_type("aws:ec2:image")
            .overwrite(true)
            .description(format!(
                "kiln AMI of {} (image {})",
                bake.image, bake.digest
            ))
            .send()
            .await
            .map_err(|err| aws("SSM", "PutParameter", name.clone(), &err))?;
    }
    info!(ami = %ami_id, parameters = ?names, "published the AMI id");
    Ok(names)
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// What one poll saw.
enum Seen<T> {
    /// The awaited state, with what came with it.
    Done(T),
    /// Not yet; what was seen instead.
    Not(String),
}

/// Calls `probe` until it is done: at most `bake.max_polls` times, `bake.poll` apart.
async fn wait_for<T>(
    what: &str,
    bake: &AmiBake,
    mut probe: impl AsyncFnMut() -> Result<Seen<T>>,
) -> Result<T> {
    let mut last = "nothing yet".to_owned();
    for attempt in 0..bake.max_polls {
        if attempt > 0 {
            tokio::time::sleep(bake.poll).await;
        }
        match probe().await? {
            Seen::Done(value) => return Ok(value),
            Seen::Not(seen) => last = seen,
        }
    }
    Err(Error::AmiWait {
        what: what.to_owned(),
        polls: bake.max_polls,
        last,
    })
}

/// Every image a DescribeImages request finds, across pages.
async fn describe_all_images(
    request: aws_sdk_ec2::operation::describe_images::builders::DescribeImagesFluentBuilder,
    what: &str,
) -> Result<Vec<Image>> {
    let mut pages = request.max_results(1000).into_paginator().items().send();
    let mut images = Vec::new();
    while let Some(image) = pages.next().await {
        images.push(image.map_err(|err| aws("EC2", "DescribeImages", what, &err))?);
    }
    Ok(images)
}

/// The newest of `images` (by creation date, then id).
fn newest(images: &[Image]) -> Option<&Image> {
    images
        .iter()
        .max_by(|a, b| (a.creation_date(), a.image_id()).cmp(&(b.creation_date(), b.image_id())))
}

fn resolved(image: &Image) -> ResolvedAmi {
    ResolvedAmi {
        id: image.image_id().unwrap_or_default().to_owned(),
        name: image.name().map(str::to_owned),
        creation_date: image.creation_date().map(str::to_owned),
    }
}

/// `ami-… (name, created date)`, for error messages.
fn describe_image(image: &Image) -> String {
    format!(
        "{} ({}, created {})",
        image.image_id().unwrap_or("?"),
        image.name().unwrap_or("no name"),
        image.creation_date().unwrap_or("at an unknown date")
    )
}

/// `filters name=[a, b] owned by [amazon]`, for error messages.
fn describe_filters(filters: &BTreeMap<String, Vec<String>>, owners: &[String]) -> String {
    let mut text = if filters.is_empty() {
        "no filters".to_owned()
    } else {
        let parts: Vec<String> = filters
            .iter()
            .map(|(name, values)| format!("{name}=[{}]", values.join(", ")))
            .collect();
        format!("filters {}", parts.join(" "))
    };
    if owners.is_empty() {
        text.push_str(" (any owner)");
    } else {
        let _ = write!(text, " owned by [{}]", owners.join(", "));
    }
    text
}

fn snapshot_ids(image: &Image) -> Vec<String> {
    image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
        .map(str::to_owned)
        .collect()
}

fn filter(name: &str, values: impl IntoIterator<Item = String>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().collect()))
        .build()
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

fn tag_spec(kind: ResourceType, tags: &[(String, String)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tags.iter().map(|(k, v)| tag(k, v)).collect()))
        .build()
}

/// The last [`OUTPUT_LIMIT`] bytes of `text` (on a character boundary), marked when cut.
fn tail(text: &str) -> String {
    let text = text.trim_end();
    if text.len() <= OUTPUT_LIMIT {
        return text.to_owned();
    }
    let mut start = text.len() - OUTPUT_LIMIT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

fn truncate_chars(text: &mut String, max: usize) {
    if let Some((cut, _)) = text.char_indices().nth(max) {
        text.truncate(cut);
    }
}

/// `text` as one single-quoted shell word.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `kiln-app.service`: the image's command in its rootfs, read-only, restarted forever.
fn unit_file(digest: &Digest, root: &str) -> String {
    format!(
        "\
[Unit]
Description=kiln image {digest}
Wants=network-online.target
After=network-online.target cloud-final.service
StartLimitIntervalSec=0

[Service]
Type=simple
# The launcher runs as the image's user: let it read the command the user data wrote.
ExecStartPre=-+/bin/chmod 0644 /etc/kiln/app.cmd
ExecStart=/run/kiln/kiln-app
RootDirectory={root}/rootfs
MountAPIVFS=yes
PrivateTmp=yes
ReadOnlyPaths=/
BindReadOnlyPaths=/opt/kiln/bin/kiln-app:/run/kiln/kiln-app /etc/kiln/image.cmd:/run/kiln/image.cmd
BindReadOnlyPaths=-/etc/kiln/app.cmd:/run/kiln/app.cmd -/etc/resolv.conf -/etc/hosts
EnvironmentFile=-/etc/kiln/app.env
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"
    )
}

/// The launcher: runs inside the image (its `/bin/sh`), reads the command one argument per
/// line from `/etc/kiln/app.cmd`, else the image's own, and execs it.
const LAUNCHER_SH: &str = r#"#!/bin/sh
# kiln-app: runs the kiln image's command inside the image (kiln-app.service mounts this here).
# The command is /etc/kiln/app.cmd (written by the launch template's user data), else the
# image's own /etc/kiln/image.cmd: one argument per line.
set -eu
cmd=/run/kiln/app.cmd
[ -s "$cmd" ] || cmd=/run/kiln/image.cmd
if [ ! -s "$cmd" ]; then
  echo "kiln-app: no command: write /etc/kiln/app.cmd, one argument per line" >&2
  exit 1
fi
set --
while IFS= read -r arg || [ -n "$arg" ]; do
  set -- "$@" "$arg"
done < "$cmd"
exec "$@"
"#;

/// Unpacks the image from an OCI layout: `python3 - LAYOUT DIGEST DEST DROPIN IMAGE_CMD`.
/// Checks every blob's digest, applies the layers in order with whiteouts, resolves symlinks
/// inside DEST, and writes the systemd drop-in (environment, working directory, user) and the
/// image's command. Python 3.6+, standard library only.
const UNPACK_PY: &str = r#"import hashlib, json, os, shutil, subprocess, sys, tarfile

LAYOUT, DIGEST, DEST, DROPIN, IMAGE_CMD = sys.argv[1:6]
# Python 3.14 extracts with the "data" filter by default, which refuses absolute symlinks and
# devices; paths are confined by inside() instead.
TRUSTED = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def fail(message):
    sys.exit("kiln: " + message)


def blob(digest):
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or hexd.strip("0123456789abcdef"):
        fail("unsupported digest %r" % digest)
    path = os.path.join(LAYOUT, "blobs", "sha256", hexd)
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
    if hasher.hexdigest() != hexd:
        fail("blob %s does not match its digest: the archive is damaged" % digest)
    return path


def load(digest):
    with open(blob(digest), "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def parts(path):
    return [p for p in path.split("/") if p not in ("", ".")]


def inside(path, follow_last):
    # The host path of the image's `path`: symlinks resolve inside DEST, never out of it.
    todo, done, hops = parts(path), [], 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(DEST, *(done + [part]))
        if (todo or follow_last) and os.path.islink(here):
            hops += 1
            if hops > 64:
                fail("too many levels of symbolic links in " + path)
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = parts(target) + todo
            continue
        done.append(part)
    return os.path.join(DEST, *done)


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def clear(directory, keep):
    # An opaque whiteout: drop what lower layers put below `directory`.
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if path not in keep:
            remove(path)
        elif os.path.isdir(path) and not os.path.islink(path):
            clear(path, keep)


def apply(tar, digest):
    keep = set()  # what this layer wrote, and the directories above it
    for member in tar:
        names = parts(member.name)
        if ".." in names:
            fail("layer %s has an entry outside the image: %r" % (digest, member.name))
        if not names:
            continue
        where, base = inside("/".join(names[:-1]), True), names[-1]
        if base.startswith(".wh."):
            if base == ".wh..wh..opq":
                if os.path.isdir(where) and not os.path.islink(where):
                    clear(where, keep)
            elif not base.startswith(".wh..wh."):
                victim = os.path.join(where, base[len(".wh."):])
                if victim not in keep:
                    remove(victim)
            continue
        target = os.path.join(where, base)
        if os.path.lexists(target) and not (
            member.isdir() and os.path.isdir(target) and not os.path.islink(target)
        ):
            remove(target)
        if member.islnk():
            member.linkname = os.path.relpath(inside(member.linkname, False), DEST)
        member.name = os.path.relpath(target, DEST)
        tar.extract(member, DEST, numeric_owner=True, **TRUSTED)
        while target != DEST and target not in keep:
            keep.add(target)
            target = os.path.dirname(target)


def unpack(layer):
    digest, kind = layer["digest"], layer.get("mediaType", "")
    path = blob(digest)
    if kind.endswith("zstd"):
        try:
            zstd = subprocess.Popen(["zstd", "-dcq", path], stdout=subprocess.PIPE)
        except OSError:
            fail("layer %s is zstd-compressed and the builder has no zstd command; "
                 "use a source AMI with zstd installed" % digest)
        with tarfile.open(fileobj=zstd.stdout, mode="r|") as tar:
            apply(tar, digest)
        for _ in iter(lambda: zstd.stdout.read(1 << 16), b""):
            pass
        if zstd.wait() != 0:
            fail("zstd cannot decompress layer " + digest)
    elif kind.endswith("gzip"):
        with tarfile.open(path, mode="r|gz") as tar:
            apply(tar, digest)
    elif kind.endswith("tar"):
        with tarfile.open(path, mode="r|") as tar:
            apply(tar, digest)
    else:
        fail("layer %s has media type %r, which kiln cannot unpack" % (digest, kind))


def entry(path, key, column):
    try:
        with open(inside(path, True)) as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) > 3 and fields[column] == key:
                    return fields
    except OSError:
        pass
    return None


def owner(spec):
    # Docker's rules for the image's User: a name or uid, then optionally :group or :gid.
    user, _, group = spec.partition(":")
    row = entry("/etc/passwd", user, 2 if user.isdigit() else 0)
    if user.isdigit():
        uid, gid = int(user), int(row[3]) if row else 0
    elif row:
        uid, gid = int(row[2]), int(row[3])
    else:
        fail("the image runs as user %r, which its /etc/passwd does not have" % user)
    if group.isdigit():
        gid = int(group)
    elif group:
        row = entry("/etc/group", group, 0)
        if not row:
            fail("the image runs as group %r, which its /etc/group does not have" % group)
        gid = int(row[2])
    return uid, gid


def escape(value):
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


with open(os.path.join(LAYOUT, "index.json"), "rb") as f:
    index = json.loads(f.read().decode("utf-8"))
if DIGEST not in [m.get("digest") for m in index.get("manifests", [])]:
    fail("the archive does not hold image " + DIGEST)
manifest = load(DIGEST)
config = load(manifest["config"]["digest"]).get("config") or {}
for layer in manifest.get("layers", []):
    unpack(layer)

unit = ["[Service]"]
for pair in config.get("Env") or []:
    if "=" in pair and "\n" not in pair:
        unit.append('Environment="%s"' % escape(pair))
workdir = config.get("WorkingDir") or ""
if workdir.startswith("/"):
    os.makedirs(inside(workdir, True), exist_ok=True)
    unit.append("WorkingDirectory=" + escape(workdir))
if config.get("User"):
    uid, gid = owner(config["User"])
    unit.extend(["User=%d" % uid, "Group=%d" % gid])
with open(DROPIN, "w") as f:
    f.write("\n".join(unit) + "\n")

command = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
if any("\n" in arg for arg in command):
    fail("the image's command has an argument with a newline; /etc/kiln/image.cmd cannot hold it")
with open(IMAGE_CMD, "w") as f:
    f.write("".join(arg + "\n" for arg in command))
"#;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn sample() -> AmiBake {
        AmiBake {
            project: "shop".to_owned(),
            image: "web".to_owned(),
            digest: DIGEST.to_owned(),
            version: Some("1.4.2".to_owned()),
            commit: Some("4f2a9c1".to_owned()),
            source: SourceAmi::Id("ami-0123456789abcdef0".to_owned()),
            instance_type: "t3.small".to_owned(),
            subnet: Some("subnet-0abc".to_owned()),
            security_groups: vec!["sg-0abc".to_owned()],
            iam_instance_profile: Some("kiln-builder".to_owned()),
            artifact_bucket: "acme-kiln-artifacts".to_owned(),
            archive: PathBuf::from("/nonexistent/kiln/web.tar"),
            install: vec!["dnf install -y htop".to_owned()],
            build_id: "build-1".to_owned(),
            tags: BTreeMap::from([("team".to_owned(), "payments".to_owned())]),
            poll: Duration::from_secs(5),
            max_polls: 120,
        }
    }

    #[test]
    fn inputs_hash_is_stable_and_covers_every_input() {
        let base = sample();
        let hash = inputs_hash(&base, "ami-1");
        assert_eq!(hash.len(), 64);
        assert_eq!(hash, inputs_hash(&base, "ami-1"));
        // Pinned: a change here rebuilds every AMI, so it must come with a reason (and then
        // usually an INSTALL_SCRIPT_VERSION bump instead of an encoding change).
        assert_eq!(
            hash,
            "dc0b5831106533c39f9f84c1f6892c943bcc8f8cdcd9a8d8ab87e14d88bb16ac"
        );

        // What does not change the AMI's content does not change the hash.
        let mut same = base.clone();
        same.build_id = "build-2".to_owned();
        same.tags.insert("owner".to_owned(), "bob".to_owned());
        same.subnet = None;
        same.security_groups.clear();
        same.iam_instance_profile = None;
        same.artifact_bucket = "other".to_owned();
        same.version = None;
        same.commit = None;
        same.poll = Duration::from_secs(1);
        assert_eq!(inputs_hash(&same, "ami-1"), hash);

        // Everything that does, does.
        assert_ne!(inputs_hash(&base, "ami-2"), hash);
        let variants: [fn(&mut AmiBake); 4] = [
            |b| b.digest = DIGEST.replace("0123", "3210"),
            |b| b.instance_type = "t3.large".to_owned(),
            |b| b.install.push("true".to_owned()),
            |b| b.install[0].push(' '),
        ];
        for change in variants {
            let mut other = base.clone();
            change(&mut other);
            assert_ne!(inputs_hash(&other, "ami-1"), hash);
        }
        // Lines are hashed as lines: splitting one differently changes the hash.
        let mut joined = base.clone();
        joined.install = vec!["a".to_owned(), "b".to_owned()];
        let mut split = base;
        split.install = vec!["ab".to_owned()];
        assert_ne!(inputs_hash(&joined, "ami-1"), inputs_hash(&split, "ami-1"));
    }

    #[test]
    fn install_script_installs_the_image_and_its_unit() {
        let bake = sample();
        let hex = DIGEST.trim_start_matches("sha256:");
        let script = install_script(&bake, &format!("kiln/shop/images/{hex}.tar"));
        let lines: Vec<&str> = script.lines().collect();
        let has = |line: &str| assert!(lines.contains(&line), "no line `{line}` in:\n{script}");
        assert_eq!(lines[1], "set -eu");
        has(&format!("kiln_digest='{DIGEST}'"));
        has(&format!("kiln_root='/opt/kiln/images/{hex}'"));
        has(&format!(
            "aws s3 cp --only-show-errors 's3://acme-kiln-artifacts/kiln/shop/images/{hex}.tar' \"$kiln_work/image.tar\""
        ));
        has("tar -xf \"$kiln_work/image.tar\" -C \"$kiln_work/layout\" --no-same-owner");
        has("KILN_UNPACK");
        has("mv \"$kiln_root/rootfs.partial\" \"$kiln_root/rootfs\"");
        has("printf '%s\\n' \"$kiln_digest\" > /etc/kiln/image");
        has(&format!("RootDirectory=/opt/kiln/images/{hex}/rootfs"));
        has("ReadOnlyPaths=/");
        has("EnvironmentFile=-/etc/kiln/app.env");
        has("Restart=always");
        has("umask 022");
        has("ExecStartPre=-+/bin/chmod 0644 /etc/kiln/app.cmd");
        has("ExecStart=/run/kiln/kiln-app");
        has("BindReadOnlyPaths=-/etc/kiln/app.cmd:/run/kiln/app.cmd -/etc/resolv.conf -/etc/hosts");
        has("systemctl enable kiln-app.service");
        // The install lines come last, after the unit is enabled.
        assert_eq!(lines.last(), Some(&"dnf install -y htop"));
        // Every heredoc is closed.
        for end in ["KILN_UNPACK", "KILN_APP", "KILN_UNIT"] {
            assert_eq!(lines.iter().filter(|l| **l == end).count(), 1, "{end}");
        }
    }

    #[test]
    fn install_script_refuses_an_invalid_digest() {
        let mut bake = sample();
        bake.digest = "sha256:nope'; rm -rf /".to_owned();
        let script = install_script(&bake, "k");
        assert!(script.ends_with("exit 1\n"), "{script}");
        assert!(!script.contains("aws s3"), "{script}");
    }

    #[test]
    fn names_fit_aws_limits() {
        let mut bake = sample();
        let hash = "a".repeat(64);
        assert_eq!(ami_name(&bake, &hash), "kiln-shop-web-1.4.2-aaaaaaaaaaaa");
        bake.version = None;
        assert_eq!(
            ami_name(&bake, &hash),
            "kiln-shop-web-untagged-aaaaaaaaaaaa"
        );
        bake.image = "w".repeat(128);
        let long = ami_name(&bake, &hash);
        assert_eq!(long.len(), 128);
        assert!(long.ends_with("-aaaaaaaaaaaa"));
    }

    #[test]
    fn check_refuses_bad_inputs_before_anything_is_created() {
        let refuse = |change: fn(&mut AmiBake), needle: &str| {
            let mut bake = sample();
            change(&mut bake);
            let err = check(&bake).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} does not mention {needle}");
        };
        refuse(|b| b.digest = "sha256:abc".to_owned(), "invalid digest");
        refuse(
            |b| b.project = "my project".to_owned(),
            "project `my project`",
        );
        refuse(
            |b| b.version = Some("1.0+build".to_owned()),
            "version `1.0+build`",
        );
        refuse(|b| b.build_id = String::new(), "build id");
        refuse(|b| b.max_polls = 0, "max_polls");
        refuse(
            |b| {
                b.tags.insert("kiln:digest".to_owned(), "x".to_owned());
            },
            "reserved",
        );
        refuse(
            |b| {
                b.tags.insert("AWS:x".to_owned(), "x".to_owned());
            },
            "reserved",
        );
        refuse(
            |b| {
                for i in 0..45 {
                    b.tags.insert(format!("t{i}"), "x".to_owned());
                }
            },
            "over EC2's 50",
        );
        // Everything else is fine; only the archive is missing.
        refuse(|_| {}, "cannot read the archive /nonexistent/kiln/web.tar");
    }

    #[test]
    fn output_is_cut_from_the_front() {
        assert_eq!(tail("short\n"), "short");
        let long = format!("{}é{}", "x".repeat(3000), "y".repeat(2047));
        let cut = tail(&long);
        assert!(cut.starts_with('…'));
        assert!(cut.ends_with(&"y".repeat(2047)));
        assert!(cut.len() <= OUTPUT_LIMIT + '…'.len_utf8());
    }

    #[test]
    fn describes_filters_for_people() {
        let filters = BTreeMap::from([
            ("architecture".to_owned(), vec!["x86_64".to_owned()]),
            (
                "name".to_owned(),
                vec!["al2023-*".to_owned(), "al2-*".to_owned()],
            ),
        ]);
        assert_eq!(
            describe_filters(&filters, &["amazon".to_owned()]),
            "filters architecture=[x86_64] name=[al2023-*, al2-*] owned by [amazon]"
        );
        assert_eq!(
            describe_filters(&BTreeMap::new(), &[]),
            "no filters (any owner)"
        );
    }
}
