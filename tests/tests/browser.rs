//! Browser players end to end: headless Chromium opens the gateway's `/play` page, which signals
//! with WHEP, decodes the H.264 track, sends input over the data channel and reports its
//! `getStats()` to the gateway. Plus the WHEP error cases over plain HTTP (no browser needed).
//!
//! The browser tests need `/usr/bin/chromium` (`.ci/run` installs it) and fail with that
//! message when it is missing. They run one at a time (a 2-core machine encodes and decodes
//! 720p60 in software for each).

mod cdp;
mod common;

use cdp::{Browser, Page};
use common::*;
use nearpath_config::{GameEntry, GameSource, NodeConfig};
use serde_json::Value;
use std::time::{Duration, Instant};

/// A bench's setting from the environment, else its default (also when it does not parse).
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Browser tests take the whole machine; they do not run concurrently.
static ONE_BROWSER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn with_arena(mut cfg: NodeConfig) -> NodeConfig {
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    cfg.capacity.game_sessions = 1;
    cfg.encoder.encoder = test_encoder();
    cfg
}

/// The node's encoder for these tests: `NEARPATH_TEST_ENCODER` (`x264`, `openh264`, ...;
/// default `auto`), so that input-to-photon can be compared between encoders (README
/// "Benchmarks").
fn test_encoder() -> nearpath_config::EncoderKind {
    match std::env::var("NEARPATH_TEST_ENCODER") {
        Ok(name) => toml::Value::String(name.clone())
            .try_into()
            .unwrap_or_else(|e| panic!("NEARPATH_TEST_ENCODER={name:?}: {e}")),
        Err(_) => nearpath_config::EncoderKind::Auto,
    }
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// Polls the page's stats until `pred` holds (bounded), returning them.
async fn wait_stats(
    page: &Page,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        if let Some(s) = page.stats().await {
            if pred(&s) {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; page stats: {s}"
            );
        } else {
            let err = page
                .eval("window.nearpath && window.nearpath.lastError")
                .await
                .unwrap_or(Value::Null);
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; no stats yet (page error: {err})"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the admin session list until `pred` holds (bounded).
async fn wait_sessions(
    gw: &TestGateway,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let v = gw.admin_get("/admin/sessions").await;
        let list = v["data"].as_array().cloned().unwrap_or_default();
        if pred(&list) {
            return list;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}; sessions: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until the nodes hold `n` game slots in all: a session's slot is released a
/// moment after the admin view stops listing it.
async fn wait_slots_in_use(gw: &TestGateway, n: u32) {
    let start = Instant::now();
    loop {
        let used: u32 = gw
            .shared
            .directory
            .registry
            .list()
            .iter()
            .map(|e| e.sessions_in_use())
            .sum();
        if used == n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{used} node slots in use, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The centre of the ship (the only yellow in the arena scene) in the frame the page's
/// `<video>` shows now, found by drawing it on a canvas.
async fn ship_on_screen(page: &Page) -> (f64, f64) {
    // Over WebTransport the page draws each frame on its canvas; over WebRTC the video element
    // shows it.
    const FIND_SHIP: &str = r#"(() => {
        const wt = window.nearpath && window.nearpath.transport === "webtransport";
        const v = document.getElementById(wt ? "canvas" : "video");
        const w = wt ? (window.nearpath.stats && window.nearpath.stats.framesDecoded ? v.width : 0) : v.videoWidth;
        const h = wt ? v.height : v.videoHeight;
        if (!w) return null;
        const c = document.createElement("canvas");
        c.width = w; c.height = h;
        const g = c.getContext("2d", { willReadFrequently: true });
        g.drawImage(v, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        let n = 0, sx = 0, sy = 0;
        for (let i = 0; i < d.length; i += 4) {
            if (d[i] > 200 && d[i + 1] > 200 && d[i + 2] < 80) { const p = i / 4; n++; sx += p % c.width; sy += Math.floor(p / c.width); }
        }
        return n ? { x: sx / n, y: sy / n, n } : null;
    })()"#;
    let start = Instant::now();
    loop {
        let v = page.eval(FIND_SHIP).await.expect("reading the video frame");
        if v.is_object() {
            return (num(&v, "x"), num(&v, "y"));
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no ship (yellow pixels) in the video frame"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The player page over WebRTC (`transport=webrtc`: these tests guard the WebRTC path even
/// where the gateway and the browser offer WebTransport).
fn play_url(gw: &TestGateway, w: u32, h: u32, fps: u32) -> String {
    play_url_via(gw, w, h, fps, "webrtc")
}

/// The player page with `transport=` `webtransport`, `webrtc` or `auto`.
fn play_url_via(gw: &TestGateway, w: u32, h: u32, fps: u32, transport: &str) -> String {
    gw.api_url(&format!(
        "/play?key={API_KEY}&game=arena&width={w}&height={h}&fps={fps}&autostart=1&transport={transport}"
    ))
}

fn print_latency(stats: &Value) {
    let l = &stats["inputToPhoton"];
    println!(
        "input-to-photon through Chromium: p50 {:.1} ms, p95 {:.1} ms, min {:.1}, max {:.1} (n={})",
        num(l, "p50"),
        num(l, "p95"),
        num(l, "min"),
        num(l, "max"),
        num(l, "n")
    );
    // In pipeline order; the parts add up to the total (decode is part of receiveToPresent).
    for k in [
        "inputToCapture",
        "encode",
        "nodeToGateway",
        "gatewayToBrowser",
        "nodeToBrowser",
        "receiveToPresent",
        "decode",
        "draw",
        "presentToDisplay",
    ] {
        let v = &stats["breakdown"][k];
        println!(
            "  {k:<18} p50 {:>6.2} ms  p95 {:>6.2} ms",
            num(v, "p50"),
            num(v, "p95")
        );
    }
    println!(
        "  getStats: jitter buffer {:.2} ms/frame (avg {:.2}), decode {:.2} ms/frame (avg {:.2}), rtt {:?} ms, data channel rtt {:?} ms",
        num(stats, "jitterBufferMs"),
        num(stats, "jitterBufferAvgMs"),
        num(stats, "decodeMs"),
        num(stats, "decodeAvgMs"),
        stats.get("rttMs"),
        stats.get("dcRttMs")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_plays_720p60_for_10_seconds_and_keys_move_the_ship() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser.open(&play_url(&gw, 1280, 720, 60)).await;

    let first = wait_stats(
        &page,
        "the first decoded frame",
        Duration::from_secs(30),
        |s| num(s, "framesDecoded") > 0.0,
    )
    .await;
    let sessions = wait_sessions(&gw, "the WebRTC session", Duration::from_secs(5), |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(sessions[0]["transport"], "webrtc");
    assert_eq!(sessions[0]["node"], "de-1");
    // Input-to-photon first by default: the page offers the playout-delay extension (render
    // each frame at once) and the gateway takes it; only `/play?sync=1` leaves it out.
    let sync = page.eval("window.nearpath.syncStats()").await.unwrap();
    assert_eq!(sync["playoutDelayExtension"], true, "{sync}");

    let Played {
        stats: _,
        presses,
        expected,
    } = play_ten_seconds_holding_d(&page, &first, |stats| {
        format!(
            "lost {}, dropped {}, freezes {}",
            stats["packetsLost"], stats["framesDropped"], stats["freezeCount"]
        )
    })
    .await;

    // The gateway shows what the page reported, and what it relayed itself.
    let sessions = wait_sessions(
        &gw,
        "the page's stats in the admin view",
        Duration::from_secs(5),
        |l| {
            l.len() == 1
                && l[0]["client_stats"]["framesDecoded"]
                    .as_f64()
                    .unwrap_or(0.0)
                    > 0.0
        },
    )
    .await;
    let s = &sessions[0];
    println!("gateway side: {}", s["client_stats"]["gateway"]);
    assert!(s["inputs"].as_u64().unwrap() >= u64::from(presses), "{s}");
    assert!(
        s["client_stats"]["gateway"]["frames_sent"]
            .as_u64()
            .unwrap() as f64
            >= 0.9 * expected,
        "{s}"
    );
    assert_eq!(s["client_stats"]["width"], 1280, "{s}");

    // Stop: the page DELETEs its session resource and the node's session ends.
    page.eval("window.nearpath.stop()").await.unwrap();
    wait_sessions(&gw, "the session to end", Duration::from_secs(5), |l| {
        l.is_empty()
    })
    .await;
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Guards failover over WebRTC: the serving node dies, the gateway pauses the session and
/// resumes it on the other node; the page keeps its one peer connection, which decodes the new
/// node's frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_keeps_decoding_on_the_same_connection_when_the_serving_node_dies() {
    let stats = failover_keeps_the_session("webrtc").await;
    assert_eq!(
        num(&stats, "pcCreated"),
        1.0,
        "one peer connection for the whole session: {stats}"
    );
    assert_eq!(stats["state"], "connected", "{stats}");
}

/// A plain HTTP client for the WHEP error cases (the common one forces a JSON content type).
async fn request(
    from: Option<std::net::IpAddr>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    use http_body_util::BodyExt;
    let mut conn = hyper_util::client::legacy::connect::HttpConnector::new();
    conn.set_local_address(from);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(conn);
    let mut b = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("request timed out")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn header<'a>(h: &'a hyper::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .map(|v| v["error"]["code"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Chromium 156's offer for the player page (recvonly video, data channel `input`).
const CHROMIUM_OFFER: &str = include_str!("../browser/chromium-156-offer.sdp");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_answers_errors_cors_trickle_stats_and_delete_over_plain_http() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    const PORTS: (u16, u16) = (47_400, 47_401);
    let gw = TestGateway::start(|c| {
        c.http.cors_allowed_origins = vec!["https://play.example".into()];
        c.game.ice_servers = vec!["stun:stun.example.net:3478".into()];
        c.game.webrtc_public_ip = Some("203.0.113.7".parse().unwrap());
        (c.game.webrtc_udp_port_min, c.game.webrtc_udp_port_max) = PORTS;
    })
    .await;
    gw.store
        .insert_api_key_secret("other-tenant-key", "tenant-b", 1000, 1_000_000)
        .unwrap();
    let whep = gw.api_url("/v1/games/arena/whep?width=320&height=180&fps=30");
    let auth = format!("Bearer {API_KEY}");
    let sdp_headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/sdp"),
    ];
    let post = |url: String, headers: Vec<(&'static str, String)>, body: String| async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(None, "POST", &url, &h, &body).await
    };
    let sdp = |extra: &[(&'static str, &str)]| {
        let mut v: Vec<(&'static str, String)> = sdp_headers
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
        v.extend(extra.iter().map(|(k, x)| (*k, x.to_string())));
        v
    };

    // No node serves the game yet: 404.
    let (status, _, body) = post(whep.clone(), sdp(&[]), CHROMIUM_OFFER.into()).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (404, "game_not_found"),
        "{body}"
    );

    let mut de = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    de.registered().await;
    let mut us = TestNode::start(with_arena(gw.node_config("us-1", &gw.token)), ip(US_EAST));
    us.registered().await;

    // 401: no key, or an unknown one.
    let (status, _, _) = request(
        None,
        "POST",
        &whep,
        &[("content-type", "application/sdp")],
        CHROMIUM_OFFER,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = post(
        whep.clone(),
        vec![
            ("authorization", "Bearer nope".into()),
            ("content-type", "application/sdp".into()),
        ],
        CHROMIUM_OFFER.into(),
    )
    .await;
    assert_eq!(status, 401);
    // 415: not SDP.
    let (status, _, body) = post(
        whep.clone(),
        vec![
            ("authorization", auth.clone()),
            ("content-type", "application/json".into()),
        ],
        "{}".into(),
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (415, "unsupported_media_type"),
        "{body}"
    );
    // 400: not an offer; no H.264 Constrained Baseline; bad parameters.
    let (status, _, body) = post(whep.clone(), sdp(&[]), "v=0 hello".into()).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "bad_sdp"),
        "{body}"
    );
    let no_codec = CHROMIUM_OFFER
        .replace("H264/90000", "H263/90000")
        .replace("AV1/90000", "AV2/90000");
    let (status, _, body) = post(whep.clone(), sdp(&[]), no_codec).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("H.264"), "{body}");
    // 422: an offer whose only sendable codec is AV1, which neither node encodes (no
    // `software_hevc_av1`): the refusal names it, and no session, slot or port is left taken.
    let av1_only = CHROMIUM_OFFER.replace("H264/90000", "H263/90000");
    let (status, h, body) = post(whep.clone(), sdp(&[]), av1_only).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (422, "unsupported_codec"),
        "{body}"
    );
    assert!(
        error_message(&body).contains("no node encodes av1"),
        "{body}"
    );
    assert_eq!(header(&h, "x-should-retry"), "false");
    wait_slots_in_use(&gw, 0).await;
    assert_eq!(
        gw.admin_get("/admin/sessions").await["data"],
        serde_json::json!([])
    );
    let (status, _, body) = post(
        gw.api_url("/v1/games/arena/whep?width=abc"),
        sdp(&[]),
        CHROMIUM_OFFER.into(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("width"), "{body}");
    let (status, _, body) = post(
        gw.api_url("/v1/games/arena/whep?width=17&height=9"),
        sdp(&[]),
        CHROMIUM_OFFER.into(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // 403: a client in North Korea (sanctions), with a reason and no retry.
    let (status, h, body) = request(
        Some(ip(KP_CLIENT)),
        "POST",
        &whep,
        &sdp_headers,
        CHROMIUM_OFFER,
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "geofence"),
        "{body}"
    );
    assert_eq!(header(&h, "x-should-retry"), "false");
    assert!(body.contains("sanctions"), "{body}");
    // 405 on the WHEP endpoint with another method.
    let (status, h, _) = request(None, "GET", &whep, &sdp_headers, "").await;
    assert_eq!(status, 405);
    assert!(header(&h, "allow").contains("POST"));

    // 201: an answer, its session resource, the ICE servers, CORS for an allowed origin.
    let (status, h, answer) = post(
        whep.clone(),
        sdp(&[("origin", "https://play.example")]),
        CHROMIUM_OFFER.into(),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(header(&h, "content-type"), "application/sdp");
    let location = header(&h, "location").to_string();
    assert!(location.starts_with("/v1/sessions/"), "{location}");
    assert_eq!(
        header(&h, "link"),
        "<stun:stun.example.net:3478>; rel=\"ice-server\""
    );
    assert_eq!(
        header(&h, "access-control-allow-origin"),
        "https://play.example"
    );
    let exposed = header(&h, "access-control-expose-headers");
    assert!(
        exposed.contains("Location") && exposed.contains("Link"),
        "{exposed}"
    );
    assert!(
        answer.contains("a=rtpmap:108 H264/90000"),
        "the browser's payload type for 42e01f: {answer}"
    );
    assert!(
        answer.contains("packetization-mode=1;profile-level-id=42e01f"),
        "{answer}"
    );
    assert!(
        answer.contains("goog-remb") && answer.contains("playout-delay"),
        "{answer}"
    );
    assert!(
        answer.contains("m=application") && answer.contains("webrtc-datachannel"),
        "{answer}"
    );
    // Candidates carry the public address and a port of the configured range.
    let candidates: Vec<&str> = answer
        .lines()
        .filter(|l| l.starts_with("a=candidate:"))
        .collect();
    assert!(!candidates.is_empty(), "{answer}");
    // Candidates carry the public address (the loopback one, added because this client is on
    // loopback, stays as it is) and a port of the configured range.
    let mut public = 0;
    for c in &candidates {
        let f: Vec<&str> = c.split_whitespace().collect();
        let addr: std::net::IpAddr = f[4].parse().unwrap();
        if !addr.is_loopback() {
            assert_eq!(f[4], "203.0.113.7", "{c}");
            public += 1;
        }
        let port: u16 = f[5].parse().unwrap();
        assert!((PORTS.0..=PORTS.1).contains(&port), "{c}");
    }
    assert!(
        public > 0,
        "no candidate with the public address: {candidates:?}"
    );
    let sessions = wait_sessions(&gw, "the first session", Duration::from_secs(5), |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(sessions[0]["transport"], "webrtc");
    let session = gw.api_url(&location);

    // A second session takes the other node (and the other port).
    let (status, h2, body) = post(whep.clone(), sdp(&[]), CHROMIUM_OFFER.into()).await;
    assert_eq!(status, 201, "{body}");
    let second = gw.api_url(header(&h2, "location"));
    // A third finds no node with a free slot: 503 with Retry-After.
    let (status, h, body) = post(whep.clone(), sdp(&[]), CHROMIUM_OFFER.into()).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (503, "no_capacity"),
        "{body}"
    );
    assert!(!body.contains("UDP port"), "{body}");
    assert_eq!(header(&h, "retry-after"), "2");
    // The second ends; someone else takes its port before the third asks again: a node is free
    // but no UDP port of the range is (503 too), and the node's session is let go.
    let (status, _, _) = request(
        None,
        "DELETE",
        &second,
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 200);
    wait_sessions(
        &gw,
        "the second session to end",
        Duration::from_secs(5),
        |l| l.len() == 1,
    )
    .await;
    wait_slots_in_use(&gw, 1).await;
    let squatter = {
        let start = Instant::now();
        loop {
            // The session's sockets close as its task ends, just after the admin view drops it.
            if let Some(s) =
                (PORTS.0..=PORTS.1).find_map(|p| std::net::UdpSocket::bind(("0.0.0.0", p)).ok())
            {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the second session's port was not released"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (status, h, body) = post(whep.clone(), sdp(&[]), CHROMIUM_OFFER.into()).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (503, "no_capacity"),
        "{body}"
    );
    assert!(body.contains("UDP port"), "{body}");
    assert_eq!(header(&h, "retry-after"), "2");
    wait_sessions(
        &gw,
        "the refused session to be let go",
        Duration::from_secs(5),
        |l| l.len() == 1,
    )
    .await;
    wait_slots_in_use(&gw, 1).await;
    drop(squatter);
    // The gateway has let the refused session go, but the node frees its slot when the close
    // reaches it, a moment later; until then it refuses with `no_capacity`, which the gateway
    // passes on with Retry-After. Ask again, as a client would, until the node has caught up
    // (regression: this test failed about one run in ten on a loaded machine when it asked once).
    let start = Instant::now();
    let (status, h2, body) = loop {
        let (status, h, body) = post(whep.clone(), sdp(&[]), CHROMIUM_OFFER.into()).await;
        if status != 503
            || error_code(&body) != "no_capacity"
            || start.elapsed() > Duration::from_secs(5)
        {
            break (status, h, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 201, "{body}");
    let second = gw.api_url(header(&h2, "location"));

    // CORS preflights: allowed origin, and one that is not.
    let preflight = [
        ("origin", "https://play.example"),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "authorization, content-type",
        ),
    ];
    let (status, h, _) = request(None, "OPTIONS", &whep, &preflight, "").await;
    assert_eq!(status, 204);
    assert_eq!(
        header(&h, "access-control-allow-origin"),
        "https://play.example"
    );
    assert!(header(&h, "access-control-allow-methods").contains("POST"));
    let allowed = header(&h, "access-control-allow-headers");
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    let (status, h, _) = request(
        None,
        "OPTIONS",
        &session,
        &[
            ("origin", "https://play.example"),
            ("access-control-request-method", "DELETE"),
        ],
        "",
    )
    .await;
    assert_eq!(status, 204);
    let methods = header(&h, "access-control-allow-methods");
    assert!(
        methods.contains("PATCH") && methods.contains("DELETE"),
        "{methods}"
    );
    let (status, h, _) = request(
        None,
        "OPTIONS",
        &whep,
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert_eq!(status, 204);
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");

    // Trickle ICE.
    let ufrag = CHROMIUM_OFFER
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .unwrap()
        .trim();
    let pwd = CHROMIUM_OFFER
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-pwd:"))
        .unwrap()
        .trim();
    let frag = format!("a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\na=candidate:1 1 udp 2122260223 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n");
    let frag_headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/trickle-ice-sdpfrag"),
    ];
    let (status, _, body) = request(None, "PATCH", &session, &frag_headers, &frag).await;
    assert_eq!(status, 204, "{body}");
    let (status, _, _) = request(
        None,
        "PATCH",
        &session,
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/sdp"),
        ],
        &frag,
    )
    .await;
    assert_eq!(status, 415);
    let (status, _, _) = request(
        None,
        "PATCH",
        &session,
        &[
            ("authorization", "Bearer other-tenant-key"),
            ("content-type", "application/trickle-ice-sdpfrag"),
        ],
        &frag,
    )
    .await;
    assert_eq!(
        status, 404,
        "another tenant's session does not exist for it"
    );
    let (status, _, _) = request(
        None,
        "PATCH",
        &gw.api_url("/v1/sessions/999999"),
        &frag_headers,
        &frag,
    )
    .await;
    assert_eq!(status, 404);
    let restart = frag.replace(&format!("a=ice-ufrag:{ufrag}"), "a=ice-ufrag:new1");
    let (status, _, body) = request(None, "PATCH", &session, &frag_headers, &restart).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (422, "ice_restart_unsupported"),
        "{body}"
    );
    let (status, _, _) = request(
        None,
        "PATCH",
        &session,
        &[frag_headers[0], frag_headers[1], ("if-match", "*")],
        &frag,
    )
    .await;
    assert_eq!(status, 422);

    // Stats from the page show up in the admin view, with the gateway's own counters.
    let json_headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, _, _) = request(
        None,
        "POST",
        &format!("{session}/stats"),
        &json_headers,
        r#"{"framesDecoded":5}"#,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _, _) = request(
        None,
        "POST",
        &format!("{session}/stats"),
        &json_headers,
        "[1,2]",
    )
    .await;
    assert_eq!(status, 400);
    let id: u64 = location.rsplit('/').next().unwrap().parse().unwrap();
    let list = wait_sessions(&gw, "the posted stats", Duration::from_secs(5), |l| {
        l.iter()
            .any(|s| s["id"] == id && s["client_stats"]["framesDecoded"] == 5)
    })
    .await;
    let mine = list.iter().find(|s| s["id"] == id).unwrap();
    assert!(
        mine["client_stats"]["gateway"]["frames_sent"].is_u64(),
        "{mine}"
    );

    // DELETE: only the owner; it ends the session on the node.
    let (status, _, _) = request(
        None,
        "DELETE",
        &session,
        &[("authorization", "Bearer other-tenant-key")],
        "",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, _) = request(
        None,
        "DELETE",
        &session,
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = request(
        None,
        "DELETE",
        &second,
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 200);
    wait_sessions(&gw, "both sessions to end", Duration::from_secs(5), |l| {
        l.is_empty()
    })
    .await;
    let (status, _, _) = request(
        None,
        "DELETE",
        &session,
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 404);

    // The player page: no key prefilled outside the demo.
    let (status, h, body) = request(None, "GET", &gw.api_url("/play"), &[], "").await;
    assert_eq!(status, 200);
    assert!(header(&h, "content-type").starts_with("text/html"));
    assert!(
        body.contains("<video") && body.contains("const DEMO_KEY = \"\";"),
        "the page must not carry a key"
    );

    de.stop().await.unwrap();
    us.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_player_page_prefills_the_demo_key() {
    let mut demo = nearpath_gateway_cli::demo::Demo::start(
        nearpath_gateway::Listeners::ephemeral().await.unwrap(),
        None,
    )
    .await
    .unwrap();
    demo.node_registered().await.unwrap();
    let (status, _, body) = request(
        None,
        "GET",
        &format!("http://{}/play", demo.addrs.http),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        body.contains("const DEMO_KEY = \"demo\";"),
        "the demo page prefills the demo key"
    );
    demo.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Benchmark (run on demand):
//   cargo test --release -p nearpath-tests --test browser -- --ignored --nocapture bench_
// (NEARPATH_BENCH_AUDIO=0 runs the sessions without sound, to compare the gateway's CPU.)
// The gateway runs in this process, the edge node in a child process (this test binary started
// again, see `bench_node_process`), Chromium in its own processes, so that this process's CPU
// time is the gateway's (plus an idle DevTools client).

const BENCH_NODE_ENV: &str = "NEARPATH_BENCH_NODE";

/// CPU time (user + system) this process has used so far.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may contain spaces): state is field 3; utime and
    // stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// Not a test: the edge node of `bench_webrtc_gateway_cpu_per_session`, started as a child
/// process with `NEARPATH_BENCH_NODE=quic|sha256|token|sessions`; it serves until stdin closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of bench_webrtc_gateway_cpu_per_session"]
async fn bench_node_process() {
    let Ok(spec) = std::env::var(BENCH_NODE_ENV) else {
        return;
    };
    let f: Vec<&str> = spec.split('|').collect();
    let [quic, sha, token, sessions] = f[..] else {
        panic!("{BENCH_NODE_ENV}={spec}: expected quic|sha256|token|sessions")
    };
    let mut cfg = nearpath_config::NodeConfig {
        node: nearpath_config::NodeIdentity {
            id: "bench-node".into(),
            enrolment_token: Some(token.into()),
        },
        gateway: nearpath_config::NodeGatewayConfig::pinned(quic, sha),
        drain: Default::default(),
        gpus: vec![],
        gpu_classes: nearpath_config::default_gpu_class_table(),
        capacity: nearpath_config::CapacityConfig {
            game_sessions: 1,
            inference_concurrency: 1,
        },
        models: vec![],
        games: vec![],
        encoder: Default::default(),
        media: Default::default(),
        audio: Default::default(),
        quic: Default::default(),
        log: Default::default(),
    };
    cfg = with_arena(cfg);
    cfg.capacity.game_sessions = sessions.parse().unwrap();
    // NEARPATH_BENCH_AUDIO=0: sessions without sound, for the gateway's CPU with and without it.
    cfg.audio.enabled = std::env::var("NEARPATH_BENCH_AUDIO").as_deref() != Ok("0");
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    println!("node registered");
    // Serve until the parent closes stdin (or dies).
    let _ =
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run on demand (see above)"]
async fn bench_webrtc_gateway_cpu_per_session() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let counts: Vec<usize> = std::env::var("NEARPATH_BENCH_SESSIONS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("NEARPATH_BENCH_SESSIONS: comma-separated counts")
        })
        .collect();
    let max = *counts.iter().max().unwrap();
    let gw = TestGateway::start(|_| {}).await;
    let spec = format!(
        "{}|{}|{}|{max}",
        gw.addrs.quic,
        nearpath_protocol::tls::sha256_hex(&gw.sha),
        gw.token
    );
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "bench_node_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(BENCH_NODE_ENV, spec)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the node process");
    gw.wait_nodes(
        "the node process to register",
        Duration::from_secs(30),
        |ids| ids.len() == 1,
    )
    .await;
    let window = Duration::from_secs(10);
    println!("| sessions | frames decoded/s per session | Mbit/s per session | gateway CPU, % of one core | per session | CPU per frame relayed | 720p60 sessions per 2 cores (est.) |");
    println!("|---|---|---|---|---|---|---|");
    for &n in &counts {
        let browser = Browser::launch().await;
        let mut pages = Vec::new();
        for _ in 0..n {
            pages.push(browser.open(&play_url(&gw, 1280, 720, 60)).await);
        }
        for p in &pages {
            wait_stats(p, "decoding", Duration::from_secs(30), |s| {
                num(s, "framesDecoded") > 60.0
            })
            .await;
        }
        // Let the streams settle (first IDRs, bitrate) before measuring.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before: Vec<Value> = futures_util::future::join_all(pages.iter().map(|p| p.stats()))
            .await
            .into_iter()
            .flatten()
            .collect();
        let relayed = || async {
            let v = gw.admin_get("/admin/sessions").await;
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| num(s, "frames"))
                .sum::<f64>()
        };
        let relayed0 = relayed().await;
        let (cpu0, t0) = (process_cpu(), Instant::now());
        tokio::time::sleep(window).await;
        let (cpu1, t1) = (process_cpu(), Instant::now());
        let relayed1 = relayed().await;
        let after: Vec<Value> = futures_util::future::join_all(pages.iter().map(|p| p.stats()))
            .await
            .into_iter()
            .flatten()
            .collect();
        let share = (cpu1 - cpu0).as_secs_f64() / (t1 - t0).as_secs_f64() * 100.0;
        let audio_packets: u64 = gw.admin_get("/admin/sessions").await["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["audio"]["packets"].as_u64().unwrap_or(0))
            .sum();
        println!("(audio packets relayed so far: {audio_packets})");
        let fps: f64 = before
            .iter()
            .zip(&after)
            .map(|(a, b)| {
                (num(b, "framesDecoded") - num(a, "framesDecoded"))
                    / ((num(b, "ts") - num(a, "ts")) / 1000.0)
            })
            .sum::<f64>()
            / n as f64;
        let mbps: f64 =
            after.iter().map(|s| num(s, "bitrateKbps")).sum::<f64>() / n as f64 / 1000.0;
        // CPU per frame the gateway relayed (frames sent, from its own counters), so that a
        // machine too busy encoding and decoding to keep 60 fps does not flatter the figure.
        let frames = relayed1 - relayed0;
        let us_per_frame = (cpu1 - cpu0).as_secs_f64() * 1e6 / frames;
        let per_session_60 = us_per_frame * 60.0 / 1e6 * 100.0;
        println!(
            "| {n} | {fps:.1} | {mbps:.2} | {share:.1} | {:.1} | {us_per_frame:.0} µs | {:.0} |",
            share / n as f64,
            200.0 / per_session_60
        );
        for p in &pages {
            let _ = p.eval("window.nearpath.stop()").await;
        }
        wait_sessions(&gw, "the sessions to end", Duration::from_secs(10), |l| {
            l.is_empty()
        })
        .await;
        drop(browser);
    }
    drop(child.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    gw.stop().await;
}

/// A browser that vanishes without a DELETE (killed) is noticed through ICE: its session ends
/// and the node's slot is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_browser_ends_its_session_within_15_seconds() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser.open(&play_url(&gw, 640, 360, 30)).await;
    wait_stats(&page, "decoding", Duration::from_secs(30), |s| {
        num(s, "framesDecoded") > 10.0
    })
    .await;
    drop(page);
    drop(browser);
    let killed = Instant::now();
    wait_sessions(&gw, "the session to end", Duration::from_secs(15), |l| {
        l.is_empty()
    })
    .await;
    println!(
        "the session ended {:?} after the browser was killed",
        killed.elapsed()
    );
    wait_slots_in_use(&gw, 0).await;
    node.stop().await.unwrap();
    gw.stop().await;
}

/// A player who closes the tab or whose browser dies is gone within
/// `game.player_idle_timeout_ms` (2.5 s): the page pings on its `input` channel every second and
/// the gateway ends the session when the pings stop (or at once when the peer connection
/// closes), instead of waiting for ICE to report the connection disconnected (~5 s) and a grace
/// period after that (5 s more before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_tab_or_killed_browser_ends_its_session_within_the_idle_timeout() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let idle = Duration::from_millis(gw.shared.config.game.player_idle_timeout_ms);
    // Slack for a loaded 2-core machine decoding video in software.
    let margin = Duration::from_millis(1500);
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;

    let page = browser.open(&play_url(&gw, 640, 360, 30)).await;
    // Decoding, and pinging: a pong came back.
    let playing = |s: &Value| {
        num(s, "framesDecoded") > 10.0 && s.get("dcRttMs").is_some_and(|v| v.is_number())
    };
    wait_stats(
        &page,
        "decoding and pinging",
        Duration::from_secs(30),
        playing,
    )
    .await;
    let _ = page.call("Page.close", serde_json::json!({})).await;
    let closed = Instant::now();
    wait_sessions(&gw, "the closed tab's session to end", idle + margin, |l| {
        l.is_empty()
    })
    .await;
    println!(
        "the session ended {:?} after its tab was closed",
        closed.elapsed()
    );
    wait_slots_in_use(&gw, 0).await;

    let page = browser.open(&play_url(&gw, 640, 360, 30)).await;
    wait_stats(
        &page,
        "decoding and pinging",
        Duration::from_secs(30),
        playing,
    )
    .await;
    drop(page);
    drop(browser);
    let killed = Instant::now();
    wait_sessions(
        &gw,
        "the killed browser's session to end",
        idle + margin,
        |l| l.is_empty(),
    )
    .await;
    println!(
        "the session ended {:?} after the browser was killed",
        killed.elapsed()
    );
    wait_slots_in_use(&gw, 0).await;
    node.stop().await.unwrap();
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The player page's polish: the reason of a refusal, an unknown game refused, stats posting that
// stops with the session, controls help, favicon, stats overlay out of the game's HUD.

/// Polls `expr` in the page until `pred` holds (bounded), returning its value.
async fn wait_eval(page: &Page, expr: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_eval_for(page, expr, what, Duration::from_secs(30), pred).await
}

/// [`wait_eval`] with its own bound.
async fn wait_eval_for(
    page: &Page,
    expr: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let v = page.eval(expr).await.unwrap_or(Value::Null);
        if pred(&v) {
            return v;
        }
        if start.elapsed() >= timeout {
            let page_state = page
                .eval("JSON.stringify([document.location.href, document.getElementById('message') && document.getElementById('message').textContent, window.nearpath && window.nearpath.lastError])")
                .await;
            panic!("timed out waiting for {what}; {expr} = {v}; page: {page_state:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .map(|v| v["error"]["message"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_player_page_icon_and_refusals_it_shows_over_plain_http() {
    let gw = TestGateway::start(|_| {}).await;
    let mut de = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    de.registered().await;
    let auth = format!("Bearer {API_KEY}");

    // A wrong key: 401 with a reason, for the game list and for an offer alike.
    let (status, _, body) = request(
        None,
        "GET",
        &gw.api_url("/v1/games"),
        &[("authorization", "Bearer wrong-key")],
        "",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(!error_message(&body).is_empty(), "{body}");
    let (status, _, body) = request(
        None,
        "POST",
        &gw.api_url("/v1/games/arena/whep"),
        &[
            ("authorization", "Bearer wrong-key"),
            ("content-type", "application/sdp"),
        ],
        CHROMIUM_OFFER,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(!error_message(&body).is_empty(), "{body}");

    // An offer for a game no node serves, while one serves another: 404 naming it, and no
    // session of any game.
    let (status, h, body) = request(
        None,
        "POST",
        &gw.api_url("/v1/games/nosuch/whep"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/sdp"),
        ],
        CHROMIUM_OFFER,
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (404, "game_not_found"),
        "{body}"
    );
    assert!(error_message(&body).contains("nosuch"), "{body}");
    assert_eq!(header(&h, "x-should-retry"), "false");
    assert!(gw.admin_get("/admin/sessions").await["data"]
        .as_array()
        .unwrap()
        .is_empty());

    // Stats for a session that ended: 404 with a reason (the page stops at the first).
    let (status, h, body) = request(
        None,
        "POST",
        &gw.api_url("/v1/games/arena/whep?width=320&height=180&fps=30"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/sdp"),
        ],
        CHROMIUM_OFFER,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let session = gw.api_url(header(&h, "location"));
    let (status, _, _) = request(
        None,
        "DELETE",
        &session,
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 200);
    wait_sessions(&gw, "the session to end", Duration::from_secs(5), |l| {
        l.is_empty()
    })
    .await;
    let json_headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, _, body) = request(
        None,
        "POST",
        &format!("{session}/stats"),
        &json_headers,
        r#"{"framesDecoded":5}"#,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(!error_message(&body).is_empty(), "{body}");

    // The page: an inline icon, the controls help, the stats overlay collapsed at the bottom.
    let (status, _, page) = request(None, "GET", &gw.api_url("/play"), &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains(r#"<link rel="icon" href="data:image/svg+xml,"#));
    assert!(page.contains(r#"<div id="help" class="hidden""#));
    assert!(page.contains(r#"<div id="stats" class="collapsed""#));
    // And the icon browsers ask for on any page of the gateway.
    for method in ["GET", "HEAD"] {
        let (status, h, body) = request(None, method, &gw.api_url("/favicon.ico"), &[], "").await;
        assert_eq!(status, 200, "{method}");
        assert_eq!(header(&h, "content-type"), "image/svg+xml");
        if method == "GET" {
            assert!(body.starts_with("<svg"), "{body}");
        }
    }
    let (status, _, _) = request(None, "POST", &gw.api_url("/favicon.ico"), &[], "").await;
    assert_eq!(status, 405);

    de.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_player_page_says_why_it_cannot_play_and_stops_posting_stats_when_the_session_ends() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;

    // A wrong key: Play shows the gateway's 401 reason, not a prompt to enter a key.
    let (_, _, body) = request(
        None,
        "GET",
        &gw.api_url("/v1/games"),
        &[("authorization", "Bearer wrong-key")],
        "",
    )
    .await;
    let reason = error_message(&body);
    let page = browser.open(&gw.api_url("/play?key=wrong-key")).await;
    wait_eval(
        &page,
        "window.nearpath.gamesError",
        "the games' error",
        |v| v.is_string(),
    )
    .await;
    page.eval("document.getElementById('play').click()")
        .await
        .unwrap();
    let shown = wait_eval(
        &page,
        "window.nearpath.lastError",
        "the page's error",
        Value::is_string,
    )
    .await;
    assert_eq!(shown, Value::String(reason.clone()));
    let text = page
        .eval("document.getElementById('message').textContent")
        .await
        .unwrap();
    assert_eq!(text, Value::String(reason));
    assert_eq!(page.eval("window.nearpath.pcCreated").await.unwrap(), 0);

    // The help overlay: `h` shows it and hides it again.
    let hidden = "document.getElementById('help').classList.contains('hidden')";
    assert_eq!(page.eval(hidden).await.unwrap(), true);
    page.key(72, "h", "KeyH", true).await.unwrap();
    page.key(72, "h", "KeyH", false).await.unwrap();
    assert_eq!(page.eval(hidden).await.unwrap(), false);
    page.key(72, "h", "KeyH", true).await.unwrap();
    page.key(72, "h", "KeyH", false).await.unwrap();
    assert_eq!(page.eval(hidden).await.unwrap(), true);
    drop(page);

    // An unknown game is refused by name, with what the gateway offers; nothing is played.
    let page = browser
        .open(&gw.api_url(&format!("/play?key={API_KEY}&game=nosuch&autostart=1")))
        .await;
    let shown = wait_eval(
        &page,
        "window.nearpath.lastError",
        "the unknown game's error",
        Value::is_string,
    )
    .await;
    assert_eq!(
        shown, "unknown game \"nosuch\": this gateway offers arena",
        "{shown}"
    );
    assert_eq!(page.eval("window.nearpath.pcCreated").await.unwrap(), 0);
    assert!(gw.admin_get("/admin/sessions").await["data"]
        .as_array()
        .unwrap()
        .is_empty());
    drop(page);

    // Stats are posted while the session lives and no more once it ended.
    let page = browser.open(&play_url(&gw, 640, 360, 30)).await;
    wait_stats(&page, "decoding", Duration::from_secs(30), |s| {
        num(s, "framesDecoded") > 5.0
    })
    .await;
    let id = page.eval("window.nearpath.session").await.unwrap();
    let id = id.as_str().expect("the session id").to_string();
    let (status, _, _) = request(
        None,
        "DELETE",
        &gw.api_url(&format!("/v1/sessions/{id}")),
        &[("authorization", &format!("Bearer {API_KEY}"))],
        "",
    )
    .await;
    assert_eq!(status, 200);
    wait_stats(&page, "the session's end", Duration::from_secs(10), |s| {
        s["ended"].is_string()
    })
    .await;
    let posts = page.eval("window.nearpath.statsPosts").await.unwrap();
    assert!(posts.as_u64().unwrap() > 0);
    let ticks = page.eval("window.nearpath.statsTicks").await.unwrap();
    let later = ticks.as_u64().unwrap() + 3;
    wait_eval(
        &page,
        "window.nearpath.statsTicks",
        "three more stats samples",
        |v| v.as_u64().is_some_and(|n| n >= later),
    )
    .await;
    assert_eq!(
        page.eval("window.nearpath.statsPosts").await.unwrap(),
        posts,
        "stats were posted after the session ended"
    );
    drop(page);
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// The page's decoded picture size (`videoWidth`, `videoHeight`), its decoded frame count and
/// the size its stage asked for last.
const VIDEO_SIZE: &str = "(async () => { const wt = window.nearpath.transport === 'webtransport'; const v = document.getElementById(wt ? 'canvas' : 'video'); const n = await window.nearpath.framesDecoded(); return { transport: window.nearpath.transport, w: wt ? v.width : v.videoWidth, h: wt ? v.height : v.videoHeight, decoded: n, fit: window.nearpath.fitNow, changes: window.nearpath.videoChanges, refused: window.nearpath.videoRefused }; })()";

/// Over both transports (the video element's size over WebRTC, the canvas's over WebTransport).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_its_window_size_mid_session_and_keeps_decoding() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    for transport in ["webrtc", "webtransport"] {
        follows_window_size(transport).await;
    }
}

async fn follows_window_size(transport: &str) {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    // Small sizes and 30 fps keep the software encoder and decoder light on a 2-core machine.
    let resize = |w: u32, h: u32| serde_json::json!({"width": w, "height": h, "deviceScaleFactor": 1, "mobile": false});
    let page = browser
        .open(&gw.api_url(&format!(
            "/play?key={API_KEY}&game=arena&width=320&height=180&fps=30&autostart=1&fit=1&transport={transport}"
        )))
        .await;
    page.call("Emulation.setDeviceMetricsOverride", resize(480, 320))
        .await
        .unwrap();
    // The page asks for its stage's size (the window less the header's 3rem), even.
    let first = wait_eval(&page, VIDEO_SIZE, "the video at the stage's size", |v| {
        v["fit"].is_object()
            && v["w"] == v["fit"]["width"]
            && v["h"] == v["fit"]["height"]
            && v["decoded"].as_u64().is_some_and(|n| n > 0)
    })
    .await;
    // The stage is the window's width, less a scrollbar when the header wraps.
    let w0 = first["fit"]["width"].as_u64().unwrap();
    assert!((440..=480).contains(&w0), "{first}");
    assert_eq!(first["transport"], transport, "{first}");
    let sessions =
        wait_sessions(&gw, "the session", Duration::from_secs(5), |l| l.len() == 1).await;
    let id = sessions[0]["id"].clone();
    // A bigger window: the picture follows, in the same session, and frames keep decoding.
    page.call("Emulation.setDeviceMetricsOverride", resize(640, 400))
        .await
        .unwrap();
    let second = wait_eval(&page, VIDEO_SIZE, "the video at the new size", |v| {
        v["fit"]["width"].as_u64().is_some_and(|w| w > 600)
            && v["w"] == v["fit"]["width"]
            && v["h"] == v["fit"]["height"]
    })
    .await;
    let decoded = second["decoded"].as_u64().unwrap();
    wait_eval(&page, VIDEO_SIZE, "frames decoded after the change", |v| {
        v["decoded"].as_u64().is_some_and(|n| n >= decoded + 30) && v["w"] == second["w"]
    })
    .await;
    let stats = wait_stats(
        &page,
        "stats at the new size",
        Duration::from_secs(10),
        |s| s["width"] == second["w"],
    )
    .await;
    println!(
        "{transport}: resized {w0} -> {} x {}, {} changes confirmed, refused: {}; stats {}x{}",
        second["w"],
        second["h"],
        second["changes"],
        second["refused"],
        stats["width"],
        stats["height"]
    );
    let now = wait_sessions(&gw, "the same session", Duration::from_secs(5), |l| {
        l.len() == 1
    })
    .await;
    assert!(id.is_u64(), "{sessions:?}");
    assert_eq!(now[0]["id"], id, "the change needed no new session");
    drop(page);
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Over both transports (`Error{video_refused}` and `Rumble` on the WebTransport session stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_hears_refused_video_changes_and_the_games_rumble() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    for transport in ["webrtc", "webtransport"] {
        hears_refusals_and_rumble(transport).await;
    }
}

async fn hears_refusals_and_rumble(transport: &str) {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&play_url_via(&gw, 320, 180, 60, transport))
        .await;
    wait_stats(
        &page,
        "the first decoded frame",
        Duration::from_secs(30),
        |s| num(s, "framesDecoded") > 0.0,
    )
    .await;
    // Hostile sizes are refused with the reason, and the session goes on.
    page.eval(r#"window.nearpath.send({t: "video", width: 0, height: 0, fps: 30})"#)
        .await
        .unwrap();
    let why = wait_eval(&page, "window.nearpath.videoRefused", "the refusal", |v| {
        v.is_string()
    })
    .await;
    assert!(why.as_str().unwrap().contains("at least 16x16"), "{why}");
    assert_eq!(
        page.eval("window.nearpath.transport").await.unwrap(),
        transport
    );
    // The ship onto the outer asteroid's orbit (0.42 x 180 px right of the centre): the next
    // pass hits it, and the node's rumble reaches the page.
    page.eval(r#"window.nearpath.input({t: "mouse", dx: 76, dy: 0})"#)
        .await
        .unwrap();
    let r = wait_eval(&page, "window.nearpath.lastRumble", "a rumble", |v| {
        v.is_object()
    })
    .await;
    let (strong, weak, ms) = nearpath_edge_node::game::HIT_RUMBLE;
    assert_eq!(
        r,
        serde_json::json!({"t": "rumble", "pad": 0, "strong": strong, "weak": weak, "duration_ms": ms})
    );
    let decoded = page.eval("window.nearpath.framesDecoded()").await.unwrap();
    wait_eval(
        &page,
        "window.nearpath.framesDecoded()",
        "frames after",
        |v| v.as_u64() > decoded.as_u64(),
    )
    .await;
    drop(page);
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Sound: the Opus track in the same peer connection, and A/V sync measured in the page.

/// How late the beep may be heard after its flash is shown, median, in ms, with `/play?sync=1`
/// (what the issue asks: 40). In that mode the page leaves the playout-delay extension out of
/// its offer and holds the video in its jitter buffer as long as the sound's own pipeline takes
/// (the audio jitter buffer's delay, ~32 ms, plus 38 ms for the 10 ms Opus packet and the audio
/// output), and Chromium's lip sync works from the gateway's capture-clock sender reports.
/// Measured here: medians of 18 to 28 ms (4 runs). Without `sync=1` (the default: the picture
/// is rendered as soon as it is decoded, input-to-photon first) the sound trails by 50 to 61 ms.
const AV_OFFSET_BOUND_MS: f64 = 40.0;

/// Guards the browser audio path and A/V sync: Chromium receives and decodes the game's Opus
/// track (`inbound-rtp` audio: samples grow, under 5% concealed), and the offset between the
/// beep it hears and the flash it shows (the built-in game makes both at the same instant of
/// its timeline, every 2 s) stays within [`AV_OFFSET_BOUND_MS`] either way, median of five
/// beeps, in the page's sync mode (`/play?sync=1`); both tracks are in one MediaStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_plays_the_games_sound_in_sync_with_the_picture() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&format!("{}&sync=1", play_url(&gw, 640, 360, 30)))
        .await;
    wait_stats(
        &page,
        "the first decoded frame",
        Duration::from_secs(30),
        |s| num(s, "framesDecoded") > 0.0,
    )
    .await;
    let first = wait_eval(
        &page,
        "window.nearpath.audioStats()",
        "audio samples received",
        |a| num(a, "totalSamplesReceived") > 0.0,
    )
    .await;
    // Five beeps' worth (2 s apart) of sound and picture.
    let av = wait_eval(
        &page,
        "(() => { const a = window.nearpath.av; return { beeps: a.beeps.length, flashes: a.flashes.length, offsets: a.offsets, ctx: a.contextLatencyMs, videoJb: window.nearpath.stats && window.nearpath.stats.jitterBufferMs, hold: a.videoHoldMs }; })()",
        "five beep/flash pairs",
        |v| v["offsets"].as_array().is_some_and(|o| o.len() >= 5),
    )
    .await;
    let audio = page.eval("window.nearpath.audioStats()").await.unwrap();
    // What Chromium knows: both tracks in one stream (it lip-syncs only those), and in sync
    // mode no playout-delay extension negotiated (it would render video at once).
    let sync = page.eval("window.nearpath.syncStats()").await.unwrap();
    println!("sync: {sync}");
    let msid: Vec<&str> = sync["msid"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str()?.strip_prefix("a=msid:")?.split(' ').next())
        .collect();
    assert!(
        msid.len() == 2 && msid[0] == msid[1],
        "audio and video in one stream: {sync}"
    );
    assert_eq!(sync["playoutDelayExtension"], false, "{sync}");
    let samples = num(&audio, "totalSamplesReceived");
    let concealed = num(&audio, "concealedSamples");
    let mut offsets: Vec<f64> = av["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    offsets.sort_by(f64::total_cmp);
    let median = offsets[offsets.len() / 2];
    let jb_ms = num(&audio, "jitterBufferDelay") / num(&audio, "jitterBufferEmittedCount").max(1.0)
        * 1000.0;
    println!(
        "audio: {samples} samples ({:.1}% concealed), {} packets, jitter buffer {jb_ms:.1} ms; beep - flash offsets {offsets:?} ms, median {median:.1} ms ({} beeps, {} flashes; audio context latency {}, video jitter buffer {} ms, video hold {} ms)",
        concealed / samples * 100.0,
        num(&audio, "packetsReceived"),
        av["beeps"],
        av["flashes"],
        av["ctx"],
        av["videoJb"],
        av["hold"]
    );
    assert!(
        samples > num(&first, "totalSamplesReceived") + 48_000.0 * 4.0,
        "samples grew by at least 4 s of sound: {audio}"
    );
    assert!(
        concealed < 0.05 * samples,
        "{concealed} of {samples} samples concealed"
    );
    assert!(
        (-AV_OFFSET_BOUND_MS..=AV_OFFSET_BOUND_MS).contains(&median),
        "beep/flash offset median {median} ms: {offsets:?}"
    );
    let sessions = gw.admin_get("/admin/sessions").await;
    assert!(
        sessions["data"][0]["audio"]["packets"].as_u64().unwrap() > 400,
        "{sessions}"
    );
    page.eval("window.nearpath.stop()").await.unwrap();
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// One WebRTC A/V measurement: the beep - flash offsets (ms, sorted) of the pairs after
/// `warm_up` pairs, their median, the page's input-to-photon stats, its audio stats and what
/// Chromium says about sync.
struct AvRun {
    offsets: Vec<f64>,
    median: f64,
    stats: Value,
    audio: Value,
    sync: Value,
}

/// Plays `/play` over WebRTC with `extra` query parameters (`&sync=1`, `&sync=0` or none) until
/// `pairs` beep/flash pairs after `warm_up` have been measured, tapping A and D (every 100 ms,
/// so that input-to-photon is measured too; left and right, so the ship stays clear of the
/// flash's quarter), and returns them.
async fn av_run_webrtc(
    gw: &TestGateway,
    browser: &Browser,
    (w, h, fps): (u32, u32, u32),
    extra: &str,
    warm_up: usize,
    pairs: usize,
) -> AvRun {
    let page = browser
        .open(&format!("{}{extra}", play_url(gw, w, h, fps)))
        .await;
    wait_stats(
        &page,
        "the first decoded frame",
        Duration::from_secs(30),
        |s| num(s, "framesDecoded") > 0.0,
    )
    .await;
    const OFFSETS: &str = "window.nearpath.av.offsets";
    let t0 = Instant::now();
    let mut presses = 0u32;
    let offsets = loop {
        let all = page.eval(OFFSETS).await.unwrap_or(Value::Null);
        let all: Vec<f64> = all
            .as_array()
            .map(|o| o.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        if all.len() >= warm_up + pairs {
            break all[warm_up..].to_vec();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30 + 3 * (warm_up + pairs) as u64),
            "{} beep/flash pairs after {warm_up} ({extra}): only {all:?}; av: {:?}",
            pairs,
            page.eval("JSON.stringify(window.nearpath.av)").await
        );
        let (code, key, name) = if presses % 4 < 2 {
            (68, "d", "KeyD")
        } else {
            (65, "a", "KeyA")
        };
        page.key(code, key, name, presses.is_multiple_of(2))
            .await
            .unwrap();
        presses += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if presses % 2 == 1 {
        let (code, key, name) = if presses % 4 < 2 {
            (68, "d", "KeyD")
        } else {
            (65, "a", "KeyA")
        };
        page.key(code, key, name, false).await.unwrap();
    }
    let stats = wait_stats(
        &page,
        "the last inputs applied",
        Duration::from_secs(5),
        |s| num(s, "inputSeqApplied") >= num(s, "inputsSent"),
    )
    .await;
    let audio = page.eval("window.nearpath.audioStats()").await.unwrap();
    let sync = page.eval("window.nearpath.syncStats()").await.unwrap();
    let mut offsets = offsets;
    offsets.sort_by(f64::total_cmp);
    let median = offsets[offsets.len() / 2];
    page.eval("window.nearpath.stop()").await.unwrap();
    wait_sessions(gw, "the session to end", Duration::from_secs(5), |l| {
        l.is_empty()
    })
    .await;
    wait_slots_in_use(gw, 0).await;
    page.call("Page.close", serde_json::json!({})).await.ok();
    AvRun {
        offsets,
        median,
        stats,
        audio,
        sync,
    }
}

/// Issue 15: lip sync over WebRTC by default, with the picture still rendered the moment it is
/// decoded. The default page plays the audio track through its own AudioContext at
/// `latencyHint: 0` instead of the video element's audio output, which took about 30 ms more;
/// the beep it hears and the flash it shows stay within [`AV_OFFSET_BOUND_MS`] (median of five
/// pairs after two of warm-up). Before (the sound through the video element, what `sync=0`
/// still does) the medians were 50 to 61 ms, so this fails on that default. The playout-delay
/// extension stays negotiated (nothing holds the picture) and input-to-photon is measured and
/// printed. The offset follows Chromium's audio jitter buffer (about its delay minus 3 ms
/// here): 36.1 ms with it at 39 ms; on a loaded machine (load average 6 to 8) it grew to 73
/// and 94 ms and the offset to 65 and 166 ms, so this test wants a machine that is not busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_plays_the_beep_with_its_flash_by_default_without_holding_the_picture() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let run = av_run_webrtc(&gw, &browser, (640, 360, 30), "", 2, 5).await;
    let l = &run.stats["inputToPhoton"];
    println!(
        "default WebRTC A/V: beep - flash offsets {:?} ms, median {:.1} ms; input-to-photon p50 {:.1} ms p95 {:.1} (n={}); sound {}; sync {}",
        run.offsets,
        run.median,
        num(l, "p50"),
        num(l, "p95"),
        num(l, "n"),
        run.audio,
        run.sync
    );
    // The sound through the page's low-latency context, the video element silent, the
    // picture not held (the playout-delay extension: render at once).
    assert_eq!(run.audio["soundPath"], "audiocontext", "{}", run.audio);
    assert_eq!(run.sync["playoutDelayExtension"], true, "{}", run.sync);
    assert!(
        (-AV_OFFSET_BOUND_MS..=AV_OFFSET_BOUND_MS).contains(&run.median),
        "beep/flash offset median {} ms: {:?}",
        run.median,
        run.offsets
    );
    assert!(
        num(l, "n") >= 10.0 && num(l, "p50") > 0.0,
        "input-to-photon reported: {}",
        run.stats
    );
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Guards the mute toggle with the default WebRTC sound path: the video element stays silent
/// (its volume 0: it only feeds the track to Web Audio), and Sound on/off sets the page's own
/// gain, while the beep detector keeps hearing the track either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mute_toggle_drives_the_default_webrtc_sound_path() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser.open(&play_url(&gw, 640, 360, 30)).await;
    const SOUND: &str = "(async () => { const a = await window.nearpath.audioStats(); const v = document.getElementById('video'); return { path: a && a.soundPath, gain: a && a.gain, volume: v.volume, muted: v.muted, button: document.getElementById('mute').textContent, beeps: window.nearpath.av.beeps.length }; })()";
    let off = wait_eval(&page, SOUND, "the sound path set up", |v| {
        v["path"] == "audiocontext"
    })
    .await;
    assert_eq!(
        (
            num(&off, "gain"),
            num(&off, "volume"),
            off["button"].as_str()
        ),
        (0.0, 0.0, Some("Sound: off")),
        "{off}"
    );
    page.eval("document.getElementById('mute').click()")
        .await
        .unwrap();
    let on = page.eval(SOUND).await.unwrap();
    assert_eq!(
        (num(&on, "gain"), num(&on, "volume"), on["button"].as_str()),
        (1.0, 0.0, Some("Sound: on")),
        "{on}"
    );
    page.eval("window.nearpath.setMuted(true)").await.unwrap();
    let beeps = num(&page.eval(SOUND).await.unwrap(), "beeps");
    let muted = wait_eval(&page, SOUND, "a beep heard while muted", |v| {
        num(v, "beeps") > beeps
    })
    .await;
    assert_eq!(num(&muted, "gain"), 0.0, "{muted}");
    page.eval("window.nearpath.stop()").await.unwrap();
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// A/V sync against input-to-photon over WebRTC, the three page modes in one sitting (README,
/// "sound: added latency and A/V sync"): the default (sound through a low-latency
/// AudioContext, picture at once), `sync=1` (picture held for the sound) and `sync=0` (picture
/// at once, sound through the video element, the default before). `NEARPATH_AV_ROUNDS` rounds
/// (default 4), modes alternating; prints per run the median beep - flash offset of five pairs
/// after two and input-to-photon p50, then the median and range per mode.
/// `cargo test -p nearpath-tests --test browser bench_av_sync_webrtc_modes -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand"]
async fn bench_av_sync_webrtc_modes() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let rounds: usize = env_or("NEARPATH_AV_ROUNDS", 4);
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let modes = [
        ("default", ""),
        ("sync=1", "&sync=1"),
        ("sync=0", "&sync=0"),
    ];
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); modes.len()];
    for round in 1..=rounds {
        for (i, (name, extra)) in modes.iter().enumerate() {
            let run = av_run_webrtc(&gw, &browser, (1280, 720, 60), extra, 2, 5).await;
            let l = &run.stats["inputToPhoton"];
            println!(
                "round {round} {name:<8} beep - flash median {:6.1} ms {:?} | input-to-photon p50 {:6.1} ms p95 {:6.1} (n={}) | video hold {}",
                run.median,
                run.offsets,
                num(l, "p50"),
                num(l, "p95"),
                num(l, "n"),
                run.audio["videoHoldMs"]
            );
            results[i].0.push(run.median);
            results[i].1.push(num(l, "p50"));
        }
    }
    let summary = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        format!(
            "{:.1} [{:.1} .. {:.1}]",
            s[s.len() / 2],
            s[0],
            s[s.len() - 1]
        )
    };
    println!("--- WebRTC A/V sync, 1280x720@60, {rounds} runs per mode: median [min .. max] ---");
    for ((name, _), (offsets, i2p)) in modes.iter().zip(&results) {
        println!(
            "{name:<8} beep - flash {} ms | input-to-photon p50 {} ms",
            summary(offsets),
            summary(i2p)
        );
    }
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Issue 17: A/V sync over WebTransport (was untested), with no cost to the picture. The page
/// schedules each decoded Opus packet to be heard as long after its capture as the pictures are
/// shown after theirs (the median of the last 60), so the beep it hears and the flash it shows
/// stay within [`AV_OFFSET_BOUND_MS`], median of five beeps, while the video is drawn the moment
/// it is decoded (nothing holds it, unlike WebRTC's `sync=1`). Measured on a quiet machine:
/// medians of 8 to 34 ms (11 runs); with `avsync=0` (the sound scheduled by its own arrival, as
/// before) 86 to 157 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_plays_the_beep_with_its_flash_without_holding_the_picture() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&play_url_via(&gw, 640, 360, 30, "webtransport"))
        .await;
    wait_playing(&page).await;
    page.eval("window.nearpath.setMuted(false)").await.unwrap();
    // The sound follows the picture once the page knows the picture's delay (the first
    // re-aim); the pairs measured are those after it, the steady state a player hears.
    wait_eval(
        &page,
        "window.nearpath.audioStats()",
        "the sound aimed at the picture's delay",
        |a| num(a, "resyncs") >= 1.0,
    )
    .await;
    const AV_PAIRS: &str = "(() => { const a = window.nearpath.av; return { beeps: a.beeps.length, flashes: a.flashes.length, offsets: a.offsets }; })()";
    let before = page.eval(AV_PAIRS).await.unwrap()["offsets"]
        .as_array()
        .map_or(0, Vec::len);
    let av = wait_eval(&page, AV_PAIRS, "five more beep/flash pairs", |v| {
        v["offsets"]
            .as_array()
            .is_some_and(|o| o.len() >= before + 5)
    })
    .await;
    let audio = page.eval("window.nearpath.audioStats()").await.unwrap();
    let stats = wait_stats(&page, "a stats sample", Duration::from_secs(5), |s| {
        s["transport"] == "webtransport"
    })
    .await;
    let mut offsets: Vec<f64> = av["offsets"].as_array().unwrap()[before..]
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    offsets.sort_by(f64::total_cmp);
    let median = offsets[offsets.len() / 2];
    println!(
        "WebTransport A/V: beep - flash offsets {offsets:?} ms, median {median:.1} ms ({} beeps, {} flashes); sound {audio}; picture decode {} ms",
        av["beeps"], av["flashes"], stats["decodeMs"]
    );
    assert!(
        num(&audio, "pictureLagMs") > 0.0,
        "the sound follows the picture's delay: {audio}"
    );
    assert!(
        (-AV_OFFSET_BOUND_MS..=AV_OFFSET_BOUND_MS).contains(&median),
        "beep/flash offset median {median} ms: {offsets:?}"
    );
    // Loopback loses nothing; following the picture must not starve the sound.
    assert!(
        num(&audio, "underruns") <= 3.0,
        "the sound ran dry {} times: {audio}",
        audio["underruns"]
    );
    page.eval("window.nearpath.stop()").await.unwrap();
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Reads the page's video codec and frames decoded.
const VIDEO_CODEC: &str = "(async () => { const np = window.nearpath; const n = await np.framesDecoded(); return { mime: np.videoMime || null, decoded: n, codecs: np.videoCodecs || null, error: np.lastError || null }; })()";

/// Issue 15: AV1 to a browser that negotiates it. The page offers AV1 alone (`codec=av1`), the
/// gateway picks the node that encodes it (libaom on the CPU here), packetises its temporal
/// units with the AV1 payloader, and Chromium decodes them (dav1d).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_decodes_av1_from_a_node_that_encodes_it() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let node = av1_hevc_node(&gw).await;
    // A second node that encodes H.264 only: it must not take the AV1 session, neither at
    // the start nor when the AV1 node dies.
    let mut h264_only = with_arena(gw.node_config("us-1", &gw.token));
    h264_only.encoder.encoder = nearpath_config::EncoderKind::Openh264;
    let mut other = TestNode::start(h264_only, ip(US_EAST));
    other.registered().await;
    let browser = Browser::launch().await;
    // 320x180 at 30 fps: libaom's real-time mode keeps up on a 2-core machine.
    let page = browser
        .open(&gw.api_url(&format!(
            "/play?key={API_KEY}&game=arena&width=320&height=180&fps=30&autostart=1&codec=av1&transport=webrtc"
        )))
        .await;
    let first = wait_eval(&page, VIDEO_CODEC, "AV1 frames decoded", |v| {
        v["mime"] == "video/AV1" && v["decoded"].as_u64().is_some_and(|n| n > 0)
    })
    .await;
    println!("headless Chromium decodes in WebRTC: {}", first["codecs"]);
    let decoded = first["decoded"].as_u64().unwrap();
    // Frames keep decoding (not one keyframe and a stall).
    wait_eval(&page, VIDEO_CODEC, "AV1 frames keep decoding", |v| {
        v["decoded"].as_u64().is_some_and(|n| n >= decoded + 30) && v["mime"] == "video/AV1"
    })
    .await;
    let sessions = wait_sessions(&gw, "the AV1 session", Duration::from_secs(5), |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(sessions[0]["node"], "de-1", "{sessions:?}");
    println!("AV1 session: {}", sessions[0]);
    // The AV1 node dies: the H.264 node is not an option (its frames would not decode in this
    // peer connection, and there is no renegotiation), so once the pause window has passed
    // the session ends, saying why.
    node.task.abort();
    let banner = wait_eval(
        &page,
        "document.getElementById('banner').textContent",
        "the session's end",
        |v| v.as_str().is_some_and(|t| t.starts_with("session ended")),
    )
    .await;
    assert_eq!(
        banner,
        "session ended: no node that encodes av1 (the session's codec) available within 5 s"
    );
    wait_sessions(&gw, "no session", Duration::from_secs(5), |l| l.is_empty()).await;
    wait_slots_in_use(&gw, 0).await;
    drop(page);
    drop(browser);
    other.stop().await.unwrap();
    gw.stop().await;
}

/// Node `de-1` serving the arena that also encodes AV1 and HEVC in software, registered.
async fn av1_hevc_node(gw: &TestGateway) -> TestNode {
    let mut cfg = with_arena(gw.node_config("de-1", &gw.token));
    cfg.encoder.software_hevc_av1 = true;
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    node
}

/// Issue 17: `codec=av1` over WebTransport. The page asks for AV1 alone in `PlayRequest.codecs`
/// and decodes it with WebCodecs (Chromium's software AV1 decoder); before, the WebTransport
/// path asked for H.264 whatever the page was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_decodes_av1_over_webtransport_when_the_page_asks_for_it() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let node = av1_hevc_node(&gw).await;
    let browser = Browser::launch().await;
    // 320x180 at 30 fps: libaom's real-time mode keeps up on a 2-core machine.
    let page = browser
        .open(&gw.api_url(&format!(
            "/play?key={API_KEY}&game=arena&width=320&height=180&fps=30&autostart=1&codec=av1&transport=webtransport"
        )))
        .await;
    let first = wait_stats(
        &page,
        "AV1 frames decoded over WebTransport",
        Duration::from_secs(20),
        |s| {
            s["transport"] == "webtransport"
                && s["decoder"].as_str().is_some_and(|d| d.starts_with("av01"))
                && num(s, "framesDecoded") > 0.0
        },
    )
    .await;
    let decoded = num(&first, "framesDecoded");
    // Frames keep decoding (not one keyframe and a stall). A frame lost on a loaded machine
    // may make the AV1 decoder fail on the next delta frame; the page then asks for a
    // keyframe and goes on, which this also covers.
    let later = wait_stats(
        &page,
        "AV1 frames keep decoding",
        Duration::from_secs(20),
        |s| num(s, "framesDecoded") >= decoded + 30.0,
    )
    .await;
    println!(
        "AV1 over WebTransport: {} decoded, {} decode errors, {} keyframe requests",
        later["framesDecoded"], later["decodeErrors"], later["keyframeRequests"]
    );
    assert_eq!(num(&later, "width"), 320.0, "{later}");
    let sessions = wait_sessions(&gw, "the AV1 session", Duration::from_secs(5), |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(sessions[0]["transport"], "webtransport", "{sessions:?}");
    drop(page);
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Issue 15: the default page still gets H.264 from a node that also encodes AV1 and HEVC (the
/// gateway's `browser_codecs` puts H.264 first), and a gateway configured for H.264 only
/// refuses an AV1-only offer with 422, naming what it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_stays_the_default_and_browser_codecs_limits_what_browsers_get() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let node = av1_hevc_node(&gw).await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&gw.api_url(&format!(
            "/play?key={API_KEY}&game=arena&width=320&height=180&fps=30&autostart=1&transport=webrtc"
        )))
        .await;
    wait_eval(&page, VIDEO_CODEC, "H.264 frames decoded", |v| {
        v["mime"] == "video/H264" && v["decoded"].as_u64().is_some_and(|n| n > 10)
    })
    .await;
    drop(page);
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;

    let gw = TestGateway::start(|c| c.game.browser_codecs = vec!["h264".into()]).await;
    let auth = format!("Bearer {API_KEY}");
    let av1_only = CHROMIUM_OFFER.replace("H264/90000", "H263/90000");
    let (status, _, body) = request(
        None,
        "POST",
        &gw.api_url("/v1/games/arena/whep"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/sdp"),
        ],
        &av1_only,
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (422, "unsupported_codec"),
        "{body}"
    );
    assert_eq!(
        error_message(&body),
        "the offer lists av1 and this gateway sends browsers h264 only"
    );
    gw.stop().await;
}

/// Issue 15: the answer names only the codec the session got, in the browser's payload type:
/// an HEVC-only offer (what a browser with hardware HEVC decoding sends for `codec=hevc`) is
/// answered with H.265 by a node that encodes it, an AV1-only offer with AV1. No browser here
/// decodes HEVC in WebRTC, so the H.265 media path is covered up to the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hevc_and_av1_offers_are_answered_with_that_codec_alone() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = with_arena(gw.node_config("de-1", &gw.token));
    cfg.encoder.software_hevc_av1 = true;
    cfg.capacity.game_sessions = 2;
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let auth = format!("Bearer {API_KEY}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/sdp"),
    ];
    let whep = gw.api_url("/v1/games/arena/whep?width=320&height=180&fps=30");
    let hevc_only = CHROMIUM_OFFER
        .replace("H264/90000", "H263/90000")
        .replace("a=rtpmap:45 AV1/90000", "a=rtpmap:45 H265/90000")
        .replace(
            "a=fmtp:45 level-idx=5;profile=0;tier=0",
            "a=fmtp:45 level-id=93;profile-id=1;tier-flag=0;tx-mode=SRST",
        );
    let av1_only = CHROMIUM_OFFER.replace("H264/90000", "H263/90000");
    for (offer, want, pt) in [(hevc_only, "H265/90000", 45), (av1_only, "AV1/90000", 45)] {
        let (status, h, answer) = request(None, "POST", &whep, &headers, &offer).await;
        assert_eq!(status, 201, "{answer}");
        let video: Vec<&str> = answer
            .lines()
            .filter(|l| l.starts_with("a=rtpmap:") && l.ends_with("/90000"))
            .filter(|l| !l.contains(" rtx/"))
            .collect();
        assert_eq!(video, [format!("a=rtpmap:{pt} {want}")], "{answer}");
        let location = header(&h, "location").to_string();
        let (status, _, _) = request(
            None,
            "DELETE",
            &gw.api_url(&location),
            &[("authorization", auth.as_str())],
            "",
        )
        .await;
        assert_eq!(status, 200);
    }
    wait_sessions(&gw, "no session", Duration::from_secs(5), |l| l.is_empty()).await;
    node.stop().await.unwrap();
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The page over WebTransport + WebCodecs (`/play` with the default `transport=auto`, or
// `transport=webtransport`): Chromium connects to the gateway's WebTransport endpoint with the
// certificate hashes of `GET /v1/webtransport` (`serverCertificateHashes`: 127.0.0.1 works with
// no browser flag), speaks the native play protocol on one bidirectional stream, decodes each
// frame stream's H.264 with a `VideoDecoder` and draws it on a canvas.

/// `window.nearpath` fields these tests read, in one evaluation.
const WT_STATE: &str = "(() => { const np = window.nearpath; return { transport: np.transport, reason: np.transportReason, error: np.lastError, wt: np.wtCreated, pc: np.pcCreated, state: np.state, decoded: np.stats && np.stats.framesDecoded }; })()";

/// Guards the WebTransport path end to end: ten seconds of 720p60 decoded (at least 90% of the
/// frames), 1280 wide, every key applied and the ship moving on the canvas, input-to-photon
/// measured, the page's stats posted to the gateway and the session ended by Stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_plays_720p60_over_webtransport_for_10_seconds_and_keys_move_the_ship() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    // The default (auto) picks WebTransport: this Chromium has it and WebCodecs.
    let page = browser
        .open(&play_url_via(&gw, 1280, 720, 60, "auto"))
        .await;
    let first = wait_stats(
        &page,
        "the first decoded frame",
        Duration::from_secs(30),
        |s| num(s, "framesDecoded") > 0.0,
    )
    .await;
    let state = page.eval(WT_STATE).await.unwrap();
    assert_eq!(state["transport"], "webtransport", "{state}");
    assert_eq!(first["transport"], "webtransport", "{first}");
    assert_eq!(state["pc"], 0, "no peer connection: {state}");
    let sessions = wait_sessions(
        &gw,
        "the WebTransport session",
        Duration::from_secs(5),
        |l| l.len() == 1,
    )
    .await;
    assert_eq!(sessions[0]["transport"], "webtransport", "{}", sessions[0]);
    // The stats line says which transport plays.
    let line = page
        .eval("document.getElementById('stats').textContent")
        .await
        .unwrap();
    assert!(
        line.as_str().unwrap_or("").starts_with("WebTransport"),
        "{line}"
    );

    let Played {
        stats,
        presses,
        expected: _,
    } = play_ten_seconds_holding_d(&page, &first, |stats| {
        format!(
            "late {}, skipped {}, reset {}, decode errors {}, keyframe requests {}",
            stats["framesLate"],
            stats["framesSkipped"],
            stats["streamsReset"],
            stats["decodeErrors"],
            stats["keyframeRequests"]
        )
    })
    .await;
    assert_eq!(num(&stats, "decodeErrors"), 0.0, "{stats}");
    // Headless Chromium 156 has no WebTransport.getStats(); there the RTT is the gateway's
    // echoes of the page's pings, a loopback round trip (well under 100 ms even on a loaded
    // machine). Either way the page has one.
    assert!(
        stats["rttSource"] == "echo" || stats["rttSource"] == "getStats",
        "{stats}"
    );
    let rtt = num(&stats, "rttMs");
    assert!(rtt > 0.0 && rtt < 100.0, "rtt {rtt} ms: {stats}");
    // The page's stats reach the gateway's admin view, as over WebRTC.
    let sessions = wait_sessions(
        &gw,
        "the page's stats in the admin view",
        Duration::from_secs(5),
        |l| {
            l.len() == 1
                && l[0]["client_stats"]["framesDecoded"]
                    .as_f64()
                    .unwrap_or(0.0)
                    > 0.0
        },
    )
    .await;
    assert_eq!(sessions[0]["client_stats"]["transport"], "webtransport");
    assert!(
        sessions[0]["inputs"].as_u64().unwrap_or(0) >= u64::from(presses),
        "{}",
        sessions[0]
    );

    // Stop ends the session (Close on the session stream, then DELETE).
    page.eval("window.nearpath.stop()").await.unwrap();
    wait_sessions(&gw, "the session to end", Duration::from_secs(5), |l| {
        l.is_empty()
    })
    .await;
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// What [`play_ten_seconds_holding_d`] played.
struct Played {
    /// The page's stats sample taken after the last key was applied.
    stats: Value,
    /// Key events sent (downs and ups).
    presses: u32,
    /// Frames a 60 fps stream holds over the sampled window.
    expected: f64,
}

/// The 720p60 play both browser paths are held to: the ship starts in the centre, D is held
/// and released every 200 ms for ten seconds, then at least 90% of the frames were decoded at
/// 1280x720, every key the page sent was applied by the node (frames carry the last applied
/// seq), the ship on screen moved right (it crosses the frame in ~5 s of holding D, so it ends
/// at the right edge), and input-to-photon was measured for most presses. `detail` adds the
/// path's own counters to the printed line.
async fn play_ten_seconds_holding_d(
    page: &Page,
    first: &Value,
    detail: impl Fn(&Value) -> String,
) -> Played {
    let (x0, _) = ship_on_screen(page).await;
    assert!(
        (x0 - 640.0).abs() < 40.0,
        "the ship starts in the centre, not at x {x0}"
    );
    let t0 = Instant::now();
    let decoded0 = num(first, "framesDecoded");
    let mut down = false;
    let mut presses: u32 = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        down = !down;
        page.key(68, "d", "KeyD", down).await.unwrap();
        presses += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if down {
        page.key(68, "d", "KeyD", false).await.unwrap();
        presses += 1;
    }
    let played = t0.elapsed();
    // The page samples its stats once a second: wait for a sample taken after the last key.
    let stats = wait_stats(
        page,
        "the last inputs applied",
        Duration::from_secs(5),
        |s| {
            num(s, "inputsSent") >= f64::from(presses)
                && num(s, "inputSeqApplied") >= num(s, "inputsSent")
        },
    )
    .await;
    let window = (num(&stats, "ts") - num(first, "ts")) / 1000.0;
    let decoded = num(&stats, "framesDecoded") - decoded0;
    let expected = 60.0 * window;
    println!(
        "{}: decoded {decoded} frames in {window:.2} s ({:.1} fps; keys for {:.2} s), {}x{}, {} kbit/s, {} (inputs sent {})",
        stats["transport"],
        decoded / window,
        played.as_secs_f64(),
        stats["width"],
        stats["height"],
        stats["bitrateKbps"],
        detail(&stats),
        stats["inputsSent"],
    );
    print_latency(&stats);
    assert!(
        decoded >= 0.9 * expected,
        "decoded only {decoded} frames of {expected:.0}: {stats}"
    );
    assert_eq!(num(&stats, "width"), 1280.0, "{stats}");
    assert_eq!(num(&stats, "height"), 720.0, "{stats}");
    assert!(num(&stats, "inputsSent") >= f64::from(presses), "{stats}");
    assert!(
        num(&stats, "inputSeqApplied") >= num(&stats, "inputsSent"),
        "{stats}"
    );
    let (x1, _) = ship_on_screen(page).await;
    println!("ship at x {x0:.0} before the keys, {x1:.0} after");
    assert!(
        x1 > x0 + 300.0,
        "the ship did not move right on screen: x {x0} -> {x1}"
    );
    let l = &stats["inputToPhoton"];
    assert!(
        num(l, "n") >= f64::from(presses) * 0.5,
        "too few latency samples: {stats}"
    );
    assert!(
        num(l, "p50") > 0.0 && num(l, "p95") >= num(l, "p50"),
        "{stats}"
    );
    Played {
        stats,
        presses,
        expected,
    }
}

/// Plays until 30 frames are decoded and returns the page's state.
async fn wait_playing(page: &Page) -> Value {
    wait_stats(page, "30 decoded frames", Duration::from_secs(30), |s| {
        num(s, "framesDecoded") >= 30.0
    })
    .await;
    page.eval(WT_STATE).await.unwrap()
}

/// Guards the fallback: a browser without WebTransport (taken away before the page's scripts
/// run), and a gateway with `[webtransport] enabled = false`, both play over WebRTC with the
/// default `transport=auto`, and the page says why. Forcing `transport=webtransport` on that
/// gateway is refused with the reason instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_falls_back_to_webrtc_without_webtransport_in_the_browser_or_the_gateway() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser
        .open_with(
            &play_url_via(&gw, 320, 180, 30, "auto"),
            Some("delete window.WebTransport;"),
        )
        .await;
    let state = wait_playing(&page).await;
    assert_eq!(state["transport"], "webrtc", "{state}");
    assert_eq!(
        state["reason"], "this browser has no WebTransport",
        "{state}"
    );
    assert_eq!(state["wt"], 0, "{state}");
    assert_eq!(state["pc"], 1, "{state}");
    let sessions = wait_sessions(&gw, "the WebRTC session", Duration::from_secs(5), |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(sessions[0]["transport"], "webrtc");
    page.eval("window.nearpath.stop()").await.unwrap();
    wait_sessions(&gw, "the session to end", Duration::from_secs(5), |l| {
        l.is_empty()
    })
    .await;
    drop(page);
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;

    // A gateway that serves no WebTransport: /v1/webtransport answers 404.
    let gw = TestGateway::start(|c| c.webtransport.enabled = false).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser.open(&play_url_via(&gw, 320, 180, 30, "auto")).await;
    let state = wait_playing(&page).await;
    assert_eq!(state["transport"], "webrtc", "{state}");
    assert!(
        state["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("the gateway offers no WebTransport"),
        "{state}"
    );
    assert_eq!(state["wt"], 0, "{state}");
    page.eval("window.nearpath.stop()").await.unwrap();
    wait_sessions(&gw, "the session to end", Duration::from_secs(5), |l| {
        l.is_empty()
    })
    .await;
    drop(page);
    // Forced WebTransport on that gateway: refused with the reason, nothing played.
    let page = browser
        .open(&play_url_via(&gw, 320, 180, 30, "webtransport"))
        .await;
    let shown = wait_eval(
        &page,
        "window.nearpath.lastError",
        "the page's error",
        Value::is_string,
    )
    .await;
    assert!(
        shown
            .as_str()
            .unwrap()
            .starts_with("WebTransport: the gateway offers no WebTransport"),
        "{shown}"
    );
    let state = page.eval(WT_STATE).await.unwrap();
    assert_eq!(state["pc"], 0, "{state}");
    assert_eq!(state["wt"], 0, "{state}");
    assert!(gw.admin_get("/admin/sessions").await["data"]
        .as_array()
        .unwrap()
        .is_empty());
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Guards the refusal path over WebTransport: a wrong key is answered `Error` on the session
/// stream and the page shows its reason (as the WebRTC path shows the 401's), with no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_over_webtransport_shows_the_gateways_reason() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&gw.api_url(
            "/play?key=wrong-key&game=arena&width=320&height=180&fps=30&autostart=1&transport=webtransport",
        ))
        .await;
    let shown = wait_eval(
        &page,
        "window.nearpath.lastError",
        "the page's error",
        Value::is_string,
    )
    .await;
    let state = page.eval(WT_STATE).await.unwrap();
    println!("wrong key over WebTransport: {state}");
    assert_eq!(state["transport"], "webtransport", "{state}");
    assert_eq!(state["wt"], 1, "{state}");
    let text = page
        .eval("document.getElementById('message').textContent")
        .await
        .unwrap();
    assert_eq!(text, shown);
    // The same reason the HTTP API gives a wrong key (what the WebRTC path shows).
    let (status, _, body) = request(
        None,
        "GET",
        &gw.api_url("/v1/games"),
        &[("authorization", "Bearer wrong-key")],
        "",
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(shown, Value::String(error_message(&body)));
    assert!(gw.admin_get("/admin/sessions").await["data"]
        .as_array()
        .unwrap()
        .is_empty());
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Guards failover over WebTransport: the serving node dies, the gateway pauses the session
/// and resumes it on the other node; the page keeps its one WebTransport session and its
/// decoder, waits for the new node's keyframe and decodes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_keeps_decoding_on_the_same_session_when_the_serving_node_dies() {
    let stats = failover_keeps_the_session("webtransport").await;
    assert_eq!(
        num(&stats, "wtCreated"),
        1.0,
        "one WebTransport session: {stats}"
    );
}

/// Failover as a player sees it, over `transport`: the browser (placed in France) is served by
/// the nearer German node; that node is killed abruptly (no drain), and within 15 s the page has
/// decoded 30 more frames, heard the pause and resume notices and is no longer paused, while the
/// gateway shows the session, on the same transport, on the American node. Returns the page's
/// stats for the path's own checks.
async fn failover_keeps_the_session(transport: &str) -> Value {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|c| {
        c.geo
            .overrides
            .push(place(("127.0.0.1", "FR", 48.85, 2.35)))
    })
    .await;
    let mut near = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    near.registered().await;
    let mut far = TestNode::start(with_arena(gw.node_config("us-1", &gw.token)), ip(US_EAST));
    far.registered().await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&play_url_via(&gw, 640, 360, 30, transport))
        .await;
    let state = wait_playing(&page).await;
    assert_eq!(state["transport"], transport, "{state}");
    let sessions =
        wait_sessions(&gw, "the session", Duration::from_secs(5), |l| l.len() == 1).await;
    assert_eq!(sessions[0]["node"], "de-1", "the nearer node serves first");
    let decoded = || async {
        page.eval("window.nearpath.framesDecoded()")
            .await
            .unwrap()
            .as_f64()
            .unwrap_or(0.0)
    };
    let at_kill = decoded().await;
    near.task.abort();
    let killed = Instant::now();
    let resumed = loop {
        let n = decoded().await;
        if n >= at_kill + 30.0 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "decoding did not resume: {n} frames, {at_kill} at the kill; {}",
            page.eval(WT_STATE).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stats = wait_stats(
        &page,
        "the pause and resume notices",
        Duration::from_secs(5),
        |s| num(s, "pausedCount") >= 1.0 && num(s, "resumedCount") >= 1.0,
    )
    .await;
    println!(
        "{transport}: 30 more frames decoded {resumed:?} after the node was killed (frames decoded {} at the kill, {} now; freezes {}, keyframe requests {}, skipped {}, late {}, decode errors {})",
        at_kill, stats["framesDecoded"], stats["freezeCount"], stats["keyframeRequests"],
        stats["framesSkipped"], stats["framesLate"], stats["decodeErrors"]
    );
    assert!(!stats["paused"].as_bool().unwrap(), "{stats}");
    let sessions = wait_sessions(
        &gw,
        "the session on the other node",
        Duration::from_secs(5),
        |l| l.len() == 1,
    )
    .await;
    assert_eq!(sessions[0]["node"], "us-1");
    assert_eq!(sessions[0]["transport"], transport);
    drop(browser);
    far.stop().await.unwrap();
    gw.stop().await;
    stats
}

/// The frame bytes of `msg` without their length prefix: (type, body).
fn type_and_body(msg: &nearpath_protocol::Message) -> (u8, Vec<u8>) {
    let bytes = nearpath_protocol::encode_to_vec(msg);
    let prefix = bytes.iter().position(|b| b & 0x80 == 0).unwrap() + 1;
    (bytes[prefix], bytes[prefix + 1..].to_vec())
}

/// Evaluates `np.wire.<call>` on the page and returns its value.
async fn wire(page: &Page, call: &str) -> Value {
    page.eval(&format!("window.nearpath.wire.{call}"))
        .await
        .unwrap_or_else(|e| panic!("{call}: {e}"))
}

fn bytes_of(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a byte array: {v}"))
        .iter()
        .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
        .collect()
}

/// Guards the page's WebTransport wire codec against the protocol crate, byte for byte: what
/// it writes (`PlayRequest`, `SetVideo`, `Close`, `ForceKeyframe`, input datagrams of every
/// event with a session id above 2^53) decodes in Rust to exactly what was meant and re-encodes
/// to the same bytes; what the gateway writes (every control message the page reads, frame
/// headers, audio datagrams) reads back field for field in the page. And what a hostile or
/// broken gateway could send instead (truncated or trailing bytes, out-of-range values, an
/// overlong varint, a string longer than its message, invalid UTF-8, bad magic/version/flags,
/// a payload length of 0 or over 8 MiB, a wrong Opus frame size) is refused, never misread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_webtransport_wire_codec_matches_the_protocol_crate() {
    use nearpath_protocol::message::{
        Close, Ended, ErrorInfo, Paused, PlayRequest, PlayResume, PlayStarted, PlayTicket,
        Redirect, ResumeToken, Rumble, SetVideo,
    };
    use nearpath_protocol::{
        AudioPacket, Decoder, FrameHeader, InputDatagram, InputEvent, Message, VideoCodec,
        MAX_CONTROL_FRAME,
    };
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&gw.api_url("/play?key=k&transport=webtransport"))
        .await;
    wait_eval(
        &page,
        "!!(window.nearpath && window.nearpath.wire)",
        "the page",
        |v| v == &Value::Bool(true),
    )
    .await;
    let decode = |bytes: &[u8]| {
        let mut d = Decoder::new(MAX_CONTROL_FRAME);
        d.push(bytes);
        let m = d.poll().expect("decodes").expect("one whole message");
        assert_eq!(d.buffered(), 0, "exactly one message");
        assert_eq!(
            nearpath_protocol::encode_to_vec(&m),
            bytes,
            "canonical: re-encodes to the page's bytes"
        );
        m
    };

    // What the page writes.
    let req = bytes_of(
        &wire(
            &page,
            r#"playRequest("k€y ✓", "arena", 1280, 720, 60, 300000)"#,
        )
        .await,
    );
    assert_eq!(
        decode(&req),
        Message::PlayRequest(PlayRequest {
            protocol_version: nearpath_protocol::PROTOCOL_VERSION,
            api_key: "k€y ✓".into(),
            game: "arena".into(),
            width: 1280,
            height: 720,
            fps: 60,
            bitrate_kbps: 300_000,
            codecs: vec![],
            traceparent: None,
        })
    );
    // With a trace context (protocol version 4).
    let traced = bytes_of(
        &wire(
            &page,
            r#"playRequest("k", "arena", 64, 48, 30, 0, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")"#,
        )
        .await,
    );
    assert_eq!(
        decode(&traced),
        Message::PlayRequest(PlayRequest {
            protocol_version: nearpath_protocol::PROTOCOL_VERSION,
            api_key: "k".into(),
            game: "arena".into(),
            width: 64,
            height: 48,
            fps: 30,
            bitrate_kbps: 0,
            codecs: vec![],
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        })
    );
    let sv = bytes_of(&wire(&page, "setVideo(3840, 2160, 240)").await);
    assert_eq!(
        decode(&sv),
        Message::SetVideo(SetVideo {
            width: 3840,
            height: 2160,
            fps: 240
        })
    );
    let close = bytes_of(&wire(&page, r#"close("stopped ✓")"#).await);
    assert_eq!(
        decode(&close),
        Message::Close(Close {
            reason: "stopped ✓".into()
        })
    );
    let fk = bytes_of(&wire(&page, "forceKeyframe()").await);
    assert_eq!(decode(&fk), Message::ForceKeyframe);
    // What the page sends to resume a session through another gateway, or to follow a redirect.
    let token = "0f".repeat(32);
    let resume = bytes_of(
        &wire(
            &page,
            &format!(r#"playResume("k€y", "{}", "{token}")"#, u64::MAX - 7),
        )
        .await,
    );
    assert_eq!(
        decode(&resume),
        Message::PlayResume(PlayResume {
            protocol_version: nearpath_protocol::PROTOCOL_VERSION,
            api_key: "k€y".into(),
            session_id: u64::MAX - 7,
            token: token.clone(),
        })
    );
    let ticket = bytes_of(&wire(&page, r#"playTicket("k€y", "t1.ab")"#).await);
    assert_eq!(
        decode(&ticket),
        Message::PlayTicket(PlayTicket {
            protocol_version: nearpath_protocol::PROTOCOL_VERSION,
            api_key: "k€y".into(),
            ticket: "t1.ab".into(),
        })
    );

    let sid = u64::MAX - 5;
    let ts_ms = 1_765_000_000_123.5_f64;
    let cases: [(&str, InputEvent); 9] = [
        (
            r#"{t:"key",code:68,down:true}"#,
            InputEvent::Key {
                code: 68,
                down: true,
            },
        ),
        (
            r#"{t:"key",code:65535,down:false}"#,
            InputEvent::Key {
                code: 65535,
                down: false,
            },
        ),
        (
            r#"{t:"mouse",dx:-3,dy:70000}"#,
            InputEvent::MouseMove { dx: -3, dy: 70000 },
        ),
        (
            r#"{t:"button",button:2,down:true}"#,
            InputEvent::MouseButton {
                button: 2,
                down: true,
            },
        ),
        (
            r#"{t:"wheel",dx:-120,dy:40000}"#,
            InputEvent::Wheel {
                dx: -120,
                dy: 32767,
            },
        ),
        (
            r#"{t:"pad",pad:2,axes:[0,-1,0.5,7],triggers:[0.25,1],buttons:131071}"#,
            InputEvent::Gamepad {
                pad: 2,
                axes: [0, -32767, 16384, 32767],
                triggers: [16384, 65535],
                buttons: 0x1ffff,
            },
        ),
        (
            r#"{t:"pad",pad:0,axes:[],buttons:1}"#,
            InputEvent::Gamepad {
                pad: 0,
                axes: [0; 4],
                triggers: [0; 2],
                buttons: 1,
            },
        ),
        (r#"{t:"keyframe"}"#, InputEvent::KeyframeRequest),
        (
            r#"{t:"ping",id:4000000000}"#,
            InputEvent::Ping { id: 4_000_000_000 },
        ),
    ];
    for (i, (msg, event)) in cases.into_iter().enumerate() {
        let seq = 1 + i as u64;
        let bytes =
            bytes_of(&wire(&page, &format!(r#"input("{sid}", {seq}, {ts_ms}, {msg})"#)).await);
        let d = InputDatagram::decode(&bytes).unwrap_or_else(|e| panic!("{msg}: {e}"));
        assert_eq!(
            d,
            InputDatagram {
                session_id: sid,
                seq,
                sent_ts_us: 1_765_000_000_123_500,
                event,
            },
            "{msg}"
        );
        assert_eq!(d.encode(), bytes, "{msg}");
    }
    assert_eq!(
        wire(&page, r#"input("1", 1, 0, {t:"video"})"#).await,
        Value::Null
    );

    // What the gateway writes, read by the page.
    let control = |m: &Message| {
        let (ty, body) = type_and_body(m);
        format!("control({ty}, {body:?})")
    };
    let started = Message::PlayStarted(PlayStarted {
        session_id: u64::MAX - 1,
        width: 1280,
        height: 720,
        fps: 60,
        bitrate_kbps: 8000,
        codec: VideoCodec::H264,
    });
    let v = wire(&page, &control(&started)).await;
    assert_eq!(v["t"], "started", "{v}");
    assert_eq!(v["sessionId"], (u64::MAX - 1).to_string(), "{v}");
    assert_eq!(
        (
            v["width"].clone(),
            v["height"].clone(),
            v["fps"].clone(),
            v["kbps"].clone()
        ),
        (1280.into(), 720.into(), 60.into(), 8000.into())
    );
    assert_eq!(v["codec"], "h264");
    let v = wire(
        &page,
        &control(&Message::Error(ErrorInfo {
            code: "unauthorized".into(),
            message: "Falscher Schlüssel ✗".into(),
            retryable: true,
        })),
    )
    .await;
    assert_eq!(
        v,
        serde_json::json!({"t": "error", "code": "unauthorized", "message": "Falscher Schlüssel ✗", "retryable": true})
    );
    for (m, want) in [
        (
            Message::Ended(Ended {
                reason: "client_left".into(),
            }),
            serde_json::json!({"t": "ended", "reason": "client_left"}),
        ),
        (
            Message::Paused(Paused {
                reason: "node lost".into(),
            }),
            serde_json::json!({"t": "paused", "reason": "node lost"}),
        ),
        (Message::Resumed, serde_json::json!({"t": "resumed"})),
        (
            Message::SetVideo(SetVideo {
                width: 640,
                height: 360,
                fps: 30,
            }),
            serde_json::json!({"t": "video", "width": 640, "height": 360, "fps": 30}),
        ),
        (
            Message::Rumble(Rumble {
                pad: 3,
                strong_magnitude: 65535,
                weak_magnitude: 1,
                duration_ms: 5000,
            }),
            serde_json::json!({"t": "rumble", "pad": 3, "strong": 65535, "weak": 1, "duration_ms": 5000}),
        ),
        (
            Message::ResumeToken(ResumeToken {
                token: "ab".repeat(32),
            }),
            serde_json::json!({"t": "resume_token", "token": "ab".repeat(32)}),
        ),
        (
            Message::Redirect(Redirect {
                gateway_id: "gw-b ✓".into(),
                quic_address: "127.0.0.1:4433".into(),
                cert_sha256: "cd".repeat(32),
                http_url: "http://127.0.0.1:8080".into(),
                ticket: "ef".repeat(40),
            }),
            serde_json::json!({"t": "redirect", "gatewayId": "gw-b ✓", "quicAddress": "127.0.0.1:4433",
                "certSha256": "cd".repeat(32), "httpUrl": "http://127.0.0.1:8080", "ticket": "ef".repeat(40)}),
        ),
    ] {
        assert_eq!(wire(&page, &control(&m)).await, want, "{m:?}");
    }
    // A message type this page does not know is skipped, not an error.
    assert_eq!(
        wire(&page, "control(127, [1, 2, 3])").await,
        serde_json::json!({"t": "unknown", "type": 127})
    );
    // Malformed bodies are refused.
    let (ty, body) = type_and_body(&started);
    let hostile: Vec<(String, &str)> = vec![
        (
            format!("control({ty}, {:?})", &body[..body.len() - 1]),
            "truncated",
        ),
        (
            format!("control({ty}, {:?})", [&body[..], &[0]].concat()),
            "trailing",
        ),
        (
            format!("control({ty}, [255,255,255,255,255,255,255,255,255,255,1])"),
            "varint",
        ),
        // Error whose message claims 2^40 bytes, and 1000 bytes with one left.
        (
            "control(24, [1, 97, 128, 128, 128, 128, 128, 32])".into(),
            "u32",
        ),
        ("control(24, [1, 97, 232, 7, 98])".into(), "truncated"),
        // Error whose bool is 2.
        ("control(24, [1, 97, 1, 98, 2])".into(), "bool"),
        // Ended whose reason is not UTF-8.
        ("control(25, [2, 195, 40])".into(), ""),
        // Rumble for pad 4, and one of 5001 ms.
        ("control(29, [4, 0, 0, 0, 0, 1])".into(), "range"),
        ("control(29, [0, 0, 0, 0, 0, 137, 39])".into(), "range"),
        // SetVideo with a width over u32.
        ("control(28, [128, 128, 128, 128, 16, 1, 1])".into(), "u32"),
        // Resumed with a body.
        ("control(53, [0])".into(), "trailing"),
    ];
    for (call, why) in hostile {
        let v = wire(&page, &call).await;
        let err = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{call} was accepted: {v}"));
        assert!(err.contains(why), "{call}: {err}");
    }

    let header = FrameHeader {
        session_id: u64::MAX,
        seq: 123_456,
        capture_ts_us: 1_765_000_000_123_456,
        encode_us: 4321,
        keyframe: true,
        input_seq: 99,
        width: 1280,
        height: 720,
        payload_len: 8 * 1024 * 1024,
    };
    let enc = header.encode();
    let v = wire(&page, &format!("frameHeader({:?})", enc.to_vec())).await;
    assert_eq!(
        v,
        serde_json::json!({"key": true, "session": u64::MAX.to_string(), "seq": 123456, "captureUs": 1765000000123456_u64,
            "inputSeq": 99, "encodeUs": 4321, "payloadLen": 8388608, "width": 1280, "height": 720})
    );
    let mut bad: Vec<(Vec<u8>, &str)> = Vec::new();
    for (i, b, what) in [
        (0, 0x4f, "magic"),
        (1, 2, "version"),
        (2, 0x03, "flags"),
        (3, 1, "reserved"),
    ] {
        let mut h = enc;
        h[i] = b;
        bad.push((h.to_vec(), what));
    }
    let mut h = enc;
    h[40..44].copy_from_slice(&0u32.to_le_bytes());
    bad.push((h.to_vec(), "empty payload"));
    h[40..44].copy_from_slice(&(8 * 1024 * 1024 + 1u32).to_le_bytes());
    bad.push((h.to_vec(), "payload over 8 MiB"));
    bad.push((enc[..47].to_vec(), "short"));
    for (b, what) in bad {
        assert_eq!(
            wire(&page, &format!("frameHeader({b:?})")).await,
            Value::Null,
            "{what}"
        );
    }

    let pkt = AudioPacket {
        session_id: u64::MAX - 7,
        seq: u32::MAX,
        capture_ts_us: 1_765_000_000_000_010,
        samples: 480,
        flags: 1,
        opus: bytes::Bytes::from_static(&[0xfc, 1, 2, 3]),
    };
    let enc = pkt.encode().unwrap();
    let v = wire(&page, &format!("audio({enc:?})")).await;
    assert_eq!(
        v,
        serde_json::json!({"session": (u64::MAX - 7).to_string(), "seq": u32::MAX, "captureUs": 1765000000000010_u64, "samples": 480, "payload": [0xfc, 1, 2, 3]})
    );
    let mut bad: Vec<(Vec<u8>, &str)> = Vec::new();
    for (i, b, what) in [
        (0, 0x49, "magic"),
        (1, 2, "version"),
        (2, 0x02, "flags"),
        (24, 100, "samples"),
    ] {
        let mut a = enc.clone();
        a[i] = b;
        bad.push((a, what));
    }
    bad.push((enc[..25].to_vec(), "no payload"));
    let mut big = enc[..25].to_vec();
    big.extend(std::iter::repeat_n(0u8, 1001));
    bad.push((big, "payload over 1000 bytes"));
    for (b, what) in bad {
        assert_eq!(
            wire(&page, &format!("audio({b:?})")).await,
            Value::Null,
            "{what}"
        );
    }
    drop(browser);
    gw.stop().await;
}

/// Input-to-photon in Chromium, WebTransport against WebRTC, in one run (README
/// "Benchmarks"): one gateway and node, 720p60, each path played for `NEARPATH_I2P_SECS`
/// (20) seconds while D is pressed and released every 100 ms, `NEARPATH_I2P_ROUNDS` (1)
/// rounds alternating the paths. Prints p50/p95 of input-to-photon per path: over WebRTC to the
/// frame's expected display time (requestVideoFrameCallback) and to its hand-over to the
/// compositor (`inputToPresent`), over WebTransport to the moment the frame is drawn on the
/// canvas (the hand-over there), plus WebRTC's jitter-buffer delay.
/// `cargo test --release -p nearpath-tests --test browser bench_input_to_photon -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run on demand (see above)"]
async fn bench_input_to_photon_webtransport_vs_webrtc() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let secs: u64 = env_or("NEARPATH_I2P_SECS", 20);
    let rounds: u32 = env_or("NEARPATH_I2P_ROUNDS", 1);
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let mut table = Vec::new();
    for round in 1..=rounds {
        // The third: WebTransport with `render=video` (frames shown by the video element
        // through a MediaStreamTrackGenerator, timed like WebRTC's).
        for transport in ["webtransport", "webrtc", "webtransport&render=video"] {
            let page = browser
                .open(&play_url_via(&gw, 1280, 720, 60, transport))
                .await;
            let first = wait_stats(&page, "decoding", Duration::from_secs(30), |s| {
                num(s, "framesDecoded") >= 60.0
            })
            .await;
            assert_eq!(
                first["transport"].as_str(),
                transport.split('&').next(),
                "{first}"
            );
            let t0 = Instant::now();
            let mut down = false;
            while t0.elapsed() < Duration::from_secs(secs) {
                down = !down;
                page.key(68, "d", "KeyD", down).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if down {
                page.key(68, "d", "KeyD", false).await.unwrap();
            }
            let stats = wait_stats(
                &page,
                "the last inputs applied",
                Duration::from_secs(5),
                |s| num(s, "inputSeqApplied") >= num(s, "inputsSent"),
            )
            .await;
            let window = (num(&stats, "ts") - num(&first, "ts")) / 1000.0;
            let fps = (num(&stats, "framesDecoded") - num(&first, "framesDecoded")) / window;
            let (l, p) = (&stats["inputToPhoton"], &stats["inputToPresent"]);
            let line = format!(
                "round {round} {transport:<25} input-to-photon p50 {:6.1} ms p95 {:6.1} ms (n={}) | to present p50 {:6.1} p95 {:6.1} | {fps:.1} fps decoded, jitter buffer {:.1} ms, decode {:.1} ms",
                num(l, "p50"),
                num(l, "p95"),
                num(l, "n"),
                num(p, "p50"),
                num(p, "p95"),
                num(&stats, "jitterBufferAvgMs"),
                num(&stats, "decodeMs"),
            ) + &if first["transport"] == "webtransport" {
                format!(
                    " | not drawn {}, late {}, skipped {}, reset {}, decode errors {}",
                    stats["framesNotDrawn"],
                    stats["framesLate"],
                    stats["framesSkipped"],
                    stats["streamsReset"],
                    stats["decodeErrors"]
                )
            } else {
                String::new()
            };
            println!("{line}");
            print_latency(&stats);
            table.push(line);
            assert!(num(l, "n") >= 10.0, "too few samples: {stats}");
            page.eval("window.nearpath.stop()").await.unwrap();
            wait_sessions(&gw, "the session to end", Duration::from_secs(5), |l| {
                l.is_empty()
            })
            .await;
            wait_slots_in_use(&gw, 0).await;
            page.call("Page.close", serde_json::json!({})).await.ok();
        }
    }
    println!("--- input-to-photon, 720p60, {secs} s per path ---");
    for line in table {
        println!("{line}");
    }
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Guards sound over WebTransport: with Sound on, the gateway's audio datagrams (the node's
/// Opus packets) reach the page, decode in an `AudioDecoder` and are scheduled on Web Audio,
/// none malformed or another session's; with Sound off nothing is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_plays_the_games_sound_through_an_audio_decoder() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&play_url_via(&gw, 320, 180, 30, "webtransport"))
        .await;
    wait_playing(&page).await;
    // Muted (the default): packets arrive and are counted, nothing is decoded.
    let muted = wait_eval(
        &page,
        "window.nearpath.audioStats()",
        "audio datagrams",
        |a| num(a, "packetsReceived") >= 50.0,
    )
    .await;
    assert_eq!(num(&muted, "packetsDecoded"), 0.0, "{muted}");
    page.eval("window.nearpath.setMuted(false)").await.unwrap();
    let on = wait_eval(
        &page,
        "window.nearpath.audioStats()",
        "decoded sound",
        |a| num(a, "packetsDecoded") >= 200.0,
    )
    .await;
    println!("WebTransport sound: {on}");
    assert_eq!(num(&on, "malformed"), 0.0, "{on}");
    assert_eq!(num(&on, "foreign"), 0.0, "{on}");
    // Loopback loses nothing; a few packets may be late around the unmute.
    assert!(
        num(&on, "packetsLost") <= 0.02 * num(&on, "packetsReceived"),
        "{on}"
    );
    page.eval("window.nearpath.setMuted(true)").await.unwrap();
    let off = page.eval("window.nearpath.audioStats()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = page.eval("window.nearpath.audioStats()").await.unwrap();
    assert_eq!(later["packetsDecoded"], off["packetsDecoded"], "{later}");
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// An init script for `Browser::open_with` that runs `patch` (JavaScript that edits `j`) on every
/// `/v1/webtransport` answer the page reads: how a test points the page at a QUIC port that
/// drops its packets or at a path the gateway refuses, or makes it pin hashes of a certificate
/// the gateway does not serve. The gateway is untouched; the connection then fails in
/// Chromium's own WebTransport stack, as it would for a player.
fn rewrite_wt_info(patch: &str) -> String {
    format!(
        r#"(() => {{
  const f = window.fetch.bind(window);
  window.fetch = async (input, init) => {{
    const r = await f(input, init);
    const url = String(typeof input === "string" ? input : input.url);
    if (!url.includes("/v1/webtransport") || r.status !== 200) return r;
    const j = await r.clone().json();
    {patch};
    return new Response(JSON.stringify(j), {{ status: 200, headers: {{ "content-type": "application/json" }} }});
  }};
}})();"#
    )
}

/// A UDP relay in front of the gateway's QUIC port (one upstream socket per client address), to
/// cut the path between the browser and the gateway at a moment the test chooses: once `cut`,
/// every packet either way is dropped, as a firewall that starts blocking UDP would.
struct UdpRelay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpRelay {
    async fn start(to: std::net::SocketAddr) -> UdpRelay {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        use tokio::net::UdpSocket;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let port = front.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f, c) = (front.clone(), cut.clone());
        let task = tokio::spawn(async move {
            let mut ups: std::collections::HashMap<std::net::SocketAddr, Arc<UdpSocket>> =
                Default::default();
            let mut backs = Vec::new();
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let up = match ups.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        u.connect(to).await.unwrap();
                        let (u2, f2, c2) = (u.clone(), f.clone(), c.clone());
                        backs.push(tokio::spawn(async move {
                            let mut b = vec![0u8; 65536];
                            while let Ok(n) = u2.recv(&mut b).await {
                                if !c2.load(Ordering::SeqCst) {
                                    let _ = f2.send_to(&b[..n], from).await;
                                }
                            }
                        }));
                        ups.insert(from, u.clone());
                        u
                    }
                };
                let _ = up.send(&buf[..n]).await;
            }
            for b in backs {
                b.abort();
            }
        });
        UdpRelay { port, cut, task }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const FALLBACK_STATE: &str = "(() => { const np = window.nearpath; return { transport: np.transport, reason: np.transportReason, wt: np.wtCreated, pc: np.pcCreated, state: np.state, fallbacks: np.fallbacks, fallbackMs: np.fallbackMs, restarts: np.restarts, lastLost: np.lastLost, message: document.getElementById('message').textContent, statsTransport: np.stats && np.stats.transport, decoded: np.stats && np.stats.framesDecoded }; })()";

/// Guards the run-time fallback: the browser and the gateway both have WebTransport, but the
/// connection does not come up, and the page (transport=auto) plays over WebRTC within the
/// bounded connect time and says why. Three real failures, each in Chromium's WebTransport
/// stack: hashes of a certificate the gateway does not serve, UDP to the QUIC port dropped
/// (a socket that never answers: only `wt_connect_ms` ends the wait) and the session refused
/// (a path the gateway answers 404, counted in its metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_that_cannot_connect_at_run_time_falls_back_to_webrtc_and_says_why() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let browser = Browser::launch().await;
    // Bound and never read: packets to it vanish, as behind a firewall that drops UDP.
    let black_hole = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let hole = black_hole.local_addr().unwrap().port();
    let connect_ms = 2000;
    let cases = [
        (
            "a certificate the gateway does not serve",
            r#"j.cert_hashes = ["ab".repeat(32)]"#.to_string(),
            None,
        ),
        (
            "UDP to the QUIC port dropped",
            format!("j.port = {hole}"),
            Some(format!("no connection within {connect_ms} ms")),
        ),
        (
            "the session refused",
            r#"j.path = "/v1/not-play""#.to_string(),
            None,
        ),
    ];
    for (what, patch, expect) in cases {
        let url = format!(
            "{}&wt_connect_ms={connect_ms}",
            play_url_via(&gw, 320, 180, 30, "auto")
        );
        let page = browser
            .open_with(&url, Some(&rewrite_wt_info(&patch)))
            .await;
        let state = wait_eval(
            &page,
            FALLBACK_STATE,
            &format!("WebRTC after {what}"),
            |v| v["statsTransport"] == "webrtc" && v["decoded"].as_f64().unwrap_or(0.0) >= 30.0,
        )
        .await;
        println!("{what}: {state}");
        assert_eq!(state["transport"], "webrtc", "{what}: {state}");
        assert_eq!(state["wt"], 1, "{what}: one WebTransport try: {state}");
        assert_eq!(state["pc"], 1, "{what}: {state}");
        assert_eq!(state["fallbacks"], 1, "{what}: {state}");
        let reason = state["reason"].as_str().unwrap_or("");
        assert!(
            reason.starts_with("WebTransport to https://127.0.0.1:"),
            "{what}: {state}"
        );
        if let Some(e) = &expect {
            assert!(reason.contains(e.as_str()), "{what}: {state}");
        }
        // The page says which transport it plays over, and why.
        assert_eq!(
            state["message"].as_str().unwrap_or(""),
            format!("Playing over WebRTC: {reason}"),
            "{what}"
        );
        // And so does the stats overlay, expanded (the next tick renders it).
        page.eval("document.getElementById('stats').classList.remove('collapsed')")
            .await
            .unwrap();
        wait_eval(
            &page,
            "document.getElementById('stats').textContent",
            "the overlay's reason",
            |v| {
                v.as_str()
                    .is_some_and(|t| t.contains(&format!("(not WebTransport: {reason})")))
            },
        )
        .await;
        // Bounded: the try took at most the connect time (plus scheduling on a loaded machine).
        let ms = state["fallbackMs"].as_f64().unwrap();
        assert!(ms < f64::from(connect_ms) + 1500.0, "{what}: {state}");
        if expect.is_some() {
            assert!(ms >= f64::from(connect_ms) - 50.0, "{what}: {state}");
        }
        let sessions = wait_sessions(&gw, "the WebRTC session", Duration::from_secs(5), |l| {
            l.len() == 1
        })
        .await;
        assert_eq!(sessions[0]["transport"], "webrtc", "{what}");
        page.eval("window.nearpath.stop()").await.unwrap();
        wait_sessions(&gw, "the session to end", Duration::from_secs(10), |l| {
            l.is_empty()
        })
        .await;
        drop(page);
    }
    // The refusal was the gateway's: it counted the unknown path.
    let metrics = gw.admin_get_text("/metrics").await;
    assert!(
        metrics.contains("nearpath_webtransport_refused_total{reason=\"path\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("webtransport_refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(black_hole);
    drop(browser);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Guards the failure after playing: the WebTransport path to a live gateway is cut mid-game
/// (UDP to its QUIC port dropped from then on). The connection times out, the gateway (which
/// still answers over HTTP) has ended the session with it, so nothing can resume it: the page
/// starts a new session, tries WebTransport once (bounded by `wt_connect_ms`, still cut) and
/// plays on over WebRTC, saying why; the gateway is left with the WebRTC session alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webtransport_path_cut_mid_game_plays_on_over_webrtc_while_the_gateway_lives() {
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(with_arena(gw.node_config("de-1", &gw.token)), ip(DE));
    node.registered().await;
    let relay = UdpRelay::start(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        gw.addrs.quic.port(),
    )))
    .await;
    let browser = Browser::launch().await;
    let url = format!(
        "{}&wt_connect_ms=2000",
        play_url_via(&gw, 320, 180, 30, "auto")
    );
    let page = browser
        .open_with(
            &url,
            Some(&rewrite_wt_info(&format!("j.port = {}", relay.port))),
        )
        .await;
    let state = wait_eval(
        &page,
        FALLBACK_STATE,
        "WebTransport through the relay",
        |v| v["statsTransport"] == "webtransport" && v["decoded"].as_f64().unwrap_or(0.0) >= 30.0,
    )
    .await;
    assert_eq!(state["wt"], 1, "{state}");
    let first = wait_sessions(
        &gw,
        "the WebTransport session",
        Duration::from_secs(5),
        |l| l.len() == 1,
    )
    .await;
    assert_eq!(first[0]["transport"], "webtransport");
    let cut_at = Instant::now();
    relay.cut();
    // The connection's idle timeout (quic.idle_timeout_ms, 10 s by default) ends it.
    let state = wait_eval_for(
        &page,
        FALLBACK_STATE,
        "WebRTC after the cut",
        Duration::from_secs(60),
        |v| v["statsTransport"] == "webrtc" && v["decoded"].as_f64().unwrap_or(0.0) >= 30.0,
    )
    .await;
    println!(
        "path cut mid-game: playing over WebRTC {:.1} s later: {state}",
        cut_at.elapsed().as_secs_f64()
    );
    assert_eq!(state["transport"], "webrtc", "{state}");
    assert_eq!(state["restarts"], 1, "{state}");
    assert_eq!(state["wt"], 2, "one more WebTransport try: {state}");
    assert_eq!(state["pc"], 1, "{state}");
    assert_eq!(state["fallbacks"], 1, "{state}");
    assert!(state["lastLost"].is_string(), "{state}");
    let reason = state["reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("WebTransport was lost mid-game (")
            && reason.contains("no connection within 2000 ms"),
        "{state}"
    );
    assert_eq!(
        state["message"].as_str().unwrap_or(""),
        format!("Playing over WebRTC: {reason}")
    );
    let now = wait_sessions(
        &gw,
        "the WebRTC session alone",
        Duration::from_secs(10),
        |l| l.len() == 1 && l[0]["transport"] == "webrtc",
    )
    .await;
    assert_ne!(now[0]["id"], first[0]["id"]);
    page.eval("window.nearpath.stop()").await.unwrap();
    wait_sessions(&gw, "the session to end", Duration::from_secs(10), |l| {
        l.is_empty()
    })
    .await;
    drop(page);
    drop(browser);
    drop(relay);
    node.stop().await.unwrap();
    gw.stop().await;
}
