//! `/play` over WebTransport in a federation (issue 17, "not carried over WebTransport"; issue
//! 13, item 5 "`/play` does the same"): headless Chromium plays through gateway A, A is killed
//! with SIGKILL (a separate process: no close ever reaches the page), and the page shows the
//! pause banner, resumes the same session through gateway B with `PlayResume` and decodes
//! frames again within a few seconds.

mod cdp;
mod common;

use cdp::Browser;
use common::*;
use nearpath_config::{GameEntry, GameSource};
use nearpath_edge_node::NodeStatus;
use nearpath_protocol::tls::sha256_hex;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One headless Chromium at a time: two pages decoding at once on a 2-core machine starve each
/// other's timing (as in `tests/browser.rs`).
static ONE_BROWSER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Set in a child process: the config file it runs as a gateway.
const GATEWAY_PROCESS_ENV: &str = "NEARPATH_TEST_BROWSER_GATEWAY_CONFIG";

/// Not a test: the body of a gateway process the tests below start (this test binary run again
/// with the config path in [`GATEWAY_PROCESS_ENV`]), as `gateway run --config` does.
#[test]
#[ignore = "the body of a gateway process started by the browser federation tests"]
fn browser_federation_gateway_process() {
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

/// A gateway process of the federation on a shared SQLite store.
struct GatewayProcess {
    child: std::process::Child,
    quic: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    sha: [u8; 32],
}

impl GatewayProcess {
    /// Starts gateway `name` on `ip` (ports 0) with `store` and `edit`'s changes, and waits
    /// for its listening line.
    fn start(
        dir: &std::path::Path,
        name: &str,
        ip: &str,
        store: &std::path::Path,
        edit: impl FnOnce(&mut nearpath_config::GatewayConfig),
    ) -> Self {
        use std::io::BufRead;
        let cert = nearpath_protocol::tls::self_signed(&["localhost".to_string(), ip.to_string()])
            .unwrap();
        let cert_file = dir.join(format!("{name}-cert.pem"));
        let key_file = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_file, &cert.cert_pem).unwrap();
        std::fs::write(&key_file, &cert.key_pem).unwrap();
        let mut cfg = test_config(store.to_path_buf());
        let any: SocketAddr = format!("{ip}:0").parse().unwrap();
        cfg.http.listen = any;
        cfg.admin.listen = any;
        cfg.quic.listen = any;
        cfg.quic.cert_file = Some(cert_file);
        cfg.quic.key_file = Some(key_file);
        cfg.federation.gateway_id = Some(name.into());
        cfg.log.format = nearpath_config::LogFormat::Json;
        cfg.log.level = "info".into();
        edit(&mut cfg);
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "browser_federation_gateway_process",
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
                let Some(start) = line.find('{') else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&line[start..]) else {
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

    /// SIGKILL: no goodbye to nodes, players or the store.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    async fn admin_get(&self, http: &Http, path: &str) -> Value {
        let (status, body) = http
            .get(&format!("http://{}{path}", self.admin), Some(ADMIN))
            .await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the page says about its WebTransport session in a federation.
const FED_STATE: &str = "(() => { const np = window.nearpath; return { state: np.state, session: np.session, \
     gateway: np.gateway && np.gateway.id, gateways: np.gateways.map((g) => g.id), lost: np.lost, \
     resumes: np.resumes, error: np.lastError, banner: document.getElementById('banner').textContent, \
     bannerShown: document.getElementById('banner').style.display === 'block', \
     decoded: np.stats && np.stats.framesDecoded, statsGateway: np.stats && np.stats.gateway }; })()";

/// Polls the page's federation state until `pred` holds (bounded), returning it.
async fn wait_state(
    page: &cdp::Page,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let v = page.eval(FED_STATE).await.unwrap_or(Value::Null);
        if pred(&v) {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}; page: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// Gateways A and B as separate processes on one SQLite store, and the game's node, attached
/// to A, that moves to B (through a 30 ms relay) when A dies; A lists both gateways.
struct KillableFederation {
    a: GatewayProcess,
    b: GatewayProcess,
    node: TestNode,
    http: Http,
    _to_b: nearpath_tests::impair::UdpRelay,
    _dir: tempfile::TempDir,
}

impl KillableFederation {
    async fn start() -> KillableFederation {
        use nearpath_gateway::store::{KycStatus, SqliteStore, Store};
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("federation.db");
        let token = {
            let store = SqliteStore::open(&db).unwrap();
            let op = store
                .create_operator("op-fed", KycStatus::Verified)
                .unwrap();
            let (_, token) = store.create_enrolment_token(&op.id).unwrap();
            store
                .insert_api_key_secret(API_KEY, "tenant-fed", 100_000, 100_000_000)
                .unwrap();
            token
        };
        let a = GatewayProcess::start(dir.path(), "a", "127.0.0.21", &db, |_| {});
        // A page served by A that moves to B calls B's API from A's origin (WebRTC's offer,
        // trickle, stats and DELETE; WebTransport needs only `/v1/webtransport`, open to all).
        let a_origin = format!("http://{}", a.http);
        let b = GatewayProcess::start(dir.path(), "b", "127.0.0.22", &db, |c| {
            c.http.cors_allowed_origins = vec![a_origin];
        });
        // The node reaches A directly and B through a 30 ms relay, so it registers with A and
        // moves to B when A dies.
        let to_b = nearpath_tests::impair::UdpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            b.quic,
            ip(DE),
            7,
        )
        .await
        .unwrap();
        to_b.set_both(nearpath_tests::impair::Impairment::delay(30.0));
        let mut cfg = nearpath_config::NodeConfig::new(
            nearpath_config::NodeIdentity {
                id: "n-game".into(),
                enrolment_token: Some(token),
            },
            nearpath_config::NodeGatewayConfig::pinned("unused:1", "0".repeat(64)),
        );
        cfg.gateway.address = String::new();
        cfg.gateway.addresses = vec![a.quic.to_string(), to_b.addr().to_string()];
        cfg.gateway.pinned_cert_sha256 = None;
        cfg.gateway.pinned_cert_sha256s = vec![sha256_hex(&a.sha), sha256_hex(&b.sha)];
        cfg.games = vec![GameEntry {
            title: "arena".into(),
            source: GameSource::Builtin {},
        }];
        cfg.capacity.game_sessions = 1;
        let mut node = TestNode::start(cfg, ip(DE));
        match node
            .wait_status(|s| matches!(s, NodeStatus::Registered { .. }))
            .await
        {
            NodeStatus::Registered { gateway, .. } => assert_eq!(gateway, a.quic.to_string()),
            _ => unreachable!(),
        }
        // Both gateways are in the directory, as the page will read it.
        let http = Http::new();
        eventually("A to list both gateways", Duration::from_secs(10), || {
            let http = &http;
            let url = format!("http://{}/v1/gateways", a.http);
            async move {
                let (status, body) = http.get(&url, Some(API_KEY)).await;
                let v: Value = serde_json::from_str(&body).ok()?;
                (status == 200 && v["data"].as_array()?.len() == 2).then_some(())
            }
        })
        .await;
        // And A offers the game, as the page's picker will read it.
        eventually("A to offer arena", Duration::from_secs(10), || {
            let http = &http;
            let url = format!("http://{}/v1/games", a.http);
            async move {
                let (status, body) = http.get(&url, Some(API_KEY)).await;
                let v: Value = serde_json::from_str(&body).ok()?;
                let offered = v["data"].as_array()?.iter().any(|g| g["id"] == "arena");
                (status == 200 && offered).then_some(())
            }
        })
        .await;
        KillableFederation {
            a,
            b,
            node,
            http,
            _to_b: to_b,
            _dir: dir,
        }
    }
}

/// `/play` of `arena` at 320x180, 30 fps through `a` over `transport`, started at once.
async fn open_play(browser: &Browser, a: &GatewayProcess, transport: &str) -> cdp::Page {
    browser
        .open(&format!(
            "http://{}/play?key={API_KEY}&game=arena&width=320&height=180&fps=30&autostart=1&transport={transport}&resume_window_ms=8000",
            a.http
        ))
        .await
}

/// Guards `/play`'s resume over WebTransport: the gateway the page plays through is killed
/// (SIGKILL), the page shows the pause banner, resumes the same session through the other
/// gateway (`PlayResume` with its token) and decodes frames again, within a few seconds; its
/// stats and `window.nearpath` name the new gateway. When that gateway dies too, with no
/// gateway left, the page says the session could not be resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_resumes_its_webtransport_session_through_another_gateway_when_its_gateway_is_killed(
) {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let KillableFederation {
        mut a,
        mut b,
        node,
        http,
        _to_b,
        _dir,
    } = KillableFederation::start().await;
    let browser = Browser::launch().await;
    let page = open_play(&browser, &a, "webtransport").await;
    let before = wait_state(
        &page,
        "30 frames decoded through A, with the federation listed",
        Duration::from_secs(30),
        |v| {
            num(v, "decoded") >= 30.0
                && v["gateway"] == "a"
                && v["gateways"] == serde_json::json!(["a", "b"])
        },
    )
    .await;
    let session = before["session"].as_str().unwrap().to_string();
    assert_eq!(before["statsGateway"], "a", "{before}");

    let killed = Instant::now();
    a.kill9();
    // The pause banner shows at once (the page hears nothing for `resume_after_ms`, 1 s).
    let paused = wait_state(&page, "the pause banner", Duration::from_secs(5), |v| {
        v["bannerShown"] == true && v["lost"].as_u64() == Some(1)
    })
    .await;
    let banner_after = killed.elapsed();
    assert!(
        paused["banner"].as_str().unwrap().contains("resuming"),
        "{paused}"
    );
    // Then the same session through B, decoding again.
    let decoded_at_kill = num(&paused, "decoded");
    let resumed = wait_state(
        &page,
        "the session resumed through B and decoding",
        Duration::from_secs(15),
        |v| {
            v["resumes"].as_u64() == Some(1)
                && v["gateway"] == "b"
                && v["statsGateway"] == "b"
                && num(v, "decoded") >= 10.0
        },
    )
    .await;
    let took = killed.elapsed();
    assert_eq!(resumed["session"], session.as_str(), "same session id");
    assert_eq!(resumed["state"], "connected", "{resumed}");
    assert_eq!(
        resumed["bannerShown"], false,
        "the banner is gone: {resumed}"
    );
    assert!(
        took < Duration::from_secs(8),
        "decoding again {took:?} after the kill"
    );
    eprintln!(
        "page resume through another gateway: banner {} ms, decoding again {} ms after SIGKILL \
         ({decoded_at_kill} frames decoded before)",
        banner_after.as_millis(),
        took.as_millis()
    );
    // B runs it, for a WebTransport player.
    let listed = b.admin_get(&http, "/admin/sessions").await;
    let id: u64 = session.parse().unwrap();
    let row = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"].as_u64() == Some(id))
        .cloned()
        .unwrap_or_else(|| panic!("B does not list session {session}: {listed}"));
    assert_eq!(row["transport"], "webtransport", "{row}");

    // With B gone too there is nowhere left to resume: the page says so.
    b.kill9();
    let gave_up = wait_state(
        &page,
        "the page to say the session could not be resumed",
        Duration::from_secs(20),
        |v| {
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("could not be resumed through any gateway"))
        },
    )
    .await;
    assert_eq!(gave_up["lost"], 2, "{gave_up}");
    assert_eq!(gave_up["resumes"], 1, "{gave_up}");
    drop(browser);
    node.stop().await.unwrap();
}

/// What the page says about a resumed WebRTC session right now, with the current peer
/// connection's decoded frames (not the once-a-second stats).
const RTC_NOW: &str =
    "(async () => { const np = window.nearpath; return { transport: np.transport, \
     resumes: np.resumes, gateway: np.gateway && np.gateway.id, session: np.session, \
     decodedNow: await np.framesDecoded() }; })()";

/// Issue 13, item 5 (`/play` does the same, over WebRTC): the page plays over WebRTC (WHEP)
/// through A, which is killed with SIGKILL. The page notices the silence, shows the pause
/// banner, and resumes the same session through B with a new WHEP offer carrying
/// `Nearpath-Resume` (the token A gave in `Nearpath-Resume-Token`); frames decode again within
/// a few seconds, and the stats line and `window.nearpath` name B. The page's stats POSTs and
/// its DELETE then go to B, from A's origin (B's `http.cors_allowed_origins` lists it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_resumes_its_webrtc_session_through_another_gateway_when_its_gateway_is_killed() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let KillableFederation {
        mut a,
        b,
        node,
        http,
        _to_b,
        _dir,
    } = KillableFederation::start().await;
    let browser = Browser::launch().await;
    let page = open_play(&browser, &a, "webrtc").await;
    let before = wait_state(
        &page,
        "30 frames decoded through A over WebRTC, with the federation listed",
        Duration::from_secs(30),
        |v| {
            num(v, "decoded") >= 30.0
                && v["gateway"] == "a"
                && v["statsGateway"] == "a"
                && v["gateways"] == serde_json::json!(["a", "b"])
        },
    )
    .await;
    let now = page.eval(RTC_NOW).await.unwrap();
    assert_eq!(now["transport"], "webrtc", "{now}");
    let session = before["session"].as_str().unwrap().to_string();

    let killed = Instant::now();
    a.kill9();
    let paused = wait_state(&page, "the pause banner", Duration::from_secs(5), |v| {
        v["bannerShown"] == true && v["lost"].as_u64() == Some(1)
    })
    .await;
    let banner_after = killed.elapsed();
    assert!(
        paused["banner"].as_str().unwrap().contains("resuming"),
        "{paused}"
    );
    // The first frame decoded by the peer connection made with B.
    let first = loop {
        let v = page.eval(RTC_NOW).await.unwrap_or(Value::Null);
        if v["resumes"] == 1 && num(&v, "decodedNow") >= 1.0 {
            break v;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no frame decoded through B; page: {v}, {}",
            page.eval(FED_STATE).await.unwrap_or(Value::Null)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = killed.elapsed();
    assert_eq!(
        first["session"],
        session.as_str(),
        "same session id: {first}"
    );
    assert_eq!(first["gateway"], "b", "{first}");
    let resumed = wait_state(
        &page,
        "the resumed session's stats naming B",
        Duration::from_secs(10),
        |v| v["statsGateway"] == "b" && num(v, "decoded") >= 10.0,
    )
    .await;
    assert_eq!(resumed["session"], session.as_str());
    assert_eq!(resumed["state"], "connected", "{resumed}");
    assert_eq!(resumed["bannerShown"], false, "{resumed}");
    let keyframes = page
        .eval("window.nearpath.stats.keyFramesDecoded")
        .await
        .unwrap();
    assert!(
        keyframes.as_u64().unwrap_or(0) >= 1,
        "the new peer connection decoded a keyframe: {keyframes}"
    );
    assert!(
        took < Duration::from_secs(8),
        "decoding again {took:?} after the kill"
    );
    eprintln!(
        "page resume over WebRTC through another gateway: banner {} ms, first frame decoded {} ms after SIGKILL",
        banner_after.as_millis(),
        took.as_millis()
    );
    // B runs it for a WebRTC player, and the page's stats reach B across origins.
    let id: u64 = session.parse().unwrap();
    let row = |listed: Value| {
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"].as_u64() == Some(id))
            .cloned()
    };
    let started = Instant::now();
    loop {
        let r = row(b.admin_get(&http, "/admin/sessions").await)
            .unwrap_or_else(|| panic!("B does not run session {session}"));
        assert_eq!(r["transport"], "webrtc", "{r}");
        if r["client_stats"]["resumes"] == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the page's stats never reached B: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopping ends the session at B (the DELETE goes to B).
    page.eval("window.nearpath.stop().then(() => true)")
        .await
        .unwrap();
    let started = Instant::now();
    while row(b.admin_get(&http, "/admin/sessions").await).is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B still runs the session after the page stopped it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(browser);
    node.stop().await.unwrap();
}

/// Guards the page's give-up over WebRTC: both gateways are killed, so no gateway takes the
/// session (B's offer fails to connect, round after round); within the resume window the page
/// says the session could not be resumed, having shown the banner at once, and resumed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_so_when_its_webrtc_session_cannot_be_resumed_anywhere() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let KillableFederation {
        mut a,
        mut b,
        node,
        _to_b,
        _dir,
        ..
    } = KillableFederation::start().await;
    let browser = Browser::launch().await;
    let page = open_play(&browser, &a, "webrtc").await;
    wait_state(
        &page,
        "30 frames decoded through A over WebRTC, with the federation listed",
        Duration::from_secs(30),
        |v| num(v, "decoded") >= 30.0 && v["gateways"] == serde_json::json!(["a", "b"]),
    )
    .await;
    b.kill9();
    a.kill9();
    wait_state(&page, "the pause banner", Duration::from_secs(5), |v| {
        v["bannerShown"] == true && v["lost"].as_u64() == Some(1)
    })
    .await;
    // The window is 8 s (`resume_window_ms`), then the page says so.
    let gave_up = wait_state(
        &page,
        "the page to say the session could not be resumed",
        Duration::from_secs(20),
        |v| {
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("could not be resumed through any gateway"))
        },
    )
    .await;
    assert_eq!(gave_up["resumes"], 0, "{gave_up}");
    assert!(
        gave_up["error"].as_str().unwrap().contains("b: "),
        "the reason names the gateway tried: {gave_up}"
    );
    drop(browser);
    node.stop().await.unwrap();
}

/// The stand-in directories A reads (the store's, as B would publish them): see
/// `tests/tests/redirect.rs`.
struct Directories {
    gateways: Vec<nearpath_gateway::store::GatewayRecord>,
    nodes: Vec<nearpath_gateway::store::NodeDirEntry>,
}

impl nearpath_gateway::game::redirect::FederationView for Directories {
    fn gateways(
        &self,
    ) -> Result<Vec<nearpath_gateway::store::GatewayRecord>, nearpath_gateway::store::StoreError>
    {
        Ok(self.gateways.clone())
    }
    fn node_directory(
        &self,
    ) -> Result<Vec<nearpath_gateway::store::NodeDirEntry>, nearpath_gateway::store::StoreError>
    {
        Ok(self.nodes.clone())
    }
}

fn record(id: &str, gw: &TestGateway) -> nearpath_gateway::store::GatewayRecord {
    nearpath_gateway::store::GatewayRecord {
        id: id.into(),
        region: format!("region-{id}"),
        lat: 50.0,
        lon: 8.0,
        quic_address: gw.addrs.quic.to_string(),
        http_url: format!("http://{}", gw.addrs.http),
        cert_sha256: sha256_hex(&gw.sha),
        version: "0.1.0".into(),
        started_at_ms: 0,
        heartbeat_at_ms: 0,
        // The longest lease a store can hold (readers check entries as publications are).
        expires_at_ms: i64::MAX as u64,
    }
}

/// Guards `/play` following a federation `Redirect` over WebTransport: the page at A, whose
/// only game node is attached to B, is redirected, reads B's `/v1/webtransport` (from A's
/// origin), presents the ticket to B over WebTransport and decodes B's frames; its stats and
/// `window.nearpath` name B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_a_redirect_over_webtransport_and_plays_on_the_peer() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("federation.db");
    let a = TestGateway::start_at(path.clone(), |c| {
        c.federation.gateway_id = Some("a".into());
    })
    .await;
    let b = TestGateway::start_at(path, |c| {
        c.federation.gateway_id = Some("b".into());
    })
    .await;
    let mut cfg = b.node_config("b-1", &b.token);
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    cfg.capacity.game_sessions = 1;
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let nodes = b
        .shared
        .directory
        .registry
        .list()
        .iter()
        .map(|n| {
            let loc = n.location();
            nearpath_gateway::store::NodeDirEntry {
                node_id: n.id.clone(),
                operator_id: n.operator_id.clone(),
                gateway_id: "b".into(),
                country: loc.country.map(|c| c.as_str().to_string()),
                lat: loc.coords.map(|c| c.lat),
                lon: loc.coords.map(|c| c.lon),
                gpu_classes: n.classes.iter().map(|(c, _)| c.clone()).collect(),
                models: n.workloads.models.clone(),
                games: n.workloads.games.clone(),
                inference_slots: 0,
                inference_free: 0,
                game_slots: 1,
                game_free: 1,
                accepting: true,
                verification: "unverified".into(),
                updated_at_ms: 0,
                encoders: Vec::new(),
                model_caps: Vec::new(),
                subdivision: None,
            }
        })
        .collect();
    a.shared
        .games
        .federation()
        .expect("A is in a federation")
        .set_view(std::sync::Arc::new(Directories {
            gateways: vec![record("a", &a), record("b", &b)],
            nodes,
        }));

    let browser = Browser::launch().await;
    let page = browser
        .open(&a.api_url(&format!(
            "/play?key={API_KEY}&width=320&height=180&fps=30&transport=webtransport"
        )))
        .await;
    // A's own game list (`GET /v1/games`) names only its nodes' games, so the picker has no
    // `arena`: the session is started as the console would start it.
    wait_state(&page, "the page", Duration::from_secs(10), |v| {
        v["state"] == "idle"
    })
    .await;
    page.eval("window.nearpath.start({ game: 'arena' }), true")
        .await
        .unwrap();
    let playing = wait_state(
        &page,
        "30 frames decoded from B after the redirect",
        Duration::from_secs(30),
        |v| num(v, "decoded") >= 30.0 && v["statsGateway"] == "b",
    )
    .await;
    assert_eq!(playing["gateway"], "b", "{playing}");
    assert_eq!(playing["state"], "connected", "{playing}");
    let redirects = page.eval("window.nearpath.redirects").await.unwrap();
    assert_eq!(redirects, 1);
    let session: u64 = playing["session"].as_str().unwrap().parse().unwrap();
    let row = admin_game_session(&b, session)
        .await
        .expect("B runs the session");
    assert_eq!(row["transport"], "webtransport", "{row}");
    assert_eq!(row["node"], "b-1", "{row}");
    assert!(
        admin_game_session(&a, session).await.is_none(),
        "A holds none"
    );
    drop(browser);
    node.stop().await.unwrap();
    a.stop().await;
    b.stop().await;
}

/// Guards against moving a healthy session: in a federation, when the node serving the page
/// goes silent, its frames stop while gateway A is alive (A pauses the session and fails it over to
/// another node). The page shows the banner but asks A over HTTP before resuming elsewhere; A
/// answers, so the session stays on A, decodes again there, and B never takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_node_dies_stays_on_its_live_gateway_and_is_not_resumed_elsewhere() {
    a_page_whose_node_dies_stays_on_its_live_gateway("webtransport").await;
}

/// The same over WebRTC: the page's silence rule (no data channel message for
/// `resume_after_ms`) fires while A fails the session over, A answers over HTTP, and the session
/// stays on A's peer connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webrtc_page_whose_node_dies_stays_on_its_live_gateway_and_is_not_resumed_elsewhere() {
    a_page_whose_node_dies_stays_on_its_live_gateway("webrtc").await;
}

async fn a_page_whose_node_dies_stays_on_its_live_gateway(transport: &str) {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("federation.db");
    let here = |c: &mut nearpath_config::GatewayConfig, id: &str| {
        c.federation.gateway_id = Some(id.into());
        // The default heartbeat (500 ms): A takes a silent node as lost after 1.5 s.
        c.nodes.heartbeat_ms = 500;
        c.geo
            .overrides
            .push(place(("127.0.0.1", "FR", 48.85, 2.35)));
    };
    let a = TestGateway::start_at(path.clone(), |c| here(c, "a")).await;
    let b = TestGateway::start_at(path, |c| here(c, "b")).await;
    let arena = |mut cfg: nearpath_config::NodeConfig| {
        cfg.games = vec![GameEntry {
            title: "arena".into(),
            source: GameSource::Builtin {},
        }];
        cfg.capacity.game_sessions = 1;
        cfg
    };
    // The nearer node reaches A through a relay that can go silent (no close: frames just stop).
    let (near, near_path) = node_behind_relay(&a, "de-1", 31, |cfg| {
        cfg.games = vec![GameEntry {
            title: "arena".into(),
            source: GameSource::Builtin {},
        }];
        cfg.capacity.game_sessions = 1;
    })
    .await;
    let mut far = TestNode::start(arena(a.node_config("us-1", &a.token)), ip(US_EAST));
    far.registered().await;
    let http = Http::new();
    eventually("A to list both gateways", Duration::from_secs(10), || {
        let http = &http;
        let url = a.api_url("/v1/gateways");
        async move {
            let (status, body) = http.get(&url, Some(API_KEY)).await;
            let v: Value = serde_json::from_str(&body).ok()?;
            (status == 200 && v["data"].as_array()?.len() == 2).then_some(())
        }
    })
    .await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&a.api_url(&format!(
            "/play?key={API_KEY}&game=arena&width=320&height=180&fps=30&autostart=1&transport={transport}&resume_after_ms=500"
        )))
        .await;
    // The page takes 500 ms without frames as silence, well before A pauses the session for
    // its lost node (3 missed heartbeats of 500 ms). The page knows B: a resume through it would be possible.
    let before = wait_state(
        &page,
        "30 frames decoded through A, with the federation listed",
        Duration::from_secs(30),
        |v| {
            num(v, "decoded") >= 30.0
                && v["gateway"] == "a"
                && v["gateways"] == serde_json::json!(["a", "b"])
        },
    )
    .await;
    let session: u64 = before["session"].as_str().unwrap().parse().unwrap();
    let node = admin_game_session(&a, session).await.expect("A runs it")["node"].clone();
    assert_eq!(node, "de-1", "the nearer node serves first");
    near_path.blackout_forever();
    let killed = Instant::now();
    // A fails the session over to the other node: frames again, from A, on the same session.
    let after = wait_state(
        &page,
        "decoding again after the failover",
        Duration::from_secs(20),
        |v| num(v, "decoded") >= num(&before, "decoded") + 30.0,
    )
    .await;
    let silences = page.eval("window.nearpath.silences || 0").await.unwrap();
    eprintln!(
        "node death in a federation: decoding again {} ms after the kill, silences shown {silences}",
        killed.elapsed().as_millis()
    );
    assert!(
        silences.as_u64().unwrap_or(0) >= 1,
        "the page saw no silence: the test proves nothing ({after})"
    );
    assert_eq!(after["gateway"], "a", "{after}");
    assert_eq!(after["resumes"], 0, "the session was moved: {after}");
    assert_eq!(after["lost"], 0, "A was taken as lost: {after}");
    assert_eq!(after["session"], before["session"]);
    assert!(admin_game_session(&a, session).await.is_some(), "A runs it");
    assert!(admin_game_session(&b, session).await.is_none(), "B took it");
    assert_eq!(
        admin_game_session(&a, session).await.unwrap()["node"],
        "us-1"
    );
    drop(browser);
    far.stop().await.unwrap();
    drop(near);
    a.stop().await;
    b.stop().await;
}
