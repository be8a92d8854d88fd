//! The system under test, run in child processes of the harness (hidden subcommands): a gateway,
//! and a process with edge nodes and/or the simulator behind its OpenAI HTTP server (the
//! "straight to the node's backend" baseline). Each prints one JSON line with its addresses on
//! stdout once it is ready and stops when its stdin closes, so it never outlives the harness.

use anyhow::{bail, Context};
use nearpath_config::{
    BackendConfig, CapacityConfig, GatewayConfig, GeoOverride, ModelConfig, NodeConfig,
    NodeGatewayConfig, NodeIdentity,
};
use nearpath_edge_node::inference::{serve_openai, ModelRegistry};
use nearpath_edge_node::{EdgeNode, NodeOptions, NodeStatus};
use nearpath_gateway::store::{KycStatus, SqliteStore, Store};
use nearpath_gateway::{Gateway, Listeners};
use nearpath_protocol::tls::{parse_sha256_hex, ServerVerify};
use serde_json::json;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The model name both paths serve.
pub const MODEL: &str = "m";
pub const API_KEY: &str = "bench-api-key";
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

/// Where every loopback peer is placed: one city, so routing is by load alone.
fn loopback_is_new_york() -> GeoOverride {
    GeoOverride {
        cidr: "127.0.0.0/8".parse().expect("literal CIDR"),
        country: "US".into(),
        subdivision: None,
        lat: Some(40.71),
        lon: Some(-74.0),
    }
}

/// The gateway configuration of every benchmark.
pub fn gateway_config(store: PathBuf, heartbeat_ms: u64, missed_heartbeats: u32) -> GatewayConfig {
    let mut c = GatewayConfig::default();
    // Probe sessions would take node slots mid-measurement (`bench checker` measures them).
    c.checker.enabled = false;
    c.admin.token = Some(ADMIN_TOKEN.into());
    c.store.path = store;
    c.nodes.heartbeat_ms = heartbeat_ms;
    c.nodes.missed_heartbeats_before_gone = missed_heartbeats;
    c.geo.reload_check_interval_s = 0;
    c.geo.overrides = vec![loopback_is_new_york()];
    // Every simulated player and node connects from 127.0.0.1, standing for many hosts: the
    // per-source caps (meant for one host) would refuse the load itself.
    c.quic.max_unauthenticated_per_ip = 1_000_000;
    c.quic.handshake_rate_per_ip_per_s = 1_000_000;
    c.quic.handshake_burst_per_ip = 1_000_000;
    c.http.max_connections = 1_000_000;
    c.http.max_connections_per_ip = 1_000_000;
    c
}

/// Simulator timing shared by both paths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sim {
    pub ttft_ms: u64,
    pub tokens_per_s: f64,
}

pub fn model_config(sim: Sim, capacity: u32) -> ModelConfig {
    ModelConfig {
        name: MODEL.into(),
        max_concurrency: capacity,
        backend: BackendConfig::Sim {
            ttft_ms: sim.ttft_ms,
            tokens_per_s: sim.tokens_per_s,
            seed: 1,
        },
        responses: Default::default(),
        capabilities: None,
        weights_bytes: None,
        params_b: None,
        dtype: None,
    }
}

pub fn node_config(
    id: &str,
    quic: SocketAddr,
    sha_hex: &str,
    token: &str,
    sim: Sim,
    capacity: u32,
) -> NodeConfig {
    NodeConfig {
        node: NodeIdentity {
            id: id.into(),
            enrolment_token: Some(token.into()),
        },
        gateway: NodeGatewayConfig::pinned(quic.to_string(), sha_hex),
        drain: Default::default(),
        gpus: vec![],
        gpu_classes: nearpath_config::default_gpu_class_table(),
        capacity: CapacityConfig {
            game_sessions: 0,
            inference_concurrency: capacity,
        },
        models: vec![model_config(sim, capacity)],
        games: vec![],
        encoder: Default::default(),
        media: Default::default(),
        audio: Default::default(),
        quic: Default::default(),
        log: Default::default(),
    }
}

/// Serves the harness's commands on stdin, one per line, each answered with one JSON line:
/// `heap` (allocator figures) and `trim` (return free heap to the system, then `heap`).
/// Cancels `stop` when stdin reaches end of file (the harness closed it or died).
fn serve_stdin(stop: CancellationToken) {
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match line.trim() {
                "heap" => announce(heap_json()),
                "trim" => {
                    super::os::trim_heap();
                    announce(heap_json());
                }
                other => announce(json!({"error": format!("unknown command {other:?}")})),
            }
        }
        stop.cancel();
    });
}

fn heap_json() -> serde_json::Value {
    let h = super::os::heap_stats();
    let m = super::os::mem_status(std::process::id()).unwrap_or_default();
    json!({"heap_in_use": h.in_use, "heap_free_held": h.free_held, "heap_mmapped": h.mmapped,
           "rss_kib": m.rss_kib, "threads": m.threads})
}

fn announce(v: serde_json::Value) {
    // One line, flushed: the harness blocks on it.
    println!("{v}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

pub struct GatewayArgs {
    pub store_dir: Option<PathBuf>,
    pub heartbeat_ms: u64,
    pub missed_heartbeats: u32,
    /// `game.frame_budget_ms`, when not the default.
    pub frame_budget_ms: Option<u64>,
    /// `quic.recv_buffer_bytes`, when not the default.
    pub recv_buffer_bytes: Option<usize>,
    /// `http.header_read_timeout_ms`, when not the default.
    pub header_read_timeout_ms: Option<u64>,
    /// The open-file limit (soft, hard) this process runs with, for the report.
    pub nofile: (u64, u64),
}

/// `bench serve-gateway`: a gateway with a verified operator, its enrolment token and an API
/// key without practical rate limits.
pub async fn serve_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let dir = match &args.store_dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("creating the store directory")?;
    let path = dir.path().join("gateway.db");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))?);
    let operator = store.create_operator("bench-operator", KycStatus::Verified)?;
    let (_, token) = store.create_enrolment_token(&operator.id)?;
    let key = store.insert_api_key_secret(API_KEY, "bench-tenant", 1_000_000_000, 4_000_000_000)?;
    // The benchmarks load the gateway through this one key: its per-key caps must not be what
    // they measure.
    store.update_api_key(
        &key.id,
        nearpath_gateway::store::ApiKeyUpdate {
            max_concurrent_streams: Some(Some(u32::MAX)),
            max_concurrent_sessions: Some(Some(u32::MAX)),
            session_starts_per_minute: Some(Some(u32::MAX)),
            ..Default::default()
        },
    )?;
    let cert = nearpath_gateway::tls::self_signed(&["localhost", "127.0.0.1"])?;
    let sha = nearpath_protocol::tls::sha256_hex(&cert.sha256);
    let mut config = gateway_config(path.clone(), args.heartbeat_ms, args.missed_heartbeats);
    if let Some(ms) = args.frame_budget_ms {
        config.game.frame_budget_ms = ms;
    }
    if let Some(bytes) = args.recv_buffer_bytes {
        config.quic.recv_buffer_bytes = bytes;
    }
    if let Some(ms) = args.header_read_timeout_ms {
        config.http.header_read_timeout_ms = ms;
    }
    let gw = Gateway::with_parts(config, cert, store)?;
    let shutdown = CancellationToken::new();
    let (addrs, task) = gw.start(Listeners::ephemeral().await?, shutdown.clone())?;
    let stop = CancellationToken::new();
    serve_stdin(stop.clone());
    announce(json!({
        "pid": std::process::id(), "http": addrs.http.to_string(), "admin": addrs.admin.to_string(),
        "quic": addrs.quic.to_string(), "sha256": sha, "token": token, "api_key": API_KEY,
        "admin_token": ADMIN_TOKEN, "store": path.display().to_string(), "nofile": [args.nofile.0, args.nofile.1],
    }));
    stop.cancelled().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    drop(dir);
    Ok(())
}

pub struct NodesArgs {
    pub gateway_quic: Option<SocketAddr>,
    pub sha256: Option<String>,
    pub token: Option<String>,
    pub nodes: u32,
    pub id_prefix: String,
    pub capacity: u32,
    pub sim: Sim,
    pub backend_listen: Option<SocketAddr>,
    /// An OpenAI-compatible server (`http://host:port/v1`) the nodes' model relays to instead
    /// of the simulator, and the model name it knows (`bench real-ttft`).
    pub upstream: Option<(String, String)>,
    pub nofile: (u64, u64),
}

/// `bench serve-nodes`: `nodes` edge nodes (simulator model, `capacity` concurrent requests each)
/// and, with `backend_listen`, the same simulator behind `serve_openai` for the direct path.
pub async fn serve_nodes(args: NodesArgs) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    serve_stdin(stop.clone());
    let backend = match args.backend_listen {
        Some(addr) => {
            let registry = ModelRegistry::from_config(
                &[model_config(args.sim, args.capacity)],
                Some(args.capacity as usize),
            )?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let bound = listener.local_addr()?;
            Some((
                bound,
                tokio::spawn(serve_openai(listener, Arc::new(registry), stop.clone())),
            ))
        }
        None => None,
    };
    let mut nodes = Vec::new();
    if args.nodes > 0 {
        let (Some(quic), Some(sha), Some(token)) = (args.gateway_quic, &args.sha256, &args.token)
        else {
            bail!("--gateway-quic, --sha256 and --token are required with --nodes > 0");
        };
        let pin = parse_sha256_hex(sha)?;
        for i in 0..args.nodes {
            let id = format!("{}-{i}", args.id_prefix);
            let mut config = node_config(&id, quic, sha, token, args.sim, args.capacity);
            if let Some((base_url, model)) = &args.upstream {
                config.models[0].backend = BackendConfig::Upstream {
                    base_url: base_url.clone(),
                    api_key: None,
                    upstream_model: Some(model.clone()),
                    timeout_ms: 60_000,
                };
            }
            let node = EdgeNode::new(
                config,
                NodeOptions {
                    use_nvml: false,
                    verify: Some(ServerVerify::PinnedSha256(pin)),
                    bind: Some("127.0.0.1:0".parse().expect("literal address")),
                },
            )?;
            let status = node.status();
            let node_stop = CancellationToken::new();
            let task = tokio::spawn(node.run(node_stop.clone()));
            nodes.push((id, status, node_stop, task));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for (id, status, _, _) in &mut nodes {
            loop {
                match &*status.borrow_and_update() {
                    NodeStatus::Registered { .. } => break,
                    NodeStatus::Rejected { code, reason } => {
                        bail!("node {id} rejected ({code}): {reason}")
                    }
                    NodeStatus::Stopped => bail!("node {id} stopped before registering"),
                    _ => {}
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, status.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => bail!("node {id}: its task ended"),
                    Err(_) => bail!("node {id} did not register within 60 s"),
                }
            }
        }
    }
    announce(json!({
        "pid": std::process::id(), "nodes": args.nodes, "nofile": [args.nofile.0, args.nofile.1],
        "backend": backend.as_ref().map(|(a, _)| a.to_string()),
    }));
    stop.cancelled().await;
    for (_, _, node_stop, _) in &nodes {
        node_stop.cancel();
    }
    for (_, _, _, task) in nodes {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    if let Some((_, task)) = backend {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(())
}
