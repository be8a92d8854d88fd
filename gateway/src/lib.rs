//! The Nearpath gateway: locates clients and nodes (GeoIP), enforces the geofence, routes each
//! session to the nearest eligible node and relays its traffic. See ARCHITECTURE.md.

pub mod access;
pub mod admin;
pub mod api;
pub mod auth;
pub mod budget;
pub mod cert;
pub mod checker;
pub mod client;
pub mod client_addr;
pub mod clock;
pub mod components;
pub mod conn_guard;
pub mod control;
pub mod error;
pub mod federation;
pub mod fleet_limits;
pub mod game;
pub mod gpu_class;
pub mod http_util;
pub mod infer;
pub mod liveness;
pub mod meter;
pub mod metrics;
pub mod node_link;
pub mod outliers;
pub mod player;
pub mod preflight;
pub mod recent_models;
pub mod registry;
pub mod relay;
pub mod router;
pub mod saturation;
pub mod sdp;
pub mod server;
pub mod session_id;
pub mod slot_queue;
pub mod store;
pub mod ticket;
pub mod tls;
pub mod trunk;
pub mod webrtc;
pub mod webtransport;
pub mod wt_cert;

#[cfg(test)]
mod layering;

pub use preflight::preflight;
pub use server::{BoundAddrs, Gateway, GatewayError, Listeners, Shared};

/// Installs the tracing subscriber once from `[log]`: text or JSON lines, colour only on a
/// terminal (`[log] color`, `NO_COLOR`), the level from config or `RUST_LOG` with library noise
/// capped, and OTLP span export when `[log] otlp_endpoint` is set (see `nearpath_telemetry`).
/// An exporter that cannot be built is logged, and the gateway runs without it.
pub fn init_tracing(cfg: &nearpath_config::LogConfig) {
    if let Err(e) = nearpath_telemetry::init(cfg, "nearpath-gateway") {
        tracing::error!(error = %e, "logging set up without it");
    }
}
