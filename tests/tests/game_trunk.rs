//! Game sessions across a federation through the gateway-to-gateway trunk
//! (`federation.game_route = "trunk"`, issue 13): two gateways sharing one store and one
//! directory, the only game node attached to B, native players at A. A runs the session (its
//! relay, caps, billing); B splices its node's session stream, frames, audio and input onto the
//! trunk connection A dialled.
//!
//! The gateway and node directories are an in-memory fake both gateways read; everything else
//! is real: QUIC with pinned certificates both ways, the node protocol, the shared ledger.

mod common;

use common::fleet::{federated_gateway, now_ms, Fleet, Member};
use common::*;
use nearpath_gateway::store::UsageKind;
use nearpath_protocol::message::{
    GameParams, Message, Open, PeerOpen, RefuseCode, SessionKind, VideoCodec,
};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::tls::TransportOptions;
use nearpath_protocol::{
    ControlEvent, InputDatagram, InputEvent, PlayParams, ALPN_PEER, MAX_REQUEST_FRAME,
    PROTOCOL_VERSION,
};
use nearpath_tests::wt_client::{self, WtPlayer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const HOUR_MS: u64 = 3_600_000;

/// A federated gateway `id` reading `fleet`, relaying games over the trunk (`trunk_games`) or
/// redirecting them. Raw nodes answer no heartbeats: the node heartbeat is long.
async fn federated(
    path: PathBuf,
    id: &str,
    fleet: &Arc<Fleet>,
    trunk_games: bool,
    lease_ms: u64,
) -> (TestGateway, Member) {
    federated_with(path, id, fleet, trunk_games, lease_ms, |_| {}).await
}

/// [`federated`], with more configuration.
async fn federated_with(
    path: PathBuf,
    id: &str,
    fleet: &Arc<Fleet>,
    trunk_games: bool,
    lease_ms: u64,
    edit: impl FnOnce(&mut nearpath_config::GatewayConfig),
) -> (TestGateway, Member) {
    federated_gateway(path, id, fleet, lease_ms, |c| {
        if trunk_games {
            c.federation.game_route = nearpath_config::CrossRoute::Trunk;
        }
        c.nodes.heartbeat_ms = 60_000;
        edit(c);
    })
    .await
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

/// The next input datagram the node receives within `within`, if any.
async fn node_input(node: &RawNode, within: Duration) -> Option<InputDatagram> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let d = tokio::time::timeout_at(deadline, node.conn.read_datagram())
            .await
            .ok()?
            .ok()?;
        if let Ok(i) = InputDatagram::decode(&d) {
            return Some(i);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_client_at_a_is_served_by_bs_only_node_over_the_trunk_and_billed_once_by_a() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, true, 3_000).await;
    let (gw_a, a) = federated(path, "gw-a", &fleet, true, 3_000).await;
    *fleet.gateways.lock().unwrap() =
        vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
    let node = raw_game_node(&gw_b, "b-1", ip(DE), &gw_b.token, &["arena"], 2).await;
    *fleet.nodes.lock().unwrap() = vec![b.game_node("b-1")];
    a.read_directory().await;
    b.read_directory().await;

    let c = native_client(&gw_a, FR_CLIENT).await;
    let (s, g) = tokio::join!(c.play(API_KEY, small("arena")), node.accept_game());
    let mut s = s.unwrap();
    // Not redirected: the session lives on A, with the id the node was opened with.
    assert!(s.redirect().is_none());
    assert_eq!(s.gateway(), gw_a.addrs.quic);
    assert_eq!(s.started().session_id, g.session_id);

    // Frames from B's node reach the player at A through the trunk, the first a keyframe.
    for seq in 0..30u64 {
        node.send_video_frame(g.session_id, seq, &[0, 0, 0, 1, 0x65, seq as u8])
            .await
            .unwrap();
        let f = tokio::time::timeout(Duration::from_secs(5), s.next_frame())
            .await
            .expect("frame in time")
            .unwrap()
            .expect("a frame");
        assert_eq!((f.header.session_id, f.header.seq), (g.session_id, seq));
        assert_eq!(f.header.keyframe, seq == 0);
        assert_eq!(&f.payload[..], &[0, 0, 0, 1, 0x65, seq as u8]);
    }
    // So does its sound (datagrams on the trunk).
    // Datagrams may be lost: one packet every 100 ms until one arrives.
    let mut audio = s.audio();
    let packet = tokio::time::timeout(Duration::from_secs(5), async {
        for seq in 1.. {
            node.send_audio(g.session_id, seq, &[0xfc, 0xff, 0xfe])
                .unwrap();
            if let Ok(p) = tokio::time::timeout(Duration::from_millis(100), audio.next()).await {
                return p.expect("an audio packet");
            }
        }
        unreachable!()
    })
    .await
    .expect("audio in time");
    assert_eq!(packet.session_id, g.session_id);
    // The player's input reaches the node on B.
    let sent = s
        .send_input(InputEvent::Key {
            code: 30,
            down: true,
        })
        .unwrap();
    let got = node_input(&node, Duration::from_secs(5))
        .await
        .expect("the input reached the node");
    assert_eq!((got.session_id, got.seq), (g.session_id, sent));

    // A runs the session; B holds none of its own.
    assert!(admin_game_session(&gw_a, g.session_id).await.is_some());
    assert!(admin_game_session(&gw_b, g.session_id).await.is_none());

    s.close("done").await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.next_control()).await {
            Ok(Ok(Some(ControlEvent::Ended(_)))) | Ok(Ok(None)) | Ok(Err(_)) => break,
            Ok(Ok(Some(_))) => continue,
            Err(_) => panic!("no Ended after Close"),
        }
    }
    // Billed once, by A, for the node on B: one final usage row in the shared store.
    let id = format!("game_{}", g.session_id);
    let row = eventually(
        "the session's final usage row",
        Duration::from_secs(10),
        || async {
            let rows: Vec<_> = gw_a
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
    // A counts exactly one session, ended `ok` (not redirected); B counts none.
    let counted = |page: String| -> Vec<String> {
        page.lines()
            .filter(|l| l.starts_with("nearpath_game_sessions_total{") && !l.ends_with(" 0"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        counted(gw_a.admin_get_text("/metrics").await),
        vec!["nearpath_game_sessions_total{transport=\"quic\",outcome=\"ok\"} 1".to_string()]
    );
    assert_eq!(
        counted(gw_b.admin_get_text("/metrics").await),
        Vec::<String>::new()
    );
    // The node's session ended with A's: B relayed the Close.
    let mut g = g;
    match tokio::time::timeout(Duration::from_secs(5), g.recv.next()).await {
        Ok(Ok(Some(Message::Close(_)))) | Ok(Ok(None)) | Ok(Err(_)) => {}
        other => panic!("the node's session did not end: {other:?}"),
    }
    drop(g);
    gw_a.stop().await;
    gw_b.stop().await;
}

/// Dials `to` over the trunk ALPN presenting `identity` and returns the connection.
async fn dial_peer(to: &Member, cert: &nearpath_gateway::tls::CertPair) -> quinn::Connection {
    let config = nearpath_protocol::tls::client_config_with_identity(
        to.sha,
        &[ALPN_PEER],
        &TransportOptions::default(),
        cert.chain.clone(),
        cert.key.clone_key(),
    )
    .unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint
        .connect_with(config, to.quic, "localhost")
        .unwrap()
        .await
        .unwrap()
}

fn arena_open(session_id: u64) -> Message {
    Message::Open(Open {
        session_id,
        kind: SessionKind::Game(GameParams {
            title: "arena".into(),
            width: 320,
            height: 180,
            fps: 30,
            bitrate_kbps: 1000,
            codec: VideoCodec::H264,
            traceparent: None,
        }),
    })
}

/// Opens a trunk stream to `node_id` with `open`; returns the stream halves.
async fn trunk_open(
    conn: &quinn::Connection,
    node_id: &str,
    open: &Message,
) -> (quinn::SendStream, FramedRecv) {
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    let peer_open = Message::PeerOpen(PeerOpen {
        protocol_version: PROTOCOL_VERSION,
        node_id: node_id.into(),
    });
    send(&mut tx, &peer_open).await.unwrap();
    send(&mut tx, open).await.unwrap();
    (tx, FramedRecv::new(rx, MAX_REQUEST_FRAME))
}

async fn refused(rx: &mut FramedRecv) -> (RefuseCode, String) {
    match tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .expect("an answer in time")
    {
        Ok(Some(Message::Refused(r))) => (r.code, r.reason),
        other => panic!("expected Refused, got {other:?}"),
    }
}

fn input(session_id: u64, seq: u64) -> bytes::Bytes {
    InputDatagram {
        session_id,
        seq,
        sent_ts_us: unix_micros_now(),
        event: InputEvent::Key {
            code: 1,
            down: true,
        },
    }
    .encode()
    .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_game_over_the_trunk_reaches_only_its_own_session_and_ids_in_use_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(dir.path().join("fleet.db"), "gw-b", &fleet, true, 3_000).await;
    let node = raw_game_node(&gw_b, "b-1", ip(DE), &gw_b.token, &["arena"], 4).await;
    // A genuine, live peer: what it asks for is what is checked.
    let peer_cert = nearpath_gateway::tls::self_signed(&["localhost"]).unwrap();
    let mut peer = b.record(now_ms() + HOUR_MS);
    peer.id = "gw-t".into();
    peer.cert_sha256 = peer_cert.sha256_hex();
    *fleet.gateways.lock().unwrap() = vec![b.record(now_ms() + HOUR_MS), peer];
    b.read_directory().await;
    let conn = dial_peer(&b, &peer_cert).await;

    // A session of B's own on the node: a peer may never name its id.
    let player = native_client(&gw_b, FR_CLIENT).await;
    let (own, own_node) = tokio::join!(player.play(API_KEY, small("arena")), node.accept_game());
    let own = own.unwrap();
    let (_tx, mut rx) = trunk_open(&conn, "b-1", &arena_open(own_node.session_id)).await;
    let (code, reason) = refused(&mut rx).await;
    assert_eq!(code, RefuseCode::Busy, "{reason}");
    assert!(reason.contains("in use"), "{reason}");

    // A game the node does not serve is refused.
    let other = Message::Open(Open {
        session_id: 11,
        kind: SessionKind::Game(GameParams {
            title: "chess".into(),
            width: 320,
            height: 180,
            fps: 30,
            bitrate_kbps: 1000,
            codec: VideoCodec::H264,
            traceparent: None,
        }),
    });
    let (_tx2, mut rx2) = trunk_open(&conn, "b-1", &other).await;
    assert_eq!(refused(&mut rx2).await.0, RefuseCode::UnknownWorkload);

    // The peer's own session: opened on the node and relayed.
    let sid = 0x5eed_0000_0000_0001u64;
    let (mut ptx, mut prx) = trunk_open(&conn, "b-1", &arena_open(sid)).await;
    let (ntx, mut nrx, open) = node.accept_session().await;
    assert_eq!(open.session_id, sid);
    match tokio::time::timeout(Duration::from_secs(5), prx.next()).await {
        Ok(Ok(Some(Message::Accepted(a)))) => assert_eq!(a.session_id, sid),
        other => panic!("expected Accepted, got {other:?}"),
    }
    // The same id again while it runs: refused.
    let (_tx3, mut rx3) = trunk_open(&conn, "b-1", &arena_open(sid)).await;
    assert_eq!(refused(&mut rx3).await.0, RefuseCode::Busy);

    // Input for B's own session and for an unknown one is dropped; the peer's own goes through
    // (sent last, so that the drops were decided before it arrived).
    conn.send_datagram(input(own_node.session_id, 1)).unwrap();
    conn.send_datagram(input(0xdead_beef, 1)).unwrap();
    conn.send_datagram(bytes::Bytes::from_static(b"\x01not input"))
        .unwrap();
    conn.send_datagram(input(sid, 7)).unwrap();
    let got = node_input(&node, Duration::from_secs(5))
        .await
        .expect("the peer's input for its session");
    assert_eq!((got.session_id, got.seq), (sid, 7));

    // The node's frames of the peer's session go to the peer over the trunk.
    node.send_video_frame(sid, 0, &[0, 0, 0, 1, 0x65])
        .await
        .unwrap();
    let mut uni = tokio::time::timeout(Duration::from_secs(5), conn.accept_uni())
        .await
        .expect("a frame stream in time")
        .unwrap();
    let header = nearpath_protocol::stream::recv_frame_header(&mut uni)
        .await
        .unwrap();
    assert_eq!((header.session_id, header.seq), (sid, 0));

    // The peer ends its side: the node's session stream is ended too, and the id is free.
    ptx.reset(nearpath_protocol::app_code::STREAM_CANCELLED)
        .unwrap();
    drop(prx);
    match tokio::time::timeout(Duration::from_secs(5), nrx.next()).await {
        Ok(Ok(None)) | Ok(Err(_)) => {}
        other => panic!("the node's session stream did not end: {other:?}"),
    }
    drop(ntx);
    drop((own, own_node));
    gw_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_redirects_games_refuses_a_game_over_the_trunk() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(dir.path().join("fleet.db"), "gw-b", &fleet, false, 3_000).await;
    let _node = raw_game_node(&gw_b, "b-1", ip(DE), &gw_b.token, &["arena"], 4).await;
    let peer_cert = nearpath_gateway::tls::self_signed(&["localhost"]).unwrap();
    let mut peer = b.record(now_ms() + HOUR_MS);
    peer.id = "gw-t".into();
    peer.cert_sha256 = peer_cert.sha256_hex();
    *fleet.gateways.lock().unwrap() = vec![b.record(now_ms() + HOUR_MS), peer];
    b.read_directory().await;
    let conn = dial_peer(&b, &peer_cert).await;
    let (_tx, mut rx) = trunk_open(&conn, "b-1", &arena_open(5)).await;
    let (code, reason) = refused(&mut rx).await;
    assert_eq!(code, RefuseCode::UnknownWorkload);
    assert!(reason.contains("redirected"), "{reason}");
    gw_b.stop().await;
}

#[test]
fn b_dying_pauses_the_player_at_a_within_the_lease_and_then_ends_the_session() {
    // B (and its node) run on their own runtime so that the test can kill them the way kill -9
    // would: tasks and sockets vanish without a QUIC close, and A must notice through the
    // trunk's idle timeout (the federation lease, 1 s here).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (b_tx, b_rx) = std::sync::mpsc::channel();
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let b_thread = {
        let (path, fleet) = (path.clone(), fleet.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let (gw_b, b, node) = rt.block_on(async {
                let (gw_b, b) = federated(path, "gw-b", &fleet, true, 1_000).await;
                let node = raw_game_node(&gw_b, "b-1", ip(DE), &gw_b.token, &["arena"], 2).await;
                (gw_b, b, node)
            });
            b_tx.send((b, node)).unwrap();
            let _ = kill_rx.recv();
            rt.shutdown_background();
            drop(gw_b);
        })
    };
    let (b, node) = b_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (gw_a, a) = federated(path, "gw-a", &fleet, true, 1_000).await;
        *fleet.gateways.lock().unwrap() =
            vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
        *fleet.nodes.lock().unwrap() = vec![b.game_node("b-1")];
        a.read_directory().await;
        let c = native_client(&gw_a, FR_CLIENT).await;
        let (s, g) = tokio::join!(c.play(API_KEY, small("arena")), node.accept_game());
        let mut s = s.unwrap();
        node.send_video_frame(g.session_id, 0, &[0, 0, 0, 1, 0x65])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.next_frame())
            .await
            .expect("a first frame through the trunk")
            .unwrap()
            .expect("a frame");
        // B dies.
        kill_tx.send(()).unwrap();
        let killed = std::time::Instant::now();
        let paused = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.next_control().await {
                    Ok(Some(ControlEvent::Paused(_))) => return true,
                    Ok(Some(ControlEvent::Ended(_))) | Ok(None) | Err(_) => return false,
                    Ok(Some(_)) => continue,
                }
            }
        })
        .await
        .expect("the player at A heard nothing after B died");
        assert!(paused, "the session ended without a pause");
        let took = killed.elapsed();
        // Within the lease (1 s) and a generous margin for a loaded machine, never a hang.
        assert!(took < Duration::from_secs(5), "{took:?}");
        // No other node serves the game: the pause window runs out and the session ends.
        tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match s.next_control().await {
                    Ok(Some(ControlEvent::Ended(_))) | Ok(None) | Err(_) => return,
                    Ok(Some(_)) => continue,
                }
            }
        })
        .await
        .expect("the paused session never ended");
        drop(g);
        gw_a.stop().await;
    });
    b_thread.join().unwrap();
}

/// A WebTransport session to `gw` from `from`, as `/play` opens it (the gateway's
/// `/v1/webtransport`, then a session pinned to the hashes it lists).
async fn wt_session_at(
    gw: &TestGateway,
    from: (&str, &str, f64, f64),
) -> web_transport_quinn::Session {
    let info = wt_client::fetch_info(gw.addrs.http).await.unwrap();
    let quic = SocketAddr::new(gw.addrs.http.ip(), info.port);
    let (session, _) = wt_client::connect(ip(from), quic, &info.path, &info.cert_hashes)
        .await
        .unwrap();
    session
}

/// The relay's sink is A's, whatever the player's transport: a WebTransport player at A plays
/// on B's node over the trunk as a native one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webtransport_player_at_a_plays_on_bs_node_over_the_trunk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, true, 3_000).await;
    let (gw_a, a) = federated(path, "gw-a", &fleet, true, 3_000).await;
    *fleet.gateways.lock().unwrap() =
        vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
    let node = raw_game_node(&gw_b, "b-1", ip(DE), &gw_b.token, &["arena"], 2).await;
    *fleet.nodes.lock().unwrap() = vec![b.game_node("b-1")];
    a.read_directory().await;
    b.read_directory().await;

    let session = wt_session_at(&gw_a, FR_CLIENT).await;
    let (p, g) = tokio::join!(
        WtPlayer::play(
            session,
            wt_client::play_request(API_KEY, "arena", 320, 180, 30)
        ),
        node.accept_game()
    );
    let mut p = p.expect("A plays the session over the trunk");
    assert_eq!(p.started.session_id, g.session_id);
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
    let listed = admin_game_session(&gw_a, g.session_id)
        .await
        .expect("A runs the session");
    assert_eq!(listed["transport"], "webtransport", "{listed}");
    assert_eq!(listed["node"], "b-1", "{listed}");
    assert!(admin_game_session(&gw_b, g.session_id).await.is_none());
    drop((p, g));
    gw_a.stop().await;
    gw_b.stop().await;
}

/// The codec of a session over the trunk is one the peer's node encodes (per the encoders its
/// gateway published), and a remote node that does not encode it is never picked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_the_trunk_gets_a_codec_the_peers_node_encodes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, true, 3_000).await;
    let (gw_a, a) = federated(path, "gw-a", &fleet, true, 3_000).await;
    *fleet.gateways.lock().unwrap() =
        vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
    let reg = nearpath_tests::fake_node::Registration::new("b-1", &gw_b.token)
        .gpu("rtx4090", "rtx4090", 24_000)
        .games(&["arena"], 2)
        .encoders(&[(VideoCodec::Hevc, "hevc_nvenc")]);
    let node = RawNode::register(&gw_b, ip(DE), reg.message()).await;
    let mut entry = b.game_node("b-1");
    entry.encoders = vec![nearpath_gateway::store::DirEncoder {
        codec: "hevc".into(),
        implementation: "hevc_nvenc".into(),
    }];
    *fleet.nodes.lock().unwrap() = vec![entry];
    a.read_directory().await;
    b.read_directory().await;

    // H.264 only: no node of the federation encodes it; refused, nothing opened on the node.
    let c = native_client(&gw_a, FR_CLIENT).await;
    match c.play(API_KEY, small("arena")).await {
        Err(nearpath_protocol::ClientError::Refused { code, .. }) => {
            assert_eq!(code, "unsupported_codec")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(s) => panic!(
            "played {:?} on a node that does not encode it",
            s.started().codec
        ),
    }
    // H.264 preferred, HEVC accepted: HEVC, the codec B's node encodes, over the trunk.
    let (s, open) = tokio::join!(
        c.play_with_codecs(
            API_KEY,
            small("arena"),
            &[VideoCodec::H264, VideoCodec::Hevc]
        ),
        node.accept_session()
    );
    let s = s.unwrap();
    assert!(s.redirect().is_none());
    assert_eq!(s.started().codec, VideoCodec::Hevc);
    match &open.2.kind {
        SessionKind::Game(p) => assert_eq!(p.codec, VideoCodec::Hevc),
        other => panic!("not a game: {other:?}"),
    }
    drop((s, open));
    gw_a.stop().await;
    gw_b.stop().await;
}

/// The session is A's: it counts against the key's concurrency cap at A, and the node ending
/// it on B ends it for the player at A (and frees the cap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_session_holds_the_keys_cap_at_a_and_ends_when_bs_node_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, true, 3_000).await;
    let (gw_a, a) = federated_with(path, "gw-a", &fleet, true, 3_000, |c| {
        c.game.default_max_concurrent_sessions = 1;
    })
    .await;
    *fleet.gateways.lock().unwrap() =
        vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
    let node = raw_game_node(&gw_b, "b-1", ip(DE), &gw_b.token, &["arena"], 4).await;
    *fleet.nodes.lock().unwrap() = vec![b.game_node("b-1")];
    a.read_directory().await;
    b.read_directory().await;

    let c = native_client(&gw_a, FR_CLIENT).await;
    let (s, g) = tokio::join!(c.play(API_KEY, small("arena")), node.accept_game());
    let mut s = s.unwrap();
    // A second session of the key at A: over the cap, whichever node would serve it.
    let c2 = native_client(&gw_a, FR_CLIENT).await;
    match c2.play(API_KEY, small("arena")).await {
        Err(nearpath_protocol::ClientError::Refused { code, .. }) => {
            assert_eq!(code, "concurrency_limit_exceeded")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(s2) => panic!("a second session {} over the cap", s2.started().session_id),
    }
    // The node ends the session on B: the player at A hears of it.
    let mut g = g;
    send(
        &mut g.send,
        &Message::Ended(nearpath_protocol::message::Ended {
            reason: "game exited".into(),
        }),
    )
    .await
    .unwrap();
    let _ = g.send.finish();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.next_control().await {
                Ok(Some(ControlEvent::Ended(_))) | Ok(None) | Err(_) => return,
                Ok(Some(_)) => continue,
            }
        }
    })
    .await
    .expect("the player at A was not told the session ended");
    // The cap is free again: a new session starts (on B's node, over the trunk).
    let (s2, g2) = eventually(
        "a new session under the cap",
        Duration::from_secs(10),
        || async {
            let c3 = native_client(&gw_a, FR_CLIENT).await;
            let (s2, g2) = tokio::join!(
                c3.play(API_KEY, small("arena")),
                tokio::time::timeout(Duration::from_secs(2), node.accept_game())
            );
            match (s2, g2) {
                (Ok(s2), Ok(g2)) => Some((s2, g2)),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(s2.started().session_id, g2.session_id);
    drop((s, g, s2, g2));
    gw_a.stop().await;
    gw_b.stop().await;
}

/// Only a live pinned peer may open a game on B's node: a gateway whose lease expired (or a
/// stranger) is refused at the connection, before any stream reaches the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_not_live_and_pinned_cannot_open_a_game() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(dir.path().join("fleet.db"), "gw-b", &fleet, true, 3_000).await;
    let node = raw_game_node(&gw_b, "b-1", ip(DE), &gw_b.token, &["arena"], 4).await;
    let expired_cert = nearpath_gateway::tls::self_signed(&["localhost"]).unwrap();
    let mut expired = b.record(now_ms().saturating_sub(1_000));
    expired.id = "gw-old".into();
    expired.cert_sha256 = expired_cert.sha256_hex();
    *fleet.gateways.lock().unwrap() = vec![b.record(now_ms() + HOUR_MS), expired];
    b.read_directory().await;
    let stranger = nearpath_gateway::tls::self_signed(&["localhost"]).unwrap();
    for (cert, reason) in [
        (&expired_cert, "peer_expired"),
        (&stranger, "peer_unknown_pin"),
    ] {
        let conn = dial_peer(&b, cert).await;
        // Whatever it manages to send before the close, no session reaches the node.
        if let Ok((mut tx, _rx)) = conn.open_bi().await {
            let _ = send(
                &mut tx,
                &Message::PeerOpen(PeerOpen {
                    protocol_version: PROTOCOL_VERSION,
                    node_id: "b-1".into(),
                }),
            )
            .await;
            let _ = send(&mut tx, &arena_open(99)).await;
        }
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("the gateway neither refused nor served the peer");
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    c.error_code,
                    nearpath_protocol::app_code::CLOSE_PEER_REFUSED
                );
                assert_eq!(String::from_utf8_lossy(&c.reason), reason);
            }
            other => panic!("not an application close: {other}"),
        }
    }
    // The node was never asked to open a session: its next stream is the player's below.
    let player = native_client(&gw_b, FR_CLIENT).await;
    let (s, open) = tokio::join!(player.play(API_KEY, small("arena")), node.accept_session());
    let s = s.unwrap();
    assert_eq!(open.2.session_id, s.started().session_id);
    drop((s, open));
    gw_b.stop().await;
}

/// A real edge node on B running the built-in `arena`: a native player at A gets frames over
/// the trunk that decode (the first an IDR), and its input reaches the game (frames report the
/// input they applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_at_a_decodes_the_real_node_on_b_and_its_input_reaches_the_game() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, true, 3_000).await;
    let (gw_a, a) = federated(path, "gw-a", &fleet, true, 3_000).await;
    *fleet.gateways.lock().unwrap() =
        vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
    let mut cfg = gw_b.node_config("b-real", &gw_b.token);
    cfg.games = vec![nearpath_config::GameEntry {
        title: "arena".into(),
        source: nearpath_config::GameSource::Builtin {},
    }];
    cfg.capacity.game_sessions = 1;
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    *fleet.nodes.lock().unwrap() = vec![b.game_node("b-real")];
    a.read_directory().await;
    b.read_directory().await;

    let c = native_client(&gw_a, FR_CLIENT).await;
    let session = c.play(API_KEY, small("arena")).await.unwrap();
    assert!(session.redirect().is_none());
    let id = session.started().session_id;
    let (mut control, mut frames, input) = session.split();
    let mut got = Vec::new();
    let mut last_sent = 0;
    let t0 = std::time::Instant::now();
    let mut next_input = t0;
    let mut i = 0u32;
    while t0.elapsed() < Duration::from_secs(2) || got.len() < 20 {
        if std::time::Instant::now() >= next_input {
            last_sent = input
                .send(InputEvent::Key {
                    code: 68,
                    down: i.is_multiple_of(2),
                })
                .unwrap();
            i += 1;
            next_input += Duration::from_millis(100);
        }
        let f = tokio::time::timeout(Duration::from_secs(5), frames.next())
            .await
            .expect("a frame in time")
            .unwrap()
            .expect("a frame");
        assert_eq!(f.header.session_id, id);
        got.push(f);
    }
    assert!(got[0].header.keyframe, "the stream starts with an IDR");
    let (decoded, dims) = decode_h264(&got);
    assert_eq!(dims, (320, 180));
    assert!(
        decoded as f64 >= 0.9 * got.len() as f64,
        "decoded {decoded} of {}",
        got.len()
    );
    // The game applied the player's input, sent over the trunk.
    let applied = got.iter().map(|f| f.header.input_seq).max().unwrap();
    assert!(applied > 0, "no input applied (sent {last_sent})");
    let listed = admin_game_session(&gw_a, id).await.expect("A runs it");
    assert_eq!(listed["node"], "b-real", "{listed}");
    control.close("done").await.unwrap();
    node.stop().await.unwrap();
    gw_a.stop().await;
    gw_b.stop().await;
}

const CHROMIUM_OFFER: &str = include_str!("../browser/chromium-156-offer.sdp");

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

/// A WHEP player at A is placed on B's node over the trunk (no 307): A answers the offer and
/// runs the session; deleting it at A ends the node's session on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_player_at_a_is_served_by_bs_node_over_the_trunk_without_a_redirect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, true, 3_000).await;
    let (gw_a, a) = federated(path, "gw-a", &fleet, true, 3_000).await;
    *fleet.gateways.lock().unwrap() =
        vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
    let node = raw_game_node(&gw_b, "b-1", ip(DE), &gw_b.token, &["arena"], 2).await;
    *fleet.nodes.lock().unwrap() = vec![b.game_node("b-1")];
    a.read_directory().await;
    b.read_directory().await;

    let auth = format!("Bearer {API_KEY}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/sdp"),
        ("x-forwarded-for", FR_CLIENT.0),
    ];
    let whep_a = gw_a.api_url("/v1/games/arena/whep?width=320&height=180&fps=30");
    let ((status, h, body), g) = tokio::join!(
        request("POST", &whep_a, &headers, CHROMIUM_OFFER),
        node.accept_game()
    );
    assert_eq!(status, 201, "{body}");
    assert!(body.starts_with("v=0"), "an SDP answer: {body:.40}");
    let session = h["location"].to_str().unwrap().to_string();
    assert_eq!(session, format!("/v1/sessions/{}", g.session_id));
    let listed = admin_game_session(&gw_a, g.session_id)
        .await
        .expect("A runs the session");
    assert_eq!(listed["transport"], "webrtc", "{listed}");
    assert_eq!(listed["node"], "b-1", "{listed}");

    let (status, _, _) = request("DELETE", &gw_a.api_url(&session), &headers[..1], "").await;
    assert_eq!(status, 200);
    let mut g = g;
    match tokio::time::timeout(Duration::from_secs(5), g.recv.next()).await {
        Ok(Ok(Some(Message::Close(_)))) | Ok(Ok(None)) | Ok(Err(_)) => {}
        other => panic!("the node's session did not end: {other:?}"),
    }
    drop(g);
    gw_a.stop().await;
    gw_b.stop().await;
}
