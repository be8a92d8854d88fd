//! The gateway's components, assembled once in [`crate::server::Gateway::with_parts`].
//!
//! Each front end is given the components it uses and nothing else:
//!
//! | component   | holds                                              |
//! |-------------|----------------------------------------------------|
//! | [`Auth`]      | API keys (store + cache), per-key rate limits     |
//! | [`Directory`] | live nodes (registry) and the router over them    |
//! | [`Placement`] | GeoIP and the geofence policy                     |
//! | [`Sessions`]  | session ids, game relays, WebRTC sessions         |
//! | [`Meter`]     | the usage ledger                                  |
//! | [`SharedClock`](crate::clock::SharedClock) | the one source of time                          |
//!
//! Components do not know the front ends; the front ends do not know each other.

pub use crate::auth::Auth;
pub use crate::meter::Meter;
use crate::metrics::{labels, Metrics};
use crate::registry::{NodeEntry, NodeState, Registry};
use crate::router::Deny;

use nearpath_config::WorkloadKind;
use nearpath_geo::{Decision, GeoDb, Location, Policy};
use std::collections::BTreeSet;
use std::sync::Arc;

/// The live nodes of this gateway and the router that picks among them.
pub struct Directory {
    /// Reads time through the gateway's clock (`Registry::with_clock`).
    pub registry: Arc<Registry>,
}

impl Directory {
    /// The titles (`Game`) or models (`Inference`) that live nodes serve and that `client` may
    /// use: the one listing behind `GET /v1/games`, `GET /v1/models` and the native
    /// `ListGames`. Nodes that are gone are not listed, whatever they served.
    pub fn visible(
        &self,
        placement: &Placement,
        client: &Location,
        kind: WorkloadKind,
    ) -> BTreeSet<String> {
        let nodes = self.registry.list();
        visible_names(nodes.iter().map(|n| {
            let names = match kind {
                WorkloadKind::Inference => &n.workloads.models,
                WorkloadKind::Game => &n.workloads.games,
            };
            let state = n.dynamic().state;
            // The geofence is asked only about nodes that could be listed at all.
            let allowed = move || placement.serve_check(client, n, kind).is_ok();
            (state, allowed, names.as_slice())
        }))
    }
}

/// The listing rule on its own: names of nodes that are not gone and that the geofence allows.
fn visible_names<'a, F: FnOnce() -> bool>(
    nodes: impl IntoIterator<Item = (NodeState, F, &'a [String])>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (state, allowed, names) in nodes {
        if state == NodeState::Gone || !allowed() {
            continue;
        }
        out.extend(names.iter().cloned());
    }
    out
}

/// The rule name of refusals because of what the checker found (a quarantined node, or a
/// controlled-class node that has not proven where it is), in decisions and metrics.
pub const CHECKER_RULE: &str = "checker";

/// Where clients and nodes are (GeoIP) and what the geofence allows.
pub struct Placement {
    pub geo: Arc<GeoDb>,
    pub policy: Policy,
    metrics: Arc<Metrics>,
}

impl Placement {
    pub fn new(geo: Arc<GeoDb>, policy: Policy, metrics: Arc<Metrics>) -> Placement {
        // Denials by each rule are listed from the start, so that alerts on them work at once.
        metrics.declare_geofence_rules(policy.rule_names().chain([
            nearpath_geo::policy::UNKNOWN_LOCATION_RULE,
            nearpath_geo::policy::ANONYMOUS_IP_RULE,
            CHECKER_RULE,
        ]));
        Placement {
            geo,
            policy,
            metrics,
        }
    }

    /// The geofence verdict for serving `client` from `node` (every GPU class of the node must be
    /// allowed).
    pub fn serve_check(
        &self,
        client: &Location,
        node: &NodeEntry,
        workload: WorkloadKind,
    ) -> Result<(), Deny> {
        // Read once: the location changes when the node's connection migrates, the classes
        // when the checker reclassifies the node.
        let node_location = node.location();
        let check = node.gate_state();
        if let Some(why) = &check.quarantine {
            return Err(Deny {
                rule: CHECKER_RULE.to_string(),
                reason: format!("node {} is quarantined: {why}", node.id),
            });
        }
        let classes = &check.classes;
        if let Some(why) = &check.controlled_block {
            if classes.iter().any(|(_, c)| self.policy.is_controlled(*c)) {
                return Err(Deny {
                    rule: CHECKER_RULE.to_string(),
                    reason: format!(
                        "node {} may not serve a controlled GPU class: {why}",
                        node.id
                    ),
                });
            }
        }
        for (_, class) in classes.iter() {
            if let Decision::Deny { rule, reason, .. } =
                self.policy
                    .check_serve(client, &node_location, *class, workload)
            {
                return Err(Deny {
                    rule: rule.to_string(),
                    reason: reason.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Counts a geofence decision by side, outcome and rule.
    pub fn count_decision(&self, side: &'static str, d: &Decision) {
        let (outcome, rule) = match d {
            Decision::Allow { .. } => ("allow", "-".to_string()),
            Decision::Deny { rule, .. } => ("deny", rule.to_string()),
        };
        self.metrics
            .geofence_decisions
            .get_or_create(&labels([
                ("side", side),
                ("outcome", outcome),
                ("rule", &rule),
            ]))
            .inc();
    }
}

/// The live sessions: their ids (game and inference) and the game relays. (The WebRTC peers of
/// browser sessions belong to the WHEP front end, which owns their table.)
#[derive(Default)]
pub struct Sessions {
    /// Session ids (game and inference): random, unique among live sessions.
    pub ids: crate::session_id::SessionIds,
    pub games: crate::relay::GameRelays,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_gone_node_is_not_listed_whatever_it_served() {
        let (a, b, c) = (
            names(&["arena"]),
            names(&["chess"]),
            names(&["arena", "kart"]),
        );
        let listed = visible_names([
            (NodeState::Active, (|| true) as fn() -> bool, a.as_slice()),
            (NodeState::Gone, || true, b.as_slice()),
            (NodeState::Draining, || true, c.as_slice()),
        ]);
        assert_eq!(
            listed.into_iter().collect::<Vec<_>>(),
            ["arena", "kart"],
            "the gone node's chess is not listed; arena is listed once"
        );
    }

    #[test]
    fn a_node_the_geofence_denies_is_not_listed() {
        let (a, b) = (names(&["arena"]), names(&["chess"]));
        let listed = visible_names([
            (NodeState::Active, (|| false) as fn() -> bool, a.as_slice()),
            (NodeState::Slow, || true, b.as_slice()),
        ]);
        assert_eq!(listed.into_iter().collect::<Vec<_>>(), ["chess"]);
    }
}
