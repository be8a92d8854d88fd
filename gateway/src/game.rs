//! Game sessions for native players: route, relay frames node → client (one QUIC uni stream per
//! frame, forwarded without decoding), relay input datagrams client → node, fail over to another
//! node when the serving one dies, meter usage.

use crate::infer::{self, client_latlon};
use crate::metrics::labels;
use crate::player::{ConnSample, PlayerSilence};
use crate::registry::{NodeEntry, SlotGuard, SlotKind};
use crate::router::{NoRoute, Workload};
use crate::server::Shared;
use crate::session_id::SessionId;
use crate::store::{ApiKey, UsageKind, UsageRecord};
use bytes::Bytes;
use nearpath_config::WorkloadKind;
use nearpath_geo::Location;
use nearpath_protocol::message::{
    Ended, ErrorInfo, GameParams, Message, Open, Paused, PlayRequest, PlayStarted, SessionKind,
};
use nearpath_protocol::stream::{recv_frame_header, relay_frame_by, send, FramedRecv, Relayed};
use nearpath_protocol::{FrameHeader, InputDatagram, MAX_CONTROL_FRAME, MAX_VIDEO_FRAME};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

/// How long ending a session for a revoked key may wait on the node's stream.
const REVOKE_SEND_BOUND: Duration = Duration::from_millis(200);

/// Where a session's frames go.
#[derive(Clone)]
pub enum FrameSink {
    /// Native client: each frame is forwarded as-is on a new uni stream of this connection.
    Quic(quinn::Connection),
    /// Another transport (WebRTC): whole frames are handed over; a full channel drops the frame
    /// (a late frame is worth less than the next one).
    Channel(mpsc::Sender<(FrameHeader, Bytes)>),
}

/// What the client side of a session tells the driver.
#[derive(Debug)]
pub enum ClientEvent {
    ForceKeyframe,
    SetBitrate(u32),
    Close(String),
    /// The client left: it closed its connection (or its control stream failed). Outcome
    /// `client_left`.
    Gone,
    /// The client stopped answering: its connection timed out, or it has been silent for
    /// `game.player_idle_timeout_ms` (see `crate::player`). Outcome `client_gone`.
    Lost,
}

/// What the driver tells the client side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Paused(String),
    Resumed,
    Ended(String),
}

/// Why a session could not start: a status-like code and a reason for the player.
#[derive(Debug, Clone)]
pub struct StartError {
    /// `geofence`, `unknown_game`, `no_capacity`, `bad_request`, `unauthorized`,
    /// `concurrency_limit_exceeded`, `rate_limit_exceeded` (per-key caps, 429),
    /// `ledger_unavailable` (503).
    pub code: &'static str,
    pub message: String,
    /// Seconds to wait before retrying, where waiting helps.
    pub retry_after_s: Option<u64>,
}

impl StartError {
    /// Whether the same start may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(
            self.code,
            "no_capacity"
                | "concurrency_limit_exceeded"
                | "rate_limit_exceeded"
                | infer::LEDGER_UNAVAILABLE
        )
    }
}

/// Checks what a key may start before anything is routed: the ledger can bill the session, the
/// key is under its cap on live sessions and its session starts per minute. The guard holds
/// the key's session slot until the session ends.
fn admit_start(
    shared: &Shared,
    key: &ApiKey,
    transport: &'static str,
) -> Result<infer::CapGuard, StartError> {
    if let Err(e) = infer::ledger_gate(shared, transport) {
        return Err(StartError {
            code: infer::LEDGER_UNAVAILABLE,
            message: e.message,
            retry_after_s: Some(1),
        });
    }
    let caps = infer::effective_caps(shared, key);
    let refused = |r: infer::CapRefusal| {
        infer::count_cap_refusal(shared, transport, &r);
        StartError {
            code: r.code,
            message: r.message,
            retry_after_s: Some(r.retry_after_s),
        }
    };
    let guard = shared
        .auth
        .limiter
        .acquire(key, infer::CapKind::Session, caps.max_concurrent_sessions)
        .map_err(refused)?;
    shared
        .auth
        .limiter
        .admit_session_start(key, caps.session_starts_per_minute, Instant::now())
        .map_err(refused)?;
    Ok(guard)
}

/// A started session: feed `events`, read `notices` (and frames from the sink).
pub struct Started {
    pub session_id: u64,
    pub params: GameParams,
    pub events: mpsc::Sender<ClientEvent>,
    pub notices: mpsc::Receiver<Notice>,
    pub relay: Arc<Relay>,
}

/// One live game session as the relay sees it.
pub struct Relay {
    pub session_id: u64,
    /// Holds `session_id` among the live ids while anything still refers to the session.
    _session: SessionId,
    pub sink: FrameSink,
    /// The client's address, for the admin view.
    pub client_addr: String,
    pub transport: &'static str,
    /// The client's own stats (the browser page reports `getStats()` here).
    pub client_stats: Mutex<Option<serde_json::Value>>,
    /// The node serving the session now (changes on failover).
    node: Mutex<Option<Arc<NodeEntry>>>,
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    /// Frames dropped because they were older than `game.frame_budget_ms` on arrival.
    pub dropped_late: AtomicU64,
    /// Frames dropped because the session was over its in-flight budget, or abandoned because
    /// they were not delivered by their deadline.
    pub dropped_overload: AtomicU64,
    /// Frames for this session that came from a connection other than its serving node's.
    pub dropped_foreign: AtomicU64,
    /// Frames lost to a stream or connection error.
    pub dropped_relay: AtomicU64,
    pub inputs: AtomicU64,
    pub started: Instant,
    pub game: String,
    pub tenant: String,
    /// Frames and bytes on their way to the client now.
    in_flight: Mutex<InFlight>,
    /// The session driver's event queue, for keyframe requests after a drop. Weak, so that the
    /// relay (which outlives the front end in the session table) never keeps the queue open.
    events: mpsc::WeakSender<ClientEvent>,
    /// When the relay last asked for a keyframe (ms since `started`, plus one; 0 = never).
    last_keyframe_request: AtomicU64,
}

/// Why the relay dropped a frame: the `reason` label of `nearpath_game_frames_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Older than the frame budget when it arrived.
    Late,
    /// Over the session's in-flight budget, or not delivered by its deadline.
    Overload,
    /// Sent by a connection that does not serve the session.
    Foreign,
    /// A stream or connection failed while forwarding.
    Relay,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Late => "late",
            DropReason::Overload => "overload",
            DropReason::Foreign => "foreign",
            DropReason::Relay => "relay",
        }
    }
}

/// Keyframe requests the relay makes after dropping frames come at most this often; the
/// encoder needs a moment to produce one, and an IDR is several P frames' worth of bytes.
const KEYFRAME_REQUEST_INTERVAL_MS: u64 = 300;
/// Allowance for the client's delayed acknowledgement (QUIC's default `max_ack_delay`) when
/// waiting for a frame to be acknowledged.
const ACK_DELAY_ALLOWANCE: Duration = Duration::from_millis(25);

/// Frames and bytes one session has on their way to its client.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub frames: u32,
    pub bytes: u64,
}

/// What the relay does with a frame whose header it has just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it; it must be on its way within `remaining_us`. Its size is now counted in
    /// flight and must be released when it is delivered or given up.
    Forward { remaining_us: u64 },
    /// Drop it.
    Drop(DropReason),
}

/// The relay's rule for each frame, decided before a byte of it is forwarded. Pure: the clock is
/// an argument, so tests drive it with virtual time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameBudget {
    /// Oldest a frame may be, from its capture time, to be forwarded.
    pub budget_us: u64,
    pub max_in_flight_bytes: u64,
    pub max_in_flight_frames: u32,
}

impl FrameBudget {
    pub fn from_config(g: &nearpath_config::GameConfig) -> FrameBudget {
        FrameBudget {
            budget_us: g.frame_budget_ms.saturating_mul(1000),
            max_in_flight_bytes: g.max_in_flight_bytes,
            max_in_flight_frames: g.max_in_flight_frames,
        }
    }

    /// Bytes a frame counts for while in flight: what goes on the wire.
    pub fn frame_bytes(header: &FrameHeader) -> u64 {
        u64::from(header.payload_len) + FrameHeader::LEN as u64
    }

    /// Decides the fate of a frame captured at `capture_ts_us` when the relay reads its header
    /// at `now_us`, given what the session already has in flight (updated when it is forwarded).
    ///
    /// A frame is dropped, never queued: a late frame is worth less than the bandwidth it takes,
    /// and a session over its in-flight budget has a client path that is not keeping up, where a
    /// queued frame only makes every later one later. A frame is always admitted when nothing is
    /// in flight, so one frame larger than the byte budget (a big IDR) still gets through. A
    /// capture time in the future (a node's clock ahead of ours) counts as age 0: the deadline is
    /// then the full budget from now, never later.
    pub fn admit(
        &self,
        in_flight: &mut InFlight,
        now_us: u64,
        capture_ts_us: u64,
        bytes: u64,
    ) -> Verdict {
        let age = now_us.saturating_sub(capture_ts_us);
        if age > self.budget_us {
            return Verdict::Drop(DropReason::Late);
        }
        if in_flight.frames > 0
            && (in_flight.frames >= self.max_in_flight_frames
                || in_flight.bytes.saturating_add(bytes) > self.max_in_flight_bytes)
        {
            return Verdict::Drop(DropReason::Overload);
        }
        in_flight.frames += 1;
        in_flight.bytes = in_flight.bytes.saturating_add(bytes);
        Verdict::Forward {
            remaining_us: self.budget_us - age,
        }
    }

    /// Gives back what [`Self::admit`] counted for a frame that has been delivered or dropped.
    pub fn release(in_flight: &mut InFlight, bytes: u64) {
        in_flight.frames = in_flight.frames.saturating_sub(1);
        in_flight.bytes = in_flight.bytes.saturating_sub(bytes);
    }
}

/// A frame counted in its session's in-flight budget; dropping it gives the budget back, so a
/// frame task that ends any way at all (including being cancelled) releases its share.
struct FlightSlot {
    relay: Arc<Relay>,
    bytes: u64,
}

impl Drop for FlightSlot {
    fn drop(&mut self) {
        let mut f = self
            .relay
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        FrameBudget::release(&mut f, self.bytes);
    }
}

impl Relay {
    fn node(&self) -> Option<Arc<NodeEntry>> {
        self.node.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Sends an input event to the serving node as a datagram (the node ignores stale seqs).
    pub fn send_input(&self, seq: u64, sent_ts_us: u64, event: nearpath_protocol::InputEvent) {
        self.inputs.fetch_add(1, Ordering::Relaxed);
        if let Some(node) = self.node() {
            let d = InputDatagram {
                session_id: self.session_id,
                seq,
                sent_ts_us,
                event,
            };
            let _ = node.conn.send_datagram(Bytes::from(d.encode()));
        }
    }

    pub fn node_id(&self) -> Option<String> {
        self.node().map(|n| n.id.clone())
    }

    /// Whether `conn` is the connection of the node serving the session now. During failover
    /// no node serves it, so nothing is accepted until the new node is attached.
    pub fn is_served_by(&self, conn: &quinn::Connection) -> bool {
        self.node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|n| n.conn.stable_id() == conn.stable_id())
    }

    /// Frames and bytes on their way to the client now.
    pub fn in_flight(&self) -> InFlight {
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The drop counter for `reason`.
    pub fn dropped(&self, reason: DropReason) -> &AtomicU64 {
        match reason {
            DropReason::Late => &self.dropped_late,
            DropReason::Overload => &self.dropped_overload,
            DropReason::Foreign => &self.dropped_foreign,
            DropReason::Relay => &self.dropped_relay,
        }
    }

    /// Asks the node for a keyframe after frames were dropped (the client cannot decode the P
    /// frames that follow a gap), at most once per [`KEYFRAME_REQUEST_INTERVAL_MS`].
    pub fn request_keyframe(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_keyframe_request.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < KEYFRAME_REQUEST_INTERVAL_MS {
            return false;
        }
        if self
            .last_keyframe_request
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Another frame task asked just now.
            return false;
        }
        match self.events.upgrade() {
            Some(tx) => tx.try_send(ClientEvent::ForceKeyframe).is_ok(),
            None => false,
        }
    }
    fn set_node(&self, n: Option<Arc<NodeEntry>>) {
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = n;
    }
}

/// Live sessions by id.
#[derive(Default)]
pub struct GameRelays {
    map: Mutex<HashMap<u64, Arc<Relay>>>,
}

impl GameRelays {
    pub fn get(&self, id: u64) -> Option<Arc<Relay>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }
    fn insert(&self, r: Arc<Relay>) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.session_id, r);
    }
    fn remove(&self, id: u64) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    pub fn list(&self) -> Vec<Arc<Relay>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Warns about a node's foreign frames at most once a second, with how many went unlogged, so a
/// node spraying forged frames cannot flood the log.
#[derive(Default)]
struct ForeignLog {
    /// When the last warning was written (ms since `since`, plus one; 0 = never).
    last: AtomicU64,
    suppressed: AtomicU64,
    since: Option<Instant>,
}

impl ForeignLog {
    fn new() -> ForeignLog {
        ForeignLog {
            since: Some(Instant::now()),
            ..Default::default()
        }
    }

    fn note(&self, node: &str, session_id: u64) {
        let now = self.since.map_or(0, |t| t.elapsed().as_millis() as u64) + 1;
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            warn!(
                node,
                session = session_id,
                suppressed,
                "refused a video frame for a session this node does not serve"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts a dropped frame against its session and in the metric, by reason.
pub fn count_drop(shared: &Shared, relay: &Relay, reason: DropReason) {
    relay.dropped(reason).fetch_add(1, Ordering::Relaxed);
    shared
        .metrics
        .game_frames_dropped
        .get_or_create(&labels([("reason", reason.as_str())]))
        .inc();
}

/// Forwards every frame stream a node opens to the session's client. Runs once per node
/// connection, for as long as it lives.
///
/// A frame is accepted only from the connection of the node serving its session (the id in
/// the header is the sender's claim, and nodes are run by strangers), then only if it is within
/// its age and in-flight budgets ([`FrameBudget::admit`]); otherwise it is refused before a byte
/// of its payload is read. A frame for an unknown session and a foreign frame get the same
/// answer, so a node cannot probe which ids are live.
pub async fn node_frames_loop(shared: Arc<Shared>, conn: quinn::Connection) {
    let budget = FrameBudget::from_config(&shared.config.game);
    let foreign_log = Arc::new(ForeignLog::new());
    // For the log only: the loop starts once the node is registered.
    let node_id: Arc<str> = shared
        .directory
        .registry
        .list()
        .into_iter()
        .find(|n| n.conn.stable_id() == conn.stable_id())
        .map_or_else(|| "unregistered".into(), |n| n.id.as_str().into());
    while let Ok(mut recv) = conn.accept_uni().await {
        let shared = shared.clone();
        let conn = conn.clone();
        let foreign_log = foreign_log.clone();
        let node_id = node_id.clone();
        tokio::spawn(async move {
            let header = match recv_frame_header(&mut recv).await {
                Ok(h) => h,
                Err(e) => {
                    debug!(error = %e, "bad frame stream from node");
                    return;
                }
            };
            let Some(relay) = shared.sessions.games.get(header.session_id) else {
                let _ = recv.stop(nearpath_protocol::app_code::STREAM_REFUSED);
                return;
            };
            if !relay.is_served_by(&conn) {
                let _ = recv.stop(nearpath_protocol::app_code::STREAM_REFUSED);
                count_drop(&shared, &relay, DropReason::Foreign);
                foreign_log.note(&node_id, header.session_id);
                return;
            }
            let bytes = FrameBudget::frame_bytes(&header);
            let verdict = {
                let mut f = relay.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                budget.admit(
                    &mut f,
                    crate::clock::system_unix_us(),
                    header.capture_ts_us,
                    bytes,
                )
            };
            let remaining_us = match verdict {
                Verdict::Forward { remaining_us } => remaining_us,
                Verdict::Drop(reason) => {
                    let _ = recv.stop(nearpath_protocol::app_code::STREAM_REFUSED);
                    count_drop(&shared, &relay, reason);
                    relay.request_keyframe();
                    return;
                }
            };
            let _slot = FlightSlot {
                relay: relay.clone(),
                bytes,
            };
            let write_by = tokio::time::Instant::now() + Duration::from_micros(remaining_us);
            let result = match &relay.sink {
                FrameSink::Quic(client) => {
                    // The deadline is for the frame's bytes leaving; its acknowledgement comes a
                    // round trip (and a delayed-ack allowance) later.
                    let acked_by = write_by + client.rtt() + ACK_DELAY_ALLOWANCE;
                    relay_frame_by(recv, &header, client, MAX_VIDEO_FRAME, write_by, acked_by)
                        .await
                        .map_err(|e| e.to_string())
                }
                FrameSink::Channel(tx) => {
                    match tokio::time::timeout_at(write_by, recv_frame_rest(recv, &header)).await {
                        Ok(Ok(payload)) => {
                            let n = payload.len() as u64;
                            match tx.try_send((header, payload)) {
                                Ok(()) => Ok(Relayed::Delivered(n)),
                                // The session task is behind: drop, never queue.
                                Err(mpsc::error::TrySendError::Full(_)) => Ok(Relayed::Abandoned),
                                Err(e) => Err(e.to_string()),
                            }
                        }
                        Ok(Err(e)) => Err(e),
                        // Dropping the stream stops it.
                        Err(_) => Ok(Relayed::Abandoned),
                    }
                }
            };
            match result {
                Ok(Relayed::Delivered(n)) => {
                    relay.frames.fetch_add(1, Ordering::Relaxed);
                    relay.bytes.fetch_add(n, Ordering::Relaxed);
                    shared.metrics.game_frames_relayed.inc();
                }
                Ok(Relayed::Abandoned) => {
                    count_drop(&shared, &relay, DropReason::Overload);
                    relay.request_keyframe();
                }
                Err(e) => {
                    debug!(error = %e, "frame not relayed");
                    count_drop(&shared, &relay, DropReason::Relay);
                }
            }
        });
    }
}

/// Forwards a client's input datagrams to the node serving the session. Runs once per client
/// connection.
pub async fn client_input_loop(shared: Arc<Shared>, conn: quinn::Connection) {
    while let Ok(dgram) = conn.read_datagram().await {
        let Ok(input) = InputDatagram::decode(&dgram) else {
            continue;
        };
        let Some(relay) = shared.sessions.games.get(input.session_id) else {
            continue;
        };
        // Only the session's own client may steer it.
        match &relay.sink {
            FrameSink::Quic(c) if c.stable_id() == conn.stable_id() => {}
            _ => continue,
        }
        relay.inputs.fetch_add(1, Ordering::Relaxed);
        if let Some(node) = relay.node() {
            let _ = node.conn.send_datagram(Bytes::copy_from_slice(&dgram));
        }
    }
}

fn err(code: &str, message: impl Into<String>) -> Message {
    Message::Error(ErrorInfo {
        code: code.into(),
        message: message.into(),
        retryable: false,
    })
}

/// Clamps a play request to the configured limits (0 means the default).
pub fn session_params(shared: &Shared, r: &PlayRequest) -> Result<GameParams, String> {
    let g = &shared.config.game;
    let pick = |v: u32, d: u32| if v == 0 { d } else { v };
    let p = GameParams {
        title: r.game.clone(),
        width: pick(r.width, g.default_width),
        height: pick(r.height, g.default_height),
        fps: pick(r.fps, g.default_fps),
        bitrate_kbps: pick(r.bitrate_kbps, g.default_bitrate_kbps),
    };
    if !p.width.is_multiple_of(2) || !p.height.is_multiple_of(2) || p.width < 16 || p.height < 16 {
        return Err(format!(
            "{}x{} must be even and at least 16x16",
            p.width, p.height
        ));
    }
    if p.width > g.max_width || p.height > g.max_height {
        return Err(format!(
            "{}x{} exceeds the limit {}x{}",
            p.width, p.height, g.max_width, g.max_height
        ));
    }
    if p.fps > g.max_fps {
        return Err(format!("{} fps exceeds the limit {}", p.fps, g.max_fps));
    }
    if p.bitrate_kbps > g.max_bitrate_kbps {
        return Err(format!(
            "{} kbps exceeds the limit {}",
            p.bitrate_kbps, g.max_bitrate_kbps
        ));
    }
    Ok(p)
}

/// A session attached to one node.
struct Attached {
    node: Arc<NodeEntry>,
    tx: quinn::SendStream,
    rx: FramedRecv,
    _slot: SlotGuard,
}

/// Why no node could take the session.
enum NoNode {
    Denied(String),
    Unknown,
    Full,
    Failed(String),
}

async fn attach(
    shared: &Arc<Shared>,
    client: &Location,
    params: &GameParams,
    session_id: u64,
    exclude: &[crate::router::NodeId],
) -> Result<Attached, NoNode> {
    let (outcome, nodes) = shared.directory.registry.route(
        client_latlon(client),
        Workload::Game(&params.title),
        |n| {
            if exclude.contains(&n.key) {
                return Err(crate::router::Deny {
                    rule: "failover".into(),
                    reason: "node failed this session".into(),
                });
            }
            infer::serve_check(shared, client, n, WorkloadKind::Game)
        },
    );
    if let Some(f) = outcome.failure() {
        return Err(match f {
            NoRoute::NotServed => NoNode::Unknown,
            NoRoute::Denied(d) if d.rule != "failover" => {
                NoNode::Denied(format!("rule {}: {}", d.rule, d.reason))
            }
            NoRoute::Denied(_) => NoNode::Failed("no other node serves this game".into()),
            NoRoute::Saturated | NoRoute::Draining => NoNode::Full,
        });
    }
    let mut last = NoNode::Full;
    for node in nodes {
        let Some(slot) = shared.directory.registry.acquire(&node, SlotKind::Game) else {
            continue;
        };
        let opened = async {
            let (mut tx, rx) = node.conn.open_bi().await.map_err(|e| e.to_string())?;
            send(
                &mut tx,
                &Message::Open(Open {
                    session_id,
                    kind: SessionKind::Game(params.clone()),
                }),
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut rx = FramedRecv::new(rx, MAX_CONTROL_FRAME);
            match rx.next().await {
                Ok(Some(Message::Accepted(a))) if a.session_id == session_id => Ok((tx, rx)),
                Ok(Some(Message::Accepted(a))) => Err(format!(
                    "accepted session {} instead of {session_id}",
                    a.session_id
                )),
                Ok(Some(Message::Refused(r))) => Err(format!("refused: {}", r.reason)),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), opened).await {
            Ok(Ok((tx, rx))) => {
                return Ok(Attached {
                    node,
                    tx,
                    rx,
                    _slot: slot,
                })
            }
            Ok(Err(e)) => {
                warn!(node = %node.id, error = %e, "node did not take the game session");
                last = NoNode::Failed(e);
            }
            Err(_) => last = NoNode::Failed(format!("node {} did not answer within 5 s", node.id)),
        }
    }
    Err(last)
}

/// Reads the payload that follows an already-read frame header.
async fn recv_frame_rest(
    mut recv: quinn::RecvStream,
    header: &FrameHeader,
) -> Result<Bytes, String> {
    let len = header.payload_len as usize;
    if len > MAX_VIDEO_FRAME {
        let _ = recv.stop(nearpath_protocol::app_code::STREAM_REFUSED);
        return Err(format!("frame of {len} bytes is over the limit"));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(Bytes::from(buf))
}

/// Routes and starts a game session for `client`, then runs it in a task until it ends.
pub async fn start_session(
    shared: &Arc<Shared>,
    key: &ApiKey,
    client: Location,
    client_addr: String,
    transport: &'static str,
    params: GameParams,
    sink: FrameSink,
) -> Result<Started, StartError> {
    let cap = match admit_start(shared, key, transport) {
        Ok(g) => g,
        Err(e) => {
            shared
                .metrics
                .game_sessions
                .get_or_create(&labels([("transport", transport), ("outcome", e.code)]))
                .inc();
            return Err(e);
        }
    };
    let session = shared.sessions.ids.mint();
    let session_id = session.get();
    let attached = match attach(shared, &client, &params, session_id, &[]).await {
        Ok(a) => a,
        Err(no) => {
            let (code, message) = match no {
                NoNode::Denied(r) => ("geofence", format!("geofence: {r}")),
                NoNode::Unknown => ("unknown_game", format!("no node serves {}", params.title)),
                NoNode::Full => (
                    "no_capacity",
                    "every node serving this game is busy".to_string(),
                ),
                NoNode::Failed(e) => ("no_capacity", e),
            };
            shared
                .metrics
                .game_sessions
                .get_or_create(&labels([("transport", transport), ("outcome", code)]))
                .inc();
            return Err(StartError {
                code,
                message,
                retry_after_s: (code == "no_capacity").then_some(2),
            });
        }
    };
    let (events_tx, events_rx) = mpsc::channel(16);
    let relay = Arc::new(Relay {
        session_id,
        _session: session,
        sink,
        client_addr,
        transport,
        client_stats: Mutex::new(None),
        node: Mutex::new(Some(attached.node.clone())),
        frames: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        dropped_late: AtomicU64::new(0),
        dropped_overload: AtomicU64::new(0),
        dropped_foreign: AtomicU64::new(0),
        dropped_relay: AtomicU64::new(0),
        inputs: AtomicU64::new(0),
        started: Instant::now(),
        game: params.title.clone(),
        tenant: key.tenant.clone(),
        in_flight: Mutex::new(InFlight::default()),
        events: events_tx.downgrade(),
        last_keyframe_request: AtomicU64::new(0),
    });
    shared.sessions.games.insert(relay.clone());
    shared.metrics.active_game_sessions.inc();
    let (notices_tx, notices_rx) = mpsc::channel(16);
    let span = info_span!("game_session", id = session_id, game = %params.title, transport);
    tokio::spawn(
        drive(
            shared.clone(),
            key.clone(),
            client,
            params.clone(),
            relay.clone(),
            attached,
            events_rx,
            notices_tx,
            cap,
        )
        .instrument(span),
    );
    Ok(Started {
        session_id,
        params,
        events: events_tx,
        notices: notices_rx,
        relay,
    })
}

/// The part of a session that one node served, billed to that node alone: its own usage row
/// (`game_<id>` for the first node, `game_<id>_<n>` for the n-th), checkpointed in place while
/// it runs and finalised when the node is lost or the session ends. Paused time between two
/// segments is billed to nobody.
struct Segment {
    node: Arc<NodeEntry>,
    index: u32,
    since: Instant,
    frames_at_start: u64,
    bytes_at_start: u64,
    ledger: tokio::sync::watch::Sender<Option<UsageRecord>>,
}

impl Segment {
    fn start(shared: &Shared, relay: &Relay, node: Arc<NodeEntry>, index: u32) -> Segment {
        let (ledger, ledger_rx) = tokio::sync::watch::channel(None);
        tokio::spawn(usage_row_writer(shared.store.clone(), ledger_rx).in_current_span());
        Segment {
            node,
            index,
            since: Instant::now(),
            frames_at_start: relay.frames.load(Ordering::Relaxed),
            bytes_at_start: relay.bytes.load(Ordering::Relaxed),
            ledger,
        }
    }

    /// Writes the segment's row as it stands, `in_progress` or final.
    fn write(&self, key: &ApiKey, relay: &Relay, params: &GameParams, outcome: &str) {
        let row = game_usage(key, relay, self, params, outcome);
        self.ledger.send_replace(Some(row));
    }

    /// Writes the final row; the writer task writes it and ends when the sender drops here.
    fn finish(self, key: &ApiKey, relay: &Relay, params: &GameParams, outcome: &str) -> f64 {
        self.write(key, relay, params, outcome);
        self.since.elapsed().as_secs_f64()
    }
}

/// How a pause ended.
enum PauseEnd {
    /// A node took the session.
    Resumed(Attached),
    /// No node within the pause window.
    Expired,
    /// The player closed the session or went away: the session's outcome.
    Client(&'static str),
    Revoked,
}

/// "5 s", "2.5 s": a window for people.
fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// Waits, within the pause window, for a node to take a paused session: tries at once, then
/// again whenever the registry says a node may have become eligible (one registered, freed a
/// slot, stopped being slow), never on a polling timer. `failed` holds the registrations
/// (registry keys, one per connection) that failed the session; a node that reconnects and
/// registers again with the same id is a new registration and may take the session back.
/// Client events and the key's revocation are served meanwhile.
#[allow(clippy::too_many_arguments)]
async fn wait_for_node(
    shared: &Arc<Shared>,
    client: &Location,
    params: &GameParams,
    session_id: u64,
    failed: &[crate::router::NodeId],
    window: Duration,
    events: &mut mpsc::Receiver<ClientEvent>,
    revoked: &tokio_util::sync::CancellationToken,
    bitrate: &mut Option<u32>,
) -> PauseEnd {
    let deadline = tokio::time::Instant::now() + window;
    let mut changes = shared.directory.registry.subscribe();
    loop {
        changes.borrow_and_update();
        if let Ok(a) = attach(shared, client, params, session_id, failed).await {
            return PauseEnd::Resumed(a);
        }
        loop {
            tokio::select! {
                biased;
                _ = revoked.cancelled() => return PauseEnd::Revoked,
                e = events.recv() => match e {
                    Some(ClientEvent::Close(_)) => return PauseEnd::Client("ok"),
                    Some(ClientEvent::Gone) | None => return PauseEnd::Client("client_left"),
                    Some(ClientEvent::Lost) => return PauseEnd::Client("client_gone"),
                    // The next node starts with a keyframe anyway.
                    Some(ClientEvent::ForceKeyframe) => {}
                    Some(ClientEvent::SetBitrate(kbps)) => *bitrate = Some(kbps),
                },
                r = changes.changed() => {
                    if r.is_err() {
                        return PauseEnd::Expired;
                    }
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => return PauseEnd::Expired,
            }
        }
    }
}

/// Runs a started session: client events in, node stream out, a pause and a resume when the
/// node is lost, metering per node.
#[allow(clippy::too_many_arguments)]
async fn drive(
    shared: Arc<Shared>,
    key: ApiKey,
    client: Location,
    params: GameParams,
    relay: Arc<Relay>,
    attached: Attached,
    mut events: mpsc::Receiver<ClientEvent>,
    notices: mpsc::Sender<Notice>,
    _cap: infer::CapGuard,
) {
    info!(node = %attached.node.id, "game session started");
    let session_id = relay.session_id;
    let mut outcome = "ok";
    // Registrations (not node ids) that failed this session: the same node may come back.
    let mut failed: Vec<crate::router::NodeId> = Vec::new();
    // The bitrate the player asked for last, re-applied on the node that resumes the session.
    let mut bitrate: Option<u32> = None;
    let window = Duration::from_millis(shared.config.game.pause_window_ms);
    // Revoking the key ends the session at once, whichever transport the player uses.
    let revoked = shared.auth.keys.revocation(&key.id);
    // Each node's share of the session has its own usage row, written every checkpoint
    // interval as `in_progress` and rewritten in place with the final totals, so a killed
    // gateway loses at most one interval of metering and nothing is counted twice.
    let mut segment = Some(Segment::start(&shared, &relay, attached.node.clone(), 1));
    let mut segments = 1u32;
    let mut gpu_seconds = 0.0f64;
    let mut attached = Some(attached);
    let every = Duration::from_millis(shared.config.game.usage_checkpoint_ms.max(1));
    let mut checkpoint = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while let Some(a) = attached.as_mut() {
        enum Ev {
            Client(Option<ClientEvent>),
            Node(Option<Message>),
            NodeGone,
            Revoked,
            Checkpoint,
        }
        let ev = tokio::select! {
            biased;
            _ = revoked.cancelled() => Ev::Revoked,
            _ = checkpoint.tick() => Ev::Checkpoint,
            e = events.recv() => Ev::Client(e),
            m = a.rx.next() => match m {
                Ok(Some(m)) => Ev::Node(Some(m)),
                _ => Ev::NodeGone,
            },
            _ = a.node.conn.closed() => Ev::NodeGone,
        };
        match ev {
            Ev::Revoked => {
                warn!(key = %key.id, "API key revoked: ending the game session");
                outcome = "key_revoked";
                // A node that does not read its session stream must not hold the session open:
                // past a short bound the stream is reset instead.
                let close = Message::Close(nearpath_protocol::message::Close {
                    reason: "key_revoked".into(),
                });
                match tokio::time::timeout(REVOKE_SEND_BOUND, send(&mut a.tx, &close)).await {
                    Ok(Ok(())) => {
                        let _ = a.tx.finish();
                    }
                    _ => {
                        let _ = a.tx.reset(nearpath_protocol::app_code::STREAM_CANCELLED);
                    }
                }
                let _ = notices.send(Notice::Ended("key_revoked".into())).await;
                break;
            }
            Ev::Checkpoint => {
                if let Some(seg) = &segment {
                    seg.write(&key, &relay, &params, "in_progress");
                }
            }
            Ev::Client(Some(ClientEvent::ForceKeyframe)) => {
                let _ = send(&mut a.tx, &Message::ForceKeyframe).await;
            }
            Ev::Client(Some(ClientEvent::SetBitrate(kbps))) => {
                let kbps = kbps.clamp(100, shared.config.game.max_bitrate_kbps);
                bitrate = Some(kbps);
                let _ = send(
                    &mut a.tx,
                    &Message::SetBitrate(nearpath_protocol::message::SetBitrate { kbps }),
                )
                .await;
            }
            Ev::Client(Some(ClientEvent::Close(reason))) => {
                let _ = send(
                    &mut a.tx,
                    &Message::Close(nearpath_protocol::message::Close { reason }),
                )
                .await;
                let _ = a.tx.finish();
                break;
            }
            Ev::Client(Some(ClientEvent::Lost)) => {
                outcome = "client_gone";
                let _ = send(
                    &mut a.tx,
                    &Message::Close(nearpath_protocol::message::Close {
                        reason: "client gone".into(),
                    }),
                )
                .await;
                let _ = a.tx.finish();
                break;
            }
            Ev::Client(Some(ClientEvent::Gone)) | Ev::Client(None) => {
                outcome = "client_left";
                let _ = send(
                    &mut a.tx,
                    &Message::Close(nearpath_protocol::message::Close {
                        reason: "client left".into(),
                    }),
                )
                .await;
                let _ = a.tx.finish();
                break;
            }
            Ev::Node(Some(Message::Ended(e))) => {
                // The game itself ended (e.g. an external source exited): not a node failure.
                let _ = notices.send(Notice::Ended(e.reason)).await;
                outcome = "ended_by_node";
                break;
            }
            Ev::Node(Some(_)) => {}
            Ev::Node(None) | Ev::NodeGone => {
                // The node is lost: pause the session (the client keeps its connection), close
                // the node's share of the bill, and wait for a node within the pause window.
                let lost = attached.take().map(|a| a.node);
                let Some(lost) = lost else { break };
                warn!(node = %lost.id, window_ms = window.as_millis() as u64, "serving node lost; pausing the session");
                failed.push(lost.key);
                relay.set_node(None);
                if let Some(seg) = segment.take() {
                    gpu_seconds += seg.finish(&key, &relay, &params, "node_lost");
                }
                let _ = notices
                    .send(Notice::Paused(format!(
                        "node {} was lost; waiting up to {} for a node",
                        lost.id,
                        seconds(window.as_millis() as u64)
                    )))
                    .await;
                let t0 = Instant::now();
                let end = wait_for_node(
                    &shared,
                    &client,
                    &params,
                    session_id,
                    &failed,
                    window,
                    &mut events,
                    &revoked,
                    &mut bitrate,
                )
                .await;
                let pause = |how: &str| {
                    shared
                        .metrics
                        .game_pauses
                        .get_or_create(&labels([("outcome", how)]))
                        .inc();
                };
                match end {
                    PauseEnd::Resumed(mut a) => {
                        let same = a.node.id == lost.id;
                        pause(if same { "same_node" } else { "other_node" });
                        segments += 1;
                        segment = Some(Segment::start(&shared, &relay, a.node.clone(), segments));
                        relay.set_node(Some(a.node.clone()));
                        let _ = send(&mut a.tx, &Message::ForceKeyframe).await;
                        if let Some(kbps) = bitrate {
                            let _ = send(
                                &mut a.tx,
                                &Message::SetBitrate(nearpath_protocol::message::SetBitrate {
                                    kbps,
                                }),
                            )
                            .await;
                        }
                        shared.metrics.game_failovers.inc();
                        info!(node = %a.node.id, same_node = same, paused_ms = t0.elapsed().as_millis() as u64, "session resumed");
                        attached = Some(a);
                        let _ = notices.send(Notice::Resumed).await;
                    }
                    PauseEnd::Expired => {
                        pause("expired");
                        outcome = "node_lost";
                        warn!("no node took the session within the pause window; ending it");
                        let _ = notices
                            .send(Notice::Ended(format!(
                                "no node available within {}",
                                seconds(window.as_millis() as u64)
                            )))
                            .await;
                    }
                    PauseEnd::Client(how) => {
                        pause("ended");
                        outcome = how;
                    }
                    PauseEnd::Revoked => {
                        pause("ended");
                        warn!(key = %key.id, "API key revoked: ending the paused game session");
                        outcome = "key_revoked";
                        let _ = notices.send(Notice::Ended("key_revoked".into())).await;
                    }
                }
            }
        }
    }
    // GPU-seconds are each segment's own time, counted once when the segment is finalised.
    if let Some(seg) = segment.take() {
        gpu_seconds += seg.finish(&key, &relay, &params, outcome);
    }
    shared.sessions.games.remove(session_id);
    shared.metrics.active_game_sessions.dec();
    shared
        .metrics
        .game_sessions
        .get_or_create(&labels([
            ("transport", relay.transport),
            ("outcome", outcome),
        ]))
        .inc();
    let frames = relay.frames.load(Ordering::Relaxed);
    let bytes = relay.bytes.load(Ordering::Relaxed);
    info!(
        outcome,
        frames,
        bytes,
        gpu_seconds,
        nodes = segments,
        dropped_late = relay.dropped_late.load(Ordering::Relaxed),
        dropped_overload = relay.dropped_overload.load(Ordering::Relaxed),
        dropped_foreign = relay.dropped_foreign.load(Ordering::Relaxed),
        dropped_relay = relay.dropped_relay.load(Ordering::Relaxed),
        "game session ended"
    );
}

/// One node's share of a game session as a usage row: what the gateway counted (its own clock
/// for GPU-seconds, the frames and bytes it relayed while that node served), never what a node
/// says.
fn game_usage(
    key: &ApiKey,
    relay: &Relay,
    seg: &Segment,
    params: &GameParams,
    outcome: &str,
) -> UsageRecord {
    let elapsed = seg.since.elapsed().as_secs_f64();
    UsageRecord {
        id: None,
        at_ms: crate::clock::system_unix_ms(),
        kind: UsageKind::Game,
        request_id: if seg.index <= 1 {
            format!("game_{}", relay.session_id)
        } else {
            format!("game_{}_{}", relay.session_id, seg.index)
        },
        tenant: key.tenant.clone(),
        api_key_id: key.id.clone(),
        node_id: seg.node.id.clone(),
        operator_id: seg.node.operator_id.clone(),
        workload: params.title.clone(),
        outcome: outcome.to_string(),
        prompt_tokens: 0,
        completion_tokens: 0,
        node_prompt_tokens: None,
        node_completion_tokens: None,
        ttft_ms: None,
        duration_ms: elapsed * 1000.0,
        gpu_seconds: elapsed,
        frames: relay
            .frames
            .load(Ordering::Relaxed)
            .saturating_sub(seg.frames_at_start),
        bytes: relay
            .bytes
            .load(Ordering::Relaxed)
            .saturating_sub(seg.bytes_at_start),
    }
}

/// Writes a session's usage row as its driver updates it: appended the first time, rewritten
/// in place after (the id is kept), always the latest value (a checkpoint not yet written when
/// a newer one arrives is skipped). Ends after writing the final value, once the driver drops
/// its sender. A failed write is retried with the next value.
async fn usage_row_writer(
    store: Arc<dyn crate::store::Store>,
    mut rows: tokio::sync::watch::Receiver<Option<UsageRecord>>,
) {
    let mut id: Option<i64> = None;
    while rows.changed().await.is_ok() {
        let Some(row) = rows.borrow_and_update().clone() else {
            continue;
        };
        let final_row = row.outcome != "in_progress";
        let store = store.clone();
        let result = tokio::task::spawn_blocking(move || match id {
            Some(id) => store.update_usage(id, row),
            None => store.append_usage(row),
        })
        .await;
        match result {
            Ok(Ok(written)) => id = Some(written),
            Ok(Err(e)) if final_row => warn!(error = %e, "game usage record not written"),
            Ok(Err(e)) => warn!(error = %e, "game usage checkpoint not written"),
            Err(e) => warn!(error = %e, "game usage writer failed"),
        }
    }
}

/// What a closed client connection means for its session: a close the client sent (or one
/// this end made) is the player leaving; anything else (idle timeout, reset, transport error)
/// is the player lost.
fn closed_event(e: &quinn::ConnectionError) -> ClientEvent {
    match e {
        quinn::ConnectionError::ApplicationClosed(_)
        | quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::LocallyClosed => ClientEvent::Gone,
        _ => ClientEvent::Lost,
    }
}

/// Serves a `PlayRequest` on a native client's bidi stream until the session ends.
pub async fn serve_play(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut ctl_tx: quinn::SendStream,
    mut ctl_rx: FramedRecv,
    req: PlayRequest,
) {
    let key: ApiKey = match infer::authenticate(&shared, Some(&req.api_key)).await {
        Ok(k) => k,
        Err(e) => {
            let _ = send(&mut ctl_tx, &err("unauthorized", e.message)).await;
            let _ = ctl_tx.finish();
            return;
        }
    };
    let params = match session_params(&shared, &req) {
        Ok(p) => p,
        Err(e) => {
            let _ = send(&mut ctl_tx, &err("bad_request", e)).await;
            let _ = ctl_tx.finish();
            return;
        }
    };
    let client = shared.placement.geo.lookup(conn.remote_address().ip());
    let started = match start_session(
        &shared,
        &key,
        client,
        conn.remote_address().to_string(),
        "quic",
        params,
        FrameSink::Quic(conn.clone()),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let retryable = e.retryable();
            let msg = Message::Error(ErrorInfo {
                code: e.code.into(),
                message: e.message,
                retryable,
            });
            let _ = send(&mut ctl_tx, &msg).await;
            let _ = ctl_tx.finish();
            return;
        }
    };
    let Started {
        session_id,
        params,
        events,
        mut notices,
        ..
    } = started;
    let msg = Message::PlayStarted(PlayStarted {
        session_id,
        width: params.width,
        height: params.height,
        fps: params.fps,
        bitrate_kbps: params.bitrate_kbps,
    });
    if send(&mut ctl_tx, &msg).await.is_err() {
        let _ = events.send(ClientEvent::Gone).await;
        return;
    }
    let mut client_open = true;
    // The gateway's own judgement of whether the player is still there, whatever idle timeout
    // its client asked for (see `crate::player`).
    let mut silence = PlayerSilence::new(Duration::from_millis(
        shared.config.game.player_idle_timeout_ms,
    ));
    let mut liveness = tokio::time::interval(silence.sample_interval());
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = liveness.tick() => {
                let now = Instant::now();
                silence.handle_sample(now, ConnSample::of(&conn.stats()));
                if silence.poll_gone(now) {
                    info!(
                        session = session_id,
                        idle_ms = shared.config.game.player_idle_timeout_ms,
                        "the player stopped answering; ending the session"
                    );
                    let _ = events.send(ClientEvent::Lost).await;
                    break;
                }
            }
            m = ctl_rx.next(), if client_open => {
                let ev = match m {
                    Ok(Some(Message::ForceKeyframe)) => Some(ClientEvent::ForceKeyframe),
                    Ok(Some(Message::SetBitrate(b))) => Some(ClientEvent::SetBitrate(b.kbps)),
                    Ok(Some(Message::Close(c))) => Some(ClientEvent::Close(c.reason)),
                    Ok(Some(_)) => None,
                    Ok(None) => { client_open = false; None }
                    // A stream that fails with its connection says what the connection says.
                    Err(_) => Some(conn.close_reason().map_or(ClientEvent::Gone, |e| closed_event(&e))),
                };
                if let Some(ev) = ev {
                    let last = matches!(ev, ClientEvent::Close(_) | ClientEvent::Gone | ClientEvent::Lost);
                    let _ = events.send(ev).await;
                    if last {
                        break;
                    }
                }
            }
            n = notices.recv() => match n {
                Some(Notice::Paused(reason)) => { let _ = send(&mut ctl_tx, &Message::Paused(Paused { reason })).await; }
                Some(Notice::Resumed) => { let _ = send(&mut ctl_tx, &Message::Resumed).await; }
                Some(Notice::Ended(reason)) => {
                    let _ = send(&mut ctl_tx, &Message::Ended(Ended { reason })).await;
                    break;
                }
                None => break,
            },
            e = conn.closed() => {
                let _ = events.send(closed_event(&e)).await;
                break;
            }
        }
    }
    let _ = ctl_tx.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn budget() -> FrameBudget {
        FrameBudget {
            budget_us: 100 * MS,
            max_in_flight_bytes: 100_000,
            max_in_flight_frames: 3,
        }
    }

    #[test]
    fn frames_are_dropped_before_forwarding_when_late_or_over_budget_never_queued() {
        let b = budget();
        let mut f = InFlight::default();
        // Virtual clock: the relay reads headers at these times (us).
        let t0 = 1_000_000_000u64;
        // Fresh frame: forwarded with what is left of its budget.
        assert_eq!(
            b.admit(&mut f, t0 + 30 * MS, t0, 20_000),
            Verdict::Forward {
                remaining_us: 70 * MS
            }
        );
        // Exactly at the budget is still in; a microsecond past it is late.
        assert_eq!(
            b.admit(&mut f, t0 + 100 * MS, t0, 20_000),
            Verdict::Forward { remaining_us: 0 }
        );
        assert_eq!(
            b.admit(&mut f, t0 + 100 * MS + 1, t0, 20_000),
            Verdict::Drop(DropReason::Late)
        );
        assert_eq!(
            f,
            InFlight {
                frames: 2,
                bytes: 40_000
            }
        );
        // Bytes: 40 000 + 70 000 is over 100 000, so the frame is dropped, not held back.
        assert_eq!(
            b.admit(&mut f, t0 + 40 * MS, t0 + 35 * MS, 70_000),
            Verdict::Drop(DropReason::Overload)
        );
        // Frames: a third fits, a fourth does not, whatever its size.
        assert!(matches!(
            b.admit(&mut f, t0 + 41 * MS, t0 + 40 * MS, 10),
            Verdict::Forward { .. }
        ));
        assert_eq!(
            b.admit(&mut f, t0 + 42 * MS, t0 + 41 * MS, 10),
            Verdict::Drop(DropReason::Overload)
        );
        // Delivered frames give their share back, and the next frame goes.
        FrameBudget::release(&mut f, 20_000);
        FrameBudget::release(&mut f, 10);
        assert_eq!(
            f,
            InFlight {
                frames: 1,
                bytes: 20_000
            }
        );
        assert!(matches!(
            b.admit(&mut f, t0 + 50 * MS, t0 + 45 * MS, 70_000),
            Verdict::Forward { .. }
        ));
        // Late beats everything else: a late frame never takes budget.
        let before = f;
        assert_eq!(
            b.admit(&mut f, t0 + 500 * MS, t0, 1),
            Verdict::Drop(DropReason::Late)
        );
        assert_eq!(f, before);
    }

    #[test]
    fn a_frame_larger_than_the_byte_budget_passes_when_nothing_is_in_flight() {
        let b = budget();
        let mut f = InFlight::default();
        assert!(matches!(
            b.admit(&mut f, 10 * MS, 10 * MS, 500_000),
            Verdict::Forward { .. }
        ));
        assert_eq!(
            b.admit(&mut f, 11 * MS, 11 * MS, 10),
            Verdict::Drop(DropReason::Overload)
        );
    }

    #[test]
    fn a_capture_time_in_the_future_gets_no_more_than_the_full_budget() {
        let b = budget();
        let mut f = InFlight::default();
        assert_eq!(
            b.admit(&mut f, 10 * MS, u64::MAX, 100),
            Verdict::Forward {
                remaining_us: 100 * MS
            }
        );
    }
}
