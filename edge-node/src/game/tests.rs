//! Session-level tests: built-in and external sources through pacing and encoding.

use super::encoder::nal_types;
use super::*;
use std::time::Duration;

fn params(title: &str, width: u32, height: u32, fps: u32) -> GameParams {
    GameParams {
        title: title.into(),
        width,
        height,
        fps,
        bitrate_kbps: 1000,
        codec: Default::default(),
        traceparent: None,
    }
}

fn encoder_cfg() -> EncoderConfig {
    EncoderConfig {
        idr_interval_s: 10,
        threads: 1,
        ..EncoderConfig::default()
    }
}

fn builtin() -> GameSource {
    GameSource::Builtin {}
}

fn command(script: &str) -> GameSource {
    GameSource::Command {
        command: vec!["sh".into(), "-c".into(), script.into()],
    }
}

/// The next frame, or a test failure after a generous deadline (a loaded CI machine).
async fn next(rx: &mut mpsc::Receiver<EncodedFrame>) -> EncodedFrame {
    match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
        Ok(Some(f)) => f,
        Ok(None) => panic!("the session ended"),
        Err(_) => panic!("no frame within 20 s"),
    }
}

/// Waits for the end of the frame stream and returns the session's end reason.
async fn end_of(session: &GameSession, rx: &mut mpsc::Receiver<EncodedFrame>) -> GameEnd {
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        while rx.recv().await.is_some() {}
    })
    .await;
    assert!(drained.is_ok(), "the frame stream did not end");
    session
        .ended()
        .expect("the reason is set before the stream closes")
}

#[tokio::test]
async fn builtin_session_starts_with_an_idr_of_the_right_size() {
    let (session, mut rx) =
        GameSession::start(params("arena", 320, 180, 60), &builtin(), &encoder_cfg()).unwrap();
    let first = next(&mut rx).await;
    assert_eq!(first.seq, 0);
    assert!(first.keyframe);
    assert_eq!((first.width, first.height), (320, 180));
    assert_eq!(first.input_seq, 0);
    let types = nal_types(&first.data);
    assert!(
        types.starts_with(&[7, 8]) && types.contains(&5),
        "{types:?}"
    );
    let now = unix_micros();
    assert!(first.capture_ts_us <= now && now - first.capture_ts_us < 60_000_000);
    let h = first.header(42);
    assert_eq!((h.session_id, h.payload_len), (42, first.data.len() as u32));

    // The stream decodes to the session's size, frame after frame.
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let mut frames = vec![first];
    for _ in 0..9 {
        frames.push(next(&mut rx).await);
    }
    let mut last_seq = None;
    for f in &frames {
        use openh264::formats::YUVSource;
        let yuv = dec.decode(&f.data).unwrap().expect("a picture per frame");
        assert_eq!(yuv.dimensions(), (320, 180));
        if let Some(prev) = last_seq {
            assert!(f.seq > prev);
        }
        last_seq = Some(f.seq);
    }
    let stats = session.stats();
    assert_eq!(stats.encoder, "openh264");
    assert!(stats.frames_sent >= 10 && stats.frames_encoded >= 10);
    assert!(stats.frames_rendered >= stats.frames_encoded);
    assert!(stats.keyframes >= 1);
    assert!(stats.encoder_ms_p50.is_some_and(|ms| ms > 0.0));
    assert!(session.ended().is_none());
}

#[tokio::test]
async fn frames_carry_the_last_applied_input_seq_and_stale_input_is_ignored() {
    let (session, mut rx) =
        GameSession::start(params("arena", 160, 96, 60), &builtin(), &encoder_cfg()).unwrap();
    next(&mut rx).await;
    let d = InputEvent::Key {
        code: 68,
        down: true,
    };
    assert_eq!(session.apply_input(3, d), InputOutcome::Applied);
    assert_eq!(session.apply_input(3, d), InputOutcome::Stale);
    assert_eq!(session.apply_input(2, d), InputOutcome::Stale);
    assert_eq!(session.apply_input(0, d), InputOutcome::Stale);
    loop {
        let f = next(&mut rx).await;
        assert!(f.input_seq == 0 || f.input_seq == 3, "{}", f.input_seq);
        if f.input_seq == 3 {
            break;
        }
    }
    // A keyframe request in the input stream makes the first frame that includes it an IDR.
    assert_eq!(
        session.apply_input(9, InputEvent::KeyframeRequest),
        InputOutcome::Applied
    );
    loop {
        let f = next(&mut rx).await;
        if f.input_seq == 9 {
            assert!(f.keyframe, "frame {} after the keyframe request", f.seq);
            break;
        }
    }
    let s = session.stats();
    assert_eq!(
        (s.inputs_applied, s.inputs_stale, s.last_input_seq),
        (2, 3, 9)
    );
}

#[tokio::test]
async fn force_keyframe_makes_a_later_frame_an_idr_and_only_then() {
    let (session, mut rx) = GameSession::start(
        params("testpattern", 160, 96, 60),
        &builtin(),
        &encoder_cfg(),
    )
    .unwrap();
    assert!(next(&mut rx).await.keyframe);
    for _ in 0..5 {
        assert!(!next(&mut rx).await.keyframe, "no IDR without a reason");
    }
    session.force_keyframe();
    // Frames already queued were encoded before the request.
    let mut found = false;
    for _ in 0..FRAME_QUEUE + 3 {
        if next(&mut rx).await.keyframe {
            found = true;
            break;
        }
    }
    assert!(found, "no IDR after force_keyframe");
    session.set_bitrate(300);
    next(&mut rx).await;
}

#[tokio::test]
async fn a_slow_receiver_costs_frames_and_the_stream_restarts_with_an_idr() {
    let (session, mut rx) =
        GameSession::start(params("arena", 64, 48, 120), &builtin(), &encoder_cfg()).unwrap();
    // Do not read: the queue fills and then frames are dropped.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while session.stats().frames_dropped_backpressure == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no frame was dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut queued = Vec::new();
    for _ in 0..FRAME_QUEUE {
        queued.push(next(&mut rx).await);
    }
    let seqs: Vec<u64> = queued.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, (0..FRAME_QUEUE as u64).collect::<Vec<_>>());
    let after = next(&mut rx).await;
    assert!(after.seq > FRAME_QUEUE as u64, "a gap shows the drop");
    assert!(
        after.keyframe,
        "the decoder lost references; restart from an IDR"
    );
}

#[tokio::test]
async fn sixty_fps_for_a_second_gives_about_sixty_frames() {
    let (session, mut rx) =
        GameSession::start(params("arena", 64, 48, 60), &builtin(), &encoder_cfg()).unwrap();
    let first = next(&mut rx).await;
    let start = tokio::time::Instant::now();
    let mut count = 0;
    let mut last = first.seq;
    while let Ok(Some(f)) = tokio::time::timeout_at(start + Duration::from_secs(1), rx.recv()).await
    {
        count += 1;
        assert!(f.seq > last);
        last = f.seq;
    }
    // 60 slots in a second; a loaded machine may miss some, but never gets more.
    assert!((40..=61).contains(&count), "{count} frames in a second");
    let s = session.stats();
    assert!(s.frames_encoded > last);
    assert!(
        s.frames_dropped_late <= 20,
        "{} late drops",
        s.frames_dropped_late
    );
}

#[tokio::test]
async fn stop_and_drop_end_the_session() {
    let (session, mut rx) =
        GameSession::start(params("arena", 64, 48, 60), &builtin(), &encoder_cfg()).unwrap();
    next(&mut rx).await;
    session.stop();
    assert_eq!(end_of(&session, &mut rx).await, GameEnd::Stopped);
    assert_eq!(session.closed().await, GameEnd::Stopped);
    assert_eq!(
        session.apply_input(1, InputEvent::Ping { id: 1 }),
        InputOutcome::Ended
    );
    let encoded = session.stats().frames_encoded;
    assert_eq!(rx.recv().await, None);
    assert_eq!(
        session.stats().frames_encoded,
        encoded,
        "nothing runs after stop"
    );

    // Dropping the receiver ends the session too.
    let (session, rx) =
        GameSession::start(params("arena", 64, 48, 60), &builtin(), &encoder_cfg()).unwrap();
    drop(rx);
    let end = tokio::time::timeout(Duration::from_secs(20), session.closed())
        .await
        .unwrap();
    assert_eq!(end, GameEnd::ReceiverClosed);

    // Dropping the session closes the stream.
    let (session, mut rx) =
        GameSession::start(params("arena", 64, 48, 60), &builtin(), &encoder_cfg()).unwrap();
    drop(session);
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        while rx.recv().await.is_some() {}
    })
    .await;
    assert!(drained.is_ok());
}

#[tokio::test]
async fn bad_parameters_and_sources_are_refused() {
    let cfg = encoder_cfg();
    for p in [
        params("arena", 63, 48, 60),
        params("arena", 8, 8, 60),
        params("arena", 4096, 2160, 60),
        params("arena", 64, 48, 0),
        params("arena", 64, 48, 1000),
        GameParams {
            bitrate_kbps: 0,
            ..params("arena", 64, 48, 60)
        },
    ] {
        let err = GameSession::start(p.clone(), &builtin(), &cfg).unwrap_err();
        assert!(
            matches!(err, GameError::InvalidParams { .. }) && err.is_client_error(),
            "{p:?}: {err}"
        );
    }
    let err = GameSession::start(params("doom", 64, 48, 60), &builtin(), &cfg).unwrap_err();
    assert!(matches!(err, GameError::Builtin(_)) && !err.is_client_error());
    assert!(err.to_string().contains("arena, testpattern"), "{err}");
    let err = GameSession::start(
        params("x", 64, 48, 60),
        &GameSource::Command { command: vec![] },
        &cfg,
    )
    .unwrap_err();
    assert!(matches!(err, GameError::EmptyCommand { .. }));
    let err = GameSession::start(
        params("x", 64, 48, 60),
        &GameSource::Command {
            command: vec!["/nonexistent/nearpath-game".into()],
        },
        &cfg,
    )
    .unwrap_err();
    assert!(
        matches!(&err, GameError::Spawn { program, .. } if program == "/nonexistent/nearpath-game"),
        "{err}"
    );
}

#[test]
fn starting_outside_a_runtime_is_an_error_not_a_panic() {
    let err =
        GameSession::start(params("arena", 64, 48, 60), &builtin(), &encoder_cfg()).unwrap_err();
    assert!(matches!(err, GameError::NoRuntime));
}

#[tokio::test]
async fn custom_encoders_plug_in() {
    /// Emits a fixed access unit per frame and records what it was asked.
    struct Fake;
    impl Encoder for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn encode(
            &mut self,
            frame: &I420Frame,
            force_idr: bool,
        ) -> Result<Option<AccessUnit>, EncoderError> {
            Ok(Some(AccessUnit {
                data: Bytes::from(vec![frame.width() as u8, u8::from(force_idr)]),
                keyframe: force_idr,
            }))
        }
        fn set_bitrate(&mut self, _kbps: u32) -> Result<(), EncoderError> {
            Ok(())
        }
    }
    let (session, mut rx) = GameSession::start_with_encoder(
        params("arena", 64, 48, 60),
        &builtin(),
        &encoder_cfg(),
        std::sync::Arc::new(|p: EncoderParams| {
            assert_eq!(
                (p.width, p.height, p.fps, p.bitrate_kbps),
                (64, 48, 60, 1000)
            );
            Ok(Box::new(Fake) as Box<dyn Encoder>)
        }),
    )
    .unwrap();
    assert_eq!(&next(&mut rx).await.data[..], &[64, 1]);
    assert_eq!(&next(&mut rx).await.data[..], &[64, 0]);
    assert_eq!(session.stats().encoder, "fake");
}

#[test]
fn thread_names_are_short_and_clean() {
    assert_eq!(thread_name("arena"), "game-arena");
    assert_eq!(thread_name("a\0b c/d-e_f.g-very-long"), "game-abcd-e_f.g");
}

#[test]
fn keyframe_policy_first_requested_and_periodic() {
    let t0 = Instant::now();
    let mut p = KeyframePolicy::new(Some(Duration::from_secs(2)));
    assert!(p.wants_idr(t0, false), "the first frame");
    p.produced(true, t0);
    assert!(!p.wants_idr(t0 + Duration::from_millis(1999), false));
    assert!(
        p.wants_idr(t0 + Duration::from_millis(500), true),
        "on request"
    );
    p.produced(false, t0 + Duration::from_millis(1500));
    assert!(p.wants_idr(t0 + Duration::from_secs(2), false), "every 2 s");
    p.produced(true, t0 + Duration::from_secs(2));
    assert!(!p.wants_idr(t0 + Duration::from_secs(3), false));

    let mut never = KeyframePolicy::new(None);
    assert!(never.wants_idr(t0, false));
    never.produced(true, t0);
    assert!(!never.wants_idr(t0 + Duration::from_secs(3600), false));
}

// ---- external sources ----

/// A program that writes one frame at start and one more for each input line, echoing the
/// line to stderr, and exits with status 3 when it gets key 81 ('Q').
const ECHO_SOURCE: &str = r#"
n=$((NEARPATH_WIDTH * NEARPATH_HEIGHT * 3 / 2))
[ "$NEARPATH_FPS" = 30 ] || { echo "NEARPATH_FPS is '$NEARPATH_FPS'" >&2; exit 9; }
head -c "$n" /dev/zero
while read -r line; do
  echo "$line" >&2
  case "$line" in *'"code":81'*) exit 3;; esac
  head -c "$n" /dev/zero
done
"#;

#[tokio::test]
async fn external_source_frames_input_and_exit_status() {
    let (session, mut rx) = GameSession::start(
        params("ext", 64, 48, 30),
        &command(ECHO_SOURCE),
        &encoder_cfg(),
    )
    .unwrap();
    let first = next(&mut rx).await;
    assert!(first.keyframe);
    assert_eq!((first.width, first.height, first.input_seq), (64, 48, 0));
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    {
        use openh264::formats::YUVSource;
        let yuv = dec.decode(&first.data).unwrap().unwrap();
        assert_eq!(yuv.dimensions(), (64, 48));
    }

    assert_eq!(
        session.apply_input(1, InputEvent::MouseMove { dx: 5, dy: -2 }),
        InputOutcome::Applied
    );
    let second = next(&mut rx).await;
    assert_eq!(second.input_seq, 1, "the frame answers input 1");
    assert!(!second.keyframe);
    assert_eq!(second.seq, 1);

    assert_eq!(
        session.apply_input(
            2,
            InputEvent::Key {
                code: 81,
                down: true
            }
        ),
        InputOutcome::Applied
    );
    let end = end_of(&session, &mut rx).await;
    assert_eq!(
        end,
        GameEnd::SourceExited {
            program: "sh".into(),
            status: "status 3".into(),
            frames: 2,
            stderr_tail: Some(r#"{"seq":2,"type":"key","code":81,"down":true}"#.into()),
        }
    );
    assert!(
        end.to_string()
            .starts_with("frame source \"sh\" exited with status 3 after 2 frames"),
        "{end}"
    );
    let s = session.stats();
    assert_eq!((s.frames_rendered, s.frames_encoded), (2, 2));
}

#[tokio::test]
async fn external_source_that_dies_or_writes_a_short_frame_ends_the_session() {
    let (session, mut rx) = GameSession::start(
        params("ext", 64, 48, 30),
        &command("echo 'cannot open display' >&2; exit 1"),
        &encoder_cfg(),
    )
    .unwrap();
    let end = end_of(&session, &mut rx).await;
    assert_eq!(
        end.to_string(),
        "frame source \"sh\" exited with status 1 after 0 frames \
         (last stderr line: \"cannot open display\")"
    );

    let (session, mut rx) = GameSession::start(
        params("ext", 64, 48, 30),
        &command("head -c 1000 /dev/zero"),
        &encoder_cfg(),
    )
    .unwrap();
    let end = end_of(&session, &mut rx).await;
    assert_eq!(
        end,
        GameEnd::ShortFrame {
            program: "sh".into(),
            got: 1000,
            expected: 64 * 48 * 3 / 2,
            frames: 0
        }
    );
    assert!(end.to_string().contains("short frame (1000 of 4608 bytes)"));

    // A crash by signal is reported as such.
    let (session, mut rx) = GameSession::start(
        params("ext", 64, 48, 30),
        &command("kill -TERM $$"),
        &encoder_cfg(),
    )
    .unwrap();
    let end = end_of(&session, &mut rx).await;
    assert!(
        matches!(&end, GameEnd::SourceExited { status, .. } if status == "signal 15"),
        "{end}"
    );
}

/// Whether process `pid` is gone (or a zombie waiting for init to reap it).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn stopping_kills_the_source_and_everything_it_started() {
    let dir = std::env::temp_dir().join(format!("nearpath-game-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("helper.pid");
    let _ = std::fs::remove_file(&pid_file);
    let script = format!(
        r#"sleep 300 & echo $! > '{}'
n=$((NEARPATH_WIDTH * NEARPATH_HEIGHT * 3 / 2))
head -c "$n" /dev/zero
while read -r line; do head -c "$n" /dev/zero; done"#,
        pid_file.display()
    );
    let (session, mut rx) =
        GameSession::start(params("ext", 64, 48, 30), &command(&script), &encoder_cfg()).unwrap();
    // The first frame comes after the helper's pid was written.
    next(&mut rx).await;
    let helper: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!process_gone(helper), "the helper runs during the session");
    session.stop();
    assert_eq!(end_of(&session, &mut rx).await, GameEnd::Stopped);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_gone(helper) {
        assert!(
            Instant::now() < deadline,
            "helper {helper} survived the session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_video_change_resizes_the_game_and_restarts_the_encoder_with_an_idr() {
    let (session, mut rx) =
        GameSession::start(params("arena", 320, 180, 60), &builtin(), &encoder_cfg()).unwrap();
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let decode = |dec: &mut openh264::decoder::Decoder, f: &EncodedFrame| {
        use openh264::formats::YUVSource;
        dec.decode(&f.data)
            .expect("decodes")
            .expect("a picture per frame")
            .dimensions()
    };
    for _ in 0..3 {
        let f = next(&mut rx).await;
        assert_eq!(decode(&mut dec, &f), (320, 180));
    }
    session.set_video(480, 270, 30).unwrap();
    assert_eq!(
        (
            session.current_params().width,
            session.current_params().height,
            session.current_params().fps
        ),
        (480, 270, 30)
    );
    // Frames encoded before the change may still be queued; the first at the new size is an
    // IDR, and every frame after it has the new size, decoding with the same decoder.
    let mut seq = None;
    let first = loop {
        let f = next(&mut rx).await;
        if let Some(s) = seq {
            assert!(f.seq > s);
        }
        seq = Some(f.seq);
        if (f.width, f.height) == (480, 270) {
            break f;
        }
        assert_eq!((f.width, f.height), (320, 180));
        assert_eq!(decode(&mut dec, &f), (320, 180));
    };
    assert!(first.keyframe);
    assert_eq!(decode(&mut dec, &first), (480, 270));
    for _ in 0..5 {
        let f = next(&mut rx).await;
        assert_eq!((f.width, f.height), (480, 270));
        assert_eq!(decode(&mut dec, &f), (480, 270));
    }
    assert!(session.ended().is_none());
}

#[tokio::test]
async fn out_of_range_video_changes_are_refused_and_change_nothing() {
    let (session, mut rx) =
        GameSession::start(params("arena", 160, 96, 60), &builtin(), &encoder_cfg()).unwrap();
    next(&mut rx).await;
    for (w, h, fps) in [
        (0, 0, 60),
        (99_999, 99_999, 60),
        (161, 96, 60),
        (160, 97, 60),
        (160, 96, 0),
        (160, 96, 1000),
        (u32::MAX, u32::MAX, u32::MAX),
    ] {
        let e = session.set_video(w, h, fps).unwrap_err();
        assert!(e.is_client_error(), "{w}x{h}@{fps}: {e}");
    }
    assert_eq!(session.current_params(), params("arena", 160, 96, 60));
    for _ in 0..3 {
        let f = next(&mut rx).await;
        assert_eq!((f.width, f.height), (160, 96));
    }
}

#[tokio::test]
async fn a_flood_of_video_changes_costs_at_most_one_encoder_a_frame_and_the_last_wins() {
    use std::sync::atomic::AtomicUsize;
    /// Counts the encoders made; each emits the picture's width.
    struct Fake;
    impl Encoder for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn encode(
            &mut self,
            frame: &I420Frame,
            force_idr: bool,
        ) -> Result<Option<AccessUnit>, EncoderError> {
            Ok(Some(AccessUnit {
                data: Bytes::from(frame.width().to_le_bytes().to_vec()),
                keyframe: force_idr,
            }))
        }
        fn set_bitrate(&mut self, _kbps: u32) -> Result<(), EncoderError> {
            Ok(())
        }
    }
    let made = Arc::new(AtomicUsize::new(0));
    let counter = made.clone();
    let (session, mut rx) = GameSession::start_with_encoder(
        params("arena", 64, 48, 30),
        &builtin(),
        &encoder_cfg(),
        Arc::new(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(Fake))
        }),
    )
    .unwrap();
    next(&mut rx).await;
    for i in 0..1000u32 {
        session.set_video(64 + 2 * (i % 50), 48, 30).unwrap();
    }
    session.set_video(200, 100, 30).unwrap();
    let f = loop {
        let f = next(&mut rx).await;
        if f.width == 200 {
            break f;
        }
    };
    assert!(f.keyframe);
    assert_eq!(f.height, 100);
    let frames = session.stats().frames_encoded;
    let made = made.load(Ordering::SeqCst) as u64;
    assert!(made <= frames + 1, "{made} encoders for {frames} frames");
}

#[tokio::test]
async fn an_external_program_refuses_a_video_change_and_keeps_running() {
    let (session, mut rx) = GameSession::start(
        params("ext", 16, 16, 30),
        &command("while :; do head -c 384 /dev/zero; sleep 0.02; done"),
        &encoder_cfg(),
    )
    .unwrap();
    next(&mut rx).await;
    let e = session.set_video(32, 32, 30).unwrap_err();
    assert!(e.to_string().contains("external program"), "{e}");
    assert_eq!(session.current_params(), params("ext", 16, 16, 30));
    let f = next(&mut rx).await;
    assert_eq!((f.width, f.height), (16, 16));
}

/// Mean luma of a `size`-pixel square at (`x`, `y`) of a decoded picture.
fn luma_at(yuv: &openh264::decoder::DecodedYUV<'_>, x: usize, y: usize, size: usize) -> f64 {
    use openh264::formats::YUVSource;
    let (stride, _, _) = yuv.strides();
    let plane = yuv.y();
    let mut sum = 0u64;
    for row in y..y + size {
        for col in x..x + size {
            sum += u64::from(plane[row * stride + col]);
        }
    }
    sum as f64 / (size * size) as f64
}

/// Guards the A/V sync reference: the built-in game's flash (top-right quarter white) is on
/// exactly the frames whose slot falls in a beep window of the session timeline, and its sound
/// is stamped from the same epoch, 10 ms a packet.
#[tokio::test]
async fn builtin_flash_and_beep_share_the_session_timeline() {
    let (session, mut rx) =
        GameSession::start(params("arena", 320, 180, 30), &builtin(), &encoder_cfg()).unwrap();
    let mut sound = session
        .start_audio(&AudioConfig::default())
        .unwrap()
        .expect("audio is on by default");
    assert!(
        session
            .start_audio(&AudioConfig::default())
            .unwrap()
            .is_none(),
        "audio starts once"
    );
    let epoch = session.epoch_unix_us();
    // The sender reads sound as it comes; so does this test, beside the frames.
    let sound_reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 40 {
            match tokio::time::timeout(Duration::from_secs(20), sound.recv()).await {
                Ok(Some(p)) => got.push(p),
                _ => break,
            }
        }
        (got, sound)
    });
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let (mut flashed, mut dark) = (Vec::new(), 0);
    // 2.5 s at 30 fps: the beeps at 0 s and 2 s.
    for _ in 0..75 {
        let f = next(&mut rx).await;
        let yuv = dec.decode(&f.data).unwrap().expect("a picture per frame");
        // Four points spread over the top-right quarter: only the flash covers them all.
        let lumas =
            [(170, 10), (300, 10), (170, 70), (300, 70)].map(|(x, y)| luma_at(&yuv, x, y, 8));
        let t = (f.capture_ts_us - epoch) % audio::BEEP_PERIOD_US;
        if lumas.iter().all(|&l| l > 200.0) {
            flashed.push(t);
        } else if (100_000..1_900_000).contains(&t) {
            dark += 1;
        }
    }
    // Frames are captured a little after their slot is due: allow 30 ms of render lateness.
    assert!(flashed.len() >= 3, "flashed frames at {flashed:?}");
    for t in &flashed {
        assert!(
            *t < audio::BEEP_LEN_US + 30_000,
            "a flash {t} us into the period"
        );
    }
    assert!(
        dark > 40,
        "{dark} frames outside the window were not flashed"
    );
    // Sound: packet k starts at epoch + 10 k ms.
    let (got, mut sound) = sound_reader.await.unwrap();
    assert_eq!(got.len(), 40, "40 packets within 20 s each");
    for (k, p) in got.iter().enumerate() {
        assert_eq!(p.seq as usize, k);
        assert_eq!(p.capture_ts_us, epoch + k as u64 * 10_000);
        assert_eq!(p.samples, 480);
    }
    session.stop();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while sound.recv().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "audio ends with the session");
}

/// Frames of 64x48 I420 every 30 ms, forever.
const FRAMES_64X48: &str = "while :; do head -c 4608 /dev/zero; sleep 0.03; done";

/// Guards the external audio pipe: a program writes PCM to fd 3 (`NEARPATH_AUDIO_FD`), the node
/// encodes it in 10 ms packets; closing fd 3 ends the sound, not the session.
#[tokio::test]
async fn external_source_sound_on_fd_3_is_encoded_and_its_end_is_not_the_session_end() {
    // 100 ms of sound (10 packets and a half), then fd 3 closed, then frames.
    let script = format!(
        "head -c {} /dev/zero >&\"$NEARPATH_AUDIO_FD\"; exec 3>&-; {FRAMES_64X48}",
        audio::FRAME_BYTES * 10 + audio::FRAME_BYTES / 2
    );
    let (session, mut rx) =
        GameSession::start(params("ext", 64, 48, 30), &command(&script), &encoder_cfg()).unwrap();
    let mut sound = session
        .start_audio(&AudioConfig::default())
        .unwrap()
        .expect("audio on");
    let mut seqs = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(p) = sound.recv().await {
            seqs.push(p.seq);
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "the sound ends when the program closes fd 3"
    );
    assert_eq!(seqs, (0..10).collect::<Vec<u32>>());
    // The session goes on.
    next(&mut rx).await;
    next(&mut rx).await;
    assert!(session.ended().is_none());
}

/// With `[audio] enabled = false` the node still reads the pipe, so a program writing more
/// sound than a pipe holds (64 KiB) does not block before its frames.
#[tokio::test]
async fn disabled_audio_drains_the_pipe_so_the_program_never_blocks() {
    let script = format!("head -c 1000000 /dev/zero >&3; {FRAMES_64X48}");
    let (session, mut rx) =
        GameSession::start(params("ext", 64, 48, 30), &command(&script), &encoder_cfg()).unwrap();
    let off = AudioConfig {
        enabled: false,
        ..AudioConfig::default()
    };
    assert!(session.start_audio(&off).unwrap().is_none());
    let f = next(&mut rx).await;
    assert_eq!((f.width, f.height), (64, 48));
}
