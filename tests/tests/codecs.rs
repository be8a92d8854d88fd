//! Encoders and codecs end to end (protocol version 3): sessions encoded by x264 and by
//! OpenH264 both decode at 1280x720; a client that asks for HEVC or AV1 gets it from a node
//! that encodes it (x265 and libaom on the CPU here) and a clear refusal where no node does.

mod common;

use common::*;
use nearpath_config::{EncoderKind, GameEntry, GameSource, NodeConfig};
use nearpath_protocol::{Client, ClientError, PlayParams, ServerVerify, VideoCodec, VideoFrame};
use std::time::Duration;

/// The encoding tests need a core each on a 2-core machine: one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn game_node(gw: &TestGateway, id: &str, encoder: EncoderKind) -> NodeConfig {
    let mut cfg = gw.node_config(id, &gw.token);
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    cfg.capacity.game_sessions = 1;
    cfg.encoder.encoder = encoder;
    cfg
}

async fn client(gw: &TestGateway) -> Client {
    Client::connect_from(
        std::net::SocketAddr::new(ip(FR_CLIENT), 0),
        gw.addrs.quic,
        "localhost",
        ServerVerify::PinnedSha256(gw.sha),
    )
    .await
    .unwrap()
}

/// The first `n` frames of a session.
async fn frames_of(session: nearpath_protocol::PlaySession, n: usize) -> Vec<VideoFrame> {
    let (_control, mut frames, _input) = session.split();
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let f = tokio::time::timeout(Duration::from_secs(10), frames.next())
            .await
            .expect("a frame within 10 s")
            .expect("the session goes on")
            .expect("a well-formed frame");
        got.push(f);
    }
    got
}

/// Whether an Annex B stream carries x264's version SEI (user data unregistered, "x264 -
/// core ..."), which x264 writes with the first IDR and OpenH264 never does.
fn made_by_x264(payload: &[u8]) -> bool {
    payload.windows(11).any(|w| w == b"x264 - core")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x264_and_openh264_sessions_both_decode_at_720p() {
    let _heavy = HEAVY.lock().await;
    for (encoder, by_x264) in [(EncoderKind::X264, true), (EncoderKind::Openh264, false)] {
        let gw = TestGateway::start(|_| {}).await;
        let mut node = TestNode::start(game_node(&gw, "de-1", encoder), ip(DE));
        node.registered().await;
        let c = client(&gw).await;
        let session = c.play(API_KEY, PlayParams::hd("arena")).await.unwrap();
        let started = *session.started();
        assert_eq!((started.width, started.height), (1280, 720));
        assert_eq!(started.codec, VideoCodec::H264, "{encoder:?}");
        let frames = frames_of(session, 90).await;
        assert!(frames[0].header.keyframe, "{encoder:?}: starts with an IDR");
        assert_eq!(
            made_by_x264(&frames[0].payload),
            by_x264,
            "{encoder:?}: the stream is not from the configured encoder"
        );
        let (decoded, dims) = decode_h264(&frames);
        assert_eq!(dims, (1280, 720), "{encoder:?}");
        assert!(
            decoded >= 90 * 95 / 100,
            "{encoder:?}: decoded {decoded} of 90"
        );
        println!("{encoder:?}: decoded {decoded} of 90 frames at 1280x720");
        drop(c);
        node.stop().await.unwrap();
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asking_for_hevc_or_av1_gets_it_from_the_node_that_encodes_it() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    // The nearer node (DE, for a client in FR) encodes H.264 only; the far one (US) also
    // encodes HEVC with x265.
    let mut near = TestNode::start(game_node(&gw, "de-h264", EncoderKind::Openh264), ip(DE));
    near.registered().await;
    let mut far_cfg = game_node(&gw, "us-hevc", EncoderKind::X264);
    far_cfg.encoder.software_hevc_av1 = true;
    let mut far = TestNode::start(far_cfg, ip(US_EAST));
    far.registered().await;
    // The gateway shows what each node registered.
    let view = gw.admin_get("/admin/nodes/us-hevc").await;
    assert_eq!(
        view["live"]["encoders"],
        serde_json::json!([
            {"codec": "h264", "implementation": "x264"},
            {"codec": "hevc", "implementation": "x265"},
            {"codec": "av1", "implementation": "aom"}
        ]),
        "{view}"
    );
    let view = gw.admin_get("/admin/nodes/de-h264").await;
    assert_eq!(
        view["live"]["encoders"],
        serde_json::json!([{"codec": "h264", "implementation": "openh264"}]),
        "{view}"
    );

    let small = PlayParams {
        game: "arena".into(),
        width: 320,
        height: 240,
        fps: 30,
        bitrate_kbps: 1000,
    };
    // HEVC first, H.264 as the fallback: HEVC exists in the fleet, so it wins over distance.
    let c = client(&gw).await;
    let session = c
        .play_with_codecs(
            API_KEY,
            small.clone(),
            &[VideoCodec::Hevc, VideoCodec::H264],
        )
        .await
        .unwrap();
    assert_eq!(session.started().codec, VideoCodec::Hevc);
    let frames = frames_of(session, 10).await;
    assert!(frames[0].header.keyframe);
    // HEVC NAL unit types: VPS (32), SPS (33), PPS (34) lead the first access unit.
    let first = &frames[0].payload;
    assert!(first.starts_with(&[0, 0, 0, 1]), "Annex B");
    assert_eq!(
        (first[4] >> 1) & 0x3f,
        32,
        "a VPS first, got {:x?}",
        &first[..8]
    );
    drop(c);

    // AV1 first: the same node encodes it with libaom (real-time mode). A temporal unit
    // starts with a temporal delimiter OBU (type 2), then the sequence header (type 1).
    let c = client(&gw).await;
    let session = c
        .play_with_codecs(API_KEY, small.clone(), &[VideoCodec::Av1, VideoCodec::H264])
        .await
        .unwrap();
    assert_eq!(session.started().codec, VideoCodec::Av1);
    let frames = frames_of(session, 10).await;
    assert!(frames[0].header.keyframe);
    let first = &frames[0].payload;
    assert_eq!(
        (first[0] >> 3 & 0xf, first[2] >> 3 & 0xf),
        (2, 1),
        "{:x?}",
        &first[..4]
    );
    drop(c);

    // Without the far node nobody encodes AV1: a client that also takes H.264 gets H.264 from
    // the near node; one that takes AV1 only is refused with the codec named, not a generic
    // "no capacity".
    far.stop().await.unwrap();
    gw.wait_nodes("the far node to leave", Duration::from_secs(10), |ids| {
        !ids.iter().any(|id| id == "us-hevc")
    })
    .await;
    let c = client(&gw).await;
    let session = c
        .play_with_codecs(API_KEY, small.clone(), &[VideoCodec::Av1, VideoCodec::H264])
        .await
        .unwrap();
    assert_eq!(session.started().codec, VideoCodec::H264);
    let frames = frames_of(session, 10).await;
    let (decoded, dims) = decode_h264(&frames);
    assert_eq!((decoded, dims), (10, (320, 240)));
    drop(c);

    let c = client(&gw).await;
    let Err(err) = c.play_with_codecs(API_KEY, small, &[VideoCodec::Av1]).await else {
        panic!("no node encodes AV1, yet the session started");
    };
    match &err {
        ClientError::Refused { code, message, .. } => {
            assert_eq!(code, "unsupported_codec", "{err}");
            assert_eq!(message, "no node encodes av1", "{err}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    drop(c);
    near.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registering_thousands_of_encoders_is_not_admitted_and_the_gateway_goes_on() {
    let gw = TestGateway::start(|_| {}).await;
    // 2,000 entries fit a control frame but pass MAX_ENCODERS; 10,000 do not fit a frame.
    for n in [2_000usize, 10_000] {
        let endpoint = nearpath_tests::fake_node::node_endpoint(
            std::net::SocketAddr::new(ip(DE), 0),
            ServerVerify::PinnedSha256(gw.sha),
            1 << 20,
        )
        .unwrap();
        let reg = Registration::new(&format!("greedy-{n}"), &gw.token)
            .games(&["arena"], 1)
            .encoders(&vec![(VideoCodec::Hevc, "hevc_nvenc"); n]);
        let answer = RawNode::try_register(
            &endpoint,
            gw.addrs.quic,
            gw.sha,
            reg.message(),
            Duration::from_secs(10),
        )
        .await;
        if let Ok(node) = &answer {
            assert!(
                !matches!(node.first, nearpath_protocol::Message::Registered(_)),
                "{n} encoders: registered"
            );
        }
        assert!(
            !gw.node_ids().await.contains(&format!("greedy-{n}")),
            "{n} encoders: listed"
        );
    }
    // An honest node still registers and serves.
    let mut node = TestNode::start(game_node(&gw, "de-1", EncoderKind::Openh264), ip(DE));
    node.registered().await;
    let c = client(&gw).await;
    let session = c
        .play(
            API_KEY,
            PlayParams {
                game: "arena".into(),
                width: 320,
                height: 240,
                fps: 30,
                bitrate_kbps: 1000,
            },
        )
        .await
        .unwrap();
    assert_eq!(session.started().codec, VideoCodec::H264);
    drop(c);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Issue 15: the sessions directory records the session's codec, so that a resume through
/// another gateway (`GameService::start_resumed`) reopens it in the codec its client decodes
/// rather than H.264.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_directory_records_the_sessions_codec() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|c| c.federation.gateway_id = Some("a".into())).await;
    let mut cfg = game_node(&gw, "de-1", EncoderKind::X264);
    cfg.encoder.software_hevc_av1 = true;
    cfg.capacity.game_sessions = 2;
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let small = PlayParams {
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
    };
    let c = client(&gw).await;
    for codec in [VideoCodec::Av1, VideoCodec::H264] {
        let session = c
            .play_with_codecs(API_KEY, small.clone(), &[codec])
            .await
            .unwrap();
        assert_eq!(session.started().codec, codec);
        let entry = gw
            .store
            .get_session_dir(session.started().session_id)
            .unwrap()
            .expect("a directory entry");
        assert_eq!(entry.codec, codec);
        drop(session);
    }
    drop(c);
    node.stop().await.unwrap();
    gw.stop().await;
}
