//! Browser players over WebRTC, signalled with WHEP (draft-ietf-wish-whep), and the player page.
//!
//! ```text
//!  browser --POST /v1/games/{title}/whep (SDP offer)--> gateway: route like a native session,
//!          <--201, SDP answer, Location: /v1/sessions/{id}, Link: <stun:…>; rel="ice-server"
//!  browser <==DTLS-SRTP: one H.264 video track (RTP packetised here from the node's access units)
//!  browser <==SCTP data channel "input"==> gateway: input in (JSON), frame/notice messages out
//!          --PATCH /v1/sessions/{id} (trickle-ice-sdpfrag)--> more candidates
//!          --DELETE /v1/sessions/{id}--> the node's session ends
//! ```
//!
//! The gateway never encodes: the node's H.264 access units (Annex B, Constrained Baseline) are
//! packetised (RFC 6184, packetization-mode 1, 1200-byte packets) and written to a send-only
//! video track. RTP timestamps follow the gateway's receive clock (90 kHz since the first frame),
//! so the gap of a failover shows as a gap in time rather than as a burst the browser's jitter
//! buffer would have to absorb. The payload type is the negotiated one (read from the sender's
//! parameters once the connection is up; Chromium may answer 108 for a codec registered as 102).
//!
//! # Signalling (WHEP)
//! * `POST /v1/games/{title}/whep` with `Authorization: Bearer <key>`, `Content-Type:
//!   application/sdp` and an offer holding a `recvonly` video section with H.264 (profile
//!   `42e0xx`, packetization-mode 1) and, for input, a data channel labelled `input`. Optional
//!   query: `width`, `height`, `fps`, `bitrate_kbps` (clamped/validated like native sessions).
//!   The answer is sent once ICE gathering is complete (host candidates only, so this takes
//!   milliseconds): `201 Created`, `Content-Type: application/sdp`, `Location:
//!   /v1/sessions/{id}`, one `Link: <uri>; rel="ice-server"` per `game.ice_servers` entry.
//!   Errors (OpenAI-shaped JSON bodies): 400 bad offer or parameters, 401 bad key, 403 geofence
//!   (`x-should-retry: false`, the body names the rule), 404 unknown game, 413 body too large,
//!   415 wrong content type, 503 no capacity (`Retry-After`).
//! * `PATCH /v1/sessions/{id}` with `application/trickle-ice-sdpfrag`: the candidates are
//!   applied (204). mDNS (`.local`) candidates are skipped: the gateway does not resolve them,
//!   and browsers reach it anyway (their checks arrive as peer-reflexive candidates). An ICE
//!   restart (new `ice-ufrag`/`ice-pwd`, or `If-Match: *`) is not supported: 422.
//! * `DELETE /v1/sessions/{id}` ends the session (200); the node's session ends with it.
//! * `POST /v1/sessions/{id}/stats` (JSON object, at most 64 KiB): the page's statistics,
//!   shown by the admin API's `GET /admin/sessions` as `client_stats` (with a `gateway` member
//!   added: what this side counted).
//! * CORS: the WHEP and session resources answer `OPTIONS` preflights and carry
//!   `Access-Control-Allow-Origin` for the origins in `http.cors_allowed_origins` (`"*"` allows
//!   any), exposing `Location`, `Link` and `x-request-id`.
//! * `GET /play`: the player page (plain HTML and JavaScript, no build step). With `gateway
//!   demo` the key field is prefilled with the demo key.
//!
//! Session resources (`/v1/sessions/{id}`) answer only to a key of the tenant that created them;
//! anything else gets 404.
//!
//! # Lifetime
//! A session ends on `DELETE`, when the game ends on the node, on gateway shutdown, and when the
//! browser goes away: the peer connection fails or closes (at once), stays disconnected for
//! `game.player_idle_timeout_ms` (2.5 s), the page's pings on the `input` channel stop for that
//! long (the `/play` page pings every second; a page that never pinged is judged by ICE
//! alone, so a killed browser is noticed in ~2.5 s with the page and ~8 s without), or never
//! connects (ICE and DTLS) within `game.webrtc_connect_timeout_ms` (10 s) of the
//! answer, which releases its node slot and its key's session cap. A failover is not an end: the relay moves the
//! session to another node and the same peer connection carries its frames (from an IDR).
//!
//! # Data channel `input` (JSON text messages)
//! Page to gateway; every input carries a `seq` that increases by one per input message (the node
//! applies an event only if its seq is above the last applied one) and `ts`, the page's send time
//! in Unix milliseconds (fractional):
//! ```text
//! {"t":"key","seq":1,"ts":1718000000000.5,"code":87,"down":true}        KeyboardEvent.keyCode
//! {"t":"mouse","seq":2,"ts":…,"dx":-3,"dy":4}                            relative motion, pixels
//! {"t":"button","seq":3,"ts":…,"button":0,"down":true}                   0 left, 1 middle, 2 right
//! {"t":"wheel","seq":4,"ts":…,"dx":0,"dy":-120}                          notches x 120, + is up
//! {"t":"pad","seq":5,"ts":…,"axes":[0.0,-1.0,0.0,0.0],"buttons":1}      sticks -1..1, button bits
//! {"t":"keyframe"}                                                       ask for an IDR
//! {"t":"ping","id":7,"ts":…}                                             answered with a pong
//! ```
//! The `/play` page pings every second. Once a page has pinged, a channel silent for
//! `game.player_idle_timeout_ms` means the player is gone (outcome `client_gone`).
//! Gateway to page:
//! ```text
//! {"t":"frame","seq":…,"input_seq":…,"capture_ts_us":…,"encode_us":…,"gw_us":…,"rtp_ts":…,"key":false}
//! {"t":"pong","id":7,"ts":…,"gw_us":…}
//! {"t":"paused","reason":"node de-1 failed; moving the session"}   then {"t":"resumed"}
//! {"t":"ended","reason":"…"}
//! {"t":"rate","kbps":8000}                                          the encoder's new target
//! ```
//! `frame` is sent right after the frame's RTP packets: `rtp_ts` is the frame's RTP timestamp
//! (what `requestVideoFrameCallback` reports as `rtpTimestamp`), `input_seq` the last input the
//! node applied before capturing it, `capture_ts_us`/`gw_us` the node's capture and the
//! gateway's receive time (Unix microseconds), so the page can measure input-to-photon latency
//! and break it down.
//!
//! # Congestion and keyframes
//! RTCP reaches the application only through an interceptor that marks packets for delivery: a
//! small one here lets PLI, FIR and REMB through. PLI/FIR become keyframe requests to the node
//! (at most one per 300 ms). The answer negotiates `goog-remb` (and the abs-send-time header
//! extension) but not transport-cc, so Chromium runs its receive-side estimator and reports
//! REMB; the encoder's bitrate follows it: 95% of the estimate, between 300 kbit/s and the
//! session's bitrate; an estimate below the target lowers it only when it is also below what
//! the track sent in the last second (a receive-side estimate cannot exceed ~1.5x what arrives,
//! so an encoder under its target would otherwise be talked down step by step); changes under
//! 5% are ignored, at most two per second, none in the first 6 s (Chromium reports its start
//! value until it has measured the incoming rate for 5 s). NACKs are answered from a send
//! history. The `playout-delay` header extension (min = max = 0), when the browser offers it,
//! puts Chromium on its low-latency rendering path (each frame rendered as soon as decoded).
//!
//! # Sockets
//! Each session binds its own UDP port: one from `game.webrtc_udp_port_min..=max` when set (a
//! free one, leased for the session's lifetime; the range bounds the number of concurrent
//! sessions), else an ephemeral one. It is bound on every non-loopback interface, plus the
//! loopback address when the player connected over loopback. `game.webrtc_public_ip` replaces
//! the address of the answer's non-loopback host candidates (1:1 NAT; see
//! [`advertise_public_ip`]). mDNS is off: a server has no use for it.
//!
//! # H.264 level
//! The answer's `profile-level-id` is `42e0` followed by the level the session's size and frame
//! rate need (3.1 `1f` up to 720p30, 3.2 `20` for 720p60, 4.2 `2a` for 1080p60, 5.2 `34` for
//! 4K60; see [`h264_level`]). Matching ignores the level (RFC 6184), so a browser offering
//! `42e01f` gets the stream; Chromium's decoders do not enforce level limits.

use crate::api::client_ip;
use crate::game::{self, ClientEvent, FrameSink, Notice, Relay, StartError};
use crate::http_util::{bearer, read_body, Body, BodyError, Resp};
use crate::infer;
use crate::player::ChannelSilence;
use crate::server::Shared;
use crate::store::ApiKey;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use nearpath_protocol::message::{GameParams, PlayRequest};
use nearpath_protocol::openai::ApiError;
use nearpath_protocol::{FrameHeader, InputEvent};
use rtc::interceptor::{Attribute, Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_nack, configure_rtcp_reports,
};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtp::codec::h264::H264Payloader;
use rtc::rtp::packetizer::{new_packetizer, Packetizer};
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use serde::Deserialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceGatheringState, RTCPeerConnectionState,
    RTCSessionDescription, Registry, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::RtpSender;

/// The data channel label the page opens for input.
pub const INPUT_LABEL: &str = "input";
/// Content type of a WHEP offer and answer.
pub const SDP_CONTENT_TYPE: &str = "application/sdp";
/// Content type of a trickle ICE PATCH body.
pub const SDPFRAG_CONTENT_TYPE: &str = "application/trickle-ice-sdpfrag";
/// Largest stats document a page may post.
pub const MAX_STATS_BYTES: usize = 64 * 1024;

/// The player page, with `__NEARPATH_DEMO_KEY__` replaced when served.
const PLAY_HTML: &str = include_str!("../static/play.html");

/// Frames waiting for the session task; a full queue drops the newest frame (see
/// [`FrameSink::Channel`]).
const FRAME_QUEUE: usize = 8;
/// Host candidates gather in milliseconds; this only bounds a pathological case.
const GATHER_TIMEOUT: Duration = Duration::from_secs(3);
/// RTP packet size, leaving room for SRTP and IP/UDP headers under common path MTUs.
const RTP_MTU: usize = 1200;
/// Payload type registered for H.264; the browser's own number is what gets used.
const H264_PAYLOAD_TYPE: u8 = 102;
/// Keyframe requests closer together than this are merged (a PLI storm must not turn the
/// stream into all-IDR).
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(300);
/// Lowest bitrate REMB may push the encoder to, kbit/s.
const MIN_BITRATE_KBPS: u32 = 300;
/// REMB is ignored this long after connecting: Chromium's receive-side estimator reports its
/// start value (about 300 kbit/s) until it has measured the incoming rate for 5 s.
const REMB_WARMUP: Duration = Duration::from_secs(6);
/// Bitrate changes at most this often.
const REMB_MIN_INTERVAL: Duration = Duration::from_millis(500);
/// Largest data channel message accepted from the page.
const MAX_INPUT_MESSAGE: usize = 4096;
/// The RTP clock rate of video.
const VIDEO_CLOCK_HZ: u64 = 90_000;
/// abs-send-time header extension (lets Chromium's receive-side estimator time arrivals).
const ABS_SEND_TIME_URI: &str = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time";
/// playout-delay header extension: min = max = 0 tells Chromium to decode and render each frame
/// as soon as it is complete (its low-latency rendering path) instead of smoothing playout.
const PLAYOUT_DELAY_URI: &str = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay";
/// The extension's value for "no playout delay": 12 bits min, 12 bits max, both 0.
const PLAYOUT_DELAY_ZERO: [u8; 3] = [0, 0, 0];

static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Why a WHEP request or a session request failed. Each variant maps to one HTTP status.
#[derive(Debug, Error)]
pub enum WhepError {
    /// The client sent another content type than the resource accepts (415).
    #[error("Content-Type must be {expected}, not {got:?}")]
    UnsupportedMediaType { expected: &'static str, got: String },
    /// The key is missing or unknown (401).
    #[error("{}", .0.message)]
    Unauthorized(ApiError),
    /// The offer cannot be answered: the client's fault, retrying the same offer fails again (400).
    #[error("bad SDP offer: {reason}")]
    BadOffer { reason: String },
    /// Query or body parameters are invalid (400).
    #[error("{reason}")]
    BadRequest {
        reason: String,
        param: Option<&'static str>,
    },
    /// The body is over the limit (413).
    #[error("the request body is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// The geofence denies this client (403, not retryable).
    #[error("{message}")]
    Geofence { message: String },
    /// No node serves the title for anyone (404).
    #[error("no node serves the game {title:?}")]
    UnknownGame { title: String },
    /// Every node that could serve is busy, or none answered (503, retry later).
    #[error("{message}")]
    NoCapacity { message: String },
    /// A per-key cap refused the session: too many live sessions, or too many starts in the
    /// last minute (429 with `Retry-After`).
    #[error("{message}")]
    KeyCap {
        code: &'static str,
        message: String,
        retry_after_s: u32,
    },
    /// The usage ledger cannot commit, so no session may start (503, retry later).
    #[error("{message}")]
    LedgerUnavailable { message: String },
    /// Every UDP port of the configured range is taken (503, retry later).
    #[error("no free UDP port in {min}..={max} for WebRTC")]
    NoUdpPort { min: u16, max: u16 },
    /// No session with that id for this tenant (404).
    #[error("no session {id}")]
    NoSession { id: String },
    /// The PATCH asks for an ICE restart, which this gateway does not do (422).
    #[error("ICE restarts are not supported; start a new session")]
    IceRestartUnsupported,
    /// A fault of ours (the WebRTC stack failed), 500.
    #[error("{what}: {reason}")]
    Internal { what: &'static str, reason: String },
}

impl WhepError {
    /// The error as the API's JSON error (status, type, code, message).
    pub fn api_error(&self) -> ApiError {
        match self {
            WhepError::UnsupportedMediaType { .. } => ApiError::new(
                415,
                "invalid_request_error",
                Some("unsupported_media_type"),
                None,
                self.to_string(),
            ),
            WhepError::Unauthorized(e) => e.clone(),
            WhepError::BadOffer { .. } => ApiError::new(
                400,
                "invalid_request_error",
                Some("bad_sdp"),
                None,
                self.to_string(),
            ),
            WhepError::BadRequest { reason, param } => {
                ApiError::bad_request(reason.clone(), *param)
            }
            WhepError::TooLarge { limit } => ApiError::payload_too_large(*limit),
            WhepError::Geofence { message } => ApiError::new(
                403,
                "permission_denied",
                Some("geofence"),
                None,
                message.clone(),
            ),
            WhepError::UnknownGame { .. } => ApiError::new(
                404,
                "invalid_request_error",
                Some("game_not_found"),
                Some("title".into()),
                self.to_string(),
            ),
            WhepError::NoCapacity { .. } => ApiError::new(
                503,
                "server_error",
                Some("no_capacity"),
                None,
                self.to_string(),
            ),
            WhepError::KeyCap { code, .. } => {
                ApiError::new(429, "rate_limit_error", Some(*code), None, self.to_string())
            }
            WhepError::LedgerUnavailable { .. } => ApiError::new(
                503,
                "server_error",
                Some(infer::LEDGER_UNAVAILABLE),
                None,
                self.to_string(),
            ),
            WhepError::NoUdpPort { .. } => ApiError::new(
                503,
                "server_error",
                Some("no_capacity"),
                None,
                self.to_string(),
            ),
            WhepError::NoSession { .. } => ApiError::new(
                404,
                "invalid_request_error",
                Some("session_not_found"),
                None,
                self.to_string(),
            ),
            WhepError::IceRestartUnsupported => ApiError::new(
                422,
                "invalid_request_error",
                Some("ice_restart_unsupported"),
                None,
                self.to_string(),
            ),
            WhepError::Internal { .. } => ApiError::internal(self.to_string()),
        }
    }

    /// Seconds a client should wait before retrying, for the errors where retrying helps.
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            WhepError::NoCapacity { .. } | WhepError::NoUdpPort { .. } => Some(2),
            WhepError::KeyCap { retry_after_s, .. } => Some(*retry_after_s),
            WhepError::LedgerUnavailable { .. } => Some(1),
            _ => None,
        }
    }

    fn from_start(title: &str, e: StartError) -> WhepError {
        match e.code {
            "geofence" => WhepError::Geofence { message: e.message },
            "unknown_game" => WhepError::UnknownGame {
                title: title.to_string(),
            },
            "bad_request" => WhepError::BadRequest {
                reason: e.message,
                param: None,
            },
            "unauthorized" => WhepError::Unauthorized(ApiError::invalid_api_key()),
            code @ ("concurrency_limit_exceeded" | "rate_limit_exceeded") => WhepError::KeyCap {
                code,
                message: e.message,
                retry_after_s: e
                    .retry_after_s
                    .map_or(1, |s| u32::try_from(s).unwrap_or(u32::MAX)),
            },
            infer::LEDGER_UNAVAILABLE => WhepError::LedgerUnavailable { message: e.message },
            _ => WhepError::NoCapacity { message: e.message },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-gateway state

/// The live WebRTC sessions of one gateway.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<u64, Arc<SessionHandle>>>,
}

impl Sessions {
    fn get(&self, id: u64) -> Option<Arc<SessionHandle>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }
    fn insert(&self, h: Arc<SessionHandle>) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(h.id, h);
    }
    fn remove(&self, id: u64) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    /// Number of live WebRTC sessions.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The WebRTC sessions of the gateway that owns `shared`.
pub fn sessions(shared: &Arc<Shared>) -> Arc<Sessions> {
    shared.sessions.webrtc.clone()
}

/// What the HTTP side needs to reach a running session.
struct SessionHandle {
    id: u64,
    tenant: String,
    pc: Arc<dyn PeerConnection>,
    remote_ufrag: String,
    remote_pwd: String,
    /// Ends the session (DELETE).
    stop: CancellationToken,
    relay: Arc<Relay>,
    counters: Arc<Counters>,
}

/// What the gateway side of a session counted (merged into the admin view of the page's stats).
#[derive(Default)]
struct Counters {
    frames_sent: AtomicU64,
    frames_skipped: AtomicU64,
    rtp_packets: AtomicU64,
    keyframe_requests: AtomicU64,
    remb_kbps: AtomicU32,
    target_kbps: AtomicU32,
    inputs: AtomicU64,
    bad_messages: AtomicU64,
}

impl Counters {
    fn json(&self) -> serde_json::Value {
        let r = Ordering::Relaxed;
        serde_json::json!({
            "frames_sent": self.frames_sent.load(r),
            "frames_skipped_before_idr": self.frames_skipped.load(r),
            "rtp_packets": self.rtp_packets.load(r),
            "keyframe_requests": self.keyframe_requests.load(r),
            "remb_kbps": self.remb_kbps.load(r),
            "target_kbps": self.target_kbps.load(r),
            "inputs": self.inputs.load(r),
            "bad_messages": self.bad_messages.load(r),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// UDP port leases

/// Ports of the configured range held by live sessions of this process.
static PORTS_IN_USE: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A UDP port reserved for one session; released on drop.
struct PortLease(u16);

impl Drop for PortLease {
    fn drop(&mut self) {
        if self.0 != 0 {
            if let Some(set) = PORTS_IN_USE
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                set.remove(&self.0);
            }
        }
    }
}

/// Picks a port of `min..=max` that no session of ours holds and that binds now (another
/// process may hold it), starting at a random offset so that a just-released port is not
/// reused at once. `(0, 0)` means an ephemeral port.
fn lease_port(min: u16, max: u16, skip: &HashSet<u16>) -> Result<PortLease, WhepError> {
    if min == 0 && max == 0 {
        return Ok(PortLease(0));
    }
    let span = u32::from(max.saturating_sub(min)) + 1;
    let start = rand::random::<u32>() % span;
    let mut guard = PORTS_IN_USE.lock().unwrap_or_else(|p| p.into_inner());
    let used = guard.get_or_insert_with(HashSet::new);
    for i in 0..span {
        let port = min + ((start + i) % span) as u16;
        if used.contains(&port) || skip.contains(&port) {
            continue;
        }
        if std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            used.insert(port);
            return Ok(PortLease(port));
        }
    }
    Err(WhepError::NoUdpPort { min, max })
}

/// The addresses a session binds: every interface (the stack expands the wildcard, skipping
/// loopback) and, for a player on loopback, the loopback address too.
fn bind_addrs(client: IpAddr, port: u16) -> Vec<SocketAddr> {
    let mut out = vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)];
    match client {
        IpAddr::V4(v4) if v4.is_loopback() => {
            out.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        }
        IpAddr::V6(v6) if v6.is_loopback() => {
            out.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port))
        }
        IpAddr::V6(_) => out.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)),
        IpAddr::V4(_) => {}
    }
    out
}

// ---------------------------------------------------------------------------------------------
// SDP

// Offer checks and trickle fragments live in `crate::sdp`, which needs no webrtc-rs, so that the
// fuzz targets in `fuzz/` compile that exact code without the rest of the gateway.
use crate::sdp::is_mdns_candidate;
pub use crate::sdp::{check_offer, parse_sdpfrag, OfferSummary, SdpFrag};

/// The H.264 `level_idc` a stream of this size and rate needs (Table A-1 of the H.264 spec:
/// frame size and macroblock rate limits), as the last byte of `profile-level-id`.
pub fn h264_level(width: u32, height: u32, fps: u32) -> u8 {
    let mbs = u64::from(width.div_ceil(16)) * u64::from(height.div_ceil(16));
    let rate = mbs * u64::from(fps.max(1));
    // (level_idc, max frame size in macroblocks, max macroblocks per second)
    const LEVELS: [(u8, u64, u64); 8] = [
        (0x1f, 3_600, 108_000),     // 3.1
        (0x20, 5_120, 216_000),     // 3.2
        (0x28, 8_192, 245_760),     // 4.0
        (0x2a, 8_704, 522_240),     // 4.2
        (0x32, 22_080, 589_824),    // 5.0
        (0x33, 36_864, 983_040),    // 5.1
        (0x34, 36_864, 2_073_600),  // 5.2
        (0x3c, 139_264, 4_177_920), // 6.0
    ];
    LEVELS
        .iter()
        .find(|(_, fs, mbps)| mbs <= *fs && rate <= *mbps)
        .map(|(l, _, _)| *l)
        .unwrap_or(0x3e) // 6.2: the largest there is
}

/// Replaces the address of every non-loopback host candidate with `public` (1:1 NAT: the
/// gateway's interfaces have private addresses; browsers must be told the public one), dropping
/// the duplicates that leaves when several interfaces share the port. `webrtc` 0.21 keeps a NAT
/// 1:1 setting but does not apply it, hence this rewrite of the answer.
pub fn advertise_public_ip(sdp: &str, public: IpAddr) -> String {
    let mut seen = HashSet::new();
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        if let Some(cand) = body.strip_prefix("a=candidate:") {
            let mut f: Vec<&str> = cand.split(' ').collect();
            let host = f
                .iter()
                .position(|x| *x == "typ")
                .and_then(|i| f.get(i + 1))
                == Some(&"host");
            let rewrite =
                host && f.len() > 5 && f[4].parse::<IpAddr>().is_ok_and(|a| !a.is_loopback());
            if rewrite {
                let public = public.to_string();
                f[4] = &public;
                if !seen.insert((public.clone(), f[5].to_string(), f[2].to_string())) {
                    continue;
                }
                out.push_str("a=candidate:");
                out.push_str(&f.join(" "));
                out.push_str(&line[body.len()..]);
                continue;
            }
        }
        out.push_str(line);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Data channel messages

/// A message from the page on the `input` channel.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PageMessage {
    Key {
        seq: u64,
        ts: Option<f64>,
        code: u16,
        down: bool,
    },
    Mouse {
        seq: u64,
        ts: Option<f64>,
        dx: i32,
        dy: i32,
    },
    Button {
        seq: u64,
        ts: Option<f64>,
        button: u8,
        down: bool,
    },
    Wheel {
        seq: u64,
        ts: Option<f64>,
        dx: i16,
        dy: i16,
    },
    Pad {
        seq: u64,
        ts: Option<f64>,
        axes: Vec<f64>,
        buttons: u32,
    },
    Keyframe,
    Ping {
        id: u64,
        ts: Option<f64>,
    },
}

impl PageMessage {
    /// Parses one data channel message; `None` for anything malformed (the page's fault, ignored).
    pub fn parse(data: &[u8]) -> Option<PageMessage> {
        if data.len() > MAX_INPUT_MESSAGE {
            return None;
        }
        serde_json::from_slice(data).ok()
    }

    /// The input event, its seq and its send time (Unix µs), for the messages that are input.
    pub fn input(&self) -> Option<(u64, Option<f64>, InputEvent)> {
        let axis =
            |v: Option<&f64>| (v.copied().unwrap_or(0.0).clamp(-1.0, 1.0) * 32767.0).round() as i16;
        Some(match self {
            PageMessage::Key {
                seq,
                ts,
                code,
                down,
            } => (
                *seq,
                *ts,
                InputEvent::Key {
                    code: *code,
                    down: *down,
                },
            ),
            PageMessage::Mouse { seq, ts, dx, dy } => {
                (*seq, *ts, InputEvent::MouseMove { dx: *dx, dy: *dy })
            }
            PageMessage::Button {
                seq,
                ts,
                button,
                down,
            } => (
                *seq,
                *ts,
                InputEvent::MouseButton {
                    button: *button,
                    down: *down,
                },
            ),
            PageMessage::Wheel { seq, ts, dx, dy } => {
                (*seq, *ts, InputEvent::Wheel { dx: *dx, dy: *dy })
            }
            PageMessage::Pad {
                seq,
                ts,
                axes,
                buttons,
            } => (
                *seq,
                *ts,
                InputEvent::Gamepad {
                    axes: [
                        axis(axes.first()),
                        axis(axes.get(1)),
                        axis(axes.get(2)),
                        axis(axes.get(3)),
                    ],
                    buttons: *buttons,
                },
            ),
            PageMessage::Keyframe | PageMessage::Ping { .. } => return None,
        })
    }
}

/// JSON string literal (quotes included) for a reason text.
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn frame_message(h: &FrameHeader, gw_us: u64, rtp_ts: u32) -> String {
    format!(
        r#"{{"t":"frame","seq":{},"input_seq":{},"capture_ts_us":{},"encode_us":{},"gw_us":{},"rtp_ts":{},"key":{}}}"#,
        h.seq, h.input_seq, h.capture_ts_us, h.encode_us, gw_us, rtp_ts, h.keyframe
    )
}

// ---------------------------------------------------------------------------------------------
// Keyframe and bitrate control

/// Merges keyframe requests that come closer together than [`KEYFRAME_REQUEST_INTERVAL`].
#[derive(Debug, Default)]
struct KeyframeThrottle {
    last: Option<Instant>,
}

impl KeyframeThrottle {
    fn allow(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < KEYFRAME_REQUEST_INTERVAL)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// Turns REMB estimates into encoder bitrate changes (see the module docs).
///
/// A receive-side estimate is bounded by what the receiver sees arrive (about 1.5 times the
/// incoming rate), so an encoder that produces less than its target (a simple scene) would
/// be talked down step by step if every low estimate were obeyed. An estimate below the target
/// lowers it only when it is also below what is being sent: then the path really carries less.
#[derive(Debug)]
struct RateControl {
    cap_kbps: u32,
    current_kbps: u32,
    connected_at: Instant,
    last_change: Option<Instant>,
}

impl RateControl {
    fn new(cap_kbps: u32, connected_at: Instant) -> Self {
        RateControl {
            cap_kbps,
            current_kbps: cap_kbps,
            connected_at,
            last_change: None,
        }
    }

    /// A REMB of `bps` arrived at `now` while `sending_kbps` leave: the new target, if it
    /// should change.
    fn on_remb(&mut self, bps: f64, sending_kbps: u32, now: Instant) -> Option<u32> {
        if !bps.is_finite() || bps <= 0.0 || now.duration_since(self.connected_at) < REMB_WARMUP {
            return None;
        }
        if self
            .last_change
            .is_some_and(|t| now.duration_since(t) < REMB_MIN_INTERVAL)
        {
            return None;
        }
        let remb_kbps = bps / 1000.0;
        if remb_kbps < f64::from(self.current_kbps) && remb_kbps >= f64::from(sending_kbps) {
            // Below the target but above what the encoder uses: not congestion.
            return None;
        }
        let floor = MIN_BITRATE_KBPS.min(self.cap_kbps);
        let target = ((remb_kbps * 0.95) as u32).clamp(floor, self.cap_kbps);
        if u64::from(target.abs_diff(self.current_kbps)) * 20 < u64::from(self.current_kbps) {
            return None;
        }
        self.current_kbps = target;
        self.last_change = Some(now);
        Some(target)
    }
}

/// What the video track sent over the last second.
#[derive(Debug, Default)]
struct SendRate {
    window: VecDeque<(Instant, usize)>,
    bytes: usize,
}

impl SendRate {
    const WINDOW: Duration = Duration::from_secs(1);

    fn record(&mut self, at: Instant, bytes: usize) {
        self.window.push_back((at, bytes));
        self.bytes += bytes;
        self.expire(at);
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(t, b)) = self.window.front() {
            if now.duration_since(t) <= Self::WINDOW {
                break;
            }
            self.window.pop_front();
            self.bytes -= b;
        }
    }

    fn kbps(&mut self, now: Instant) -> u32 {
        self.expire(now);
        (self.bytes as u64 * 8 / 1000) as u32
    }
}

// ---------------------------------------------------------------------------------------------
// RTCP: the interceptor that lets feedback through to the application

/// Marks PLI, FIR and REMB for delivery to the application (the chain's terminus drops every
/// inbound RTCP packet that no interceptor vouched for). Other packets of a compound are left
/// to the interceptors that act on them.
#[derive(Default)]
struct FeedbackTap {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

fn wanted_feedback(p: &dyn rtc::rtcp::Packet) -> bool {
    let a = p.as_any();
    a.is::<PictureLossIndication>()
        || a.is::<FullIntraRequest>()
        || a.is::<ReceiverEstimatedMaximumBitrate>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for FeedbackTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        // This slot is application-most, so every interceptor that acts on RTCP (the NACK
        // responder, the report interceptors) has already seen the whole compound packet.
        if let Packet::Rtcp(packets) = &msg.message.packet {
            if packets.iter().any(|p| wanted_feedback(p.as_ref())) {
                let wanted: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                    .iter()
                    .filter(|p| wanted_feedback(p.as_ref()))
                    .cloned()
                    .collect();
                msg.message.packet = Packet::Rtcp(wanted);
                msg.message.attributes.push(Attribute::DeliverToApplication);
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write.pop_front()
    }
}

impl Interceptor for FeedbackTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// Feedback the session acts on.
#[derive(Debug)]
enum Feedback {
    KeyframeRequest,
    Remb(f64),
}

// ---------------------------------------------------------------------------------------------
// Peer connection events

enum PcEvent {
    State(RTCPeerConnectionState),
    DataChannel(Arc<dyn DataChannel>),
}

/// Forwards the driver's callbacks to the session task (callbacks run on the driver and must
/// not block it).
struct Handler {
    events: mpsc::UnboundedSender<PcEvent>,
    gathered: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.events.send(PcEvent::State(state));
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let _ = self.events.send(PcEvent::DataChannel(dc));
    }
}

// ---------------------------------------------------------------------------------------------
// Negotiation

/// A peer connection that has answered an offer.
struct Negotiated {
    pc: Arc<dyn PeerConnection>,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn RtpSender>,
    ssrc: u32,
    answer: String,
    events: mpsc::UnboundedReceiver<PcEvent>,
    port: PortLease,
}

fn h264_codec(params: &GameParams) -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "video/H264".to_string(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: format!(
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e0{:02x}",
            h264_level(params.width, params.height, params.fps)
        ),
        rtcp_feedback: vec![],
    }
}

/// Builds a peer connection for `params`, answers `offer` and waits for the host candidates.
async fn negotiate(
    shared: &Shared,
    offer: &str,
    params: &GameParams,
    client: IpAddr,
) -> Result<Negotiated, WhepError> {
    let internal = |what: &'static str| {
        move |e: rtc::shared::error::Error| WhepError::Internal {
            what,
            reason: e.to_string(),
        }
    };
    let g = &shared.config.game;
    let codec = h264_codec(params);
    let mut tried = HashSet::new();
    // A port that probed free can be taken by another process before the stack binds it; try
    // a few before giving up.
    for _ in 0..4 {
        let port = lease_port(g.webrtc_udp_port_min, g.webrtc_udp_port_max, &tried)?;
        tried.insert(port.0);
        let mut media = MediaEngine::default();
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: codec.clone(),
                    payload_type: H264_PAYLOAD_TYPE,
                },
                RtpCodecKind::Video,
            )
            .map_err(internal("registering H.264"))?;
        for (typ, parameter) in [("ccm", "fir"), ("goog-remb", "")] {
            media.register_feedback(
                RTCPFeedback {
                    typ: typ.to_string(),
                    parameter: parameter.to_string(),
                },
                RtpCodecKind::Video,
            );
        }
        for uri in [ABS_SEND_TIME_URI, PLAYOUT_DELAY_URI] {
            media
                .register_header_extension(
                    RTCRtpHeaderExtensionCapability {
                        uri: uri.to_string(),
                    },
                    RtpCodecKind::Video,
                    None,
                )
                .map_err(internal("registering a header extension"))?;
        }
        let registry = configure_rtcp_reports(configure_nack(Registry::new(), &mut media))
            .with(Slot::from(12_500), FeedbackTap::default());
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (gathered_tx, mut gathered_rx) = watch::channel(false);
        let built = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::default().build())
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings.build())
            .with_handler(Arc::new(Handler {
                events: events_tx,
                gathered: gathered_tx,
            }))
            .with_udp_addrs(bind_addrs(client, port.0))
            .build()
            .await;
        let pc: Arc<dyn PeerConnection> = match built {
            Ok(pc) => Arc::new(pc),
            Err(e) if port.0 != 0 => {
                warn!(port = port.0, error = %e, "WebRTC sockets did not bind; trying another port");
                continue;
            }
            Err(e) => return Err(internal("starting a peer connection")(e)),
        };
        let result = async {
            let ssrc = rand::random::<u32>();
            let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                "nearpath".to_string(),
                "video".to_string(),
                "game".to_string(),
                RtpCodecKind::Video,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: codec.clone(),
                    ..Default::default()
                }],
            )));
            let sender = pc
                .add_track(track.clone() as Arc<dyn TrackLocal>)
                .await
                .map_err(internal("adding the video track"))?;
            let desc = RTCSessionDescription::offer(offer.to_string()).map_err(|e| {
                WhepError::BadOffer {
                    reason: e.to_string(),
                }
            })?;
            pc.set_remote_description(desc)
                .await
                .map_err(|e| WhepError::BadOffer {
                    reason: e.to_string(),
                })?;
            let answer = pc
                .create_answer(None)
                .await
                .map_err(|e| WhepError::BadOffer {
                    reason: e.to_string(),
                })?;
            pc.set_local_description(answer)
                .await
                .map_err(|e| WhepError::BadOffer {
                    reason: e.to_string(),
                })?;
            // Host candidates only: gathering completes in milliseconds; the bound keeps a broken
            // stack from holding the request.
            let _ = tokio::time::timeout(GATHER_TIMEOUT, gathered_rx.wait_for(|done| *done)).await;
            let mut answer = pc
                .local_description()
                .await
                .ok_or_else(|| WhepError::Internal {
                    what: "answering",
                    reason: "no local description".into(),
                })?
                .sdp;
            if let Some(ip) = g.webrtc_public_ip {
                answer = advertise_public_ip(&answer, ip);
            }
            Ok::<_, WhepError>((track, sender, ssrc, answer))
        }
        .await;
        return match result {
            Ok((track, sender, ssrc, answer)) => Ok(Negotiated {
                pc,
                track,
                sender,
                ssrc,
                answer,
                events: events_rx,
                port,
            }),
            Err(e) => {
                let _ = pc.close().await;
                Err(e)
            }
        };
    }
    Err(WhepError::NoUdpPort {
        min: g.webrtc_udp_port_min,
        max: g.webrtc_udp_port_max,
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// Whether `path` is one of this module's resources.
pub fn is_webrtc_path(path: &str) -> bool {
    path == "/play" || path.starts_with("/v1/sessions/") || whep_title(path).is_some()
}

fn whep_title(path: &str) -> Option<&str> {
    let title = path.strip_prefix("/v1/games/")?.strip_suffix("/whep")?;
    (!title.is_empty() && !title.contains('/')).then_some(title)
}

/// `/v1/sessions/{id}` and `/v1/sessions/{id}/stats`.
fn session_path(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/v1/sessions/")?;
    match rest.split_once('/') {
        None => Some((rest, false)),
        Some((id, "stats")) => Some((id, true)),
        Some(_) => None,
    }
}

fn error_response(e: &WhepError) -> Resp {
    let api = e.api_error();
    let mut r = Response::new(Body::from_bytes(api.body()));
    *r.status_mut() = StatusCode::from_u16(api.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if !api.should_retry() {
        h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
    }
    if let Some(s) = e.retry_after_s() {
        h.insert(hyper::header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

/// The `Access-Control-Allow-Origin` value for a request's `Origin`, if CORS allows it.
fn cors_origin(shared: &Shared, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(hyper::header::ORIGIN)?;
    let allowed = &shared.config.http.cors_allowed_origins;
    if allowed.iter().any(|o| o == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let o = origin.to_str().ok()?;
    allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(o))
        .then(|| origin.clone())
}

fn add_cors(r: &mut Resp, origin: Option<HeaderValue>) {
    let Some(origin) = origin else { return };
    let h = r.headers_mut();
    let specific = origin != "*";
    h.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        hyper::header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, Link, ETag, Retry-After, x-request-id"),
    );
    if specific {
        h.append(hyper::header::VARY, HeaderValue::from_static("Origin"));
    }
}

fn preflight(shared: &Shared, headers: &HeaderMap, methods: &'static str) -> Resp {
    let mut r = empty(StatusCode::NO_CONTENT);
    let origin = cors_origin(shared, headers);
    let allowed = origin.is_some();
    add_cors(&mut r, origin);
    let h = r.headers_mut();
    h.insert(hyper::header::ALLOW, HeaderValue::from_static(methods));
    if allowed {
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, if-match, x-request-id"),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    if methods.starts_with("POST") {
        h.insert(
            HeaderName::from_static("accept-post"),
            HeaderValue::from_static(SDP_CONTENT_TYPE),
        );
    }
    r
}

fn content_type_is(headers: &HeaderMap, expected: &'static str) -> Result<(), WhepError> {
    let got = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = got.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(WhepError::UnsupportedMediaType {
            expected,
            got: got.to_string(),
        })
    }
}

async fn body_text(req: Request<Incoming>, limit: usize) -> Result<String, WhepError> {
    match read_body(req.into_body(), limit).await {
        Ok(b) => String::from_utf8(b.to_vec()).map_err(|_| WhepError::BadRequest {
            reason: "the body is not UTF-8".into(),
            param: None,
        }),
        Err(BodyError::TooLarge { limit }) => Err(WhepError::TooLarge { limit }),
        Err(BodyError::Read(m)) => Err(WhepError::BadRequest {
            reason: m,
            param: None,
        }),
    }
}

async fn authenticate(shared: &Arc<Shared>, req: &Request<Incoming>) -> Result<ApiKey, WhepError> {
    infer::authenticate(shared, bearer(req))
        .await
        .map_err(WhepError::Unauthorized)
}

/// Serves this module's resources (see the module docs).
pub async fn handle(shared: &Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let origin = cors_origin(shared, req.headers());
    if path == "/play" {
        return match method {
            Method::GET | Method::HEAD => play_page(shared),
            m => method_not_allowed(&m, &path, "GET, HEAD"),
        };
    }
    let mut resp = if let Some(title) = whep_title(&path) {
        let title = title.to_string();
        match method {
            Method::OPTIONS => return preflight(shared, req.headers(), "POST, OPTIONS"),
            Method::POST => match whep_post(shared, req, peer, &title).await {
                Ok(r) => r,
                Err(e) => error_response(&e),
            },
            m => method_not_allowed(&m, &path, "POST, OPTIONS"),
        }
    } else if let Some((id, stats)) = session_path(&path) {
        let id = id.to_string();
        let allowed = if stats {
            "POST, OPTIONS"
        } else {
            "PATCH, DELETE, OPTIONS"
        };
        let r = match (method, stats) {
            (Method::OPTIONS, _) => return preflight(shared, req.headers(), allowed),
            (Method::PATCH, false) => session_patch(shared, req, &id).await,
            (Method::DELETE, false) => session_delete(shared, req, &id).await,
            (Method::POST, true) => session_stats(shared, req, &id).await,
            (m, _) => Ok(method_not_allowed(&m, &path, allowed)),
        };
        r.unwrap_or_else(|e| error_response(&e))
    } else {
        error_response(&WhepError::NoSession { id: path.clone() })
    };
    add_cors(&mut resp, origin);
    resp
}

fn method_not_allowed(m: &Method, path: &str, allowed: &'static str) -> Resp {
    let api = ApiError::method_not_allowed(m.as_str(), path);
    let mut r = Response::new(Body::from_bytes(api.body()));
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allowed));
    r
}

fn play_page(shared: &Shared) -> Resp {
    // Only the demo prefills a key (see `Gateway::prefill_play_key`).
    let key = shared.play_prefill_key.as_deref().unwrap_or("");
    let html = PLAY_HTML.replace("__NEARPATH_DEMO_KEY__", key);
    let mut r = Response::new(Body::from_bytes(html));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Reads `width`, `height`, `fps`, `bitrate_kbps` from the query (absent: the defaults).
pub fn play_request(title: &str, query: Option<&str>) -> Result<PlayRequest, WhepError> {
    let mut r = PlayRequest {
        protocol_version: nearpath_protocol::PROTOCOL_VERSION,
        api_key: String::new(),
        game: title.to_string(),
        width: 0,
        height: 0,
        fps: 0,
        bitrate_kbps: 0,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (slot, name): (&mut u32, &'static str) = match k {
            "width" => (&mut r.width, "width"),
            "height" => (&mut r.height, "height"),
            "fps" => (&mut r.fps, "fps"),
            "bitrate_kbps" => (&mut r.bitrate_kbps, "bitrate_kbps"),
            _ => continue,
        };
        *slot = v.parse().map_err(|_| WhepError::BadRequest {
            reason: format!("{name} must be a non-negative integer, not {v:?}"),
            param: Some(name),
        })?;
    }
    Ok(r)
}

async fn whep_post(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
    title: &str,
) -> Result<Resp, WhepError> {
    let key = authenticate(shared, &req).await?;
    content_type_is(req.headers(), SDP_CONTENT_TYPE)?;
    let play = play_request(title, req.uri().query())?;
    let params = game::session_params(shared, &play).map_err(|reason| WhepError::BadRequest {
        reason,
        param: None,
    })?;
    let client = client_ip(shared, peer.ip(), req.headers());
    let location = client.locate(&shared.placement.geo);
    // Sockets are bound for the address packets will come from; with an unknown forwarded
    // address that is best guessed by the proxy's own.
    let ip = client.ip().unwrap_or(peer.ip());
    let offer = body_text(req, shared.config.http.max_body_bytes as usize).await?;
    let summary = check_offer(&offer).map_err(|reason| WhepError::BadOffer { reason })?;
    // Route first: a refused client (geofence, no capacity) then costs no sockets. Frames that
    // arrive before the browser is connected are dropped, and a keyframe is asked for then.
    let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
    let started = game::start_session(
        shared,
        &key,
        location,
        client.to_string(),
        "webrtc",
        params.clone(),
        FrameSink::Channel(frames_tx),
    )
    .await
    .map_err(|e| WhepError::from_start(title, e))?;
    let negotiated = match negotiate(shared, &offer, &params, ip).await {
        Ok(n) => n,
        Err(e) => {
            let _ = started
                .events
                .send(ClientEvent::Close(format!(
                    "WebRTC negotiation failed: {e}"
                )))
                .await;
            return Err(e);
        }
    };
    let id = started.session_id;
    let counters = Arc::new(Counters::default());
    counters
        .target_kbps
        .store(params.bitrate_kbps, Ordering::Relaxed);
    let handle = Arc::new(SessionHandle {
        id,
        tenant: key.tenant.clone(),
        pc: negotiated.pc.clone(),
        remote_ufrag: summary.ice_ufrag.clone(),
        remote_pwd: summary.ice_pwd.clone(),
        stop: CancellationToken::new(),
        relay: started.relay.clone(),
        counters: counters.clone(),
    });
    let state = sessions(shared);
    state.insert(handle.clone());
    let answer = negotiated.answer.clone();
    info!(session = id, game = %params.title, client = %client, data_channel = summary.has_data_channel, "WHEP session answered");
    let span = info_span!("webrtc_session", id, game = %params.title);
    tokio::spawn(
        run_session(
            shared.clone(),
            state,
            handle,
            negotiated,
            started,
            frames_rx,
            params,
        )
        .instrument(span),
    );

    let mut r = Response::new(Body::from_bytes(answer));
    *r.status_mut() = StatusCode::CREATED;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(SDP_CONTENT_TYPE));
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/sessions/{id}")) {
        h.insert(hyper::header::LOCATION, v);
    }
    for uri in &shared.config.game.ice_servers {
        if let Ok(v) = HeaderValue::from_str(&format!("<{uri}>; rel=\"ice-server\"")) {
            h.append(hyper::header::LINK, v);
        }
    }
    Ok(r)
}

/// The session `id` names, if it exists and belongs to the key's tenant.
async fn owned_session(
    shared: &Arc<Shared>,
    req: &Request<Incoming>,
    id: &str,
) -> Result<Arc<SessionHandle>, WhepError> {
    let key = authenticate(shared, req).await?;
    let none = || WhepError::NoSession { id: id.to_string() };
    let n: u64 = id.parse().map_err(|_| none())?;
    let h = sessions(shared).get(n).ok_or_else(none)?;
    // Another tenant's session is reported as absent, not as forbidden: ids are sequential.
    if h.tenant != key.tenant {
        return Err(none());
    }
    Ok(h)
}

async fn session_patch(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    id: &str,
) -> Result<Resp, WhepError> {
    let h = owned_session(shared, &req, id).await?;
    content_type_is(req.headers(), SDPFRAG_CONTENT_TYPE)?;
    let restart = req
        .headers()
        .get(hyper::header::IF_MATCH)
        .is_some_and(|v| v.as_bytes() == b"*");
    let body = body_text(req, shared.config.http.max_body_bytes as usize).await?;
    let frag = parse_sdpfrag(&body).map_err(|reason| WhepError::BadRequest {
        reason,
        param: None,
    })?;
    let changed = frag
        .ice_ufrag
        .as_ref()
        .is_some_and(|u| *u != h.remote_ufrag)
        || frag.ice_pwd.as_ref().is_some_and(|p| *p != h.remote_pwd);
    if restart || changed {
        return Err(WhepError::IceRestartUnsupported);
    }
    let mut applied = 0;
    for c in &frag.candidates {
        if is_mdns_candidate(c) {
            continue;
        }
        let init = RTCIceCandidateInit {
            candidate: c.clone(),
            sdp_mid: frag.mid.clone(),
            sdp_mline_index: Some(0),
            username_fragment: Some(h.remote_ufrag.clone()),
            ..Default::default()
        };
        h.pc.add_ice_candidate(init)
            .await
            .map_err(|e| WhepError::BadRequest {
                reason: format!("candidate {c:?}: {e}"),
                param: None,
            })?;
        applied += 1;
    }
    debug!(session = h.id, applied, "trickled candidates applied");
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn session_delete(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    id: &str,
) -> Result<Resp, WhepError> {
    let h = owned_session(shared, &req, id).await?;
    info!(session = h.id, "WHEP session deleted by the client");
    h.stop.cancel();
    Ok(empty(StatusCode::OK))
}

async fn session_stats(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    id: &str,
) -> Result<Resp, WhepError> {
    let h = owned_session(shared, &req, id).await?;
    content_type_is(req.headers(), "application/json")?;
    let body = body_text(req, MAX_STATS_BYTES).await?;
    let mut v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| WhepError::BadRequest {
            reason: format!("stats must be JSON: {e}"),
            param: None,
        })?;
    let Some(obj) = v.as_object_mut() else {
        return Err(WhepError::BadRequest {
            reason: "stats must be a JSON object".into(),
            param: None,
        });
    };
    obj.insert("gateway".into(), h.counters.json());
    *h.relay
        .client_stats
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(v);
    Ok(empty(StatusCode::NO_CONTENT))
}

// ---------------------------------------------------------------------------------------------
// The session task

/// The video sender once the connection is up.
struct Video {
    track: Arc<TrackLocalStaticRTP>,
    packetizer: Box<dyn Packetizer>,
    /// RTP timestamp origin: the gateway's receive clock maps to 90 kHz from here.
    epoch: Instant,
    ts_base: u32,
    waiting_for_idr: bool,
    /// Negotiated id of the playout-delay extension, if the browser offered it.
    playout_delay_id: Option<u8>,
    /// Negotiated id of abs-send-time. Set on every packet: Chromium's receive-side estimator
    /// skips packets without it and would measure only a fraction of the rate (the packetizer's
    /// own option marks only a frame's last packet).
    abs_send_time_id: Option<u8>,
}

impl Video {
    /// Packetises one access unit and writes it; returns its RTP timestamp.
    async fn send(
        &mut self,
        payload: &Bytes,
        at: Instant,
        counters: &Counters,
    ) -> Result<u32, String> {
        let ticks = at.duration_since(self.epoch).as_micros() as u64 * VIDEO_CLOCK_HZ / 1_000_000;
        let ts = self.ts_base.wrapping_add(ticks as u32);
        let packets = self
            .packetizer
            .packetize(at, payload, 0)
            .map_err(|e| e.to_string())?;
        counters
            .rtp_packets
            .fetch_add(packets.len() as u64, Ordering::Relaxed);
        for mut p in packets {
            p.header.timestamp = ts;
            if let Some(id) = self.playout_delay_id {
                p.header
                    .set_extension(id, Bytes::from_static(&PLAYOUT_DELAY_ZERO))
                    .map_err(|e| e.to_string())?;
            }
            if let Some(id) = self.abs_send_time_id {
                p.header
                    .set_extension(id, abs_send_time())
                    .map_err(|e| e.to_string())?;
            }
            self.track.write_rtp(p).await.map_err(|e| e.to_string())?;
        }
        Ok(ts)
    }
}

/// The abs-send-time value for now: NTP time, 6.18 fixed-point seconds (24 bits).
fn abs_send_time() -> Bytes {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let v = rtc::shared::time::SystemInstant::unix2ntp(since_epoch) >> 14;
    Bytes::copy_from_slice(&[(v >> 16) as u8, (v >> 8) as u8, v as u8])
}

async fn start_video(n: &Negotiated) -> Result<Video, String> {
    let params = n.sender.get_parameters().await.map_err(|e| e.to_string())?;
    let pt = params
        .rtp_parameters
        .codecs
        .first()
        .map(|c| c.payload_type)
        .ok_or_else(|| "the sender has no negotiated codec".to_string())?;
    let packetizer = new_packetizer(
        Instant::now(),
        RTP_MTU,
        pt,
        n.ssrc,
        Box::new(H264Payloader::default()),
        Box::new(rtc::rtp::sequence::new_random_sequencer()),
        VIDEO_CLOCK_HZ as u32,
    );
    let ext_id = |uri: &str| {
        params
            .rtp_parameters
            .header_extensions
            .iter()
            .find(|e| e.uri == uri)
            .and_then(|e| u8::try_from(e.id).ok())
    };
    let playout_delay_id = ext_id(PLAYOUT_DELAY_URI);
    let abs_send_time_id = ext_id(ABS_SEND_TIME_URI);
    debug!(
        payload_type = pt,
        ssrc = n.ssrc,
        ?playout_delay_id,
        ?abs_send_time_id,
        "video sender ready"
    );
    Ok(Video {
        track: n.track.clone(),
        packetizer: Box::new(packetizer),
        epoch: Instant::now(),
        ts_base: rand::random(),
        waiting_for_idr: true,
        playout_delay_id,
        abs_send_time_id,
    })
}

/// Sends a text message if the channel exists; a page without it simply misses it.
async fn tell(dc: &Option<Arc<dyn DataChannel>>, msg: &str) {
    if let Some(dc) = dc {
        if let Err(e) = dc.try_send_text(msg).await {
            debug!(error = %e, "data channel message not sent");
        }
    }
}

/// Reads the page's messages: input goes straight to the node, the rest to the session task.
///
/// A page that has pinged once is expected to keep pinging (the `/play` page does, every
/// second): when nothing arrives for `idle`, the player is gone and the session ends
/// ([`ChannelSilence`]).
async fn read_input(
    dc: Arc<dyn DataChannel>,
    relay: Arc<Relay>,
    events: mpsc::Sender<ClientEvent>,
    counters: Arc<Counters>,
    idle: Duration,
) {
    let mut silence = ChannelSilence::new(idle);
    loop {
        let ev = match silence.poll_deadline() {
            Some(deadline) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), dc.poll())
                    .await
                {
                    Ok(ev) => ev,
                    Err(_) => {
                        warn!("the page stopped pinging for {idle:?}; ending the session");
                        let _ = events.send(ClientEvent::Lost).await;
                        return;
                    }
                }
            }
            None => dc.poll().await,
        };
        let Some(ev) = ev else { break };
        let DataChannelEvent::OnMessage(msg) = ev else {
            if matches!(ev, DataChannelEvent::OnClose) {
                break;
            }
            continue;
        };
        let Some(m) = PageMessage::parse(&msg.data) else {
            counters.bad_messages.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        silence.handle_message(Instant::now(), matches!(m, PageMessage::Ping { .. }));
        if let Some((seq, ts, event)) = m.input() {
            let sent_us = ts
                .filter(|t| t.is_finite() && *t > 0.0)
                .map(|t| (t * 1000.0) as u64)
                .unwrap_or_else(crate::clock::system_unix_us);
            counters.inputs.fetch_add(1, Ordering::Relaxed);
            relay.send_input(seq, sent_us, event);
            continue;
        }
        match m {
            PageMessage::Keyframe => {
                let _ = events.try_send(ClientEvent::ForceKeyframe);
            }
            PageMessage::Ping { id, ts } => {
                let ts = ts.filter(|t| t.is_finite()).unwrap_or(0.0);
                let pong = format!(
                    r#"{{"t":"pong","id":{id},"ts":{ts},"gw_us":{}}}"#,
                    crate::clock::system_unix_us()
                );
                let _ = dc.try_send_text(&pong).await;
            }
            _ => {}
        }
    }
}

/// Forwards RTCP feedback about the video track to the session task.
async fn read_feedback(track: Arc<TrackLocalStaticRTP>, tx: mpsc::Sender<Feedback>) {
    while let Some(TrackLocalEvent::OnRtcpPacket(packets)) = track.poll().await {
        for p in &packets {
            let a = p.as_any();
            let fb = if a.is::<PictureLossIndication>() || a.is::<FullIntraRequest>() {
                Feedback::KeyframeRequest
            } else if let Some(remb) = a.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
                Feedback::Remb(f64::from(remb.bitrate))
            } else {
                continue;
            };
            let _ = tx.try_send(fb);
        }
    }
}

/// Waits until the SCTP send buffer drains (bounded), so a last message is not cut off by the
/// close that follows.
async fn flush(dc: &Option<Arc<dyn DataChannel>>) {
    let Some(dc) = dc else { return };
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if dc.outstanding_bytes().await.unwrap_or(0) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run_session(
    shared: Arc<Shared>,
    state: Arc<Sessions>,
    handle: Arc<SessionHandle>,
    mut n: Negotiated,
    started: game::Started,
    mut frames: mpsc::Receiver<(FrameHeader, Bytes)>,
    params: GameParams,
) {
    let game::Started {
        events,
        mut notices,
        relay,
        ..
    } = started;
    let counters = handle.counters.clone();
    let budget_us = shared.config.game.frame_budget_ms.saturating_mul(1000);
    let mut video: Option<Video> = None;
    let mut dc: Option<Arc<dyn DataChannel>> = None;
    let (fb_tx, mut fb_rx) = mpsc::channel::<Feedback>(64);
    let mut keyframes = KeyframeThrottle::default();
    let mut rate: Option<RateControl> = None;
    let mut sent = SendRate::default();
    // Armed until the browser connects, and again while it is disconnected: a player who does
    // not come (back) must not hold the node's slot.
    let connect_timeout = Duration::from_millis(shared.config.game.webrtc_connect_timeout_ms);
    // A player whose connection stays disconnected this long (no ICE traffic for ~5 s, then
    // this) is gone, sooner than the stack's own failure timeout (~25 s more).
    let idle = Duration::from_millis(shared.config.game.player_idle_timeout_ms);
    let deadline = tokio::time::sleep(connect_timeout);
    tokio::pin!(deadline);
    let mut deadline_armed = true;
    let reason = loop {
        tokio::select! {
            ev = n.events.recv() => match ev {
                Some(PcEvent::State(s)) => {
                    debug!(state = %s, "peer connection state");
                    match s {
                        RTCPeerConnectionState::Connected if video.is_none() => match start_video(&n).await {
                            Ok(v) => {
                                video = Some(v);
                                deadline_armed = false;
                                rate = Some(RateControl::new(params.bitrate_kbps, Instant::now()));
                                tokio::spawn(read_feedback(n.track.clone(), fb_tx.clone()).in_current_span());
                                // Frames sent before the browser could receive them are lost, the
                                // first IDR among them: ask for a new one.
                                let _ = events.send(ClientEvent::ForceKeyframe).await;
                                info!("browser connected");
                            }
                            Err(e) => {
                                warn!(error = %e, "video sender not ready");
                                let _ = events.send(ClientEvent::Gone).await;
                                break "video sender failed";
                            }
                        },
                        RTCPeerConnectionState::Connected => deadline_armed = false,
                        RTCPeerConnectionState::Disconnected if video.is_some() => {
                            deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                            deadline_armed = true;
                        }
                        RTCPeerConnectionState::Failed => {
                            let _ = events.send(ClientEvent::Lost).await;
                            break "peer connection failed";
                        }
                        RTCPeerConnectionState::Closed => {
                            let _ = events.send(ClientEvent::Gone).await;
                            break "peer connection closed";
                        }
                        _ => {}
                    }
                }
                Some(PcEvent::DataChannel(channel)) => {
                    let label = channel.label().await.unwrap_or_default();
                    if label == INPUT_LABEL && dc.is_none() {
                        tokio::spawn(
                            read_input(channel.clone(), relay.clone(), events.clone(), counters.clone(), idle).in_current_span(),
                        );
                        dc = Some(channel);
                    } else {
                        debug!(%label, "unexpected data channel closed");
                        let _ = channel.close().await;
                    }
                }
                None => break "peer connection driver stopped",
            },
            f = frames.recv() => {
                let Some((header, payload)) = f else { break "frame source ended" };
                let at = Instant::now();
                let gw_us = crate::clock::system_unix_us();
                let Some(v) = video.as_mut() else { continue };
                // The frame's age is checked again just before it is sent: a frame that waited
                // here past its budget is dropped, not sent late.
                if gw_us.saturating_sub(header.capture_ts_us) > budget_us {
                    game::count_drop(&shared, &relay, game::DropReason::Late);
                    relay.request_keyframe();
                    continue;
                }
                if v.waiting_for_idr {
                    if !header.keyframe {
                        counters.frames_skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    v.waiting_for_idr = false;
                }
                match v.send(&payload, at, &counters).await {
                    Ok(rtp_ts) => {
                        sent.record(at, payload.len());
                        counters.frames_sent.fetch_add(1, Ordering::Relaxed);
                        tell(&dc, &frame_message(&header, gw_us, rtp_ts)).await;
                    }
                    Err(e) => debug!(error = %e, "frame not written"),
                }
            }
            fb = fb_rx.recv() => match fb {
                Some(Feedback::KeyframeRequest) if keyframes.allow(Instant::now()) => {
                    counters.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                    let _ = events.try_send(ClientEvent::ForceKeyframe);
                }
                Some(Feedback::Remb(bps)) => {
                    counters.remb_kbps.store((bps / 1000.0) as u32, Ordering::Relaxed);
                    let now = Instant::now();
                    let sending = sent.kbps(now);
                    if let Some(kbps) = rate.as_mut().and_then(|r| r.on_remb(bps, sending, now)) {
                        debug!(kbps, remb_bps = bps, sending_kbps = sending, "bitrate follows REMB");
                        counters.target_kbps.store(kbps, Ordering::Relaxed);
                        let _ = events.try_send(ClientEvent::SetBitrate(kbps));
                        tell(&dc, &format!(r#"{{"t":"rate","kbps":{kbps}}}"#)).await;
                    }
                }
                // Merged into the request just passed on, or the feedback task ended.
                Some(Feedback::KeyframeRequest) | None => {}
            },
            notice = notices.recv() => match notice {
                Some(Notice::Paused(reason)) => tell(&dc, &format!(r#"{{"t":"paused","reason":{}}}"#, json_str(&reason))).await,
                Some(Notice::Resumed) => tell(&dc, r#"{"t":"resumed"}"#).await,
                Some(Notice::Ended(reason)) => {
                    tell(&dc, &format!(r#"{{"t":"ended","reason":{}}}"#, json_str(&reason))).await;
                    flush(&dc).await;
                    break "the game ended";
                }
                None => break "the game session ended",
            },
            _ = &mut deadline, if deadline_armed => {
                if video.is_none() {
                    let _ = events.send(ClientEvent::Gone).await;
                    warn!("the browser did not connect within {connect_timeout:?}");
                    break "connect timeout";
                }
                let _ = events.send(ClientEvent::Lost).await;
                warn!("the browser stayed disconnected for {idle:?}");
                break "disconnected";
            }
            _ = handle.stop.cancelled() => {
                let _ = events.send(ClientEvent::Close("the client deleted the session".into())).await;
                tell(&dc, &format!(r#"{{"t":"ended","reason":{}}}"#, json_str("deleted"))).await;
                flush(&dc).await;
                break "deleted by the client";
            }
            _ = shared.shutdown.cancelled() => {
                let _ = events.send(ClientEvent::Close("the gateway is shutting down".into())).await;
                tell(&dc, &format!(r#"{{"t":"ended","reason":{}}}"#, json_str("the gateway is shutting down"))).await;
                flush(&dc).await;
                break "gateway shutdown";
            }
        }
    };
    state.remove(handle.id);
    if let Err(e) = n.pc.close().await {
        debug!(error = %e, "peer connection close");
    }
    info!(
        reason,
        frames_sent = counters.frames_sent.load(Ordering::Relaxed),
        inputs = counters.inputs.load(Ordering::Relaxed),
        "WebRTC session ended"
    );
    drop(n.port);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_pings_count_as_a_live_page() {
        // A ping is validated like input: what does not parse is a bad message, not a sign of
        // life, so garbage cannot stand in for the page's pings.
        assert_eq!(
            PageMessage::parse(br#"{"t":"ping","id":7}"#),
            Some(PageMessage::Ping { id: 7, ts: None })
        );
        assert!(matches!(
            PageMessage::parse(br#"{"t":"ping","id":7,"ts":1718000000000.5}"#),
            Some(PageMessage::Ping { id: 7, ts: Some(_) })
        ));
        for bad in [
            &br#"{"t":"ping"}"#[..],
            br#"{"t":"ping","id":-1}"#,
            br#"{"t":"ping","id":"7"}"#,
            br#"{"t":"ping","id":7,"ts":"now"}"#,
            br#"{"t":"ping","id":1e30}"#,
            br#"{"t":"pong","id":7}"#,
        ] {
            assert_eq!(
                PageMessage::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut huge = br#"{"t":"ping","id":7,"pad":""#.to_vec();
        huge.extend(std::iter::repeat_n(b'x', MAX_INPUT_MESSAGE));
        huge.extend(br#""}"#);
        assert_eq!(PageMessage::parse(&huge), None);
    }

    #[test]
    fn level_follows_size_and_rate() {
        assert_eq!(h264_level(1280, 720, 30), 0x1f);
        assert_eq!(h264_level(1280, 720, 60), 0x20);
        assert_eq!(h264_level(1920, 1080, 30), 0x28);
        assert_eq!(h264_level(1920, 1080, 60), 0x2a);
        assert_eq!(h264_level(3840, 2160, 60), 0x34);
        assert_eq!(h264_level(640, 360, 30), 0x1f);
        assert_eq!(h264_level(7680, 4320, 240), 0x3e);
    }

    #[test]
    fn host_candidates_advertise_the_public_address_once() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
a=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\n\
a=candidate:2 1 udp 2130706431 172.17.0.2 40000 typ host\r\n\
a=candidate:3 1 udp 2130706431 127.0.0.1 40000 typ host\r\n\
a=candidate:4 1 udp 1694498815 198.51.100.1 40001 typ srflx raddr 10.0.0.5 rport 40000\r\na=mid:0\r\n";
        let out = advertise_public_ip(sdp, "203.0.113.7".parse().unwrap());
        assert_eq!(
            out,
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
a=candidate:1 1 udp 2130706431 203.0.113.7 40000 typ host\r\n\
a=candidate:3 1 udp 2130706431 127.0.0.1 40000 typ host\r\n\
a=candidate:4 1 udp 1694498815 198.51.100.1 40001 typ srflx raddr 10.0.0.5 rport 40000\r\na=mid:0\r\n"
        );
    }

    #[test]
    fn page_messages_map_to_input_events() {
        let m = PageMessage::parse(
            br#"{"t":"key","seq":3,"ts":1700000000000.5,"code":87,"down":true}"#,
        )
        .unwrap();
        assert_eq!(
            m.input(),
            Some((
                3,
                Some(1_700_000_000_000.5),
                InputEvent::Key {
                    code: 87,
                    down: true
                }
            ))
        );
        let m = PageMessage::parse(br#"{"t":"pad","seq":4,"axes":[1.0,-1.0,2.5],"buttons":5}"#)
            .unwrap();
        assert_eq!(
            m.input(),
            Some((
                4,
                None,
                InputEvent::Gamepad {
                    axes: [32767, -32767, 32767, 0],
                    buttons: 5
                }
            ))
        );
        let m = PageMessage::parse(br#"{"t":"mouse","seq":5,"dx":-3,"dy":4}"#).unwrap();
        assert_eq!(
            m.input(),
            Some((5, None, InputEvent::MouseMove { dx: -3, dy: 4 }))
        );
        assert_eq!(
            PageMessage::parse(br#"{"t":"ping","id":1,"ts":2.0}"#)
                .unwrap()
                .input(),
            None
        );
        assert!(PageMessage::parse(br#"{"t":"key","seq":-1,"code":87,"down":true}"#).is_none());
        assert!(PageMessage::parse(br#"{"t":"nope"}"#).is_none());
        assert!(PageMessage::parse(b"not json").is_none());
        assert!(PageMessage::parse(&vec![b' '; MAX_INPUT_MESSAGE + 1]).is_none());
    }

    #[test]
    fn query_parameters_are_read_and_bad_ones_named() {
        let r = play_request("arena", Some("width=1280&height=720&fps=60&x=y")).unwrap();
        assert_eq!(
            (r.width, r.height, r.fps, r.bitrate_kbps),
            (1280, 720, 60, 0)
        );
        match play_request("arena", Some("fps=sixty")) {
            Err(WhepError::BadRequest {
                param: Some("fps"), ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn paths_are_recognised() {
        assert_eq!(whep_title("/v1/games/arena/whep"), Some("arena"));
        assert_eq!(whep_title("/v1/games//whep"), None);
        assert_eq!(whep_title("/v1/games/a/b/whep"), None);
        assert_eq!(session_path("/v1/sessions/12"), Some(("12", false)));
        assert_eq!(session_path("/v1/sessions/12/stats"), Some(("12", true)));
        assert_eq!(session_path("/v1/sessions/12/x"), None);
        assert!(is_webrtc_path("/play"));
        assert!(!is_webrtc_path("/v1/games"));
    }

    #[test]
    fn keyframe_requests_are_merged() {
        let mut k = KeyframeThrottle::default();
        let t = Instant::now();
        assert!(k.allow(t));
        assert!(!k.allow(t + Duration::from_millis(100)));
        assert!(k.allow(t + Duration::from_millis(301)));
    }

    #[test]
    fn remb_moves_the_bitrate_within_limits() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = RateControl::new(10_000, t0);
        // Warm-up: ignored.
        assert_eq!(r.on_remb(2_000_000.0, 9_000, at(1_000)), None);
        // Below the target but above what is sent (an encoder under its target): not congestion.
        assert_eq!(r.on_remb(4_000_000.0, 1_500, at(7_000)), None);
        // Below what is sent: followed, at 95%.
        assert_eq!(r.on_remb(4_000_000.0, 9_000, at(7_100)), Some(3_800));
        // Too soon after the last change.
        assert_eq!(r.on_remb(1_000_000.0, 3_800, at(7_300)), None);
        // Never above the session's bitrate, never below the floor.
        assert_eq!(r.on_remb(50_000_000.0, 3_800, at(8_000)), Some(10_000));
        assert_eq!(
            r.on_remb(10_000.0, 9_000, at(9_000)),
            Some(MIN_BITRATE_KBPS)
        );
        // Small changes are ignored.
        let near = f64::from(MIN_BITRATE_KBPS) * 1000.0 / 0.95 * 1.02;
        assert_eq!(r.on_remb(near, 300, at(10_000)), None);
        assert_eq!(r.on_remb(f64::NAN, 300, at(11_000)), None);
    }

    #[test]
    fn send_rate_covers_the_last_second() {
        let t0 = Instant::now();
        let mut s = SendRate::default();
        for i in 0..60u64 {
            s.record(t0 + Duration::from_micros(i * 16_667), 12_500);
        }
        // 60 frames of 12.5 kB in a second: 6 Mbit/s.
        assert_eq!(s.kbps(t0 + Duration::from_millis(990)), 6_000);
        // Two seconds later nothing is left.
        assert_eq!(s.kbps(t0 + Duration::from_secs(3)), 0);
    }

    #[test]
    fn the_feedback_tap_lets_keyframe_requests_and_remb_through_and_nothing_else() {
        use rtc::rtcp::receiver_report::ReceiverReport;
        let tagged = |packets: Vec<Box<dyn rtc::rtcp::Packet>>| TaggedPacket {
            now: Instant::now(),
            transport: Default::default(),
            message: Packet::Rtcp(packets).into(),
        };
        let mut tap = FeedbackTap::default();
        // A compound of a receiver report and a PLI: the PLI alone is delivered.
        let rr: Box<dyn rtc::rtcp::Packet> = Box::new(ReceiverReport {
            ssrc: 1,
            ..Default::default()
        });
        let pli: Box<dyn rtc::rtcp::Packet> = Box::new(PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc: 7,
        });
        tap.handle_read(tagged(vec![rr.clone(), pli])).unwrap();
        let out = tap.poll_read().unwrap();
        assert!(out.message.has(&Attribute::DeliverToApplication));
        let Packet::Rtcp(p) = &out.message.packet else {
            panic!("not RTCP")
        };
        assert_eq!(p.len(), 1);
        assert!(p[0].as_any().is::<PictureLossIndication>());
        // REMB is delivered too.
        let remb: Box<dyn rtc::rtcp::Packet> = Box::new(ReceiverEstimatedMaximumBitrate {
            sender_ssrc: 1,
            bitrate: 5e6,
            ssrcs: vec![7],
        });
        tap.handle_read(tagged(vec![remb])).unwrap();
        assert!(tap
            .poll_read()
            .unwrap()
            .message
            .has(&Attribute::DeliverToApplication));
        // A report alone is left to the interceptors (the chain's end drops it).
        tap.handle_read(tagged(vec![rr])).unwrap();
        assert!(!tap
            .poll_read()
            .unwrap()
            .message
            .has(&Attribute::DeliverToApplication));
        assert!(tap.poll_read().is_none());
    }

    #[test]
    fn ports_are_leased_from_the_range_and_released() {
        // A range of its own so that parallel tests do not share ports.
        let (min, max) = (47_310, 47_311);
        let a = lease_port(min, max, &HashSet::new()).unwrap();
        let b = lease_port(min, max, &HashSet::new()).unwrap();
        assert_ne!(a.0, b.0);
        assert!((min..=max).contains(&a.0) && (min..=max).contains(&b.0));
        assert!(matches!(
            lease_port(min, max, &HashSet::new()),
            Err(WhepError::NoUdpPort { .. })
        ));
        drop(a);
        assert!(lease_port(min, max, &HashSet::new()).is_ok());
        assert_eq!(lease_port(0, 0, &HashSet::new()).unwrap().0, 0);
    }
}
