//! The game relay's per-session state and its per-frame rule ([`FrameBudget`]): what the game
//! service, the WebRTC front end and the admin view share about a live game session. It depends
//! only on the registry and session ids, so the `Sessions` component can hold the table of live
//! relays ([`GameRelays`]) without depending on the service that drives them.

use crate::registry::NodeEntry;
use crate::session_id::SessionId;
use bytes::Bytes;
use nearpath_protocol::message::{GameParams, Rumble, SetVideo};
use nearpath_protocol::{AudioPacket, FrameHeader, InputDatagram, MAX_VIDEO_FRAME};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::warn;

/// How long ending a session for a revoked key may wait on the node's stream.
pub(crate) const REVOKE_SEND_BOUND: Duration = Duration::from_millis(200);

/// Where a session's frames go.
#[derive(Clone)]
pub enum FrameSink {
    /// Native client: each frame is forwarded as-is on a new uni stream of this connection.
    Quic(quinn::Connection),
    /// Browser over WebTransport: as [`FrameSink::Quic`] (one uni stream per frame, audio
    /// datagrams as they come), with WebTransport's stream and datagram framing added.
    WebTransport(WtSink),
    /// Another transport (WebRTC): whole frames and decoded audio packets are handed over; a
    /// full channel drops the frame or packet (a late one is worth less than the next one).
    Channel {
        /// Video frames.
        frames: mpsc::Sender<(FrameHeader, Bytes)>,
        /// Audio packets.
        audio: mpsc::Sender<AudioPacket>,
    },
}

/// A WebTransport player's connection and the framing its session's streams and datagrams
/// carry (RFC 9297 / draft-ietf-webtrans-http3): the raw QUIC connection is kept, so that a
/// WebTransport frame costs what a native one does.
#[derive(Clone)]
pub struct WtSink {
    pub conn: quinn::Connection,
    /// Written before each frame on a uni stream: stream type 0x54 and the session id.
    pub uni: nearpath_protocol::stream::UniFraming,
    /// Written before each datagram, and expected before each received one: the quarter
    /// stream id of the session's CONNECT stream.
    pub datagram_prefix: Bytes,
}

impl WtSink {
    /// `payload` with the session's datagram prefix before it.
    pub fn datagram(&self, payload: &[u8]) -> Bytes {
        let mut d = Vec::with_capacity(self.datagram_prefix.len() + payload.len());
        d.extend_from_slice(&self.datagram_prefix);
        d.extend_from_slice(payload);
        Bytes::from(d)
    }

    /// The payload of a received datagram if it names this session, `None` otherwise.
    pub fn strip_datagram<'a>(&self, d: &'a [u8]) -> Option<&'a [u8]> {
        d.strip_prefix(self.datagram_prefix.as_ref())
    }
}

/// Why the relay dropped an audio datagram from a node: the `reason` label of
/// `nearpath_game_audio_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioDrop {
    /// Not a valid audio datagram (bad magic, version, flags, sample count or length).
    Malformed,
    /// For a session the sending connection does not serve (or no live session: the same
    /// answer, so a node cannot probe which ids are live).
    Foreign,
    /// The player's connection or channel could not take it.
    Relay,
}

impl AudioDrop {
    pub fn as_str(self) -> &'static str {
        match self {
            AudioDrop::Malformed => "malformed",
            AudioDrop::Foreign => "foreign",
            AudioDrop::Relay => "relay",
        }
    }
}

/// What the client side of a session tells the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    ForceKeyframe,
    SetBitrate(u32),
    /// Change the picture size and frame rate (checked against `[game]` limits by the
    /// session's rules, then by the node).
    SetVideo(SetVideo),
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
    /// A video change took effect with these values.
    VideoChanged(SetVideo),
    /// A video change was refused; the session goes on unchanged.
    VideoRefused(String),
    /// The serving node asks for a gamepad vibration (already bounded and rate limited).
    Rumble(Rumble),
}

/// A started session: feed `events`, read `notices` (and frames from the sink).
pub struct Started {
    pub session_id: u64,
    pub params: GameParams,
    pub events: mpsc::Sender<ClientEvent>,
    pub notices: mpsc::Receiver<Notice>,
    pub relay: Arc<Relay>,
    /// In a federation: the secret the player resumes the session with through another gateway
    /// if this one dies (sent to native players as `ResumeToken`).
    pub resume_token: Option<String>,
}

/// One live game session as the relay sees it.
pub struct Relay {
    pub session_id: u64,
    /// Holds `session_id` among the live ids while anything still refers to the session.
    pub(crate) _session: SessionId,
    pub sink: FrameSink,
    /// The client's address, for the admin view.
    pub client_addr: String,
    pub transport: &'static str,
    /// The client's own stats (the browser page reports `getStats()` here).
    pub client_stats: Mutex<Option<serde_json::Value>>,
    /// The node serving the session now (changes on failover).
    pub(crate) node: Mutex<Option<Arc<NodeEntry>>>,
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    /// Frames dropped because they were older than `game.frame_budget_ms` on arrival.
    pub dropped_late: AtomicU64,
    /// Frames dropped because the session was over its in-flight budget, or abandoned because
    /// they were not delivered by their deadline.
    pub dropped_overload: AtomicU64,
    /// Frames shed because the gateway was overloaded and they had waited too long on their way
    /// in (`game.overload_queue_budget_ms`).
    pub dropped_shed: AtomicU64,
    /// Frames for this session that came from a connection other than its serving node's.
    pub dropped_foreign: AtomicU64,
    /// Frames lost to a stream or connection error.
    pub dropped_relay: AtomicU64,
    /// Audio packets forwarded to the player.
    pub audio_packets: AtomicU64,
    /// Audio datagrams naming this session that came from a connection other than its serving
    /// node's.
    pub audio_foreign: AtomicU64,
    /// Audio packets the player's connection or channel could not take.
    pub audio_dropped: AtomicU64,
    pub inputs: AtomicU64,
    /// The codec of the session (for the checker: whether the node encodes it in hardware).
    pub codec: nearpath_protocol::message::VideoCodec,
    /// Pixels per frame at the size in force (width x height), for the checker's encode count.
    pub video_pixels: AtomicU64,
    pub started: Instant,
    pub game: String,
    pub tenant: String,
    /// Frames and bytes on their way to the client now.
    pub(crate) in_flight: Mutex<InFlight>,
    /// The session driver's event queue, for keyframe requests after a drop. Weak, so that the
    /// relay (which outlives the front end in the session table) never keeps the queue open.
    pub(crate) events: mpsc::WeakSender<ClientEvent>,
    /// When the relay last asked for a keyframe (ms since `started`, plus one; 0 = never).
    pub(crate) last_keyframe_request: AtomicU64,
}

/// Where a new relay's session comes from: what [`Relay::new`] takes besides the session, its
/// sink, node, parameters and events.
pub struct RelayOrigin {
    /// The client's address, for the admin view (empty for a checker's probe).
    pub client_addr: String,
    /// `quic`, `webrtc`, `webtransport`, or `probe`.
    pub transport: &'static str,
    /// The key's tenant.
    pub tenant: String,
    pub started: Instant,
}

impl Relay {
    /// A relay with every counter at zero, served by `node` at `params`.
    pub(crate) fn new(
        session: SessionId,
        sink: FrameSink,
        node: Arc<NodeEntry>,
        params: &GameParams,
        events: mpsc::WeakSender<ClientEvent>,
        origin: RelayOrigin,
    ) -> Relay {
        Relay {
            session_id: session.get(),
            _session: session,
            sink,
            client_addr: origin.client_addr,
            transport: origin.transport,
            client_stats: Mutex::new(None),
            node: Mutex::new(Some(node)),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped_late: AtomicU64::new(0),
            dropped_overload: AtomicU64::new(0),
            dropped_shed: AtomicU64::new(0),
            dropped_foreign: AtomicU64::new(0),
            dropped_relay: AtomicU64::new(0),
            audio_packets: AtomicU64::new(0),
            audio_foreign: AtomicU64::new(0),
            audio_dropped: AtomicU64::new(0),
            inputs: AtomicU64::new(0),
            codec: params.codec,
            video_pixels: AtomicU64::new(u64::from(params.width) * u64::from(params.height)),
            started: origin.started,
            game: params.title.clone(),
            tenant: origin.tenant,
            in_flight: Mutex::new(InFlight::default()),
            events,
            last_keyframe_request: AtomicU64::new(0),
        }
    }
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
    /// Shed while the gateway was overloaded: it had waited longer on its way in than the
    /// overload queue budget allows.
    Shed,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Late => "late",
            DropReason::Overload => "overload",
            DropReason::Foreign => "foreign",
            DropReason::Relay => "relay",
            DropReason::Shed => "shed",
        }
    }
}

/// Keyframe requests the relay makes after dropping frames come at most this often; the
/// encoder needs a moment to produce one, and an IDR is several P frames' worth of bytes.
pub(crate) const KEYFRAME_REQUEST_INTERVAL_MS: u64 = 300;
/// Allowance for the client's delayed acknowledgement (QUIC's default `max_ack_delay`) when
/// waiting for a frame to be acknowledged.
pub(crate) const ACK_DELAY_ALLOWANCE: Duration = Duration::from_millis(25);

/// Frames and bytes one session has on their way to its client.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub frames: u32,
    pub bytes: u64,
}

/// One window of an [`AgeFloor`], in microseconds.
pub const AGE_FLOOR_WINDOW_US: u64 = 2_000_000;

/// The least age (capture to header read) a node's frames have had lately: its path and encode
/// delay plus any offset between its clock and ours, with no queueing in it. Frame ages above it
/// are time spent waiting, on the path or in the gateway's own receive queue. It is kept per node
/// connection (what it measures is the node's), so that a session starting on a known node is
/// judged against the node's floor from its first frame, even when it starts during overload.
///
/// It is the minimum over the current window and the one before (so a path that became slower
/// is followed within two windows), and windows only turn while the gateway is not overloaded:
/// under overload every frame waits in the gateway's queue, and a floor learnt then would rise
/// with the queue it is meant to measure the queue against.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AgeFloor {
    window_start_us: u64,
    current: Option<u64>,
    previous: Option<u64>,
}

impl AgeFloor {
    /// Takes the age of a frame whose header was read at `now_us`; windows turn only when
    /// `may_turn` (the gateway is not overloaded).
    pub fn observe(&mut self, now_us: u64, age_us: u64, may_turn: bool) {
        if self.current.is_none() && self.previous.is_none() {
            self.window_start_us = now_us;
        }
        let elapsed = now_us.saturating_sub(self.window_start_us);
        if may_turn && elapsed >= AGE_FLOOR_WINDOW_US {
            // After a silence of two windows or more the previous window is too old to keep.
            self.previous = if elapsed >= 2 * AGE_FLOOR_WINDOW_US {
                None
            } else {
                self.current
            };
            self.current = None;
            self.window_start_us = now_us;
        }
        self.current = Some(self.current.map_or(age_us, |m| m.min(age_us)));
    }

    /// The floor, once a frame has been seen.
    pub fn floor(&self) -> Option<u64> {
        match (self.current, self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
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
    /// While the gateway is overloaded: the most a frame may be older than its
    /// node's [`AgeFloor`] to be forwarded (0: no shedding).
    pub overload_queue_us: u64,
}

impl FrameBudget {
    pub fn from_config(g: &nearpath_config::GameConfig) -> FrameBudget {
        FrameBudget {
            budget_us: g.frame_budget_ms.saturating_mul(1000),
            max_in_flight_bytes: g.max_in_flight_bytes,
            max_in_flight_frames: g.max_in_flight_frames,
            overload_queue_us: g.overload_queue_budget_ms.saturating_mul(1000),
        }
    }

    /// Bytes a frame counts for while in flight: what goes on the wire.
    pub fn frame_bytes(header: &FrameHeader) -> u64 {
        u64::from(header.payload_len) + FrameHeader::LEN as u64
    }

    /// Decides the fate of a frame captured at `capture_ts_us` when the relay reads its header
    /// at `now_us`, given what the session already has in flight (updated when it is forwarded),
    /// the age floor of the node that sent it, and whether the gateway is `overloaded` now.
    ///
    /// A frame is dropped, never queued: a late frame is worth less than the bandwidth it takes,
    /// and a session over its in-flight budget has a client path that is not keeping up, where a
    /// queued frame only makes every later one later. A frame is always admitted when nothing is
    /// in flight, so one frame larger than the byte budget (a big IDR) still gets through. A
    /// capture time in the future (a node's clock ahead of ours) counts as age 0: the deadline is
    /// then the full budget from now, never later.
    ///
    /// Under overload the gateway cannot relay every frame, and what it cannot relay waits in
    /// its receive queue, so every frame would arrive nearly a whole budget old and most would
    /// be dropped late after costing their full price (goodput collapse). Instead, a frame that
    /// has waited more than `overload_queue_us` beyond its node's usual age is shed at once:
    /// the work saved keeps the queue short, and what is delivered stays fresh. Measured against
    /// each node's own floor, a far node or a node whose clock is behind ours loses no more
    /// than a near one.
    pub fn admit(
        &self,
        in_flight: &mut InFlight,
        floor: &mut AgeFloor,
        overloaded: bool,
        now_us: u64,
        capture_ts_us: u64,
        bytes: u64,
    ) -> Verdict {
        let age = now_us.saturating_sub(capture_ts_us);
        floor.observe(now_us, age, !overloaded);
        if age > self.budget_us {
            return Verdict::Drop(DropReason::Late);
        }
        if overloaded && self.overload_queue_us > 0 {
            if let Some(floor) = floor.floor() {
                if age > floor.saturating_add(self.overload_queue_us) {
                    return Verdict::Drop(DropReason::Shed);
                }
            }
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
pub(crate) struct FlightSlot {
    pub(crate) relay: Arc<Relay>,
    pub(crate) bytes: u64,
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
    pub(crate) fn node(&self) -> Option<Arc<NodeEntry>> {
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

    /// Counts a frame the serving node sent (whatever becomes of it) toward the node's
    /// hardware encode throughput, when it encodes the session's codec in hardware.
    pub fn count_encoded(&self) {
        if let Some(node) = self.node() {
            if node.encodes_in_hardware(self.codec) {
                node.hw_encoded_frames.fetch_add(1, Ordering::Relaxed);
                node.hw_encoded_pixels
                    .fetch_add(self.video_pixels.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    /// Whether `conn` is the connection of the node serving the session now. During failover
    /// no node serves it, so nothing is accepted until the new node is attached. For a node
    /// another gateway holds it is the trunk connection to that gateway, which relays only the
    /// frames its own node sends for the session (`trunk::TrunkGames`).
    pub fn is_served_by(&self, conn: &quinn::Connection) -> bool {
        self.node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|n| n.conn.is_carried_by(conn))
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
            DropReason::Shed => &self.dropped_shed,
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
    pub(crate) fn set_node(&self, n: Option<Arc<NodeEntry>>) {
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = n;
    }
}

/// Live sessions by id.
#[derive(Default)]
pub struct GameRelays {
    pub(crate) map: Mutex<HashMap<u64, Arc<Relay>>>,
    /// The checker's probe sessions: their frames are relayed like any session's (so the node
    /// cannot tell them apart), but they are not listed with the players' sessions.
    pub(crate) probes: Mutex<HashMap<u64, Arc<Relay>>>,
}

impl GameRelays {
    /// The live session `id`, a player's or a probe's.
    pub fn get(&self, id: u64) -> Option<Arc<Relay>> {
        let found = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        found.or_else(|| {
            self.probes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .cloned()
        })
    }
    pub(crate) fn insert_probe(&self, r: Arc<Relay>) {
        self.probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.session_id, r);
    }
    pub(crate) fn remove_probe(&self, id: u64) {
        self.probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    pub(crate) fn insert(&self, r: Arc<Relay>) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.session_id, r);
    }
    pub(crate) fn remove(&self, id: u64) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    /// The players' sessions (never the checker's probes).
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
pub(crate) struct ForeignLog {
    /// When the last warning was written (ms since `since`, plus one; 0 = never).
    pub(crate) last: AtomicU64,
    pub(crate) suppressed: AtomicU64,
    pub(crate) since: Option<Instant>,
}

impl ForeignLog {
    pub(crate) fn new() -> ForeignLog {
        ForeignLog {
            since: Some(Instant::now()),
            ..Default::default()
        }
    }

    pub(crate) fn note(&self, node: &str, session_id: u64) {
        self.note_what(node, session_id, "video frame");
    }

    /// [`ForeignLog::note`] for an audio datagram.
    pub(crate) fn note_audio(&self, node: &str, session_id: u64) {
        self.note_what(node, session_id, "audio datagram");
    }

    fn note_what(&self, node: &str, session_id: u64, what: &str) {
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
                "refused a {what} for a session this node does not serve"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads the payload that follows an already-read frame header.
pub(crate) async fn recv_frame_rest(
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    /// One session alone on its node: its in-flight count and its node's floor.
    #[derive(Default)]
    struct Flow {
        in_flight: InFlight,
        floor: AgeFloor,
    }

    fn admit(
        b: &FrameBudget,
        f: &mut Flow,
        overloaded: bool,
        now: u64,
        cap: u64,
        n: u64,
    ) -> Verdict {
        b.admit(&mut f.in_flight, &mut f.floor, overloaded, now, cap, n)
    }

    fn budget() -> FrameBudget {
        FrameBudget {
            budget_us: 100 * MS,
            max_in_flight_bytes: 100_000,
            max_in_flight_frames: 3,
            overload_queue_us: 25 * MS,
        }
    }

    #[test]
    fn frames_are_dropped_before_forwarding_when_late_or_over_budget_never_queued() {
        let b = budget();
        let mut f = Flow::default();
        // Virtual clock: the relay reads headers at these times (us).
        let t0 = 1_000_000_000u64;
        // Fresh frame: forwarded with what is left of its budget.
        assert_eq!(
            admit(&b, &mut f, false, t0 + 30 * MS, t0, 20_000),
            Verdict::Forward {
                remaining_us: 70 * MS
            }
        );
        // Exactly at the budget is still in; a microsecond past it is late.
        assert_eq!(
            admit(&b, &mut f, false, t0 + 100 * MS, t0, 20_000),
            Verdict::Forward { remaining_us: 0 }
        );
        assert_eq!(
            admit(&b, &mut f, false, t0 + 100 * MS + 1, t0, 20_000),
            Verdict::Drop(DropReason::Late)
        );
        assert_eq!(
            f.in_flight,
            InFlight {
                frames: 2,
                bytes: 40_000
            }
        );
        // Bytes: 40 000 + 70 000 is over 100 000, so the frame is dropped, not held back.
        assert_eq!(
            admit(&b, &mut f, false, t0 + 40 * MS, t0 + 35 * MS, 70_000),
            Verdict::Drop(DropReason::Overload)
        );
        // Frames: a third fits, a fourth does not, whatever its size.
        assert!(matches!(
            admit(&b, &mut f, false, t0 + 41 * MS, t0 + 40 * MS, 10),
            Verdict::Forward { .. }
        ));
        assert_eq!(
            admit(&b, &mut f, false, t0 + 42 * MS, t0 + 41 * MS, 10),
            Verdict::Drop(DropReason::Overload)
        );
        // Delivered frames give their share back, and the next frame goes.
        FrameBudget::release(&mut f.in_flight, 20_000);
        FrameBudget::release(&mut f.in_flight, 10);
        assert_eq!(
            f.in_flight,
            InFlight {
                frames: 1,
                bytes: 20_000
            }
        );
        assert!(matches!(
            admit(&b, &mut f, false, t0 + 50 * MS, t0 + 45 * MS, 70_000),
            Verdict::Forward { .. }
        ));
        // Late beats everything else: a late frame never takes budget.
        let before = f.in_flight;
        assert_eq!(
            admit(&b, &mut f, false, t0 + 500 * MS, t0, 1),
            Verdict::Drop(DropReason::Late)
        );
        assert_eq!(f.in_flight, before);
    }

    #[test]
    fn a_frame_larger_than_the_byte_budget_passes_when_nothing_is_in_flight() {
        let b = budget();
        let mut f = Flow::default();
        assert!(matches!(
            admit(&b, &mut f, false, 10 * MS, 10 * MS, 500_000),
            Verdict::Forward { .. }
        ));
        assert_eq!(
            admit(&b, &mut f, false, 11 * MS, 11 * MS, 10),
            Verdict::Drop(DropReason::Overload)
        );
    }

    #[test]
    fn a_capture_time_in_the_future_gets_no_more_than_the_full_budget() {
        let b = budget();
        let mut f = Flow::default();
        assert_eq!(
            admit(&b, &mut f, false, 10 * MS, u64::MAX, 100),
            Verdict::Forward {
                remaining_us: 100 * MS
            }
        );
    }

    /// Regression (issue 9, item 15): at 1.5x its capacity the relay let frames wait in its
    /// receive queue until they were nearly a whole budget old, and dropped most of them late
    /// after paying for them; under overload it now sheds a frame that waited 25 ms beyond
    /// its node's usual age, and forwards the rest.
    #[test]
    fn under_overload_a_frame_queued_beyond_its_sessions_floor_is_shed() {
        let b = budget();
        let mut f = Flow::default();
        let t0 = 1_000_000_000u64;
        // A near node: its frames arrive 5 ms after capture.
        for k in 0..10 {
            let at = t0 + k * 16 * MS;
            assert!(matches!(
                admit(&b, &mut f, false, at + 5 * MS, at, 100),
                Verdict::Forward { .. }
            ));
            FrameBudget::release(&mut f.in_flight, 100);
        }
        assert_eq!(f.floor.floor(), Some(5 * MS));
        let at = t0 + 200 * MS;
        // Not overloaded: 50 ms is within the 100 ms budget.
        assert!(matches!(
            admit(&b, &mut f, false, at + 50 * MS, at, 100),
            Verdict::Forward { .. }
        ));
        FrameBudget::release(&mut f.in_flight, 100);
        // Overloaded: 5 + 25 = 30 ms is the most; 31 ms is shed, and takes no budget.
        assert!(matches!(
            admit(&b, &mut f, true, at + 30 * MS, at, 100),
            Verdict::Forward { .. }
        ));
        let held = f.in_flight;
        assert_eq!(
            admit(&b, &mut f, true, at + 31 * MS, at, 100),
            Verdict::Drop(DropReason::Shed)
        );
        assert_eq!(f.in_flight, held);
        // The absolute budget still comes first.
        assert_eq!(
            admit(&b, &mut f, true, at + 101 * MS, at, 100),
            Verdict::Drop(DropReason::Late)
        );
        // A zero overload budget never sheds.
        let lax = FrameBudget {
            overload_queue_us: 0,
            ..b
        };
        FrameBudget::release(&mut f.in_flight, 100);
        assert!(matches!(
            admit(&lax, &mut f, true, at + 90 * MS, at, 100),
            Verdict::Forward { .. }
        ));
    }

    /// A far node, or one whose clock is 60 ms behind ours, has every frame 60 ms old: under
    /// overload it loses only what waited beyond its own floor, like a near node.
    #[test]
    fn each_node_is_shed_against_its_own_floor() {
        let b = budget();
        let mut far = Flow::default();
        let t0 = 1_000_000_000u64;
        admit(&b, &mut far, false, t0 + 60 * MS, t0, 100);
        FrameBudget::release(&mut far.in_flight, 100);
        let at = t0 + 16 * MS;
        assert!(matches!(
            admit(&b, &mut far, true, at + 85 * MS, at, 100),
            Verdict::Forward { .. }
        ));
        FrameBudget::release(&mut far.in_flight, 100);
        assert_eq!(
            admit(&b, &mut far, true, at + 86 * MS, at, 100),
            Verdict::Drop(DropReason::Shed)
        );
    }

    /// A node whose first session starts during overload has no floor yet: its first frame is judged by
    /// the absolute budget alone, and sets the floor the next ones are judged by.
    #[test]
    fn a_node_first_seen_under_overload_learns_its_floor_from_its_first_frames() {
        let b = budget();
        let mut f = Flow::default();
        let t0 = 1_000_000_000u64;
        assert!(matches!(
            admit(&b, &mut f, true, t0 + 70 * MS, t0, 100),
            Verdict::Forward { .. }
        ));
        FrameBudget::release(&mut f.in_flight, 100);
        assert_eq!(f.floor.floor(), Some(70 * MS));
        // A fresher frame lowers it, even under overload (a minimum only falls).
        admit(&b, &mut f, true, t0 + 30 * MS, t0 + 20 * MS, 100);
        FrameBudget::release(&mut f.in_flight, 100);
        assert_eq!(f.floor.floor(), Some(10 * MS));
        assert_eq!(
            admit(&b, &mut f, true, t0 + 80 * MS, t0 + 40 * MS, 100),
            Verdict::Drop(DropReason::Shed)
        );
    }

    /// The floor must not rise with the queue it measures: while overloaded its windows do not
    /// turn, however long the overload lasts. Once the overload is over, a path that really
    /// became slower is followed within two windows.
    #[test]
    fn the_floor_holds_under_overload_and_follows_a_slower_path_after_it() {
        let mut floor = AgeFloor::default();
        let t0 = 1_000_000_000u64;
        floor.observe(t0, 5 * MS, true);
        // Ten seconds of overload, every frame 40 ms old.
        for k in 1..=600u64 {
            floor.observe(t0 + k * 16 * MS, 40 * MS, false);
        }
        assert_eq!(floor.floor(), Some(5 * MS));
        // The overload ends; the path now takes 40 ms. The first turn keeps 5 ms as the
        // previous window's; the second forgets it.
        let t1 = t0 + 10_000 * MS;
        let mut last = None;
        for k in 0..=300u64 {
            let at = t1 + k * 16 * MS;
            floor.observe(at, 40 * MS, true);
            if floor.floor() == Some(40 * MS) {
                last = Some(at - t1);
                break;
            }
        }
        let took = last.expect("the floor never followed the slower path");
        assert!(took <= 2 * AGE_FLOOR_WINDOW_US, "{took} us");
        // After a silence of two windows the old floor is gone at once.
        let mut quiet = AgeFloor::default();
        quiet.observe(t0, 5 * MS, true);
        quiet.observe(t0 + 2 * AGE_FLOOR_WINDOW_US, 40 * MS, true);
        assert_eq!(quiet.floor(), Some(40 * MS));
    }
}
