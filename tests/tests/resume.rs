//! A native game session survives losing its gateway (issue 13, item 5): gateways A and B of a
//! federation share one store; the game's node and the player reach A. A goes silent (both
//! paths blacked out, as kill -9 or a lost route looks from outside: no close ever arrives).
//! The node keeps the game running and re-registers with B; the player resumes the session
//! through B with its resume token (same session id), and the first frame it gets is a
//! keyframe, within 3 s of the blackout.
//!
//! The node has one game slot, so a resume that started a fresh game while the old one held
//! the slot would be refused: a resumed session proves the parked game itself was taken over.

mod common;

use common::*;
use nearpath_config::{GameEntry, GameSource};
use nearpath_protocol::message::Message;
use nearpath_protocol::tls::sha256_hex;
use nearpath_protocol::{ClientError, PlayParams, ServerVerify};
use nearpath_tests::wt_client::{self, WtClientError, WtPlayer};
use std::time::{Duration, Instant};

/// The origin of a `/play` page served by one gateway of the federation, which both list in
/// `http.cors_allowed_origins`.
const PAGE_ORIGIN: &str = "http://play.example";

/// Gateways A and B in one federation on a shared SQLite store.
async fn federation() -> (tempfile::TempDir, TestGateway, TestGateway) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("federation.db");
    let a = TestGateway::start_at(path.clone(), |c| {
        c.federation.gateway_id = Some("a".into());
        c.http.cors_allowed_origins = vec![PAGE_ORIGIN.into()];
    })
    .await;
    let b = TestGateway::start_at(path, |c| {
        c.federation.gateway_id = Some("b".into());
        c.http.cors_allowed_origins = vec![PAGE_ORIGIN.into()];
    })
    .await;
    (dir, a, b)
}

fn small() -> PlayParams {
    PlayParams {
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
    }
}

/// Reads frames until `n` arrived (bounded).
async fn frames(session: &mut nearpath_protocol::PlaySession, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        for _ in 0..n {
            session.next_frame().await.unwrap().expect("a frame");
        }
    })
    .await
    .expect("frames flow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_session_resumes_through_another_gateway_with_its_id_and_a_keyframe_within_3s() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (_dir, a, b) = federation().await;
    // The node reaches each gateway through a relay that can be cut without a word; it
    // registers with one of them (the lowest round trip), called "home" below.
    let node_to_a = relay_from(&a, DE, 1).await;
    let node_to_b = relay_from(&b, DE, 2).await;
    let mut cfg = a.node_config("n-game", &a.token);
    cfg.gateway.address = String::new();
    cfg.gateway.addresses = vec![node_to_a.addr().to_string(), node_to_b.addr().to_string()];
    cfg.gateway.pinned_cert_sha256 = None;
    cfg.gateway.pinned_cert_sha256s = vec![sha256_hex(&a.sha), sha256_hex(&b.sha)];
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    cfg.capacity.game_sessions = 1;
    let mut node = TestNode::start(cfg, ip(DE));
    let at = match node
        .wait_status(|s| matches!(s, nearpath_edge_node::NodeStatus::Registered { .. }))
        .await
    {
        nearpath_edge_node::NodeStatus::Registered { gateway, .. } => gateway,
        _ => unreachable!(),
    };
    let (home, away, node_home) = if at == node_to_a.addr().to_string() {
        (&a, &b, &node_to_a)
    } else {
        (&b, &a, &node_to_b)
    };

    // The player reaches each gateway through its own relay (so both see it in FR).
    let player_home = relay_from(home, FR_CLIENT, 3).await;
    let player_away = relay_from(away, FR_CLIENT, 4).await;
    let pins = ServerVerify::PinnedAnySha256(vec![a.sha, b.sha]);
    let client = nearpath_protocol::Client::connect(player_home.addr(), "localhost", pins.clone())
        .await
        .unwrap();
    let mut session = client.play(API_KEY, small()).await.unwrap();
    assert!(
        session.redirect().is_none(),
        "the node's own gateway serves it"
    );
    let id = session.started().session_id;
    let token = session
        .resume_token()
        .expect("a federated gateway hands out a resume token")
        .to_string();
    assert_eq!(token.len(), 64);
    frames(&mut session, 10).await;

    // The home gateway dies, as far as anyone outside can tell.
    let cut = Instant::now();
    node_home.blackout_forever();
    player_home.blackout_forever();
    // The player notices the silence as `nearpath play` does (nothing for its
    // `--resume-after-ms`, 1 s by default) and resumes through the other gateway.
    let rx = || client.connection().stats().udp_rx.datagrams;
    let mut seen = (rx(), Instant::now());
    while seen.1.elapsed() < Duration::from_millis(1000) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if rx() != seen.0 {
            seen = (rx(), Instant::now());
        }
        assert!(
            cut.elapsed() < Duration::from_secs(5),
            "the gateway never went silent"
        );
    }
    drop(session);
    let noticed = cut.elapsed();
    let candidates = vec![
        player_home.addr().to_string(),
        player_away.addr().to_string(),
    ];
    let (client_b, mut resumed, via) = nearpath_gateway_cli::pick::resume_nearest(
        &candidates,
        player_home.addr(),
        Some("localhost"),
        pins.clone(),
        API_KEY,
        id,
        &token,
    )
    .await
    .expect("the session resumes through the other gateway");
    let answered = cut.elapsed();
    // The handshake and the resume take round trips, not a retransmission timeout: the test
    // relay once dropped every flow's first datagram, which added 1 s here.
    assert!(
        answered - noticed < Duration::from_millis(900),
        "resuming took {:?} after the silence was noticed",
        answered - noticed
    );
    assert_eq!(via, player_away.addr().to_string());
    assert_eq!(resumed.started().session_id, id, "the session keeps its id");
    let first = tokio::time::timeout(Duration::from_secs(5), resumed.next_frame())
        .await
        .expect("frames after the resume")
        .unwrap()
        .expect("a frame");
    let took = cut.elapsed();
    assert!(
        first.header.keyframe,
        "the first frame after a resume is a keyframe"
    );
    assert_eq!(first.header.session_id, id);
    assert!(
        took < Duration::from_secs(3),
        "resumed {took:?} after A went silent"
    );
    eprintln!(
        "resume through another gateway: silence noticed {} ms, answered {} ms, first frame {} ms after the cut",
        noticed.as_millis(),
        answered.as_millis(),
        took.as_millis()
    );
    let next_token = resumed.resume_token().expect("a fresh token").to_string();
    assert_ne!(next_token, token, "each gateway hands out its own token");
    frames(&mut resumed, 10).await;

    // The old token is spent: B's directory entry holds the new one's hash.
    let thief = nearpath_protocol::Client::connect(player_away.addr(), "localhost", pins.clone())
        .await
        .unwrap();
    match thief.resume(API_KEY, id, &token).await {
        Err(ClientError::Refused {
            code, retryable, ..
        }) => {
            assert_eq!(code, "bad_resume");
            assert!(!retryable);
        }
        other => panic!("a spent token resumed: {:?}", other.map(|s| *s.started())),
    }
    resumed.close("done").await.unwrap();
    client_b.close().await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_is_refused_for_a_wrong_token_another_key_an_unknown_session_or_outside_a_federation(
) {
    let (_dir, a, b) = federation().await;
    let mut cfg = a.node_config("n-game", &a.token);
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let client = native_client(&a, FR_CLIENT).await;
    let mut session = client.play(API_KEY, small()).await.unwrap();
    let id = session.started().session_id;
    let token = session.resume_token().unwrap().to_string();
    frames(&mut session, 3).await;

    let (_, other_key) = b
        .store
        .create_api_key("tenant-other", 100, 100_000)
        .unwrap();
    let at_b = native_client(&b, FR_CLIENT).await;
    let refused = |r: Result<nearpath_protocol::PlaySession, ClientError>| match r {
        Err(ClientError::Refused {
            code, retryable, ..
        }) => (code, retryable),
        Ok(s) => panic!("resumed session {}", s.started().session_id),
        Err(e) => panic!("{e}"),
    };
    let mut wrong = token.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    // A forged token, another tenant's key with the right token, an unknown id, a token of the
    // wrong shape and a huge one all get the same answer, so nothing can be probed.
    for (key, sid, tok) in [
        (API_KEY, id, wrong.as_str()),
        (other_key.as_str(), id, token.as_str()),
        (API_KEY, id ^ 1, token.as_str()),
        (API_KEY, id, "not-hex"),
        (API_KEY, id, &"a".repeat(60_000)),
        (API_KEY, 0, token.as_str()),
    ] {
        assert_eq!(
            refused(at_b.resume(key, sid, tok).await),
            ("bad_resume".to_string(), false),
            "key {key:.8}, session {sid}, token {:.16}",
            tok
        );
    }
    // The right token at the gateway still serving the session: retry later, not a new copy.
    let at_a = native_client(&a, FR_CLIENT).await;
    assert_eq!(
        refused(at_a.resume(API_KEY, id, &token).await),
        ("resume_conflict".to_string(), true)
    );
    // A wrong key is unauthorized, as for any request.
    let (code, _) = refused(at_b.resume("npk_nosuchkey", id, &token).await);
    assert_eq!(code, "unauthorized");
    session.close("done").await.unwrap();
    node.stop().await.unwrap();

    // A standalone gateway has no sessions directory: no token, and no resume.
    let solo = TestGateway::start(|_| {}).await;
    let c = native_client(&solo, FR_CLIENT).await;
    assert_eq!(
        refused(c.resume(API_KEY, id, &token).await),
        ("bad_resume".to_string(), false)
    );
}

/// A WebTransport session to the gateway whose HTTP API is at `http`, dialled at `quic` (the
/// gateway's QUIC port, or a relay in front of it) from `from`, as a page opens one.
async fn wt_session_via(
    http: std::net::SocketAddr,
    quic: std::net::SocketAddr,
    from: std::net::IpAddr,
) -> web_transport_quinn::Session {
    let info = wt_client::fetch_info(http).await.unwrap();
    let (session, _) = wt_client::connect(from, quic, &info.path, &info.cert_hashes)
        .await
        .unwrap();
    session
}

/// Reads WebTransport frames until `n` arrived (bounded).
async fn wt_frames(player: &mut WtPlayer, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        for _ in 0..n {
            player.next_frame().await.expect("a frame");
        }
    })
    .await
    .expect("frames flow");
}

/// Issue 17 ("not carried over WebTransport"): a WebTransport player resumes through another
/// gateway as a native one does: the same session id, a keyframe first, within 3 s of losing
/// its gateway; its frames then come over the new gateway's WebTransport session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webtransport_session_resumes_through_another_gateway_with_its_id_and_a_keyframe_within_3s(
) {
    let (_dir, a, b) = federation().await;
    let node_to_a = relay_from(&a, DE, 11).await;
    let node_to_b = relay_from(&b, DE, 12).await;
    let mut cfg = a.node_config("n-game", &a.token);
    cfg.gateway.address = String::new();
    cfg.gateway.addresses = vec![node_to_a.addr().to_string(), node_to_b.addr().to_string()];
    cfg.gateway.pinned_cert_sha256 = None;
    cfg.gateway.pinned_cert_sha256s = vec![sha256_hex(&a.sha), sha256_hex(&b.sha)];
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    cfg.capacity.game_sessions = 1;
    let mut node = TestNode::start(cfg, ip(DE));
    let at = match node
        .wait_status(|s| matches!(s, nearpath_edge_node::NodeStatus::Registered { .. }))
        .await
    {
        nearpath_edge_node::NodeStatus::Registered { gateway, .. } => gateway,
        _ => unreachable!(),
    };
    let (home, away, node_home) = if at == node_to_a.addr().to_string() {
        (&a, &b, &node_to_a)
    } else {
        (&b, &a, &node_to_b)
    };

    // The page plays through the home gateway's QUIC port behind a relay that can be cut.
    let player_home = relay_from(home, FR_CLIENT, 13).await;
    let session = wt_session_via(home.addrs.http, player_home.addr(), ip(FR_CLIENT)).await;
    let mut player = WtPlayer::play(
        session,
        wt_client::play_request(API_KEY, "arena", 320, 180, 30),
    )
    .await
    .unwrap();
    let id = player.started.session_id;
    let token = player
        .resume_token
        .clone()
        .expect("a federated gateway hands a WebTransport player a resume token");
    assert_eq!(token.len(), 64);
    wt_frames(&mut player, 10).await;

    // The home gateway dies, as far as anyone outside can tell.
    let cut = Instant::now();
    node_home.blackout_forever();
    player_home.blackout_forever();
    // The page notices the silence (no frame for 1 s) and resumes through the other gateway.
    loop {
        match tokio::time::timeout(Duration::from_millis(1000), player.next_frame()).await {
            Err(_) | Ok(Err(_)) => break,
            Ok(Ok(_)) => assert!(
                cut.elapsed() < Duration::from_secs(5),
                "the gateway never went silent"
            ),
        }
    }
    drop(player);
    let session = wt_session_via(away.addrs.http, away.addrs.quic, ip(FR_CLIENT)).await;
    let mut resumed = WtPlayer::resume(session, API_KEY, id, &token)
        .await
        .expect("the session resumes through the other gateway over WebTransport");
    assert_eq!(resumed.started.session_id, id, "the session keeps its id");
    let first = tokio::time::timeout(Duration::from_secs(5), resumed.next_frame())
        .await
        .expect("frames after the resume")
        .unwrap();
    let took = cut.elapsed();
    assert!(
        first.header.keyframe,
        "the first frame after a resume is a keyframe"
    );
    assert_eq!(first.header.session_id, id);
    assert!(
        took < Duration::from_secs(3),
        "resumed {took:?} after the gateway went silent"
    );
    eprintln!(
        "WebTransport resume through another gateway: first frame {} ms after the cut",
        took.as_millis()
    );
    let next_token = resumed.resume_token.clone().expect("a fresh token");
    assert_ne!(next_token, token, "each gateway hands out its own token");
    wt_frames(&mut resumed, 10).await;
    // The session runs on the other gateway, for a WebTransport player.
    let listed = admin_game_session(away, id)
        .await
        .expect("the other gateway holds the session");
    assert_eq!(listed["transport"], "webtransport", "{listed}");

    // The old token is spent, over WebTransport as natively.
    let session = wt_session_via(away.addrs.http, away.addrs.quic, ip(FR_CLIENT)).await;
    match WtPlayer::resume(session, API_KEY, id, &token).await {
        Err(WtClientError::Refused {
            code, retryable, ..
        }) => assert_eq!((code.as_str(), retryable), ("bad_resume", false)),
        other => panic!("a spent token resumed: {:?}", other.map(|p| p.started)),
    }
    resumed
        .send(&Message::Close(nearpath_protocol::message::Close {
            reason: "done".into(),
        }))
        .await
        .unwrap();
    node.stop().await.unwrap();
}

/// Hostile resumes over WebTransport get the native answers (`bad_resume`, not retryable, the
/// same for every wrong field so nothing can be probed; `unauthorized` for a wrong key) and
/// start nothing: the gateway holds no session afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_resumes_with_a_forged_token_another_key_or_an_unknown_session_are_refused_as_natively(
) {
    let (_dir, a, b) = federation().await;
    let mut cfg = a.node_config("n-game", &a.token);
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let client = native_client(&a, FR_CLIENT).await;
    let mut session = client.play(API_KEY, small()).await.unwrap();
    let id = session.started().session_id;
    let token = session.resume_token().unwrap().to_string();
    frames(&mut session, 3).await;

    let (_, other_key) = b
        .store
        .create_api_key("tenant-other", 100, 100_000)
        .unwrap();
    let mut wrong = token.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let huge = "a".repeat(60_000);
    let cases: [(&str, u64, &str, &str); 7] = [
        (API_KEY, id, wrong.as_str(), "bad_resume"),
        (other_key.as_str(), id, token.as_str(), "bad_resume"),
        (API_KEY, id ^ 1, token.as_str(), "bad_resume"),
        (API_KEY, id, "not-hex", "bad_resume"),
        (API_KEY, id, huge.as_str(), "bad_resume"),
        (API_KEY, 0, token.as_str(), "bad_resume"),
        ("npk_nosuchkey", id, token.as_str(), "unauthorized"),
    ];
    let at_b_native = native_client(&b, FR_CLIENT).await;
    for (key, sid, tok, want) in cases {
        let session = wt_session_via(b.addrs.http, b.addrs.quic, ip(FR_CLIENT)).await;
        let wt = match WtPlayer::resume(session, key, sid, tok).await {
            Err(WtClientError::Refused {
                code, retryable, ..
            }) => (code, retryable),
            Ok(p) => panic!("resumed session {}", p.started.session_id),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(wt.0, want, "key {key:.8}, session {sid}, token {tok:.16}");
        // The same answer a native client gets.
        let native = match at_b_native.resume(key, sid, tok).await {
            Err(ClientError::Refused {
                code, retryable, ..
            }) => (code, retryable),
            other => panic!("native: {:?}", other.map(|s| *s.started())),
        };
        assert_eq!(wt, native, "key {key:.8}, session {sid}, token {tok:.16}");
    }
    // Nothing was allocated: B holds no session, and A's runs on.
    assert!(
        admin_game_session(&b, id).await.is_none(),
        "B took the session"
    );
    let listed = b.admin_get("/admin/sessions").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{listed}");
    frames(&mut session, 3).await;
    session.close("done").await.unwrap();
    node.stop().await.unwrap();
}

/// What headless Chromium offers on `/play` (H.264, Opus, the input data channel).
const CHROMIUM_OFFER: &str = include_str!("../browser/chromium-156-offer.sdp");

/// A WHEP offer of `arena` (320x180 at 30 fps) to `gw` with the API key `key` and `extra`
/// headers (`Nearpath-Resume`, ...), from FR_CLIENT behind the trusted local proxy: (status,
/// headers, body).
async fn whep_offer(
    gw: &TestGateway,
    key: &str,
    extra: &[(&str, &[u8])],
) -> (u16, hyper::HeaderMap, String) {
    whep_offer_of(gw, key, extra, CHROMIUM_OFFER).await
}

/// [`whep_offer`] with `offer` as the SDP.
async fn whep_offer_of(
    gw: &TestGateway,
    key: &str,
    extra: &[(&str, &[u8])],
    offer: &str,
) -> (u16, hyper::HeaderMap, String) {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut b = hyper::Request::builder()
        .method("POST")
        .uri(gw.api_url("/v1/games/arena/whep?width=320&height=180&fps=30"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/sdp")
        .header("x-forwarded-for", FR_CLIENT.0);
    for (k, v) in extra {
        b = b.header(*k, hyper::header::HeaderValue::from_bytes(v).unwrap());
    }
    let req = b
        .body(http_body_util::Full::new(bytes::Bytes::from(
            offer.to_string(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("the offer is answered")
        .unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, h, String::from_utf8_lossy(&body).into_owned())
}

/// Chromium's offer without H.264 (and the retransmission formats that go with it): a browser
/// that cannot decode the codec a session was started in.
fn offer_without_h264() -> String {
    let attr_pt = |l: &str| -> Option<String> {
        let rest = l
            .strip_prefix("a=rtpmap:")
            .or_else(|| l.strip_prefix("a=fmtp:"))
            .or_else(|| l.strip_prefix("a=rtcp-fb:"))?;
        Some(rest.split(' ').next()?.to_string())
    };
    let mut h264: Vec<String> = CHROMIUM_OFFER
        .lines()
        .filter(|l| l.starts_with("a=rtpmap:") && l.contains(" H264/"))
        .filter_map(attr_pt)
        .collect();
    let rtx: Vec<String> = CHROMIUM_OFFER
        .lines()
        .filter(|l| {
            l.starts_with("a=fmtp:")
                && l.split("apt=")
                    .nth(1)
                    .is_some_and(|apt| h264.iter().any(|p| p == apt.trim()))
        })
        .filter_map(attr_pt)
        .collect();
    h264.extend(rtx);
    let mut out = String::new();
    for l in CHROMIUM_OFFER.lines() {
        if attr_pt(l).is_some_and(|pt| h264.contains(&pt)) {
            continue;
        }
        if let Some(rest) = l.strip_prefix("m=video ") {
            let kept: Vec<&str> = rest
                .split(' ')
                .enumerate()
                .filter(|(i, f)| *i < 2 || !h264.iter().any(|p| p == f))
                .map(|(_, f)| f)
                .collect();
            out.push_str(&format!("m=video {}\r\n", kept.join(" ")));
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    assert!(!out.contains(" H264/"), "{out}");
    out
}

/// The session id in an answered offer's `Location` (`/v1/sessions/{id}`).
fn whep_session_id(h: &hyper::HeaderMap) -> u64 {
    let loc = h["location"].to_str().unwrap();
    loc.strip_prefix("/v1/sessions/")
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("Location {loc}"))
}

/// The error code of a refused offer's JSON body.
fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    v["error"]["code"].as_str().unwrap_or("").to_string()
}

/// Issue 13, item 5 (`/play` over WebRTC): a WHEP player of a federation gets its session's
/// resume token (`Nearpath-Resume-Token`, readable cross-origin), and when its gateway is lost
/// an offer to another gateway with `Nearpath-Resume: {id}:{token}` takes the same session
/// over, as a native `PlayResume` does: same id, the session's size and codec, metered as
/// `outcome="resumed"`, a fresh token, and the old token spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_session_resumes_through_another_gateway_with_its_id_size_and_codec() {
    let (_dir, a, b) = federation().await;
    let node_to_a = relay_from(&a, DE, 21).await;
    let node_to_b = relay_from(&b, DE, 22).await;
    let mut cfg = a.node_config("n-game", &a.token);
    cfg.gateway.address = String::new();
    cfg.gateway.addresses = vec![node_to_a.addr().to_string(), node_to_b.addr().to_string()];
    cfg.gateway.pinned_cert_sha256 = None;
    cfg.gateway.pinned_cert_sha256s = vec![sha256_hex(&a.sha), sha256_hex(&b.sha)];
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    cfg.capacity.game_sessions = 1;
    let mut node = TestNode::start(cfg, ip(DE));
    let at = match node
        .wait_status(|s| matches!(s, nearpath_edge_node::NodeStatus::Registered { .. }))
        .await
    {
        nearpath_edge_node::NodeStatus::Registered { gateway, .. } => gateway,
        _ => unreachable!(),
    };
    let (home, away, node_home) = if at == node_to_a.addr().to_string() {
        (&a, &b, &node_to_a)
    } else {
        (&b, &a, &node_to_b)
    };

    let (status, h, body) = whep_offer(home, API_KEY, &[]).await;
    assert_eq!(status, 201, "{body}");
    let id = whep_session_id(&h);
    let token = h
        .get("nearpath-resume-token")
        .expect("a federated gateway hands a WHEP player a resume token")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(token.len(), 64);
    let before = home.store.get_session_dir(id).unwrap().expect("published");

    // The home gateway's node link dies; the node moves to the other gateway, where the
    // player's new offer resumes the session.
    node_home.blackout_forever();
    // A player notices the silence after a second (the page's rule); by then the node has
    // moved. (Before it has, the resume is refused as natively: no node serves the game
    // there yet.)
    let away_relay = if std::ptr::eq(away, &a) {
        &node_to_a
    } else {
        &node_to_b
    }
    .addr()
    .to_string();
    node.wait_status(|s| {
        matches!(s, nearpath_edge_node::NodeStatus::Registered { gateway, .. } if *gateway == away_relay)
    })
    .await;
    let resumed_metric = r#"nearpath_game_sessions_total{transport="webrtc",outcome="resumed"}"#;
    let resume = format!("{id}:{token}");
    // A page served by the lost gateway asks first whether it may send the header.
    let whep_url = away.api_url("/v1/games/arena/whep");
    let (status, pre, _) = away
        .http
        .request(
            "OPTIONS",
            &whep_url,
            None,
            None,
            &[
                ("origin", PAGE_ORIGIN),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type, nearpath-resume",
                ),
            ],
        )
        .await;
    assert_eq!(status, 204);
    let allowed = pre["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("nearpath-resume"), "{allowed}");
    let (status, h, body) = whep_offer(
        away,
        API_KEY,
        &[
            ("nearpath-resume", resume.as_bytes()),
            ("origin", PAGE_ORIGIN.as_bytes()),
        ],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The page reads the new token across origins.
    assert_eq!(h["access-control-allow-origin"], PAGE_ORIGIN);
    let exposed = h["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("Nearpath-Resume-Token"), "{exposed}");
    assert!(body.starts_with("v=0"), "an SDP answer: {body:.40}");
    assert_eq!(whep_session_id(&h), id, "the session keeps its id");
    let next = h["nearpath-resume-token"].to_str().unwrap().to_string();
    assert_ne!(next, token, "each gateway hands out its own token");
    assert_eq!(admin_metric(away, resumed_metric).await, 1.0);
    let after = admin_game_session(away, id)
        .await
        .expect("the other gateway holds the session");
    assert_eq!(after["transport"], "webrtc", "{after}");
    let entry = away.store.get_session_dir(id).unwrap().expect("published");
    assert_eq!(
        entry.gateway_id,
        if std::ptr::eq(away, &a) { "a" } else { "b" }
    );
    assert_eq!(
        (
            entry.game,
            entry.width,
            entry.height,
            entry.fps,
            entry.codec
        ),
        (
            before.game,
            before.width,
            before.height,
            before.fps,
            before.codec
        ),
        "the session's game, size and codec are kept"
    );

    // The old token is spent, and the new one is refused at the gateway that runs the session
    // (it is live there), as natively.
    let (status, _, body) =
        whep_offer(away, API_KEY, &[("nearpath-resume", resume.as_bytes())]).await;
    assert_eq!(
        (status, error_code(&body)),
        (403, "bad_resume".into()),
        "{body}"
    );
    let live = format!("{id}:{next}");
    let (status, h, body) =
        whep_offer(away, API_KEY, &[("nearpath-resume", live.as_bytes())]).await;
    assert_eq!(
        (status, error_code(&body)),
        (503, "resume_conflict".into()),
        "{body}"
    );
    assert!(h.contains_key("retry-after"));
    assert_eq!(admin_metric(away, resumed_metric).await, 1.0);
    node.stop().await.unwrap();
}

/// Hostile `Nearpath-Resume` offers get the native answers and start nothing: a forged token,
/// another key's, an unknown or ended session, a token of the wrong shape → 403 `bad_resume`
/// (what a native `PlayResume` gets); a wrong key → 401; an over-long, non-ASCII, repeated or
/// malformed header → 400; the token of a session still live on the gateway asked → 503
/// `resume_conflict`. No refused offer leaves a session (or a port) behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_resumes_with_forged_tokens_other_keys_or_bad_headers_are_refused_as_natively() {
    let (_dir, a, b) = federation().await;
    let mut cfg = a.node_config("n-game", &a.token);
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let (status, h, body) = whep_offer(&a, API_KEY, &[]).await;
    assert_eq!(status, 201, "{body}");
    let id = whep_session_id(&h);
    let token = h["nearpath-resume-token"].to_str().unwrap().to_string();

    let (_, other_key) = b
        .store
        .create_api_key("tenant-other", 100, 100_000)
        .unwrap();
    let mut wrong = token.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let at_b_native = native_client(&b, FR_CLIENT).await;
    let native = |r: Result<nearpath_protocol::PlaySession, ClientError>| match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("native: {:?}", other.map(|s| *s.started())),
    };
    // Each refused the same way over WHEP and natively.
    let cases: [(&str, u64, &str, u16, &str); 7] = [
        (API_KEY, id, wrong.as_str(), 403, "bad_resume"),
        (other_key.as_str(), id, token.as_str(), 403, "bad_resume"),
        (API_KEY, id ^ 1, token.as_str(), 403, "bad_resume"),
        (API_KEY, id + 1000, token.as_str(), 403, "bad_resume"),
        (API_KEY, id, "not-hex", 403, "bad_resume"),
        (API_KEY, 0, token.as_str(), 403, "bad_resume"),
        ("npk_nosuchkey", id, token.as_str(), 401, "invalid_api_key"),
    ];
    for (key, sid, tok, want_status, want_code) in cases {
        let header = format!("{sid}:{tok}");
        let (status, h, body) =
            whep_offer(&b, key, &[("nearpath-resume", header.as_bytes())]).await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (want_status, want_code),
            "key {key:.8}, session {sid}, token {tok:.16}: {body}"
        );
        if want_code == "bad_resume" {
            assert_eq!(h["x-should-retry"], "false", "{body}");
            assert_eq!(
                native(at_b_native.resume(key, sid, tok).await),
                "bad_resume"
            );
        }
    }
    // Malformed headers are the client's fault, before any lookup.
    let long = format!("{id}:{}", "a".repeat(1_000));
    let non_ascii = format!("{id}:{token}\u{e9}");
    let malformed: [&[u8]; 5] = [
        long.as_bytes(),
        non_ascii.as_bytes(),
        token.as_bytes(),
        b"x:0123",
        b"",
    ];
    for v in malformed {
        let (status, _, body) = whep_offer(&b, API_KEY, &[("nearpath-resume", v)]).await;
        assert_eq!(status, 400, "{:.40}: {body}", String::from_utf8_lossy(v));
    }
    let good = format!("{id}:{token}");
    let (status, _, body) = whep_offer(
        &b,
        API_KEY,
        &[
            ("nearpath-resume", good.as_bytes()),
            ("nearpath-resume", good.as_bytes()),
        ],
    )
    .await;
    assert_eq!(status, 400, "a repeated header: {body}");
    // The right token with an offer that cannot decode the session's codec (H.264): 422, as
    // for a redirected session, and nothing taken over.
    let (status, _, body) = whep_offer_of(
        &b,
        API_KEY,
        &[("nearpath-resume", good.as_bytes())],
        &offer_without_h264(),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "unsupported_codec".into()),
        "{body}"
    );
    // The right token at the gateway still running the session: retry later, no second copy.
    let (status, h, body) = whep_offer(&a, API_KEY, &[("nearpath-resume", good.as_bytes())]).await;
    assert_eq!(
        (status, error_code(&body)),
        (503, "resume_conflict".into()),
        "{body}"
    );
    assert_eq!(h["retry-after"], "3");
    // Nothing was allocated: B holds no session, A holds the one it had.
    let listed = b.admin_get("/admin/sessions").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{listed}");
    let listed = a.admin_get("/admin/sessions").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(
        admin_metric(
            &b,
            r#"nearpath_game_sessions_total{transport="webrtc",outcome="bad_resume"}"#
        )
        .await,
        6.0
    );

    // A session that ended cannot be resumed: its entry is gone.
    let auth = format!("Bearer {API_KEY}");
    let (status, _, _) = a
        .http
        .request(
            "DELETE",
            &a.api_url(&format!("/v1/sessions/{id}")),
            None,
            None,
            &[("authorization", auth.as_str())],
        )
        .await;
    assert_eq!(status, 200);
    eventually(
        "the ended session's entry is gone",
        Duration::from_secs(10),
        || async {
            let (status, _, body) =
                whep_offer(&b, API_KEY, &[("nearpath-resume", good.as_bytes())]).await;
            (status == 403 && error_code(&body) == "bad_resume").then_some(())
        },
    )
    .await;

    // A standalone gateway has no sessions directory: the native refusal.
    let solo = TestGateway::start(|_| {}).await;
    let (status, _, body) =
        whep_offer(&solo, API_KEY, &[("nearpath-resume", good.as_bytes())]).await;
    assert_eq!(
        (status, error_code(&body)),
        (403, "bad_resume".into()),
        "{body}"
    );
    node.stop().await.unwrap();
}
