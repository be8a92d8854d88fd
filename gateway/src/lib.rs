//! The Nearpath gateway: locates clients and nodes (GeoIP), enforces the geofence, routes each
//! session to the nearest eligible node and relays its traffic. See ARCHITECTURE.md.

pub mod access;
pub mod admin;
pub mod api;
pub mod auth;
pub mod budget;
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
pub mod sdp;
pub mod server;
pub mod session_id;
pub mod slot_queue;
pub mod store;
pub mod ticket;
pub mod tls;
pub mod trunk;
pub mod webrtc;

#[cfg(test)]
mod layering;

pub use preflight::preflight;
pub use server::{BoundAddrs, Gateway, GatewayError, Listeners, Shared};

/// Installs the tracing subscriber once (text or JSON, level from config or `RUST_LOG`).
pub fn init_tracing(cfg: &nearpath_config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match cfg.format {
        nearpath_config::LogFormat::Json => builder.json().try_init(),
        nearpath_config::LogFormat::Text => builder.try_init(),
    };
}
