//! Game streaming to native players end to end: built-in game rendered and H.264-encoded on the
//! node, frames relayed by the gateway over QUIC, input datagrams back, failover, refusals, and
//! an external frame source.

mod common;

use common::*;
use nearpath_config::{GameEntry, GameSource};
use nearpath_protocol::{
    Client, ClientError, ControlEvent, InputEvent, PlayParams, ServerVerify, VideoFrame,
};
use std::time::{Duration, Instant};

/// The encoding tests need a core each to hold 60 fps on a 2-core machine: run them one at a
/// time rather than let them starve each other.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn with_game(
    mut cfg: nearpath_config::NodeConfig,
    title: &str,
    source: GameSource,
) -> nearpath_config::NodeConfig {
    cfg.games = vec![GameEntry {
        title: title.into(),
        source,
    }];
    cfg.capacity.game_sessions = 1;
    cfg
}

async fn client(gw: &TestGateway, from: std::net::IpAddr) -> Client {
    // Native clients dial from chosen loopback addresses so the geofence sees a place.
    Client::connect_from(
        std::net::SocketAddr::new(from, 0),
        gw.addrs.quic,
        "localhost",
        ServerVerify::PinnedSha256(gw.sha),
    )
    .await
    .unwrap()
}

/// A node serving the built-in `arena` (one session at a time) from `addr`, registered.
async fn arena_node(gw: &TestGateway, id: &str, addr: std::net::IpAddr) -> TestNode {
    let mut node = TestNode::start(
        with_game(
            gw.node_config(id, &gw.token),
            "arena",
            GameSource::Builtin {},
        ),
        addr,
    );
    node.registered().await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_client_plays_720p60_for_5_seconds_and_input_moves_the_ship() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let node = arena_node(&gw, "de-1", ip(DE)).await;
    let c = client(&gw, ip(FR_CLIENT)).await;
    let session = c.play(API_KEY, PlayParams::hd("arena")).await.unwrap();
    assert_eq!(
        (
            session.started().width,
            session.started().height,
            session.started().fps
        ),
        (1280, 720, 60)
    );
    let (mut control, mut frames, input) = session.split();
    let t0 = Instant::now();
    let mut got: Vec<VideoFrame> = Vec::new();
    let mut last_sent = 0u64;
    let mut next_input = Instant::now();
    let mut i = 0u32;
    while t0.elapsed() < Duration::from_secs(5) {
        if Instant::now() >= next_input {
            // Hold D (move right), pressing it again every 100 ms.
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
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(f);
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = got.len();
    println!("received {n} frames in {secs:.2} s");
    // >= 95% of 60 fps over the time we listened.
    assert!(
        n as f64 >= 0.95 * 60.0 * 5.0,
        "only {n} frames in {secs:.2} s"
    );
    assert!(got[0].header.keyframe, "the stream starts with an IDR");
    let (decoded, dims) = decode_h264(&got);
    assert_eq!(dims, (1280, 720));
    assert!(
        decoded as f64 >= 0.95 * n as f64,
        "decoded {decoded} of {n}"
    );
    // Frames report the inputs they applied: the last ones sent are applied by the end.
    let applied = got.iter().map(|f| f.header.input_seq).max().unwrap();
    assert!(
        applied >= last_sent.saturating_sub(2) && applied > 0,
        "applied {applied}, sent {last_sent}"
    );
    // The node saw the inputs (admin view of the session) and the session is listed.
    let sessions = gw.admin_get("/admin/sessions").await;
    assert_eq!(sessions["data"][0]["game"], "arena", "{sessions}");
    assert!(
        sessions["data"][0]["inputs"].as_u64().unwrap() >= i as u64 - 1,
        "{sessions}"
    );
    control.close("done").await.unwrap();
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_serving_node_dies_frames_resume_from_another_within_2_seconds() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let near = arena_node(&gw, "de-1", ip(DE)).await;
    let far = arena_node(&gw, "us-1", ip(US_EAST)).await;
    let c = client(&gw, ip(FR_CLIENT)).await;
    let params = PlayParams {
        game: "arena".into(),
        width: 640,
        height: 360,
        fps: 30,
        bitrate_kbps: 2000,
    };
    let session = c.play(API_KEY, params).await.unwrap();
    let (mut control, mut frames, _input) = session.split();
    for _ in 0..10 {
        frames.next().await.unwrap().unwrap();
    }
    let sessions = gw.admin_get("/admin/sessions").await;
    assert_eq!(
        sessions["data"][0]["node"], "de-1",
        "the nearest node serves first"
    );
    // Kill the serving node abruptly (no drain).
    near.task.abort();
    let killed = Instant::now();
    // Frames stop, the client is told, then frames resume from the other node.
    let mut paused = false;
    let resumed_at = loop {
        tokio::select! {
            c = control.next() => match c.unwrap() {
                Some(ControlEvent::Paused(_)) => paused = true,
                Some(ControlEvent::Resumed) => {}
                other => panic!("unexpected control event {other:?}"),
            },
            f = frames.next() => {
                let f = f.unwrap().unwrap();
                if paused && f.header.keyframe {
                    break Instant::now();
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("frames did not resume"),
        }
    };
    let gap = resumed_at - killed;
    println!("frames resumed {gap:?} after the node was killed");
    assert!(gap < Duration::from_secs(2), "{gap:?}");
    let sessions = gw.admin_get("/admin/sessions").await;
    assert_eq!(sessions["data"][0]["node"], "us-1");
    control.close("done").await.unwrap();
    far.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geofence_and_capacity_refusals_have_explicit_reasons() {
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = with_game(
        gw.node_config("de-h100", &gw.token),
        "arena",
        GameSource::Builtin {},
    );
    cfg.gpus = vec![gpu("NVIDIA H100 80GB HBM3")];
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let small = PlayParams {
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
    };
    // A client in CN may not use an H100: export control.
    let cn = client(&gw, ip(CN_CLIENT)).await;
    match cn.play(API_KEY, small.clone()).await {
        Err(ClientError::Refused { code, message, .. }) => {
            assert_eq!(code, "geofence");
            assert!(message.contains("export-control"), "{message}");
        }
        other => panic!("expected a geofence refusal, got {:?}", other.map(|_| ())),
    }
    // One slot: the second player is refused for capacity.
    let fr = client(&gw, ip(FR_CLIENT)).await;
    let first = fr.play(API_KEY, small.clone()).await.unwrap();
    let other = client(&gw, ip(FR_CLIENT)).await;
    match other.play(API_KEY, small.clone()).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "no_capacity"),
        other => panic!("expected no_capacity, got {:?}", other.map(|_| ())),
    }
    // Unknown titles are named.
    match other
        .play(
            API_KEY,
            PlayParams {
                game: "nope".into(),
                ..small
            },
        )
        .await
    {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "unknown_game"),
        other => panic!("expected unknown_game, got {:?}", other.map(|_| ())),
    }
    drop(first);
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_frame_source_is_streamed_and_its_exit_ends_the_session() {
    let gw = TestGateway::start(|_| {}).await;
    // A tiny "game" that captures at 60 fps like a real source: 40 grey 64x64 I420 frames,
    // then it exits with status 3.
    let script = "import os,sys,time\nw=int(os.environ['NEARPATH_WIDTH']);h=int(os.environ['NEARPATH_HEIGHT'])\nfor i in range(40):\n    sys.stdout.buffer.write(bytes([(i*5)%256])*(w*h) + bytes([128])*(w*h//2))\n    sys.stdout.flush()\n    time.sleep(1/60)\nsys.exit(3)\n";
    let source = GameSource::Command {
        command: vec!["python3".into(), "-c".into(), script.into()],
    };
    let mut node = TestNode::start(
        with_game(gw.node_config("de-ext", &gw.token), "desktop", source),
        ip(DE),
    );
    node.registered().await;
    let c = client(&gw, ip(FR_CLIENT)).await;
    let params = PlayParams {
        game: "desktop".into(),
        width: 64,
        height: 64,
        fps: 60,
        bitrate_kbps: 500,
    };
    let session = c.play(API_KEY, params).await.unwrap();
    let (mut control, mut frames, _input) = session.split();
    let mut got = Vec::new();
    let reason = loop {
        tokio::select! {
            f = frames.next() => if let Ok(Some(f)) = f { got.push(f) },
            ev = control.next() => match ev.unwrap() {
                Some(ControlEvent::Ended(e)) => break e.reason,
                other => panic!("unexpected {other:?}"),
            },
            _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("the session did not end"),
        }
    };
    assert!(
        reason.contains("exited") && reason.contains('3'),
        "{reason}"
    );
    assert!(got.len() >= 10, "only {} frames", got.len());
    let (decoded, dims) = decode_h264(&got);
    assert_eq!(dims, (64, 64));
    assert!(decoded >= 10);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// What ffprobe says about an audio file: (codec, sample rate, channels, duration in seconds).
fn ffprobe_audio(path: &std::path::Path) -> (String, u32, u32, f64) {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs (apt-get install ffmpeg; .ci/deps installs it)");
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    let num = |x: &serde_json::Value| -> f64 {
        x.as_str()
            .and_then(|t| t.parse().ok())
            .or_else(|| x.as_f64())
            .unwrap_or_else(|| panic!("not a number: {x} in {v}"))
    };
    (
        s["codec_name"].as_str().unwrap_or_default().to_string(),
        num(&s["sample_rate"]) as u32,
        s["channels"].as_u64().unwrap_or_default() as u32,
        num(&v["format"]["duration"]),
    )
}

/// Guards the native audio path end to end: the built-in game's sound, encoded on the node,
/// relayed by the gateway as datagrams and written by the client as Ogg Opus (what
/// `nearpath play --audio-out` does), decodes with ffprobe as Opus, 48 kHz, stereo, lasting as
/// long as the session was listened to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_client_receives_the_games_sound_and_writes_ogg_opus() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let node = arena_node(&gw, "de-1", ip(DE)).await;
    let c = client(&gw, ip(FR_CLIENT)).await;
    let params = PlayParams {
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
    };
    let session = c.play(API_KEY, params).await.unwrap();
    let sid = session.started().session_id;
    let mut audio = session.audio();
    let (mut control, mut frames, _input) = session.split();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.opus");
    let mut ogg = nearpath_protocol::ogg::OggOpusWriter::new(
        std::io::BufWriter::new(std::fs::File::create(&path).unwrap()),
        sid as u32,
    )
    .unwrap();
    let t0 = Instant::now();
    let (mut packets, mut first_ts, mut last_ts) = (0u64, 0u64, 0u64);
    let mut latency_ms = Vec::new();
    let mut frames_seen = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        tokio::select! {
            p = audio.next() => {
                let p = p.expect("connection open");
                assert_eq!(p.session_id, sid);
                assert_eq!(p.samples, 480);
                assert!(p.flags & nearpath_protocol::audio::AUDIO_FLAG_FEC != 0, "FEC is on by default");
                latency_ms.push(nearpath_protocol::unix_micros().saturating_sub(p.capture_ts_us) as f64 / 1000.0);
                if packets == 0 {
                    first_ts = p.capture_ts_us;
                }
                last_ts = p.capture_ts_us;
                packets += 1;
                ogg.push(&p).unwrap();
            }
            f = frames.next() => {
                f.unwrap().unwrap();
                frames_seen += 1;
            }
            _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("nothing for 5 s"),
        }
    }
    let listened_s = (last_ts - first_ts) as f64 / 1e6 + 0.01;
    latency_ms.sort_by(f64::total_cmp);
    println!(
        "{packets} audio packets over {listened_s:.2} s of capture time, {frames_seen} frames; capture -> client p50 {:.2} ms, p95 {:.2} ms; {} late, {} concealed",
        latency_ms[latency_ms.len() / 2],
        latency_ms[latency_ms.len() * 95 / 100],
        ogg.late,
        ogg.filled
    );
    // 10 ms packets for the whole time (allowing the session's start-up).
    assert!(packets >= 250, "only {packets} audio packets in 3 s");
    assert!(frames_seen > 60, "video kept flowing beside the sound");
    ogg.finish().unwrap();
    let (codec, rate, channels, duration) = ffprobe_audio(&path);
    assert_eq!((codec.as_str(), rate, channels), ("opus", 48_000, 2));
    assert!(
        (duration - listened_s).abs() < 0.1,
        "the file lasts {duration:.3} s, the sound listened to {listened_s:.3} s"
    );
    let view = admin_game_session(&gw, sid).await.expect("live");
    assert!(
        view["audio"]["packets"].as_u64().unwrap() >= packets,
        "{view}"
    );
    control.close("done").await.unwrap();
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Guards audio across failover: when the serving node dies, the next node's sound reaches the
/// same player (its packets start again from seq 0, with its own capture clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_serving_node_dies_audio_resumes_from_the_next_node() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let near = arena_node(&gw, "de-1", ip(DE)).await;
    let far = arena_node(&gw, "us-1", ip(US_EAST)).await;
    let c = client(&gw, ip(FR_CLIENT)).await;
    let params = PlayParams {
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
    };
    let session = c.play(API_KEY, params).await.unwrap();
    let mut audio = session.audio();
    let (mut control, mut frames, _input) = session.split();
    // Sound from the first node.
    let mut before = 0;
    while before < 20 {
        tokio::select! {
            p = audio.next() => { p.expect("open"); before += 1; }
            f = frames.next() => { f.unwrap().unwrap(); }
            _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("no sound from the first node"),
        }
    }
    assert_eq!(
        gw.admin_get("/admin/sessions").await["data"][0]["node"],
        "de-1"
    );
    near.task.abort();
    let killed = Instant::now();
    let mut resumed = false;
    let mut after = Vec::new();
    while after.len() < 50 {
        tokio::select! {
            c = control.next() => match c.unwrap() {
                Some(ControlEvent::Paused(_)) => {}
                Some(ControlEvent::Resumed) => resumed = true,
                other => panic!("unexpected control event {other:?}"),
            },
            p = audio.next() => {
                let p = p.expect("open");
                // Packets of the dead node still in flight may arrive before the notice.
                if resumed {
                    after.push(p);
                }
            }
            f = frames.next() => { f.unwrap().unwrap(); }
            _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("audio did not resume ({} packets after Resumed)", after.len()),
        }
    }
    println!(
        "audio resumed {:?} after the node was killed",
        killed.elapsed()
    );
    assert_eq!(
        gw.admin_get("/admin/sessions").await["data"][0]["node"],
        "us-1"
    );
    // The new node's sound counts from its own start.
    assert!(
        after.iter().any(|p| p.seq < 100),
        "{:?}",
        after.iter().map(|p| p.seq).collect::<Vec<_>>()
    );
    control.close("done").await.unwrap();
    far.stop().await.unwrap();
    gw.stop().await;
}

/// Regression: `PlayControl::close` says the gateway answers `Close` with `Ended`, but the
/// gateway finished the stream at once, before its session had let the node go and freed its
/// slot. A player who started again at once (a page reload, a new match) was refused with
/// `no_capacity` in between. The gateway now answers `Ended` once the slot is free (and the
/// node waits briefly for its own release, `sessions::slot_wait_tests`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_who_starts_again_at_once_gets_the_slot_the_last_session_freed() {
    let gw = TestGateway::start(|_| {}).await;
    let node = arena_node(&gw, "de-1", ip(DE)).await;
    let small = PlayParams {
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 500,
    };
    let c = client(&gw, ip(FR_CLIENT)).await;
    for round in 0..5 {
        let session = match c.play(API_KEY, small.clone()).await {
            Ok(s) => s,
            Err(e) => panic!("round {round}: the freed slot was refused: {e}"),
        };
        let (mut control, mut frames, _input) = session.split();
        tokio::time::timeout(Duration::from_secs(10), frames.next())
            .await
            .expect("a first frame")
            .expect("the stream is open")
            .expect("a frame");
        control.close("again").await.unwrap();
        // A player that starts again waits for its session's end, as `close` documents.
        while let Some(_event) = tokio::time::timeout(Duration::from_secs(10), control.next())
            .await
            .expect("the session ends")
            .expect("a control event")
        {}
    }
    node.stop().await.unwrap();
    gw.stop().await;
}
