//! `bench trunk-ttft`: the TTFT a cross-gateway hop adds. Federated gateways on loopback in
//! this process, sharing one SQLite store and one in-memory directory, and one simulator node
//! attached to gateway B. The same streamed request goes in turn to B (one gateway: client ->
//! B -> node) and, per `--route`, to A (client -> A -> trunk `nearpath-peer/1` -> B -> node)
//! and to A' (`inference_route = "redirect"`: client -> A', `307` -> client -> B -> node);
//! TTFT is timed at the client, and each hop's cost is its TTFT minus B's, same node, same run.
//!
//! A redirect's TTFT counts from the request to A' (what the user waits for), once with a
//! fresh connection to B per request (a client that follows a cross-origin redirect without a
//! pool) and once with a kept-alive connection to B (a client that reuses it).

use super::client::{
    chat_body, chat_request, read_stream, stream_once, Conn, StreamOutcome, TokenClock,
};
use super::fleet::{live_record, poisoned, Fleet};
use super::serve::MODEL;
use super::stats::{num, Summary};
use nearpath_config::{
    BackendConfig, CapacityConfig, CrossRoute, GatewayConfig, ModelConfig, NodeConfig,
    NodeGatewayConfig, NodeIdentity,
};
use nearpath_gateway::store::{GatewayRecord, KycStatus, NodeDirEntry, SqliteStore, Store};
use nearpath_gateway::{Gateway, Listeners};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
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
    /// Which cross-gateway routes to measure against one gateway: `trunk`, `redirect` or
    /// `both`.
    #[arg(long, value_enum, default_value_t = RouteArg::Trunk)]
    pub route: RouteArg,
}

/// `--route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RouteArg {
    Trunk,
    Redirect,
    Both,
}

/// The paths one run measures, in the order they take turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Straight to B.
    One,
    /// To A, through the trunk.
    Trunk,
    /// To A', redirected to B over a fresh connection.
    Redirect,
    /// To A', redirected to B over a kept-alive connection.
    RedirectReused,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::One => "one gateway (B)",
            Path::Trunk => "trunk (A -> B)",
            Path::Redirect => "redirect, new conn",
            Path::RedirectReused => "redirect, reused conn",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Path::One => "one_gateway",
            Path::Trunk => "trunk",
            Path::Redirect => "redirect",
            Path::RedirectReused => "redirect_reused",
        }
    }
}

const KEY: &str = "bench-trunk-key";

struct Started {
    id: String,
    quic: SocketAddr,
    http: SocketAddr,
    sha: [u8; 32],
}

async fn gateway(
    id: &str,
    route: CrossRoute,
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
    config.federation.inference_route = route;
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
    live_record(&g.id, g.quic, g.http, &g.sha, now_ms)
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
    let (store_c, fleet_c) = (store.clone(), fleet.clone());
    let start = |id: &'static str, route| {
        let (store, fleet, shutdown) = (store_c.clone(), fleet_c.clone(), shutdown.clone());
        async move { gateway(id, route, store, fleet, &shutdown).await }
    };
    let gw_b = start("gw-b", CrossRoute::Trunk).await?;
    let gw_a = start("gw-a", CrossRoute::Trunk).await?;
    let gw_r = start("gw-a-redirect", CrossRoute::Redirect).await?;
    let now_ms = nearpath_gateway::clock::system_unix_ms();
    *fleet.gateways.lock().map_err(poisoned)? = vec![
        record(&gw_a, now_ms),
        record(&gw_b, now_ms),
        record(&gw_r, now_ms),
    ];

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

    let paths: Vec<Path> = match a.route {
        RouteArg::Trunk => vec![Path::One, Path::Trunk],
        RouteArg::Redirect => vec![Path::One, Path::Redirect, Path::RedirectReused],
        RouteArg::Both => vec![Path::One, Path::Trunk, Path::Redirect, Path::RedirectReused],
    };
    let mut clients = Vec::new();
    for p in &paths {
        clients.push(Client::new(*p, gw_a.http, gw_b.http, gw_r.http).await?);
    }
    // Until the A gateways have read the directory, their requests find no node: retry
    // (bounded) first.
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in clients.iter_mut().filter(|c| c.path != Path::One) {
        loop {
            let out = c.once(a.tokens).await?;
            if out.complete(a.tokens) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} never served (status {})",
                c.path.name(),
                out.status
            );
            c.reconnect().await?;
        }
    }
    let mut ttft: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut failures = 0u32;
    let n = paths.len() as u32;
    for i in 0..n * (a.warmup + a.requests) {
        let k = (i % n) as usize;
        let out = clients[k].once(a.tokens).await?;
        if !out.complete(a.tokens) {
            failures += 1;
            clients[k].reconnect().await?;
            continue;
        }
        if i >= n * a.warmup {
            if let Some(t) = out.ttft {
                ttft[k].push(t.as_secs_f64() * 1000.0);
            }
        }
    }
    shutdown.cancel();
    let _ = node_task.await;

    let sums: Vec<Summary> = ttft.iter_mut().map(Summary::of).collect();
    println!(
        "TTFT (ms), {} requests per path, interleaved, sim ttft {} ms",
        a.requests, a.ttft_ms
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "path", "p5", "p50", "p95", "p99", "max"
    );
    for (p, s) in paths.iter().zip(&sums) {
        println!(
            "{:<22} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            p.name(),
            s.p5,
            s.p50,
            s.p95,
            s.p99,
            s.max
        );
    }
    let one = sums[0];
    let mut summary = json!({
        "bench": "trunk-ttft",
        "route": format!("{:?}", a.route).to_lowercase(),
        "requests_per_path": a.requests,
        "one_gateway_ttft_ms": one.to_json(),
        "failures": failures,
    });
    for (p, s) in paths.iter().zip(&sums).skip(1) {
        println!(
            "added by {}: p50 {:+.2} ms, p95 {:+.2} ms",
            p.name(),
            s.p50 - one.p50,
            s.p95 - one.p95
        );
        summary[format!("{}_ttft_ms", p.key())] = s.to_json();
        // The trunk's keep the names they had before redirects were measured.
        let prefix = match p {
            Path::Trunk => String::new(),
            p => format!("{}_", p.key()),
        };
        summary[format!("{prefix}added_p50_ms")] = num(s.p50 - one.p50);
        summary[format!("{prefix}added_p95_ms")] = num(s.p95 - one.p95);
    }
    println!("failures {failures}");
    println!("{summary}");
    Ok(())
}

/// One path's client: its connections, and how it sends a request.
struct Client {
    path: Path,
    /// The gateway the request goes to first.
    first: SocketAddr,
    conn: Conn,
    /// B, for redirects: its address and, when reused, the kept-alive connection to it.
    b: SocketAddr,
    to_b: Option<Conn>,
}

impl Client {
    async fn new(
        path: Path,
        a: SocketAddr,
        b: SocketAddr,
        r: SocketAddr,
    ) -> anyhow::Result<Client> {
        let first = match path {
            Path::One => b,
            Path::Trunk => a,
            Path::Redirect | Path::RedirectReused => r,
        };
        let to_b = match path {
            Path::RedirectReused => Some(Conn::h1(b).await?),
            _ => None,
        };
        Ok(Client {
            path,
            first,
            conn: Conn::h1(first).await?,
            b,
            to_b,
        })
    }

    async fn reconnect(&mut self) -> anyhow::Result<()> {
        self.conn = Conn::h1(self.first).await?;
        if self.to_b.is_some() {
            self.to_b = Some(Conn::h1(self.b).await?);
        }
        Ok(())
    }

    /// One streamed request, timed from when it is first sent.
    async fn once(&mut self, tokens: u32) -> anyhow::Result<StreamOutcome> {
        let req = chat_request(self.first, Some(KEY), chat_body(true, tokens));
        if matches!(self.path, Path::One | Path::Trunk) {
            return stream_once(&mut self.conn, req, false, || {}).await;
        }
        let clock = TokenClock::start(false);
        let resp = self.conn.send(req).await?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // The 307's body is read so that the connection to A' can carry the next request.
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        let Some(location) = location.filter(|_| status == 307) else {
            return Ok(StreamOutcome {
                status,
                ..Default::default()
            });
        };
        let uri: hyper::Uri = location.parse()?;
        let pq = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        // As a browser or `httpx` follows a cross-origin 307: same method and body, no
        // `Authorization` (the ticket in the URL stands in for it).
        let follow = hyper::Request::builder()
            .method("POST")
            .uri(pq)
            .header("host", self.b.to_string())
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(chat_body(true, tokens)))?;
        let mut fresh;
        let conn = match self.to_b.as_mut() {
            Some(c) => c,
            None => {
                fresh = Conn::h1(self.b).await?;
                &mut fresh
            }
        };
        let resp = conn.send(follow).await?;
        read_stream(clock, self.b, resp, || {}).await
    }
}
