//! `kiln rollback`: back to the previous release, or any release the state still has.
//!
//! While the release rolled back to is still warm (a canary or blue/green promoted less than
//! `scale_down_delay` ago), only traffic moves: the rollout is aborted, which is one switch in
//! the proxy. Otherwise the old release's image is launched again — verified against its digest
//! as every launch is — at full size, checked healthy, and then every request is switched to it
//! at once. Either way history stays linear: the second case is recorded as a new release
//! (`rollback_of` names the release it repeats), and the release left behind is marked
//! `rolled_back`.

use std::time::SystemTime;

use kiln_core::model::Strategy;
use kiln_core::rollout::{self, Command};
use kiln_core::state::{Release, ReleaseStatus};

use crate::api::{RollbackRequest, RollbackResponse};
use crate::engine::{Engine, ms, rfc3339};
use crate::error::{Error, Result};

impl Engine {
    /// Rolls `service` back to `to` (default: the release that served before the current one).
    pub async fn rollback(&self, req: RollbackRequest) -> Result<RollbackResponse> {
        let mut world = self.shared.world.lock().await;
        let now = self.shared.clock.now();
        let service = world
            .state
            .services
            .get(&req.service)
            .ok_or_else(|| Error::NotFound(format!("no service `{}`", req.service)))?;
        let stable = service.stable.ok_or_else(|| {
            Error::Conflict(format!(
                "service `{}` has no release serving yet",
                req.service
            ))
        })?;
        let target = match req.to {
            Some(n) => service
                .releases
                .iter()
                .find(|r| r.number == n)
                .ok_or_else(|| {
                    Error::NotFound(format!("service `{}` has no release v{n}", req.service))
                })?,
            None => service
                .releases
                .iter()
                .rev()
                .find(|r| {
                    // The release that served before: not one that never served or was itself
                    // rolled back.
                    r.number < stable
                        && !matches!(
                            r.status,
                            ReleaseStatus::Failed
                                | ReleaseStatus::Pending
                                | ReleaseStatus::RolledBack
                        )
                })
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "service `{}` has no earlier release to roll back to",
                        req.service
                    ))
                })?,
        }
        .clone();

        self.refuse_revoked(&req.service, &target.image_digest, "rollback", now)?;
        if let Some(journal) = service.rollout.clone() {
            let warm = crate::reconcile::is_warm(&journal);
            if warm && journal.from == Some(target.number) {
                // Promoted, and the release asked for still runs warm: moving traffic back is
                // an abort, one switch in the proxy.
                drop(world);
                self.command_by(&req.service, Command::Abort, &req.actor)
                    .await?;
                return Ok(RollbackResponse {
                    release: target.number,
                    warm: true,
                });
            }
            if !warm {
                return Err(Error::Conflict(format!(
                    "service `{}` has a rollout to v{} in progress; stop it with `kiln rollout abort {}`",
                    req.service, journal.to, req.service
                )));
            }
            self.end_warm_period(&mut world, &req.service);
        }
        let stable = world.state.services[&req.service].stable.unwrap_or(stable);
        if target.number == stable {
            return Err(Error::Conflict(format!(
                "v{stable} of `{}` is already the release serving",
                req.service
            )));
        }
        if self.shared.images.image(&target.image_digest)?.is_none() {
            return Err(Error::ImageMissing(target.image_digest.clone()));
        }

        self.take_lock(
            &mut world,
            "rollback",
            &req.actor,
            format!("{} to v{}", req.service, target.number),
            now,
        )?;
        let number = self.record_rollback(&mut world, &req, &target, stable, now);
        world.dirty = true;
        self.persist(&mut world, "rollback")?;
        drop(world);
        self.wake();
        Ok(RollbackResponse {
            release: number,
            warm: false,
        })
    }

    /// Records release vN+1 repeating `target` and a blue/green journal that brings it up at
    /// full size and switches every request to it once it is healthy.
    fn record_rollback(
        &self,
        world: &mut crate::engine::World,
        req: &RollbackRequest,
        target: &Release,
        stable: u32,
        now: SystemTime,
    ) -> u32 {
        let deployment_id = uuid::Uuid::new_v4().to_string();
        let service = world
            .state
            .services
            .get_mut(&req.service)
            .expect("checked by the caller");
        let number = service.releases.last().map_or(1, |r| r.number + 1);
        let mut spec = service.spec.clone();
        spec.image = target.image.clone();
        spec.image_digest = target.image_digest.clone();
        spec.port = target.port;
        spec.env = target.env.clone();
        spec.health = target.health.clone();
        service.releases.push(Release {
            number,
            deployment_id: deployment_id.clone(),
            created_at: rfc3339(now),
            actor: req.actor.clone(),
            status: ReleaseStatus::Pending,
            rollback_of: Some(target.number),
            ..target.clone()
        });
        // What runs is now the old release: a plan shows the config's release as a change again.
        service.spec = spec.clone();
        let mut switch = spec;
        switch.rollout.strategy = Strategy::BlueGreen;
        switch.rollout.auto_promote = true;
        switch.rollout.analysis = None;
        switch.rollout.steps.clear();
        let journal = rollout::start(
            &deployment_id,
            &req.service,
            Some(stable),
            number,
            &switch,
            ms(now),
        );
        service.rollout = Some(journal);
        world.event_by(
            &req.actor,
            Some(&req.service),
            "rollback",
            format!(
                "rolling back from v{stable} to v{} as release v{number}",
                target.number
            ),
        );
        number
    }
}
