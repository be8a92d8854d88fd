//! Shared helpers for the end-to-end tests: a gateway on ephemeral loopback ports with GeoIP
//! overrides that make 127.0.0.x addresses look like different countries, real edge nodes,
//! "raw" nodes that speak the protocol by hand (to misbehave on purpose), and a small HTTP client.

#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nearpath_config::{
    BackendConfig, CapacityConfig, GatewayConfig, GeoOverride, GpuSpec, ModelConfig, NodeConfig,
    NodeGatewayConfig, NodeIdentity,
};
use nearpath_edge_node::{EdgeNode, NodeError, NodeOptions, NodeStatus};
use nearpath_gateway::store::{KycStatus, SqliteStore, Store};
use nearpath_gateway::{BoundAddrs, Gateway, Listeners};
use nearpath_protocol::message::{Capacity, Gpu, Heartbeat, Message, Register, Workloads};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::tls::{client_config, ServerVerify};
use nearpath_protocol::{ALPN_NODE, MAX_CONTROL_FRAME, PROTOCOL_VERSION};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "test-admin-token-0123456789";
pub const API_KEY: &str = "test-api-key";

/// Places the tests use, as (loopback address, country, lat, lon).
pub const CN: (&str, &str, f64, f64) = ("127.0.0.2", "CN", 39.9, 116.4);
pub const DE: (&str, &str, f64, f64) = ("127.0.0.3", "DE", 52.52, 13.40);
pub const US_EAST: (&str, &str, f64, f64) = ("127.0.0.4", "US", 40.71, -74.0);
pub const JP: (&str, &str, f64, f64) = ("127.0.0.5", "JP", 35.68, 139.69);
pub const FR_CLIENT: (&str, &str, f64, f64) = ("127.0.0.10", "FR", 48.85, 2.35);
pub const US_WEST_CLIENT: (&str, &str, f64, f64) = ("127.0.0.11", "US", 37.77, -122.42);
pub const KR_CLIENT: (&str, &str, f64, f64) = ("127.0.0.12", "KR", 37.56, 126.97);
pub const CN_CLIENT: (&str, &str, f64, f64) = ("127.0.0.13", "CN", 31.23, 121.47);
pub const KP_CLIENT: (&str, &str, f64, f64) = ("127.0.0.14", "KP", 39.03, 125.75);

pub fn place(p: (&str, &str, f64, f64)) -> GeoOverride {
    GeoOverride {
        cidr: format!("{}/32", p.0).parse().unwrap(),
        country: p.1.into(),
        subdivision: None,
        lat: Some(p.2),
        lon: Some(p.3),
    }
}

pub fn ip(p: (&str, &str, f64, f64)) -> IpAddr {
    p.0.parse().unwrap()
}

/// The gateway config the tests start from: fast heartbeats, every test place mapped.
pub fn test_config(store: PathBuf) -> GatewayConfig {
    let mut c = GatewayConfig::default();
    c.admin.token = Some(ADMIN.into());
    c.store.path = store;
    c.nodes.heartbeat_ms = 100;
    c.geo.reload_check_interval_s = 0;
    c.geo.overrides = [
        CN,
        DE,
        US_EAST,
        JP,
        FR_CLIENT,
        US_WEST_CLIENT,
        KR_CLIENT,
        CN_CLIENT,
        KP_CLIENT,
    ]
    .into_iter()
    .map(place)
    .collect();
    c.http.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    c
}

pub struct TestGateway {
    pub addrs: BoundAddrs,
    pub sha: [u8; 32],
    pub shared: Arc<nearpath_gateway::Shared>,
    pub store: Arc<dyn Store>,
    pub store_path: PathBuf,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub http: Http,
    pub operator_id: String,
    pub token: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestGateway {
    /// A gateway with a verified operator (and its enrolment token) and an API key.
    pub async fn start(edit: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.db");
        let mut g = Self::start_at(path, edit).await;
        g._dir = Some(dir);
        g
    }

    pub async fn start_at(path: PathBuf, edit: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        let mut config = test_config(path.clone());
        edit(&mut config);
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let operator = match store
            .list_operators()
            .unwrap()
            .into_iter()
            .find(|o| o.name == "op-verified")
        {
            Some(o) => o,
            None => store
                .create_operator("op-verified", KycStatus::Verified)
                .unwrap(),
        };
        let (_, token) = store.create_enrolment_token(&operator.id).unwrap();
        store
            .insert_api_key_secret(API_KEY, "tenant-a", 100_000, 100_000_000)
            .unwrap();
        let cert = nearpath_gateway::tls::self_signed(&["localhost", "127.0.0.1"]).unwrap();
        let sha = cert.sha256;
        let gw = Gateway::with_parts(config, cert, store.clone()).unwrap();
        let shared = gw.shared().clone();
        let shutdown = CancellationToken::new();
        let (addrs, task) = gw
            .start(Listeners::ephemeral().await.unwrap(), shutdown.clone())
            .unwrap();
        TestGateway {
            http: Http::new(),
            addrs,
            sha,
            shared,
            store,
            store_path: path,
            shutdown,
            task,
            operator_id: operator.id,
            token,
            _dir: None,
        }
    }

    pub async fn stop(self) -> Option<tempfile::TempDir> {
        self.shutdown.cancel();
        let _ = self.task.await;
        self._dir
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addrs.admin, path)
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addrs.http, path)
    }

    pub async fn admin_get(&self, path: &str) -> Value {
        let (status, body) = self.http.get(&self.admin_url(path), Some(ADMIN)).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, text) = self
            .http
            .post(&self.admin_url(path), Some(ADMIN), &body.to_string(), &[])
            .await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Ids of the nodes the admin API lists.
    pub async fn node_ids(&self) -> Vec<String> {
        let v = self.admin_get("/admin/nodes").await;
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Polls (bounded) until `pred` holds for the admin node list.
    pub async fn wait_nodes(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[String]) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let ids = self.node_ids().await;
            if pred(&ids) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; nodes: {ids:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn node_config(&self, id: &str, token: &str) -> NodeConfig {
        NodeConfig {
            node: NodeIdentity {
                id: id.into(),
                enrolment_token: Some(token.into()),
            },
            gateway: NodeGatewayConfig::pinned(
                self.addrs.quic.to_string(),
                nearpath_protocol::tls::sha256_hex(&self.sha),
            ),
            drain: Default::default(),
            gpus: vec![],
            gpu_classes: nearpath_config::default_gpu_class_table(),
            capacity: CapacityConfig {
                game_sessions: 1,
                inference_concurrency: 8,
            },
            models: vec![ModelConfig {
                name: "m".into(),
                max_concurrency: 8,
                backend: BackendConfig::Sim {
                    ttft_ms: 0,
                    tokens_per_s: 0.0,
                    seed: 1,
                },
            }],
            games: vec![],
            encoder: Default::default(),
            media: Default::default(),
            quic: Default::default(),
            log: Default::default(),
        }
    }
}

pub fn gpu(model: &str) -> GpuSpec {
    GpuSpec {
        model: model.into(),
        vram_mib: 80_000,
        class: None,
    }
}

/// A real edge node running in this process.
pub struct TestNode {
    pub status: tokio::sync::watch::Receiver<NodeStatus>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), NodeError>>,
}

impl TestNode {
    pub fn start(config: NodeConfig, from: IpAddr) -> TestNode {
        let node = EdgeNode::new(
            config,
            NodeOptions {
                use_nvml: false,
                verify: None,
                bind: Some(SocketAddr::new(from, 0)),
            },
        )
        .unwrap();
        let status = node.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(node.run(shutdown.clone()));
        TestNode {
            status,
            shutdown,
            task,
        }
    }

    /// Waits for a status matching `pred` (bounded).
    pub async fn wait_status(&mut self, pred: impl Fn(&NodeStatus) -> bool) -> NodeStatus {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let s = self.status.borrow_and_update().clone();
                if pred(&s) {
                    return s;
                }
                self.status.changed().await.expect("node task ended");
            }
        })
        .await
        .expect("timed out waiting for a node status")
    }

    pub async fn registered(&mut self) {
        self.wait_status(|s| matches!(s, NodeStatus::Registered { .. }))
            .await;
    }

    pub async fn stop(self) -> Result<(), NodeError> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }
}

/// A node that speaks the control protocol by hand, so tests can make it misbehave.
pub struct RawNode {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: FramedRecv,
    pub first: Message,
    seq: u64,
}

impl RawNode {
    /// Dials the gateway's QUIC listener from `from` as a node, sends `reg` on the control
    /// stream and reads the answer into `first`. Every `connect_*` variant builds its own
    /// `Register` and ends here.
    pub async fn register(gw: &TestGateway, from: IpAddr, reg: Register) -> RawNode {
        let cfg = client_config(ServerVerify::PinnedSha256(gw.sha), &[ALPN_NODE]).unwrap();
        let (endpoint, _) =
            nearpath_protocol::net::client_endpoint(SocketAddr::new(from, 0), cfg, 1 << 20)
                .unwrap();
        let conn = endpoint
            .connect(gw.addrs.quic, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send_half, recv) = conn.open_bi().await.unwrap();
        send(&mut send_half, &Message::Register(reg)).await.unwrap();
        let mut recv = FramedRecv::new(recv, MAX_CONTROL_FRAME);
        let first = recv.next().await.unwrap().unwrap();
        RawNode {
            endpoint,
            conn,
            send: send_half,
            recv,
            first,
            seq: 0,
        }
    }

    pub async fn connect(gw: &TestGateway, id: &str, from: IpAddr, class: &str) -> RawNode {
        Self::connect_serving(gw, id, from, class, &["m"]).await
    }

    pub async fn connect_serving(
        gw: &TestGateway,
        id: &str,
        from: IpAddr,
        class: &str,
        models: &[&str],
    ) -> RawNode {
        let workloads = Workloads {
            games: vec![],
            models: models.iter().map(|m| m.to_string()).collect(),
        };
        Self::register(gw, from, Self::registration(gw, id, class, workloads, 1)).await
    }

    /// The `Register` a raw node sends: one GPU of `class`, the enrolment token of `gw`.
    fn registration(
        gw: &TestGateway,
        id: &str,
        class: &str,
        workloads: Workloads,
        game_sessions: u32,
    ) -> Register {
        Register {
            protocol_version: PROTOCOL_VERSION,
            node_id: id.into(),
            enrolment_token: gw.token.clone(),
            software_version: "0.1.0".into(),
            gpus: vec![Gpu {
                model: class.into(),
                class: class.into(),
                vram_mib: 1,
            }],
            workloads,
            capacity: Capacity {
                game_sessions,
                inference_concurrency: 4,
            },
        }
    }

    pub async fn heartbeat(&mut self, active_sessions: u32) {
        self.seq += 1;
        let hb = Heartbeat {
            seq: self.seq,
            active_sessions,
            queue_depth: 0,
            load: 0.1,
            gpu_util: None,
            encoder_ms_p50: None,
        };
        send(&mut self.send, &Message::Heartbeat(hb)).await.unwrap();
        // The ack proves the gateway processed it.
        loop {
            match self.recv.next().await.unwrap().unwrap() {
                Message::HeartbeatAck(a) if a.seq == self.seq => return,
                _ => continue,
            }
        }
    }
}

/// A minimal HTTP client for the tests.
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A client whose connections come from `local` (e.g. 127.0.0.20, an untrusted peer).
    pub fn from(local: IpAddr) -> Http {
        let mut c = HttpConnector::new();
        c.set_local_address(Some(local));
        Http {
            client: Client::builder(TokioExecutor::new()).build(c),
        }
    }

    pub async fn request(
        &self,
        method: &str,
        url: &str,
        bearer: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, hyper::HeaderMap, String) {
        let mut b = hyper::Request::builder().method(method).uri(url);
        if let Some(t) = bearer {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn get(&self, url: &str, bearer: Option<&str>) -> (u16, String) {
        let (s, _, b) = self.request("GET", url, bearer, None, &[]).await;
        (s, b)
    }

    pub async fn post(
        &self,
        url: &str,
        bearer: Option<&str>,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let (s, _, b) = self.request("POST", url, bearer, Some(body), headers).await;
        (s, b)
    }

    /// Starts a request and returns the response with its body still streaming.
    pub async fn stream(
        &self,
        url: &str,
        bearer: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> hyper::Response<hyper::body::Incoming> {
        let mut b = hyper::Request::builder()
            .method("POST")
            .uri(url)
            .header("authorization", format!("Bearer {bearer}"))
            .header("content-type", "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        self.client.request(req).await.unwrap()
    }
}

/// Reads the metric value of a line starting with `prefix` from a Prometheus text page.
pub fn metric(page: &str, prefix: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

impl TestGateway {
    /// GET on the admin listener with the admin token, as text (e.g. `/metrics`).
    pub async fn admin_get_text(&self, path: &str) -> String {
        let (status, body) = self.http.get(&self.admin_url(path), Some(ADMIN)).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }
}

impl RawNode {
    /// A raw node registered for `games` with room for `game_sessions` (and the model `m`), so
    /// that tests can hold game sessions without encoding video.
    pub async fn connect_games(
        gw: &TestGateway,
        id: &str,
        from: IpAddr,
        class: &str,
        games: &[&str],
        game_sessions: u32,
    ) -> RawNode {
        let workloads = Workloads {
            games: games.iter().map(|g| g.to_string()).collect(),
            models: vec!["m".into()],
        };
        let reg = Self::registration(gw, id, class, workloads, game_sessions);
        Self::register(gw, from, reg).await
    }

    /// Keeps the raw node alive (heartbeats every 50 ms) until the returned task is aborted;
    /// the node's connection stays usable through the clone in `conn`.
    pub fn keep_alive(mut self) -> tokio::task::JoinHandle<RawNode> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                if tokio::time::timeout(Duration::from_secs(2), self.heartbeat(0))
                    .await
                    .is_err()
                {
                    return self;
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Game relay helpers (hostile/relay.rs).

/// An enrolment token of a second, verified operator: a stranger to the first one's nodes.
pub fn other_operator_token(gw: &TestGateway, name: &str) -> String {
    let op = gw.store.create_operator(name, KycStatus::Verified).unwrap();
    gw.store.create_enrolment_token(&op.id).unwrap().1
}

/// A raw node registered with `token`, serving the game titles `games` (up to `sessions` at
/// once) and nothing else. It answers no heartbeats by itself: give the gateway a long
/// `nodes.heartbeat_ms`.
pub async fn raw_game_node(
    gw: &TestGateway,
    id: &str,
    from: IpAddr,
    token: &str,
    games: &[&str],
    sessions: u32,
) -> RawNode {
    let cfg = client_config(ServerVerify::PinnedSha256(gw.sha), &[ALPN_NODE]).unwrap();
    let (endpoint, _) =
        nearpath_protocol::net::client_endpoint(SocketAddr::new(from, 0), cfg, 1 << 20).unwrap();
    let conn = endpoint
        .connect(gw.addrs.quic, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send_half, recv) = conn.open_bi().await.unwrap();
    let reg = Register {
        protocol_version: PROTOCOL_VERSION,
        node_id: id.into(),
        enrolment_token: token.into(),
        software_version: "0.1.0".into(),
        gpus: vec![Gpu {
            model: "rtx4090".into(),
            class: "rtx4090".into(),
            vram_mib: 24_000,
        }],
        workloads: Workloads {
            games: games.iter().map(|g| g.to_string()).collect(),
            models: vec![],
        },
        capacity: Capacity {
            game_sessions: sessions,
            inference_concurrency: 0,
        },
    };
    send(&mut send_half, &Message::Register(reg)).await.unwrap();
    let mut recv = FramedRecv::new(recv, MAX_CONTROL_FRAME);
    let first = recv.next().await.unwrap().unwrap();
    assert!(
        matches!(first, Message::Registered(_)),
        "{id} not registered: {first:?}"
    );
    RawNode {
        endpoint,
        conn,
        send: send_half,
        recv,
        first,
        seq: 0,
    }
}

/// A game session the gateway opened on a raw node; keep it alive for as long as the session
/// should run (dropping it ends the session stream, which the gateway takes for a node failure).
pub struct RawGameSession {
    pub session_id: u64,
    pub send: quinn::SendStream,
    pub recv: FramedRecv,
}

impl RawNode {
    /// Accepts the gateway's next session stream, which must open a game, and accepts it.
    pub async fn accept_game(&self) -> RawGameSession {
        let (mut tx, rx) = self.conn.accept_bi().await.unwrap();
        let mut rx = FramedRecv::new(rx, nearpath_protocol::MAX_REQUEST_FRAME);
        let open = match rx.next().await.unwrap().unwrap() {
            Message::Open(o) => o,
            other => panic!("expected Open, got {other:?}"),
        };
        send(
            &mut tx,
            &Message::Accepted(nearpath_protocol::message::Accepted {
                session_id: open.session_id,
            }),
        )
        .await
        .unwrap();
        RawGameSession {
            session_id: open.session_id,
            send: tx,
            recv: rx,
        }
    }

    /// Sends one video frame for `session_id`, captured now, on its own uni stream. Errors (the
    /// gateway refused the stream) are returned, not unwrapped.
    pub async fn send_video_frame(
        &self,
        session_id: u64,
        seq: u64,
        payload: &[u8],
    ) -> Result<(), nearpath_protocol::StreamError> {
        let header = nearpath_protocol::FrameHeader {
            session_id,
            seq,
            capture_ts_us: unix_micros_now(),
            encode_us: 0,
            keyframe: seq == 0,
            input_seq: 0,
            width: 1280,
            height: 720,
            payload_len: 0,
        };
        nearpath_protocol::stream::send_frame(&self.conn, header, Bytes::copy_from_slice(payload))
            .await
    }
}

/// Microseconds since the Unix epoch (the clock of frame capture times).
pub fn unix_micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The value of one series (name with labels, exactly as exported) on the admin `/metrics`
/// page; 0 when it is absent.
pub async fn admin_metric(gw: &TestGateway, series: &str) -> f64 {
    let (status, page) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    assert_eq!(status, 200);
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The admin view of game session `id`, if it is live.
pub async fn admin_game_session(gw: &TestGateway, id: u64) -> Option<Value> {
    let v = gw.admin_get("/admin/sessions").await;
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"].as_u64() == Some(id))
        .cloned()
}
impl RawNode {
    /// A raw node registering with `token` (not necessarily the gateway's first one), serving
    /// `games` and `models`, with room for 4 game sessions and 4 inference streams.
    pub async fn connect_with(
        gw: &TestGateway,
        id: &str,
        from: IpAddr,
        token: &str,
        games: &[&str],
        models: &[&str],
    ) -> RawNode {
        let reg = Register {
            protocol_version: PROTOCOL_VERSION,
            node_id: id.into(),
            enrolment_token: token.into(),
            software_version: "0.1.0".into(),
            gpus: vec![],
            workloads: Workloads {
                games: games.iter().map(|g| g.to_string()).collect(),
                models: models.iter().map(|m| m.to_string()).collect(),
            },
            capacity: Capacity {
                game_sessions: 4,
                inference_concurrency: 4,
            },
        };
        Self::register(gw, from, reg).await
    }

    /// Accepts the next session the gateway opens on this node and answers `Accepted`; returns
    /// the session's stream halves and its `Open`.
    pub async fn accept_session(
        &self,
    ) -> (
        quinn::SendStream,
        FramedRecv,
        nearpath_protocol::message::Open,
    ) {
        let (mut tx, rx) = tokio::time::timeout(Duration::from_secs(10), self.conn.accept_bi())
            .await
            .expect("no session opened on the raw node")
            .unwrap();
        let mut rx = FramedRecv::new(rx, nearpath_protocol::MAX_REQUEST_FRAME);
        let open = match rx.next().await.unwrap().unwrap() {
            Message::Open(o) => o,
            other => panic!("expected Open, got {}", other.name()),
        };
        let accepted = Message::Accepted(nearpath_protocol::message::Accepted {
            session_id: open.session_id,
        });
        send(&mut tx, &accepted).await.unwrap();
        (tx, rx, open)
    }
}

impl RawNode {
    /// Like [`RawNode::connect`], with a chosen enrolment token and GPUs given as
    /// (model name, class hint) pairs; no GPUs makes a CPU-only node.
    pub async fn connect_gpus(
        gw: &TestGateway,
        id: &str,
        from: IpAddr,
        token: &str,
        gpus: &[(&str, &str)],
    ) -> RawNode {
        let reg = Register {
            protocol_version: PROTOCOL_VERSION,
            node_id: id.into(),
            enrolment_token: token.into(),
            software_version: "0.1.0".into(),
            gpus: gpus
                .iter()
                .map(|(model, class)| Gpu {
                    model: (*model).into(),
                    class: (*class).into(),
                    vram_mib: 80_000,
                })
                .collect(),
            workloads: Workloads {
                games: vec![],
                models: vec!["m".into()],
            },
            capacity: Capacity {
                game_sessions: 1,
                inference_concurrency: 4,
            },
        };
        Self::register(gw, from, reg).await
    }
}

/// A second verified operator with its own enrolment token: (operator id, token secret).
pub fn another_operator(gw: &TestGateway, name: &str) -> (String, String) {
    let op = gw.store.create_operator(name, KycStatus::Verified).unwrap();
    let (_, token) = gw.store.create_enrolment_token(&op.id).unwrap();
    (op.id, token)
}

/// Polls `check` until it returns `Some`, failing with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A native client connected from `from`'s address, verifying the gateway's pinned certificate.
pub async fn native_client(
    gw: &TestGateway,
    from: (&str, &str, f64, f64),
) -> nearpath_protocol::Client {
    nearpath_protocol::Client::connect_from(
        SocketAddr::new(ip(from), 0),
        gw.addrs.quic,
        "localhost",
        ServerVerify::PinnedSha256(gw.sha),
    )
    .await
    .unwrap()
}

/// A seeded impairment relay in front of the gateway's QUIC port, forwarding from `from`'s
/// address, so whoever dials through it still appears to the gateway from that place.
pub async fn relay_from(
    gw: &TestGateway,
    from: (&str, &str, f64, f64),
    seed: u64,
) -> nearpath_tests::impair::UdpRelay {
    nearpath_tests::impair::UdpRelay::start(
        "127.0.0.1:0".parse().unwrap(),
        gw.addrs.quic,
        ip(from),
        seed,
    )
    .await
    .unwrap()
}

/// A real edge node `id` in DE (the test config, changed by `edit`) whose path to the gateway
/// goes through a seeded relay; returned once registered.
pub async fn node_behind_relay(
    gw: &TestGateway,
    id: &str,
    seed: u64,
    edit: impl FnOnce(&mut NodeConfig),
) -> (TestNode, nearpath_tests::impair::UdpRelay) {
    let relay = relay_from(gw, DE, seed).await;
    let mut cfg = gw.node_config(id, &gw.token);
    cfg.gateway.address = relay.addr().to_string();
    edit(&mut cfg);
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    (node, relay)
}
