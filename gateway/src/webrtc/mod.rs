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
//!   demo` the key field is prefilled with the demo key. It shows the reason of a refusal (a
//!   wrong key's 401 message), refuses a `?game=` the gateway does not offer instead of playing
//!   another, stops posting stats when the session ends, has a controls help (`?` or `h`) and
//!   keeps its stats to one line at the bottom right unless expanded (`?stats=full`).
//! * `GET /favicon.ico`: the site icon (SVG), also inline in the page.
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
//! {"t":"pad","seq":5,"ts":…,"pad":2,"axes":[0.0,-1.0,0.0,0.0],"triggers":[0.0,1.0],"buttons":129}
//! {"t":"keyframe"}                                                       ask for an IDR
//! {"t":"video","width":1920,"height":1080,"fps":60}                      change size and rate
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
//! {"t":"video","width":1920,"height":1080,"fps":60}                 a size change took effect
//! {"t":"video_refused","reason":"…"}                                a size change was refused
//! {"t":"rumble","pad":0,"strong":40000,"weak":8000,"duration_ms":200}   vibrate pad 0
//! ```
//! `pad` is one gamepad's whole state: `pad` 0..=3 (0 when absent), at most 4 `axes` in -1..1
//! (left x, left y, right x, right y; clamped), at most 2 `triggers` (left, right) in 0..1
//! (clamped; absent means released), `buttons` the W3C Standard Gamepad's 17 buttons as bits
//! (0..=131071). A pad of 4 or more, longer arrays, buttons beyond bit 16, or numbers that are
//! not numbers make the message malformed (ignored and counted); the gateway sends the rest
//! to the node as input datagrams of layout 2. `/play` polls up to 4 pads (the Nth connected
//! one is pad N) every 8 ms and sends a pad's state when it changes.
//! `video` (page to gateway) asks for the session's picture size and frame rate to change
//! without a new session, exactly as a native `SetVideo` (PROTOCOL.md section 5.5: the `[game]`
//! limits, at most 4 changes a second, the node's own checks); numbers that are not
//! non-negative integers below 2^32 make the message malformed (ignored and counted), in-range
//! nonsense (0x0, odd sizes, fps 0) is answered `video_refused` with the reason. The video
//! track carries the new size in-stream from the first IDR at it; the `<video>` element keeps
//! playing. `/play` sends it when the stage it shows the video in changes size (window resize,
//! fullscreen; debounced 300 ms, in device pixels, even, clamped to 16x16..3840x2160) while its
//! "fit" box is checked (the default unless the address names `width` and `height`).
//! `rumble` comes from the node serving the session (at most 30 a second); magnitudes are
//! 0..=65535, `duration_ms` at most 5000; `/play` plays it on the `pad`-th connected gamepad
//! with `vibrationActuator.playEffect("dual-rumble", ...)` where the pad has one.
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
//! puts Chromium on its low-latency rendering path (each frame rendered as soon as decoded);
//! a page that wants lip sync instead (`/play?sync=1`) leaves it out of its offer.
//!
//! # Sender reports
//! The gateway writes the RTCP sender reports of both tracks itself (about once a second per
//! track): NTP time is the capture time of a packet (the node's clock, Unix µs) and RTP time
//! that packet's own timestamp, so the browser maps audio and video onto one capture clock.
//! webrtc-rs' sender-report interceptor (RTP time ↔ send time) is not registered.
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

mod bundle;
mod datachannel;
mod h264;
mod negotiate;
pub mod policy;
mod ports;
mod session;
mod whep;

pub use crate::sdp::{check_offer, parse_sdpfrag, OfferSummary, SdpFrag};
pub use datachannel::PageMessage;
pub use negotiate::{advertise_public_ip, h264_level};
pub use policy::{PcState, SessionControl};
pub use ports::{PortLease, PortLeases};
pub use whep::{is_webrtc_path, play_request, WebTransportInfo, Whep, WhepError};

use crate::game::Relay;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use webrtc::peer_connection::PeerConnection;

/// The data channel label the page opens for input.
pub const INPUT_LABEL: &str = "input";
/// Content type of a WHEP offer and answer.
pub const SDP_CONTENT_TYPE: &str = "application/sdp";
/// Content type of a trickle ICE PATCH body.
pub const SDPFRAG_CONTENT_TYPE: &str = "application/trickle-ice-sdpfrag";
/// Largest stats document a page may post.
pub const MAX_STATS_BYTES: usize = 64 * 1024;

/// abs-send-time header extension (lets Chromium's receive-side estimator time arrivals).
const ABS_SEND_TIME_URI: &str = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time";
/// playout-delay header extension: min = max = 0 tells Chromium to decode and render each frame
/// as soon as it is complete (its low-latency rendering path) instead of smoothing playout.
const PLAYOUT_DELAY_URI: &str = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay";

/// The live WebRTC sessions of one gateway, and the UDP ports they hold.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<u64, Arc<SessionHandle>>>,
    /// Ports of `game.webrtc_udp_port_min..=max` held by this gateway's sessions.
    pub ports: Arc<PortLeases>,
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
    /// Opus packets written to the audio track.
    audio_packets: AtomicU64,
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
            "audio_packets": self.audio_packets.load(r),
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
