//! Session streams the gateway opens on the node's connection: one bidirectional stream per
//! session, `Open` first, then tokens (inference) or control messages (game).

use crate::game::{GameSession, InputOutcome};
use crate::inference::{BackendError, BackendEvent, ModelRegistry};
use nearpath_config::{EncoderConfig, GameEntry, NodeConfig};
use nearpath_protocol::message::{
    Accepted, Done, ErrorInfo, Message, Open, RefuseCode, Refused, SessionKind, Token,
};
use nearpath_protocol::message::{Ended, GameParams};
use nearpath_protocol::openai::{Endpoint, InferenceRequest};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::InputDatagram;
use nearpath_protocol::MAX_REQUEST_FRAME;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

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
    game_slots: u32,
    /// Running game sessions by id, for routing input datagrams.
    running_games: Mutex<HashMap<u64, Arc<GameSession>>>,
    capacity: u32,
    active: AtomicU32,
    draining: AtomicBool,
    idle: Notify,
    /// Cancelled to end every running session (drain deadline passed).
    cancel_all: Mutex<CancellationToken>,
    /// Total inference sessions served, for tests and logs.
    served: AtomicU32,
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
        Ok(Sessions {
            models,
            games: config.games.clone(),
            encoder: config.encoder.clone(),
            game_slots: config.capacity.game_sessions,
            running_games: Mutex::new(HashMap::new()),
            capacity: config.capacity.inference_concurrency + config.capacity.game_sessions,
            active: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
            cancel_all: Mutex::new(CancellationToken::new()),
            served: AtomicU32::new(0),
        })
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
                request_json,
            } => {
                self.serve_inference(open.session_id, model, request_json, tx, framed)
                    .await
            }
            SessionKind::Game(params) => {
                self.serve_game(ctx, open.session_id, params, tx, framed)
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
        mut framed: FramedRecv,
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
        if self.games_map().len() as u32 >= self.game_slots {
            refuse(
                &mut tx,
                RefuseCode::Busy,
                format!("all {} game slots are in use", self.game_slots),
            )
            .await;
            return;
        }
        let (game, mut frames) =
            match GameSession::start(params.clone(), &entry.source, &self.encoder) {
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
        let game = Arc::new(game);
        self.games_map().insert(session_id, game.clone());
        self.active.fetch_add(1, Ordering::AcqRel);
        let _guard = ActiveGuard(self);
        let _remove = RemoveGame(self, session_id);
        if send(&mut tx, &Message::Accepted(Accepted { session_id }))
            .await
            .is_err()
        {
            game.stop();
            return;
        }
        debug!(
            w = params.width,
            h = params.height,
            fps = params.fps,
            "game session running"
        );
        let cancel = self.cancel_token();
        loop {
            tokio::select! {
                f = frames.recv() => match f {
                    Some(frame) => {
                        // Each frame on its own stream: a lost packet never stalls later frames.
                        let conn = ctx.conn.clone();
                        let header = frame.header(session_id);
                        tokio::spawn(async move {
                            if let Err(e) = nearpath_protocol::stream::send_frame(&conn, header, frame.data).await {
                                debug!(error = %e, "frame not sent");
                            }
                        });
                    }
                    None => {
                        let reason = game.ended().map(|e| e.to_string()).unwrap_or_else(|| "game ended".into());
                        let _ = send(&mut tx, &Message::Ended(Ended { reason })).await;
                        let _ = tx.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(2), tx.stopped()).await;
                        return;
                    }
                },
                m = framed.next() => match m {
                    Ok(Some(Message::ForceKeyframe)) => game.force_keyframe(),
                    Ok(Some(Message::SetBitrate(b))) => game.set_bitrate(b.kbps),
                    Ok(Some(Message::Close(_))) | Ok(None) | Err(_) => {
                        game.stop();
                        let _ = tx.finish();
                        return;
                    }
                    Ok(Some(_)) => {}
                },
                _ = cancel.cancelled() => {
                    game.stop();
                    let _ = send(&mut tx, &Message::Ended(Ended { reason: "the node's drain deadline passed".into() })).await;
                    let _ = tx.finish();
                    return;
                }
            }
        }
    }

    async fn serve_inference(
        &self,
        session_id: u64,
        model: String,
        request_json: String,
        mut tx: quinn::SendStream,
        mut framed: FramedRecv,
    ) {
        let started = Instant::now();
        // The body says which API it came from: chat requests carry `messages`.
        let endpoint = if request_json.contains("\"messages\"") {
            Endpoint::Chat
        } else {
            Endpoint::Completion
        };
        let mut request = match InferenceRequest::parse(endpoint, request_json.as_bytes()) {
            Ok(r) => r,
            Err(e) => {
                refuse(&mut tx, RefuseCode::BadRequest, e.to_string()).await;
                return;
            }
        };
        // The gateway routed by `model`; trust its choice over the body's spelling.
        request.model = model;
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
                        let _ = tx.reset(0u32.into());
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

/// Removes a game session from the input routing table however its task ends.
struct RemoveGame<'a>(&'a Sessions, u64);

impl Drop for RemoveGame<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0.games_map().remove(&self.1) {
            g.stop();
        }
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
