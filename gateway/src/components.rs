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
//! | [`SharedClock`] | the one source of time                          |
//!
//! Components do not know the front ends; the front ends do not know each other.

use crate::clock::SharedClock;
use crate::metrics::{labels, Metrics};
use crate::registry::Registry;
use crate::store::Store;
use nearpath_geo::{Decision, GeoDb, Policy};
use std::sync::Arc;

/// Who a request is from: API keys, their cache, and the per-key rate and concurrency limits.
pub struct Auth {
    pub store: Arc<dyn Store>,
    pub keys: crate::infer::KeyCache,
    pub limiter: crate::infer::RateLimiter,
    pub clock: SharedClock,
}

/// The live nodes of this gateway and the router that picks among them.
pub struct Directory {
    pub registry: Arc<Registry>,
    pub clock: SharedClock,
}

/// Where clients and nodes are (GeoIP) and what the geofence allows.
pub struct Placement {
    pub geo: Arc<GeoDb>,
    pub policy: Policy,
    metrics: Arc<Metrics>,
}

impl Placement {
    pub fn new(geo: Arc<GeoDb>, policy: Policy, metrics: Arc<Metrics>) -> Placement {
        Placement {
            geo,
            policy,
            metrics,
        }
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

/// The live sessions of every kind: their ids, the game relays, the WebRTC sessions.
#[derive(Default)]
pub struct Sessions {
    /// Session ids (game and inference): random, unique among live sessions.
    pub ids: crate::session_id::SessionIds,
    pub games: crate::game::GameRelays,
    pub webrtc: Arc<crate::webrtc::Sessions>,
}

/// The usage ledger: what was served, to whom, by which node.
pub struct Meter {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
}
