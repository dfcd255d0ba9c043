//! Launching an instance of a release: from the release's verified image, with its env and a
//! port of its own.

use std::time::SystemTime;

use kiln_bake::oci::ImageConfig;
use kiln_core::state::Instance;
use kiln_driver::InstanceSpec;

use crate::engine::{Engine, World, rfc3339};
use crate::error::{Error, Result};
use crate::reconcile::instance_mut;
use crate::rootfs;

impl Engine {
    /// Starts a new instance of `release`. The record is persisted before the process starts
    /// (with a null handle), so a crash in between leaves no instance that state does not know.
    /// A start that fails leaves the record with a null handle: the next observation sees it as
    /// exited, so rollouts and healing treat it like a crash.
    pub(crate) fn launch(
        &self,
        world: &mut World,
        service: &str,
        release: u32,
        now: SystemTime,
    ) -> Result<()> {
        let s = world
            .state
            .services
            .get(service)
            .ok_or_else(|| Error::NotFound(format!("no service `{service}`")))?;
        let rel = s
            .releases
            .iter()
            .find(|r| r.number == release)
            .ok_or_else(|| {
                Error::NotFound(format!("service `{service}` has no release v{release}"))
            })?
            .clone();
        let max_instances = s.spec.instances + s.spec.rollout.max_parallel.max(1);
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("{service}-v{release}-{}", &suffix[..6]);
        // On one host every instance needs a port of its own; a virtual machine has its own
        // address and listens on the service's port.
        let port = if self.shared.driver.host_ports() {
            kiln_driver::free_port().map_err(Error::io("find a free port on", "127.0.0.1"))?
        } else {
            rel.port
        };
        world
            .state
            .services
            .get_mut(service)
            .expect("checked above")
            .instances
            .push(Instance {
                id: id.clone(),
                release,
                port,
                handle: serde_json::Value::Null,
                routable: false,
                retiring: false,
                started_at: rfc3339(now),
                replace_because: None,
            });
        world.dirty = true;
        world.event(
            Some(service),
            "launch",
            format!("starting {id} (v{release}) on port {port}"),
        );
        self.persist(world, "launch")?;

        let started = self.start_process(service, &rel, &id, port, max_instances);
        match started {
            Ok(handle) => {
                if let Some(inst) = instance_mut(world, service, &id) {
                    inst.handle = serde_json::to_value(&handle)?;
                }
                world.dirty = true;
                Ok(())
            }
            Err(e) => {
                world.event(Some(service), "launch_failed", format!("{id}: {e}"));
                Err(e)
            }
        }
    }

    fn start_process(
        &self,
        service: &str,
        rel: &kiln_core::state::Release,
        id: &str,
        port: u16,
        max_instances: u32,
    ) -> Result<kiln_driver::Handle> {
        let images = &self.shared.images;
        let config = self.image_config(&rel.image_digest)?;
        let rootfs = rootfs::materialize(&self.shared.cfg.paths, images, &rel.image_digest)?;
        let env = instance_env(&config, service, rel, id, port);

        let mut args = config.config.entrypoint.clone().unwrap_or_default();
        args.extend(config.config.cmd.clone().unwrap_or_default());
        if args.is_empty() {
            return Err(Error::Conflict(format!(
                "image {} of service `{service}` has no entrypoint or cmd to run",
                rel.image_digest
            )));
        }
        let log_path = self.shared.cfg.paths.instance_log(service, id);
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        }
        let spec_root = rootfs.clone();
        let spec = InstanceSpec {
            id: id.to_owned(),
            service: service.to_owned(),
            release: rel.number,
            rootfs,
            args,
            env,
            workdir: config
                .config
                .working_dir
                .clone()
                .unwrap_or_else(|| "/".to_owned()),
            user: match &config.config.user {
                Some(u) if !u.is_empty() => Some(resolve_user(&spec_root, u)?),
                _ => None,
            },
            port,
            log_path,
            release_info: kiln_driver::ReleaseInfo {
                image_digest: rel.image_digest.to_string(),
                health_path: rel.health.as_ref().map(|h| h.path.clone()),
                max_instances,
                deployment_id: rel.deployment_id.clone(),
                commit: rel.git_commit.clone(),
            },
        };
        Ok(self.shared.driver.start(&spec)?)
    }
}

/// The numeric user of an image's `user` (`uid[:gid]`, or names looked up in the image's own
/// `/etc/passwd` and `/etc/group`).
fn resolve_user(rootfs: &std::path::Path, user: &str) -> Result<kiln_driver::User> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str, field: usize| -> Option<(u32, Option<u32>)> {
        let text = std::fs::read_to_string(rootfs.join(file)).ok()?;
        text.lines().find_map(|line| {
            let parts: Vec<&str> = line.split(':').collect();
            (parts.first() == Some(&name)).then(|| {
                let id = parts.get(field)?.parse().ok()?;
                Some((id, parts.get(3).and_then(|g| g.parse().ok())))
            })?
        })
    };
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => lookup("etc/passwd", u, 2).ok_or_else(|| {
            Error::Conflict(format!(
                "image user `{u}` is not in the image's /etc/passwd"
            ))
        })?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("etc/group", g, 2)
                .map(|(gid, _)| gid)
                .ok_or_else(|| {
                    Error::Conflict(format!(
                        "image group `{g}` is not in the image's /etc/group"
                    ))
                })?,
        },
        None => primary_gid.unwrap_or(uid),
    };
    Ok(kiln_driver::User { uid, gid })
}

/// The whole environment of an instance: the image's, then the release's, then kiln's own.
pub(crate) fn instance_env(
    config: &ImageConfig,
    service: &str,
    rel: &kiln_core::state::Release,
    id: &str,
    port: u16,
) -> std::collections::BTreeMap<String, String> {
    let mut env = config.config.env_map();
    env.extend(rel.env.clone());
    env.insert("PORT".to_owned(), port.to_string());
    env.insert("KILN_INSTANCE_ID".to_owned(), id.to_owned());
    env.insert("KILN_SERVICE".to_owned(), service.to_owned());
    env.insert("KILN_RELEASE".to_owned(), format!("v{}", rel.number));
    env
}

impl Engine {
    /// The run settings (entrypoint, cmd, env) of an image in the store.
    pub(crate) fn image_config(&self, image: &kiln_core::Digest) -> Result<ImageConfig> {
        let images = &self.shared.images;
        let record = images
            .image(image)?
            .ok_or_else(|| Error::ImageMissing(image.clone()))?;
        Ok(images.read_blob_json(&record.config_digest)?)
    }
}
