//! Every message that travels inside a frame, with its body encoding.
//!
//! One type-byte namespace covers all streams (node control, session, client), so that the
//! gateway can pass `Token`, `Done` and `Error` from a node's session stream to a client's request
//! stream without translating them. PROTOCOL.md lists the bytes and layouts.

use bytes::BufMut;

use crate::caps::ModelCaps;
use crate::codec::{DecodeError, Reader, WriteExt};
use crate::openai::Endpoint;
use crate::{MAX_CONTROL_FRAME, MAX_REQUEST_FRAME, PROTOCOL_VERSION};

/// Most GPUs one `Register` may list.
pub const MAX_GPUS: usize = 64;
/// Most entries in one list of names (games, models, titles).
pub const MAX_NAMES: usize = 4096;
/// Longest `GpuIdentity.uuid` (NVML's `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` is 40 bytes;
/// MIG instance UUIDs are longer).
pub const MAX_GPU_UUID_BYTES: usize = 96;
/// Longest `GpuIdentity.driver_version` (NVML's are like `550.54.15`).
pub const MAX_DRIVER_VERSION_BYTES: usize = 64;
/// Longest `Inventory.encoder` name (`openh264`, `nvenc`, ...), and longest
/// `NodeEncoder.implementation`.
pub const MAX_ENCODER_NAME_BYTES: usize = 32;
/// Most encoders one `Register` may list (one per codec is what nodes send; the room is for
/// codecs added later).
pub const MAX_ENCODERS: usize = 16;
/// Most codecs a `PlayRequest` may list.
pub const MAX_CODECS: usize = 8;
/// Longest codec name on the wire (`h264`, `hevc`, `av1`; room for later ones).
pub const MAX_CODEC_NAME_BYTES: usize = 16;
/// The only length of a `traceparent` kept from the wire: a W3C version-00 header is exactly
/// 55 bytes. A longer or shorter one is ignored without being copied, so a peer cannot park
/// state through it.
pub const TRACEPARENT_BYTES: usize = 55;

/// Whether `b` is a W3C `traceparent` of version 00 (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase,
/// neither id all zeros). Version `ff` and the future versions a receiver cannot interpret are
/// not: a context the receiver cannot check is not propagated.
pub fn is_valid_traceparent(b: &[u8]) -> bool {
    if b.len() != TRACEPARENT_BYTES || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
        return false;
    }
    let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    lower_hex(&b[3..35])
        && lower_hex(&b[36..52])
        && lower_hex(&b[53..55])
        && nonzero(&b[3..35])
        && nonzero(&b[36..52])
}

/// Message type bytes. Ranges: `0x01..=0x0f` node control, `0x10..=0x2f` session streams,
/// `0x30..=0x4f` client streams.
pub mod ty {
    pub const REGISTER: u8 = 0x01;
    pub const REGISTERED: u8 = 0x02;
    pub const REJECTED: u8 = 0x03;
    pub const HEARTBEAT: u8 = 0x04;
    pub const HEARTBEAT_ACK: u8 = 0x05;
    pub const DRAIN: u8 = 0x06;
    pub const DRAINED: u8 = 0x07;
    pub const SHUTDOWN: u8 = 0x08;
    pub const INVENTORY: u8 = 0x09;

    pub const OPEN: u8 = 0x10;
    pub const ACCEPTED: u8 = 0x11;
    pub const REFUSED: u8 = 0x12;
    pub const FORCE_KEYFRAME: u8 = 0x13;
    pub const SET_BITRATE: u8 = 0x14;
    pub const CLOSE: u8 = 0x15;
    pub const TOKEN: u8 = 0x16;
    pub const DONE: u8 = 0x17;
    pub const ERROR: u8 = 0x18;
    pub const ENDED: u8 = 0x19;
    pub const INPUT_APPLIED: u8 = 0x1a;
    pub const CHUNK: u8 = 0x1b;
    pub const SET_VIDEO: u8 = 0x1c;
    pub const RUMBLE: u8 = 0x1d;

    pub const INFER_REQUEST: u8 = 0x30;
    pub const INFER_STARTED: u8 = 0x31;
    pub const PLAY_REQUEST: u8 = 0x32;
    pub const PLAY_STARTED: u8 = 0x33;
    pub const PAUSED: u8 = 0x34;
    pub const RESUMED: u8 = 0x35;
    pub const LIST_GAMES: u8 = 0x36;
    pub const GAME_LIST: u8 = 0x37;
    pub const REDIRECT: u8 = 0x38;
    pub const PLAY_TICKET: u8 = 0x39;
    pub const RESUME_TOKEN: u8 = 0x3a;
    pub const PLAY_RESUME: u8 = 0x3b;
    pub const INFER_TICKET: u8 = 0x3c;

    pub const PEER_OPEN: u8 = 0x40;
}

/// A video codec: what a node encodes and a client decodes. On the wire it is its name
/// ([`VideoCodec::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum VideoCodec {
    /// H.264 (AVC): every client decodes it. The default.
    #[default]
    H264,
    /// H.265 (HEVC).
    Hevc,
    /// AV1.
    Av1,
}

impl VideoCodec {
    /// Every codec, in the order of their wire names' first appearance.
    pub const ALL: [VideoCodec; 3] = [VideoCodec::H264, VideoCodec::Hevc, VideoCodec::Av1];

    /// The wire and configuration name: `h264`, `hevc`, `av1`.
    pub fn as_str(self) -> &'static str {
        match self {
            VideoCodec::H264 => "h264",
            VideoCodec::Hevc => "hevc",
            VideoCodec::Av1 => "av1",
        }
    }

    /// The codec named `name` (exactly as [`VideoCodec::as_str`] writes it), if known.
    pub fn from_name(name: &str) -> Option<VideoCodec> {
        VideoCodec::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl std::fmt::Display for VideoCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One GPU a node offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Marketing model name, e.g. "NVIDIA GeForce RTX 4090".
    pub model: String,
    /// Class the geofence policy matches on, e.g. "consumer" or "datacenter".
    pub class: String,
    /// Memory in MiB.
    pub vram_mib: u64,
}

/// What a node can run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workloads {
    /// Game titles.
    pub games: Vec<String>,
    /// Inference model names.
    pub models: Vec<String>,
    /// What each model of `models` supports beyond plain text, by position; a model past the
    /// end of this list declares nothing ([`ModelCaps::NONE`]). Never longer than `models`.
    pub model_caps: Vec<ModelCaps>,
}

impl Workloads {
    /// The declared capabilities of `models[i]`.
    pub fn caps_of(&self, i: usize) -> ModelCaps {
        self.model_caps.get(i).copied().unwrap_or_default()
    }
}

/// One video encoder a node offers (protocol version 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEncoder {
    /// What it produces.
    pub codec: VideoCodec,
    /// The implementation (`openh264`, `x264`, `h264_nvenc`, ...), for logs and fleet views;
    /// at most [`MAX_ENCODER_NAME_BYTES`].
    pub implementation: String,
}

/// How many sessions a node takes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    /// Concurrent game sessions.
    pub game_sessions: u32,
    /// Concurrent inference requests.
    pub inference_concurrency: u32,
}

/// node -> gateway, first message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    /// Must equal [`PROTOCOL_VERSION`]; the decoder checks it before the rest of the body.
    pub protocol_version: u16,
    /// Stable node identity chosen by the operator.
    pub node_id: String,
    /// Secret issued at enrolment; binds the node to a verified operator.
    pub enrolment_token: String,
    /// The node's software version, for logs and fleet views.
    pub software_version: String,
    /// GPUs on the node.
    pub gpus: Vec<Gpu>,
    /// Games and models served.
    pub workloads: Workloads,
    /// Concurrency limits.
    pub capacity: Capacity,
    /// The video encoders the node offers, at most one per codec (protocol version 3); at
    /// most [`MAX_ENCODERS`]. Entries naming a codec the receiver does not know are dropped
    /// when decoding. A node serving games that lists none is taken to encode H.264.
    pub encoders: Vec<NodeEncoder>,
}

/// gateway -> node: registration accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The node is considered gone if no heartbeat arrives for this long.
    pub lease_ms: u64,
    /// How often the node should send `Heartbeat`.
    pub heartbeat_ms: u64,
    /// ISO 3166-1 alpha-2 country the gateway located the node in, if it could.
    pub node_country: Option<String>,
}

/// Why a gateway refused a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// Unknown or revoked enrolment token.
    BadToken,
    /// The operator has not passed KYC.
    OperatorNotVerified,
    /// The operator is suspended.
    OperatorSuspended,
    /// Policy forbids nodes from the node's location.
    Geofence,
    /// `protocol_version` is not supported.
    Version,
    /// A node with this id is already connected.
    Duplicate,
    /// Anything else; the reason says what.
    Other,
}

impl RejectCode {
    const ALL: [RejectCode; 7] = [
        RejectCode::BadToken,
        RejectCode::OperatorNotVerified,
        RejectCode::OperatorSuspended,
        RejectCode::Geofence,
        RejectCode::Version,
        RejectCode::Duplicate,
        RejectCode::Other,
    ];

    /// The wire byte.
    pub fn to_byte(self) -> u8 {
        match self {
            RejectCode::BadToken => 1,
            RejectCode::OperatorNotVerified => 2,
            RejectCode::OperatorSuspended => 3,
            RejectCode::Geofence => 4,
            RejectCode::Version => 5,
            RejectCode::Duplicate => 6,
            RejectCode::Other => 7,
        }
    }

    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.to_byte() == b)
    }

    /// Snake-case name for logs and metrics, e.g. `operator_not_verified`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::BadToken => "bad_token",
            RejectCode::OperatorNotVerified => "operator_not_verified",
            RejectCode::OperatorSuspended => "operator_suspended",
            RejectCode::Geofence => "geofence",
            RejectCode::Version => "version",
            RejectCode::Duplicate => "duplicate",
            RejectCode::Other => "other",
        }
    }

    /// Whether reconnecting later with the same credentials can succeed without an operator
    /// changing something (a duplicate clears when the old connection times out).
    pub fn is_retryable(self) -> bool {
        matches!(self, RejectCode::Duplicate | RejectCode::Other)
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// gateway -> node: registration refused; the gateway closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Machine-readable cause.
    pub code: RejectCode,
    /// Human-readable detail.
    pub reason: String,
}

/// node -> gateway, every `heartbeat_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    /// Increments by one per heartbeat; echoed in `HeartbeatAck`.
    pub seq: u64,
    /// Sessions (game and inference) running now.
    pub active_sessions: u32,
    /// Requests waiting for a slot.
    pub queue_depth: u32,
    /// Overall load, 0 (idle) to 1 (full). Finite; receivers clamp to 0..=1.
    pub load: f32,
    /// GPU utilisation 0..=1, if measured.
    pub gpu_util: Option<f32>,
    /// Median encode time per frame in ms, if the node encodes video.
    pub encoder_ms_p50: Option<f32>,
}

/// gateway -> node: acknowledges the heartbeat with this `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// The acknowledged heartbeat.
    pub seq: u64,
}

/// Either direction on the control stream: stop routing new sessions to the node; existing ones
/// may run for up to `deadline_ms` more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// Grace period in ms, relative to receipt.
    pub deadline_ms: u64,
}

/// gateway -> node: the gateway is going away or evicting the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    /// Human-readable cause.
    pub reason: String,
}

/// One GPU's hardware identity, as NVML reports it (or the node's config says).
///
/// Self-reported: the gateway cross-checks it (the same UUID on two live nodes, a changed set
/// between registrations) but it is not a root of trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuIdentity {
    /// Position of the GPU in `Register.gpus`.
    pub index: u32,
    /// NVML's UUID, e.g. `GPU-5d1a8a2e-...`; empty when unknown. At most
    /// [`MAX_GPU_UUID_BYTES`].
    pub uuid: String,
    /// NVML's combined PCI id `(device << 16) | vendor`, e.g. `0x233010de` for an H100 SXM
    /// (device 0x2330, vendor 0x10de NVIDIA); 0 when unknown.
    pub pci_device_id: u32,
    /// The driver version, e.g. `550.54.15`; empty when unknown. At most
    /// [`MAX_DRIVER_VERSION_BYTES`].
    pub driver_version: String,
}

/// Where a node got a model's weight size from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightsSource {
    /// `[[models]] weights_bytes` in the node's config.
    Declared,
    /// Computed from `[[models]] params_b` and `dtype`.
    Computed,
    /// Detected from the inference backend.
    Detected,
}

impl WeightsSource {
    const ALL: [WeightsSource; 3] = [
        WeightsSource::Declared,
        WeightsSource::Computed,
        WeightsSource::Detected,
    ];

    /// The wire byte.
    pub fn to_byte(self) -> u8 {
        match self {
            WeightsSource::Declared => 0,
            WeightsSource::Computed => 1,
            WeightsSource::Detected => 2,
        }
    }

    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.to_byte() == b)
    }

    /// Snake-case name for logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightsSource::Declared => "declared",
            WeightsSource::Computed => "computed",
            WeightsSource::Detected => "detected",
        }
    }
}

/// The size of one served model's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelWeights {
    /// The model, as listed in `Register.workloads.models`.
    pub name: String,
    /// Bytes of weights the model needs in GPU memory; 0 when unknown.
    pub weights_bytes: u64,
    /// Where the figure comes from (meaningless when `weights_bytes` is 0).
    pub source: WeightsSource,
}

/// node -> gateway, once, after `Registered`: what the gateway's checker tests the node's claims
/// against (hardware identities, model sizes, encoder). Advisory: a gateway that does not know
/// the type skips it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    /// Identities of the GPUs of `Register.gpus`, by index; at most [`MAX_GPUS`].
    pub gpus: Vec<GpuIdentity>,
    /// Weight sizes of the served models; at most [`MAX_NAMES`].
    pub models: Vec<ModelWeights>,
    /// The node's video encoder (`openh264`, `nvenc`, ...); empty when it serves no games. At
    /// most [`MAX_ENCODER_NAME_BYTES`].
    pub encoder: String,
}

/// Parameters of a game session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GameParams {
    /// Title as listed in `Workloads::games`.
    pub title: String,
    /// Video width in pixels.
    pub width: u32,
    /// Video height in pixels.
    pub height: u32,
    /// Target frames per second.
    pub fps: u32,
    /// Target bitrate in kbit/s.
    pub bitrate_kbps: u32,
    /// The codec to encode in, one the node listed in `Register.encoders` (protocol
    /// version 3).
    pub codec: VideoCodec,
    /// The W3C `traceparent` of the gateway's session span, which the node's session span
    /// continues (protocol version 4). Decoded only when valid ([`is_valid_traceparent`]);
    /// anything else reads as `None`.
    pub traceparent: Option<String>,
}

/// What an `Open` asks the node to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKind {
    /// Stream a game.
    Game(GameParams),
    /// Run one inference request.
    Inference {
        /// Model as listed in `Workloads::models`.
        model: String,
        /// The API the client called; the body has that endpoint's shape.
        endpoint: Endpoint,
        /// The OpenAI-style request body, passed through untouched.
        request_json: String,
        /// The gateway's request id (the client's `x-request-id`), for the node's logs and its
        /// upstream's.
        request_id: String,
        /// The W3C `traceparent` to continue, if the client sent one (or the gateway traces).
        traceparent: Option<String>,
    },
}

/// gateway -> node, first message on a session stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// Gateway-assigned id, unique per gateway; the same id names the session to the client, so
    /// frame headers are forwarded unchanged.
    pub session_id: u64,
    /// What to run.
    pub kind: SessionKind,
}

/// node -> gateway: the session is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Echo of `Open::session_id`.
    pub session_id: u64,
}

/// Why a node refused an `Open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseCode {
    /// No free capacity; the gateway tries the next node.
    Busy,
    /// The node does not serve this game or model.
    UnknownWorkload,
    /// The request is malformed; other nodes would refuse it too.
    BadRequest,
    /// The node failed internally.
    Internal,
}

impl RefuseCode {
    const ALL: [RefuseCode; 4] = [
        RefuseCode::Busy,
        RefuseCode::UnknownWorkload,
        RefuseCode::BadRequest,
        RefuseCode::Internal,
    ];

    /// The wire byte.
    pub fn to_byte(self) -> u8 {
        match self {
            RefuseCode::Busy => 1,
            RefuseCode::UnknownWorkload => 2,
            RefuseCode::BadRequest => 3,
            RefuseCode::Internal => 4,
        }
    }

    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.to_byte() == b)
    }

    /// Snake-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseCode::Busy => "busy",
            RefuseCode::UnknownWorkload => "unknown_workload",
            RefuseCode::BadRequest => "bad_request",
            RefuseCode::Internal => "internal",
        }
    }

    /// Whether another node might accept the same `Open`.
    pub fn try_another_node(self) -> bool {
        !matches!(self, RefuseCode::BadRequest)
    }
}

impl std::fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// node -> gateway: the `Open` was refused; the node finishes the stream after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Machine-readable cause.
    pub code: RefuseCode,
    /// Human-readable detail.
    pub reason: String,
}

/// gateway -> node: change the target bitrate of a game session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetBitrate {
    /// New target in kbit/s.
    pub kbps: u32,
}

/// Change a running game session's picture size and frame rate without a new session (added
/// in protocol version 3). client -> gateway on the play stream and gateway -> node on the
/// session stream ask for it; node -> gateway and gateway -> client confirm it with the values
/// now in force. A refusal is an `Error` with code `video_refused` that does not end the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetVideo {
    /// Picture width in pixels (even, at least 16).
    pub width: u32,
    /// Picture height in pixels (even, at least 16).
    pub height: u32,
    /// Frames per second (1 and up).
    pub fps: u32,
}

/// The error code of a refused [`SetVideo`]: the session keeps running at its current size.
pub const VIDEO_REFUSED: &str = "video_refused";

/// node -> gateway -> client: make a gamepad vibrate (added in protocol version 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rumble {
    /// Pad index, 0..=3 ([`crate::input::MAX_PADS`] pads).
    pub pad: u8,
    /// The low-frequency (strong, left) motor, 0..=65535.
    pub strong_magnitude: u16,
    /// The high-frequency (weak, right) motor, 0..=65535.
    pub weak_magnitude: u16,
    /// How long, in milliseconds (at most [`MAX_RUMBLE_MS`]).
    pub duration_ms: u32,
}

/// Longest [`Rumble::duration_ms`] a decoder accepts (5 s).
pub const MAX_RUMBLE_MS: u32 = 5_000;

/// End the session (gateway -> node, or client -> gateway on a play stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// Human-readable cause.
    pub reason: String,
}

/// One generated token (node -> gateway -> client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// 0-based position in the completion.
    pub index: u32,
    /// The token's text.
    pub text: String,
    /// Microseconds since the node received `Open` (time to this token on the node).
    pub node_elapsed_us: u64,
}

/// One piece of an inference response as a JSON object (node -> gateway -> client), for
/// everything the plain-text [`Token`] cannot carry: tool-call deltas, logprobs, reasoning,
/// several choices, embeddings, Responses API events. What the JSON is depends on the request's
/// endpoint (PROTOCOL.md): chat and completions send one streamed chunk object each (the gateway
/// rewrites `id`, `object`, `created` and `model`, drops `usage`, keeps every other field);
/// embeddings send one `data[]` element (`{"object":"embedding","index":i,"embedding":[..]}`)
/// each and the gateway assembles the list; the Responses API sends one streaming event's data
/// object (with its `type`) each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// 0-based position among the request's `Token`s and `Chunk`s.
    pub index: u32,
    /// One JSON object, as text.
    pub json: String,
    /// Microseconds since the node received `Open`.
    pub node_elapsed_us: u64,
}

/// The completion finished (node -> gateway -> client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// OpenAI `finish_reason`, e.g. "stop" or "length".
    pub finish_reason: String,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// The request or session failed. Codes are snake-case and status-like: "unauthorized",
/// "geofence", "no_capacity", "model_not_found", "model_unavailable" (retryable: a recently
/// served model has no node right now), "rate_limited", "bad_request", "upstream", "version",
/// "internal".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    /// Machine-readable code.
    pub code: String,
    /// Human-readable detail.
    pub message: String,
    /// Whether the same request may succeed if retried later.
    pub retryable: bool,
}

/// A game session ended (node -> gateway, gateway -> client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Why, e.g. "closed", "game exited", "geofence: ...".
    pub reason: String,
}

/// node -> gateway: the node applied every input datagram up to `seq` (sent when no frame is
/// going out to carry it, e.g. a static scene).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputApplied {
    /// Highest input sequence number applied.
    pub seq: u64,
}

/// client -> gateway, first message on an inference request stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferRequest {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The caller's API key.
    pub api_key: String,
    /// The API the body is for (chat completions, completions, embeddings, responses).
    pub endpoint: Endpoint,
    /// OpenAI request body (JSON) of `endpoint`; `model` selects the model.
    pub request_json: String,
}

/// gateway -> client: the request was admitted and routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferStarted {
    /// Id for logs and support (also the HTTP `x-request-id`).
    pub request_id: String,
    /// The model serving it.
    pub model: String,
}

/// client -> gateway, first message on a play stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayRequest {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The caller's API key.
    pub api_key: String,
    /// Title to play.
    pub game: String,
    /// Requested width in pixels.
    pub width: u32,
    /// Requested height in pixels.
    pub height: u32,
    /// Requested frames per second.
    pub fps: u32,
    /// Requested bitrate in kbit/s.
    pub bitrate_kbps: u32,
    /// Codecs the client decodes, most preferred first (protocol version 3); the gateway
    /// picks the first one a node that may serve the session encodes. Empty means H.264 only.
    /// At most [`MAX_CODECS`]; names the gateway does not know are dropped when decoding.
    pub codecs: Vec<VideoCodec>,
    /// The client's W3C `traceparent`, whose trace the session joins (protocol version 4).
    /// Decoded only when valid ([`is_valid_traceparent`]): an invalid one reads as `None` and
    /// the gateway starts a trace of its own; it never fails the request.
    pub traceparent: Option<String>,
}

/// gateway -> client: the session runs with these (possibly adjusted) parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayStarted {
    /// Id carried in every frame header and input datagram of the session.
    pub session_id: u64,
    /// Video width in pixels.
    pub width: u32,
    /// Video height in pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// Bitrate in kbit/s.
    pub bitrate_kbps: u32,
    /// The codec of the session's video frames (protocol version 3).
    pub codec: VideoCodec,
}

/// gateway -> client: frames stop for a while (failover to another node in progress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paused {
    /// Human-readable cause.
    pub reason: String,
}

/// client -> gateway: list playable titles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListGames {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The caller's API key.
    pub api_key: String,
}

/// gateway -> peer gateway, first message of a trunk stream (ALPN `nearpath-peer/1`): run the
/// session whose `Open` follows on the stream on node `node_id`, which the receiving gateway
/// holds. Both gateways authenticated each other with pinned certificates at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOpen {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The node, as named in the node directory.
    pub node_id: String,
}

/// gateway -> client: playable titles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GameList {
    /// Titles some connected node serves.
    pub titles: Vec<String>,
}

/// gateway -> client, instead of `PlayStarted`: the node that should serve the session is
/// attached to another gateway of the federation; play there with `ticket` (a [`PlayTicket`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The peer gateway's `federation.gateway_id`.
    pub gateway_id: String,
    /// Where to dial it over QUIC (`host:port`).
    pub quic_address: String,
    /// SHA-256 of its QUIC certificate (DER), 64 lowercase hex digits: the pin to dial it with.
    /// The client trusts it because the gateway it already trusts sent it.
    pub cert_sha256: String,
    /// The base URL of its HTTP API (for browsers and `GET /v1/gateways`).
    pub http_url: String,
    /// The signed, short-lived, single-use ticket the peer accepts instead of routing again.
    pub ticket: String,
}

/// client -> gateway, first message on a play stream: start the session a [`Redirect`]'s
/// ticket names (its game and parameters are in the ticket) on the gateway it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayTicket {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The caller's API key: the ticket does not replace it (it must be the key the ticket was
    /// issued to).
    pub api_key: String,
    /// [`Redirect::ticket`], as received.
    pub ticket: String,
}

/// client -> gateway, first message on an inference stream: the request a [`Redirect`] sent
/// here (answering an `InferRequest` at another gateway of the federation), with its ticket.
/// Answered as an `InferRequest` is (`InferStarted`, tokens, `Done`, or `Error`), never with
/// another `Redirect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferTicket {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The caller's API key: the ticket does not replace it on the native protocol (it must
    /// be the key the ticket was issued to).
    pub api_key: String,
    /// [`Redirect::ticket`], as received.
    pub ticket: String,
    /// The endpoint, as in the `InferRequest` that was redirected (the ticket names it too).
    pub endpoint: Endpoint,
    /// The request body, sent again (the model must be the one the ticket names).
    pub request_json: String,
}

/// gateway -> client, on a play stream after `PlayStarted` (gateways of a federation only):
/// the secret that lets this client resume the session through another gateway of the
/// federation if this one dies ([`PlayResume`]). A later `ResumeToken` replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeToken {
    /// 64 lowercase hex digits (32 random bytes); gateways store only its SHA-256.
    pub token: String,
}

/// client -> gateway, first message on a play stream: resume a session whose gateway was lost,
/// through this gateway of the same federation. Answered like `PlayRequest` (`PlayStarted`
/// with the same session id, then a fresh `ResumeToken`; or `Error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayResume {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The caller's API key: it must be the key the session was started with.
    pub api_key: String,
    /// The session to resume ([`PlayStarted::session_id`]).
    pub session_id: u64,
    /// The session's latest [`ResumeToken::token`].
    pub token: String,
}

/// Every framed message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// See [`Register`].
    Register(Register),
    /// See [`Registered`].
    Registered(Registered),
    /// See [`Rejected`].
    Rejected(Rejected),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`HeartbeatAck`].
    HeartbeatAck(HeartbeatAck),
    /// See [`Drain`].
    Drain(Drain),
    /// node -> gateway: the node has no sessions left after a drain.
    Drained,
    /// See [`Shutdown`].
    Shutdown(Shutdown),
    /// See [`Inventory`].
    Inventory(Inventory),
    /// See [`Open`].
    Open(Open),
    /// See [`Accepted`].
    Accepted(Accepted),
    /// See [`Refused`].
    Refused(Refused),
    /// Ask the encoder for an IDR frame now (gateway -> node, client -> gateway).
    ForceKeyframe,
    /// See [`SetBitrate`].
    SetBitrate(SetBitrate),
    /// See [`Close`].
    Close(Close),
    /// See [`SetVideo`].
    SetVideo(SetVideo),
    /// See [`Rumble`].
    Rumble(Rumble),
    /// See [`Token`].
    Token(Token),
    /// See [`Chunk`].
    Chunk(Chunk),
    /// See [`Done`].
    Done(Done),
    /// See [`ErrorInfo`].
    Error(ErrorInfo),
    /// See [`Ended`].
    Ended(Ended),
    /// See [`InputApplied`].
    InputApplied(InputApplied),
    /// See [`InferRequest`].
    InferRequest(InferRequest),
    /// See [`InferStarted`].
    InferStarted(InferStarted),
    /// See [`PlayRequest`].
    PlayRequest(PlayRequest),
    /// See [`PlayStarted`].
    PlayStarted(PlayStarted),
    /// See [`Paused`].
    Paused(Paused),
    /// gateway -> client: frames flow again after `Paused`.
    Resumed,
    /// See [`ListGames`].
    ListGames(ListGames),
    /// See [`GameList`].
    GameList(GameList),
    /// See [`Redirect`].
    Redirect(Redirect),
    /// See [`PlayTicket`].
    PlayTicket(PlayTicket),
    /// See [`ResumeToken`].
    ResumeToken(ResumeToken),
    /// See [`PlayResume`].
    PlayResume(PlayResume),
    /// See [`PeerOpen`].
    PeerOpen(PeerOpen),
    /// See [`InferTicket`].
    InferTicket(InferTicket),
}

impl Message {
    /// The type byte that starts the frame.
    pub fn type_byte(&self) -> u8 {
        match self {
            Message::Register(_) => ty::REGISTER,
            Message::Registered(_) => ty::REGISTERED,
            Message::Rejected(_) => ty::REJECTED,
            Message::Heartbeat(_) => ty::HEARTBEAT,
            Message::HeartbeatAck(_) => ty::HEARTBEAT_ACK,
            Message::Drain(_) => ty::DRAIN,
            Message::Drained => ty::DRAINED,
            Message::Shutdown(_) => ty::SHUTDOWN,
            Message::Inventory(_) => ty::INVENTORY,
            Message::Open(_) => ty::OPEN,
            Message::Accepted(_) => ty::ACCEPTED,
            Message::Refused(_) => ty::REFUSED,
            Message::ForceKeyframe => ty::FORCE_KEYFRAME,
            Message::SetBitrate(_) => ty::SET_BITRATE,
            Message::Close(_) => ty::CLOSE,
            Message::SetVideo(_) => ty::SET_VIDEO,
            Message::Rumble(_) => ty::RUMBLE,
            Message::Token(_) => ty::TOKEN,
            Message::Chunk(_) => ty::CHUNK,
            Message::Done(_) => ty::DONE,
            Message::Error(_) => ty::ERROR,
            Message::Ended(_) => ty::ENDED,
            Message::InputApplied(_) => ty::INPUT_APPLIED,
            Message::InferRequest(_) => ty::INFER_REQUEST,
            Message::InferStarted(_) => ty::INFER_STARTED,
            Message::PlayRequest(_) => ty::PLAY_REQUEST,
            Message::PlayStarted(_) => ty::PLAY_STARTED,
            Message::Paused(_) => ty::PAUSED,
            Message::Resumed => ty::RESUMED,
            Message::ListGames(_) => ty::LIST_GAMES,
            Message::GameList(_) => ty::GAME_LIST,
            Message::Redirect(_) => ty::REDIRECT,
            Message::PlayTicket(_) => ty::PLAY_TICKET,
            Message::ResumeToken(_) => ty::RESUME_TOKEN,
            Message::PlayResume(_) => ty::PLAY_RESUME,
            Message::PeerOpen(_) => ty::PEER_OPEN,
            Message::InferTicket(_) => ty::INFER_TICKET,
        }
    }

    /// The message's name, for logs and "expected X, got Y" errors.
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte()).unwrap_or("Unknown")
    }

    /// The largest frame a receiver accepts for this message: [`MAX_REQUEST_FRAME`] for the
    /// messages that carry a request or response body (`InferRequest`, `Open`, `Chunk`: an
    /// embedding of a few thousand floats is larger than a control frame), [`MAX_CONTROL_FRAME`] for the
    /// rest. Senders check it so that an oversized message fails locally with a clear error.
    pub fn max_frame(&self) -> usize {
        match self {
            Message::InferRequest(_)
            | Message::InferTicket(_)
            | Message::Open(_)
            | Message::Chunk(_) => MAX_REQUEST_FRAME,
            _ => MAX_CONTROL_FRAME,
        }
    }

    pub(crate) fn encode_body<B: BufMut>(&self, b: &mut B) {
        match self {
            Message::Register(m) => {
                b.put_u16(m.protocol_version);
                b.put_str(&m.node_id);
                b.put_str(&m.enrolment_token);
                b.put_str(&m.software_version);
                b.put_list(&m.gpus, |b, g| {
                    b.put_str(&g.model);
                    b.put_str(&g.class);
                    b.put_var(g.vram_mib);
                });
                b.put_list(&m.workloads.games, |b, s| b.put_str(s));
                b.put_list(&m.workloads.models, |b, s| b.put_str(s));
                b.put_list(&m.workloads.model_caps, |b, c| b.put_var(c.bits().into()));
                b.put_var(m.capacity.game_sessions.into());
                b.put_var(m.capacity.inference_concurrency.into());
                b.put_list(&m.encoders, |b, e| {
                    b.put_str(e.codec.as_str());
                    b.put_str(&e.implementation);
                });
            }
            Message::Registered(m) => {
                b.put_var(m.lease_ms);
                b.put_var(m.heartbeat_ms);
                b.put_opt(&m.node_country, |b, s| b.put_str(s));
            }
            Message::Rejected(m) => {
                b.put_u8(m.code.to_byte());
                b.put_str(&m.reason);
            }
            Message::Heartbeat(m) => {
                b.put_var(m.seq);
                b.put_var(m.active_sessions.into());
                b.put_var(m.queue_depth.into());
                b.put_f32_le(m.load);
                b.put_opt(&m.gpu_util, |b, v| b.put_f32_le(*v));
                b.put_opt(&m.encoder_ms_p50, |b, v| b.put_f32_le(*v));
            }
            Message::HeartbeatAck(m) => b.put_var(m.seq),
            Message::Drain(m) => b.put_var(m.deadline_ms),
            Message::Drained | Message::ForceKeyframe | Message::Resumed => {}
            Message::Shutdown(m) => b.put_str(&m.reason),
            Message::Inventory(m) => {
                b.put_list(&m.gpus, |b, g| {
                    b.put_var(g.index.into());
                    b.put_str(&g.uuid);
                    b.put_var(g.pci_device_id.into());
                    b.put_str(&g.driver_version);
                });
                b.put_list(&m.models, |b, w| {
                    b.put_str(&w.name);
                    b.put_var(w.weights_bytes);
                    b.put_u8(w.source.to_byte());
                });
                b.put_str(&m.encoder);
            }
            Message::Open(m) => {
                b.put_var(m.session_id);
                match &m.kind {
                    SessionKind::Game(g) => {
                        b.put_u8(0);
                        b.put_str(&g.title);
                        b.put_var(g.width.into());
                        b.put_var(g.height.into());
                        b.put_var(g.fps.into());
                        b.put_var(g.bitrate_kbps.into());
                        b.put_str(g.codec.as_str());
                        b.put_opt(&g.traceparent, |b, s| b.put_str(s));
                    }
                    SessionKind::Inference {
                        model,
                        endpoint,
                        request_json,
                        request_id,
                        traceparent,
                    } => {
                        b.put_u8(1);
                        b.put_str(model);
                        b.put_u8(endpoint.to_byte());
                        b.put_str(request_json);
                        b.put_str(request_id);
                        b.put_opt(traceparent, |b, s| b.put_str(s));
                    }
                }
            }
            Message::Accepted(m) => b.put_var(m.session_id),
            Message::Refused(m) => {
                b.put_u8(m.code.to_byte());
                b.put_str(&m.reason);
            }
            Message::SetBitrate(m) => b.put_var(m.kbps.into()),
            Message::Close(m) => b.put_str(&m.reason),
            Message::SetVideo(m) => {
                b.put_var(m.width.into());
                b.put_var(m.height.into());
                b.put_var(m.fps.into());
            }
            Message::Rumble(m) => {
                b.put_u8(m.pad);
                b.put_u16(m.strong_magnitude);
                b.put_u16(m.weak_magnitude);
                b.put_var(m.duration_ms.into());
            }
            Message::Token(m) => {
                b.put_var(m.index.into());
                b.put_str(&m.text);
                b.put_var(m.node_elapsed_us);
            }
            Message::Chunk(m) => {
                b.put_var(m.index.into());
                b.put_str(&m.json);
                b.put_var(m.node_elapsed_us);
            }
            Message::Done(m) => {
                b.put_str(&m.finish_reason);
                b.put_var(m.prompt_tokens.into());
                b.put_var(m.completion_tokens.into());
            }
            Message::Error(m) => {
                b.put_str(&m.code);
                b.put_str(&m.message);
                b.put_bool(m.retryable);
            }
            Message::Ended(m) => b.put_str(&m.reason),
            Message::InputApplied(m) => b.put_var(m.seq),
            Message::InferRequest(m) => {
                b.put_u16(m.protocol_version);
                b.put_str(&m.api_key);
                b.put_u8(m.endpoint.to_byte());
                b.put_str(&m.request_json);
            }
            Message::InferStarted(m) => {
                b.put_str(&m.request_id);
                b.put_str(&m.model);
            }
            Message::PlayRequest(m) => {
                b.put_u16(m.protocol_version);
                b.put_str(&m.api_key);
                b.put_str(&m.game);
                b.put_var(m.width.into());
                b.put_var(m.height.into());
                b.put_var(m.fps.into());
                b.put_var(m.bitrate_kbps.into());
                b.put_list(&m.codecs, |b, c| b.put_str(c.as_str()));
                b.put_opt(&m.traceparent, |b, s| b.put_str(s));
            }
            Message::PlayStarted(m) => {
                b.put_var(m.session_id);
                b.put_var(m.width.into());
                b.put_var(m.height.into());
                b.put_var(m.fps.into());
                b.put_var(m.bitrate_kbps.into());
                b.put_str(m.codec.as_str());
            }
            Message::Paused(m) => b.put_str(&m.reason),
            Message::ListGames(m) => {
                b.put_u16(m.protocol_version);
                b.put_str(&m.api_key);
            }
            Message::GameList(m) => b.put_list(&m.titles, |b, s| b.put_str(s)),
            Message::Redirect(m) => {
                b.put_str(&m.gateway_id);
                b.put_str(&m.quic_address);
                b.put_str(&m.cert_sha256);
                b.put_str(&m.http_url);
                b.put_str(&m.ticket);
            }
            Message::PlayTicket(m) => {
                b.put_u16(m.protocol_version);
                b.put_str(&m.api_key);
                b.put_str(&m.ticket);
            }
            Message::InferTicket(m) => {
                b.put_u16(m.protocol_version);
                b.put_str(&m.api_key);
                b.put_str(&m.ticket);
                b.put_u8(m.endpoint.to_byte());
                b.put_str(&m.request_json);
            }
            Message::ResumeToken(m) => b.put_str(&m.token),
            Message::PlayResume(m) => {
                b.put_u16(m.protocol_version);
                b.put_str(&m.api_key);
                b.put_var(m.session_id);
                b.put_str(&m.token);
            }
            Message::PeerOpen(m) => {
                b.put_u16(m.protocol_version);
                b.put_str(&m.node_id);
            }
        }
    }

    pub(crate) fn decode_body(ty: u8, body: &[u8]) -> Result<Message, DecodeError> {
        let name = type_name(ty).ok_or(DecodeError::UnknownType(ty))?;
        let mut r = Reader::new(body);
        let msg = match ty {
            ty::REGISTER => {
                let protocol_version = version(&mut r, name, "Register.protocol_version")?;
                let node_id = r.string("Register.node_id")?;
                let enrolment_token = r.string("Register.enrolment_token")?;
                let software_version = r.string("Register.software_version")?;
                // A GPU is at least two empty strings and a one-byte varint.
                let gpus = r.list("Register.gpus", 3, MAX_GPUS, |r| {
                    Ok(Gpu {
                        model: r.string("Gpu.model")?,
                        class: r.string("Gpu.class")?,
                        vram_mib: r.varint("Gpu.vram_mib")?,
                    })
                })?;
                let games = r.list("Workloads.games", 1, MAX_NAMES, |r| {
                    r.string("Workloads.games[]")
                })?;
                let models = r.list("Workloads.models", 1, MAX_NAMES, |r| {
                    r.string("Workloads.models[]")
                })?;
                // One byte per capability mask at least; never more masks than models.
                let model_caps = r.list("Workloads.model_caps", 1, models.len(), |r| {
                    Ok(ModelCaps::from_bits(r.varint("Workloads.model_caps[]")?))
                })?;
                let capacity = Capacity {
                    game_sessions: r.u32("Capacity.game_sessions")?,
                    inference_concurrency: r.u32("Capacity.inference_concurrency")?,
                };
                // Two length bytes at least per entry; unknown codecs are dropped, not refused,
                // so that a later node's extra codecs do not stop it registering.
                let encoders = r
                    .list("Register.encoders", 2, MAX_ENCODERS, |r| {
                        let codec = r.string_max("NodeEncoder.codec", MAX_CODEC_NAME_BYTES)?;
                        let implementation =
                            r.string_max("NodeEncoder.implementation", MAX_ENCODER_NAME_BYTES)?;
                        Ok(VideoCodec::from_name(&codec).map(|codec| NodeEncoder {
                            codec,
                            implementation,
                        }))
                    })?
                    .into_iter()
                    .flatten()
                    .collect();
                Message::Register(Register {
                    protocol_version,
                    node_id,
                    enrolment_token,
                    software_version,
                    gpus,
                    workloads: Workloads {
                        games,
                        models,
                        model_caps,
                    },
                    capacity,
                    encoders,
                })
            }
            ty::REGISTERED => Message::Registered(Registered {
                lease_ms: r.varint("Registered.lease_ms")?,
                heartbeat_ms: r.varint("Registered.heartbeat_ms")?,
                node_country: r.option("Registered.node_country", |r| {
                    r.string("Registered.node_country")
                })?,
            }),
            ty::REJECTED => {
                let byte = r.u8("Rejected.code")?;
                let code =
                    RejectCode::from_byte(byte).ok_or_else(|| bad_code("Rejected.code", byte))?;
                Message::Rejected(Rejected {
                    code,
                    reason: r.string("Rejected.reason")?,
                })
            }
            ty::HEARTBEAT => Message::Heartbeat(Heartbeat {
                seq: r.varint("Heartbeat.seq")?,
                active_sessions: r.u32("Heartbeat.active_sessions")?,
                queue_depth: r.u32("Heartbeat.queue_depth")?,
                load: r.f32("Heartbeat.load")?,
                gpu_util: r.option("Heartbeat.gpu_util", |r| r.f32("Heartbeat.gpu_util"))?,
                encoder_ms_p50: r.option("Heartbeat.encoder_ms_p50", |r| {
                    r.f32("Heartbeat.encoder_ms_p50")
                })?,
            }),
            ty::HEARTBEAT_ACK => Message::HeartbeatAck(HeartbeatAck {
                seq: r.varint("HeartbeatAck.seq")?,
            }),
            ty::DRAIN => Message::Drain(Drain {
                deadline_ms: r.varint("Drain.deadline_ms")?,
            }),
            ty::DRAINED => Message::Drained,
            ty::SHUTDOWN => Message::Shutdown(Shutdown {
                reason: r.string("Shutdown.reason")?,
            }),
            ty::INVENTORY => {
                // A GPU identity is at least a one-byte index, two empty strings and a one-byte
                // id; a model at least an empty name, a one-byte size and the source byte.
                let gpus = r.list("Inventory.gpus", 4, MAX_GPUS, |r| {
                    Ok(GpuIdentity {
                        index: r.u32("GpuIdentity.index")?,
                        uuid: r.string_max("GpuIdentity.uuid", MAX_GPU_UUID_BYTES)?,
                        pci_device_id: r.u32("GpuIdentity.pci_device_id")?,
                        driver_version: r
                            .string_max("GpuIdentity.driver_version", MAX_DRIVER_VERSION_BYTES)?,
                    })
                })?;
                let models = r.list("Inventory.models", 3, MAX_NAMES, |r| {
                    let name = r.string("ModelWeights.name")?;
                    let weights_bytes = r.varint("ModelWeights.weights_bytes")?;
                    let byte = r.u8("ModelWeights.source")?;
                    let source = WeightsSource::from_byte(byte)
                        .ok_or_else(|| bad_code("ModelWeights.source", byte))?;
                    Ok(ModelWeights {
                        name,
                        weights_bytes,
                        source,
                    })
                })?;
                let encoder = r.string_max("Inventory.encoder", MAX_ENCODER_NAME_BYTES)?;
                Message::Inventory(Inventory {
                    gpus,
                    models,
                    encoder,
                })
            }
            ty::OPEN => {
                let session_id = r.varint("Open.session_id")?;
                let kind = match r.u8("Open.kind")? {
                    0 => SessionKind::Game(GameParams {
                        title: r.string("Game.title")?,
                        width: r.u32("Game.width")?,
                        height: r.u32("Game.height")?,
                        fps: r.u32("Game.fps")?,
                        bitrate_kbps: r.u32("Game.bitrate_kbps")?,
                        codec: codec(&mut r, "Game.codec")?,
                        traceparent: traceparent(&mut r, "Game.traceparent")?,
                    }),
                    1 => SessionKind::Inference {
                        model: r.string("Inference.model")?,
                        endpoint: endpoint(&mut r, "Inference.endpoint")?,
                        request_json: r.string("Inference.request_json")?,
                        request_id: r.string("Inference.request_id")?,
                        traceparent: r.option("Inference.traceparent", |r| {
                            r.string("Inference.traceparent")
                        })?,
                    },
                    other => return Err(bad_code("Open.kind", other)),
                };
                Message::Open(Open { session_id, kind })
            }
            ty::ACCEPTED => Message::Accepted(Accepted {
                session_id: r.varint("Accepted.session_id")?,
            }),
            ty::REFUSED => {
                let byte = r.u8("Refused.code")?;
                let code =
                    RefuseCode::from_byte(byte).ok_or_else(|| bad_code("Refused.code", byte))?;
                Message::Refused(Refused {
                    code,
                    reason: r.string("Refused.reason")?,
                })
            }
            ty::FORCE_KEYFRAME => Message::ForceKeyframe,
            ty::SET_BITRATE => Message::SetBitrate(SetBitrate {
                kbps: r.u32("SetBitrate.kbps")?,
            }),
            ty::CLOSE => Message::Close(Close {
                reason: r.string("Close.reason")?,
            }),
            // Sizes and rates are checked against the session's limits by whoever acts on
            // them; the codec only keeps them in range of their type.
            ty::SET_VIDEO => Message::SetVideo(SetVideo {
                width: r.u32("SetVideo.width")?,
                height: r.u32("SetVideo.height")?,
                fps: r.u32("SetVideo.fps")?,
            }),
            ty::RUMBLE => {
                let pad = r.u8("Rumble.pad")?;
                if usize::from(pad) >= crate::input::MAX_PADS {
                    return Err(DecodeError::InvalidValue {
                        field: "Rumble.pad",
                        detail: format!("pad {pad}, expected 0..{}", crate::input::MAX_PADS),
                    });
                }
                let strong = r.bytes(2, "Rumble.strong_magnitude")?;
                let strong_magnitude = u16::from_be_bytes([strong[0], strong[1]]);
                let weak = r.bytes(2, "Rumble.weak_magnitude")?;
                let weak_magnitude = u16::from_be_bytes([weak[0], weak[1]]);
                let duration_ms = r.u32("Rumble.duration_ms")?;
                if duration_ms > MAX_RUMBLE_MS {
                    return Err(DecodeError::InvalidValue {
                        field: "Rumble.duration_ms",
                        detail: format!("{duration_ms} ms, at most {MAX_RUMBLE_MS} allowed"),
                    });
                }
                Message::Rumble(Rumble {
                    pad,
                    strong_magnitude,
                    weak_magnitude,
                    duration_ms,
                })
            }
            ty::TOKEN => Message::Token(Token {
                index: r.u32("Token.index")?,
                text: r.string("Token.text")?,
                node_elapsed_us: r.varint("Token.node_elapsed_us")?,
            }),
            ty::CHUNK => Message::Chunk(Chunk {
                index: r.u32("Chunk.index")?,
                json: r.string("Chunk.json")?,
                node_elapsed_us: r.varint("Chunk.node_elapsed_us")?,
            }),
            ty::DONE => Message::Done(Done {
                finish_reason: r.string("Done.finish_reason")?,
                prompt_tokens: r.u32("Done.prompt_tokens")?,
                completion_tokens: r.u32("Done.completion_tokens")?,
            }),
            ty::ERROR => Message::Error(ErrorInfo {
                code: r.string("Error.code")?,
                message: r.string("Error.message")?,
                retryable: r.bool("Error.retryable")?,
            }),
            ty::ENDED => Message::Ended(Ended {
                reason: r.string("Ended.reason")?,
            }),
            ty::INPUT_APPLIED => Message::InputApplied(InputApplied {
                seq: r.varint("InputApplied.seq")?,
            }),
            ty::INFER_REQUEST => Message::InferRequest(InferRequest {
                protocol_version: version(&mut r, name, "InferRequest.protocol_version")?,
                api_key: r.string("InferRequest.api_key")?,
                endpoint: endpoint(&mut r, "InferRequest.endpoint")?,
                request_json: r.string("InferRequest.request_json")?,
            }),
            ty::INFER_STARTED => Message::InferStarted(InferStarted {
                request_id: r.string("InferStarted.request_id")?,
                model: r.string("InferStarted.model")?,
            }),
            ty::PLAY_REQUEST => Message::PlayRequest(PlayRequest {
                protocol_version: version(&mut r, name, "PlayRequest.protocol_version")?,
                api_key: r.string("PlayRequest.api_key")?,
                game: r.string("PlayRequest.game")?,
                width: r.u32("PlayRequest.width")?,
                height: r.u32("PlayRequest.height")?,
                fps: r.u32("PlayRequest.fps")?,
                bitrate_kbps: r.u32("PlayRequest.bitrate_kbps")?,
                codecs: r
                    .list("PlayRequest.codecs", 1, MAX_CODECS, |r| {
                        Ok(VideoCodec::from_name(&r.string_max(
                            "PlayRequest.codecs[]",
                            MAX_CODEC_NAME_BYTES,
                        )?))
                    })?
                    .into_iter()
                    .flatten()
                    .collect(),
                traceparent: traceparent(&mut r, "PlayRequest.traceparent")?,
            }),
            ty::PLAY_STARTED => Message::PlayStarted(PlayStarted {
                session_id: r.varint("PlayStarted.session_id")?,
                width: r.u32("PlayStarted.width")?,
                height: r.u32("PlayStarted.height")?,
                fps: r.u32("PlayStarted.fps")?,
                bitrate_kbps: r.u32("PlayStarted.bitrate_kbps")?,
                codec: codec(&mut r, "PlayStarted.codec")?,
            }),
            ty::PAUSED => Message::Paused(Paused {
                reason: r.string("Paused.reason")?,
            }),
            ty::RESUMED => Message::Resumed,
            ty::LIST_GAMES => Message::ListGames(ListGames {
                protocol_version: version(&mut r, name, "ListGames.protocol_version")?,
                api_key: r.string("ListGames.api_key")?,
            }),
            ty::GAME_LIST => Message::GameList(GameList {
                titles: r.list("GameList.titles", 1, MAX_NAMES, |r| {
                    r.string("GameList.titles[]")
                })?,
            }),
            ty::REDIRECT => Message::Redirect(Redirect {
                gateway_id: r.string("Redirect.gateway_id")?,
                quic_address: r.string("Redirect.quic_address")?,
                cert_sha256: r.string("Redirect.cert_sha256")?,
                http_url: r.string("Redirect.http_url")?,
                ticket: r.string("Redirect.ticket")?,
            }),
            ty::INFER_TICKET => Message::InferTicket(InferTicket {
                protocol_version: version(&mut r, name, "InferTicket.protocol_version")?,
                api_key: r.string("InferTicket.api_key")?,
                ticket: r.string("InferTicket.ticket")?,
                endpoint: endpoint(&mut r, "InferTicket.endpoint")?,
                request_json: r.string("InferTicket.request_json")?,
            }),
            ty::PLAY_TICKET => Message::PlayTicket(PlayTicket {
                protocol_version: version(&mut r, name, "PlayTicket.protocol_version")?,
                api_key: r.string("PlayTicket.api_key")?,
                ticket: r.string("PlayTicket.ticket")?,
            }),
            ty::RESUME_TOKEN => Message::ResumeToken(ResumeToken {
                token: r.string("ResumeToken.token")?,
            }),
            ty::PLAY_RESUME => Message::PlayResume(PlayResume {
                protocol_version: version(&mut r, name, "PlayResume.protocol_version")?,
                api_key: r.string("PlayResume.api_key")?,
                session_id: r.varint("PlayResume.session_id")?,
                token: r.string("PlayResume.token")?,
            }),
            ty::PEER_OPEN => Message::PeerOpen(PeerOpen {
                protocol_version: version(&mut r, name, "PeerOpen.protocol_version")?,
                node_id: r.string("PeerOpen.node_id")?,
            }),
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish(name)?;
        Ok(msg)
    }
}

/// The name of the message with type byte `ty`, or `None` if the byte is unassigned.
pub fn type_name(ty: u8) -> Option<&'static str> {
    Some(match ty {
        ty::REGISTER => "Register",
        ty::REGISTERED => "Registered",
        ty::REJECTED => "Rejected",
        ty::HEARTBEAT => "Heartbeat",
        ty::HEARTBEAT_ACK => "HeartbeatAck",
        ty::DRAIN => "Drain",
        ty::DRAINED => "Drained",
        ty::SHUTDOWN => "Shutdown",
        ty::INVENTORY => "Inventory",
        ty::OPEN => "Open",
        ty::ACCEPTED => "Accepted",
        ty::REFUSED => "Refused",
        ty::FORCE_KEYFRAME => "ForceKeyframe",
        ty::SET_BITRATE => "SetBitrate",
        ty::CLOSE => "Close",
        ty::SET_VIDEO => "SetVideo",
        ty::RUMBLE => "Rumble",
        ty::TOKEN => "Token",
        ty::CHUNK => "Chunk",
        ty::DONE => "Done",
        ty::ERROR => "Error",
        ty::ENDED => "Ended",
        ty::INPUT_APPLIED => "InputApplied",
        ty::INFER_REQUEST => "InferRequest",
        ty::INFER_STARTED => "InferStarted",
        ty::PLAY_REQUEST => "PlayRequest",
        ty::PLAY_STARTED => "PlayStarted",
        ty::PAUSED => "Paused",
        ty::RESUMED => "Resumed",
        ty::LIST_GAMES => "ListGames",
        ty::GAME_LIST => "GameList",
        ty::REDIRECT => "Redirect",
        ty::PLAY_TICKET => "PlayTicket",
        ty::RESUME_TOKEN => "ResumeToken",
        ty::PLAY_RESUME => "PlayResume",
        ty::PEER_OPEN => "PeerOpen",
        ty::INFER_TICKET => "InferTicket",
        _ => return None,
    })
}

/// Reads the fixed big-endian `u16` version that opens every versioned message and rejects any
/// other version before the rest of the body is interpreted, because a future version may lay
/// the body out differently.
/// An optional `traceparent`: the presence byte and the string's framing are checked like any
/// field's (a broken frame is an error), but a value that is not a valid W3C traceparent
/// (any length but 55, upper-case or non-hex digits, a version other than 00, all-zero ids,
/// bytes that are not UTF-8) is ignored: the message decodes with `None`, and the receiver
/// starts a trace of its own.
fn traceparent(r: &mut Reader<'_>, field: &'static str) -> Result<Option<String>, DecodeError> {
    let raw = r.option(field, |r| {
        let len = r.varint(field)?;
        // Checked before converting, as `Reader::string` does, so that a 2^62 length is
        // truncation and never an allocation.
        if len > r.remaining() as u64 {
            return Err(DecodeError::Truncated { field });
        }
        r.bytes(len as usize, field)
    })?;
    Ok(raw
        .filter(|b| is_valid_traceparent(b))
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(str::to_owned))
}

fn version(
    r: &mut Reader<'_>,
    message: &'static str,
    field: &'static str,
) -> Result<u16, DecodeError> {
    let raw = r.bytes(2, field)?;
    let got = u16::from_be_bytes([raw[0], raw[1]]);
    if got != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            message,
            got,
            supported: PROTOCOL_VERSION,
        });
    }
    Ok(got)
}

fn bad_code(field: &'static str, byte: u8) -> DecodeError {
    DecodeError::InvalidValue {
        field,
        detail: format!("unknown code {byte}"),
    }
}

/// A single codec the receiver must act on (the codec of a session): an unknown name is an
/// error, unlike in the lists of what a peer offers or accepts.
fn codec(r: &mut Reader<'_>, field: &'static str) -> Result<VideoCodec, DecodeError> {
    let name = r.string_max(field, MAX_CODEC_NAME_BYTES)?;
    VideoCodec::from_name(&name).ok_or_else(|| DecodeError::InvalidValue {
        field,
        detail: format!("unknown codec {name:?}"),
    })
}

fn endpoint(r: &mut Reader<'_>, field: &'static str) -> Result<Endpoint, DecodeError> {
    let byte = r.u8(field)?;
    Endpoint::from_byte(byte).ok_or_else(|| bad_code(field, byte))
}
