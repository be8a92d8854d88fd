//! `bench trunk-ttft`: the TTFT a cross-gateway hop adds. Two federated gateways on loopback
//! in this process, sharing one SQLite store and one in-memory directory, and one simulator
//! node attached to gateway B. The same streamed request goes alternately to B (one gateway:
//! client -> B -> node) and to A (client -> A -> trunk `nearpath-peer/1` -> B -> node); TTFT is
//! timed at the client, and the trunk's cost is A's minus B's, same node, same run.

use super::client::{chat_body, chat_request, stream_once, Conn};
use super::serve::MODEL;
use super::stats::{num, Summary};
use nearpath_config::{
    BackendConfig, CapacityConfig, GatewayConfig, ModelConfig, NodeConfig, NodeGatewayConfig,
    NodeIdentity,
};
use nearpath_gateway::store::{
    GatewayRecord, KycStatus, NodeDirEntry, SqliteStore, Store, StoreError,
};
use nearpath_gateway::trunk::FleetSource;
use nearpath_gateway::{Gateway, Listeners};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct TrunkArgs {
    /// Measured requests per path (through the trunk, and on one gateway), interleaved.
    #[arg(long, default_value_t = 300)]
    pub requests: u32,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 8)]
    pub tokens: u32,
    /// Simulator time to first token.
    #[arg(long, default_value_t = 5)]
    pub ttft_ms: u64,
    /// Simulator token rate.
    #[arg(long, default_value_t = 1000.0)]
    pub tokens_per_s: f64,
    /// Unrecorded requests per path first (connections, the trunk's dial, caches).
    #[arg(long, default_value_t = 20)]
    pub warmup: u32,
}

const KEY: &str = "bench-trunk-key";

#[derive(Default)]
struct Fleet {
    gateways: Mutex<Vec<GatewayRecord>>,
    nodes: Mutex<Vec<NodeDirEntry>>,
}

impl FleetSource for Fleet {
    fn gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        Ok(self.gateways.lock().map_err(poisoned)?.clone())
    }

    fn node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        Ok(self.nodes.lock().map_err(poisoned)?.clone())
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Unavailable {
        message: "fleet lock poisoned".into(),
    }
}

struct Started {
    id: String,
    quic: SocketAddr,
    http: SocketAddr,
    sha: [u8; 32],
}

async fn gateway(
    id: &str,
    store: Arc<dyn Store>,
    fleet: Arc<Fleet>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Started> {
    let mut config = GatewayConfig::default();
    // Probe sessions would take node slots mid-measurement (`bench checker` measures them).
    config.checker.enabled = false;
    config.admin.token = Some("bench-admin-token-0123456789".into());
    config.federation.gateway_id = Some(id.to_string());
    config.federation.node_directory_interval_ms = 50;
    let cert = nearpath_gateway::tls::self_signed(&["localhost", "127.0.0.1"])?;
    let sha = cert.sha256;
    let gw = Gateway::with_parts(config, cert, store)?.with_fleet_source(fleet);
    let (addrs, _task) = gw.start(Listeners::ephemeral().await?, shutdown.clone())?;
    Ok(Started {
        id: id.to_string(),
        quic: addrs.quic,
        http: addrs.http,
        sha,
    })
}

fn record(g: &Started, now_ms: u64) -> GatewayRecord {
    GatewayRecord {
        id: g.id.clone(),
        region: g.id.clone(),
        lat: 50.0,
        lon: 8.0,
        quic_address: g.quic.to_string(),
        http_url: format!("http://{}", g.http),
        cert_sha256: nearpath_protocol::tls::sha256_hex(&g.sha),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at_ms: now_ms,
        heartbeat_at_ms: now_ms,
        // The bench keeps both gateways live for its whole run.
        expires_at_ms: now_ms + 24 * 3_600_000,
    }
}

fn node_config(b: &Started, token: &str, a: &TrunkArgs) -> NodeConfig {
    NodeConfig {
        node: NodeIdentity {
            id: "bench-node-b".into(),
            enrolment_token: Some(token.into()),
        },
        gateway: NodeGatewayConfig::pinned(
            b.quic.to_string(),
            nearpath_protocol::tls::sha256_hex(&b.sha),
        ),
        drain: Default::default(),
        gpus: vec![],
        gpu_classes: nearpath_config::default_gpu_class_table(),
        capacity: CapacityConfig {
            game_sessions: 0,
            inference_concurrency: 8,
        },
        models: vec![ModelConfig {
            name: MODEL.into(),
            max_concurrency: 8,
            backend: BackendConfig::Sim {
                ttft_ms: a.ttft_ms,
                tokens_per_s: a.tokens_per_s,
                seed: 1,
            },
            responses: Default::default(),
            capabilities: None,
            weights_bytes: None,
            params_b: None,
            dtype: None,
        }],
        games: vec![],
        encoder: Default::default(),
        media: Default::default(),
        audio: Default::default(),
        quic: Default::default(),
        log: Default::default(),
    }
}

pub async fn run(a: TrunkArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("fleet.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path)?);
    let operator = store.create_operator("bench-operator", KycStatus::Verified)?;
    let (_, token) = store.create_enrolment_token(&operator.id)?;
    store.insert_api_key_secret(KEY, "bench", 1_000_000, 1_000_000_000)?;
    let fleet = Arc::new(Fleet::default());
    let shutdown = CancellationToken::new();
    let gw_b = gateway("gw-b", store.clone(), fleet.clone(), &shutdown).await?;
    let gw_a = gateway("gw-a", store.clone(), fleet.clone(), &shutdown).await?;
    let now_ms = nearpath_gateway::clock::system_unix_ms();
    *fleet.gateways.lock().map_err(poisoned)? = vec![record(&gw_a, now_ms), record(&gw_b, now_ms)];

    let node = nearpath_edge_node::EdgeNode::new(
        node_config(&gw_b, &token, &a),
        nearpath_edge_node::NodeOptions {
            use_nvml: false,
            verify: None,
            bind: None,
        },
    )?;
    let mut status = node.status();
    let node_task = tokio::spawn(node.run(shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(
            *status.borrow_and_update(),
            nearpath_edge_node::NodeStatus::Registered { .. }
        ) {
            if status.changed().await.is_err() {
                break;
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the node did not register with gateway B within 10 s"))?;
    *fleet.nodes.lock().map_err(poisoned)? = vec![NodeDirEntry {
        node_id: "bench-node-b".into(),
        operator_id: operator.id.clone(),
        gateway_id: gw_b.id.clone(),
        country: None,
        lat: None,
        lon: None,
        gpu_classes: vec![],
        models: vec![MODEL.into()],
        games: vec![],
        inference_slots: 8,
        inference_free: 8,
        game_slots: 0,
        game_free: 0,
        accepting: true,
        verification: "unverified".into(),
        updated_at_ms: now_ms,
        encoders: Vec::new(),
        model_caps: Vec::new(),
        subdivision: None,
    }];

    // Path 0: one gateway (B); path 1: through the trunk (A).
    let targets = [gw_b.http, gw_a.http];
    let mut conns = [Conn::h1(targets[0]).await?, Conn::h1(targets[1]).await?];
    // Until A has read the directory, its requests find no node: retry (bounded) first.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let req = chat_request(targets[1], Some(KEY), chat_body(true, a.tokens));
        let out = stream_once(&mut conns[1], req, false, || {}).await?;
        if out.complete(a.tokens) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "gateway A never served through the trunk (status {})",
            out.status
        );
        conns[1] = Conn::h1(targets[1]).await?;
    }
    let mut ttft: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut failures = 0u32;
    for i in 0..2 * (a.warmup + a.requests) {
        let path = (i % 2) as usize;
        let req = chat_request(targets[path], Some(KEY), chat_body(true, a.tokens));
        let out = stream_once(&mut conns[path], req, false, || {}).await?;
        if !out.complete(a.tokens) {
            failures += 1;
            conns[path] = Conn::h1(targets[path]).await?;
            continue;
        }
        if i >= 2 * a.warmup {
            if let Some(t) = out.ttft {
                ttft[path].push(t.as_secs_f64() * 1000.0);
            }
        }
    }
    shutdown.cancel();
    let _ = node_task.await;

    let one = Summary::of(&mut ttft[0]);
    let trunk = Summary::of(&mut ttft[1]);
    println!(
        "TTFT (ms), {} requests per path, interleaved, sim ttft {} ms",
        a.requests, a.ttft_ms
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "path", "p5", "p50", "p95", "p99", "max"
    );
    for (name, s) in [("one gateway (B)", one), ("trunk (A -> B)", trunk)] {
        println!(
            "{:<22} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name, s.p5, s.p50, s.p95, s.p99, s.max
        );
    }
    println!(
        "added by the trunk: p50 {:+.2} ms, p95 {:+.2} ms; failures {failures}",
        trunk.p50 - one.p50,
        trunk.p95 - one.p95
    );
    println!(
        "{}",
        json!({
            "bench": "trunk-ttft",
            "requests_per_path": a.requests,
            "one_gateway_ttft_ms": one.to_json(),
            "trunk_ttft_ms": trunk.to_json(),
            "added_p50_ms": num(trunk.p50 - one.p50),
            "added_p95_ms": num(trunk.p95 - one.p95),
            "failures": failures,
        })
    );
    Ok(())
}
