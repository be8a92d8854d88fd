//! Models that were served recently but have no node now (a node blip, a restart): requests for
//! them are 503 `model_unavailable` with `Retry-After`, not 404 `model_not_found`, and
//! `/v1/models` keeps listing them as unavailable, for `inference.model_grace_s`.
//!
//! Sans-IO and clock-free: the caller passes the time in milliseconds. Memory is bounded: only
//! names that registered nodes offered enter (at most `MAX_NAMES` per registration, by the
//! decoder), entries older than the grace window are pruned on every write, and at most
//! [`MAX_REMEMBERED_MODELS`] names and [`MAX_REMEMBERED_BYTES`] bytes of names are kept, the
//! names gone longest evicted first. A hostile node cycling made-up names can at worst evict
//! older entries, which then answer 404 during a blip as before; it cannot grow memory.

use std::collections::HashMap;

/// Most model names remembered at once.
pub const MAX_REMEMBERED_MODELS: usize = 4096;
/// Most bytes of model names remembered at once.
pub const MAX_REMEMBERED_BYTES: usize = 256 * 1024;

/// What the gateway knows about a model name that no registered node serves.
#[derive(Debug, Default)]
pub struct RecentModels {
    /// Model name -> when its last node left (ms).
    gone_since: HashMap<String, u64>,
    bytes: usize,
}

impl RecentModels {
    /// Records that a node serving `models` left at `now_ms`; `still_served` says whether another
    /// node serves a name (those need no memory yet: they are remembered when their last node
    /// leaves). Prunes entries older than `grace_ms`.
    pub fn node_left<'a>(
        &mut self,
        models: impl IntoIterator<Item = &'a String>,
        mut still_served: impl FnMut(&str) -> bool,
        now_ms: u64,
        grace_ms: u64,
    ) {
        self.prune(now_ms, grace_ms);
        if grace_ms == 0 {
            return;
        }
        for name in models {
            if still_served(name) || name.len() > MAX_REMEMBERED_BYTES {
                continue;
            }
            match self.gone_since.get_mut(name.as_str()) {
                Some(at) => *at = now_ms,
                None => {
                    self.bytes += name.len();
                    self.gone_since.insert(name.clone(), now_ms);
                }
            }
        }
        self.evict_to_bounds();
    }

    /// A node serving `models` registered: they are served again, so nothing needs remembering.
    pub fn node_joined<'a>(&mut self, models: impl IntoIterator<Item = &'a String>) {
        for name in models {
            if self.gone_since.remove(name.as_str()).is_some() {
                self.bytes -= name.len();
            }
        }
    }

    /// When `model`'s last node left, if that is less than `grace_ms` before `now_ms`.
    pub fn gone_since(&self, model: &str, now_ms: u64, grace_ms: u64) -> Option<u64> {
        self.gone_since
            .get(model)
            .copied()
            .filter(|&at| now_ms.saturating_sub(at) < grace_ms)
    }

    /// The names remembered at `now_ms` (those within the window), sorted.
    pub fn names(&self, now_ms: u64, grace_ms: u64) -> Vec<String> {
        let mut v: Vec<String> = self
            .gone_since
            .iter()
            .filter(|(_, &at)| now_ms.saturating_sub(at) < grace_ms)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    pub fn len(&self) -> usize {
        self.gone_since.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gone_since.is_empty()
    }

    /// Bytes of names held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn prune(&mut self, now_ms: u64, grace_ms: u64) {
        let mut freed = 0;
        self.gone_since.retain(|name, at| {
            let keep = now_ms.saturating_sub(*at) < grace_ms;
            if !keep {
                freed += name.len();
            }
            keep
        });
        self.bytes -= freed;
    }

    fn evict_to_bounds(&mut self) {
        if self.gone_since.len() <= MAX_REMEMBERED_MODELS && self.bytes <= MAX_REMEMBERED_BYTES {
            return;
        }
        // Rare (only under a flood of names), so a sort is fine: oldest first, then by name so
        // that ties evict deterministically.
        let mut by_age: Vec<(u64, String)> = self
            .gone_since
            .iter()
            .map(|(n, &at)| (at, n.clone()))
            .collect();
        by_age.sort();
        for (_, name) in by_age {
            if self.gone_since.len() <= MAX_REMEMBERED_MODELS && self.bytes <= MAX_REMEMBERED_BYTES
            {
                break;
            }
            self.gone_since.remove(&name);
            self.bytes -= name.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 600_000;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_model_is_remembered_for_the_grace_window_after_its_last_node_left() {
        let mut r = RecentModels::default();
        r.node_left(&names(&["llama", "qwen"]), |m| m == "qwen", 1_000, GRACE);
        // Another node still serves qwen: nothing to remember for it yet.
        assert_eq!(r.gone_since("llama", 1_000, GRACE), Some(1_000));
        assert_eq!(r.gone_since("qwen", 1_000, GRACE), None);
        assert_eq!(r.gone_since("llama", 1_000 + GRACE - 1, GRACE), Some(1_000));
        assert_eq!(r.gone_since("llama", 1_000 + GRACE, GRACE), None);
        assert_eq!(r.names(2_000, GRACE), ["llama"]);
        // A model never served is never known.
        assert_eq!(r.gone_since("gpt-9", 1_000, GRACE), None);
    }

    #[test]
    fn a_returning_node_clears_the_memory_and_old_entries_are_pruned() {
        let mut r = RecentModels::default();
        r.node_left(&names(&["a"]), |_| false, 0, GRACE);
        r.node_joined(&names(&["a"]));
        assert!(r.is_empty());
        assert_eq!(r.bytes(), 0);
        r.node_left(&names(&["a", "bb"]), |_| false, 0, GRACE);
        assert_eq!(r.bytes(), 3);
        // Any later write prunes what is past the window.
        r.node_left(&names(&["c"]), |_| false, GRACE, GRACE);
        assert_eq!(r.names(GRACE, GRACE), ["c"]);
        assert_eq!((r.len(), r.bytes()), (1, 1));
    }

    #[test]
    fn a_grace_of_zero_remembers_nothing() {
        let mut r = RecentModels::default();
        r.node_left(&names(&["a"]), |_| false, 5, 0);
        assert!(r.is_empty());
        assert_eq!(r.gone_since("a", 5, 0), None);
    }

    #[test]
    fn a_node_registering_ten_thousand_model_names_cannot_grow_the_memory_without_bound() {
        let mut r = RecentModels::default();
        r.node_left(&names(&["real-model"]), |_| false, 0, GRACE);
        // A hostile node joins and leaves again and again, each time with 4096 fresh names
        // (the decoder's cap per registration), 10,000+ names in all.
        for round in 0..4u64 {
            let flood: Vec<String> = (0..4096)
                .map(|i| format!("junk-{round}-{i:0>40}"))
                .collect();
            r.node_joined(&flood);
            r.node_left(&flood, |_| false, 1 + round, GRACE);
            assert!(r.len() <= MAX_REMEMBERED_MODELS, "{}", r.len());
            assert!(r.bytes() <= MAX_REMEMBERED_BYTES, "{}", r.bytes());
        }
        // Long names hit the byte bound before the count bound.
        let long: Vec<String> = (0..100)
            .map(|i| format!("{i}-{}", "x".repeat(10_000)))
            .collect();
        r.node_left(&long, |_| false, 10, GRACE);
        assert!(r.bytes() <= MAX_REMEMBERED_BYTES, "{}", r.bytes());
        // The newest names were kept, the oldest evicted.
        assert_eq!(r.gone_since(&long[99], 10, GRACE), Some(10));
        assert_eq!(r.gone_since("real-model", 10, GRACE), None);
    }
}
