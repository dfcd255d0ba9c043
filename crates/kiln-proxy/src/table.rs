//! A service's routing table: release pools with weights, and the choice of a backend.
//!
//! A table is immutable once built (apart from its balancing cursors); `set_service` builds a new
//! one and swaps an `Arc`, so a request works with one consistent table from pick to response.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use http::HeaderValue;

use crate::backend::{Backend, InFlight, lock};
use crate::metrics::ReleaseCounters;

#[derive(Debug)]
pub(crate) struct Service {
    table: RwLock<Arc<Table>>,
    /// Per release, kept across table swaps so counters are cumulative.
    pub(crate) metrics: Mutex<BTreeMap<u32, Arc<ReleaseCounters>>>,
}

impl Service {
    pub(crate) fn new() -> Self {
        Self {
            table: RwLock::new(Arc::new(Table::default())),
            metrics: Mutex::new(BTreeMap::new()),
        }
    }

    /// The current table; the read lock is held only to clone the `Arc`.
    pub(crate) fn table(&self) -> Arc<Table> {
        Arc::clone(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Installs `table`, returning the one it replaces.
    pub(crate) fn swap(&self, table: Table) -> Arc<Table> {
        let mut slot = self.table.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *slot, Arc::new(table))
    }

    pub(crate) fn counters(&self, release: u32) -> Arc<ReleaseCounters> {
        Arc::clone(
            lock(&self.metrics)
                .entry(release)
                .or_insert_with(|| Arc::new(ReleaseCounters::new())),
        )
    }
}

#[derive(Debug, Default)]
pub(crate) struct Table {
    pub(crate) pools: Vec<PoolState>,
    /// The release that serves preview requests, if any.
    pub(crate) preview: Option<u32>,
    /// The index of its pool in `pools` (`None` without a preview, or while the release has
    /// no pool yet).
    preview_pool: Option<usize>,
    /// Smooth weighted round-robin state: one "current weight" per pool.
    cursor: Mutex<Vec<i64>>,
}

#[derive(Debug)]
pub(crate) struct PoolState {
    pub(crate) release: u32,
    pub(crate) weight: u32,
    /// `vN`, built once so responses only clone it.
    pub(crate) release_header: HeaderValue,
    pub(crate) counters: Arc<ReleaseCounters>,
    pub(crate) members: Vec<Member>,
    next: AtomicUsize,
}

#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) backend: Arc<Backend>,
    pub(crate) routable: bool,
}

impl Member {
    fn eligible(&self, exclude: Option<&Backend>) -> bool {
        self.routable
            && self.backend.available()
            && !exclude.is_some_and(|x| std::ptr::eq(x, &*self.backend))
    }
}

impl PoolState {
    pub(crate) fn new(
        release: u32,
        weight: u32,
        counters: Arc<ReleaseCounters>,
        members: Vec<Member>,
    ) -> Self {
        let release_header = HeaderValue::from_str(&format!("v{release}"))
            .unwrap_or_else(|_| HeaderValue::from_static("v?"));
        Self {
            release,
            weight,
            release_header,
            counters,
            members,
            next: AtomicUsize::new(0),
        }
    }

    fn eligible(&self, exclude: Option<&Backend>) -> bool {
        self.members.iter().any(|m| m.eligible(exclude))
    }

    /// Round-robin among the pool's eligible members.
    fn pick(&self, exclude: Option<&Backend>) -> Option<&Arc<Backend>> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &self.members[(start + k) % n])
            .find(|m| m.eligible(exclude))
            .map(|m| &m.backend)
    }
}

impl Table {
    pub(crate) fn new(pools: Vec<PoolState>, preview: Option<u32>) -> Self {
        let cursor = Mutex::new(vec![0; pools.len()]);
        Self::with_cursor(pools, preview, cursor)
    }

    fn with_cursor(pools: Vec<PoolState>, preview: Option<u32>, cursor: Mutex<Vec<i64>>) -> Self {
        let preview_pool = preview.and_then(|r| pools.iter().position(|p| p.release == r));
        Self {
            pools,
            preview,
            preview_pool,
            cursor,
        }
    }

    /// The same pools without backend `id`, keeping the balancing cursors so shares stay exact.
    pub(crate) fn without(&self, id: &str) -> Self {
        let pools = self
            .pools
            .iter()
            .map(|p| {
                let members = p
                    .members
                    .iter()
                    .filter(|m| m.backend.id != id)
                    .cloned()
                    .collect();
                PoolState::new(p.release, p.weight, Arc::clone(&p.counters), members)
            })
            .collect();
        let cursor = Mutex::new(lock(&self.cursor).clone());
        Self::with_cursor(pools, self.preview, cursor)
    }

    pub(crate) fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.pools
            .iter()
            .flat_map(|p| p.members.iter().map(|m| &m.backend))
    }

    /// Picks a pool by weight (or, for a `preview` request, the preview release's pool whatever
    /// its weight), then a backend in it, and counts the request as in flight there. `exclude`
    /// is the backend a retry must avoid. A preview request without a preview pool gets `None`.
    pub(crate) fn pick(
        &self,
        exclude: Option<&Backend>,
        preview: bool,
    ) -> Option<(&PoolState, InFlight)> {
        // A backend can start draining between the pick and `enter`; try again a few times.
        for _ in 0..4 {
            let index = if preview {
                self.preview_pool?
            } else {
                self.pick_pool(exclude)?
            };
            let pool = &self.pools[index];
            let backend = pool.pick(exclude)?;
            if let Some(guard) = backend.enter() {
                return Some((pool, guard));
            }
        }
        None
    }

    fn pick_pool(&self, exclude: Option<&Backend>) -> Option<usize> {
        let eligible = |i: usize| self.pools[i].eligible(exclude);
        // With every eligible pool at weight 0 (say, the engine set the stable pool to 0 just as
        // the canary lost its last healthy backend), serving from them beats failing requests.
        let fallback = !(0..self.pools.len()).any(|i| eligible(i) && self.pools[i].weight > 0);
        let mut current = lock(&self.cursor);
        smooth_weighted(&mut current, |i| {
            if !eligible(i) {
                0
            } else if fallback {
                1
            } else {
                self.pools[i].weight
            }
        })
    }
}

/// Smooth weighted round-robin (nginx's): each pick adds every weight to its current value,
/// chooses the largest current value and subtracts the total from it. Over any `sum(weights)`
/// consecutive picks each index is chosen exactly `weight` times, interleaved as evenly as
/// possible, and the sequence is the same for scaled weights (90/10 repeats every 10 picks).
/// Deterministic: no randomness, so tests and analysis see exact shares.
pub(crate) fn smooth_weighted(current: &mut [i64], weight: impl Fn(usize) -> u32) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for i in 0..current.len() {
        let w = i64::from(weight(i));
        if w == 0 {
            continue;
        }
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(weights: &[u32], n: usize) -> Vec<usize> {
        let mut cur = vec![0; weights.len()];
        (0..n)
            .map(|_| smooth_weighted(&mut cur, |i| weights[i]).unwrap())
            .collect()
    }

    #[test]
    fn shares_are_exact_in_every_period() {
        let seq = picks(&[90, 10], 1000);
        for window in seq.chunks(10) {
            assert_eq!(window.iter().filter(|&&i| i == 1).count(), 1, "{window:?}");
        }
        let seq = picks(&[50, 30, 20], 100);
        let count = |k| seq.iter().filter(|&&i| i == k).count();
        assert_eq!((count(0), count(1), count(2)), (50, 30, 20));
    }

    #[test]
    fn zero_weight_gets_nothing_and_all_zero_picks_none() {
        assert!(picks(&[0, 7], 50).iter().all(|&i| i == 1));
        let mut cur = vec![0, 0];
        assert_eq!(smooth_weighted(&mut cur, |_| 0), None);
    }
}
