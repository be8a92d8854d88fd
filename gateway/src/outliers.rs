//! Outlier detection: nodes that fail inference requests are ejected from routing for a while,
//! as a sans-IO state machine (`handle_result(now, ..)` in, `is_ejected(now, ..)` out).
//!
//! A node is ejected after `consecutive_failures` failures in a row, or when its error rate over
//! a sliding window of `window` exceeds `error_rate_percent` once it had `min_requests` requests
//! in the window. The n-th ejection lasts n × `base_ejection`, at most `max_ejection`. At most
//! `max_ejected_percent` of the nodes serving any of the node's models may be ejected at once,
//! and never the last one not ejected: a flaky node is better than none. What counts as a
//! failure is the caller's call (node errors, not client faults nor `Busy` refusals); a success
//! resets the consecutive count. Nodes are known by id, so a node that reconnects stays ejected.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The rules, from `[inference.outlier]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierRules {
    /// 0: the rule is off.
    pub consecutive_failures: u32,
    /// 0: the rule is off.
    pub error_rate_percent: u32,
    pub window: Duration,
    pub min_requests: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

impl OutlierRules {
    pub fn from_config(c: &nearpath_config::OutlierConfig) -> OutlierRules {
        OutlierRules {
            consecutive_failures: c.consecutive_failures,
            error_rate_percent: c.error_rate_percent,
            window: Duration::from_secs(c.window_s.max(1)),
            min_requests: c.min_requests,
            base_ejection: Duration::from_secs(c.base_ejection_s),
            max_ejection: Duration::from_secs(c.max_ejection_s),
            max_ejected_percent: c.max_ejected_percent,
        }
    }
}

impl Default for OutlierRules {
    fn default() -> Self {
        OutlierRules::from_config(&nearpath_config::OutlierConfig::default())
    }
}

/// One node's record.
#[derive(Debug, Default, Clone)]
struct Health {
    consecutive: u32,
    /// Results per second of the window: (second since `Outliers::epoch`, ok, failed).
    buckets: VecDeque<(u64, u32, u32)>,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// A node's outlier state, for the admin view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierView {
    pub ejected_until: Option<Instant>,
    pub ejections: u32,
}

/// Outlier detection over all nodes. See the module docs.
#[derive(Debug)]
pub struct Outliers {
    rules: OutlierRules,
    epoch: Instant,
    nodes: HashMap<String, Health>,
}

impl Outliers {
    pub fn new(rules: OutlierRules, now: Instant) -> Outliers {
        Outliers {
            rules,
            epoch: now,
            nodes: HashMap::new(),
        }
    }

    pub fn rules(&self) -> OutlierRules {
        self.rules
    }

    /// Whether `node` is ejected at `now`.
    pub fn is_ejected(&self, now: Instant, node: &str) -> bool {
        self.nodes
            .get(node)
            .and_then(|h| h.ejected_until)
            .is_some_and(|t| now < t)
    }

    /// How many of `nodes` are ejected at `now`.
    pub fn ejected_among<'a>(
        &self,
        now: Instant,
        nodes: impl IntoIterator<Item = &'a str>,
    ) -> usize {
        nodes
            .into_iter()
            .filter(|n| self.is_ejected(now, n))
            .count()
    }

    /// Nodes ejected at `now`.
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.nodes
            .values()
            .filter(|h| h.ejected_until.is_some_and(|t| now < t))
            .count()
    }

    pub fn view(&self, node: &str) -> OutlierView {
        let h = self.nodes.get(node);
        OutlierView {
            ejected_until: h.and_then(|h| h.ejected_until),
            ejections: h.map_or(0, |h| h.ejections),
        }
    }

    /// A request on `node` ended (`ok`: served; otherwise a node failure). `peer_sets` are,
    /// for each model the node serves, the ids of every node serving it (the node included):
    /// the share of them ejected is capped. Returns the end of the ejection if this result
    /// ejected the node.
    pub fn handle_result(
        &mut self,
        now: Instant,
        node: &str,
        ok: bool,
        peer_sets: &[Vec<String>],
    ) -> Option<Instant> {
        if self.is_ejected(now, node) {
            // Late results of requests that started before the ejection change nothing.
            return None;
        }
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let window_s = self.rules.window.as_secs().max(1);
        let rules = self.rules;
        let h = self.nodes.entry(node.to_string()).or_default();
        while h.buckets.front().is_some_and(|b| b.0 + window_s <= second) {
            h.buckets.pop_front();
        }
        match h.buckets.back_mut() {
            Some(b) if b.0 == second => {
                if ok {
                    b.1 += 1
                } else {
                    b.2 += 1
                }
            }
            _ => h.buckets.push_back((second, u32::from(ok), u32::from(!ok))),
        }
        if ok {
            h.consecutive = 0;
            return None;
        }
        h.consecutive = h.consecutive.saturating_add(1);
        let by_streak =
            rules.consecutive_failures > 0 && h.consecutive >= rules.consecutive_failures;
        let (oks, fails) = h.buckets.iter().fold((0u64, 0u64), |(o, f), b| {
            (o + u64::from(b.1), f + u64::from(b.2))
        });
        let total = oks + fails;
        let by_rate = rules.error_rate_percent > 0
            && total >= u64::from(rules.min_requests.max(1))
            && fails * 100 > u64::from(rules.error_rate_percent) * total;
        if !(by_streak || by_rate) || !self.may_eject(now, node, peer_sets) {
            return None;
        }
        let h = self.nodes.get_mut(node)?;
        h.ejections = h.ejections.saturating_add(1);
        let length = rules
            .base_ejection
            .saturating_mul(h.ejections)
            .min(rules.max_ejection);
        let until = now + length;
        h.ejected_until = Some(until);
        // A fresh start when it comes back: the old failures were paid for.
        h.consecutive = 0;
        h.buckets.clear();
        Some(until)
    }

    /// Whether ejecting `node` keeps every model it serves within the cap and with a node.
    fn may_eject(&self, now: Instant, node: &str, peer_sets: &[Vec<String>]) -> bool {
        peer_sets.iter().all(|peers| {
            let total = peers.len();
            let ejected = self.ejected_among(now, peers.iter().map(String::as_str));
            let after = ejected + 1;
            // Never the last node; and within the percentage (at least one node may always
            // be ejected of two or more, so that a pair can lose its broken half).
            let cap = (total * self.rules.max_ejected_percent as usize / 100).max(1);
            after < total && after <= cap && peers.iter().any(|p| p == node)
        })
    }

    /// Forgets nodes whose record is idle (not ejected, nothing in the window) to bound memory.
    pub fn prune(&mut self, now: Instant) {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let window_s = self.rules.window.as_secs().max(1);
        self.nodes.retain(|_, h| {
            h.ejected_until
                .is_some_and(|t| now < t + self.rules.max_ejection)
                || h.buckets.back().is_some_and(|b| b.0 + window_s > second)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rules() -> OutlierRules {
        OutlierRules {
            consecutive_failures: 5,
            error_rate_percent: 50,
            window: 30 * S,
            min_requests: 20,
            base_ejection: 30 * S,
            max_ejection: 300 * S,
            max_ejected_percent: 50,
        }
    }

    fn peers(n: usize) -> Vec<Vec<String>> {
        vec![(0..n).map(|i| format!("n{i}")).collect()]
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut o = Outliers::new(rules(), t0);
        let p = peers(4);
        for _ in 0..4 {
            assert_eq!(o.handle_result(t0, "n0", false, &p), None);
        }
        assert_eq!(o.handle_result(t0, "n0", true, &p), None);
        for _ in 0..4 {
            assert_eq!(o.handle_result(t0, "n0", false, &p), None);
        }
        assert!(!o.is_ejected(t0, "n0"));
        assert_eq!(o.handle_result(t0, "n0", false, &p), Some(t0 + 30 * S));
        assert!(o.is_ejected(t0, "n0"));
        assert_eq!(o.view("n0").ejections, 1);
    }

    #[test]
    fn the_error_rate_counts_only_with_min_requests_in_the_window() {
        let t0 = Instant::now();
        let mut o = Outliers::new(rules(), t0);
        let p = peers(4);
        // Alternating ok / failed: never 5 in a row, 50% is not above 50%.
        for i in 0..40 {
            assert_eq!(o.handle_result(t0, "n0", i % 2 == 0, &p), None);
        }
        // Two failures for each success: above 50%, but only 9 requests so far.
        let mut o = Outliers::new(rules(), t0);
        let mut ejected = None;
        for i in 0..30u32 {
            let r = o.handle_result(t0 + S * i, "n0", i % 3 == 0, &p);
            if r.is_some() {
                ejected = Some(i);
                break;
            }
        }
        // The 20th request (i = 19) is the first with min_requests in the window.
        assert_eq!(ejected, Some(19));
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let t0 = Instant::now();
        let mut o = Outliers::new(rules(), t0);
        let p = peers(4);
        let mut r = rules();
        r.consecutive_failures = 0;
        o.rules = r;
        for _ in 0..19 {
            o.handle_result(t0, "n0", false, &p);
        }
        // 31 s later the 19 failures have left the window: one more is 1 of 1 (< 20 requests).
        assert_eq!(o.handle_result(t0 + 31 * S, "n0", false, &p), None);
        assert!(!o.is_ejected(t0 + 31 * S, "n0"));
    }

    #[test]
    fn ejections_grow_with_each_ejection_up_to_the_cap_and_expire() {
        let t0 = Instant::now();
        let mut o = Outliers::new(rules(), t0);
        let p = peers(4);
        let mut now = t0;
        let mut lengths = Vec::new();
        for _ in 0..12 {
            let until = (0..5)
                .filter_map(|_| o.handle_result(now, "n0", false, &p))
                .last()
                .expect("ejected");
            lengths.push((until - now).as_secs());
            assert!(o.is_ejected(until - S, "n0"));
            // Expired exactly at its end.
            assert!(!o.is_ejected(until, "n0"));
            now = until;
        }
        assert_eq!(
            lengths,
            [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
        );
    }

    #[test]
    fn at_most_the_configured_share_of_a_models_nodes_is_ejected() {
        let t0 = Instant::now();
        let mut o = Outliers::new(rules(), t0);
        let p = peers(4);
        for n in ["n0", "n1", "n2"] {
            for _ in 0..5 {
                o.handle_result(t0, n, false, &p);
            }
        }
        // 50% of 4 nodes: two ejected, the third is kept however it fails.
        assert!(o.is_ejected(t0, "n0") && o.is_ejected(t0, "n1"));
        assert!(!o.is_ejected(t0, "n2"));
        assert_eq!(o.ejected_count(t0), 2);
    }

    #[test]
    fn the_last_node_of_a_model_is_never_ejected() {
        let t0 = Instant::now();
        let mut r = rules();
        r.max_ejected_percent = 100;
        let mut o = Outliers::new(r, t0);
        // Alone: never.
        for _ in 0..50 {
            assert_eq!(o.handle_result(t0, "n0", false, &peers(1)), None);
        }
        // Of two, one may go (even at 50%), not both.
        let p = peers(2);
        let mut o = Outliers::new(rules(), t0);
        for _ in 0..5 {
            o.handle_result(t0, "n0", false, &p);
        }
        for _ in 0..50 {
            o.handle_result(t0, "n1", false, &p);
        }
        assert!(o.is_ejected(t0, "n0"));
        assert!(!o.is_ejected(t0, "n1"));
        // The cap holds for every model the node serves: alone on a second model, kept.
        let mut o = Outliers::new(rules(), t0);
        let two_models = vec![p[0].clone(), vec!["n0".to_string()]];
        for _ in 0..20 {
            assert_eq!(o.handle_result(t0, "n0", false, &two_models), None);
        }
    }

    #[test]
    fn results_while_ejected_change_nothing_and_a_forged_node_name_is_harmless() {
        let t0 = Instant::now();
        let mut o = Outliers::new(rules(), t0);
        let p = peers(4);
        for _ in 0..5 {
            o.handle_result(t0, "n0", false, &p);
        }
        for _ in 0..100 {
            assert_eq!(o.handle_result(t0 + S, "n0", false, &p), None);
        }
        assert_eq!(o.view("n0").ejections, 1);
        // A node not among the peers it claims is not ejected.
        for _ in 0..10 {
            assert_eq!(o.handle_result(t0, "stranger", false, &p), None);
        }
        o.prune(t0 + 1_000 * S);
        assert_eq!(o.view("stranger").ejections, 0);
    }
}
