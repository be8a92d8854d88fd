//! Prometheus metrics: what gateway operators watch. Served as Prometheus/OpenMetrics text at
//! `GET /metrics` on the admin listener.
//!
//! Names follow the Prometheus conventions: everything under `nearpath_` except the standard
//! `process_*` family, base units in the name (`_seconds`, `_bytes`), counters exported with
//! `_total`, label values only from bounded sets. Every family is registered here and listed
//! in [`FAMILIES`], and every labelled family whose label values are known in advance starts
//! with each of them at 0, so that dashboards and alerts see a series before the first event
//! (see [`label_values`]).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};
use std::sync::PoisonError;

pub type Labels = Vec<(&'static str, String)>;

/// Buckets for time to first token: 5 ms .. ~41 s, doubling; a first token comes after a
/// prompt's prefill, which takes from milliseconds to tens of seconds.
fn ttft_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Buckets for gaps between tokens: 0.5 ms .. ~4 s, doubling.
fn inter_token_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// Buckets for a video frame's age when the relay delivered it: 1 ms .. ~1 s, doubling by
/// half-steps below the usual frame budgets (tens of milliseconds), where players notice.
fn frame_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, std::f64::consts::SQRT_2, 21))
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
    /// Time to first token seen at the gateway, in seconds, by model.
    pub ttft_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// Gap between tokens seen at the gateway, in seconds.
    pub inter_token_seconds: Histogram,
    pub tokens_out: Family<Labels, Counter>,
    pub active_streams: Gauge,
    pub game_sessions: Family<Labels, Counter>,
    pub active_game_sessions: Gauge,
    pub game_frames_relayed: Counter,
    /// Video bytes (frame headers and payloads) delivered to players.
    pub game_relayed_bytes: Counter,
    /// A frame's age when the relay delivered it: from its capture on the node (the node's
    /// clock) to its delivery by the gateway (the gateway's clock), in seconds.
    pub game_frame_latency_seconds: Histogram,
    pub game_frames_dropped: Family<Labels, Counter>,
    /// 1 while the gateway's runtime is saturated and the relay sheds queued frames.
    pub game_relay_overloaded: Gauge,
    /// Audio packets relayed to players.
    pub game_audio_relayed: Counter,
    /// Audio datagrams from nodes dropped, by reason (`AudioDrop::as_str`).
    pub game_audio_dropped: Family<Labels, Counter>,
    /// Datagrams from WebTransport players ignored, by reason (`prefix`: not this connection's
    /// session; `malformed`: not an input datagram; `foreign`: another connection's session).
    pub webtransport_datagrams_dropped: Family<Labels, Counter>,
    /// `Ping` input datagrams from WebTransport players, by `answered` (`yes`: echoed for the
    /// page's RTT; `rate_limited`: over [`crate::game::service`]'s echo budget, not echoed).
    pub webtransport_pings: Family<Labels, Counter>,
    /// WebTransport connections refused after their handshake, by reason (`handshake`,
    /// `path`, `auth_timeout`).
    pub webtransport_refused: Family<Labels, Counter>,
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
    /// Per-request children of the families above, found without building and hashing a
    /// label set (see [`Hot`]).
    pub hot: HotChildren,
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
    /// `checker_checks{kind,state}`: completed checks by kind and the state they left.
    pub checker_checks: Family<Labels, Counter>,
    /// `checker_probes{outcome}`: probe sessions by outcome (`ok`, `failed`, `busy`).
    pub checker_probes: Family<Labels, Counter>,
    /// `checker_reclassifications`: nodes reclassified after an impossible claim.
    pub checker_reclassifications: Counter,
    /// `node_verification{state}`: live nodes by verification state.
    pub node_verification: Family<Labels, Gauge>,
    /// Always 1; its labels say which build runs.
    build_info: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Every family the gateway exports, as its `# TYPE` line names it, with its type: counters
/// are scraped as `NAME_total`, histograms as `NAME_bucket`, `NAME_sum` and `NAME_count`. A
/// fresh gateway's `/metrics` shows exactly these (the `process_*` ones on Linux only); the
/// Grafana dashboard in `deploy/grafana/` may use only these.
pub const FAMILIES: &[(&str, MetricType)] = &[
    ("nearpath_build_info", MetricType::Gauge),
    ("nearpath_nodes", MetricType::Gauge),
    ("nearpath_node_registrations", MetricType::Counter),
    ("nearpath_node_rejections", MetricType::Counter),
    ("nearpath_node_heartbeat_misses", MetricType::Counter),
    ("nearpath_node_penalties", MetricType::Counter),
    ("nearpath_node_disconnects", MetricType::Counter),
    ("nearpath_node_slowdowns", MetricType::Counter),
    ("nearpath_node_id_takeovers", MetricType::Counter),
    ("nearpath_geofence_decisions", MetricType::Counter),
    ("nearpath_geo_reloads", MetricType::Counter),
    ("nearpath_inference_requests", MetricType::Counter),
    ("nearpath_inference_failovers", MetricType::Counter),
    ("nearpath_inference_ttft_seconds", MetricType::Histogram),
    (
        "nearpath_inference_inter_token_seconds",
        MetricType::Histogram,
    ),
    ("nearpath_inference_tokens_out", MetricType::Counter),
    ("nearpath_inference_active_streams", MetricType::Gauge),
    ("nearpath_inference_queue_depth", MetricType::Gauge),
    (
        "nearpath_inference_queue_wait_seconds",
        MetricType::Histogram,
    ),
    ("nearpath_inference_node_ejections", MetricType::Counter),
    ("nearpath_inference_nodes_ejected", MetricType::Gauge),
    ("nearpath_inference_fallbacks", MetricType::Counter),
    ("nearpath_inference_blip_waits", MetricType::Counter),
    ("nearpath_inference_usage_mismatches", MetricType::Counter),
    ("nearpath_game_sessions", MetricType::Counter),
    ("nearpath_game_active_sessions", MetricType::Gauge),
    ("nearpath_game_frames_relayed", MetricType::Counter),
    ("nearpath_game_relayed_bytes", MetricType::Counter),
    ("nearpath_game_frame_latency_seconds", MetricType::Histogram),
    ("nearpath_game_frames_dropped", MetricType::Counter),
    ("nearpath_game_relay_overloaded", MetricType::Gauge),
    ("nearpath_game_audio_relayed", MetricType::Counter),
    ("nearpath_game_audio_dropped", MetricType::Counter),
    (
        "nearpath_webtransport_datagrams_dropped",
        MetricType::Counter,
    ),
    ("nearpath_webtransport_pings", MetricType::Counter),
    ("nearpath_webtransport_refused", MetricType::Counter),
    ("nearpath_game_failovers", MetricType::Counter),
    ("nearpath_game_pauses", MetricType::Counter),
    ("nearpath_quic_handshakes_refused", MetricType::Counter),
    ("nearpath_quic_retries", MetricType::Counter),
    ("nearpath_http_connections_refused", MetricType::Counter),
    ("nearpath_http_connections_timed_out", MetricType::Counter),
    ("nearpath_ledger_write_failures", MetricType::Counter),
    ("nearpath_ledger_healthy", MetricType::Gauge),
    ("nearpath_ledger_refusals", MetricType::Counter),
    ("nearpath_key_cap_refusals", MetricType::Counter),
    ("nearpath_key_budget_refusals", MetricType::Counter),
    ("nearpath_limit_leases", MetricType::Counter),
    ("nearpath_limit_store_waits", MetricType::Counter),
    ("nearpath_limit_fail_open", MetricType::Counter),
    ("nearpath_federation_gateways_live", MetricType::Gauge),
    ("nearpath_checker_checks", MetricType::Counter),
    ("nearpath_checker_probes", MetricType::Counter),
    ("nearpath_checker_reclassifications", MetricType::Counter),
    ("nearpath_node_verification", MetricType::Gauge),
    ("process_cpu_seconds", MetricType::Counter),
    ("process_resident_memory_bytes", MetricType::Gauge),
    ("process_virtual_memory_bytes", MetricType::Gauge),
    ("process_open_fds", MetricType::Gauge),
    ("process_max_fds", MetricType::Gauge),
    ("process_threads", MetricType::Gauge),
    ("process_start_time_seconds", MetricType::Gauge),
];

/// The families [`FAMILIES`] lists that this platform exports (`process_*` needs Linux's
/// `/proc`).
pub fn exported_families() -> impl Iterator<Item = (&'static str, MetricType)> {
    FAMILIES
        .iter()
        .copied()
        .filter(|(name, _)| cfg!(target_os = "linux") || !name.starts_with("process_"))
}

/// The sample names a family of `kind` named `family` is scraped as.
pub fn sample_names(family: &str, kind: MetricType) -> Vec<String> {
    match kind {
        MetricType::Counter => vec![format!("{family}_total")],
        MetricType::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{family}{s}"))
            .collect(),
        _ => vec![family.to_string()],
    }
}

/// The label values of each bounded labelled family that are known before any event. A fresh
/// gateway shows every combination below at 0; the call sites record only these values (a
/// test in `gateway/tests/metrics.rs` ties the enums behind them to these lists).
pub mod label_values {
    /// `node_rejections{code}`: `RejectCode::as_str`.
    pub const NODE_REJECT_CODES: &[&str] = &[
        "bad_token",
        "operator_not_verified",
        "operator_suspended",
        "geofence",
        "version",
        "duplicate",
        "other",
    ];
    /// `node_penalties{kind}`.
    pub const NODE_PENALTY_KINDS: &[&str] = &[
        "disconnect_while_draining",
        "disconnect_without_drain",
        "usage_mismatch",
        "impossible_claim",
    ];
    /// `node_verification{state}` and `checker_checks{state}`: the checker's verification
    /// states.
    pub const VERIFICATION_STATES: &[&str] = &[
        "unverified",
        "verified",
        "mislocated",
        "impossible_claim",
        "quarantined",
    ];
    /// `checker_checks{kind}`.
    pub const CHECKER_CHECK_KINDS: &[&str] =
        &["registration", "standby", "session", "identity", "location"];
    /// `checker_probes{outcome}`.
    pub const CHECKER_PROBE_OUTCOMES: &[&str] = &["ok", "failed", "busy"];
    /// `node_disconnects{cause}`: `LeaveCause::as_str`.
    pub const NODE_DISCONNECT_CAUSES: &[&str] = &[
        "connection_lost",
        "heartbeat_timeout",
        "kicked",
        "revoked",
        "gateway_shutdown",
        "protocol_error",
        "path_refused",
    ];
    /// `geofence_decisions{side}`. Allowed decisions carry `rule="-"`; denials name the
    /// configured rule, so they appear at the first denial by that rule.
    pub const GEOFENCE_SIDES: &[&str] = &["client", "node"];
    /// `geo_reloads{outcome}`.
    pub const GEO_RELOAD_OUTCOMES: &[&str] = &["ok", "error"];
    /// `inference_requests{api}`.
    pub const INFERENCE_APIS: &[&str] = &["http", "quic"];
    /// `inference_requests{outcome}`: `ok`, `cancelled` (the client left), an error kind
    /// (`error::Kind::as_str`), or `redirected` (sent to a peer gateway with a ticket; the peer
    /// counts it again as its own request).
    pub const INFERENCE_OUTCOMES: &[&str] = &[
        "ok",
        "cancelled",
        "invalid_request",
        "unauthenticated",
        "key_revoked",
        "geofence",
        "forbidden",
        "not_found",
        "method_not_allowed",
        "too_large",
        "unsupported_media_type",
        "unprocessable",
        "rate_limited",
        "unavailable",
        "node_failed",
        "timeout",
        "internal",
        "redirected",
    ];
    /// `inference_blip_waits{outcome}`.
    pub const BLIP_WAIT_OUTCOMES: &[&str] = &["served", "unavailable"];
    /// `inference_usage_mismatches{field}`.
    pub const USAGE_FIELDS: &[&str] = &["prompt", "completion"];
    /// `game_sessions{transport}`.
    pub const GAME_TRANSPORTS: &[&str] = &["quic", "webrtc", "webtransport"];
    /// `game_sessions{outcome}`: how sessions ended, then why starts were refused (the error
    /// code); any other code is counted as `other`.
    pub const GAME_SESSION_OUTCOMES: &[&str] = &[
        "ok",
        "client_left",
        "client_gone",
        "node_lost",
        "key_revoked",
        "ended_by_node",
        "redirected",
        "resumed",
        "bad_ticket",
        "ticket_node_unavailable",
        "bad_resume",
        "resume_conflict",
        "geofence",
        "unknown_game",
        "no_capacity",
        "ledger_unavailable",
        "concurrency_limit_exceeded",
        "rate_limit_exceeded",
        super::OTHER,
    ];
    /// `game_frames_dropped{reason}`: `DropReason::as_str`.
    pub const FRAME_DROP_REASONS: &[&str] = &["late", "overload", "foreign", "relay", "shed"];
    /// `game_audio_dropped{reason}`: `AudioDrop::as_str`.
    pub const AUDIO_DROP_REASONS: &[&str] = &["malformed", "foreign", "relay"];
    /// `webtransport_datagrams_dropped{reason}`.
    pub const WT_DATAGRAM_DROPS: &[&str] = &["prefix", "malformed", "foreign"];
    /// `webtransport_pings{answered}`.
    pub const WT_PING_ANSWERS: &[&str] = &["yes", "rate_limited"];
    /// `webtransport_refused{reason}`.
    pub const WT_REFUSALS: &[&str] = &["handshake", "path", "auth_timeout"];
    /// `game_pauses{outcome}`.
    pub const PAUSE_OUTCOMES: &[&str] = &["same_node", "other_node", "expired", "ended"];
    /// `quic_handshakes_refused{reason}`: `QuicRefusal::as_str`.
    pub const QUIC_REFUSALS: &[&str] = &["rate", "unauthenticated"];
    /// `http_connections_*{listener}`.
    pub const HTTP_LISTENERS: &[&str] = &["http", "admin"];
    /// `http_connections_refused{reason}`: `HttpRefusal::as_str`.
    pub const HTTP_REFUSALS: &[&str] = &["max_connections", "max_connections_per_ip"];
    /// `http_connections_timed_out{phase}`.
    pub const HTTP_TIMEOUT_PHASES: &[&str] = &["tls", "header", "idle"];
    /// `ledger_refusals{entry}` and `key_cap_refusals{entry}`.
    pub const ENTRIES: &[&str] = &["http", "quic", "webrtc"];
    /// `key_cap_refusals{entry, cap}`: the caps each entry point has.
    pub const KEY_CAPS: &[(&str, &[&str])] = &[
        ("http", &["streams"]),
        ("quic", &["streams", "sessions", "session_starts"]),
        ("webrtc", &["sessions", "session_starts"]),
    ];
    /// `key_budget_refusals{budget}`: `Budget::as_str`.
    pub const BUDGETS: &[&str] = &[
        "tokens_per_day",
        "tokens_per_month",
        "usd_per_day",
        "usd_per_month",
    ];
    /// `limit_*{pool}` for per-minute pools: `RatePool::as_str`.
    pub const RATE_POOLS: &[&str] = &["requests", "tokens", "session_starts"];
    /// `limit_*{pool}` for concurrency pools: `CapPool::as_str`.
    pub const CAP_POOLS: &[&str] = &["streams", "sessions"];
    /// `limit_leases{result}` of a per-minute pool.
    pub const RATE_LEASE_RESULTS: &[&str] = &["granted", "partial", "spent", "failed"];
    /// `limit_leases{result}` of a concurrency pool.
    pub const CAP_LEASE_RESULTS: &[&str] = &["reserved", "failed"];
    /// `limit_store_waits{result}`.
    pub const WAIT_RESULTS: &[&str] = &["admitted", "refused", "failed", "timeout"];
}

/// `value` if it is one of `known`, else [`OTHER`]: for labels taken from strings that are
/// bounded only by convention (error codes).
pub fn bounded<'a>(value: &'a str, known: &[&'static str]) -> &'a str {
    if known.contains(&value) {
        value
    } else {
        OTHER
    }
}

/// What `nearpath_build_info` says: the crate version, the git commit it was built from
/// (`unknown` outside a git checkout) and the compiler.
pub fn build_info() -> [(&'static str, &'static str); 3] {
    [
        ("version", env!("CARGO_PKG_VERSION")),
        ("git_sha", env!("NEARPATH_GIT_SHA")),
        ("rustc", env!("NEARPATH_RUSTC_VERSION")),
    ]
}

/// Registers `metric` under `registry`'s prefix, listed even while it has no series.
fn reg(registry: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    registry.register(name, help, Listed(metric));
}

/// A metric whose `# HELP` and `# TYPE` lines are written even while it has no series: the
/// registry leaves empty families out, and a family whose label values are not known in
/// advance (a model, a country) would otherwise be missing from `/metrics` until its first
/// event.
#[derive(Debug)]
struct Listed<M>(M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

impl Metrics {
    pub fn new() -> Self {
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
            ttft_seconds: Family::new_with_constructor(ttft_histogram),
            inter_token_seconds: inter_token_histogram(),
            tokens_out: Family::default(),
            active_streams: Gauge::default(),
            game_sessions: Family::default(),
            active_game_sessions: Gauge::default(),
            game_frames_relayed: Counter::default(),
            game_relayed_bytes: Counter::default(),
            game_frame_latency_seconds: frame_latency_histogram(),
            game_frames_dropped: Family::default(),
            game_relay_overloaded: Gauge::default(),
            game_audio_relayed: Counter::default(),
            game_audio_dropped: Family::default(),
            webtransport_datagrams_dropped: Family::default(),
            webtransport_pings: Family::default(),
            webtransport_refused: Family::default(),
            game_failovers: Counter::default(),
            geo_reloads: Family::default(),
            quic_handshakes_refused: Family::default(),
            quic_retries: Counter::default(),
            http_connections_refused: Family::default(),
            http_connections_timed_out: Family::default(),
            model_labels: Default::default(),
            hot: HotChildren::default(),
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
            checker_checks: Family::default(),
            checker_probes: Family::default(),
            checker_reclassifications: Counter::default(),
            node_verification: Family::default(),
            build_info: Family::default(),
            registry: Registry::default(),
        };
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("nearpath");
        reg(
            r,
            "build_info",
            "Always 1; the labels say which build of the gateway runs",
            m.build_info.clone(),
        );
        reg(
            r,
            "nodes",
            "Live edge nodes by state, country and GPU class",
            m.nodes.clone(),
        );
        reg(
            r,
            "node_registrations",
            "Successful node registrations",
            m.registrations.clone(),
        );
        reg(
            r,
            "node_rejections",
            "Refused node registrations by code",
            m.rejections.clone(),
        );
        reg(
            r,
            "node_heartbeat_misses",
            "Heartbeat intervals that passed without a heartbeat",
            m.heartbeat_misses.clone(),
        );
        reg(
            r,
            "node_penalties",
            "Penalty events by kind",
            m.penalties.clone(),
        );
        reg(
            r,
            "node_disconnects",
            "Node disconnections by cause",
            m.node_disconnects.clone(),
        );
        reg(
            r,
            "node_slowdowns",
            "Times a node became slow: heartbeats late while its connection still delivered",
            m.nodes_slowed.clone(),
        );
        reg(
            r,
            "node_id_takeovers",
            "Registrations that took a node id over from a silent previous connection",
            m.node_id_takeovers.clone(),
        );
        reg(
            r,
            "geofence_decisions",
            "Geofence decisions by side, outcome and rule",
            m.geofence_decisions.clone(),
        );
        reg(
            r,
            "geo_reloads",
            "GeoIP database reloads by outcome",
            m.geo_reloads.clone(),
        );
        reg(
            r,
            "inference_requests",
            "Inference requests by API and outcome",
            m.inference_requests.clone(),
        );
        reg(
            r,
            "inference_failovers",
            "Inference attempts retried on another node before the first token",
            m.inference_failovers.clone(),
        );
        reg(
            r,
            "inference_ttft_seconds",
            "Time to first token seen at the gateway, in seconds, by model",
            m.ttft_seconds.clone(),
        );
        reg(
            r,
            "inference_inter_token_seconds",
            "Gap between tokens seen at the gateway, in seconds",
            m.inter_token_seconds.clone(),
        );
        reg(
            r,
            "inference_tokens_out",
            "Completion tokens streamed to clients, by model",
            m.tokens_out.clone(),
        );
        reg(
            r,
            "inference_active_streams",
            "Inference requests in flight",
            m.active_streams.clone(),
        );
        reg(
            r,
            "inference_queue_depth",
            "Inference requests waiting for a slot, by model",
            m.inference_queue_depth.clone(),
        );
        reg(
            r,
            "inference_queue_wait_seconds",
            "How long queued inference requests waited for a slot, in seconds",
            m.inference_queue_wait_seconds.clone(),
        );
        reg(
            r,
            "inference_node_ejections",
            "Nodes ejected from inference routing by outlier detection",
            m.inference_node_ejections.clone(),
        );
        reg(
            r,
            "inference_nodes_ejected",
            "Nodes ejected from inference routing now",
            m.inference_nodes_ejected.clone(),
        );
        reg(
            r,
            "inference_fallbacks",
            "Inference requests served by a fallback model, by model pair",
            m.inference_fallbacks.clone(),
        );
        reg(
            r,
            "inference_blip_waits",
            "Requests for a recently served model with no node, by outcome (served, unavailable)",
            m.inference_blip_waits.clone(),
        );
        reg(r, "inference_usage_mismatches", "Node-reported token counts beyond the tolerance from the gateway's own count, by field", m.usage_mismatches.clone());
        reg(r, "game_sessions", "Game sessions by transport and outcome (how they ended, or why their start was refused)", m.game_sessions.clone());
        reg(
            r,
            "game_active_sessions",
            "Game sessions in progress",
            m.active_game_sessions.clone(),
        );
        reg(
            r,
            "game_frames_relayed",
            "Video frames relayed to players",
            m.game_frames_relayed.clone(),
        );
        reg(
            r,
            "game_relayed_bytes",
            "Video bytes (frame headers and payloads) relayed to players",
            m.game_relayed_bytes.clone(),
        );
        reg(r, "game_frame_latency_seconds", "Age of video frames when the relay delivered them, from their capture on the node, in seconds", m.game_frame_latency_seconds.clone());
        reg(
            r,
            "game_frames_dropped",
            "Video frames dropped by reason",
            m.game_frames_dropped.clone(),
        );
        reg(r, "game_relay_overloaded", "1 while the gateway's runtime is saturated and the game relay sheds frames that waited too long on their way in (game.overload_queue_budget_ms)", m.game_relay_overloaded.clone());
        reg(
            r,
            "game_audio_relayed",
            "Audio packets relayed to players",
            m.game_audio_relayed.clone(),
        );
        reg(
            r,
            "game_audio_dropped",
            "Audio datagrams from nodes dropped by reason",
            m.game_audio_dropped.clone(),
        );
        reg(
            r,
            "webtransport_datagrams_dropped",
            "Datagrams from WebTransport players ignored by reason",
            m.webtransport_datagrams_dropped.clone(),
        );
        reg(
            r,
            "webtransport_pings",
            "Ping datagrams from WebTransport players, echoed or over the echo budget",
            m.webtransport_pings.clone(),
        );
        reg(
            r,
            "webtransport_refused",
            "WebTransport connections refused after their handshake by reason",
            m.webtransport_refused.clone(),
        );
        reg(
            r,
            "game_failovers",
            "Game sessions moved to another node",
            m.game_failovers.clone(),
        );
        reg(
            r,
            "game_pauses",
            "Game sessions paused by the loss of their node, by how the pause ended",
            m.game_pauses.clone(),
        );
        reg(
            r,
            "quic_handshakes_refused",
            "QUIC connection attempts refused before the handshake, by reason",
            m.quic_handshakes_refused.clone(),
        );
        reg(
            r,
            "quic_retries",
            "QUIC connection attempts asked to validate their address (retry token)",
            m.quic_retries.clone(),
        );
        reg(
            r,
            "http_connections_refused",
            "HTTP connections closed at once by a connection cap, by listener and reason",
            m.http_connections_refused.clone(),
        );
        reg(
            r,
            "http_connections_timed_out",
            "HTTP connections closed by a timeout, by listener and phase",
            m.http_connections_timed_out.clone(),
        );
        reg(
            r,
            "ledger_write_failures",
            "Usage ledger writes (records and health probes) that failed to commit",
            m.ledger_write_failures.clone(),
        );
        reg(
            r,
            "ledger_healthy",
            "1 while the usage ledger commits; 0 while it cannot and new work is refused",
            m.ledger_healthy.clone(),
        );
        reg(r, "ledger_refusals", "Requests and session starts refused because the usage ledger cannot commit, by entry point", m.ledger_refusals.clone());
        reg(
            r,
            "key_cap_refusals",
            "Work refused by a per-key cap, by entry point and cap",
            m.key_cap_refusals.clone(),
        );
        reg(
            r,
            "key_budget_refusals",
            "Requests refused because their API key spent one of its budgets, by budget",
            m.key_budget_refusals.clone(),
        );
        reg(r, "limit_leases", "Fleet-wide limit leases and concurrency reservations taken from the store, by pool and result", m.limit_leases.clone());
        reg(r, "limit_store_waits", "Admissions that waited for the store because their local slice was empty, by pool and result", m.limit_store_waits.clone());
        reg(
            r,
            "limit_fail_open",
            "Admissions decided by the local per-gateway limit because the store failed, by pool",
            m.limit_fail_open.clone(),
        );
        reg(
            r,
            "federation_gateways_live",
            "Gateways live in the federation's gateway directory (this one included)",
            m.federation_gateways_live.clone(),
        );
        reg(
            r,
            "checker_checks",
            "Completed checks of node claims by kind and the verification state they left",
            m.checker_checks.clone(),
        );
        reg(
            r,
            "checker_probes",
            "Probe sessions the checker ran, by outcome",
            m.checker_probes.clone(),
        );
        reg(
            r,
            "checker_reclassifications",
            "Nodes reclassified to another GPU class after an impossible claim",
            m.checker_reclassifications.clone(),
        );
        reg(
            r,
            "node_verification",
            "Live nodes by verification state",
            m.node_verification.clone(),
        );
        // The conventional process metrics carry no prefix, so they live in the root registry.
        root.register_collector(Box::new(ProcessCollector));
        m.ledger_healthy.set(1);
        m.build_info.get_or_create(&labels(build_info())).set(1);
        m.declare_known_labels();
        Metrics {
            registry: root,
            ..m
        }
    }

    /// Creates every series of a bounded labelled family whose label values are known now, at
    /// 0, so that `rate()` and alerts have a series before the first event.
    fn declare_known_labels(&self) {
        use label_values::*;
        fn each(family: &Family<Labels, Counter>, key: &'static str, values: &[&str]) {
            for v in values {
                zero(family, labels([(key, v)]));
            }
        }
        each(&self.rejections, "code", NODE_REJECT_CODES);
        each(&self.penalties, "kind", NODE_PENALTY_KINDS);
        each(&self.checker_probes, "outcome", CHECKER_PROBE_OUTCOMES);
        for kind in CHECKER_CHECK_KINDS {
            for state in VERIFICATION_STATES {
                zero(
                    &self.checker_checks,
                    labels([("kind", kind), ("state", state)]),
                );
            }
        }
        for state in VERIFICATION_STATES {
            self.node_verification
                .get_or_create(&labels([("state", state)]))
                .set(0);
        }
        each(&self.node_disconnects, "cause", NODE_DISCONNECT_CAUSES);
        for side in GEOFENCE_SIDES {
            zero(
                &self.geofence_decisions,
                labels([("side", side), ("outcome", "allow"), ("rule", "-")]),
            );
        }
        each(&self.geo_reloads, "outcome", GEO_RELOAD_OUTCOMES);
        for api in INFERENCE_APIS {
            for outcome in INFERENCE_OUTCOMES {
                zero(
                    &self.inference_requests,
                    labels([("api", api), ("outcome", outcome)]),
                );
            }
        }
        each(&self.inference_blip_waits, "outcome", BLIP_WAIT_OUTCOMES);
        each(&self.usage_mismatches, "field", USAGE_FIELDS);
        for transport in GAME_TRANSPORTS {
            for outcome in GAME_SESSION_OUTCOMES {
                zero(
                    &self.game_sessions,
                    labels([("transport", transport), ("outcome", outcome)]),
                );
            }
        }
        each(&self.game_frames_dropped, "reason", FRAME_DROP_REASONS);
        each(&self.game_audio_dropped, "reason", AUDIO_DROP_REASONS);
        each(
            &self.webtransport_datagrams_dropped,
            "reason",
            WT_DATAGRAM_DROPS,
        );
        each(&self.webtransport_pings, "answered", WT_PING_ANSWERS);
        each(&self.webtransport_refused, "reason", WT_REFUSALS);
        each(&self.game_pauses, "outcome", PAUSE_OUTCOMES);
        each(&self.quic_handshakes_refused, "reason", QUIC_REFUSALS);
        for listener in HTTP_LISTENERS {
            for reason in HTTP_REFUSALS {
                zero(
                    &self.http_connections_refused,
                    labels([("listener", listener), ("reason", reason)]),
                );
            }
            for phase in HTTP_TIMEOUT_PHASES {
                zero(
                    &self.http_connections_timed_out,
                    labels([("listener", listener), ("phase", phase)]),
                );
            }
        }
        each(&self.ledger_refusals, "entry", ENTRIES);
        for (entry, caps) in KEY_CAPS {
            for cap in *caps {
                zero(
                    &self.key_cap_refusals,
                    labels([("entry", entry), ("cap", cap)]),
                );
            }
        }
        each(&self.key_budget_refusals, "budget", BUDGETS);
        for (pools, results) in [
            (RATE_POOLS, RATE_LEASE_RESULTS),
            (CAP_POOLS, CAP_LEASE_RESULTS),
        ] {
            for pool in pools {
                for result in results {
                    zero(
                        &self.limit_leases,
                        labels([("pool", pool), ("result", result)]),
                    );
                }
                for result in WAIT_RESULTS {
                    zero(
                        &self.limit_store_waits,
                        labels([("pool", pool), ("result", result)]),
                    );
                }
                zero(&self.limit_fail_open, labels([("pool", pool)]));
            }
        }
    }

    /// Lists the denials of the geofence's `rules` (the configured ones and the built-in
    /// `unknown-location` and `anonymous-ip`) at 0, at both checkpoints. The rule names come
    /// from the config, so the set stays bounded.
    pub fn declare_geofence_rules<'a>(&self, rules: impl IntoIterator<Item = &'a str>) {
        for rule in rules {
            for side in label_values::GEOFENCE_SIDES {
                zero(
                    &self.geofence_decisions,
                    labels([("side", side), ("outcome", "deny"), ("rule", rule)]),
                );
            }
        }
    }

    /// Lists the configured fallback pairs (`inference.fallbacks`) at 0.
    pub fn declare_fallbacks(&self, fallbacks: &std::collections::BTreeMap<String, Vec<String>>) {
        for (from, tos) in fallbacks {
            for to in tos {
                zero(
                    &self.inference_fallbacks,
                    labels([("from", from), ("to", to)]),
                );
            }
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Creates the series of `family` labelled `l`, at 0.
fn zero(family: &Family<Labels, Counter>, l: Labels) {
    // Creating the series is the point; its handle is not needed.
    let _ = family.get_or_create(&l);
}

/// The conventional `process_*` metrics, read from `/proc/self` at each scrape (Linux only;
/// elsewhere the collector exports nothing).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = process::read() else {
            return Ok(());
        };
        let counter = ConstCounter::new(p.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            counter.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 6] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                p.max_fds as f64,
            ),
            (
                "process_threads",
                "Number of OS threads in the process",
                p.threads as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                p.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Process figures from `/proc`. The parsers are separate from the reads so that they can be
/// tested on fixed text.
pub mod process {
    /// One reading of the process figures.
    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct Process {
        pub cpu_seconds: f64,
        pub resident_bytes: u64,
        pub virtual_bytes: u64,
        pub open_fds: u64,
        pub max_fds: u64,
        pub threads: u64,
        pub start_time_seconds: f64,
    }

    /// From `/proc/self/stat`: user and system CPU ticks, the thread count and the start time
    /// in ticks since boot. The command name (field 2) may hold spaces and parentheses, so the
    /// fields are counted from its last `)`.
    pub fn parse_stat(stat: &str) -> Option<(u64, u64, u64, u64)> {
        let rest = &stat[stat.rfind(')')? + 1..];
        // `rest` starts at field 3 (state); utime is field 14, stime 15, num_threads 20,
        // starttime 22.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        Some((field(14)?, field(15)?, field(20)?, field(22)?))
    }

    /// From `/proc/self/status`: `VmRSS` and `VmSize`, in bytes.
    pub fn parse_status(status: &str) -> (Option<u64>, Option<u64>) {
        let kb = |key: &str| {
            status.lines().find_map(|l| {
                let v = l.strip_prefix(key)?.strip_prefix(':')?;
                let n: u64 = v.trim().strip_suffix("kB")?.trim().parse().ok()?;
                n.checked_mul(1024)
            })
        };
        (kb("VmRSS"), kb("VmSize"))
    }

    /// From `/proc/stat`: the boot time, seconds since the Unix epoch.
    pub fn parse_boot_time(stat: &str) -> Option<u64> {
        stat.lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
    }

    /// From `/proc/self/limits`: the soft limit on open files (`unlimited` is `u64::MAX`).
    pub fn parse_max_fds(limits: &str) -> Option<u64> {
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let soft = line["Max open files".len()..].split_whitespace().next()?;
        if soft == "unlimited" {
            Some(u64::MAX)
        } else {
            soft.parse().ok()
        }
    }

    /// Reads the figures of this process; `None` where `/proc` is not there.
    #[cfg(target_os = "linux")]
    pub fn read() -> Option<Process> {
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let (utime, stime, threads, start_ticks) = parse_stat(&stat)?;
        let (rss, vsize) = std::fs::read_to_string("/proc/self/status")
            .map(|s| parse_status(&s))
            .unwrap_or((None, None));
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_boot_time(&s))
            .unwrap_or(0);
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| parse_max_fds(&s))
            .unwrap_or(0);
        Some(Process {
            cpu_seconds: (utime + stime) as f64 / ticks,
            resident_bytes: rss.unwrap_or(0),
            virtual_bytes: vsize.unwrap_or(0),
            open_fds,
            max_fds,
            threads,
            start_time_seconds: boot as f64 + start_ticks as f64 / ticks,
        })
    }

    /// Reads nothing: only Linux has `/proc/self`.
    #[cfg(not(target_os = "linux"))]
    pub fn read() -> Option<Process> {
        None
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

/// The children that every inference request touches, one [`Hot`] per family.
#[derive(Default)]
pub struct HotChildren {
    pub inference_requests: Hot<Counter>,
    pub ttft_seconds: Hot<Histogram>,
    pub tokens_out: Hot<Counter>,
    pub geofence_decisions: Hot<Counter>,
}

/// How many children a [`Hot`] keeps; lookups of others go to the family each time.
const HOT_CHILDREN: usize = 32;

/// A few children of a family, found by comparing label names and values in a short scan.
/// `Family::get_or_create` needs a built label set (a vector and a `String` per value) and
/// hashes it with SipHash, a thousand instructions or so per event; on the inference path that
/// was several lookups per request. The handles kept here are the family's own children (a
/// `Counter` or `Histogram` clone shares its value), so scrapes see every event either way.
/// Only for families whose children are never removed.
pub struct Hot<M> {
    slots: std::sync::RwLock<Vec<(HotKey, M)>>,
}

/// A kept child's label names and values, in the order the call site gives them.
type HotKey = Vec<(&'static str, Box<str>)>;

impl<M> Default for Hot<M> {
    fn default() -> Self {
        Hot {
            slots: std::sync::RwLock::new(Vec::new()),
        }
    }
}

impl<M: Clone> Hot<M> {
    /// The child of `family` labelled `pairs` (as `family.get_or_create(&labels(pairs))`).
    pub fn get<C: MetricConstructor<M>, const N: usize>(
        &self,
        family: &Family<Labels, M, C>,
        pairs: [(&'static str, &str); N],
    ) -> M {
        let same = |kept: &[(&'static str, Box<str>)]| {
            kept.len() == N
                && kept
                    .iter()
                    .zip(pairs.iter())
                    .all(|((kn, kv), (n, v))| kn == n && &**kv == *v)
        };
        {
            let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, child)) = slots.iter().find(|(kept, _)| same(kept)) {
                return child.clone();
            }
        }
        let child = family.get_or_create(&labels(pairs)).clone();
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        if slots.len() < HOT_CHILDREN && !slots.iter().any(|(kept, _)| same(kept)) {
            let kept = pairs.iter().map(|(n, v)| (*n, Box::from(*v))).collect();
            slots.push((kept, child.clone()));
        }
        child
    }
}

/// Shorthand for a label set.
pub fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// The metric names a Grafana dashboard uses, so that a test can hold them against the
/// families the gateway exports (a rename must not silently blank a panel).
pub mod dashboard {
    /// Words of PromQL that are not metric names when they stand alone (aggregations may be
    /// followed by `by (...)` before their parenthesis).
    const KEYWORDS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    ];
    /// Keywords followed by a parenthesised list of label names.
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];

    /// The metric names in a PromQL expression: identifiers outside strings, label matchers
    /// (`{...}`), ranges (`[...]`), label lists (`by (...)`) and Grafana variables (`$x`), that
    /// are neither functions nor keywords.
    pub fn metric_names(expr: &str) -> Vec<String> {
        let c: Vec<char> = expr.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        // Skips from an opening delimiter to its match, over strings.
        let skip_group = |mut i: usize, open: char, close: char| -> usize {
            let mut depth = 0;
            while i < c.len() {
                match c[i] {
                    '"' | '\'' | '`' => i = skip_string(&c, i),
                    x if x == open => depth += 1,
                    x if x == close => {
                        depth -= 1;
                        if depth == 0 {
                            return i + 1;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            i
        };
        while i < c.len() {
            let ch = c[i];
            if ch == '"' || ch == '\'' || ch == '`' {
                i = skip_string(&c, i) + 1;
            } else if ch == '{' {
                i = skip_group(i, '{', '}');
            } else if ch == '[' {
                i = skip_group(i, '[', ']');
            } else if ch == '$' {
                i += 1;
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            } else if ch.is_ascii_digit()
                || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
            {
                // A number, exponent included (`1e-9`).
                i += 1;
                while i < c.len()
                    && (c[i].is_ascii_alphanumeric()
                        || c[i] == '.'
                        || ((c[i] == '-' || c[i] == '+') && matches!(c[i - 1], 'e' | 'E')))
                {
                    i += 1;
                }
            } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
                let start = i;
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let mut j = i;
                while j < c.len() && c[j].is_whitespace() {
                    j += 1;
                }
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) && c.get(j) == Some(&'(') {
                    i = skip_group(j, '(', ')');
                } else if c.get(j) == Some(&'(') || KEYWORDS.contains(&lower.as_str()) {
                    // A function or an operator.
                } else {
                    out.push(word);
                }
            } else {
                i += 1;
            }
        }
        out
    }

    /// The index of the quote that closes the string opening at `i`.
    fn skip_string(c: &[char], i: usize) -> usize {
        let quote = c[i];
        let mut j = i + 1;
        while j < c.len() && c[j] != quote {
            if c[j] == '\\' && quote != '`' {
                j += 1;
            }
            j += 1;
        }
        j
    }

    /// Every metric a dashboard's panels and template variables use, with where: the panel
    /// title (or `variable NAME`) for each. Panels inside collapsed rows count too.
    pub fn used_metrics(dashboard: &serde_json::Value) -> Vec<(String, String)> {
        let mut out = Vec::new();
        fn panels(list: &serde_json::Value, out: &mut Vec<(String, String)>) {
            for p in list.as_array().into_iter().flatten() {
                let title = p["title"].as_str().unwrap_or("?").to_string();
                for t in p["targets"].as_array().into_iter().flatten() {
                    if let Some(expr) = t["expr"].as_str() {
                        for name in metric_names(expr) {
                            out.push((title.clone(), name));
                        }
                    }
                }
                panels(&p["panels"], out);
            }
        }
        panels(&dashboard["panels"], &mut out);
        for v in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(q) = v["query"].as_str() else {
                continue;
            };
            // Grafana's `label_values(SELECTOR, LABEL)`: the selector is PromQL, the label not.
            let Some(inner) = q.trim().strip_prefix("label_values(") else {
                continue;
            };
            let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
            let name = format!("variable {}", v["name"].as_str().unwrap_or("?"));
            for m in metric_names(selector) {
                out.push((name.clone(), m));
            }
        }
        out
    }

    /// The number of panel queries (`targets[].expr`) of a dashboard, rows' panels included.
    pub fn query_count(dashboard: &serde_json::Value) -> usize {
        fn count(list: &serde_json::Value) -> usize {
            list.as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    p["targets"]
                        .as_array()
                        .map_or(0, |t| t.iter().filter(|t| t["expr"].is_string()).count())
                        + count(&p["panels"])
                })
                .sum()
        }
        count(&dashboard["panels"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The families of an exposition, from its `# TYPE` lines, with their types.
    fn families(text: &str) -> BTreeSet<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').expect("TYPE line");
                (name.to_string(), kind.to_string())
            })
            .collect()
    }

    fn type_name(t: MetricType) -> &'static str {
        match t {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            _ => "other",
        }
    }

    #[test]
    fn a_fresh_registry_exports_exactly_the_listed_families() {
        let got = families(&Metrics::new().render());
        let want: BTreeSet<_> = exported_families()
            .map(|(n, t)| (n.to_string(), type_name(t).to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn metric_names_follow_prometheus_conventions() {
        let mut seen = BTreeSet::new();
        for (name, kind) in FAMILIES {
            assert!(seen.insert(*name), "{name} listed twice");
            assert!(
                name.starts_with("nearpath_") || name.starts_with("process_"),
                "{name}: every family is under nearpath_ (or the standard process_)"
            );
            for unit in ["_ms", "_millis", "_us", "_kb", "_mb", "_percent"] {
                assert!(
                    !name.ends_with(unit) && !name.contains(&format!("{unit}_")),
                    "{name}: base units only (seconds, bytes, ratios)"
                );
            }
            // The exposition adds `_total` to counters; a family named with it would export
            // `_total_total`.
            assert!(!name.ends_with("_total"), "{name}");
            if *kind == MetricType::Histogram {
                assert!(
                    name.ends_with("_seconds") || name.ends_with("_bytes"),
                    "{name}: a histogram has a unit"
                );
            }
        }
    }

    #[test]
    fn bounded_families_start_with_every_known_label_value_at_zero() {
        let text = Metrics::new().render();
        for line in [
            "nearpath_game_frames_dropped_total{reason=\"late\"} 0",
            "nearpath_game_sessions_total{transport=\"webrtc\",outcome=\"no_capacity\"} 0",
            "nearpath_inference_requests_total{api=\"http\",outcome=\"ok\"} 0",
            "nearpath_inference_requests_total{api=\"quic\",outcome=\"node_failed\"} 0",
            "nearpath_node_rejections_total{code=\"bad_token\"} 0",
            "nearpath_node_disconnects_total{cause=\"heartbeat_timeout\"} 0",
            "nearpath_geofence_decisions_total{side=\"client\",outcome=\"allow\",rule=\"-\"} 0",
            "nearpath_key_cap_refusals_total{entry=\"webrtc\",cap=\"session_starts\"} 0",
            "nearpath_limit_leases_total{pool=\"streams\",result=\"reserved\"} 0",
            "nearpath_http_connections_timed_out_total{listener=\"admin\",phase=\"header\"} 0",
            "nearpath_quic_handshakes_refused_total{reason=\"rate\"} 0",
            "nearpath_ledger_healthy 1",
            "nearpath_game_frame_latency_seconds_count 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        // Each bounded family has its whole cross product, nothing more.
        let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        use label_values::*;
        assert_eq!(
            count("nearpath_inference_requests_total{"),
            INFERENCE_APIS.len() * INFERENCE_OUTCOMES.len()
        );
        assert_eq!(
            count("nearpath_game_sessions_total{"),
            GAME_TRANSPORTS.len() * GAME_SESSION_OUTCOMES.len()
        );
    }

    #[test]
    fn configured_geofence_rules_and_fallbacks_are_listed_at_zero() {
        let m = Metrics::new();
        m.declare_geofence_rules(["embargo", "unknown-location"]);
        let fallbacks = [(
            "big".to_string(),
            vec!["small".to_string(), "tiny".to_string()],
        )]
        .into_iter()
        .collect();
        m.declare_fallbacks(&fallbacks);
        let text = m.render();
        for line in [
            "nearpath_geofence_decisions_total{side=\"client\",outcome=\"deny\",rule=\"embargo\"} 0",
            "nearpath_geofence_decisions_total{side=\"node\",outcome=\"deny\",rule=\"unknown-location\"} 0",
            "nearpath_inference_fallbacks_total{from=\"big\",to=\"tiny\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
    }

    #[test]
    fn game_session_outcomes_outside_the_known_codes_are_other() {
        use label_values::GAME_SESSION_OUTCOMES;
        assert_eq!(bounded("no_capacity", GAME_SESSION_OUTCOMES), "no_capacity");
        assert_eq!(
            bounded("x".repeat(10_000).as_str(), GAME_SESSION_OUTCOMES),
            OTHER
        );
        assert_eq!(bounded("", GAME_SESSION_OUTCOMES), OTHER);
    }

    #[test]
    fn build_info_is_one_with_version_git_sha_and_rustc() {
        let text = Metrics::new().render();
        let line = text
            .lines()
            .find(|l| l.starts_with("nearpath_build_info{"))
            .expect("build info");
        assert!(line.ends_with("} 1"), "{line}");
        assert!(
            line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
            "{line}"
        );
        for (k, v) in build_info() {
            assert!(!v.is_empty() && !v.contains('"'), "{k}={v:?}");
        }
    }

    #[test]
    fn process_metrics_parse_hostile_proc_text() {
        // The command name may hold spaces and parentheses.
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 1000 300 18446744073709551615";
        assert_eq!(process::parse_stat(stat), Some((250, 50, 7, 12345)));
        assert_eq!(process::parse_stat("42 (x) S 1 2"), None, "truncated");
        assert_eq!(process::parse_stat("no parenthesis"), None);
        let wrong = stat.replace(" 250 ", " -250 ");
        assert_eq!(process::parse_stat(&wrong), None, "negative ticks");
        let status = "Name:\tgateway\nVmSize:\t  2048 kB\nVmRSS:\t   1024 kB\nThreads:\t7\n";
        assert_eq!(
            process::parse_status(status),
            (Some(1024 * 1024), Some(2048 * 1024))
        );
        assert_eq!(
            process::parse_status("VmRSS: 99999999999999999999 kB\nVmSize: 12"),
            (None, None)
        );
        assert_eq!(
            process::parse_boot_time("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        assert_eq!(process::parse_boot_time("btime soon"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(process::parse_max_fds(limits), Some(1024));
        assert_eq!(
            process::parse_max_fds(
                "Max open files            unlimited            unlimited            files"
            ),
            Some(u64::MAX)
        );
        assert_eq!(process::parse_max_fds(""), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_read_this_process() {
        let p = process::read().expect("/proc/self");
        assert!(
            p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes,
            "{p:?}"
        );
        assert!(
            p.threads >= 1 && p.open_fds >= 1 && p.max_fds >= p.open_fds,
            "{p:?}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started in the last day, not in the future (a tick of rounding aside).
        assert!(
            p.start_time_seconds > now - 86_400.0 && p.start_time_seconds < now + 1.0,
            "{p:?}"
        );
        let text = Metrics::new().render();
        assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    }

    #[test]
    fn promql_metric_names_skip_functions_labels_ranges_and_variables() {
        let expr = r#"histogram_quantile(0.95, sum by (le, model) (rate(nearpath_inference_ttft_seconds_bucket{instance=~"$instance",model!="a{b}"}[$__rate_interval]))) / on(instance) group_left(version) nearpath_build_info or vector(0) * 1e-3 + time() - process_start_time_seconds offset 5m"#;
        assert_eq!(
            dashboard::metric_names(expr),
            [
                "nearpath_inference_ttft_seconds_bucket",
                "nearpath_build_info",
                "process_start_time_seconds"
            ]
        );
        // A name outside the prefixes is still a name: the check then fails on it.
        assert_eq!(dashboard::metric_names("sum(up)"), ["up"]);
    }

    /// Every metric the Grafana dashboard queries is exported by a fresh gateway, so that a
    /// rename cannot silently blank a panel.
    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/nearpath-gateway.json"
        );
        let text = std::fs::read_to_string(path).expect("dashboard");
        let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
        assert!(
            json["title"].is_string() && json["uid"].is_string(),
            "a Grafana dashboard"
        );
        let exported: BTreeSet<String> = families(&Metrics::new().render())
            .into_iter()
            .flat_map(|(name, kind)| {
                let t = match kind.as_str() {
                    "counter" => MetricType::Counter,
                    "histogram" => MetricType::Histogram,
                    _ => MetricType::Gauge,
                };
                sample_names(&name, t)
            })
            .collect();
        let used = dashboard::used_metrics(&json);
        assert!(
            dashboard::query_count(&json) >= 20,
            "the dashboard has its panels"
        );
        let unknown: Vec<_> = used.iter().filter(|(_, m)| !exported.contains(m)).collect();
        assert!(
            unknown.is_empty(),
            "dashboard queries metrics the gateway does not export: {unknown:?}"
        );
        // The main figures are on it.
        for m in [
            "nearpath_nodes",
            "nearpath_game_active_sessions",
            "nearpath_inference_ttft_seconds_bucket",
            "nearpath_game_frame_latency_seconds_bucket",
            "nearpath_geofence_decisions_total",
            "nearpath_inference_requests_total",
        ] {
            assert!(
                used.iter().any(|(_, u)| u == m),
                "{m} is not on the dashboard"
            );
        }
    }

    #[test]
    fn hot_children_are_the_familys_own_and_keyed_by_names_and_values() {
        let family: Family<Labels, Counter> = Family::default();
        let hot: Hot<Counter> = Hot::default();
        hot.get(&family, [("api", "chat"), ("outcome", "ok")]).inc();
        hot.get(&family, [("api", "chat"), ("outcome", "ok")]).inc();
        hot.get(&family, [("api", "chat"), ("outcome", "error")])
            .inc();
        // Same values under other names are another child.
        hot.get(&family, [("outcome", "chat"), ("api", "ok")]).inc();
        let get = |pairs| family.get_or_create(&labels(pairs)).get();
        assert_eq!(get([("api", "chat"), ("outcome", "ok")]), 2);
        assert_eq!(get([("api", "chat"), ("outcome", "error")]), 1);
        assert_eq!(get([("outcome", "chat"), ("api", "ok")]), 1);
        // Past its bound it still counts, through the family.
        for i in 0..HOT_CHILDREN + 8 {
            let v = i.to_string();
            hot.get(&family, [("api", v.as_str()), ("outcome", "ok")])
                .inc();
            hot.get(&family, [("api", v.as_str()), ("outcome", "ok")])
                .inc();
        }
        assert!(hot.slots.read().unwrap().len() <= HOT_CHILDREN);
        let last = (HOT_CHILDREN + 7).to_string();
        assert_eq!(get([("api", last.as_str()), ("outcome", "ok")]), 2);
    }

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
