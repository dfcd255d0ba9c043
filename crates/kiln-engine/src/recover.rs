//! Starting again after a crash (or a plain restart): re-adopt what still runs, stop what
//! state does not know, and pick up the rollout in progress.

use std::collections::BTreeSet;

use kiln_driver::{Handle, Status};
use kiln_state::LockRequest;

use crate::engine::{Engine, actor};
use crate::error::Result;

impl Engine {
    /// Reconciles the state with what the driver finds running, then rebuilds the proxy.
    ///
    /// - an instance in state whose process still runs is re-adopted;
    /// - an instance in state that never got a process (the server died between writing its
    ///   record and starting it) is adopted if the driver knows it, else forgotten;
    /// - a process the driver started that state does not know is an orphan and is stopped;
    /// - an instance whose process is gone stays in state: the reconcile loop sees it exited
    ///   and replaces it, like any crash;
    /// - a rollout in progress takes the state lock again and resumes from its journal.
    pub async fn recover(&self) -> Result<()> {
        let mut world = self.shared.world.lock().await;
        let driver = self.shared.driver.clone();
        let running = tokio::task::spawn_blocking(move || driver.running())
            .await
            .map_err(|e| crate::Error::Conflict(format!("driver task failed: {e}")))??;
        let known: BTreeSet<String> = world
            .state
            .services
            .values()
            .flat_map(|s| s.instances.iter().map(|i| i.id.clone()))
            .collect();
        for handle in &running {
            if !known.contains(&handle.id) {
                world.event(
                    None,
                    "orphan",
                    format!("stopping {}: state does not know it", handle.id),
                );
                if let Err(e) = self.shared.driver.stop(handle, self.shared.cfg.stop_grace) {
                    tracing::warn!(instance = %handle.id, "stopping an orphan failed: {e}");
                }
            }
        }
        let mut adopted = 0;
        let mut changed = false;
        let now = self.shared.clock.now();
        for service in world.state.services.values_mut() {
            service.instances.retain_mut(|inst| {
                if inst.handle.is_null() {
                    changed = true;
                    match running.iter().find(|h| h.id == inst.id) {
                        Some(h) => {
                            inst.handle = serde_json::to_value(h).unwrap_or_default();
                            adopted += 1;
                            true
                        }
                        None => false,
                    }
                } else {
                    if let Ok(h) = serde_json::from_value::<Handle>(inst.handle.clone())
                        && matches!(self.shared.driver.status(&h), Ok(Status::Running))
                    {
                        adopted += 1;
                    }
                    true
                }
            });
            // A retirement that was under way is decided again from what is observed.
            for inst in service.instances.iter_mut().filter(|i| i.retiring) {
                inst.retiring = false;
                changed = true;
            }
            // Actions the journal issued may not have been carried out before the crash: the
            // core forgets them and decides again from the next observation.
            if let Some(journal) = service.rollout.clone() {
                let resumed = kiln_core::rollout::resume(&journal, crate::engine::ms(now));
                service.rollout = Some(resumed);
                changed = true;
            }
        }
        world.dirty |= changed;
        world.event(
            None,
            "recover",
            format!("server started; re-adopted {adopted} running instance(s)"),
        );
        if world.state.services.values().any(|s| s.rollout.is_some()) {
            let db = self.shared.db.lock().unwrap_or_else(|e| e.into_inner());
            let info = db.lock(
                &LockRequest {
                    operation: "apply".to_owned(),
                    who: actor(),
                    info: "resumed after a restart".to_owned(),
                    lease: self.shared.cfg.lock_lease,
                },
                self.shared.clock.now(),
            )?;
            drop(db);
            world.lock = Some(info);
        }
        self.persist(&mut world, "recover")?;
        self.sync_balancers(&mut world).await?;
        self.sync_tables(&mut world);
        Ok(())
    }

    /// Stops every instance (draining each first) and closes every listener; state keeps the
    /// services and releases, so the next server brings them back.
    pub async fn stop_all(&self) -> Result<()> {
        let mut world = self.shared.world.lock().await;
        let mut handles = Vec::new();
        for (name, service) in &mut world.state.services {
            for inst in service.instances.drain(..) {
                handles.push((name.clone(), inst));
            }
            service.rollout = None;
        }
        // All at once: each instance drains and stops on its own, so a hundred instances take as
        // long as the slowest one, not as long as all of them in a row.
        let mut stopping = tokio::task::JoinSet::new();
        for (service, inst) in handles.clone() {
            let engine = self.clone();
            stopping.spawn(async move {
                let _ = engine
                    .shared
                    .traffic
                    .drain(&service, &inst.id, engine.shared.cfg.drain_timeout)
                    .await;
                if let Ok(h) = serde_json::from_value::<Handle>(inst.handle.clone()) {
                    let driver = engine.shared.driver.clone();
                    let grace = engine.shared.cfg.stop_grace;
                    let _ = tokio::task::spawn_blocking(move || driver.stop(&h, grace)).await;
                }
            });
        }
        while stopping.join_next().await.is_some() {}
        let names: Vec<String> = world.bound.keys().cloned().collect();
        for name in names {
            self.shared.traffic.unbind(&name).await;
        }
        world.bound.clear();
        world.dirty = true;
        world.event(
            None,
            "down",
            format!("stopped {} instance(s)", handles.len()),
        );
        if let Some(lock) = world.lock.take() {
            let db = self.shared.db.lock().unwrap_or_else(|e| e.into_inner());
            db.unlock(&lock.id)?;
        }
        self.persist(&mut world, "down")
    }
}
