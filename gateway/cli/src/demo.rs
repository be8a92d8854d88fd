//! `gateway demo`: a gateway with one in-process edge node, the embedded GeoIP database, the
//! built-in inference simulator, a temporary store and fixed development credentials (API key
//! `demo`, admin token `demo-admin`), like other servers' dev modes.

use anyhow::Context;
use nearpath_config::{
    BackendConfig, CapacityConfig, GameEntry, GameSource, GatewayConfig, ModelConfig, NodeConfig,
    NodeGatewayConfig, NodeIdentity,
};
use nearpath_edge_node::{EdgeNode, NodeOptions, NodeStatus};
use nearpath_gateway::server::{BoundAddrs, Gateway, Listeners};
use nearpath_gateway::store::{KycStatus, SqliteStore, Store};
use nearpath_protocol::tls::ServerVerify;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub const DEMO_API_KEY: &str = "demo";
pub const DEMO_ADMIN_TOKEN: &str = "demo-admin";
pub const DEMO_MODEL: &str = "nearpath-sim";
pub const DEMO_NODE_ID: &str = "demo-node-1";
pub const DEMO_OPERATOR: &str = "demo-operator";
pub const DEMO_GAME: &str = "arena";
/// Simulator streams the demo node serves at once (beyond them, requests queue at the gateway).
pub const DEMO_CONCURRENT_STREAMS: u32 = 1_024;

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub quic_listen: SocketAddr,
    pub store: Option<PathBuf>,
}

/// A running demo (also used by end-to-end tests).
pub struct Demo {
    pub addrs: BoundAddrs,
    pub cert_sha256: String,
    pub node_status: tokio::sync::watch::Receiver<NodeStatus>,
    pub gateway: tokio::task::JoinHandle<()>,
    pub node: tokio::task::JoinHandle<Result<(), nearpath_edge_node::NodeError>>,
    node_shutdown: CancellationToken,
    gateway_shutdown: CancellationToken,
    _tempdir: Option<tempfile::TempDir>,
}

impl Demo {
    /// Starts the demo on the given listeners.
    pub async fn start(listeners: Listeners, store: Option<PathBuf>) -> anyhow::Result<Demo> {
        let (tempdir, store_path) = match store {
            Some(p) => (None, p),
            None => {
                let d = tempfile::tempdir().context("creating a temporary directory")?;
                let p = d.path().join("nearpath-demo.db");
                (Some(d), p)
            }
        };
        let mut config = GatewayConfig::demo();
        config.store.path = store_path.clone();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&store_path)
                .with_context(|| format!("opening {}", store_path.display()))?,
        );
        let operator = match store
            .list_operators()?
            .into_iter()
            .find(|o| o.name == DEMO_OPERATOR)
        {
            Some(o) => o,
            None => store.create_operator(DEMO_OPERATOR, KycStatus::Verified)?,
        };
        let (_tok, secret) = store.create_enrolment_token(&operator.id)?;
        // The demo takes at least DEMO_CONCURRENT_STREAMS streams at once from its one key and
        // one host (a load test on localhost stands for many clients): neither the key's rate
        // limits and stream cap nor the per-address connection cap may be what stops it.
        config.http.max_connections_per_ip = config
            .http
            .max_connections_per_ip
            .max(2 * DEMO_CONCURRENT_STREAMS);
        let demo_key = store.insert_api_key_secret(
            DEMO_API_KEY,
            "demo-tenant",
            config
                .inference
                .default_requests_per_minute
                .max(60 * DEMO_CONCURRENT_STREAMS),
            config
                .inference
                .default_tokens_per_minute
                .max(10_000 * DEMO_CONCURRENT_STREAMS),
        )?;
        store.update_api_key(
            &demo_key.id,
            nearpath_gateway::store::ApiKeyUpdate {
                max_concurrent_streams: Some(Some(2 * DEMO_CONCURRENT_STREAMS)),
                ..Default::default()
            },
        )?;
        let cert = nearpath_gateway::tls::self_signed(&["localhost", "127.0.0.1", "::1"])?;
        let sha = cert.sha256;
        let cert_sha256 = cert.sha256_hex();
        let gateway = Gateway::with_parts(config, cert, store)?
            .prefill_play_key(Some(DEMO_API_KEY.to_string()));
        let gateway_shutdown = CancellationToken::new();
        let (addrs, gw_task) = gateway.start(listeners, gateway_shutdown.clone())?;

        let node_cfg = demo_node_config(dialable(addrs.quic), &cert_sha256, secret);
        let node = EdgeNode::new(
            node_cfg,
            NodeOptions {
                use_nvml: false,
                verify: Some(ServerVerify::PinnedSha256(sha)),
                bind: None,
            },
        )?;
        let node_status = node.status();
        let node_shutdown = CancellationToken::new();
        let node_task = tokio::spawn(node.run(node_shutdown.clone()));
        Ok(Demo {
            addrs,
            cert_sha256,
            node_status,
            gateway: gw_task,
            node: node_task,
            node_shutdown,
            gateway_shutdown,
            _tempdir: tempdir,
        })
    }

    /// Waits until the demo node is registered (or fails).
    pub async fn node_registered(&mut self) -> anyhow::Result<()> {
        loop {
            match &*self.node_status.borrow_and_update() {
                NodeStatus::Registered { .. } => return Ok(()),
                NodeStatus::Rejected { code, reason } => {
                    anyhow::bail!("demo node rejected ({code}): {reason}")
                }
                NodeStatus::Stopped => anyhow::bail!("demo node stopped"),
                _ => {}
            }
            self.node_status
                .changed()
                .await
                .context("demo node task ended")?;
        }
    }

    /// Drains the node, then stops the gateway.
    pub async fn stop(self) {
        self.node_shutdown.cancel();
        let _ = self.node.await;
        self.gateway_shutdown.cancel();
        let _ = self.gateway.await;
    }
}

/// Where the in-process node dials a listener: a listener on the unspecified address (`0.0.0.0`
/// or `::`, as in a container) is not an address a peer can connect to, so the node dials
/// loopback on the same port.
fn dialable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, listen.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listen.port()))
        }
        _ => listen,
    }
}

fn demo_node_config(quic: SocketAddr, sha: &str, token: String) -> NodeConfig {
    NodeConfig {
        node: NodeIdentity {
            id: DEMO_NODE_ID.into(),
            enrolment_token: Some(token),
        },
        gateway: NodeGatewayConfig::pinned(quic.to_string(), sha),
        drain: Default::default(),
        gpus: vec![],
        gpu_classes: nearpath_config::default_gpu_class_table(),
        capacity: CapacityConfig {
            game_sessions: 2,
            inference_concurrency: DEMO_CONCURRENT_STREAMS,
        },
        models: vec![ModelConfig {
            name: DEMO_MODEL.into(),
            max_concurrency: DEMO_CONCURRENT_STREAMS,
            backend: BackendConfig::Sim {
                ttft_ms: 40,
                tokens_per_s: 40.0,
                seed: 0,
            },
            responses: Default::default(),
            capabilities: None,
            weights_bytes: None,
            params_b: None,
            dtype: None,
        }],
        games: vec![GameEntry {
            title: DEMO_GAME.into(),
            source: GameSource::Builtin {},
        }],
        encoder: Default::default(),
        media: Default::default(),
        audio: Default::default(),
        quic: Default::default(),
        log: Default::default(),
    }
}

/// `gateway demo`.
pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    nearpath_gateway::init_tracing(&nearpath_config::LogConfig::default());
    let listeners = Listeners::bind(opts.listen, opts.admin_listen, opts.quic_listen).await?;
    let mut demo = Demo::start(listeners, opts.store).await?;
    demo.node_registered().await?;
    let a = demo.addrs;
    println!(
        "\nNearpath demo is running (development credentials; do not expose these ports)\n\
         \n  play in a browser  http://{http}/play\
         \n  OpenAI API     http://{http}/v1          API key: {key}\
         \n  admin API      http://{admin}/admin      admin token: {admin_tok}\
         \n  metrics        http://{admin}/metrics\
         \n  QUIC (UDP)     {quic}  certificate sha256 {sha}\
         \n  edge node      {node} (in-process: built-in game \"{game}\", built-in inference simulator model \"{model}\")\
         \n  GeoIP          embedded NRO country database; 127.0.0.1 and ::1 are mapped to US\
         \n\nTry:\n  curl -N http://{http}/v1/chat/completions -H 'Authorization: Bearer {key}' \\\n    -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"{model}\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\
         \n  nearpath play --gateway {quic} --pin {sha} --game {game} --seconds 5 --out /tmp/arena.h264\
         \n  curl -s http://{admin}/admin/nodes -H 'Authorization: Bearer {admin_tok}'\n\nCtrl-C stops it (the node drains first).\n",
        http = a.http,
        admin = a.admin,
        quic = a.quic,
        sha = demo.cert_sha256,
        key = DEMO_API_KEY,
        admin_tok = DEMO_ADMIN_TOKEN,
        node = DEMO_NODE_ID,
        model = DEMO_MODEL,
        game = DEMO_GAME,
    );
    shutdown.cancelled().await;
    demo.stop().await;
    Ok(())
}
