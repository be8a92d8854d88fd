//! Federations of in-process gateways whose directories are an in-memory fake they all read
//! (`FleetSource`), so a test decides exactly which gateways and nodes the federation holds.
//! Everything else of the gateways is real.

use super::{eventually, TestGateway};
use nearpath_gateway::store::{GatewayRecord, NodeDirEntry, StoreError};
use nearpath_gateway::trunk::FleetSource;
use nearpath_protocol::tls::sha256_hex;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The federation's directories, shared by the gateways of a test.
#[derive(Default)]
pub struct Fleet {
    pub gateways: Mutex<Vec<GatewayRecord>>,
    pub nodes: Mutex<Vec<NodeDirEntry>>,
}

/// One gateway's view of the [`Fleet`], counting its reads.
struct Reader {
    fleet: Arc<Fleet>,
    reads: Arc<AtomicU64>,
}

impl FleetSource for Reader {
    fn gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        Ok(self.fleet.gateways.lock().unwrap().clone())
    }

    fn node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.fleet.nodes.lock().unwrap().clone())
    }
}

pub fn now_ms() -> u64 {
    nearpath_gateway::clock::system_unix_ms()
}

/// What a test needs of a federated gateway that may run on another runtime.
#[derive(Clone)]
pub struct Member {
    pub id: String,
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub sha: [u8; 32],
    pub operator_id: String,
    reads: Arc<AtomicU64>,
}

impl Member {
    /// This gateway's directory entry, live until `expires_at_ms`.
    pub fn record(&self, expires_at_ms: u64) -> GatewayRecord {
        GatewayRecord {
            id: self.id.clone(),
            region: format!("region-{}", self.id),
            lat: 50.0,
            lon: 8.0,
            quic_address: self.quic.to_string(),
            http_url: format!("http://{}", self.http),
            cert_sha256: sha256_hex(&self.sha),
            version: "0.1.0".into(),
            started_at_ms: now_ms(),
            heartbeat_at_ms: now_ms(),
            expires_at_ms,
        }
    }

    /// The directory entry this gateway publishes for its node `id` in Germany, serving
    /// nothing yet (see [`Member::inference_node`], [`Member::game_node`]).
    pub fn node(&self, id: &str) -> NodeDirEntry {
        NodeDirEntry {
            node_id: id.into(),
            operator_id: self.operator_id.clone(),
            gateway_id: self.id.clone(),
            country: Some("DE".into()),
            lat: Some(super::DE.2),
            lon: Some(super::DE.3),
            gpu_classes: vec![],
            models: vec![],
            games: vec![],
            inference_slots: 0,
            inference_free: 0,
            game_slots: 0,
            game_free: 0,
            accepting: true,
            verification: "unverified".into(),
            updated_at_ms: now_ms(),
            encoders: Vec::new(),
            model_caps: Vec::new(),
            subdivision: None,
        }
    }

    /// [`Member::node`] serving model `m` with 8 free inference slots.
    pub fn inference_node(&self, id: &str) -> NodeDirEntry {
        NodeDirEntry {
            models: vec!["m".into()],
            inference_slots: 8,
            inference_free: 8,
            ..self.node(id)
        }
    }

    /// [`Member::node`] serving the game `arena` with 2 free game slots.
    pub fn game_node(&self, id: &str) -> NodeDirEntry {
        NodeDirEntry {
            games: vec!["arena".into()],
            game_slots: 2,
            game_free: 2,
            ..self.node(id)
        }
    }

    /// Waits until the gateway has read the directory twice from now, so that it applied what
    /// the directory held now (a read is applied before the next one starts).
    pub async fn read_directory(&self) {
        let from = self.reads.load(Ordering::SeqCst);
        eventually("a directory read", Duration::from_secs(10), || async {
            (self.reads.load(Ordering::SeqCst) >= from + 2).then_some(())
        })
        .await;
    }
}

/// A gateway `id` of a federation reading `fleet` (directory read every 20 ms, its lease
/// `lease_ms`, renewed every quarter of it), with `edit` applied to its configuration last.
pub async fn federated_gateway(
    path: PathBuf,
    id: &str,
    fleet: &Arc<Fleet>,
    lease_ms: u64,
    edit: impl FnOnce(&mut nearpath_config::GatewayConfig),
) -> (TestGateway, Member) {
    let reads = Arc::new(AtomicU64::new(0));
    let reader = Arc::new(Reader {
        fleet: fleet.clone(),
        reads: reads.clone(),
    });
    let gw = TestGateway::start_prepared(
        path,
        |c| {
            c.federation.gateway_id = Some(id.to_string());
            c.federation.node_directory_interval_ms = 20;
            c.federation.heartbeat_ms = lease_ms / 4;
            c.federation.lease_ms = lease_ms;
            edit(c);
        },
        |g| g.with_fleet_source(reader),
    )
    .await;
    let member = Member {
        id: id.to_string(),
        quic: gw.addrs.quic,
        http: gw.addrs.http,
        sha: gw.sha,
        operator_id: gw.operator_id.clone(),
        reads,
    };
    (gw, member)
}
