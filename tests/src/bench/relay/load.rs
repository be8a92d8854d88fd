//! The load generator: players that connect and play, and the pacer that sends every frame to
//! every leg on the frame clock.

use super::*;

/// Where one copy of a frame goes: a connection and the session id the player expects.
#[derive(Clone)]
pub(super) struct Leg {
    pub(super) conn: quinn::Connection,
    pub(super) session_id: u64,
}

#[derive(Debug, Default)]
pub(super) struct SendLog {
    pub(super) sent: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    /// How late the sender woke for each frame, microseconds (the generator's own lag).
    pub(super) wake_late_us: Vec<f64>,
    /// Frames not sent because the sender was more than a frame interval behind.
    pub(super) skipped: Vec<u64>,
}

/// Sends `frames` frames to every leg at the plan's rate from `start`, each on its own uni stream
/// stamped with the time it was handed to quinn.
pub(super) async fn pace(
    plan: Arc<FramePlan>,
    legs: Vec<Leg>,
    start: Instant,
    frames: u64,
    phase: u64,
    size: (u16, u16),
) -> SendLog {
    let mut log = SendLog::default();
    for k in 0..frames {
        let due = start + plan.due(k);
        tokio::time::sleep_until(due).await;
        let lag = Instant::now().saturating_duration_since(due);
        log.wake_late_us.push(lag.as_secs_f64() * 1e6);
        if lag > plan.interval() {
            // A live source that has fallen a frame behind drops the frame rather than sending a
            // late burst; the gap is the generator's, and is not counted against the relay.
            log.skipped.push(k);
            continue;
        }
        let (keyframe, payload) = plan.frame(k, phase);
        // Alternating which leg goes first shares the cost of going second between the paths.
        for j in 0..legs.len() {
            let leg = &legs[(j + k as usize) % legs.len()];
            let header = FrameHeader {
                session_id: leg.session_id,
                seq: k,
                capture_ts_us: unix_micros(),
                encode_us: 0,
                keyframe,
                input_seq: 0,
                width: size.0,
                height: size.1,
                payload_len: 0,
            };
            match send_frame(&leg.conn, header, payload.clone()).await {
                Ok(()) => log.sent += 1,
                Err(e) => {
                    log.errors += 1;
                    log.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
    log
}

pub(super) fn play_params(shape: &StreamShape) -> PlayParams {
    PlayParams {
        fps: shape.fps,
        bitrate_kbps: shape.kbps,
        ..PlayParams::hd(GAME)
    }
}

/// A player connected and playing, split into the parts the benchmark keeps.
pub(super) struct Playing {
    pub(super) session_id: u64,
    pub(super) frames: FrameStream,
    pub(super) _control: PlayControl,
    pub(super) _client: Client,
}

pub(super) async fn play(
    addr: SocketAddr,
    sha: [u8; 32],
    api_key: &str,
    params: PlayParams,
) -> anyhow::Result<Playing> {
    let client = Client::connect(addr, "localhost", ServerVerify::PinnedSha256(sha))
        .await
        .with_context(|| format!("player connecting to {addr}"))?;
    let session = client
        .play(api_key, params)
        .await
        .with_context(|| format!("player at {addr}: play"))?;
    let session_id = session.started().session_id;
    let (control, frames, _input) = session.split();
    Ok(Playing {
        session_id,
        frames,
        _control: control,
        _client: client,
    })
}

/// Waits (bounded) for the node side of gateway session `id`.
pub(super) async fn opened_session(
    rx: &mut mpsc::UnboundedReceiver<OpenedSession>,
    pending: &mut HashMap<u64, OpenedSession>,
    id: u64,
) -> anyhow::Result<OpenedSession> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = pending.remove(&id) {
            return Ok(s);
        }
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(s)) => {
                pending.insert(s.session_id, s);
            }
            Ok(None) => bail!("every fake node stopped before session {id} was opened"),
            Err(_) => bail!("the gateway did not open session {id} on a fake node within 10 s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_frames_reach_players_directly_and_through_the_bare_relay() {
        let plan = Arc::new(FramePlan::new(&shape(), 3).unwrap());
        let params = play_params(&shape());
        let direct = DirectServer::start(&[ALPN_CLIENT]).unwrap();
        let mut accepted = accept_players(direct.endpoint.clone(), 1, DIRECT_SESSION_BASE);
        let d_player = play(direct.addr, direct.sha, "k", params.clone())
            .await
            .unwrap();
        let d_node = accepted.recv().await.unwrap().unwrap();
        assert_eq!(d_player.session_id, d_node.session_id);

        let relay = BareRelay::start(Vec::new()).unwrap();
        let r_player = play(relay.addr, relay.sha, "k", params).await.unwrap();
        assert_eq!(r_player.session_id, BARE_SESSION);
        let cfg = client_config(ServerVerify::PinnedSha256(relay.sha), &[ALPN_NODE]).unwrap();
        let r_node = node_endpoint()
            .unwrap()
            .connect_with(cfg, relay.addr, "localhost")
            .unwrap()
            .await
            .unwrap();

        let frames = 30;
        let legs = vec![
            Leg {
                conn: d_node.conn.clone(),
                session_id: d_node.session_id,
            },
            Leg {
                conn: r_node.clone(),
                session_id: BARE_SESSION,
            },
        ];
        let start = Instant::now();
        let sender = tokio::spawn(pace(plan.clone(), legs, start, frames, 119, (1280, 720)));
        let end = start + plan.due(frames);
        let (d, r) = tokio::join!(
            collect(d_player.frames, frames - 1, end),
            collect(r_player.frames, frames - 1, end)
        );
        let sent = sender.await.unwrap();
        assert_eq!((sent.sent, sent.errors), (2 * frames, 0));
        for log in [&d, &r] {
            assert_eq!(log.errors, 0, "{:?}", log.first_error);
            let seqs: Vec<u64> = log.frames.iter().map(|g| g.seq).collect();
            assert_eq!(seqs, (0..frames).collect::<Vec<_>>());
            // Phase 119 puts the group's IDR at frame 1.
            assert!(log.frames[1].keyframe && !log.frames[0].keyframe);
            let w = Window::of_one(log, 0, frames, 1e6);
            assert_eq!((w.missing(), w.late), (0, 0));
            assert!(w.lat.min > 0.0, "{:?}", w.lat);
        }
    }
}
