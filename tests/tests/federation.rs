//! Nodes that move between the gateways of a federation: the node probes every gateway it
//! knows, registers with the lowest round trip, and on losing it registers with the next
//! within 2 s.

mod common;

use common::*;
use nearpath_edge_node::NodeStatus;
use nearpath_protocol::tls::sha256_hex;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Two gateways sharing one SQLite store (operators, tokens and keys are the same on both).
async fn two_gateways() -> (TestGateway, TestGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = TestGateway::start_at(path.clone(), |_| {}).await;
    let b = TestGateway::start_at(path, |_| {}).await;
    (a, b, dir)
}

/// A node config listing `addresses` (in this order), pinned to both gateways' certificates.
fn federated_node(
    a: &TestGateway,
    b: &TestGateway,
    id: &str,
    addresses: [SocketAddr; 2],
) -> nearpath_config::NodeConfig {
    let mut cfg = a.node_config(id, &a.token);
    cfg.gateway.address = String::new();
    cfg.gateway.addresses = addresses.iter().map(|a| a.to_string()).collect();
    cfg.gateway.pinned_cert_sha256 = None;
    cfg.gateway.pinned_cert_sha256s = vec![sha256_hex(&a.sha), sha256_hex(&b.sha)];
    cfg
}

/// The gateway address the node is registered with, once it is.
async fn registered_at(node: &mut TestNode) -> String {
    match node
        .wait_status(|s| matches!(s, NodeStatus::Registered { .. }))
        .await
    {
        NodeStatus::Registered { gateway, .. } => gateway,
        _ => unreachable!(),
    }
}

/// Waits (bounded by `limit`) until the node is registered with a gateway other than `old`;
/// returns that gateway and how long it took from `since`.
async fn moved_from(
    node: &mut TestNode,
    old: &str,
    since: Instant,
    limit: Duration,
) -> (String, Duration) {
    let status = tokio::time::timeout(
        limit,
        node.wait_status(|s| matches!(s, NodeStatus::Registered { gateway, .. } if gateway != old)),
    )
    .await
    .unwrap_or_else(|_| panic!("the node did not leave {old} within {limit:?}"));
    match status {
        NodeStatus::Registered { gateway, .. } => (gateway, since.elapsed()),
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registers_with_the_lowest_rtt_gateway() {
    let (a, b, _dir) = two_gateways().await;
    // A is 60 ms away (each way), B is direct: the node must pick B although A is listed first.
    let slow = relay_from(&a, DE, 1).await;
    slow.set_both(nearpath_tests::impair::Impairment::delay(60.0));
    let cfg = federated_node(&a, &b, "n-rtt", [slow.addr(), b.addrs.quic]);
    let mut node = TestNode::start(cfg, ip(DE));
    assert_eq!(registered_at(&mut node).await, b.addrs.quic.to_string());
    b.wait_nodes("n-rtt at B", Duration::from_secs(5), |ids| {
        ids == ["n-rtt".to_string()]
    })
    .await;
    assert!(a.node_ids().await.is_empty());
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_fails_over_to_the_next_gateway_within_2s_when_its_gateway_stops() {
    let (a, b, _dir) = two_gateways().await;
    let cfg = federated_node(&a, &b, "n-move", [a.addrs.quic, b.addrs.quic]);
    let mut node = TestNode::start(cfg, ip(DE));
    let first = registered_at(&mut node).await;
    let (gone, stay) = if first == a.addrs.quic.to_string() {
        (a, b)
    } else {
        (b, a)
    };
    let killed = Instant::now();
    gone.stop().await;
    let (now_at, took) = moved_from(&mut node, &first, killed, Duration::from_secs(5)).await;
    assert_eq!(now_at, stay.addrs.quic.to_string());
    assert!(
        took < Duration::from_secs(2),
        "re-registered after {took:?}"
    );
    stay.wait_nodes(
        "the node at the surviving gateway",
        Duration::from_secs(2),
        |ids| ids == ["n-move".to_string()],
    )
    .await;
    eprintln!("failover after a gateway shutdown: {} ms", took.as_millis());
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_fails_over_within_2s_of_noticing_that_its_gateway_went_silent() {
    let (a, b, _dir) = two_gateways().await;
    // Both paths go through relays, so either can be cut without a word (like kill -9 or a
    // lost route: no close ever arrives).
    let ra = relay_from(&a, DE, 2).await;
    let rb = relay_from(&b, DE, 3).await;
    let cfg = federated_node(&a, &b, "n-silent", [ra.addr(), rb.addr()]);
    let mut node = TestNode::start(cfg, ip(DE));
    let first = registered_at(&mut node).await;
    let (cut, other) = if first == ra.addr().to_string() {
        (&ra, &rb)
    } else {
        (&rb, &ra)
    };
    let cut_at = Instant::now();
    cut.blackout_forever();
    let (now_at, took) = moved_from(&mut node, &first, cut_at, Duration::from_secs(6)).await;
    assert_eq!(now_at, other.addr().to_string());
    // The node notices after its lease (3 heartbeats of 100 ms in the test config), then has
    // 2 s to register elsewhere.
    let lease = Duration::from_millis(300);
    assert!(
        took < lease + Duration::from_secs(2),
        "re-registered {took:?} after the cut"
    );
    eprintln!("failover after a silent gateway: {} ms", took.as_millis());
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_gateways_down_backs_off_then_the_first_to_return_is_used() {
    let (a, b, _dir) = two_gateways().await;
    let ra = relay_from(&a, DE, 4).await;
    let rb = relay_from(&b, DE, 5).await;
    let mut cfg = federated_node(&a, &b, "n-back", [ra.addr(), rb.addr()]);
    cfg.gateway.connect_timeout_ms = 300;
    ra.blackout_forever();
    rb.blackout_forever();
    let mut node = TestNode::start(cfg, ip(DE));
    // Nothing answers: the node keeps trying (no registration, no give-up).
    node.wait_status(|s| matches!(s, NodeStatus::Connecting { attempt } if *attempt >= 1))
        .await;
    rb.restore();
    let gateway = tokio::time::timeout(Duration::from_secs(8), registered_at(&mut node))
        .await
        .expect("registered once a gateway answered");
    assert_eq!(gateway, rb.addr().to_string());
    node.stop().await.unwrap();
}

/// Serves `body` as the answer to every HTTP request on a port-0 listener, recording each
/// request's head (to check the bearer token).
async fn serve_list(body: String) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                    match sock.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..len]).into_owned());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_list_is_used_and_entries_with_unpinned_certificates_are_ignored() {
    let (a, b, _dir) = two_gateways().await;
    // The list names A with a forged certificate digest and B with its own: a node pinning
    // both gateways must ignore the forged entry (whoever serves the list cannot make the
    // node trust anything) and register with B.
    let forged = [0x55u8; 32];
    let list = serde_json::json!({"object": "list", "data": [
        {"id": "a", "region": "eu", "lat": 50.1, "lon": 8.7, "quic_address": "127.0.0.1:9",
         "http_url": "http://127.0.0.1:9", "cert_sha256": sha256_hex(&forged), "live": true},
        {"id": "b", "region": "eu", "lat": 50.1, "lon": 8.7, "quic_address": b.addrs.quic.to_string(),
         "http_url": format!("http://{}", b.addrs.http), "cert_sha256": sha256_hex(&b.sha), "live": true},
        {"id": "stale", "region": "eu", "lat": 0.0, "lon": 0.0, "quic_address": a.addrs.quic.to_string(),
         "http_url": "http://127.0.0.1:9", "cert_sha256": sha256_hex(&a.sha), "live": false}
    ]});
    let (http, heads) = serve_list(list.to_string()).await;
    let mut cfg = a.node_config("n-boot", &a.token);
    cfg.gateway.address = String::new();
    cfg.gateway.bootstrap_url = Some(format!("http://{http}/v1/gateways"));
    cfg.gateway.bootstrap_api_key = Some(API_KEY.into());
    cfg.gateway.pinned_cert_sha256 = None;
    cfg.gateway.pinned_cert_sha256s = vec![sha256_hex(&a.sha), sha256_hex(&b.sha)];
    cfg.validate_for_run().unwrap();
    let mut node = TestNode::start(cfg, ip(DE));
    assert_eq!(registered_at(&mut node).await, b.addrs.quic.to_string());
    let head = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.starts_with("get /v1/gateways "), "{head}");
    assert!(
        head.contains(&format!(
            "authorization: bearer {}",
            API_KEY.to_ascii_lowercase()
        )),
        "{head}"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_picks_the_nearest_gateway_and_skips_a_dead_one() {
    let (a, b, _dir) = two_gateways().await;
    let slow = relay_from(&a, DE, 6).await;
    slow.set_both(nearpath_tests::impair::Impairment::delay(60.0));
    // A port nobody answers on: its handshake never completes and must not hold the pick up.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let candidates = [
        dead.local_addr().unwrap().to_string(),
        slow.addr().to_string(),
        b.addrs.quic.to_string(),
    ];
    let pins = nearpath_protocol::ServerVerify::PinnedAnySha256(vec![a.sha, b.sha]);
    let started = Instant::now();
    let (client, picked) =
        nearpath_gateway_cli::pick::nearest(&candidates, Some("localhost"), pins.clone())
            .await
            .unwrap();
    assert_eq!(picked, b.addrs.quic.to_string());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    client.close().await;
    // A gateway whose certificate is not pinned is never used, however near.
    let only_a = nearpath_protocol::ServerVerify::PinnedSha256(a.sha);
    let (client, picked) =
        nearpath_gateway_cli::pick::nearest(&candidates, Some("localhost"), only_a)
            .await
            .unwrap();
    assert_eq!(picked, slow.addr().to_string());
    client.close().await;
    // Nothing answering is an error naming each gateway, after the probe bound.
    let err = nearpath_gateway_cli::pick::nearest(&candidates[..1], None, pins)
        .await
        .err()
        .unwrap();
    assert!(err.contains(&candidates[0]), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Gateways as separate processes, killed with SIGKILL.

/// Set in a child process: the config file it runs as a gateway.
const GATEWAY_PROCESS_ENV: &str = "NEARPATH_TEST_GATEWAY_CONFIG";

/// Not a test: the body of a gateway process the federation tests start (this test binary run
/// again with the config path in [`GATEWAY_PROCESS_ENV`]). It does what `gateway run --config`
/// does (`nearpath_gateway_cli::cli`): load the file, log as configured, serve until killed.
#[test]
#[ignore = "the body of a gateway process started by the federation tests"]
fn federation_gateway_process() {
    let Ok(path) = std::env::var(GATEWAY_PROCESS_ENV) else {
        return;
    };
    let cfg = nearpath_config::load_gateway_for_run(std::path::Path::new(&path))
        .unwrap_or_else(|e| panic!("{e}"));
    nearpath_gateway::init_tracing(&cfg.log);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        nearpath_gateway::Gateway::load(cfg)
            .unwrap()
            .run(tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
    });
}

/// A gateway process: its addresses (read from its `gateway listening` log line) and pin.
struct GatewayProcess {
    child: std::process::Child,
    quic: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    sha: [u8; 32],
}

impl GatewayProcess {
    /// Writes a config for a gateway on `ip` (ports 0) with its own certificate and the shared
    /// store, starts it, and waits for its listening line.
    fn start(dir: &std::path::Path, name: &str, ip: &str, store: &SharedStore) -> GatewayProcess {
        use std::io::BufRead;
        let cert = nearpath_protocol::tls::self_signed(&["localhost".to_string(), ip.to_string()])
            .unwrap();
        let cert_file = dir.join(format!("{name}-cert.pem"));
        let key_file = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_file, &cert.cert_pem).unwrap();
        std::fs::write(&key_file, &cert.key_pem).unwrap();
        let mut cfg = test_config(dir.join("unused.db"));
        match store {
            SharedStore::Sqlite(path) => cfg.store.path = path.clone(),
            SharedStore::Postgres(url) => cfg.store.url = Some(url.clone()),
        }
        let any: SocketAddr = format!("{ip}:0").parse().unwrap();
        cfg.http.listen = any;
        cfg.admin.listen = any;
        cfg.quic.listen = any;
        cfg.quic.cert_file = Some(cert_file);
        cfg.quic.key_file = Some(key_file);
        cfg.log.format = nearpath_config::LogFormat::Json;
        cfg.log.level = "info".into();
        // Each process is a named member of the federation, as a regional deployment
        // configures it (not a `standalone` gateway); short leases so that a killed gateway's
        // entry expires within the test.
        cfg.federation.gateway_id = Some(name.to_string());
        cfg.federation.region = format!("region-{name}");
        cfg.federation.heartbeat_ms = 100;
        cfg.federation.lease_ms = 1_000;
        cfg.federation.node_directory_interval_ms = 100;
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "federation_gateway_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(GATEWAY_PROCESS_ENV, &file)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("starting a gateway process");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                // The first log line shares its line with the harness's `test ... `.
                let Some(start) = line.find('{') else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line[start..]) else {
                    continue;
                };
                if v["fields"]["message"] == "gateway listening" {
                    let f = &v["fields"];
                    let addr = |k: &str| f[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    let _ = tx.send((addr("quic"), addr("http"), addr("admin")));
                }
            }
        });
        let Ok((quic, http, admin)) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway process did not report its addresses");
        };
        GatewayProcess {
            child,
            quic,
            http,
            admin,
            sha: cert.sha256,
        }
    }

    /// SIGKILL: no goodbye to nodes, clients or the store.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    async fn admin_get(&self, http: &Http, path: &str) -> serde_json::Value {
        let (status, body) = http
            .get(&format!("http://{}{path}", self.admin), Some(ADMIN))
            .await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The nodes attached to this gateway (the admin listing also has its peers' nodes,
    /// marked `remote`).
    async fn node_ids(&self, http: &Http) -> Vec<String> {
        let v = self.admin_get(http, "/admin/nodes").await;
        let mut ids: Vec<String> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["remote"] != true)
            .map(|n| n["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Requests counted for `tenant` in a `/admin/usage` summary.
fn tenant_requests(summary: &serde_json::Value, tenant: &str) -> u64 {
    summary["by_tenant"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == tenant)
        .map(|t| t["requests"].as_u64().unwrap())
        .unwrap_or(0)
}

/// The store the gateway processes share.
enum SharedStore {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_gateway_process_on_postgresql_moves_its_nodes_within_3s_and_loses_no_acknowledged_usage(
) {
    let Some(pg) = nearpath_tests::pg::PgServer::shared() else {
        return;
    };
    let url = pg.new_database("federation_kill9");
    kill_9_scenario(SharedStore::Postgres(url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_gateway_process_on_sqlite_moves_its_nodes_within_3s_and_loses_no_acknowledged_usage(
) {
    let dir = tempfile::tempdir().unwrap();
    kill_9_scenario(SharedStore::Sqlite(dir.path().join("federation.db"))).await;
}

async fn kill_9_scenario(shared: SharedStore) {
    use nearpath_gateway::store::{KycStatus, PgStore, SqliteStore, Store};
    let dir = tempfile::tempdir().unwrap();
    // The shared store, seeded before the gateways start: one operator, its token, one key.
    let (token, _) = {
        let store: Box<dyn Store> = match &shared {
            SharedStore::Sqlite(path) => Box::new(SqliteStore::open(path).unwrap()),
            SharedStore::Postgres(url) => {
                Box::new(PgStore::open(url, 2, Duration::from_secs(5)).unwrap())
            }
        };
        let op = store
            .create_operator("op-fed", KycStatus::Verified)
            .unwrap();
        let (_, token) = store.create_enrolment_token(&op.id).unwrap();
        store
            .insert_api_key_secret(API_KEY, "tenant-fed", 100_000, 100_000_000)
            .unwrap();
        (token, op.id)
    };
    let names = ["a", "b", "c"];
    let ips = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];
    let mut gws: Vec<GatewayProcess> = names
        .iter()
        .zip(ips)
        .map(|(n, ip)| GatewayProcess::start(dir.path(), n, ip, &shared))
        .collect();
    // Node k reaches gateway k directly and the others through a 30 ms relay, so it registers
    // with gateway k and the test knows which nodes B holds.
    let mut relays = Vec::new();
    let mut nodes = Vec::new();
    for k in 0..3 {
        let mut addresses = Vec::new();
        for (g, gw) in gws.iter().enumerate() {
            if g == k {
                addresses.push(gw.quic.to_string());
            } else {
                let relay = nearpath_tests::impair::UdpRelay::start(
                    "127.0.0.1:0".parse().unwrap(),
                    gw.quic,
                    ip(DE),
                    k as u64 * 10 + g as u64,
                )
                .await
                .unwrap();
                relay.set_both(nearpath_tests::impair::Impairment::delay(30.0));
                addresses.push(relay.addr().to_string());
                relays.push(relay);
            }
        }
        let mut cfg = nearpath_config::NodeConfig::new(
            nearpath_config::NodeIdentity {
                id: format!("node-{}", names[k]),
                enrolment_token: Some(token.clone()),
            },
            nearpath_config::NodeGatewayConfig::pinned("unused:1", "0".repeat(64)),
        );
        cfg.gateway.address = String::new();
        cfg.gateway.addresses = addresses;
        cfg.gateway.pinned_cert_sha256 = None;
        cfg.gateway.pinned_cert_sha256s = gws.iter().map(|g| sha256_hex(&g.sha)).collect();
        cfg.models = vec![nearpath_config::ModelConfig {
            name: "m".into(),
            max_concurrency: 8,
            backend: nearpath_config::BackendConfig::Sim {
                ttft_ms: 0,
                tokens_per_s: 0.0,
                seed: 1,
            },
            responses: Default::default(),
            capabilities: None,
            weights_bytes: None,
            params_b: None,
            dtype: None,
        }];
        cfg.validate_for_run().unwrap();
        let mut node = TestNode::start(cfg, ip(DE));
        assert_eq!(registered_at(&mut node).await, gws[k].quic.to_string());
        nodes.push(node);
    }
    let http = Http::from(ip(FR_CLIENT));
    assert_eq!(gws[1].node_ids(&http).await, ["node-b"]);
    // The three joined the federation under their configured ids, and each holds its node.
    let directory = eventually("A to see a, b and c live", Duration::from_secs(10), || {
        let (gw, http) = (&gws[0], &http);
        async move {
            let v = gw.admin_get(http, "/admin/gateways").await;
            (live_gateways(&v) == ["a", "b", "c"]).then_some(v)
        }
    })
    .await;
    assert_eq!(directory["self"], "a", "{directory}");
    // B publishes node-b, and A reads it back, within a few publish intervals.
    eventually("A to list node-b at b", Duration::from_secs(10), || {
        let (gw, http) = (&gws[0], &http);
        async move {
            (node_holder(&gw.admin_get(http, "/admin/nodes").await, "node-b").as_deref()
                == Some("b"))
            .then_some(())
        }
    })
    .await;

    // Usage through B, acknowledged: B's admin API reads it back from the store.
    for i in 0..5 {
        let body = serde_json::json!({"model": "m", "max_tokens": 4,
            "messages": [{"role": "user", "content": format!("hello {i}")}]});
        let (status, text) = http
            .post(
                &format!("http://{}/v1/chat/completions", gws[1].http),
                Some(API_KEY),
                &body.to_string(),
                &[],
            )
            .await;
        assert_eq!(status, 200, "{text}");
    }
    let acknowledged = eventually(
        "B to have committed its usage",
        Duration::from_secs(5),
        || {
            let (gw, http) = (&gws[1], &http);
            async move {
                let n = tenant_requests(&gw.admin_get(http, "/admin/usage").await, "tenant-fed");
                (n >= 5).then_some(n)
            }
        },
    )
    .await;

    let killed = Instant::now();
    gws[1].kill9();
    let old = nodes[1].status.borrow().clone();
    let NodeStatus::Registered { gateway: old, .. } = old else {
        panic!("node-b was not registered: {old:?}");
    };
    let (now_at, took) = moved_from(&mut nodes[1], &old, killed, Duration::from_secs(10)).await;
    eprintln!(
        "kill -9 of gateway B ({}): node-b registered again after {} ms",
        match shared {
            SharedStore::Sqlite(_) => "SQLite",
            SharedStore::Postgres(_) => "PostgreSQL",
        },
        took.as_millis()
    );
    assert!(
        took < Duration::from_secs(3),
        "node-b moved after {took:?} (at {now_at})"
    );
    let survivors = [&gws[0], &gws[2]];
    let mut holders = 0;
    for gw in survivors {
        holders += gw.node_ids(&http).await.contains(&"node-b".to_string()) as usize;
    }
    assert_eq!(holders, 1, "node-b must be at exactly one of A and C");
    // B's lease runs out (it never left), and the node directory names node-b's new holder.
    eventually("A to see b's lease expire", Duration::from_secs(10), || {
        let (gw, http) = (&gws[0], &http);
        async move {
            let v = gw.admin_get(http, "/admin/gateways").await;
            (live_gateways(&v) == ["a", "c"]).then_some(())
        }
    })
    .await;
    let holder = eventually(
        "node-b's new holder in A's view",
        Duration::from_secs(10),
        || {
            let (gw, http) = (&gws[0], &http);
            async move {
                node_holder(&gw.admin_get(http, "/admin/nodes").await, "node-b")
                    .filter(|h| h != "b")
            }
        },
    )
    .await;
    assert!(holder == "a" || holder == "c", "{holder}");
    // Everything B acknowledged is in the shared store, seen from a surviving gateway.
    let after = tenant_requests(&gws[0].admin_get(&http, "/admin/usage").await, "tenant-fed");
    assert!(after >= acknowledged, "{after} < {acknowledged}");
    for node in nodes {
        node.stop().await.unwrap();
    }
}

/// The ids of the gateways an `/admin/gateways` listing shows live, in order.
fn live_gateways(v: &serde_json::Value) -> Vec<String> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["live"] == true)
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect()
}

/// Which gateway an `/admin/nodes` listing says holds `node` (local and remote entries both
/// carry `gateway_id`).
fn node_holder(v: &serde_json::Value, node: &str) -> Option<String> {
    let n = v["data"].as_array()?.iter().find(|n| n["id"] == node)?;
    n["gateway_id"].as_str().map(str::to_string)
}
