//! Game sessions across a federation by redirect (issue 13): two gateways sharing one store, the
//! game node attached only to B. A client at A is sent to B with a signed, single-use ticket and
//! plays there (native QUIC and WHEP); B refuses forged, expired, replayed and misdirected
//! tickets.
//!
//! The gateway and node directories are the store's (other work of issue 13); here A reads them
//! through a stand-in `FederationView` built from B's real registry, as B would publish it.

mod common;

use common::*;
use nearpath_gateway::game::redirect::FederationView;
use nearpath_gateway::store::{GatewayRecord, NodeDirEntry, StoreError, UsageKind};
use nearpath_gateway::ticket::{TicketClaims, MAX_TICKET_TTL_MS};
use nearpath_protocol::{ClientError, ControlEvent, PlayParams};
use nearpath_tests::wt_client::{self, WtClientError, WtPlayer};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHROMIUM_OFFER: &str = include_str!("../browser/chromium-156-offer.sdp");

struct Directories {
    gateways: Vec<GatewayRecord>,
    nodes: Vec<NodeDirEntry>,
}

impl FederationView for Directories {
    fn gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        Ok(self.gateways.clone())
    }
    fn node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        Ok(self.nodes.clone())
    }
}

fn record(id: &str, gw: &TestGateway, expires_at_ms: u64) -> GatewayRecord {
    GatewayRecord {
        id: id.into(),
        region: format!("region-{id}"),
        lat: 50.0,
        lon: 8.0,
        quic_address: gw.addrs.quic.to_string(),
        http_url: format!("http://{}", gw.addrs.http),
        cert_sha256: nearpath_protocol::tls::sha256_hex(&gw.sha),
        version: "0.1.0".into(),
        started_at_ms: 0,
        heartbeat_at_ms: 0,
        // What a store can hold (readers check entries as a publication is checked).
        expires_at_ms: expires_at_ms.min(i64::MAX as u64),
    }
}

/// What B publishes about its live nodes.
fn published(b: &TestGateway) -> Vec<NodeDirEntry> {
    b.shared
        .directory
        .registry
        .list()
        .iter()
        .map(|n| {
            let loc = n.location();
            NodeDirEntry {
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
                game_slots: 2,
                game_free: 2,
                accepting: true,
                verification: "unverified".into(),
                updated_at_ms: 0,
                encoders: Vec::new(),
                model_caps: Vec::new(),
                subdivision: nearpath_gateway::store::directory::publishable_subdivision(&loc),
            }
        })
        .collect()
}

/// A sees the federation: itself, B (lease held) and B's nodes.
fn publish(a: &TestGateway, b: &TestGateway, b_expires_at_ms: u64) {
    a.shared
        .games
        .federation()
        .expect("A is in a federation")
        .set_view(Arc::new(Directories {
            gateways: vec![record("a", a, u64::MAX), record("b", b, b_expires_at_ms)],
            nodes: published(b),
        }));
}

/// Gateways A and B on one store; raw nodes need no heartbeats from them within the test.
async fn federation(
    edit_b: impl FnOnce(&mut nearpath_config::GatewayConfig),
) -> (tempfile::TempDir, TestGateway, TestGateway) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("federation.db");
    let a = TestGateway::start_at(path.clone(), |c| {
        c.federation.gateway_id = Some("a".into());
        c.nodes.heartbeat_ms = 60_000;
    })
    .await;
    let b = TestGateway::start_at(path, |c| {
        c.federation.gateway_id = Some("b".into());
        c.nodes.heartbeat_ms = 60_000;
        edit_b(c);
    })
    .await;
    (dir, a, b)
}

fn small(game: &str) -> PlayParams {
    PlayParams {
        game: game.into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
    }
}

fn now_ms() -> u64 {
    unix_micros_now() / 1000
}

/// Plays `frames` frames from the raw node to the session; returns the mean capture-to-receipt
/// time in microseconds.
async fn relay_frames(
    node: &RawNode,
    session_id: u64,
    session: &mut nearpath_protocol::PlaySession,
    frames: u64,
) -> u64 {
    let mut total = 0;
    for seq in 0..frames {
        node.send_video_frame(session_id, seq, &[0, 0, 0, 1, 0x65, seq as u8])
            .await
            .unwrap();
        let f = tokio::time::timeout(Duration::from_secs(5), session.next_frame())
            .await
            .expect("frame in time")
            .unwrap()
            .expect("a frame");
        assert_eq!((f.header.session_id, f.header.seq), (session_id, seq));
        total += unix_micros_now().saturating_sub(f.header.capture_ts_us);
    }
    total / frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_client_at_a_is_redirected_to_the_node_on_b_plays_and_is_billed_once_on_b() {
    let (_dir, a, b) = federation(|_| {}).await;
    let node = raw_game_node(&b, "b-1", ip(DE), &b.token, &["arena"], 2).await;
    publish(&a, &b, u64::MAX);

    // The baseline: the same session with the client at B directly.
    let direct = native_client(&b, FR_CLIENT).await;
    let t0 = Instant::now();
    let (s, g) = tokio::join!(direct.play(API_KEY, small("arena")), node.accept_game());
    let direct_start = t0.elapsed();
    let mut s = s.unwrap();
    assert!(s.redirect().is_none());
    let direct_frame_us = relay_frames(&node, g.session_id, &mut s, 30).await;
    s.close("done").await.unwrap();
    drop((s, g));

    // Through A: redirected to B, transparently.
    let c = native_client(&a, FR_CLIENT).await;
    let t0 = Instant::now();
    let (s, g) = tokio::join!(c.play(API_KEY, small("arena")), node.accept_game());
    let redirected_start = t0.elapsed();
    let mut s = s.unwrap();
    let r = s.redirect().expect("the session was redirected").clone();
    assert_eq!(r.gateway_id, "b");
    assert_eq!(s.gateway(), b.addrs.quic, "the session lives on B");
    assert_eq!(s.started().session_id, g.session_id);
    assert_eq!((s.started().width, s.started().height), (320, 180));
    let redirected_frame_us = relay_frames(&node, g.session_id, &mut s, 30).await;
    println!(
        "session start: direct at B {:.1} ms, redirected A -> B {:.1} ms (one-time redirect cost {:.1} ms); \
         mean frame latency: direct {direct_frame_us} us, redirected {redirected_frame_us} us",
        direct_start.as_secs_f64() * 1e3,
        redirected_start.as_secs_f64() * 1e3,
        (redirected_start.as_secs_f64() - direct_start.as_secs_f64()) * 1e3,
    );
    // B runs the session; A holds none and counted a redirect.
    assert!(admin_game_session(&b, g.session_id).await.is_some());
    assert!(admin_game_session(&a, g.session_id).await.is_none());
    let page = a.admin_get_text("/metrics").await;
    assert!(
        page.contains("outcome=\"redirected\""),
        "A counts the redirect: {}",
        page.lines()
            .filter(|l| l.contains("game_sessions"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    s.close("done").await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.next_control()).await {
            Ok(Ok(Some(ControlEvent::Ended(_)))) | Ok(Ok(None)) | Ok(Err(_)) => break,
            Ok(Ok(Some(_))) => continue,
            Err(_) => panic!("no Ended after Close"),
        }
    }
    // Billed once, by B, for the node on B: one usage row of this session in the shared store.
    let id = format!("game_{}", g.session_id);
    let row = eventually(
        "the session's final usage row",
        Duration::from_secs(10),
        || async {
            let rows: Vec<_> = b
                .store
                .list_usage(100)
                .unwrap()
                .into_iter()
                .filter(|u| u.kind == UsageKind::Game && u.request_id.starts_with(&id))
                .collect();
            (rows.len() == 1 && rows[0].outcome != "in_progress").then(|| rows[0].clone())
        },
    )
    .await;
    assert_eq!(row.node_id, "b-1");
    assert_eq!(row.frames, 30, "{row:?}");
    drop(g);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_lease_expired_is_not_a_redirect_target() {
    let (_dir, a, b) = federation(|_| {}).await;
    let _node = raw_game_node(&b, "b-1", ip(DE), &b.token, &["arena"], 1).await;
    publish(&a, &b, now_ms().saturating_sub(1));
    let c = native_client(&a, FR_CLIENT).await;
    match c.play(API_KEY, small("arena")).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "unknown_game"),
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|s| s.redirect().cloned())
        ),
    }
    a.stop().await;
    b.stop().await;
}

/// Regression (issue 13): A judged B's nodes by country only, so a rule naming a subdivision
/// (here: no node in DE-BY may serve) never matched them and A redirected into it. The node in
/// DE-BY is placed nearest the client, so only the rule keeps A off it. (Not UA-43: the default
/// sanctions rule keeps B from admitting a node there at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subdivision_rule_at_a_keeps_redirects_off_bs_node_in_that_subdivision() {
    const BAVARIA: (&str, &str, f64, f64) = ("127.0.0.30", "DE", 48.86, 2.36);
    const BERLIN: (&str, &str, f64, f64) = ("127.0.0.31", "DE", 52.52, 13.40);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("federation.db");
    let a = TestGateway::start_at(path.clone(), |c| {
        c.federation.gateway_id = Some("a".into());
        c.nodes.heartbeat_ms = 60_000;
        c.geofence.rules = vec![nearpath_config::GeofenceRule {
            name: "no-bavaria".into(),
            enabled: true,
            reason: None,
            gpu_classes: vec![],
            workloads: vec![],
            deny_client_countries: vec![],
            deny_node_countries: vec!["DE-BY".into()],
            residency_client_countries: vec![],
            residency_node_countries: vec![],
            unknown_location: nearpath_config::UnknownPolicy::Allow,
        }];
    })
    .await;
    let b = TestGateway::start_at(path, |c| {
        c.federation.gateway_id = Some("b".into());
        c.nodes.heartbeat_ms = 60_000;
        for (p, sub) in [(BAVARIA, "DE-BY"), (BERLIN, "DE-BE")] {
            let mut o = place(p);
            o.subdivision = Some(sub.into());
            c.geo.overrides.push(o);
        }
    })
    .await;
    let bavaria = raw_game_node(&b, "b-bavaria", ip(BAVARIA), &b.token, &["arena"], 1).await;
    publish(&a, &b, u64::MAX);
    let c = native_client(&a, FR_CLIENT).await;
    match c.play(API_KEY, small("arena")).await {
        Err(ClientError::Refused { .. }) => {}
        other => panic!(
            "the only node is in DE-BY: expected a refusal, got {:?}",
            other.map(|s| s.redirect().cloned())
        ),
    }

    let berlin = raw_game_node(&b, "b-berlin", ip(BERLIN), &b.token, &["arena"], 1).await;
    publish(&a, &b, u64::MAX);
    let (s, g) = tokio::join!(c.play(API_KEY, small("arena")), berlin.accept_game());
    let s = s.expect("redirected to the node outside DE-BY");
    assert_eq!(s.redirect().expect("redirected").gateway_id, "b");
    assert_eq!(
        s.started().session_id,
        g.session_id,
        "the node in DE-BE runs it"
    );
    drop((s, g, bavaria));
    a.stop().await;
    b.stop().await;
}

/// Seals `claims` with the federation's secret, as a gateway of the federation would.
fn seal(b: &TestGateway, claims: &TicketClaims) -> String {
    let secret = b.store.federation_secret(&[0u8; 32]).unwrap();
    claims.seal(&secret)
}

fn claims_for(b: &TestGateway, node: &str) -> TicketClaims {
    let key = b
        .store
        .list_api_keys()
        .unwrap()
        .into_iter()
        .find(|k| k.tenant == "tenant-a")
        .unwrap();
    TicketClaims {
        issuer: "a".into(),
        target: "b".into(),
        key_id: key.id,
        node_id: node.into(),
        client_ip: ip(FR_CLIENT),
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
        codec: nearpath_protocol::VideoCodec::H264,
        expires_at_ms: now_ms() + 10_000,
        nonce: rand::random(),
    }
}

async fn refused_code(b: &TestGateway, from: (&str, &str, f64, f64), ticket: &str) -> String {
    let c = native_client(b, from).await;
    match c.play_ticket(API_KEY, ticket).await {
        Err(ClientError::Refused {
            code, retryable, ..
        }) => {
            assert!(!retryable || code == "ticket_node_unavailable", "{code}");
            code
        }
        Ok(_) => panic!("the ticket was honoured"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tickets_forged_expired_replayed_misaddressed_or_naming_another_node_are_refused() {
    let (_dir, a, b) = federation(|_| {}).await;
    let node = raw_game_node(&b, "b-1", ip(DE), &b.token, &["arena"], 2).await;

    // Forged: a MAC made with a guessed secret, and a good ticket with one digit changed.
    let forged = claims_for(&b, "b-1").seal(&[7u8; 32]);
    assert_eq!(refused_code(&b, FR_CLIENT, &forged).await, "bad_ticket");
    let mut edited = seal(&b, &claims_for(&b, "b-1")).into_bytes();
    edited[10] = if edited[10] == b'0' { b'1' } else { b'0' };
    assert_eq!(
        refused_code(&b, FR_CLIENT, std::str::from_utf8(&edited).unwrap()).await,
        "bad_ticket"
    );
    // Hostile sizes and shapes.
    assert_eq!(
        refused_code(&b, FR_CLIENT, &"ab".repeat(5_000)).await,
        "bad_ticket"
    );
    assert_eq!(
        refused_code(&b, FR_CLIENT, "not hex at all").await,
        "bad_ticket"
    );

    // Expired, and one claiming a life longer than tickets get.
    let mut expired = claims_for(&b, "b-1");
    expired.expires_at_ms = now_ms() - 1;
    assert_eq!(
        refused_code(&b, FR_CLIENT, &seal(&b, &expired)).await,
        "bad_ticket"
    );
    let mut long = claims_for(&b, "b-1");
    long.expires_at_ms = now_ms() + MAX_TICKET_TTL_MS + 60_000;
    assert_eq!(
        refused_code(&b, FR_CLIENT, &seal(&b, &long)).await,
        "bad_ticket"
    );

    // Issued to another client address, for another gateway, or to another key.
    let good = seal(&b, &claims_for(&b, "b-1"));
    assert_eq!(refused_code(&b, KR_CLIENT, &good).await, "bad_ticket");
    let mut other_gw = claims_for(&b, "b-1");
    other_gw.target = "c".into();
    assert_eq!(
        refused_code(&b, FR_CLIENT, &seal(&b, &other_gw)).await,
        "bad_ticket"
    );
    let mut other_key = claims_for(&b, "b-1");
    other_key.key_id = "key_someone_else".into();
    assert_eq!(
        refused_code(&b, FR_CLIENT, &seal(&b, &other_key)).await,
        "bad_ticket"
    );

    // Naming a node that is not attached to B: not placed anywhere else.
    let elsewhere = seal(&b, &claims_for(&b, "c-1"));
    assert_eq!(
        refused_code(&b, FR_CLIENT, &elsewhere).await,
        "ticket_node_unavailable"
    );

    // The good ticket (refused above only for its address) plays once, then is spent.
    let c = native_client(&b, FR_CLIENT).await;
    let (s, g) = tokio::join!(c.play_ticket(API_KEY, &good), node.accept_game());
    let s = s.unwrap();
    assert_eq!(s.started().session_id, g.session_id);
    assert_eq!(refused_code(&b, FR_CLIENT, &good).await, "bad_ticket");
    // A ticket is no API key: a wrong key is refused before the ticket is looked at.
    let c2 = native_client(&b, FR_CLIENT).await;
    match c2
        .play_ticket("not-a-key", &seal(&b, &claims_for(&b, "b-1")))
        .await
    {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "unauthorized"),
        other => panic!("expected unauthorized, got {:?}", other.is_ok()),
    }
    drop((s, g));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_post_to_a_gets_a_307_to_b_whose_ticket_b_accepts_once() {
    const PORTS: (u16, u16) = (47_530, 47_533);
    let (_dir, a, b) = federation(|c| {
        (c.game.webrtc_udp_port_min, c.game.webrtc_udp_port_max) = PORTS;
    })
    .await;
    let node = raw_game_node(&b, "b-1", ip(DE), &b.token, &["arena"], 2).await;
    publish(&a, &b, u64::MAX);
    let auth = format!("Bearer {API_KEY}");
    // The client is FR_CLIENT, behind the trusted local proxy.
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/sdp"),
        ("x-forwarded-for", FR_CLIENT.0),
    ];
    let whep_a = a.api_url("/v1/games/arena/whep?width=320&height=180&fps=30");
    let (status, h, body) = request("POST", &whep_a, &headers, CHROMIUM_OFFER).await;
    assert_eq!(status, 307, "{body}");
    let location = h["location"].to_str().unwrap().to_string();
    let prefix = format!("http://{}/v1/games/arena/whep?ticket=", b.addrs.http);
    assert!(location.starts_with(&prefix), "{location}");

    // B accepts the ticket (with the key) and places the session on its node.
    let ((status, h, body), g) = tokio::join!(
        request("POST", &location, &headers, CHROMIUM_OFFER),
        node.accept_game()
    );
    assert_eq!(status, 201, "{body}");
    assert!(body.starts_with("v=0"), "an SDP answer: {body:.40}");
    let session = h["location"].to_str().unwrap().to_string();
    assert_eq!(session, format!("/v1/sessions/{}", g.session_id));

    // Single use: the same ticket again is refused.
    let (status, _, body) = request("POST", &location, &headers, CHROMIUM_OFFER).await;
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "bad_ticket", "{body}");

    // A page that follows redirects itself (`/play`) gets the same as JSON.
    let mut manual = headers.to_vec();
    manual.push(("nearpath-redirect", "manual"));
    let (status, _, body) = request("POST", &whep_a, &manual, CHROMIUM_OFFER).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "redirect");
    assert_eq!(v["gateway_id"], "b");
    assert!(v["location"].as_str().unwrap().starts_with(&prefix), "{v}");

    let (status, _, _) = request("DELETE", &b.api_url(&session), &headers[..1], "").await;
    assert_eq!(status, 200);
    drop(g);
    a.stop().await;
    b.stop().await;
}

/// One HTTP request with a raw body (the common client sends JSON bodies only).
async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
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
    let h = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, h, String::from_utf8_lossy(&body).into_owned())
}

/// Where a page follows a [`Redirect`](nearpath_protocol::message::Redirect) over WebTransport:
/// `GET {http_url}/v1/webtransport` of the peer (any origin may read it), then a WebTransport
/// session to the peer's host on the port and path it names, pinned to its hashes.
async fn wt_follow(http_url: &str, from: (&str, &str, f64, f64)) -> web_transport_quinn::Session {
    let url: url::Url = http_url.parse().unwrap();
    let http: std::net::SocketAddr = format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap()
    )
    .parse()
    .unwrap();
    let info = wt_client::fetch_info(http).await.unwrap();
    let quic = std::net::SocketAddr::new(http.ip(), info.port);
    let (session, _) = wt_client::connect(ip(from), quic, &info.path, &info.cert_hashes)
        .await
        .unwrap();
    session
}

async fn wt_session_at(
    gw: &TestGateway,
    from: (&str, &str, f64, f64),
) -> web_transport_quinn::Session {
    wt_follow(&format!("http://{}", gw.addrs.http), from).await
}

/// Issue 17 ("not carried over WebTransport"): a WebTransport player at A is redirected to the
/// node on B with the native `Redirect`, follows it with what the message carries (the peer's
/// HTTP URL, then its `/v1/webtransport`), presents the ticket over WebTransport and plays on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webtransport_player_at_a_is_redirected_and_plays_on_b_with_its_ticket() {
    let (_dir, a, b) = federation(|_| {}).await;
    let node = raw_game_node(&b, "b-1", ip(DE), &b.token, &["arena"], 2).await;
    publish(&a, &b, u64::MAX);

    let session = wt_session_at(&a, FR_CLIENT).await;
    let redirect = match WtPlayer::play(
        session,
        wt_client::play_request(API_KEY, "arena", 320, 180, 30),
    )
    .await
    {
        Err(WtClientError::Redirected(r)) => r,
        Ok(p) => panic!("A played the session itself: {}", p.started.session_id),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(redirect.gateway_id, "b");
    assert_eq!(redirect.http_url, format!("http://{}", b.addrs.http));
    assert!(admin_game_session_list(&a).await.is_empty(), "A holds none");

    // The page that follows it was served by A: B's WebTransport info is readable from A's
    // origin although B lists no CORS origins.
    let a_origin = format!("http://{}", a.addrs.http);
    let (status, headers, _) = b
        .http
        .request(
            "GET",
            &format!("{}/v1/webtransport", redirect.http_url),
            None,
            None,
            &[("origin", a_origin.as_str())],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("*")
    );
    let session = wt_follow(&redirect.http_url, FR_CLIENT).await;
    let (p, g) = tokio::join!(
        WtPlayer::ticket(session, API_KEY, &redirect.ticket),
        node.accept_game()
    );
    let mut p = p.expect("B honours the ticket over WebTransport");
    assert_eq!(p.started.session_id, g.session_id);
    assert_eq!((p.started.width, p.started.height), (320, 180));
    assert!(
        p.resume_token.is_some(),
        "a federated gateway hands a WebTransport player a resume token"
    );
    for seq in 0..10u64 {
        node.send_video_frame(g.session_id, seq, &[0, 0, 0, 1, 0x65, seq as u8])
            .await
            .unwrap();
        let f = tokio::time::timeout(Duration::from_secs(5), p.next_frame())
            .await
            .expect("frame in time")
            .unwrap();
        assert_eq!((f.header.session_id, f.header.seq), (g.session_id, seq));
    }
    let listed = admin_game_session(&b, g.session_id)
        .await
        .expect("B runs the session");
    assert_eq!(listed["transport"], "webtransport", "{listed}");
    // Single use, over WebTransport too.
    let session = wt_follow(&redirect.http_url, FR_CLIENT).await;
    match WtPlayer::ticket(session, API_KEY, &redirect.ticket).await {
        Err(WtClientError::Refused { code, .. }) => assert_eq!(code, "bad_ticket"),
        other => panic!("a spent ticket played: {:?}", other.map(|p| p.started)),
    }
    drop((p, g));
    a.stop().await;
    b.stop().await;
}

async fn admin_game_session_list(gw: &TestGateway) -> Vec<Value> {
    gw.admin_get("/admin/sessions").await["data"]
        .as_array()
        .unwrap()
        .clone()
}

/// Hostile tickets over WebTransport get the native player's answer (`bad_ticket`, not
/// retryable; `unauthorized` for a wrong key) and allocate nothing on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tickets_over_webtransport_are_refused_as_natively_and_allocate_nothing() {
    let (_dir, a, b) = federation(|_| {}).await;
    let _node = raw_game_node(&b, "b-1", ip(DE), &b.token, &["arena"], 2).await;
    let forged = claims_for(&b, "b-1").seal(&[7u8; 32]);
    let mut expired = claims_for(&b, "b-1");
    expired.expires_at_ms = now_ms() - 1;
    let expired = seal(&b, &expired);
    let mut other_key = claims_for(&b, "b-1");
    other_key.key_id = "key_someone_else".into();
    let other_key = seal(&b, &other_key);
    let huge = "ab".repeat(5_000);
    let good = seal(&b, &claims_for(&b, "b-1"));
    type Place = (&'static str, &'static str, f64, f64);
    let cases: [(&str, &str, Place, &str); 6] = [
        (API_KEY, forged.as_str(), FR_CLIENT, "bad_ticket"),
        (API_KEY, expired.as_str(), FR_CLIENT, "bad_ticket"),
        (API_KEY, other_key.as_str(), FR_CLIENT, "bad_ticket"),
        (API_KEY, huge.as_str(), FR_CLIENT, "bad_ticket"),
        // Issued to another client address.
        (API_KEY, good.as_str(), KR_CLIENT, "bad_ticket"),
        ("not-a-key", good.as_str(), FR_CLIENT, "unauthorized"),
    ];
    for (key, ticket, from, want) in cases {
        let session = wt_session_at(&b, from).await;
        let wt = match WtPlayer::ticket(session, key, ticket).await {
            Err(WtClientError::Refused {
                code, retryable, ..
            }) => (code, retryable),
            Ok(p) => panic!("the ticket was honoured: {}", p.started.session_id),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(wt.0, want, "ticket {ticket:.16} from {}", from.0);
        let native = match native_client(&b, from).await.play_ticket(key, ticket).await {
            Err(ClientError::Refused {
                code, retryable, ..
            }) => (code, retryable),
            Ok(_) => panic!("native: the ticket was honoured"),
            Err(e) => panic!("native: {e}"),
        };
        assert_eq!(wt, native, "ticket {ticket:.16} from {}", from.0);
    }
    assert!(
        admin_game_session_list(&b).await.is_empty(),
        "B allocated a session"
    );
    let page = b.admin_get_text("/metrics").await;
    assert!(
        page.lines()
            .any(|l| l.contains("transport=\"webtransport\"")
                && l.contains("outcome=\"bad_ticket\"")),
        "refused WebTransport tickets are counted under their transport: {}",
        page.lines()
            .filter(|l| l.contains("bad_ticket"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    a.stop().await;
    b.stop().await;
}
