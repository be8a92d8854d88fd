//! The in-memory federation directory of the benches that run several federated gateways in
//! one process (`trunk-ttft`, `game-hop`): what the gateways read instead of the store's
//! directory tables, so a bench decides exactly which gateways and nodes are live.

use nearpath_gateway::store::{GatewayRecord, NodeDirEntry, StoreError};
use nearpath_gateway::trunk::FleetSource;
use std::net::SocketAddr;
use std::sync::Mutex;

#[derive(Default)]
pub struct Fleet {
    pub gateways: Mutex<Vec<GatewayRecord>>,
    pub nodes: Mutex<Vec<NodeDirEntry>>,
}

impl FleetSource for Fleet {
    fn gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        Ok(self.gateways.lock().map_err(poisoned)?.clone())
    }

    fn node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        Ok(self.nodes.lock().map_err(poisoned)?.clone())
    }
}

pub fn poisoned<T>(_: T) -> StoreError {
    StoreError::Unavailable {
        message: "fleet lock poisoned".into(),
    }
}

/// Gateway `id`'s directory entry, live for the whole run (a day from `now_ms`).
pub fn live_record(
    id: &str,
    quic: SocketAddr,
    http: SocketAddr,
    sha: &[u8; 32],
    now_ms: u64,
) -> GatewayRecord {
    GatewayRecord {
        id: id.to_string(),
        region: id.to_string(),
        lat: 50.0,
        lon: 8.0,
        quic_address: quic.to_string(),
        http_url: format!("http://{http}"),
        cert_sha256: nearpath_protocol::tls::sha256_hex(sha),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at_ms: now_ms,
        heartbeat_at_ms: now_ms,
        expires_at_ms: now_ms + 24 * 3_600_000,
    }
}
