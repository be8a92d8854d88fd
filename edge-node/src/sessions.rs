//! Session streams the gateway opens on the node's connection: one bidirectional stream per
//! session, `Open` first, then tokens (inference) or control messages (game).

use crate::game::audio::{self, EncodedAudio};
use crate::game::rate::{FrameOutcome, RateConfig, RateController, SlotDecision};
use crate::game::select::NodeEncoders;
use crate::game::{EncodedFrame, FrameGate, GameSession, InputOutcome};
use crate::inference::{BackendError, BackendEvent, ModelRegistry};
use nearpath_config::{AudioConfig, EncoderConfig, GameEntry, MediaConfig, NodeConfig};
use nearpath_protocol::message::{
    Accepted, Chunk, Done, ErrorInfo, Message, Open, RefuseCode, Refused, SessionKind, Token,
};
use nearpath_protocol::message::{Ended, GameParams, Rumble, VIDEO_REFUSED};
use nearpath_protocol::openai::{Endpoint, InferenceRequest};
use nearpath_protocol::stream::{priority, send, FramedRecv};
use nearpath_protocol::InputDatagram;
use nearpath_protocol::MAX_REQUEST_FRAME;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

/// The next item of an optional channel (a session's rumbles); never ready when
/// there is none, `None` once the channel has closed.
async fn recv_opt<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next packet of a session's sound; never ready when it has none, `None` once its source
/// ended.
async fn recv_sound(rx: &mut Option<audio::AudioReceiver>) -> Option<EncodedAudio> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends one packet of a session's sound as an audio datagram on the gateway connection. A
/// datagram the connection cannot take now is lost, like one lost on the path: the player's
/// decoder conceals it.
fn send_sound(conn: &quinn::Connection, session_id: u64, packet: EncodedAudio) {
    let datagram = nearpath_protocol::AudioPacket {
        session_id,
        seq: packet.seq,
        capture_ts_us: packet.capture_ts_us,
        samples: packet.samples,
        flags: audio::flags(&packet),
        opus: packet.data,
    };
    match datagram.encode() {
        Ok(bytes) => {
            if let Err(e) = conn.send_datagram(bytes.into()) {
                debug!(error = %e, "audio datagram not sent");
            }
        }
        Err(e) => warn!(error = %e, "audio packet not encodable; dropped"),
    }
}

/// What a session needs from the connection it arrived on.
#[derive(Clone)]
pub struct SessionContext {
    pub conn: quinn::Connection,
}

/// All sessions of this node: admission (capacity, draining), counting, cancellation.
pub struct Sessions {
    models: ModelRegistry,
    games: Vec<GameEntry>,
    encoder: EncoderConfig,
    /// The encoders `[encoder]` resolved to on this machine (probed once at start).
    encoders: NodeEncoders,
    media: MediaConfig,
    audio: AudioConfig,
    game_slots: u32,
    /// Running game sessions by id, for routing input datagrams.
    running_games: Mutex<HashMap<u64, Arc<GameSession>>>,
    /// Game sessions whose gateway was lost, waiting for a resume, by id.
    parked: Mutex<HashMap<u64, Parked>>,
    capacity: u32,
    active: AtomicU32,
    draining: AtomicBool,
    idle: Notify,
    /// Woken whenever a game session leaves `running_games` (a slot frees).
    game_freed: Notify,
    /// Cancelled to end every running session (drain deadline passed).
    cancel_all: Mutex<CancellationToken>,
    /// Total inference sessions served, for tests and logs.
    served: AtomicU32,
}

/// A game session kept running after its gateway was lost.
struct Parked {
    title: String,
    resume: tokio::sync::oneshot::Sender<Resume>,
}

/// The session stream a gateway opened to resume a parked game.
struct Resume {
    ctx: SessionContext,
    tx: quinn::SendStream,
    framed: FramedRecv,
}

/// How one gateway connection's share of a game session ended.
enum LegEnd {
    /// The session is over (the game, the gateway or the node ended it).
    Over,
    /// The connection to the gateway was lost, not closed on purpose.
    PathLost,
}

/// Whether a connection ended because its path failed (the gateway went silent, or reset the
/// connection after a restart), as opposed to being closed on purpose by either end.
fn path_lost(conn: &quinn::Connection) -> bool {
    use quinn::ConnectionError as E;
    match conn.close_reason() {
        Some(E::TimedOut) | Some(E::Reset) => true,
        // The node closes a silent gateway's connection itself (`CLOSE_LEASE_EXPIRED`).
        Some(E::LocallyClosed) => true,
        _ => false,
    }
}

/// Counts a running session; the count drops (and idle waiters wake) however the session ends.
struct ActiveGuard<'a>(&'a Sessions);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Sessions {
    pub fn new(config: &NodeConfig) -> Result<Sessions, String> {
        let models = ModelRegistry::from_config(
            &config.models,
            Some(config.capacity.inference_concurrency as usize),
        )
        .map_err(|e| format!("models: {e}"))?;
        // A node without games encodes nothing: no probing, no FFmpeg.
        let encoders = if config.games.is_empty() {
            NodeEncoders::openh264()
        } else {
            let e = NodeEncoders::resolve(&config.encoder)
                .map_err(|e| format!("encoder.encoder: {e}"))?;
            tracing::info!(picked = e.kind.as_str(), "{}", e.describe());
            e
        };
        Ok(Sessions {
            models,
            games: config.games.clone(),
            encoder: config.encoder.clone(),
            encoders,
            media: config.media.clone(),
            audio: config.audio.clone(),
            game_slots: config.capacity.game_sessions,
            running_games: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            capacity: config.capacity.inference_concurrency + config.capacity.game_sessions,
            active: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
            game_freed: Notify::new(),
            cancel_all: Mutex::new(CancellationToken::new()),
            served: AtomicU32::new(0),
        })
    }

    /// The encoders this node offers.
    pub fn encoders(&self) -> &NodeEncoders {
        &self.encoders
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    pub fn served(&self) -> u32 {
        self.served.load(Ordering::Acquire)
    }

    /// Share of capacity in use, 0..1.
    pub fn load(&self) -> f32 {
        if self.capacity == 0 {
            return 1.0;
        }
        (self.active() as f32 / self.capacity as f32).min(1.0)
    }

    /// Median encode time across running game sessions (the slowest session's median).
    pub fn encoder_ms_p50(&self) -> Option<f32> {
        self.games_map()
            .values()
            .filter_map(|g| g.stats().encoder_ms_p50)
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            })
            .map(|v| v as f32)
    }

    /// Stats of every running game session, by session id.
    pub fn game_stats(&self) -> Vec<(u64, crate::game::GameStats)> {
        self.games_map()
            .iter()
            .map(|(id, g)| (*id, g.stats()))
            .collect()
    }

    fn games_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<GameSession>>> {
        self.running_games.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies input datagrams the gateway forwards to the session they name.
    async fn input_loop(self: Arc<Self>, conn: quinn::Connection) {
        while let Ok(d) = conn.read_datagram().await {
            let Ok(input) = InputDatagram::decode(&d) else {
                continue;
            };
            let game = self.games_map().get(&input.session_id).cloned();
            if let Some(g) = game {
                if g.apply_input(input.seq, input.event) == InputOutcome::Ended {
                    debug!(session = input.session_id, "input for an ended session");
                }
            }
        }
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn cancel_token(&self) -> CancellationToken {
        self.cancel_all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ends every running session now.
    pub fn cancel_all(&self) {
        let mut t = self.cancel_all.lock().unwrap_or_else(|p| p.into_inner());
        t.cancel();
        *t = CancellationToken::new();
    }

    /// Waits until no session runs, or `deadline` passes (then cancels what is left).
    pub async fn wait_idle(&self, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                self.cancel_all();
                return;
            }
        }
    }

    /// Accepts session streams until the connection closes or `done` fires.
    pub async fn accept_loop(self: Arc<Self>, ctx: SessionContext, done: CancellationToken) {
        let inputs = tokio::spawn(self.clone().input_loop(ctx.conn.clone()));
        let _abort = AbortOnDrop(inputs);
        loop {
            let (send_half, recv_half) = tokio::select! {
                _ = done.cancelled() => return,
                r = ctx.conn.accept_bi() => match r {
                    Ok(s) => s,
                    Err(_) => return,
                },
            };
            let this = self.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move { this.serve_stream(ctx, send_half, recv_half).await });
        }
    }

    async fn serve_stream(
        self: Arc<Self>,
        ctx: SessionContext,
        mut tx: quinn::SendStream,
        rx: quinn::RecvStream,
    ) {
        // Session streams (game control, inference tokens) go before video frames.
        let _ = tx.set_priority(priority::SESSION);
        let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
        let open = match tokio::time::timeout(Duration::from_secs(10), framed.next()).await {
            Ok(Ok(Some(Message::Open(o)))) => o,
            Ok(Ok(Some(other))) => {
                refuse(
                    &mut tx,
                    RefuseCode::BadRequest,
                    format!("expected Open, got {}", other.name()),
                )
                .await;
                return;
            }
            _ => return,
        };
        let span = info_span!("session", id = open.session_id);
        self.serve_open(ctx, open, tx, framed)
            .instrument(span)
            .await
    }

    async fn serve_open(
        &self,
        ctx: SessionContext,
        open: Open,
        mut tx: quinn::SendStream,
        framed: FramedRecv,
    ) {
        if self.is_draining() {
            refuse(&mut tx, RefuseCode::Busy, "node is draining".into()).await;
            return;
        }
        match open.kind {
            SessionKind::Inference {
                model,
                endpoint,
                request_json,
                request_id,
                traceparent,
            } => {
                let span = tracing::info_span!("inference", %request_id, %model, traceparent = traceparent.as_deref().unwrap_or("-"));
                // With spans exported, this span joins the gateway's (the client's trace), and
                // the upstream server continues from it.
                let traceparent = nearpath_telemetry::join(
                    &span,
                    traceparent
                        .as_deref()
                        .and_then(nearpath_telemetry::TraceIds::parse),
                )
                .map(|own| own.header())
                .or(traceparent);
                let open_ = InferenceOpen {
                    model,
                    endpoint,
                    request_json,
                    request_id,
                    traceparent,
                };
                self.serve_inference(open.session_id, open_, tx, framed)
                    .instrument(span)
                    .await
            }
            SessionKind::Game(params) => {
                let span = tracing::info_span!(
                    "game",
                    title = %params.title,
                    traceparent = params.traceparent.as_deref().unwrap_or("-")
                );
                // With spans exported, the session's span is the child of the gateway's
                // session span (the player's trace when it sent one); the decoder kept only
                // a valid context, and without one the span is a root.
                let _ = nearpath_telemetry::join(
                    &span,
                    params
                        .traceparent
                        .as_deref()
                        .and_then(nearpath_telemetry::TraceIds::parse),
                );
                async {
                    let Some((ctx, tx, framed)) = self
                        .resume_parked(ctx, open.session_id, &params, tx, framed)
                        .await
                    else {
                        return;
                    };
                    self.serve_game(ctx, open.session_id, params, tx, framed)
                        .await
                }
                .instrument(span)
                .await
            }
        }
    }

    async fn serve_game(
        &self,
        ctx: SessionContext,
        session_id: u64,
        params: GameParams,
        mut tx: quinn::SendStream,
        framed: FramedRecv,
    ) {
        let Some(entry) = self.games.iter().find(|g| g.title == params.title) else {
            refuse(
                &mut tx,
                RefuseCode::UnknownWorkload,
                format!("game {} is not served by this node", params.title),
            )
            .await;
            return;
        };
        if !self.wait_for_game_slot().await {
            refuse(
                &mut tx,
                RefuseCode::Busy,
                format!("all {} game slots are in use", self.game_slots),
            )
            .await;
            return;
        }
        // The gateway only asks for codecs this node registered; a gateway that asks for
        // another is refused rather than served in a codec its client may not decode.
        let Some(offered) = self.encoders.get(params.codec) else {
            refuse(
                &mut tx,
                RefuseCode::BadRequest,
                format!("this node does not encode {}", params.codec),
            )
            .await;
            return;
        };
        let (game, mut frames) = match GameSession::start_with_encoder(
            params.clone(),
            &entry.source,
            &self.encoder,
            offered.factory.clone(),
        ) {
            Ok(x) => x,
            Err(e) => {
                let code = if e.is_client_error() {
                    RefuseCode::BadRequest
                } else {
                    RefuseCode::Internal
                };
                refuse(&mut tx, code, e.to_string()).await;
                return;
            }
        };
        // Sound is an addition: a session whose audio cannot start goes on silent.
        let mut sound = match game.start_audio(&self.audio) {
            Ok(rx) => rx,
            Err(e) => {
                warn!(error = %e, "game sound unavailable; the session goes on silent");
                None
            }
        };
        let game = Arc::new(game);
        self.games_map().insert(session_id, game.clone());
        self.active.fetch_add(1, Ordering::AcqRel);
        let _guard = ActiveGuard(self);
        let _remove = RemoveGame(self, session_id);
        debug!(
            w = params.width,
            h = params.height,
            fps = params.fps,
            "game session running"
        );
        let cancel = self.cancel_token();
        let mut rumbles = game.take_rumbles();
        let (mut ctx, mut tx, mut framed) = (ctx, tx, framed);
        loop {
            if send(&mut tx, &Message::Accepted(Accepted { session_id }))
                .await
                .is_err()
            {
                game.stop();
                return;
            }
            match self
                .game_leg(
                    &ctx,
                    session_id,
                    &params,
                    &game,
                    &mut frames,
                    &mut rumbles,
                    &mut sound,
                    &mut tx,
                    &mut framed,
                    &cancel,
                )
                .await
            {
                LegEnd::Over => return,
                LegEnd::PathLost => {}
            }
            // The gateway vanished without ending the session: keep the game running, unseen,
            // for the grace period, so that the player can resume it through another gateway,
            // which opens it here again with the same session id.
            let grace = Duration::from_millis(self.media.resume_grace_ms);
            warn!(
                grace_ms = grace.as_millis() as u64,
                "gateway lost; keeping the game for a resume"
            );
            let (resume_tx, mut resume_rx) = tokio::sync::oneshot::channel();
            self.parked_map().insert(
                session_id,
                Parked {
                    title: params.title.clone(),
                    resume: resume_tx,
                },
            );
            let deadline = tokio::time::sleep(grace);
            tokio::pin!(deadline);
            let resumed = loop {
                tokio::select! {
                    r = &mut resume_rx => break r.ok(),
                    f = frames.recv() => if f.is_none() { break None },
                    _ = &mut deadline => break None,
                    _ = cancel.cancelled() => break None,
                }
            };
            self.parked_map().remove(&session_id);
            match resumed {
                Some(r) => {
                    debug!("game session resumed through another gateway");
                    game.force_keyframe();
                    // Sound made while no gateway listened is stale: start from what comes next.
                    if let Some(rx) = sound.as_mut() {
                        while rx.try_recv().is_some() {}
                    }
                    (ctx, tx, framed) = (r.ctx, r.tx, r.framed);
                }
                None => {
                    debug!("no gateway resumed the game within the grace period; stopping it");
                    game.stop();
                    return;
                }
            }
        }
    }

    fn parked_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Parked>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a session stream that opens a parked game (same id) to the task keeping it: the
    /// stream is given back when no game with that id is parked. A parked game of another
    /// title is refused: an id names one game.
    async fn resume_parked(
        &self,
        ctx: SessionContext,
        session_id: u64,
        params: &GameParams,
        mut tx: quinn::SendStream,
        framed: FramedRecv,
    ) -> Option<(SessionContext, quinn::SendStream, FramedRecv)> {
        let parked = self.parked_map().remove(&session_id);
        let Some(parked) = parked else {
            return Some((ctx, tx, framed));
        };
        if parked.title != params.title {
            self.parked_map().insert(session_id, parked);
            refuse(
                &mut tx,
                RefuseCode::BadRequest,
                format!("session {session_id} is another game"),
            )
            .await;
            return None;
        }
        if let Err(back) = parked.resume.send(Resume { ctx, tx, framed }) {
            // The game stopped meanwhile: serve the stream as a new session.
            return Some((back.ctx, back.tx, back.framed));
        }
        None
    }

    /// Serves one gateway connection's share of a game session, until the session is over or
    /// that connection is lost.
    #[allow(clippy::too_many_arguments)]
    async fn game_leg(
        &self,
        ctx: &SessionContext,
        session_id: u64,
        params: &GameParams,
        game: &Arc<GameSession>,
        frames: &mut tokio::sync::mpsc::Receiver<EncodedFrame>,
        rumbles: &mut Option<tokio::sync::mpsc::Receiver<Rumble>>,
        sound: &mut Option<audio::AudioReceiver>,
        tx: &mut quinn::SendStream,
        framed: &mut FramedRecv,
        cancel: &CancellationToken,
    ) -> LegEnd {
        let rate = Arc::new(Mutex::new(RateController::new(
            Instant::now(),
            RateConfig {
                queue_delay_threshold: Duration::from_millis(self.media.queue_delay_threshold_ms),
                ..RateConfig::new(
                    params.bitrate_kbps,
                    self.media.min_bitrate_kbps,
                    Duration::from_millis(self.media.max_frame_delay_ms),
                )
            },
        )));
        game.set_gate(Arc::new(RateGate {
            rate: rate.clone(),
            conn: ctx.conn.clone(),
        }));
        let mut sender = FrameSender::new(ctx.conn.clone(), session_id, rate.clone());
        let mut report = tokio::time::interval(Duration::from_secs(1));
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let timeout = sender.next_timeout();
            tokio::select! {
                f = frames.recv() => match f {
                    Some(frame) => sender.send(frame),
                    None => {
                        let reason = game.ended().map(|e| e.to_string()).unwrap_or_else(|| "game ended".into());
                        let _ = send(tx, &Message::Ended(Ended { reason })).await;
                        let _ = tx.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(2), tx.stopped()).await;
                        return LegEnd::Over;
                    }
                },
                a = recv_sound(sound) => match a {
                    Some(packet) => send_sound(&ctx.conn, session_id, packet),
                    // The source's sound ended (an external program closed its pipe): the
                    // session goes on silent.
                    None => *sound = None,
                },
                Some((seq, outcome)) = sender.done.recv() => sender.outcome(seq, outcome),
                // The game asks for a vibration: on the session stream, to the gateway.
                r = recv_opt(rumbles) => match r {
                    Some(r) => {
                        let _ = send(tx, &Message::Rumble(r)).await;
                    }
                    // The game asks for no more (it ended, or never could).
                    None => *rumbles = None,
                },
                _ = sleep_until_opt(timeout) => {
                    let reset = sender.reset_late();
                    for _ in 0..reset {
                        game.note_frame_reset();
                    }
                }
                _ = report.tick() => {
                    let s = lock(&rate).stats();
                    let path = ctx.conn.stats().path;
                    debug!(
                        cwnd = path.cwnd,
                        rtt_ms = path.rtt.as_millis() as u64,
                        lost_packets = path.lost_packets,
                        congestion_events = path.congestion_events,
                        target_kbps = s.target_kbps,
                        delivered_kbps = s.delivered_kbps,
                        base_rtt_ms = s.base_rtt.map(|d| d.as_millis() as u64),
                        queue_delay_ms = s.queue_delay.map(|d| d.as_millis() as u64),
                        skipped_path_full = s.skipped_path_full,
                        skipped_frame_rate = s.skipped_frame_rate,
                        reset = s.reset,
                        refused = s.refused,
                        in_flight = s.in_flight_frames,
                        "media sender"
                    );
                }
                m = framed.next() => match m {
                    Ok(Some(Message::ForceKeyframe)) => game.force_keyframe(),
                    // The client's bitrate is the session's ceiling; congestion decides below it.
                    Ok(Some(Message::SetBitrate(b))) => lock(&rate).set_max_kbps(b.kbps),
                    // The gateway checked the change against its limits; the node checks again
                    // (its own limits, and whether its source can change size) and answers with
                    // the values in force or a `video_refused` error. The rate controller's
                    // state carries over: the path did not change.
                    Ok(Some(Message::SetVideo(v))) => {
                        let answer = match game.set_video(v.width, v.height, v.fps) {
                            Ok(()) => Message::SetVideo(v),
                            Err(e) => Message::Error(ErrorInfo {
                                code: VIDEO_REFUSED.into(),
                                message: e.to_string(),
                                retryable: false,
                            }),
                        };
                        let _ = send(tx, &answer).await;
                    }
                    Ok(Some(Message::Close(_))) | Ok(None) => {
                        game.stop();
                        let _ = tx.finish();
                        return LegEnd::Over;
                    }
                    Err(_) if path_lost(&ctx.conn) => return LegEnd::PathLost,
                    Err(_) => {
                        game.stop();
                        return LegEnd::Over;
                    }
                    Ok(Some(_)) => {}
                },
                _ = cancel.cancelled() => {
                    game.stop();
                    let _ = send(tx, &Message::Ended(Ended { reason: "the node's drain deadline passed".into() })).await;
                    let _ = tx.finish();
                    return LegEnd::Over;
                }
            }
            // Apply what the controller decided: a new encoder target, an IDR after a reset.
            let (bitrate, keyframe) = {
                let mut r = lock(&rate);
                (r.poll_bitrate(), r.poll_keyframe())
            };
            if let Some(kbps) = bitrate {
                game.set_bitrate(kbps);
            }
            if keyframe {
                game.force_keyframe();
            }
        }
    }

    async fn serve_inference(
        &self,
        session_id: u64,
        open: InferenceOpen,
        mut tx: quinn::SendStream,
        mut framed: FramedRecv,
    ) {
        let InferenceOpen {
            model,
            endpoint,
            request_json,
            request_id,
            traceparent,
        } = open;
        let started = Instant::now();
        let mut request = match InferenceRequest::parse(endpoint, request_json.as_bytes()) {
            Ok(r) => r,
            Err(e) => {
                refuse(&mut tx, RefuseCode::BadRequest, e.to_string()).await;
                return;
            }
        };
        // The gateway routed by `model`; trust its choice over the body's spelling.
        request.model = model;
        // Passed on to an upstream server, so its logs and traces join the gateway's.
        request.request_id = Some(request_id);
        request.traceparent = traceparent;
        let mut generation = match self.models.start(&request) {
            Ok(g) => g,
            Err(e) => {
                let code = match &e {
                    BackendError::Busy { .. } => RefuseCode::Busy,
                    BackendError::UnknownModel { .. } => RefuseCode::UnknownWorkload,
                    e if e.retryable() => RefuseCode::Internal,
                    _ => RefuseCode::BadRequest,
                };
                refuse(&mut tx, code, e.to_string()).await;
                return;
            }
        };
        self.active.fetch_add(1, Ordering::AcqRel);
        let _guard = ActiveGuard(self);
        if send(&mut tx, &Message::Accepted(Accepted { session_id }))
            .await
            .is_err()
        {
            return;
        }
        let cancel = self.cancel_token();
        let mut index = 0u32;
        loop {
            tokio::select! {
                ev = generation.next() => match ev {
                    Some(Ok(BackendEvent::Token { text })) => {
                        let msg = Message::Token(Token {
                            index,
                            text,
                            node_elapsed_us: started.elapsed().as_micros() as u64,
                        });
                        index += 1;
                        if send(&mut tx, &msg).await.is_err() {
                            debug!("gateway stopped reading; abandoning the generation");
                            return;
                        }
                    }
                    Some(Ok(BackendEvent::Chunk { json })) => {
                        let msg = Message::Chunk(Chunk {
                            index,
                            json,
                            node_elapsed_us: started.elapsed().as_micros() as u64,
                        });
                        index += 1;
                        if send(&mut tx, &msg).await.is_err() {
                            debug!("gateway stopped reading; abandoning the generation");
                            return;
                        }
                    }
                    Some(Ok(BackendEvent::Done { finish_reason, prompt_tokens, completion_tokens })) => {
                        let _ = send(&mut tx, &Message::Done(Done { finish_reason, prompt_tokens, completion_tokens })).await;
                        let _ = tx.finish();
                        self.served.fetch_add(1, Ordering::AcqRel);
                        // Wait (bounded) for the gateway to read everything before dropping the
                        // stream, so the last frames are not lost to a connection close.
                        let _ = tokio::time::timeout(Duration::from_secs(5), tx.stopped()).await;
                        return;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "generation failed");
                        let _ = send(&mut tx, &Message::Error(ErrorInfo {
                            code: e.code().to_string(),
                            message: e.to_string(),
                            retryable: e.retryable(),
                        })).await;
                        let _ = tx.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(5), tx.stopped()).await;
                        return;
                    }
                    None => {
                        let _ = send(&mut tx, &Message::Error(ErrorInfo {
                            code: "internal".into(),
                            message: "the backend ended without finishing".into(),
                            retryable: true,
                        })).await;
                        let _ = tx.finish();
                        return;
                    }
                },
                msg = framed.next() => match msg {
                    // The gateway reset the stream or sent Close: its client went away.
                    Ok(Some(Message::Close(_))) | Ok(None) | Err(_) => {
                        debug!("session cancelled by the gateway");
                        let _ = tx.reset(nearpath_protocol::app_code::STREAM_CANCELLED);
                        return;
                    }
                    Ok(Some(_)) => {}
                },
                _ = cancel.cancelled() => {
                    let _ = send(&mut tx, &Message::Error(ErrorInfo {
                        code: "node_draining".into(),
                        message: "the node's drain deadline passed".into(),
                        retryable: false,
                    })).await;
                    let _ = tx.finish();
                    return;
                }
            }
        }
    }
}

/// How long an `Open` for a game waits for a slot the gateway has already freed. The gateway
/// counts a session's slot free when it lets the session go; this node frees its own only when
/// the stream's end reaches it, a moment later. An `Open` arriving in between would otherwise be
/// refused as busy though the slot is about to be free.
const GAME_SLOT_RELEASE_GRACE: Duration = Duration::from_millis(500);

impl Sessions {
    /// Whether a game slot is free now or frees within [`GAME_SLOT_RELEASE_GRACE`].
    async fn wait_for_game_slot(&self) -> bool {
        wait_for_slot(
            &self.game_freed,
            || self.games_map().len() as u32,
            self.game_slots,
            GAME_SLOT_RELEASE_GRACE,
        )
        .await
    }
}

/// Whether `in_use()` is below `slots` now or becomes so within `grace`, re-checked each
/// time `freed` is notified.
async fn wait_for_slot(
    freed: &Notify,
    in_use: impl Fn() -> u32,
    slots: u32,
    grace: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        // Created before the check, so a release between the two is not missed.
        let notified = freed.notified();
        if in_use() < slots {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return false;
        }
    }
}

/// Removes a game session from the input routing table however its task ends.
struct RemoveGame<'a>(&'a Sessions, u64);

impl Drop for RemoveGame<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0.games_map().remove(&self.1) {
            g.stop();
        }
        self.0.game_freed.notify_waiters();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn refuse(tx: &mut quinn::SendStream, code: RefuseCode, reason: String) {
    debug!(code = code.as_str(), %reason, "refusing session");
    let _ = send(tx, &Message::Refused(Refused { code, reason })).await;
    let _ = tx.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.stopped()).await;
}

fn lock(rate: &Mutex<RateController>) -> std::sync::MutexGuard<'_, RateController> {
    rate.lock().unwrap_or_else(|p| p.into_inner())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Asks the session's rate controller, before each frame slot, whether the path to the gateway
/// can take another frame (with quinn's congestion window fresh from the connection).
struct RateGate {
    rate: Arc<Mutex<RateController>>,
    conn: quinn::Connection,
}

impl FrameGate for RateGate {
    fn admit(&self, index: u64) -> bool {
        let path = self.conn.stats().path;
        let now = Instant::now();
        let mut r = lock(&self.rate);
        r.handle_path(now, path.cwnd, path.rtt);
        r.poll_slot(now, index) == SlotDecision::Encode
    }
}

/// The thin async driver of a session's [`RateController`]: each frame goes on its own
/// unidirectional stream (a lost packet never stalls later frames) in its own task, which reports
/// when the gateway acknowledged all of it (`stopped()` resolves `Ok(None)` after `finish()`
/// once every byte is acknowledged), stopped it, or the connection failed; frames the controller
/// finds too late are reset through their cancellation token.
struct FrameSender {
    conn: quinn::Connection,
    session_id: u64,
    rate: Arc<Mutex<RateController>>,
    /// Frames in flight, by seq: cancelling the token resets the stream.
    in_flight: HashMap<u64, CancellationToken>,
    done_tx: tokio::sync::mpsc::UnboundedSender<(u64, FrameOutcome)>,
    done: tokio::sync::mpsc::UnboundedReceiver<(u64, FrameOutcome)>,
}

impl FrameSender {
    fn new(conn: quinn::Connection, session_id: u64, rate: Arc<Mutex<RateController>>) -> Self {
        let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
        FrameSender {
            conn,
            session_id,
            rate,
            in_flight: HashMap::new(),
            done_tx,
            done,
        }
    }

    fn send(&mut self, frame: EncodedFrame) {
        let header = frame.header(self.session_id);
        let seq = frame.seq;
        let bytes = frame.data.len() as u64 + nearpath_protocol::frame::FrameHeader::LEN as u64;
        lock(&self.rate).handle_sent(Instant::now(), seq, bytes, frame.keyframe);
        let cancel = CancellationToken::new();
        self.in_flight.insert(seq, cancel.clone());
        let conn = self.conn.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let outcome = send_frame_tracked(&conn, header, frame.data, cancel).await;
            let _ = done.send((seq, outcome));
        });
    }

    fn outcome(&mut self, seq: u64, outcome: FrameOutcome) {
        self.in_flight.remove(&seq);
        if outcome == FrameOutcome::Failed {
            debug!(seq, "frame not sent");
        }
        lock(&self.rate).handle_outcome(Instant::now(), seq, outcome);
    }

    fn next_timeout(&self) -> Option<Instant> {
        lock(&self.rate).next_timeout()
    }

    /// Resets the frames the controller finds too late; returns how many.
    fn reset_late(&mut self) -> u64 {
        let now = Instant::now();
        let mut n = 0;
        while let Some(seq) = lock(&self.rate).poll_reset(now) {
            if let Some(token) = self.in_flight.get(&seq) {
                token.cancel();
                n += 1;
            }
        }
        if n > 0 {
            debug!(frames = n, "late frames reset");
        }
        n
    }
}

/// Sends one frame on a new unidirectional stream at video priority and waits until the gateway
/// has acknowledged all of it, stopped it, or `cancel` fires (then the stream is reset with
/// `FRAME_DROPPED`, which drops its unsent bytes from quinn's buffer).
async fn send_frame_tracked(
    conn: &quinn::Connection,
    header: nearpath_protocol::frame::FrameHeader,
    payload: bytes::Bytes,
    cancel: CancellationToken,
) -> FrameOutcome {
    let mut header = header;
    if payload.len() > nearpath_protocol::MAX_VIDEO_FRAME {
        return FrameOutcome::Failed;
    }
    header.payload_len = payload.len() as u32;
    let mut stream = tokio::select! {
        s = conn.open_uni() => match s {
            Ok(s) => s,
            Err(_) => return FrameOutcome::Failed,
        },
        _ = cancel.cancelled() => return FrameOutcome::Reset,
    };
    let _ = stream.set_priority(priority::VIDEO_FRAME);
    let stopped = stream.stopped();
    let sent = tokio::select! {
        r = async {
            let mut chunks = [bytes::Bytes::copy_from_slice(&header.encode()), payload];
            match stream.write_all_chunks(&mut chunks).await {
                Ok(()) => {}
                Err(quinn::WriteError::Stopped(_)) => return FrameOutcome::Refused,
                Err(_) => return FrameOutcome::Failed,
            }
            if stream.finish().is_err() {
                return FrameOutcome::Failed;
            }
            match stopped.await {
                Ok(None) => FrameOutcome::Acked,
                Ok(Some(_)) => FrameOutcome::Refused,
                Err(_) => FrameOutcome::Failed,
            }
        } => Some(r),
        _ = cancel.cancelled() => None,
    };
    match sent {
        None => {
            let _ = stream.reset(nearpath_protocol::app_code::FRAME_DROPPED);
            FrameOutcome::Reset
        }
        Some(outcome) => outcome,
    }
}
/// What an inference `Open` asked for (`SessionKind::Inference`).
struct InferenceOpen {
    model: String,
    endpoint: Endpoint,
    request_json: String,
    request_id: String,
    traceparent: Option<String>,
}

#[cfg(test)]
mod slot_wait_tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Regression: an `Open` that arrived while the node was still letting the previous
    /// session go was refused as busy (`all 1 game slots are in use`), though the gateway had
    /// already freed the slot. It now gets the slot when the release lands.
    #[tokio::test]
    async fn an_open_waits_for_a_release_in_flight_and_gets_the_slot() {
        let freed = Arc::new(Notify::new());
        let in_use = Arc::new(AtomicU32::new(1));
        let waiter = {
            let (freed, in_use) = (freed.clone(), in_use.clone());
            tokio::spawn(async move {
                wait_for_slot(
                    &freed,
                    || in_use.load(Ordering::SeqCst),
                    1,
                    Duration::from_secs(30),
                )
                .await
            })
        };
        tokio::task::yield_now().await;
        in_use.store(0, Ordering::SeqCst);
        freed.notify_waiters();
        assert!(waiter.await.unwrap(), "the released slot is taken");
    }

    /// A node whose slots stay full refuses once the grace has passed (virtual clock), and a
    /// wake-up that frees nothing does not admit the session.
    #[tokio::test(start_paused = true)]
    async fn a_full_node_refuses_after_the_grace() {
        let freed = Notify::new();
        let started = tokio::time::Instant::now();
        let wait = wait_for_slot(&freed, || 1, 1, GAME_SLOT_RELEASE_GRACE);
        tokio::pin!(wait);
        tokio::select! {
            biased;
            _ = &mut wait => panic!("answered before any wake-up"),
            _ = tokio::task::yield_now() => {}
        }
        freed.notify_waiters();
        assert!(!wait.await, "still full: refused");
        assert_eq!(started.elapsed(), GAME_SLOT_RELEASE_GRACE);
    }
}
