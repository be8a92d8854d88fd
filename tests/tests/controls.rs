//! Player controls end to end (issue 15, "Controls"): the picture size and frame rate change
//! mid-session without a new session (native players; the browser's in browser.rs), the
//! gateway and the node each refuse what they must, a failover starts the next node at the size
//! in force, and rumble travels node -> gateway -> player only from the serving node.

mod common;

use common::*;
use nearpath_config::{GameEntry, GameSource};
use nearpath_protocol::message::{
    ErrorInfo, Message, Rumble, SessionKind, SetVideo, VIDEO_REFUSED,
};
use nearpath_protocol::stream::send;
use nearpath_protocol::{ControlEvent, FrameStream, PlayControl, PlayParams, VideoFrame};
use std::time::Duration;

/// The encoding tests need a core each on a 2-core machine: one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn arena_node(gw: &TestGateway, id: &str, source: GameSource) -> nearpath_config::NodeConfig {
    let mut cfg = gw.node_config(id, &gw.token);
    cfg.games = vec![GameEntry {
        title: "arena".into(),
        source,
    }];
    cfg.capacity.game_sessions = 1;
    cfg
}

fn params(width: u32, height: u32, fps: u32, bitrate_kbps: u32) -> PlayParams {
    PlayParams {
        game: "arena".into(),
        width,
        height,
        fps,
        bitrate_kbps,
    }
}

/// What came in while waiting for a control event: the frames (in arrival order) and the
/// event.
async fn until_control(
    control: &mut PlayControl,
    frames: &mut FrameStream,
    got: &mut Vec<VideoFrame>,
) -> ControlEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::select! {
            c = control.next() => return c.unwrap().expect("control stream ended"),
            f = frames.next() => got.push(f.unwrap().expect("frames ended")),
            _ = tokio::time::sleep_until(deadline) => panic!("no control event within 20 s"),
        }
    }
}

async fn next_frame(frames: &mut FrameStream) -> VideoFrame {
    tokio::time::timeout(Duration::from_secs(20), frames.next())
        .await
        .expect("no frame within 20 s")
        .unwrap()
        .expect("frames ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_720p_session_changed_to_1080p_keeps_decoding_in_the_same_session() {
    use openh264::formats::YUVSource;
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(arena_node(&gw, "de-1", GameSource::Builtin {}), ip(DE));
    node.registered().await;
    let c = native_client(&gw, FR_CLIENT).await;
    let session = c.play(API_KEY, params(1280, 720, 30, 4000)).await.unwrap();
    let id = session.started().session_id;
    let (mut control, mut frames, _input) = session.split();
    // One decoder for the whole session, as a player has: the new size arrives in-stream.
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let mut last_seq = None;
    let mut decode = |f: &VideoFrame| -> Option<(usize, usize)> {
        assert_eq!(f.header.session_id, id, "a frame of another session");
        // Frames travel on their own streams: one overtaken by the next is late, and a player
        // drops it rather than decode it out of order.
        if last_seq.is_some_and(|s| f.header.seq <= s) {
            return None;
        }
        last_seq = Some(f.header.seq);
        let yuv = dec
            .decode(&f.payload)
            .unwrap_or_else(|e| panic!("frame {} does not decode: {e}", f.header.seq))?;
        Some(yuv.dimensions())
    };
    for _ in 0..10 {
        let f = next_frame(&mut frames).await;
        assert_eq!((f.header.width, f.header.height), (1280, 720));
        if let Some(d) = decode(&f) {
            assert_eq!(d, (1280, 720));
        }
    }
    let asked = std::time::Instant::now();
    control.set_video(1920, 1080, 30).await.unwrap();
    let mut got = Vec::new();
    let answer = until_control(&mut control, &mut frames, &mut got).await;
    let confirmed = asked.elapsed();
    match answer {
        ControlEvent::VideoChanged(v) => assert_eq!(
            v,
            SetVideo {
                width: 1920,
                height: 1080,
                fps: 30
            }
        ),
        other => panic!("expected VideoChanged, got {other:?}"),
    }
    // Frames already on their way are 720p; the first 1080p one is an IDR, and every later
    // frame is 1080p and decodes at that size.
    let mut big = 0;
    let mut seen_big = false;
    let mut i = 0;
    while big < 30 {
        let f = if i < got.len() {
            got[i].clone()
        } else {
            next_frame(&mut frames).await
        };
        i += 1;
        let size = (f.header.width, f.header.height);
        if size == (1920, 1080) {
            if !seen_big {
                assert!(f.header.keyframe, "the first 1080p frame is an IDR");
                seen_big = true;
                // Bounded by the confirmation when it was already buffered.
                println!(
                    "720p -> 1080p: confirmed after {:.1} ms, first 1080p frame (IDR, {} bytes) after {:.1} ms",
                    confirmed.as_secs_f64() * 1000.0,
                    f.payload.len(),
                    asked.elapsed().max(confirmed).as_secs_f64() * 1000.0
                );
            }
            if let Some(d) = decode(&f) {
                assert_eq!(d, (1920, 1080));
                big += 1;
            }
        } else {
            assert!(!seen_big, "a 720p frame after the change: {:?}", f.header);
            assert_eq!(size, (1280, 720));
            decode(&f);
        }
    }
    assert!(
        admin_game_session(&gw, id).await.is_some(),
        "the same session runs"
    );
    control.close("done").await.unwrap();
    drop(node);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_flooded_video_changes_are_refused_and_the_session_plays_on() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(arena_node(&gw, "de-1", GameSource::Builtin {}), ip(DE));
    node.registered().await;
    let c = native_client(&gw, FR_CLIENT).await;
    let session = c.play(API_KEY, params(160, 96, 30, 300)).await.unwrap();
    let (mut control, mut frames, _input) = session.split();
    let mut got = Vec::new();
    for (w, h, fps, why) in [
        (0, 0, 30, "at least 16x16"),
        (99_999, 99_999, 30, "even"),
        (99_998, 99_998, 30, "exceeds the limit"),
        (161, 96, 30, "even"),
        (160, 97, 30, "even"),
        (160, 96, 0, "fps is outside"),
        (160, 96, 1000, "fps is outside"),
    ] {
        control.set_video(w, h, fps).await.unwrap();
        match until_control(&mut control, &mut frames, &mut got).await {
            ControlEvent::VideoRefused(e) => {
                assert_eq!(e.code, VIDEO_REFUSED);
                assert!(e.message.contains(why), "{w}x{h}@{fps}: {}", e.message);
            }
            other => panic!("{w}x{h}@{fps}: expected VideoRefused, got {other:?}"),
        }
    }
    // A flood: 20 changes at once. At most MAX_VIDEO_CHANGES_PER_S reach the node; the rest
    // are refused, each with an answer.
    for i in 0..20u32 {
        control.set_video(160 + 2 * i, 96, 30).await.unwrap();
    }
    let (mut changed, mut refused) = (0, 0);
    while changed + refused < 20 {
        match until_control(&mut control, &mut frames, &mut got).await {
            ControlEvent::VideoChanged(_) => changed += 1,
            ControlEvent::VideoRefused(e) => {
                assert!(
                    e.message.contains("too many video changes"),
                    "{}",
                    e.message
                );
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (1..=4).contains(&changed),
        "{changed} changed, {refused} refused"
    );
    // And it plays on.
    for _ in 0..10 {
        next_frame(&mut frames).await;
    }
    control.close("done").await.unwrap();
    drop(node);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_program_refuses_a_video_change_with_a_reason_and_keeps_streaming() {
    let gw = TestGateway::start(|_| {}).await;
    // Grey frames of the size the node asks for, at about 60 fps, until killed.
    let script = "import os,sys,time\nw=int(os.environ['NEARPATH_WIDTH']);h=int(os.environ['NEARPATH_HEIGHT'])\nwhile True:\n    sys.stdout.buffer.write(bytes([100])*(w*h) + bytes([128])*(w*h//2))\n    sys.stdout.flush()\n    time.sleep(1/60)\n";
    let source = GameSource::Command {
        command: vec!["python3".into(), "-c".into(), script.into()],
    };
    let mut node = TestNode::start(arena_node(&gw, "de-ext", source), ip(DE));
    node.registered().await;
    let c = native_client(&gw, FR_CLIENT).await;
    let session = c.play(API_KEY, params(64, 64, 30, 300)).await.unwrap();
    let (mut control, mut frames, _input) = session.split();
    next_frame(&mut frames).await;
    control.set_video(128, 128, 30).await.unwrap();
    let mut got = Vec::new();
    match until_control(&mut control, &mut frames, &mut got).await {
        ControlEvent::VideoRefused(e) => {
            assert!(e.message.contains("external program"), "{}", e.message)
        }
        other => panic!("expected VideoRefused, got {other:?}"),
    }
    for _ in 0..5 {
        let f = next_frame(&mut frames).await;
        assert_eq!((f.header.width, f.header.height), (64, 64));
    }
    control.close("done").await.unwrap();
    drop(node);
    gw.stop().await;
}

/// A raw node serving "arena" (one slot) from `place`.
async fn raw_arena(gw: &TestGateway, id: &str, place: (&str, &str, f64, f64)) -> RawNode {
    raw_game_node(gw, id, ip(place), &gw.token, &["arena"], 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_starts_the_next_node_at_the_size_in_force() {
    let gw = TestGateway::start(|c| c.nodes.heartbeat_ms = 60_000).await;
    let near = raw_arena(&gw, "de-1", DE).await;
    let far = raw_arena(&gw, "us-1", US_EAST).await;
    let c = native_client(&gw, FR_CLIENT).await;
    let play = tokio::spawn(async move {
        let s = c.play(API_KEY, params(160, 96, 30, 300)).await.unwrap();
        (c, s)
    });
    let mut first = near.accept_game().await;
    let (_c, session) = play.await.unwrap();
    let (mut control, mut frames, _input) = session.split();
    control.set_video(320, 180, 60).await.unwrap();
    let wanted = SetVideo {
        width: 320,
        height: 180,
        fps: 60,
    };
    match first.recv.next().await.unwrap() {
        Some(Message::SetVideo(v)) => assert_eq!(v, wanted),
        other => panic!("expected SetVideo on the node, got {other:?}"),
    }
    send(&mut first.send, &Message::SetVideo(wanted))
        .await
        .unwrap();
    let mut got = Vec::new();
    assert_eq!(
        until_control(&mut control, &mut frames, &mut got).await,
        ControlEvent::VideoChanged(wanted)
    );
    near.conn.close(0u32.into(), b"dead");
    let (_tx, _rx, open) = far.accept_session().await;
    match open.kind {
        SessionKind::Game(g) => assert_eq!(
            (g.width, g.height, g.fps),
            (320, 180, 60),
            "the next node opens the session at the size in force"
        ),
        other => panic!("expected a game, got {other:?}"),
    }
    drop(first);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_serving_node_can_confirm_a_change_or_rumble_the_players_pad() {
    let gw = TestGateway::start(|c| c.nodes.heartbeat_ms = 60_000).await;
    let serving = raw_arena(&gw, "de-1", DE).await;
    let mut other = raw_arena(&gw, "us-1", US_EAST).await;
    let c = native_client(&gw, FR_CLIENT).await;
    let play = tokio::spawn(async move {
        let s = c.play(API_KEY, params(160, 96, 30, 300)).await.unwrap();
        (c, s)
    });
    let mut node_side = serving.accept_game().await;
    let (_c, session) = play.await.unwrap();
    let (mut control, mut frames, _input) = session.split();
    let rumble = |pad| Rumble {
        pad,
        strong_magnitude: 40_000,
        weak_magnitude: 1_000,
        duration_ms: 200,
    };
    // Another node forges a rumble on its control stream; its heartbeat's ack proves the
    // gateway read it.
    let forged = nearpath_protocol::encode_to_vec(&Message::Rumble(rumble(1)));
    // A frame this short has a one-byte length; the body follows the type byte.
    let body = &forged[2..];
    other
        .send_raw_frame(nearpath_protocol::message::ty::RUMBLE, body)
        .await;
    other.heartbeat(0).await;
    // The serving node confirms a change nobody asked for: nothing reaches the player.
    send(
        &mut node_side.send,
        &Message::SetVideo(SetVideo {
            width: 3840,
            height: 2160,
            fps: 240,
        }),
    )
    .await
    .unwrap();
    // The serving node's own rumble does reach it, and first: neither the forgery nor the
    // unsolicited confirmation came before it.
    send(&mut node_side.send, &Message::Rumble(rumble(2)))
        .await
        .unwrap();
    let mut got = Vec::new();
    assert_eq!(
        until_control(&mut control, &mut frames, &mut got).await,
        ControlEvent::Rumble(rumble(2))
    );
    // A change the node refuses reaches the player with the node's reason.
    control.set_video(320, 180, 30).await.unwrap();
    match node_side.recv.next().await.unwrap() {
        Some(Message::SetVideo(_)) => {}
        other => panic!("expected SetVideo on the node, got {other:?}"),
    }
    let no = Message::Error(ErrorInfo {
        code: VIDEO_REFUSED.into(),
        message: "this node renders one size".into(),
        retryable: false,
    });
    send(&mut node_side.send, &no).await.unwrap();
    match until_control(&mut control, &mut frames, &mut got).await {
        ControlEvent::VideoRefused(e) => assert_eq!(e.message, "this node renders one size"),
        other => panic!("expected VideoRefused, got {other:?}"),
    }
    drop(node_side);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gamepad_2s_trigger_reaches_the_game() {
    use nearpath_edge_node::game::builtin::trigger_bar;
    use openh264::formats::YUVSource;
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(arena_node(&gw, "de-1", GameSource::Builtin {}), ip(DE));
    node.registered().await;
    let c = native_client(&gw, FR_CLIENT).await;
    let session = c.play(API_KEY, params(320, 180, 30, 1500)).await.unwrap();
    let (_control, mut frames, input) = session.split();
    let (x0, x1, y0, y1) = trigger_bar(320, 180, 2, u16::MAX);
    let (x, y) = (((x0 + x1) / 2) as usize, ((y0 + y1) / 2) as usize);
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    // A frame rendered before the input: no bar there.
    let first = next_frame(&mut frames).await;
    assert!(first.header.keyframe);
    let mut last_seq = Some(first.header.seq);
    let before = {
        let yuv = dec.decode(&first.payload).unwrap().expect("a picture");
        yuv.y()[y * yuv.strides().0 + x]
    };
    assert!(before < 100, "no bar before the trigger: luma {before}");
    // Pad 2's right trigger, fully pulled (and its button bit), sticks at rest.
    let seq = input.send_pad(2, [0; 4], [0, u16::MAX], 1 << 7).unwrap();
    loop {
        let f = next_frame(&mut frames).await;
        if last_seq.is_some_and(|s| f.header.seq <= s) {
            continue;
        }
        last_seq = Some(f.header.seq);
        let Some(yuv) = dec.decode(&f.payload).unwrap() else {
            continue;
        };
        let luma = yuv.y()[y * yuv.strides().0 + x];
        if f.header.input_seq < seq {
            assert!(luma < 100, "a bar before the trigger: luma {luma}");
            continue;
        }
        // The frame that applied it shows pad 2's bar at full height.
        assert!(luma > 180, "pad 2's trigger bar: luma {luma}");
        break;
    }
    drop(node);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collision_in_the_builtin_game_rumbles_the_native_players_pad() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(arena_node(&gw, "de-1", GameSource::Builtin {}), ip(DE));
    node.registered().await;
    let c = native_client(&gw, FR_CLIENT).await;
    let session = c.play(API_KEY, params(160, 96, 60, 300)).await.unwrap();
    let (mut control, mut frames, input) = session.split();
    // The ship onto the outer asteroid's orbit (0.42 x 96 px right of the centre): the asteroid
    // laps every 233 frames (under 4 s at 60 fps) and hits it. Pad 3 sends input last, so its
    // pad is the one that rumbles.
    input
        .send(nearpath_protocol::InputEvent::MouseMove { dx: 40, dy: 0 })
        .unwrap();
    input.send_pad(3, [0; 4], [0, 0], 0).unwrap();
    let mut got = Vec::new();
    let r = match until_control(&mut control, &mut frames, &mut got).await {
        ControlEvent::Rumble(r) => r,
        other => panic!("expected Rumble, got {other:?}"),
    };
    let (strong, weak, ms) = nearpath_edge_node::game::HIT_RUMBLE;
    assert_eq!(
        r,
        Rumble {
            pad: 3,
            strong_magnitude: strong,
            weak_magnitude: weak,
            duration_ms: ms
        }
    );
    control.close("done").await.unwrap();
    drop(node);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_change_rewrites_the_sessions_directory_so_a_resume_elsewhere_opens_at_that_size() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|c| c.federation.gateway_id = Some("a".into())).await;
    let mut node = TestNode::start(arena_node(&gw, "de-1", GameSource::Builtin {}), ip(DE));
    node.registered().await;
    let c = native_client(&gw, FR_CLIENT).await;
    let session = c.play(API_KEY, params(160, 96, 30, 300)).await.unwrap();
    let id = session.started().session_id;
    let entry = gw
        .store
        .get_session_dir(id)
        .unwrap()
        .expect("a directory entry");
    assert_eq!((entry.width, entry.height, entry.fps), (160, 96, 30));
    let (mut control, mut frames, _input) = session.split();
    control.set_video(320, 180, 60).await.unwrap();
    let mut got = Vec::new();
    assert!(matches!(
        until_control(&mut control, &mut frames, &mut got).await,
        ControlEvent::VideoChanged(_)
    ));
    // The entry is published from the session's driver, right after the change took effect.
    let entry = eventually("the rewritten entry", Duration::from_secs(5), || async {
        gw.store
            .get_session_dir(id)
            .unwrap()
            .filter(|e| (e.width, e.height, e.fps) == (320, 180, 60))
    })
    .await;
    assert_eq!(entry.node_id, "de-1");
    control.close("done").await.unwrap();
    drop(node);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_change_reaches_only_the_session_of_the_stream_it_came_on() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = arena_node(&gw, "de-1", GameSource::Builtin {});
    cfg.capacity.game_sessions = 2;
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    // SetVideo names no session: it acts on the session of the play stream it arrives on, so
    // another client has no way to address someone else's session.
    let alice = native_client(&gw, FR_CLIENT).await;
    let mallory = native_client(&gw, FR_CLIENT).await;
    let a = alice.play(API_KEY, params(160, 96, 30, 300)).await.unwrap();
    let m = mallory
        .play(API_KEY, params(160, 96, 30, 300))
        .await
        .unwrap();
    let (a_id, m_id) = (a.started().session_id, m.started().session_id);
    assert_ne!(a_id, m_id);
    let (mut a_control, mut a_frames, _a_input) = a.split();
    let (mut m_control, mut m_frames, _m_input) = m.split();
    m_control.set_video(320, 180, 30).await.unwrap();
    let mut got = Vec::new();
    assert!(matches!(
        until_control(&mut m_control, &mut m_frames, &mut got).await,
        ControlEvent::VideoChanged(_)
    ));
    // Alice's first control event is the answer to her own change, not Mallory's.
    a_control.set_video(192, 108, 30).await.unwrap();
    let mut a_got = Vec::new();
    assert_eq!(
        until_control(&mut a_control, &mut a_frames, &mut a_got).await,
        ControlEvent::VideoChanged(SetVideo {
            width: 192,
            height: 108,
            fps: 30
        })
    );
    // Alice's frames are hers and never Mallory's size.
    loop {
        let f = match a_got.pop() {
            Some(f) => f,
            None => next_frame(&mut a_frames).await,
        };
        assert_eq!(f.header.session_id, a_id);
        assert_ne!((f.header.width, f.header.height), (320, 180));
        if (f.header.width, f.header.height) == (192, 108) {
            break;
        }
    }
    drop(node);
    gw.stop().await;
}
