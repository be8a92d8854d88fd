//! Shared helpers for the end-to-end tests: a gateway on ephemeral loopback ports with GeoIP
//! overrides that make 127.0.0.x addresses look like different countries, real edge nodes,
//! "raw" nodes that speak the protocol by hand (to misbehave on purpose), and a small HTTP client.

#![allow(dead_code)]

pub mod fleet;
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
use nearpath_protocol::message::Message;
use nearpath_protocol::tls::ServerVerify;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The hand-spoken node of the tests is the shared fake node ([`nearpath_tests::fake_node`]);
/// these names are the ones the tests have always used (not every test binary uses all).
#[allow(unused_imports)]
pub use nearpath_tests::fake_node::{
    unix_micros_now, FakeNode as RawNode, GameSession as RawGameSession, GatewayTarget,
    Registration,
};

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
    // Probe sessions take node slots at random times; the tests of other features count
    // slots and sessions exactly, so the checker is on only where a test turns it on
    // (tests/tests/checker.rs).
    c.checker.enabled = false;
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

impl GatewayTarget for TestGateway {
    fn quic_addr(&self) -> SocketAddr {
        self.addrs.quic
    }

    fn cert_sha256(&self) -> [u8; 32] {
        self.sha
    }

    fn enrolment_token(&self) -> String {
        self.token.clone()
    }
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
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        Self::start_prepared_on(store, path, edit, |gw| gw).await
    }

    /// Provisions `store` as every test gateway has it (each at most once, so gateways sharing
    /// a store find them): the verified operator `op-verified`, a fresh enrolment token of it,
    /// and [`API_KEY`]. Off the runtime, as the gateway calls its store.
    async fn provision(store: &Arc<dyn Store>) -> (nearpath_gateway::store::Operator, String) {
        let s = Arc::clone(store);
        tokio::task::spawn_blocking(move || {
            let operator = match s
                .list_operators()
                .unwrap()
                .into_iter()
                .find(|o| o.name == "op-verified")
            {
                Some(o) => o,
                None => s
                    .create_operator("op-verified", KycStatus::Verified)
                    .unwrap(),
            };
            let (_, token) = s.create_enrolment_token(&operator.id).unwrap();
            // Idempotent: a second gateway on the same store gets the same key back.
            s.insert_api_key_secret(API_KEY, "tenant-a", 100_000, 100_000_000)
                .unwrap();
            (operator, token)
        })
        .await
        .unwrap()
    }

    /// Provisions `store`, builds a gateway with a fresh self-signed certificate, applies
    /// `prepare` to it and serves it on ephemeral listeners. Every constructor ends here.
    async fn start_prepared_on(
        store: Arc<dyn Store>,
        store_path: PathBuf,
        edit: impl FnOnce(&mut GatewayConfig),
        prepare: impl FnOnce(Gateway) -> Gateway,
    ) -> TestGateway {
        let mut config = test_config(store_path.clone());
        edit(&mut config);
        let cert = nearpath_gateway::tls::self_signed(&["localhost", "127.0.0.1"]).unwrap();
        let sha = cert.sha256;
        let (operator, token) = Self::provision(&store).await;
        let gw = prepare(Gateway::with_parts(config, cert, store.clone()).unwrap());
        Self::serve(gw, sha, store, store_path, operator.id, token).await
    }

    /// Serves `gw` on ephemeral 127.0.0.1 listeners.
    async fn serve(
        gw: Gateway,
        sha: [u8; 32],
        store: Arc<dyn Store>,
        store_path: PathBuf,
        operator_id: String,
        token: String,
    ) -> TestGateway {
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
            store_path,
            shutdown,
            task,
            operator_id,
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
}

pub fn gpu(model: &str) -> GpuSpec {
    GpuSpec {
        model: model.into(),
        vram_mib: 80_000,
        class: None,
        uuid: None,
        pci_device_id: None,
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
    let reg = Registration::new(id, token)
        .gpu("rtx4090", "rtx4090", 24_000)
        .games(games, sessions);
    let node = RawNode::register(gw, from, reg.message()).await;
    assert!(
        matches!(node.first, Message::Registered(_)),
        "{id} not registered: {:?}",
        node.first
    );
    node
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
/// A second verified operator with its own enrolment token: (operator id, token secret).
pub fn another_operator(gw: &TestGateway, name: &str) -> (String, String) {
    let op = gw.store.create_operator(name, KycStatus::Verified).unwrap();
    let (_, token) = gw.store.create_enrolment_token(&op.id).unwrap();
    (op.id, token)
}

/// The node's `verification` object in `GET /admin/nodes/{id}` (the checker's view of it).
pub async fn verification(gw: &TestGateway, id: &str) -> serde_json::Value {
    gw.admin_get(&format!("/admin/nodes/{id}")).await["verification"].clone()
}

/// Waits (up to 30 s) until the node's verification on `gw` matches `pred`, and returns it.
pub async fn wait_verification(
    gw: &TestGateway,
    id: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(what, Duration::from_secs(30), || async {
        let v = verification(gw, id).await;
        pred(&v).then_some(v)
    })
    .await
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

// ---------------------------------------------------------------------------------------------
// Python packages of the client-library and real-server tests (openai_python.rs, real_server.rs).

/// Why `python3` cannot run `import_stmt` (e.g. `import litellm`), or `None` when it can.
pub fn python_lacks(import_stmt: &str) -> Option<String> {
    match std::process::Command::new("python3")
        .args(["-c", import_stmt])
        .output()
    {
        Ok(o) if o.status.success() => None,
        // The traceback's last line says which module is missing.
        Ok(o) => Some(format!(
            "python3 cannot `{import_stmt}`: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("(no message)")
                .trim()
        )),
        Err(e) => Some(format!("python3 does not run: {e}")),
    }
}

/// Whether `CI` is set to something true: missing test prerequisites then fail, not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Reports a missing prerequisite: a printed skip on a developer's machine, a failure in CI
/// (where `.ci/run` installs everything, so a missing package is a broken CI image).
pub fn skip_unless_ci(why: &str, install: &str) {
    if in_ci() {
        panic!("CI is set and {why}: .ci/run must install it ({install})");
    }
    println!("SKIPPED (CI is not set): {why}; install with {install}");
}

/// True when `python3` can run `import_stmt`; otherwise skips (returns false) or, in CI, fails.
pub fn python_can(import_stmt: &str, install: &str) -> bool {
    match python_lacks(import_stmt) {
        None => true,
        Some(why) => {
            skip_unless_ci(&why, install);
            false
        }
    }
}

/// Runs `python3 <script> <args>` with `env` off the runtime, prints what it printed and asserts
/// that it passed: exit 0 and "all checks passed", as every check script under tests/python
/// reports. `what` names the run in the failure message.
#[allow(dead_code)]
pub async fn run_python_checks(
    what: &str,
    script: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .args(args)
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

impl TestGateway {
    /// [`TestGateway::start_at`] with `prepare` applied to the loaded gateway before it starts
    /// (a federation's shared directory, for one).
    pub async fn start_prepared(
        path: PathBuf,
        edit: impl FnOnce(&mut GatewayConfig),
        prepare: impl FnOnce(Gateway) -> Gateway,
    ) -> TestGateway {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        Self::start_prepared_on(store, path, edit, prepare).await
    }

    /// A gateway opened by [`Gateway::load`] from `config`, exactly as `gateway run` opens one
    /// (so on PostgreSQL when `store.url` is set), provisioned like [`TestGateway::start`]
    /// (verified operator, enrolment token, [`API_KEY`]) through `store`, which must reach the
    /// same database (as an admin tool or a second gateway would). `sha` is the SHA-256 of the
    /// certificate in `quic.cert_file`, which nodes pin.
    pub async fn start_loaded(
        config: GatewayConfig,
        store: Arc<dyn Store>,
        sha: [u8; 32],
    ) -> TestGateway {
        let (operator, token) = Self::provision(&store).await;
        let store_path = config.store.path.clone();
        let gw = Gateway::load(config).unwrap();
        Self::serve(gw, sha, store, store_path, operator.id, token).await
    }
}

impl TestGateway {
    /// A gateway on an already open `store` that other gateways of the test share (a
    /// federation of in-process gateways); `path` names the store's file in its config. The
    /// verified operator and the test API key are created once, by the first gateway.
    pub async fn start_sharing(
        store: Arc<dyn Store>,
        path: PathBuf,
        edit: impl FnOnce(&mut GatewayConfig),
    ) -> TestGateway {
        Self::start_prepared_on(store, path, edit, |gw| gw).await
    }
}

impl TestGateway {
    /// A gateway like [`TestGateway::start`] on a store opened by the caller (PostgreSQL, or a
    /// store shared with another gateway); `store_path` is empty.
    pub async fn start_on(
        store: Arc<dyn Store>,
        edit: impl FnOnce(&mut GatewayConfig),
    ) -> TestGateway {
        Self::start_prepared_on(store, PathBuf::new(), edit, |gw| gw).await
    }
}

/// H.264 frames decoded in order by OpenH264: how many produced a picture, and the size of the
/// last one.
pub fn decode_h264(frames: &[nearpath_protocol::VideoFrame]) -> (usize, (usize, usize)) {
    use openh264::formats::YUVSource;
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let mut decoded = 0;
    let mut dims = (0, 0);
    for f in frames {
        if let Some(yuv) = dec.decode(&f.payload).unwrap() {
            dims = yuv.dimensions();
            decoded += 1;
        }
    }
    (decoded, dims)
}
