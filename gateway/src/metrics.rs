//! Prometheus metrics: what gateway operators watch. Served as Prometheus/OpenMetrics text at
//! `GET /metrics` on the admin listener.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub type Labels = Vec<(&'static str, String)>;

fn histogram_ms() -> Histogram {
    // 0.05 ms .. ~26 s: covers relay overheads up to slow first tokens.
    Histogram::new(exponential_buckets(0.05, 2.0, 20))
}

/// Every metric the gateway exports. Cheap to clone handles; all updates are atomic.
pub struct Metrics {
    registry: Registry,
    /// Live nodes by state, country and GPU class; rebuilt from the registry at scrape time.
    pub nodes: Family<Labels, Gauge>,
    pub registrations: Counter,
    pub rejections: Family<Labels, Counter>,
    pub heartbeat_misses: Counter,
    pub penalties: Family<Labels, Counter>,
    pub node_disconnects: Family<Labels, Counter>,
    pub geofence_decisions: Family<Labels, Counter>,
    pub inference_requests: Family<Labels, Counter>,
    pub inference_failovers: Counter,
    pub ttft_ms: Family<Labels, Histogram, fn() -> Histogram>,
    pub inter_token_ms: Histogram,
    pub tokens_out: Family<Labels, Counter>,
    pub active_streams: Gauge,
    pub game_sessions: Family<Labels, Counter>,
    pub active_game_sessions: Gauge,
    pub game_frames_relayed: Counter,
    pub game_frames_dropped: Family<Labels, Counter>,
    pub game_failovers: Counter,
    pub geo_reloads: Family<Labels, Counter>,
    /// QUIC connection attempts refused before their handshake, by reason (`rate`,
    /// `unauthenticated`).
    pub quic_handshakes_refused: Family<Labels, Counter>,
    /// QUIC connection attempts asked to prove their address with a retry token.
    pub quic_retries: Counter,
    /// HTTP connections closed at once by a connection cap, by listener and reason.
    pub http_connections_refused: Family<Labels, Counter>,
    /// HTTP connections closed by a timeout, by listener and phase (`tls`, `header`, `idle`).
    pub http_connections_timed_out: Family<Labels, Counter>,
    /// Model names already used as label values (see [`Metrics::model_label`]).
    model_labels: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Usage writes (records and health probes) that failed to commit; synced from the store's
    /// writer at scrape time.
    pub ledger_write_failures: Counter,
    /// 1 while the usage ledger commits, 0 while it cannot (new work is refused then).
    pub ledger_healthy: Gauge,
    /// Requests and session starts refused because the ledger could not commit, by entry point.
    pub ledger_refusals: Family<Labels, Counter>,
    /// Node `Done` counts beyond the tolerance from the gateway's, by field.
    pub usage_mismatches: Family<Labels, Counter>,
    /// Work refused by a per-key cap, by entry point and cap.
    pub key_cap_refusals: Family<Labels, Counter>,
    /// Requests refused because their key spent a budget, by budget (`tokens_per_day`,
    /// `tokens_per_month`, `usd_per_day`, `usd_per_month`).
    pub key_budget_refusals: Family<Labels, Counter>,
    /// Fleet-wide limits (federation): store leases of per-minute slices and concurrency
    /// reservations, by pool and result (`granted`, `partial`, `spent`, `reserved`, `failed`).
    pub limit_leases: Family<Labels, Counter>,
    /// Admissions that waited for the store (their local slice was empty), by pool and result
    /// (`admitted`, `refused`, `failed`, `timeout`).
    pub limit_store_waits: Family<Labels, Counter>,
    /// Admissions decided by the local per-gateway limit because the store failed, by pool.
    pub limit_fail_open: Family<Labels, Counter>,
    /// Times a node became slow: heartbeats late while its connection still delivered.
    pub nodes_slowed: Counter,
    /// Game sessions paused by the loss of their node, by how the pause ended
    /// (`same_node`, `other_node`, `expired`, `ended`).
    pub game_pauses: Family<Labels, Counter>,
    /// Registrations that took a node id over from a silent previous connection of that node.
    pub node_id_takeovers: Counter,
    /// Inference requests that found no node for a recently served model, by outcome:
    /// `served` (a node came back within `inference.unavailable_wait_ms`) or `unavailable` (503).
    pub inference_blip_waits: Family<Labels, Counter>,
    /// Inference requests waiting in a model's queue, by model (a model some node registered,
    /// else `other`); rebuilt from the queues at scrape time.
    pub inference_queue_depth: Family<Labels, Gauge>,
    /// How long queued inference requests waited for a slot, in seconds.
    pub inference_queue_wait_seconds: Histogram,
    /// Nodes ejected from inference routing by outlier detection.
    pub inference_node_ejections: Counter,
    /// Nodes ejected now; set at scrape time.
    pub inference_nodes_ejected: Gauge,
    /// Requests served by a fallback model, by configured model pair.
    pub inference_fallbacks: Family<Labels, Counter>,
    /// Gateways whose lease in the gateway directory holds (this one included), as of the
    /// directory task's last refresh.
    pub federation_gateways_live: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nearpath");
        let m = Metrics {
            nodes: Family::default(),
            registrations: Counter::default(),
            rejections: Family::default(),
            heartbeat_misses: Counter::default(),
            penalties: Family::default(),
            node_disconnects: Family::default(),
            geofence_decisions: Family::default(),
            inference_requests: Family::default(),
            inference_failovers: Counter::default(),
            ttft_ms: Family::new_with_constructor(histogram_ms),
            inter_token_ms: histogram_ms(),
            tokens_out: Family::default(),
            active_streams: Gauge::default(),
            game_sessions: Family::default(),
            active_game_sessions: Gauge::default(),
            game_frames_relayed: Counter::default(),
            game_frames_dropped: Family::default(),
            game_failovers: Counter::default(),
            geo_reloads: Family::default(),
            quic_handshakes_refused: Family::default(),
            quic_retries: Counter::default(),
            http_connections_refused: Family::default(),
            http_connections_timed_out: Family::default(),
            model_labels: Default::default(),
            ledger_write_failures: Counter::default(),
            ledger_healthy: Gauge::default(),
            ledger_refusals: Family::default(),
            usage_mismatches: Family::default(),
            key_cap_refusals: Family::default(),
            key_budget_refusals: Family::default(),
            limit_leases: Family::default(),
            limit_store_waits: Family::default(),
            limit_fail_open: Family::default(),
            nodes_slowed: Counter::default(),
            game_pauses: Family::default(),
            node_id_takeovers: Counter::default(),
            inference_blip_waits: Family::default(),
            inference_queue_depth: Family::default(),
            // 1 ms .. ~65 s.
            inference_queue_wait_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            inference_node_ejections: Counter::default(),
            inference_nodes_ejected: Gauge::default(),
            inference_fallbacks: Family::default(),
            federation_gateways_live: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "nodes",
            "Live edge nodes by state, country and GPU class",
            m.nodes.clone(),
        );
        registry.register(
            "inference_queue_depth",
            "Inference requests waiting for a slot, by model",
            m.inference_queue_depth.clone(),
        );
        registry.register(
            "inference_queue_wait_seconds",
            "How long queued inference requests waited for a slot, in seconds",
            m.inference_queue_wait_seconds.clone(),
        );
        registry.register(
            "inference_node_ejections",
            "Nodes ejected from inference routing by outlier detection",
            m.inference_node_ejections.clone(),
        );
        registry.register(
            "inference_nodes_ejected",
            "Nodes ejected from inference routing now",
            m.inference_nodes_ejected.clone(),
        );
        registry.register(
            "inference_fallbacks",
            "Inference requests served by a fallback model, by model pair",
            m.inference_fallbacks.clone(),
        );
        registry.register(
            "federation_gateways_live",
            "Gateways live in the federation's gateway directory (this one included)",
            m.federation_gateways_live.clone(),
        );
        registry.register(
            "node_slow",
            "Times a node became slow: heartbeats late while its connection still delivered",
            m.nodes_slowed.clone(),
        );
        registry.register(
            "game_pauses",
            "Game sessions paused by the loss of their node, by how the pause ended",
            m.game_pauses.clone(),
        );
        registry.register(
            "node_registrations",
            "Successful node registrations",
            m.registrations.clone(),
        );
        registry.register(
            "node_rejections",
            "Refused node registrations by code",
            m.rejections.clone(),
        );
        registry.register(
            "node_heartbeat_misses",
            "Heartbeat intervals that passed without a heartbeat",
            m.heartbeat_misses.clone(),
        );
        registry.register(
            "node_penalties",
            "Penalty events by kind",
            m.penalties.clone(),
        );
        registry.register(
            "node_disconnects",
            "Node disconnections by cause",
            m.node_disconnects.clone(),
        );
        registry.register(
            "geofence_decisions",
            "Geofence decisions by side, outcome and rule",
            m.geofence_decisions.clone(),
        );
        registry.register(
            "inference_requests",
            "Inference requests by API and outcome",
            m.inference_requests.clone(),
        );
        registry.register(
            "inference_failovers",
            "Inference attempts retried on another node before the first token",
            m.inference_failovers.clone(),
        );
        registry.register(
            "inference_ttft_ms",
            "Time to first token seen at the gateway, in milliseconds",
            m.ttft_ms.clone(),
        );
        registry.register(
            "inference_inter_token_ms",
            "Gap between tokens seen at the gateway, in milliseconds",
            m.inter_token_ms.clone(),
        );
        registry.register(
            "inference_tokens_out",
            "Completion tokens streamed to clients, by model",
            m.tokens_out.clone(),
        );
        registry.register(
            "inference_active_streams",
            "Inference requests in flight",
            m.active_streams.clone(),
        );
        registry.register(
            "game_sessions",
            "Game sessions by transport and outcome",
            m.game_sessions.clone(),
        );
        registry.register(
            "game_active_sessions",
            "Game sessions in progress",
            m.active_game_sessions.clone(),
        );
        registry.register(
            "game_frames_relayed",
            "Video frames relayed to players",
            m.game_frames_relayed.clone(),
        );
        registry.register(
            "game_frames_dropped",
            "Video frames dropped by reason",
            m.game_frames_dropped.clone(),
        );
        registry.register(
            "game_failovers",
            "Game sessions moved to another node",
            m.game_failovers.clone(),
        );
        registry.register(
            "geo_reloads",
            "GeoIP database reloads by outcome",
            m.geo_reloads.clone(),
        );
        registry.register(
            "quic_handshakes_refused",
            "QUIC connection attempts refused before the handshake, by reason",
            m.quic_handshakes_refused.clone(),
        );
        registry.register(
            "quic_retries",
            "QUIC connection attempts asked to validate their address (retry token)",
            m.quic_retries.clone(),
        );
        registry.register(
            "http_connections_refused",
            "HTTP connections closed at once by a connection cap, by listener and reason",
            m.http_connections_refused.clone(),
        );
        registry.register(
            "http_connections_timed_out",
            "HTTP connections closed by a timeout, by listener and phase",
            m.http_connections_timed_out.clone(),
        );
        registry.register(
            "ledger_write_failures",
            "Usage ledger writes (records and health probes) that failed to commit",
            m.ledger_write_failures.clone(),
        );
        registry.register(
            "ledger_healthy",
            "1 while the usage ledger commits; 0 while it cannot and new work is refused",
            m.ledger_healthy.clone(),
        );
        registry.register(
            "ledger_refusals",
            "Requests and session starts refused because the usage ledger cannot commit, by entry point",
            m.ledger_refusals.clone(),
        );
        registry.register(
            "inference_usage_mismatches",
            "Node-reported token counts beyond the tolerance from the gateway's own count, by field",
            m.usage_mismatches.clone(),
        );
        registry.register(
            "key_cap_refusals",
            "Work refused by a per-key cap, by entry point and cap",
            m.key_cap_refusals.clone(),
        );
        registry.register(
            "key_budget_refusals",
            "Requests refused because their API key spent one of its budgets, by budget",
            m.key_budget_refusals.clone(),
        );
        registry.register(
            "limit_leases",
            "Fleet-wide limit leases and concurrency reservations taken from the store, by pool and result",
            m.limit_leases.clone(),
        );
        registry.register(
            "limit_store_waits",
            "Admissions that waited for the store because their local slice was empty, by pool and result",
            m.limit_store_waits.clone(),
        );
        registry.register(
            "limit_fail_open",
            "Admissions decided by the local per-gateway limit because the store failed, by pool",
            m.limit_fail_open.clone(),
        );
        registry.register(
            "node_id_takeovers",
            "Registrations that took a node id over from a silent previous connection",
            m.node_id_takeovers.clone(),
        );
        registry.register(
            "inference_blip_waits",
            "Requests for a recently served model with no node, by outcome (served, unavailable)",
            m.inference_blip_waits.clone(),
        );
        m.ledger_healthy.set(1);
        Metrics { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The label value standing for every value outside a bounded set.
pub const OTHER: &str = "other";
/// The most distinct model names used as label values; later ones are [`OTHER`]. Node
/// operators choose the names they serve, so even served names need a bound.
pub const MAX_MODEL_LABELS: usize = 256;

impl Metrics {
    /// The `model` label value for a request's model name: the name itself if a node serves it
    /// (`served`), it is at most [`nearpath_protocol::openai::MAX_MODEL_NAME_BYTES`] long and
    /// fewer than [`MAX_MODEL_LABELS`] names are in use; else [`OTHER`]. The name is chosen by
    /// the client, so anything else would let clients grow `/metrics` (and the gateway's
    /// memory) without bound.
    pub fn model_label(&self, model: &str, served: bool) -> String {
        if !served || model.len() > nearpath_protocol::openai::MAX_MODEL_NAME_BYTES {
            return OTHER.to_string();
        }
        let mut names = self.model_labels.lock().unwrap_or_else(|p| p.into_inner());
        if names.contains(model) {
            return model.to_string();
        }
        if names.len() >= MAX_MODEL_LABELS {
            return OTHER.to_string();
        }
        names.insert(model.to_string());
        model.to_string()
    }
}

/// Shorthand for a label set.
pub fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_served_names_only_and_bounded() {
        let m = Metrics::new();
        assert_eq!(m.model_label("llama", true), "llama");
        assert_eq!(m.model_label("llama", true), "llama");
        assert_eq!(m.model_label("made-up", false), OTHER);
        let long = "x".repeat(nearpath_protocol::openai::MAX_MODEL_NAME_BYTES + 1);
        assert_eq!(m.model_label(&long, true), OTHER);
        for i in 1..MAX_MODEL_LABELS {
            assert_eq!(m.model_label(&format!("m{i}"), true), format!("m{i}"));
        }
        // The set is full: a new name is `other`, the names already in use keep their label.
        assert_eq!(m.model_label("one-too-many", true), OTHER);
        assert_eq!(m.model_label("llama", true), "llama");
    }
}
