//! The one fake edge node of the end-to-end tests and the benchmarks.
//!
//! It speaks `nearpath-node/1` by hand, so that a test can make it misbehave where a real
//! `EdgeNode` never would, and a benchmark can run a thousand of them without encoders: it
//! registers with a [`Register`] built by [`Registration`], answers heartbeats (by hand with
//! [`FakeNode::heartbeat`] or on a timer with [`heartbeat_loop`]), and serves the sessions the
//! gateway opens ([`serve_sessions`], [`FakeNode::accept_session`]) with the knobs the callers
//! need: refuse, die, stall, answer inference with usage that lies, send game frames.
//!
//! Constructors named after the tests' vocabulary (`connect`, `connect_games`, ...) panic on
//! failure, as test helpers do; the `try_*` functions return errors for the benchmarks.

use bytes::Bytes;
use nearpath_protocol::message::{
    Accepted, Capacity, Done, Gpu, Heartbeat, Message, NodeEncoder, Open, RefuseCode, Refused,
    Register, SessionKind, Token, VideoCodec, Workloads,
};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::tls::{client_config, ServerVerify};
use nearpath_protocol::{
    FrameHeader, ModelCaps, StreamError, ALPN_NODE, MAX_CONTROL_FRAME, MAX_REQUEST_FRAME,
    PROTOCOL_VERSION,
};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The software version every fake node reports.
pub const SOFTWARE_VERSION: &str = "0.1.0";

/// The receive buffer of an endpoint a fake node dials from by itself (one node per endpoint).
const OWN_ENDPOINT_RECV_BUFFER: usize = 1 << 20;

/// What a fake node needs to know of the gateway it dials.
pub trait GatewayTarget {
    /// The gateway's QUIC listener.
    fn quic_addr(&self) -> SocketAddr;
    /// The SHA-256 of the gateway's certificate, which the node pins.
    fn cert_sha256(&self) -> [u8; 32];
    /// An enrolment token the gateway accepts.
    fn enrolment_token(&self) -> String;
}

/// Why a fake node could not register.
#[derive(Debug, thiserror::Error)]
pub enum FakeNodeError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("binding the node endpoint: {0}")]
    Bind(#[from] nearpath_protocol::net::NetError),
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("handshake: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("no answer to Register within {0:?}")]
    Timeout(Duration),
    #[error("the gateway ended the control stream without answering Register")]
    NoAnswer,
    #[error("rejected ({code}): {reason}")]
    Rejected { code: String, reason: String },
    #[error("expected Registered, got {0}")]
    Unexpected(String),
}

/// The `Register` a fake node sends. [`Registration::new`] serves nothing and has no GPU; the
/// builder methods add what a test or benchmark needs.
#[derive(Debug, Clone)]
pub struct Registration {
    pub node_id: String,
    pub enrolment_token: String,
    pub gpus: Vec<Gpu>,
    pub games: Vec<String>,
    pub models: Vec<String>,
    /// What every model declares beyond plain text: everything by default, since a scripted
    /// node answers whatever its test scripts.
    pub model_caps: ModelCaps,
    pub game_sessions: u32,
    pub inference_concurrency: u32,
    /// The encoders it registers (none by default: a node that lists none is taken to encode
    /// H.264).
    pub encoders: Vec<NodeEncoder>,
}

impl Registration {
    pub fn new(node_id: &str, enrolment_token: &str) -> Registration {
        Registration {
            node_id: node_id.into(),
            enrolment_token: enrolment_token.into(),
            gpus: vec![],
            games: vec![],
            models: vec![],
            model_caps: ModelCaps::NAMED
                .iter()
                .fold(ModelCaps::NONE, |all, (c, _)| all.with(*c)),
            game_sessions: 0,
            inference_concurrency: 0,
            encoders: vec![],
        }
    }

    /// Registers encoders: `(codec, implementation)` pairs.
    pub fn encoders(mut self, encoders: &[(VideoCodec, &str)]) -> Registration {
        self.encoders = encoders
            .iter()
            .map(|(codec, implementation)| NodeEncoder {
                codec: *codec,
                implementation: implementation.to_string(),
            })
            .collect();
        self
    }

    /// Declares `caps` for every model.
    pub fn caps(mut self, caps: ModelCaps) -> Registration {
        self.model_caps = caps;
        self
    }

    /// Adds one GPU (`class` is the node's class hint).
    pub fn gpu(mut self, model: &str, class: &str, vram_mib: u64) -> Registration {
        self.gpus.push(Gpu {
            model: model.into(),
            class: class.into(),
            vram_mib,
        });
        self
    }

    /// Serves these game titles, up to `sessions` at once.
    pub fn games(mut self, games: &[&str], sessions: u32) -> Registration {
        self.games = games.iter().map(|g| g.to_string()).collect();
        self.game_sessions = sessions;
        self
    }

    /// Serves these models, up to `concurrency` streams at once.
    pub fn models(mut self, models: &[&str], concurrency: u32) -> Registration {
        self.models = models.iter().map(|m| m.to_string()).collect();
        self.inference_concurrency = concurrency;
        self
    }

    /// The message itself.
    pub fn message(&self) -> Register {
        Register {
            protocol_version: PROTOCOL_VERSION,
            node_id: self.node_id.clone(),
            enrolment_token: self.enrolment_token.clone(),
            software_version: SOFTWARE_VERSION.into(),
            gpus: self.gpus.clone(),
            workloads: Workloads {
                games: self.games.clone(),
                models: self.models.clone(),
                model_caps: vec![self.model_caps; self.models.len()],
            },
            capacity: Capacity {
                game_sessions: self.game_sessions,
                inference_concurrency: self.inference_concurrency,
            },
            encoders: self.encoders.clone(),
        }
    }
}

/// A node connection with its control stream, after the gateway answered `Register`.
pub struct FakeNode {
    /// The endpoint the node dialed from (tests rebind it to move the node's address).
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    /// The control stream.
    pub send: quinn::SendStream,
    pub recv: FramedRecv,
    /// The gateway's answer to `Register` (`Registered` or `Rejected`).
    pub first: Message,
    seq: u64,
}

/// A QUIC client endpoint bound to `from` that speaks ALPN `nearpath-node/1`, with a receive
/// buffer of `recv_buffer` bytes; `verify` is how it checks the gateway.
pub fn node_endpoint(
    from: SocketAddr,
    verify: ServerVerify,
    recv_buffer: usize,
) -> Result<quinn::Endpoint, FakeNodeError> {
    let cfg = client_config(verify, &[ALPN_NODE]).map_err(|e| FakeNodeError::Tls(e.to_string()))?;
    let (endpoint, _) = nearpath_protocol::net::client_endpoint(from, cfg, recv_buffer)
        .map_err(FakeNodeError::Bind)?;
    Ok(endpoint)
}

impl FakeNode {
    /// Dials `gateway` from `endpoint` (pinning `sha256`), sends `reg` on a new control stream
    /// and waits up to `within` for the answer, which lands in `first` whatever it is.
    pub async fn try_register(
        endpoint: &quinn::Endpoint,
        gateway: SocketAddr,
        sha256: [u8; 32],
        reg: Register,
        within: Duration,
    ) -> Result<FakeNode, FakeNodeError> {
        let cfg = client_config(ServerVerify::PinnedSha256(sha256), &[ALPN_NODE])
            .map_err(|e| FakeNodeError::Tls(e.to_string()))?;
        let conn = endpoint.connect_with(cfg, gateway, "localhost")?.await?;
        Self::try_register_on(endpoint.clone(), conn, reg, within).await
    }

    /// Like [`FakeNode::try_register`], on a connection already made.
    pub async fn try_register_on(
        endpoint: quinn::Endpoint,
        conn: quinn::Connection,
        reg: Register,
        within: Duration,
    ) -> Result<FakeNode, FakeNodeError> {
        let (mut send_half, recv) = conn.open_bi().await?;
        send(&mut send_half, &Message::Register(reg)).await?;
        let mut recv = FramedRecv::new(recv, MAX_CONTROL_FRAME);
        let first = match tokio::time::timeout(within, recv.next()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return Err(FakeNodeError::NoAnswer),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(FakeNodeError::Timeout(within)),
        };
        Ok(FakeNode {
            endpoint,
            conn,
            send: send_half,
            recv,
            first,
            seq: 0,
        })
    }

    /// Dials `gw` from its own endpoint bound to `from` and sends `reg`; panics on failure (a
    /// rejection is not a failure: it is in `first`).
    pub async fn register(gw: &impl GatewayTarget, from: IpAddr, reg: Register) -> FakeNode {
        let endpoint = node_endpoint(
            SocketAddr::new(from, 0),
            ServerVerify::PinnedSha256(gw.cert_sha256()),
            OWN_ENDPOINT_RECV_BUFFER,
        )
        .unwrap();
        let conn = endpoint
            .connect(gw.quic_addr(), "localhost")
            .unwrap()
            .await
            .unwrap();
        Self::try_register_on(endpoint, conn, reg, Duration::from_secs(3600))
            .await
            .unwrap()
    }

    /// A node with one GPU of `class` serving the model `m`.
    pub async fn connect(gw: &impl GatewayTarget, id: &str, from: IpAddr, class: &str) -> FakeNode {
        Self::connect_serving(gw, id, from, class, &["m"]).await
    }

    /// A node with one GPU of `class` serving `models` (room for 1 game and 4 streams).
    pub async fn connect_serving(
        gw: &impl GatewayTarget,
        id: &str,
        from: IpAddr,
        class: &str,
        models: &[&str],
    ) -> FakeNode {
        let reg = Registration::new(id, &gw.enrolment_token())
            .gpu(class, class, 1)
            .games(&[], 1)
            .models(models, 4);
        Self::register(gw, from, reg.message()).await
    }

    /// A node with one GPU of `class` registered for `games` with room for `game_sessions`
    /// (and the model `m`), so that tests can hold game sessions without encoding video.
    pub async fn connect_games(
        gw: &impl GatewayTarget,
        id: &str,
        from: IpAddr,
        class: &str,
        games: &[&str],
        game_sessions: u32,
    ) -> FakeNode {
        let reg = Registration::new(id, &gw.enrolment_token())
            .gpu(class, class, 1)
            .games(games, game_sessions)
            .models(&["m"], 4);
        Self::register(gw, from, reg.message()).await
    }

    /// A node registering with `token` (not necessarily the gateway's first one), serving
    /// `games` and `models`, with room for 4 game sessions and 4 inference streams.
    pub async fn connect_with(
        gw: &impl GatewayTarget,
        id: &str,
        from: IpAddr,
        token: &str,
        games: &[&str],
        models: &[&str],
    ) -> FakeNode {
        let reg = Registration::new(id, token)
            .games(games, 4)
            .models(models, 4);
        Self::register(gw, from, reg.message()).await
    }

    /// Like [`FakeNode::connect`], with a chosen enrolment token and GPUs given as (model name,
    /// class hint) pairs; no GPUs makes a CPU-only node.
    pub async fn connect_gpus(
        gw: &impl GatewayTarget,
        id: &str,
        from: IpAddr,
        token: &str,
        gpus: &[(&str, &str)],
    ) -> FakeNode {
        let reg = gpus
            .iter()
            .fold(Registration::new(id, token), |r, (model, class)| {
                r.gpu(model, class, 80_000)
            })
            .games(&[], 1)
            .models(&["m"], 4);
        Self::register(gw, from, reg.message()).await
    }

    /// The heartbeat interval the gateway asked for, or the rejection as an error.
    pub fn registered(&self) -> Result<u64, FakeNodeError> {
        match &self.first {
            Message::Registered(r) => Ok(r.heartbeat_ms),
            Message::Rejected(r) => Err(FakeNodeError::Rejected {
                code: format!("{:?}", r.code),
                reason: r.reason.clone(),
            }),
            other => Err(FakeNodeError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends one heartbeat and waits for its ack, which proves the gateway processed it.
    pub async fn heartbeat(&mut self, active_sessions: u32) {
        self.seq += 1;
        let hb = Heartbeat {
            seq: self.seq,
            active_sessions,
            queue_depth: 0,
            load: 0.1,
            gpu_util: None,
            encoder_ms_p50: None,
        };
        send(&mut self.send, &Message::Heartbeat(hb)).await.unwrap();
        loop {
            match self.recv.next().await.unwrap().unwrap() {
                Message::HeartbeatAck(a) if a.seq == self.seq => return,
                _ => continue,
            }
        }
    }

    /// Keeps the node alive (heartbeats every 50 ms, each acked within 2 s) until the returned
    /// task is aborted or an ack is late; the node's connection stays usable through a clone of
    /// `conn`.
    pub fn keep_alive(mut self) -> tokio::task::JoinHandle<FakeNode> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                if tokio::time::timeout(Duration::from_secs(2), self.heartbeat(0))
                    .await
                    .is_err()
                {
                    return self;
                }
            }
        })
    }

    /// Splits the node into its connection and control stream, to hand them to background
    /// tasks ([`heartbeat_loop`], [`serve_sessions`]).
    pub fn into_parts(self) -> (quinn::Connection, quinn::SendStream, FramedRecv) {
        (self.conn, self.send, self.recv)
    }

    /// Accepts the gateway's next session stream, which must open a game, and accepts it.
    pub async fn accept_game(&self) -> GameSession {
        let (tx, rx, open) = self.accept_session().await;
        GameSession {
            session_id: open.session_id,
            send: tx,
            recv: rx,
        }
    }

    /// Accepts the next session the gateway opens on this node (within 10 s) and answers
    /// `Accepted`; returns the session's stream halves and its `Open`.
    pub async fn accept_session(&self) -> (quinn::SendStream, FramedRecv, Open) {
        let (mut tx, rx) = tokio::time::timeout(Duration::from_secs(10), self.conn.accept_bi())
            .await
            .expect("no session opened on the fake node")
            .unwrap();
        let mut rx = FramedRecv::new(rx, MAX_REQUEST_FRAME);
        let open = match rx.next().await.unwrap().unwrap() {
            Message::Open(o) => o,
            other => panic!("expected Open, got {}", other.name()),
        };
        let accepted = Message::Accepted(Accepted {
            session_id: open.session_id,
        });
        send(&mut tx, &accepted).await.unwrap();
        (tx, rx, open)
    }

    /// Sends one 1280x720 video frame for `session_id`, captured now, on its own uni stream.
    /// Errors (the gateway refused the stream) are returned, not unwrapped.
    pub async fn send_video_frame(
        &self,
        session_id: u64,
        seq: u64,
        payload: &[u8],
    ) -> Result<(), StreamError> {
        send_game_frame(
            &self.conn,
            session_id,
            seq,
            seq == 0,
            Bytes::copy_from_slice(payload),
        )
        .await
    }
}

impl FakeNode {
    /// Sends one audio datagram for `session_id` (a 10 ms packet captured now, its Opus
    /// payload `opus`); returns the bytes sent. Errors (the connection cannot send datagrams
    /// now) are returned, not unwrapped.
    pub fn send_audio(
        &self,
        session_id: u64,
        seq: u32,
        opus: &[u8],
    ) -> Result<usize, quinn::SendDatagramError> {
        let packet = nearpath_protocol::AudioPacket {
            session_id,
            seq,
            capture_ts_us: nearpath_protocol::unix_micros(),
            samples: 480,
            flags: 0,
            opus: Bytes::copy_from_slice(opus),
        };
        let bytes = packet.encode().expect("a valid test packet");
        let n = bytes.len();
        self.conn.send_datagram(Bytes::from(bytes)).map(|()| n)
    }

    /// Sends raw bytes as one datagram (for malformed-input tests).
    pub fn send_raw_datagram(&self, bytes: &[u8]) -> Result<(), quinn::SendDatagramError> {
        self.conn.send_datagram(Bytes::copy_from_slice(bytes))
    }
}

/// Sends one 1280x720 game frame on its own uni stream, with `capture_ts_us` set to now.
pub async fn send_game_frame(
    conn: &quinn::Connection,
    session_id: u64,
    seq: u64,
    keyframe: bool,
    payload: Bytes,
) -> Result<(), StreamError> {
    send_game_frame_captured_at(conn, session_id, seq, keyframe, payload, unix_micros_now()).await
}

/// [`send_game_frame`] with the capture time given: a frame that seems to have waited on its
/// way in (an older time), or one from a node whose clock is off.
pub async fn send_game_frame_captured_at(
    conn: &quinn::Connection,
    session_id: u64,
    seq: u64,
    keyframe: bool,
    payload: Bytes,
    capture_ts_us: u64,
) -> Result<(), StreamError> {
    let header = FrameHeader {
        session_id,
        seq,
        capture_ts_us,
        encode_us: 0,
        keyframe,
        input_seq: 0,
        width: 1280,
        height: 720,
        payload_len: 0,
    };
    nearpath_protocol::stream::send_frame(conn, header, payload).await
}

/// Microseconds since the Unix epoch (the clock of frame capture times).
pub fn unix_micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A game session the gateway opened on a fake node; keep it alive for as long as the session
/// should run (dropping it ends the session stream, which the gateway takes for a node failure).
pub struct GameSession {
    pub session_id: u64,
    pub send: quinn::SendStream,
    pub recv: FramedRecv,
}

/// Counts of a [`heartbeat_loop`], shared by many nodes when a benchmark wants totals.
#[derive(Debug, Default)]
pub struct HeartbeatCount {
    pub sent: AtomicU64,
    pub acks: AtomicU64,
}

/// Heartbeats every `every` until `stop` (or until sending fails) and reads the acks apart from
/// that schedule, so a late ack never delays the next heartbeat (as on a real node, whose
/// heartbeats run on a timer; a starved benchmark would otherwise lose its nodes). A missed tick
/// is sent late rather than in a burst. Returns how many heartbeats were sent.
pub async fn heartbeat_loop(
    mut tx: quinn::SendStream,
    mut rx: FramedRecv,
    every: Duration,
    stop: CancellationToken,
    count: Arc<HeartbeatCount>,
) -> Result<u64, StreamError> {
    let reader = {
        let count = count.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = rx.next().await {
                if matches!(m, Message::HeartbeatAck(_)) {
                    count.acks.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let sent = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(seq),
            _ = tick.tick() => {}
        }
        seq += 1;
        let hb = Heartbeat {
            seq,
            active_sessions: 0,
            queue_depth: 0,
            load: 0.0,
            gpu_util: None,
            encoder_ms_p50: None,
        };
        if let Err(e) = send(&mut tx, &Message::Heartbeat(hb)).await {
            break Err(e);
        }
        count.sent.fetch_add(1, Ordering::Relaxed);
    };
    reader.abort();
    sent
}

/// What a fake node does with a session the gateway opens.
#[derive(Debug, Clone)]
pub enum OnOpen {
    /// Answer `Accepted` and hand the session to the caller (games), or answer it (inference:
    /// see [`Answer`]).
    Accept,
    /// Answer `Refused` with this code.
    Refuse(RefuseCode),
    /// Read the `Open` and never answer, holding the stream open.
    Stall,
    /// Close the whole connection, as a crashing node would.
    Die,
}

/// How a fake node answers an inference session it accepted: `tokens` tokens, then a `Done`
/// whose usage may lie (`usage` is reported whatever was generated).
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub tokens: u32,
    /// (prompt tokens, completion tokens) as reported in `Done`.
    pub usage: (u32, u32),
}

/// The policy of [`serve_sessions`].
#[derive(Debug, Clone)]
pub struct Serving {
    /// For game sessions.
    pub games: OnOpen,
    /// For inference sessions.
    pub inference: OnOpen,
    /// The answer to an accepted inference session.
    pub answer: Answer,
}

impl Serving {
    /// Accepts games and refuses inference (`UnknownWorkload`): a game-only node.
    pub fn games_only() -> Serving {
        Serving {
            games: OnOpen::Accept,
            inference: OnOpen::Refuse(RefuseCode::UnknownWorkload),
            answer: Answer {
                tokens: 0,
                usage: (0, 0),
            },
        }
    }

    /// Accepts inference with `answer` and refuses games (`UnknownWorkload`).
    pub fn inference_only(answer: Answer) -> Serving {
        Serving {
            games: OnOpen::Refuse(RefuseCode::UnknownWorkload),
            inference: OnOpen::Accept,
            answer,
        }
    }
}

/// A game session a fake node accepted. The node keeps the session stream open (finishing it
/// would tell the gateway the node failed).
pub struct OpenedGame {
    pub session_id: u64,
    pub conn: quinn::Connection,
    pub ctl: (quinn::SendStream, FramedRecv),
}

/// Serves every session the gateway opens on `conn` by `serving` until `stop`; accepted game
/// sessions go to `opened`.
pub async fn serve_sessions(
    conn: quinn::Connection,
    serving: Serving,
    opened: mpsc::UnboundedSender<OpenedGame>,
    stop: CancellationToken,
) {
    loop {
        let (tx, rx) = tokio::select! {
            _ = stop.cancelled() => return,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let opened = opened.clone();
        let conn = conn.clone();
        let serving = serving.clone();
        tokio::spawn(serve_one(conn, tx, rx, serving, opened));
    }
}

async fn serve_one(
    conn: quinn::Connection,
    mut tx: quinn::SendStream,
    rx: quinn::RecvStream,
    serving: Serving,
    opened: mpsc::UnboundedSender<OpenedGame>,
) {
    let mut rx = FramedRecv::new(rx, MAX_REQUEST_FRAME);
    let Ok(Some(Message::Open(open))) = rx.next().await else {
        return;
    };
    let game = matches!(open.kind, SessionKind::Game(_));
    let policy = if game {
        &serving.games
    } else {
        &serving.inference
    };
    match policy {
        OnOpen::Refuse(code) => {
            let refused = Refused {
                code: *code,
                reason: if game {
                    "this fake node does not stream games".into()
                } else {
                    "this fake node does not serve inference".into()
                },
            };
            let _ = send(&mut tx, &Message::Refused(refused)).await;
            let _ = tx.finish();
        }
        OnOpen::Stall => {
            // Hold both halves until the gateway gives up on the session.
            let _ = rx.next().await;
            drop(tx);
        }
        OnOpen::Die => conn.close(0u32.into(), b"fake node died"),
        OnOpen::Accept => {
            let session_id = open.session_id;
            if send(&mut tx, &Message::Accepted(Accepted { session_id }))
                .await
                .is_err()
            {
                return;
            }
            if game {
                let _ = opened.send(OpenedGame {
                    session_id,
                    conn,
                    ctl: (tx, rx),
                });
                return;
            }
            let a = serving.answer;
            for index in 0..a.tokens {
                let t = Token {
                    index,
                    text: format!(" t{index}"),
                    node_elapsed_us: 1,
                };
                let _ = send(&mut tx, &Message::Token(t)).await;
            }
            let done = Done {
                finish_reason: "stop".into(),
                prompt_tokens: a.usage.0,
                completion_tokens: a.usage.1,
            };
            let _ = send(&mut tx, &Message::Done(done)).await;
            let _ = tx.finish();
            // Hold the stream until the gateway has read everything.
            let _ = rx.next().await;
        }
    }
}

impl FakeNode {
    /// Sends `inv` on the control stream without the sender's frame-size check, so that a test
    /// can send what an honest node never would (oversized strings or lists, forged UUIDs,
    /// indexes past its GPUs, models it does not serve, a second inventory).
    pub async fn send_inventory(&mut self, inv: nearpath_protocol::message::Inventory) {
        let frame = nearpath_protocol::encode_to_vec(&Message::Inventory(inv));
        self.send.write_all(&frame).await.unwrap();
    }

    /// Sends one frame of type `ty` with `body` as is (an unknown type from a newer peer, or a
    /// body no encoder would write).
    pub async fn send_raw_frame(&mut self, ty: u8, body: &[u8]) {
        let mut frame = Vec::with_capacity(body.len() + 11);
        nearpath_protocol::codec::put_varint(&mut frame, body.len() as u64 + 1);
        frame.push(ty);
        frame.extend_from_slice(body);
        self.send.write_all(&frame).await.unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_serves_only_what_it_was_given() {
        let bare = Registration::new("n1", "tok").message();
        assert_eq!(
            (
                bare.protocol_version,
                bare.node_id.as_str(),
                bare.enrolment_token.as_str()
            ),
            (PROTOCOL_VERSION, "n1", "tok")
        );
        assert!(bare.gpus.is_empty() && bare.workloads.games.is_empty());
        assert!(bare.workloads.models.is_empty());
        assert_eq!(
            (
                bare.capacity.game_sessions,
                bare.capacity.inference_concurrency
            ),
            (0, 0)
        );

        let full = Registration::new("n2", "tok")
            .gpu("rtx4090", "rtx4090", 24_000)
            .games(&["arena"], 3)
            .models(&["m"], 4)
            .message();
        assert_eq!(full.gpus.len(), 1);
        assert_eq!(full.gpus[0].vram_mib, 24_000);
        assert_eq!(full.workloads.games, vec!["arena".to_string()]);
        assert_eq!(full.workloads.models, vec!["m".to_string()]);
        assert_eq!(
            (
                full.capacity.game_sessions,
                full.capacity.inference_concurrency
            ),
            (3, 4)
        );
    }
}
