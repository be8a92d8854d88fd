//! Hostile tests: relay (see hostile.rs). Another operator's node injecting frames into a
//! player's session, guessable session ids, and a player whose frames pile up in the relay.

use crate::common::*;
use nearpath_protocol::message::{Message, PlayRequest};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::tls::{client_config_with, ServerVerify, TransportOptions};
use nearpath_protocol::{
    Client, PlayParams, VideoFrame, ALPN_CLIENT, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const GAME: &str = "g";

/// Raw nodes do not heartbeat on their own; this keeps them registered for the whole test.
fn patient(c: &mut nearpath_config::GatewayConfig) {
    c.nodes.heartbeat_ms = 10_000;
}

async fn client(gw: &TestGateway, from: std::net::IpAddr) -> Client {
    Client::connect_from(
        SocketAddr::new(from, 0),
        gw.addrs.quic,
        "localhost",
        ServerVerify::PinnedSha256(gw.sha),
    )
    .await
    .unwrap()
}

/// Fails the test with `what` once `until` has passed.
fn before(until: Instant, what: &str) {
    assert!(Instant::now() < until, "timed out waiting for {what}");
}

/// The next frame of `frames`, failing after 5 s.
async fn next_frame(frames: &mut nearpath_protocol::FrameStream, what: &str) -> VideoFrame {
    tokio::time::timeout(Duration::from_secs(5), frames.next())
        .await
        .unwrap_or_else(|_| panic!("no frame within 5 s ({what})"))
        .expect("frame stream failed")
        .expect("frame stream ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_injection_from_another_node_is_refused() {
    let gw = TestGateway::start(patient).await;
    let serving = raw_game_node(&gw, "de-serving", ip(DE), &gw.token, &[GAME], 1).await;
    // Another operator's node, serving nothing, that knows (or guessed) the session id.
    let stranger_token = other_operator_token(&gw, "op-stranger");
    let stranger = raw_game_node(&gw, "us-stranger", ip(US_EAST), &stranger_token, &[], 0).await;
    let player = client(&gw, ip(FR_CLIENT)).await;
    let (session, opened) = tokio::join!(
        player.play(API_KEY, PlayParams::hd(GAME)),
        serving.accept_game()
    );
    let session = session.unwrap();
    let sid = session.started().session_id;
    assert_eq!(opened.session_id, sid);
    let (_control, mut frames, _input) = session.split();

    // 30 forged frames, each a well-formed, fresh frame carrying the victim's session id.
    for seq in 0..30u64 {
        let _ = stranger
            .send_video_frame(sid, 10_000 + seq, b"forged by a stranger")
            .await;
    }
    // Wait until the gateway has dealt with all 30, one way or the other.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let foreign = admin_metric(
            &gw,
            "nearpath_game_frames_dropped_total{reason=\"foreign\"}",
        )
        .await;
        let relayed = admin_metric(&gw, "nearpath_game_frames_relayed_total").await;
        if foreign + relayed >= 30.0 {
            break;
        }
        before(until, "the gateway to handle 30 forged frames");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Then the serving node's own frames, one at a time: every one arrives, and since the
    // player reads frame streams in the order they were opened, any forged frame the gateway
    // had relayed would have come first.
    let mut forged = 0;
    let mut real = 0;
    let mut seq = 0u64;
    while real < 30 {
        serving
            .send_video_frame(sid, seq, b"real frame")
            .await
            .unwrap();
        seq += 1;
        let f = next_frame(&mut frames, "the serving node's frame").await;
        assert_eq!(f.header.session_id, sid);
        if &f.payload[..] == b"forged by a stranger" {
            forged += 1;
        } else {
            assert_eq!(&f.payload[..], b"real frame");
            real += 1;
        }
    }
    assert_eq!(forged, 0, "{forged} of 30 forged frames reached the player");
    // A frame counts as relayed once the player's acknowledgement is back, which can be a
    // moment after the player read it.
    let until = Instant::now() + Duration::from_secs(5);
    let view = loop {
        let view = admin_game_session(&gw, sid).await.expect("session is live");
        if view["frames"] == 30 {
            break view;
        }
        before(until, &format!("30 relayed frames: {view}"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(view["dropped"]["foreign"], 30, "{view}");
    assert_eq!(
        admin_metric(
            &gw,
            "nearpath_game_frames_dropped_total{reason=\"foreign\"}"
        )
        .await,
        30.0
    );
    // Each relayed frame's age and bytes are counted (just after the frame itself).
    eventually("30 frame latencies", Duration::from_secs(5), || async {
        let n = admin_metric(&gw, "nearpath_game_frame_latency_seconds_count").await;
        (n == 30.0).then_some(())
    })
    .await;
    let bytes = admin_metric(&gw, "nearpath_game_relayed_bytes_total").await;
    assert!(bytes >= 30.0 * b"real frame".len() as f64, "{bytes} bytes");
    drop(opened);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_are_unguessable_not_sequential() {
    let gw = TestGateway::start(patient).await;
    let node = raw_game_node(&gw, "de-serving", ip(DE), &gw.token, &[GAME], 2).await;
    let mut ids = Vec::new();
    let mut keep = Vec::new();
    for from in [ip(FR_CLIENT), ip(US_WEST_CLIENT)] {
        let player = client(&gw, from).await;
        let (session, opened) = tokio::join!(
            player.play(API_KEY, PlayParams::hd(GAME)),
            node.accept_game()
        );
        let session = session.unwrap();
        assert_eq!(session.started().session_id, opened.session_id);
        ids.push(opened.session_id);
        keep.push((player, session, opened));
    }
    // A counter hands out 1, 2, ...: the next player's id is the last one plus one. Random
    // 64-bit ids are this close with probability about 2^-31.
    assert!(ids.iter().all(|&id| id != 0), "{ids:?}");
    assert!(
        ids[0].abs_diff(ids[1]) > 1 << 32,
        "consecutive session ids {ids:?} are predictable"
    );
    drop(keep);
    gw.stop().await;
}

/// A player connection that starts a session and then never reads a frame, with small receive
/// windows so that the gateway's writes to it block once they are full.
async fn stalled_player(
    gw: &TestGateway,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    u64,
    (quinn::SendStream, FramedRecv),
) {
    let mut cfg = client_config_with(
        ServerVerify::PinnedSha256(gw.sha),
        &[ALPN_CLIENT],
        &TransportOptions::default(),
    )
    .unwrap();
    let mut t = TransportOptions::default().to_transport_config().unwrap();
    t.stream_receive_window(16_384u32.into());
    t.receive_window(65_536u32.into());
    cfg.transport_config(Arc::new(t));
    let (endpoint, _) =
        nearpath_protocol::net::client_endpoint(SocketAddr::new(ip(KR_CLIENT), 0), cfg, 1 << 20)
            .unwrap();
    let conn = endpoint
        .connect(gw.addrs.quic, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    send(
        &mut tx,
        &Message::PlayRequest(PlayRequest {
            protocol_version: PROTOCOL_VERSION,
            api_key: API_KEY.into(),
            game: GAME.into(),
            width: 0,
            height: 0,
            fps: 0,
            bitrate_kbps: 0,
            codecs: vec![],
            traceparent: None,
        }),
    )
    .await
    .unwrap();
    let mut rx = FramedRecv::new(rx, MAX_CONTROL_FRAME);
    let sid = match rx.next().await.unwrap().unwrap() {
        Message::PlayStarted(s) => s.session_id,
        other => panic!("expected PlayStarted, got {other:?}"),
    };
    (endpoint, conn, sid, (tx, rx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_that_never_reads_gets_frames_dropped_not_queued() {
    // A generous frame budget: the test is about queueing, and a loaded test machine must not
    // turn the good player's frames late.
    let gw = TestGateway::start(|c| {
        patient(c);
        c.game.frame_budget_ms = 1_000;
    })
    .await;
    let max_frames = gw.shared.config.game.max_in_flight_frames as u64;
    let max_bytes = gw.shared.config.game.max_in_flight_bytes;
    // One node serves both players, as a GPU node serves several sessions on one connection.
    let node = raw_game_node(&gw, "de-serving", ip(DE), &gw.token, &[GAME], 2).await;
    let (stalled, opened_stalled) = tokio::join!(stalled_player(&gw), node.accept_game());
    let (_endpoint, _conn, stalled_sid, _control) = stalled;
    assert_eq!(opened_stalled.session_id, stalled_sid);

    // 400 fresh 2 KB frames for the player that reads nothing: 800 KB, far more than its
    // 64 KB window takes.
    let sent = 400u64;
    let payload = vec![7u8; 2_000];
    let flood = async {
        for seq in 0..sent {
            let _ = node.send_video_frame(stalled_sid, seq, &payload).await;
        }
    };
    // Bounded: a relay that holds every frame's stream stops granting the node streams.
    let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;

    // Every frame is accounted for within its deadline: forwarded (into the window) or dropped
    // and counted. None waits in the relay.
    let mut worst = (0u64, 0u64);
    let until = Instant::now() + Duration::from_secs(10);
    let last_view = loop {
        let v = admin_game_session(&gw, stalled_sid)
            .await
            .expect("session is live");
        worst.0 = worst.0.max(v["in_flight_frames"].as_u64().unwrap());
        worst.1 = worst.1.max(v["in_flight_bytes"].as_u64().unwrap());
        let d = &v["dropped"];
        let handled = v["frames"].as_u64().unwrap()
            + ["late", "overload", "foreign", "relay", "shed"]
                .iter()
                .map(|r| d[*r].as_u64().unwrap())
                .sum::<u64>();
        if handled == sent {
            break v;
        }
        before(
            until,
            &format!("every flooded frame to be forwarded or dropped: {v}"),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let d = &last_view["dropped"];
    let forwarded = last_view["frames"].as_u64().unwrap();
    println!("stalled player: {forwarded} forwarded, dropped {d}; worst in flight {worst:?}");
    assert!(d["overload"].as_u64().unwrap() > 0, "{last_view}");
    // What got through is what the player's 64 KB window took, not what was sent.
    assert!(forwarded * 2_048 <= 65_536 + 16_384, "{last_view}");
    assert!(worst.0 <= max_frames && worst.1 <= max_bytes, "{worst:?}");
    assert!(
        admin_metric(
            &gw,
            "nearpath_game_frames_dropped_total{reason=\"overload\"}"
        )
        .await
            > 0.0
    );
    // The relay asked the node for a keyframe after dropping (rate-limited, so a few at most).
    let mut keyframe_requests = 0;
    let mut recv = opened_stalled.recv;
    while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_millis(200), recv.next()).await
    {
        if matches!(m, Message::ForceKeyframe) {
            keyframe_requests += 1;
        }
    }
    assert!(
        (1..=20).contains(&keyframe_requests),
        "{keyframe_requests} keyframe requests"
    );

    // A second player on the same node is unaffected: every frame arrives, within the budget.
    let good = client(&gw, ip(FR_CLIENT)).await;
    let (session, opened_good) =
        tokio::join!(good.play(API_KEY, PlayParams::hd(GAME)), node.accept_game());
    let session = session.unwrap();
    let good_sid = session.started().session_id;
    let (_good_control, mut frames, _input) = session.split();
    for seq in 0..30u64 {
        node.send_video_frame(good_sid, seq, &payload)
            .await
            .unwrap();
        let f = next_frame(&mut frames, "the good player's frame").await;
        assert_eq!(f.header.seq, seq);
        let age_ms = unix_micros_now().saturating_sub(f.header.capture_ts_us) / 1000;
        assert!(
            age_ms <= 1_000,
            "frame {seq} arrived {age_ms} ms after capture"
        );
    }
    drop((opened_good, opened_stalled.send));
    gw.stop().await;
}

/// Sends a frame for `sid` on `conn` whose capture time is `age` ago (as if it had waited
/// that long on its way in).
async fn send_aged_frame(conn: &quinn::Connection, sid: u64, seq: u64, age: Duration) {
    let captured = unix_micros_now() - age.as_micros() as u64;
    let payload = bytes::Bytes::from_static(b"frame");
    nearpath_tests::fake_node::send_game_frame_captured_at(
        conn, sid, seq, false, payload, captured,
    )
    .await
    .unwrap();
}

/// Regression (issue 9, item 15): past its capacity the relay let frames wait in its receive
/// queue until they were nearly a whole frame budget old and dropped most of them late, after
/// paying for them. A saturated gateway (here: its runtime kept busy by a spinning task, as a
/// relay past capacity is) sheds a frame that waited `overload_queue_budget_ms` beyond its
/// node's usual age, counts it (`shed`), and still delivers fresh frames; once the
/// saturation is over, the same frame would be forwarded (it is within the frame budget).
#[tokio::test(flavor = "current_thread")]
async fn a_saturated_gateway_sheds_queued_frames_and_delivers_fresh_ones() {
    // Wide margins: a loaded test machine must not push a fresh frame past the overload budget.
    let gw = TestGateway::start(|c| {
        patient(c);
        c.game.frame_budget_ms = 2_000;
        c.game.overload_queue_budget_ms = 200;
    })
    .await;
    let node = raw_game_node(&gw, "de-serving", ip(DE), &gw.token, &[GAME], 1).await;
    let player = client(&gw, ip(FR_CLIENT)).await;
    let (session, _opened) = tokio::join!(
        player.play(API_KEY, PlayParams::hd(GAME)),
        node.accept_game()
    );
    let session = session.unwrap();
    let sid = session.started().session_id;
    let (_control, mut frames, _input) = session.split();
    // Fresh frames teach the relay this node's usual age.
    for seq in 0..5u64 {
        node.send_video_frame(sid, seq, b"fresh").await.unwrap();
        assert_eq!(
            next_frame(&mut frames, "a fresh frame").await.header.seq,
            seq
        );
    }
    assert_eq!(
        admin_metric(&gw, "nearpath_game_relay_overloaded").await,
        0.0
    );

    // Saturate the runtime the gateway runs on: busy 3 ms at a time, yielding in between so
    // that the gateway still runs.
    let spin = tokio_util::sync::CancellationToken::new();
    let spinning = spin.clone();
    let spinner = tokio::spawn(async move {
        while !spinning.is_cancelled() {
            let until = Instant::now() + Duration::from_millis(3);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            tokio::task::yield_now().await;
        }
    });
    eventually(
        "the gateway to count itself overloaded",
        Duration::from_secs(20),
        || async {
            (admin_metric(&gw, "nearpath_game_relay_overloaded").await == 1.0).then_some(())
        },
    )
    .await;
    // A frame that waited 1 s on its way in: within the 2 s frame budget, far beyond the
    // node's usual age plus 200 ms. Shed, counted, never delivered.
    send_aged_frame(&node.conn, sid, 5, Duration::from_secs(1)).await;
    let view = eventually(
        "the aged frame to be shed",
        Duration::from_secs(20),
        || async {
            let v = admin_game_session(&gw, sid).await.expect("session is live");
            (v["dropped"]["shed"] == 1).then_some(v)
        },
    )
    .await;
    assert_eq!(view["dropped"]["late"], 0, "{view}");
    assert_eq!(
        admin_metric(&gw, "nearpath_game_frames_dropped_total{reason=\"shed\"}").await,
        1.0
    );
    // A fresh frame still goes through, and it is the next one the player sees.
    node.send_video_frame(sid, 6, b"fresh").await.unwrap();
    assert_eq!(
        next_frame(&mut frames, "a fresh frame under overload")
            .await
            .header
            .seq,
        6
    );

    spin.cancel();
    spinner.await.unwrap();
    eventually("the overload to end", Duration::from_secs(20), || async {
        (admin_metric(&gw, "nearpath_game_relay_overloaded").await == 0.0).then_some(())
    })
    .await;
    // The same wait is no reason to drop a frame when the gateway is not overloaded.
    send_aged_frame(&node.conn, sid, 7, Duration::from_secs(1)).await;
    assert_eq!(
        next_frame(&mut frames, "an aged frame, no overload")
            .await
            .header
            .seq,
        7
    );
    let view = admin_game_session(&gw, sid).await.expect("session is live");
    assert_eq!(view["dropped"]["shed"], 1, "{view}");
    gw.stop().await;
}

/// Guards the audio relay (`GameService::node_audio_loop`): audio datagrams naming a session
/// reach its player only from the connection of the node serving it. Another operator's node
/// forging the victim's session id, malformed datagrams, and a flood of forgeries are dropped
/// and counted; the serving node's packets still arrive, unchanged and in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_injection_garbage_and_floods_from_another_node_are_refused() {
    let gw = TestGateway::start(patient).await;
    let serving = raw_game_node(&gw, "de-serving", ip(DE), &gw.token, &[GAME], 1).await;
    let stranger_token = other_operator_token(&gw, "op-stranger");
    let stranger = raw_game_node(&gw, "us-stranger", ip(US_EAST), &stranger_token, &[], 0).await;
    let player = client(&gw, ip(FR_CLIENT)).await;
    let (session, opened) = tokio::join!(
        player.play(API_KEY, PlayParams::hd(GAME)),
        serving.accept_game()
    );
    let session = session.unwrap();
    let sid = session.started().session_id;
    assert_eq!(opened.session_id, sid);
    let mut audio = session.audio();
    let foreign = "nearpath_game_audio_dropped_total{reason=\"foreign\"}";
    let malformed = "nearpath_game_audio_dropped_total{reason=\"malformed\"}";

    // 30 well-formed packets with the victim's id from the stranger's connection.
    for seq in 0..30 {
        stranger.send_audio(sid, seq, b"forged").unwrap();
    }
    eventually(
        "30 foreign audio drops",
        Duration::from_secs(10),
        || async { (admin_metric(&gw, foreign).await >= 30.0).then_some(()) },
    )
    .await;
    // Garbage: wrong magic, truncated header, unknown version and flags, a bad sample count,
    // no payload, an oversized payload. From the serving node itself, so only the format is
    // at fault.
    let good = nearpath_protocol::AudioPacket {
        session_id: sid,
        seq: 0,
        capture_ts_us: 1,
        samples: 480,
        flags: 0,
        opus: bytes::Bytes::from_static(b"x"),
    }
    .encode()
    .unwrap();
    let mut garbage: Vec<Vec<u8>> = vec![
        vec![0x49; 40],
        good[..10].to_vec(),
        good[..nearpath_protocol::AudioPacket::HEADER_LEN].to_vec(),
    ];
    for (i, v) in [(1, 9u8), (2, 0x80), (24, 7)] {
        let mut b = good.clone();
        b[i] = v;
        garbage.push(b);
    }
    let mut big = good.clone();
    big.resize(nearpath_protocol::AudioPacket::HEADER_LEN + 1100, 0);
    garbage.push(big);
    for g in &garbage {
        serving.send_raw_datagram(g).unwrap();
    }
    eventually(
        "every malformed datagram counted",
        Duration::from_secs(10),
        || async { (admin_metric(&gw, malformed).await >= garbage.len() as f64).then_some(()) },
    )
    .await;
    // A flood of forgeries; some may be lost in buffers, none may be relayed.
    for seq in 0..3000 {
        let _ = stranger.send_audio(sid, 1000 + seq, b"flood");
    }
    // The serving node's own packets, one at a time: each arrives (sent again every 200 ms
    // until it does: datagrams may be lost), and a forged one relayed before it would have
    // shown up first.
    let until = Instant::now() + Duration::from_secs(20);
    for seq in 0..30u32 {
        'this: loop {
            before(until, "the serving node's audio packets");
            serving.send_audio(sid, seq, b"real").unwrap();
            let resend = tokio::time::sleep(Duration::from_millis(200));
            tokio::pin!(resend);
            loop {
                tokio::select! {
                    p = audio.next() => {
                        let p = p.expect("connection open");
                        assert_eq!(p.session_id, sid);
                        assert_eq!(&p.opus[..], b"real", "a forged packet reached the player");
                        assert_eq!(p.samples, 480);
                        if p.seq == seq {
                            break 'this;
                        }
                    }
                    _ = &mut resend => break,
                }
            }
        }
    }
    assert!(admin_metric(&gw, foreign).await >= 30.0);
    let view = admin_game_session(&gw, sid).await.expect("session is live");
    assert!(view["audio"]["packets"].as_u64().unwrap() >= 30, "{view}");
    assert!(view["audio"]["foreign"].as_u64().unwrap() >= 30, "{view}");
    drop(opened);
    gw.stop().await;
}
