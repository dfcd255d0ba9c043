//! What the engine feeds the pure rollout core besides instances: measurement windows from the
//! proxy's metrics, and operator commands (`kiln rollout promote|abort|pause|resume`).

use std::collections::BTreeMap;

use kiln_core::analysis::{Red, Samples};
use kiln_core::rollout::{Command, Journal, OperatorCommand};
use kiln_proxy::ReleaseMetrics;

use crate::engine::{Engine, World};

/// The proxy's counters at the start of a measurement window.
#[derive(Debug, Clone)]
pub(crate) struct Mark {
    /// The journal's `samples_since` this mark was taken for.
    since_ms: u64,
    /// When the mark was taken (the window's start).
    at_ms: u64,
    /// Cumulative metrics per release then.
    metrics: BTreeMap<u32, ReleaseMetrics>,
}

impl Engine {
    /// The window since the journal's current measurement start, as differences of the proxy's
    /// cumulative counters. The first call for a new start only takes the mark (no window yet).
    pub(crate) fn samples(
        &self,
        world: &mut World,
        service: &str,
        journal: &Journal,
        now_ms: u64,
    ) -> Option<Samples> {
        let since = journal.samples_since()?;
        let current = self.shared.traffic.metrics(service);
        match world.marks.get(service) {
            Some(mark) if mark.since_ms == since => {
                let red = |release: u32| {
                    let now = current.get(&release).cloned().unwrap_or_default();
                    let then = mark.metrics.get(&release).cloned().unwrap_or_default();
                    difference(&now, &then)
                };
                Some(Samples {
                    from_ms: mark.at_ms,
                    to_ms: now_ms,
                    canary: red(journal.to),
                    stable: journal.from.map(red),
                })
            }
            _ => {
                world.marks.insert(
                    service.to_owned(),
                    Mark {
                        since_ms: since,
                        at_ms: now_ms.max(since),
                        metrics: current,
                    },
                );
                None
            }
        }
    }

    /// Queues an operator command for a service's rollout; the core takes it once.
    pub async fn command(&self, service: &str, command: Command) -> crate::Result<()> {
        self.command_by(service, command, &crate::actor()).await
    }

    /// [`Engine::command`], given by `actor` (recorded in the audit log).
    pub async fn command_by(
        &self,
        service: &str,
        command: Command,
        actor: &str,
    ) -> crate::Result<()> {
        let mut world = self.shared.world.lock().await;
        let running = world
            .state
            .services
            .get(service)
            .ok_or_else(|| crate::Error::NotFound(format!("no service `{service}`")))?
            .rollout
            .is_some();
        if !running {
            return Err(crate::Error::Conflict(format!(
                "service `{service}` has no rollout in progress"
            )));
        }
        world.next_command += 1;
        let seq = world.next_command;
        world
            .commands
            .insert(service.to_owned(), OperatorCommand { seq, command });
        world.event_by(
            actor,
            Some(service),
            "command",
            format!(
                "{} requested by {actor}",
                format!("{command:?}").to_lowercase()
            ),
        );
        drop(world);
        self.wake();
        Ok(())
    }
}

/// `now - then` of cumulative counters (zero if the counters went backwards, e.g. a restart).
fn difference(now: &ReleaseMetrics, then: &ReleaseMetrics) -> Red {
    let mut latency = now.latency.clone();
    for (i, c) in latency.counts.iter_mut().enumerate() {
        *c = c.saturating_sub(then.latency.counts.get(i).copied().unwrap_or(0));
    }
    let micros = |q: f64| {
        latency
            .quantile(q)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    };
    Red {
        requests: now.requests.saturating_sub(then.requests),
        errors: (now.status_5xx + now.connect_errors)
            .saturating_sub(then.status_5xx + then.connect_errors),
        p50_us: micros(0.5),
        p99_us: micros(0.99),
    }
}
