//! [`AwsDriver`]: kiln's instances as EC2 instances, one Auto Scaling group per release.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::plan::GROUP_SUBJECT;
use kiln_driver::{
    Driver, DriverError, GroupExpectation, GroupFinding, Handle, InstanceSpec, Mismatch,
    MismatchKind, Observed, Status,
};
use serde::{Deserialize, Serialize};

use super::AwsRuntime;
use crate::fleet::{
    GroupView, InstanceState, InstanceView, MANAGED_BY, ReleaseSpec, TAG_INSTANCE, TAG_MANAGED_BY,
};

/// The driver's name in state and `kiln status`.
const NAME: &str = "aws";

/// Environment variables the instance sets itself at boot: on AWS, an instance's id is its
/// EC2 instance id, which the launch template cannot know.
const SET_AT_BOOT: &[&str] = &["KILN_INSTANCE_ID"];

/// What the driver keeps in a [`Handle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AwsHandle {
    /// The EC2 instance id.
    instance_id: String,
    /// The release's Auto Scaling group.
    asg: String,
    /// The release's target group.
    target_group: String,
    /// The AMI it was launched from.
    #[serde(default)]
    ami: String,
    /// Its release's launch template version.
    #[serde(default)]
    launch_template_version: i64,
}

/// kiln's runtime driver on AWS. An instance is an EC2 instance launched from its release's
/// launch template version and attached to its release's Auto Scaling group (the group holds
/// the release's instances, registers them in its target group, and has its `Launch` and
/// `ReplaceUnhealthy` processes suspended: kiln's engine alone starts and replaces
/// instances, by the same rules as on the local runtime).
///
/// `start` needs the release's image baked as an AMI (`kiln bake` of an image with
/// `target = target.aws`): the AMI is found by the image's digest.
#[derive(Debug, Clone)]
pub struct AwsDriver {
    rt: Arc<AwsRuntime>,
}

impl AwsDriver {
    /// A driver on `rt`; learns what the project already has on AWS first.
    pub fn new(rt: Arc<AwsRuntime>) -> Result<Self, crate::Error> {
        let learner = rt.clone();
        rt.block(async move { learner.learn().await })?;
        Ok(Self { rt })
    }

    fn handle_of(handle: &Handle) -> Result<AwsHandle, DriverError> {
        serde_json::from_value(handle.data.clone()).map_err(|e| DriverError::BadHandle {
            id: handle.id.clone(),
            driver: NAME,
            reason: e.to_string(),
        })
    }

    fn runtime_error(op: &'static str, id: &str, err: &crate::Error) -> DriverError {
        DriverError::Runtime {
            op,
            id: id.to_owned(),
            source: std::io::Error::other(err.to_string()),
            retryable: matches!(err, crate::Error::Aws { .. }),
        }
    }
}

/// The launch template's user data for a release: writes the app's environment and command
/// where `kiln-app.service` (installed on the AMI by `kiln bake`) reads them, then starts it.
/// `KILN_INSTANCE_ID` is set at boot to the EC2 instance id.
///
/// The environment is in the user data, which anyone allowed `ec2:DescribeLaunchTemplateVersions`
/// can read: keep secrets out of a service's `env` on AWS.
pub fn user_data(spec: &InstanceSpec) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!(
        "# kiln: {} v{} (deployment {})\nset -eu\numask 077\nmkdir -p /etc/kiln\n",
        spec.service, spec.release, spec.release_info.deployment_id
    ));
    s.push_str("cat > /etc/kiln/app.env <<'KILN_ENV'\n");
    for (key, value) in &spec.env {
        if SET_AT_BOOT.contains(&key.as_str()) {
            continue;
        }
        s.push_str(&format!("{key}={}\n", systemd_quote(value)));
    }
    s.push_str("KILN_ENV\n");
    s.push_str(
        "iid=$(cat /var/lib/cloud/data/instance-id 2>/dev/null || curl -fsS -m 2 http://169.254.169.254/latest/meta-data/instance-id || echo unknown)\n",
    );
    s.push_str("echo \"KILN_INSTANCE_ID=$iid\" >> /etc/kiln/app.env\n");
    // The command is no secret, and an image running as another user reads it.
    s.push_str("umask 022\ncat > /etc/kiln/app.cmd <<'KILN_CMD'\n");
    for arg in &spec.args {
        // One argument per line; the launcher reads them back verbatim.
        s.push_str(&arg.replace('\n', " "));
        s.push('\n');
    }
    s.push_str("KILN_CMD\n");
    s.push_str("systemctl restart kiln-app.service\n");
    s
}

/// A value for a systemd `EnvironmentFile=` line: double-quoted, `\` and `"` escaped.
fn systemd_quote(value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// The inverse of [`systemd_quote`]'s escaping, in one pass.
fn systemd_unquote(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Reads back the command [`user_data`] wrote, one argument per line.
fn args_of_user_data(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("cat > /etc/kiln/app.cmd"))
        .skip(1)
        .take_while(|l| *l != "KILN_CMD")
        .map(str::to_owned)
        .collect()
}

/// Reads back the environment [`user_data`] wrote (for drift checks).
fn env_of_user_data(text: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("cat > /etc/kiln/app.env") {
            inside = true;
            continue;
        }
        if line == "KILN_ENV" {
            break;
        }
        if !inside {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            env.insert(key.to_owned(), systemd_unquote(value));
        }
    }
    env
}

impl Driver for AwsDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn host_ports(&self) -> bool {
        false
    }

    fn start(&self, spec: &InstanceSpec) -> Result<Handle, DriverError> {
        spec.validate()?;
        let info = &spec.release_info;
        let rt = self.rt.clone();
        let digest = info.image_digest.clone();
        let ami = rt
            .block({
                let rt = rt.clone();
                async move { rt.ami(&digest).await }
            })
            .map_err(|e| Self::runtime_error("find the AMI of", &spec.id, &e))?
            .ok_or_else(|| DriverError::InvalidSpec {
                id: spec.id.clone(),
                reason: format!(
                    "image {} has no AMI in this account and region; bake it with `kiln bake` (its image block needs `target = target.aws`)",
                    info.image_digest
                ),
            })?;
        let resources = match rt.release(&spec.service, spec.release) {
            Some(r) => r,
            None => {
                let release = ReleaseSpec {
                    service: spec.service.clone(),
                    release: spec.release,
                    ami: ami.clone(),
                    port: spec.port,
                    health_path: info.health_path.clone().unwrap_or_else(|| "/".to_owned()),
                    user_data: user_data(spec),
                    max_size: info.max_instances.max(1),
                    deployment_id: info.deployment_id.clone(),
                    commit: info.commit.clone(),
                };
                let fleet_rt = rt.clone();
                let made = rt
                    .block(async move { fleet_rt.fleet.ensure_release(&release).await })
                    .map_err(|e| Self::runtime_error("create the release of", &spec.id, &e))?;
                rt.remember_release(&spec.service, spec.release, made.clone());
                made
            }
        };
        let ami = match rt.release_ami(&spec.service, spec.release) {
            Some(a) => a,
            None => {
                rt.remember_release_ami(&spec.service, spec.release, &ami);
                ami
            }
        };
        let fleet_rt = rt.clone();
        let res = resources.clone();
        let id = spec.id.clone();
        let ec2_id = rt
            .block(async move { fleet_rt.fleet.launch(&res, &id).await })
            .map_err(|e| Self::runtime_error("start", &spec.id, &e))?;
        rt.remember_instance(&spec.id, &ec2_id);
        rt.set_state(&ec2_id, InstanceState::Pending);
        let data = AwsHandle {
            instance_id: ec2_id,
            asg: resources.asg_name,
            target_group: resources.target_group_arn,
            ami,
            launch_template_version: resources.launch_template_version,
        };
        Ok(Handle {
            id: spec.id.clone(),
            data: serde_json::to_value(data).map_err(|e| DriverError::Runtime {
                op: "record",
                id: spec.id.clone(),
                source: std::io::Error::other(e),
                retryable: false,
            })?,
        })
    }

    fn status(&self, handle: &Handle) -> Result<Status, DriverError> {
        let h = Self::handle_of(handle)?;
        let rt = self.rt.clone();
        let seen = rt
            .block({
                let rt = rt.clone();
                async move { rt.state_of(&h.instance_id).await }
            })
            .map_err(|e| Self::runtime_error("look at", &handle.id, &e))?;
        Ok(match seen {
            Some(InstanceState::Pending | InstanceState::Running) => Status::Running,
            Some(InstanceState::Terminated) | None => Status::Gone,
            Some(_) => Status::Exited { code: None },
        })
    }

    fn observe(&self, handle: &Handle) -> Result<Observed, DriverError> {
        let h = Self::handle_of(handle)?;
        let rt = self.rt.clone();
        let seen = rt
            .block({
                let rt = rt.clone();
                let id = h.instance_id.clone();
                async move { rt.fleet.instance(&id).await }
            })
            .map_err(|e| Self::runtime_error("observe", &handle.id, &e))?;
        let Some(seen) =
            seen.filter(|v| matches!(v.state, InstanceState::Pending | InstanceState::Running))
        else {
            return Err(DriverError::NotRunning {
                id: handle.id.clone(),
            });
        };
        // The environment an EC2 instance was given is its launch template version's user
        // data; what the process holds now is not visible through AWS's API.
        let user_data = match &seen.launch_template {
            Some((lt, version)) => {
                let (lt, version) = (lt.clone(), version.clone());
                let fleet_rt = rt.clone();
                rt.block(async move { fleet_rt.launch_user_data(&lt, &version).await })
                    .map_err(|e| Self::runtime_error("observe", &handle.id, &e))?
            }
            None => None,
        };
        let mut env = user_data
            .as_deref()
            .map(env_of_user_data)
            .unwrap_or_default();
        // kiln's own id of the instance is its tag (the app sees the EC2 id).
        if let Some(id) = seen.tags.get(TAG_INSTANCE) {
            env.insert("KILN_INSTANCE_ID".to_owned(), id.clone());
        }
        Ok(Observed {
            env,
            args: user_data
                .as_deref()
                .map(args_of_user_data)
                .unwrap_or_default(),
            rootfs: None,
            root_is_rootfs: None,
            pid: None,
            mismatches: mismatches(&h, &handle.id, &seen),
        })
    }

    fn stop(&self, handle: &Handle, _grace: Duration) -> Result<(), DriverError> {
        let h = Self::handle_of(handle)?;
        let ec2_id = h.instance_id.clone();
        let rt = self.rt.clone();
        rt.block({
            let rt = rt.clone();
            async move { rt.fleet.terminate(&h.instance_id).await }
        })
        .map_err(|e| Self::runtime_error("stop", &handle.id, &e))?;
        self.rt.set_state(&ec2_id, InstanceState::Terminated);
        self.rt.forget_instance(&handle.id);
        Ok(())
    }

    fn check_groups(
        &self,
        expected: &[GroupExpectation],
    ) -> Result<Vec<GroupFinding>, DriverError> {
        let rt = self.rt.clone();
        let groups = rt
            .block({
                let rt = rt.clone();
                async move { rt.fleet.groups().await }
            })
            .map_err(|e| Self::runtime_error("list the groups of", "*", &e))?;
        Ok(Self::group_findings(expected, &groups))
    }

    fn repair_group(&self, expected: &GroupExpectation) -> Result<(), DriverError> {
        let rt = self.rt.clone();
        let want = expected.clone();
        rt.block({
            let rt = rt.clone();
            async move {
                let fleet = &rt.fleet;
                let name = fleet.asg_name(&want.service, want.release);
                let count = i32::try_from(want.instances.len()).unwrap_or(i32::MAX);
                let max = i32::try_from(want.max_instances)
                    .unwrap_or(i32::MAX)
                    .max(count);
                fleet.set_capacity(&name, 0, max, count).await?;
                fleet.suspend_processes(&name).await
            }
        })
        .map_err(|e| Self::runtime_error("set back the group of", &expected.service, &e))
    }

    fn running(&self) -> Result<Vec<Handle>, DriverError> {
        let rt = self.rt.clone();
        let instances = rt
            .block({
                let rt = rt.clone();
                async move { rt.fleet.instances().await }
            })
            .map_err(|e| Self::runtime_error("list", "*", &e))?;
        let mut handles = Vec::new();
        for i in instances {
            if !matches!(i.state, InstanceState::Pending | InstanceState::Running) {
                continue;
            }
            // An instance of the project kiln did not start (one its group launched after a
            // hand-made resize, say) is listed under its EC2 id: the engine finds it
            // unmanaged and stops it.
            let id = i
                .tags
                .get(TAG_INSTANCE)
                .cloned()
                .unwrap_or_else(|| i.instance_id.clone());
            let (asg, target_group) = i
                .tags
                .get(crate::fleet::TAG_SERVICE)
                .zip(
                    i.tags
                        .get(crate::fleet::TAG_RELEASE)
                        .and_then(|r| r.parse::<u32>().ok()),
                )
                .and_then(|(s, r)| self.rt.release(s, r))
                .map(|r| (r.asg_name, r.target_group_arn))
                .unwrap_or_default();
            self.rt.remember_instance(&id, &i.instance_id);
            let data = AwsHandle {
                instance_id: i.instance_id,
                asg,
                target_group,
                // As `start` recorded them: the same values while nothing drifted.
                launch_template_version: i
                    .launch_template
                    .as_ref()
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or_default(),
                ami: i.image_id.unwrap_or_default(),
            };
            handles.push(Handle {
                id,
                data: serde_json::to_value(data).map_err(|e| DriverError::Runtime {
                    op: "list",
                    id: "*".to_owned(),
                    source: std::io::Error::other(e),
                    retryable: false,
                })?,
            });
        }
        Ok(handles)
    }
}

/// How an instance differs from what it was launched as: another AMI, another launch
/// template version, kiln's tags gone or changed.
fn mismatches(h: &AwsHandle, kiln_id: &str, seen: &InstanceView) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let image = |subject: &str, expected: String, found: String| Mismatch {
        kind: MismatchKind::Image,
        subject: subject.to_owned(),
        expected,
        found,
    };
    let found_ami = seen.image_id.clone().unwrap_or_default();
    if !h.ami.is_empty() && found_ami != h.ami {
        out.push(image("ami", h.ami.clone(), found_ami));
    }
    if h.launch_template_version > 0
        && let Some((_, version)) = &seen.launch_template
        && version != &h.launch_template_version.to_string()
    {
        out.push(image(
            "launch template version",
            h.launch_template_version.to_string(),
            version.clone(),
        ));
    }
    let tag = |key: &str, want: &str| {
        let got = seen.tags.get(key).map(String::as_str);
        (got != Some(want)).then(|| Mismatch {
            kind: MismatchKind::Config,
            subject: format!("tag {key}"),
            expected: want.to_owned(),
            found: got.map_or_else(|| "no tag".to_owned(), str::to_owned),
        })
    };
    out.extend(tag(TAG_INSTANCE, kiln_id));
    if let Some(m) = tag(TAG_MANAGED_BY, MANAGED_BY) {
        out.push(m);
    }
    out
}

impl AwsDriver {
    /// The Auto Scaling groups of the project, compared with what the engine expects.
    fn group_findings(expected: &[GroupExpectation], groups: &[GroupView]) -> Vec<GroupFinding> {
        let mut out = Vec::new();
        for g in groups {
            let (Some(service), Some(release)) = (g.service.clone(), g.release) else {
                continue;
            };
            let finding = |what: &str, expected: String, found: String| GroupFinding {
                service: service.clone(),
                release: Some(release),
                subject: format!("{GROUP_SUBJECT}{} {what}", g.name),
                expected,
                found,
            };
            let Some(want) = expected
                .iter()
                .find(|e| e.service == service && e.release == release)
            else {
                // A release kiln runs nothing of: its group should be empty, and goes once
                // the release leaves the traffic tables.
                if g.desired > 0 {
                    out.push(finding(
                        "desired capacity",
                        "0".to_owned(),
                        g.desired.to_string(),
                    ));
                }
                continue;
            };
            let count = i32::try_from(want.instances.len()).unwrap_or(i32::MAX);
            if g.desired != count {
                out.push(finding(
                    "desired capacity",
                    count.to_string(),
                    g.desired.to_string(),
                ));
            }
            if g.min != 0 {
                out.push(finding("min size", "0".to_owned(), g.min.to_string()));
            }
            let max = i32::try_from(want.max_instances).unwrap_or(i32::MAX);
            if g.max < count {
                out.push(finding(
                    "max size",
                    format!("at least {count}"),
                    g.max.to_string(),
                ));
            } else if g.max != max && g.max < max {
                out.push(finding("max size", max.to_string(), g.max.to_string()));
            }
            for process in crate::fleet::SUSPENDED_PROCESSES {
                if !g.suspended.iter().any(|p| p == process) {
                    out.push(finding(
                        &format!("process {process}"),
                        "suspended (kiln alone launches and replaces instances)".to_owned(),
                        "running".to_owned(),
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_the_environment_and_leaves_the_instance_id_to_boot() {
        let spec = InstanceSpec::new("web-v2-abc", "web", 2, 8080)
            .with_args(["/bin/sh", "-c", "exec httpd -p \"$PORT\""])
            .with_env("GREETING", "hello \"world\"\\n")
            .with_env("EMPTY", "");
        let text = user_data(&spec);
        let env = env_of_user_data(&text);
        assert_eq!(
            env.get("GREETING").map(String::as_str),
            Some("hello \"world\"\\n")
        );
        assert_eq!(env.get("EMPTY").map(String::as_str), Some(""));
        assert_eq!(env.get("PORT").map(String::as_str), Some("8080"));
        assert!(!env.contains_key("KILN_INSTANCE_ID"), "{text}");
        assert_eq!(args_of_user_data(&text), spec.args);
        assert!(
            text.contains("\n/bin/sh\n-c\nexec httpd -p \"$PORT\"\nKILN_CMD\n"),
            "{text}"
        );
    }

    fn group(desired: i32, suspended: &[&str]) -> GroupView {
        GroupView {
            name: "kiln-shop-web-v2".into(),
            service: Some("web".into()),
            release: Some(2),
            min: 0,
            max: 3,
            desired,
            instances: Vec::new(),
            target_groups: Vec::new(),
            suspended: suspended.iter().map(|s| (*s).to_owned()).collect(),
            launch_template: None,
            tags: BTreeMap::new(),
        }
    }

    fn expect(instances: usize) -> GroupExpectation {
        GroupExpectation {
            service: "web".into(),
            release: 2,
            instances: (0..instances)
                .map(|i| Handle {
                    id: format!("web-v2-{i}"),
                    data: serde_json::Value::Null,
                })
                .collect(),
            max_instances: 3,
        }
    }

    #[test]
    fn a_resized_group_and_a_resumed_process_are_findings() {
        let all = crate::fleet::SUSPENDED_PROCESSES;
        assert!(AwsDriver::group_findings(&[expect(2)], &[group(2, &all)]).is_empty());

        let found = AwsDriver::group_findings(&[expect(2)], &[group(4, &all[1..])]);
        let subjects: Vec<(&str, &str, &str)> = found
            .iter()
            .map(|f| (f.subject.as_str(), f.expected.as_str(), f.found.as_str()))
            .collect();
        assert_eq!(
            subjects,
            [
                ("group kiln-shop-web-v2 desired capacity", "2", "4"),
                (
                    "group kiln-shop-web-v2 process Launch",
                    "suspended (kiln alone launches and replaces instances)",
                    "running"
                ),
            ]
        );
        // The group of a release kiln runs nothing of must be empty.
        let stale = AwsDriver::group_findings(&[], &[group(1, &all)]);
        assert_eq!(stale.len(), 1);
        assert_eq!(
            (stale[0].expected.as_str(), stale[0].found.as_str()),
            ("0", "1")
        );
    }

    #[test]
    fn another_ami_or_missing_tags_are_mismatches() {
        let h = AwsHandle {
            instance_id: "i-1".into(),
            asg: "kiln-shop-web-v2".into(),
            target_group: "arn:tg".into(),
            ami: "ami-1".into(),
            launch_template_version: 2,
        };
        let mut seen = InstanceView {
            instance_id: "i-1".into(),
            state: InstanceState::Running,
            image_id: Some("ami-1".into()),
            launch_template: Some(("lt-1".into(), "2".into())),
            asg: None,
            private_ip: None,
            tags: BTreeMap::from([
                (TAG_INSTANCE.to_owned(), "web-v2-a".to_owned()),
                (TAG_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            ]),
        };
        assert!(mismatches(&h, "web-v2-a", &seen).is_empty());
        seen.image_id = Some("ami-9".into());
        seen.launch_template = Some(("lt-1".into(), "7".into()));
        seen.tags.remove(TAG_INSTANCE);
        let found: Vec<(MismatchKind, String)> = mismatches(&h, "web-v2-a", &seen)
            .into_iter()
            .map(|m| (m.kind, m.subject))
            .collect();
        assert_eq!(
            found,
            [
                (MismatchKind::Image, "ami".to_owned()),
                (MismatchKind::Image, "launch template version".to_owned()),
                (MismatchKind::Config, format!("tag {TAG_INSTANCE}")),
            ]
        );
    }
}
