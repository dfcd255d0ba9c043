//! The image dependency graph: base cycles and the order to bake in.
//!
//! Each image has at most one base, so the graph is a set of chains; a cycle is a chain that
//! comes back to where it started.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use super::Loader;
use crate::diag::did_you_mean;
use crate::model::{Base, Config, Image};

/// The image `name` is based on, if it is another image of the config.
fn base_of<'i>(images: &'i BTreeMap<String, Image>, name: &str) -> Option<&'i str> {
    match &images.get(name)?.base {
        Base::Image { name } => Some(name),
        _ => None,
    }
}

/// The cycle through `start`, as the path `start → … → start`, if there is one.
fn cycle_through(images: &BTreeMap<String, Image>, start: &str) -> Option<Vec<String>> {
    let mut path = vec![start.to_owned()];
    let mut current = start;
    while let Some(next) = base_of(images, current) {
        if next == start {
            path.push(next.to_owned());
            return Some(path);
        }
        // A cycle further down the chain that does not come back here is reported at its own
        // images, not at this one.
        if path.iter().any(|p| p == next) {
            return None;
        }
        path.push(next.to_owned());
        current = next;
    }
    None
}

impl Loader<'_> {
    /// Reports each image on a base cycle, at its `base`.
    pub(super) fn base_cycles(
        &mut self,
        images: &BTreeMap<String, Image>,
        base_spans: &BTreeMap<String, Range<usize>>,
    ) {
        for name in images.keys() {
            if let Some(path) = cycle_through(images, name) {
                let msg = format!("image `{name}` depends on itself: {}", path.join(" → "));
                let at = base_spans.get(name).cloned().unwrap_or(0..0);
                self.error(at, msg);
            }
        }
    }
}

/// The images to bake for `targets` (all images when empty): the targets and every image they
/// are based on, each after its base, ties broken by name.
///
/// # Errors
///
/// When a target is not an image of the config, or the config's images form a cycle or name a
/// missing base (impossible for a config that [`super::load`] returned).
pub fn bake_order(config: &Config, targets: &[String]) -> Result<Vec<String>, String> {
    let images = &config.images;
    let mut wanted = BTreeSet::new();
    let roots: Vec<&str> = if targets.is_empty() {
        images.keys().map(String::as_str).collect()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for target in roots {
        if !images.contains_key(target) {
            return Err(
                match did_you_mean(target, images.keys().map(String::as_str)) {
                    Some(close) => format!("unknown image `{target}`; did you mean `{close}`?"),
                    None => format!("unknown image `{target}`"),
                },
            );
        }
        let mut current = target;
        while wanted.insert(current) {
            let Some(base) = base_of(images, current) else {
                break;
            };
            if !images.contains_key(base) {
                return Err(format!(
                    "image `{current}` is based on unknown image `{base}`"
                ));
            }
            current = base;
        }
    }

    // Kahn's algorithm; the ready set is ordered, which breaks ties by name.
    let mut order = Vec::with_capacity(wanted.len());
    let mut done = BTreeSet::new();
    let mut ready: BTreeSet<&str> = wanted
        .iter()
        .copied()
        .filter(|n| base_of(images, n).is_none())
        .collect();
    while let Some(next) = ready.pop_first() {
        done.insert(next);
        order.push(next.to_owned());
        ready.extend(
            wanted
                .iter()
                .copied()
                .filter(|n| !done.contains(n) && base_of(images, n) == Some(next)),
        );
    }
    if order.len() < wanted.len() {
        let stuck: Vec<&str> = wanted.difference(&done).copied().collect();
        return Err(format!(
            "images depend on each other in a cycle: {}",
            stuck.join(", ")
        ));
    }
    Ok(order)
}
