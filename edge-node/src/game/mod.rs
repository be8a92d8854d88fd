//! Game streaming on the node: a frame source (a built-in game, or an external program writing
//! raw frames), paced at the session's frame rate, encoded to H.264 on a dedicated thread, and
//! handed to the session's QUIC stream as [`EncodedFrame`]s.
//!
//! ```text
//!  pacer task (tokio) --tick / frame--> encoder thread (std) --EncodedFrame--> mpsc::Receiver
//!        ^                                 |  builtin: apply input, step, render
//!        | newest frame                    |  encode (IDR at start, on request, every N s)
//!  external program stdout          apply_input(seq, event) --JSON lines--> program stdin
//! ```
//!
//! Nothing runs before [`GameSession::start`] or after [`GameSession::stop`] (or drop): the
//! pacer stops, the encoder thread finishes the frame in hand and exits, an external program's
//! process group is killed, and the frame receiver yields `None` once the end reason is set.

pub mod audio;
pub mod builtin;
pub mod encoder;
pub mod external;
pub mod frame;
#[cfg(feature = "libav")]
pub mod libav;
pub mod pacer;
pub mod rate;
pub mod select;
#[cfg(test)]
mod tests;

pub use builtin::{BuiltinError, BuiltinGame};
pub use encoder::{
    AccessUnit, Encoder, EncoderError, EncoderFactory, EncoderParams, OpenH264Encoder,
};
pub use frame::{FrameError, I420Frame};

use bytes::Bytes;
use nearpath_config::{AudioConfig, EncoderConfig, GameSource};
use nearpath_protocol::frame::FrameHeader;
use nearpath_protocol::input::InputEvent;
use nearpath_protocol::message::{GameParams, Rumble};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Encoded frames buffered for the session's sender. Kept small: a frame waiting here is
/// latency; when it is full the newest frame is dropped and the next one is an IDR.
pub const FRAME_QUEUE: usize = 4;
/// Input events a built-in game buffers between two frames before dropping more.
const MAX_PENDING_INPUTS: usize = 1024;
/// Encode times kept for the percentiles in [`GameStats`].
const ENCODE_TIME_WINDOW: usize = 600;
/// Encode failures in a row after which the session gives up.
const MAX_ENCODE_FAILURES: u32 = 3;
/// Largest frame rate a session may ask for.
pub const MAX_FPS: u32 = 240;
/// Vibrations waiting for the session's sender before more are dropped.
const RUMBLE_QUEUE: usize = 8;
/// The built-in game's rumble on a hit: strong motor, weak motor, milliseconds.
pub const HIT_RUMBLE: (u16, u16, u32) = (40_000, 12_000, 200);

/// One encoded video frame, ready for a [`FrameHeader`] and the session's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    /// Frame counter from 0 per session; a gap means frames were dropped on the node.
    pub seq: u64,
    /// When the picture was captured (rendered, or read from the program), Unix microseconds.
    pub capture_ts_us: u64,
    /// Microseconds from capture to encoded payload (render and encode for built-in games).
    pub encode_us: u32,
    /// The payload starts with SPS, PPS and an IDR picture.
    pub keyframe: bool,
    /// Highest input `seq` applied before the picture was rendered (0: none yet).
    pub input_seq: u64,
    /// Coded width.
    pub width: u16,
    /// Coded height.
    pub height: u16,
    /// H.264 Annex B access unit.
    pub data: Bytes,
}

impl EncodedFrame {
    /// The wire header for this frame in session `session_id`.
    pub fn header(&self, session_id: u64) -> FrameHeader {
        FrameHeader {
            session_id,
            seq: self.seq,
            capture_ts_us: self.capture_ts_us,
            encode_us: self.encode_us,
            keyframe: self.keyframe,
            input_seq: self.input_seq,
            width: self.width,
            height: self.height,
            // An access unit is a few hundred kilobytes at most; saturate rather than wrap.
            payload_len: u32::try_from(self.data.len()).unwrap_or(u32::MAX),
        }
    }
}

/// Why a game session could not start.
#[derive(Debug, Error)]
pub enum GameError {
    /// The session's parameters are unusable (the client asked for them: refuse the `Open`).
    #[error("game {title:?}: {reason}")]
    InvalidParams {
        /// The title asked for.
        title: String,
        /// What is wrong.
        reason: String,
    },
    /// A built-in title that does not exist (the node's configuration is wrong).
    #[error(transparent)]
    Builtin(#[from] BuiltinError),
    /// A command source with an empty argv (the node's configuration is wrong).
    #[error("game {title:?}: the frame source command is empty")]
    EmptyCommand {
        /// The title.
        title: String,
    },
    /// The frame source program could not be started (not found, not executable: the node's
    /// setup is wrong; retrying does not help).
    #[error("game {title:?}: cannot start frame source {program:?}: {source}")]
    Spawn {
        /// The title.
        title: String,
        /// argv\[0\].
        program: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The encoder refused the session's settings.
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    /// The encoder thread could not be started (the node is out of resources; retrying later
    /// may help).
    #[error("cannot start the encoder thread: {0}")]
    Thread(std::io::Error),
    /// [`GameSession::start`] was called outside a Tokio runtime (a bug in the caller).
    #[error("game sessions must be started from within a Tokio runtime")]
    NoRuntime,
}

impl GameError {
    /// Whether the client's request is at fault (bad size, fps or bitrate), as opposed to
    /// the node (configuration, missing program, resources).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            GameError::InvalidParams { .. } | GameError::Encoder(EncoderError::Init { .. })
        )
    }
}

/// Why a running session ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GameEnd {
    /// [`GameSession::stop`] was called or the session was dropped.
    #[error("session stopped")]
    Stopped,
    /// The receiver of encoded frames was dropped.
    #[error("the frame receiver was closed")]
    ReceiverClosed,
    /// The external program exited (or closed its stdout and then exited).
    #[error(
        "frame source {program:?} exited with {status} after {frames} frames{}",
        stderr_tail.as_ref().map(|l| format!(" (last stderr line: {l:?})")).unwrap_or_default()
    )]
    SourceExited {
        /// argv\[0\].
        program: String,
        /// "status N" or "signal N".
        status: String,
        /// Complete frames it wrote.
        frames: u64,
        /// Its last stderr line, when it failed.
        stderr_tail: Option<String>,
    },
    /// The external program closed its stdout but kept running; it was killed.
    #[error("frame source {program:?} closed its output after {frames} frames")]
    SourceClosedOutput {
        /// argv\[0\].
        program: String,
        /// Complete frames it wrote.
        frames: u64,
    },
    /// The external program's output ended in the middle of a frame (wrong size or a crash).
    #[error(
        "frame source {program:?} wrote a short frame ({got} of {expected} bytes) after {frames} frames"
    )]
    ShortFrame {
        /// argv\[0\].
        program: String,
        /// Bytes of the last, partial frame.
        got: usize,
        /// Bytes a frame needs.
        expected: usize,
        /// Complete frames before it.
        frames: u64,
    },
    /// Reading the external program's output failed.
    #[error("reading frames from {program:?} failed after {frames} frames: {error}")]
    SourceIo {
        /// argv\[0\].
        program: String,
        /// Complete frames before the failure.
        frames: u64,
        /// The I/O error.
        error: String,
    },
    /// The encoder failed.
    #[error(transparent)]
    Encoder(EncoderError),
}

/// What [`GameSession::apply_input`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputOutcome {
    /// Applied (or queued for the next frame, or handled by the node, like keyframe requests).
    Applied,
    /// Its seq is not above the last applied one: a late or duplicate datagram, ignored.
    Stale,
    /// The game is not keeping up with input; the event was dropped.
    Dropped,
    /// The session has ended.
    Ended,
}

/// Counters and timings of one session.
#[derive(Debug, Clone, PartialEq)]
pub struct GameStats {
    /// Encoder name.
    pub encoder: &'static str,
    /// Pictures the source produced (rendered, or read complete from the program).
    pub frames_rendered: u64,
    /// Pictures encoded.
    pub frames_encoded: u64,
    /// Encoded frames handed to the receiver.
    pub frames_sent: u64,
    /// Frame times that passed without a frame because the node was behind (pacer slots
    /// missed, or the encoder thread still busy with the previous frame).
    pub frames_dropped_late: u64,
    /// Encoded frames dropped because the receiver was not taking them.
    pub frames_dropped_backpressure: u64,
    /// Frames from an external program replaced by a newer one before their frame time.
    pub source_frames_superseded: u64,
    /// Frame slots skipped before rendering because the session's sender said the path to the
    /// gateway could not take another frame (or the frame rate is reduced at the bitrate floor).
    pub frames_skipped_congestion: u64,
    /// Frames already sent that were reset because they were too late.
    pub frames_reset: u64,
    /// The encoder's target bitrate now, in kbit/s.
    pub bitrate_kbps: u32,
    /// Frames the encoder failed on (lost; the next frame is an IDR).
    pub encode_failures: u64,
    /// IDR frames sent.
    pub keyframes: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Input events applied.
    pub inputs_applied: u64,
    /// Input events ignored as stale (seq not above the last applied).
    pub inputs_stale: u64,
    /// Input events dropped because the game was not taking them.
    pub inputs_dropped: u64,
    /// Highest input seq applied.
    pub last_input_seq: u64,
    /// Median time in the encoder over the last frames, in milliseconds.
    pub encoder_ms_p50: Option<f64>,
    /// 99th percentile of the same.
    pub encoder_ms_p99: Option<f64>,
    /// Time since the session started.
    pub uptime: Duration,
}

#[derive(Default)]
struct Counters {
    frames_rendered: AtomicU64,
    frames_encoded: AtomicU64,
    frames_sent: AtomicU64,
    frames_dropped_late: AtomicU64,
    frames_dropped_backpressure: AtomicU64,
    source_frames_superseded: AtomicU64,
    frames_skipped_congestion: AtomicU64,
    frames_reset: AtomicU64,
    encode_failures: AtomicU64,
    keyframes: AtomicU64,
    bytes_sent: AtomicU64,
    inputs_applied: AtomicU64,
    inputs_stale: AtomicU64,
    inputs_dropped: AtomicU64,
}

/// Decides, before a frame slot is rendered and encoded, whether it is worth encoding. The
/// session's sender knows whether the path can take another frame; skipping a slot before
/// encoding keeps the encoder's reference chain intact, so no keyframe is needed after it.
pub trait FrameGate: Send + Sync {
    /// Whether frame slot `index` (the pacer's slot number) should be encoded.
    fn admit(&self, index: u64) -> bool;
}

/// Where accepted input goes.
enum InputSink {
    /// Queued for the encoder thread, which applies it before rendering the next frame.
    Builtin(Vec<InputEvent>),
    /// Forwarded to the external program's stdin.
    External(mpsc::Sender<(u64, InputEvent)>),
}

struct InputState {
    last_seq: u64,
    sink: InputSink,
}

/// State shared by the session handle, the pacer, the encoder thread and the source tasks.
struct Shared {
    counters: Counters,
    input: Mutex<InputState>,
    force_idr: AtomicBool,
    /// A bitrate change not yet applied by the encoder thread, in kbit/s (0: none).
    new_bitrate: AtomicU32,
    /// The bitrate the encoder targets (the last one asked for), in kbit/s.
    bitrate: AtomicU32,
    /// Asked before each frame slot whether to encode it (the session's sender sets it).
    gate: Mutex<Option<Arc<dyn FrameGate>>>,
    encode_times_us: Mutex<Ring>,
    end: watch::Sender<Option<GameEnd>>,
    cancel: CancellationToken,
    /// Spare frame buffers for the external reader, so 60 fps does not mean 60 allocations of
    /// megabytes a second.
    pool: Mutex<Vec<Vec<u8>>>,
    /// A size change (width, height, fps) not yet applied by the encoder thread.
    video: Mutex<Option<(u32, u32, u32)>>,
    /// Vibrations the game asks for (built-in game: one per hit), for the session's sender;
    /// full, it drops them (a late vibration is worth nothing).
    rumble: mpsc::Sender<Rumble>,
    /// The session's timeline: frame slot 0 and audio sample 0 are due at its instant.
    epoch: audio::Epoch,
    /// What the built-in game's sound follows (thrust, hits), updated each rendered frame.
    synth: Arc<audio::SynthInputs>,
    /// An external program's audio pipe until [`GameSession::start_audio`] takes it.
    audio_pipe: Mutex<Option<std::fs::File>>,
    /// Whether [`GameSession::start_audio`] has run.
    audio_started: AtomicBool,
}

impl Shared {
    /// Records the end reason (the first one wins) and stops everything.
    fn end(&self, reason: GameEnd) {
        self.end.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(reason);
                true
            } else {
                false
            }
        });
        self.cancel.cancel();
    }

    fn buffer(&self, len: usize) -> Vec<u8> {
        let reused = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(b) if b.len() == len => b,
            _ => vec![0; len],
        }
    }

    fn recycle(&self, buf: Vec<u8>) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 3 {
            pool.push(buf);
        }
    }
}

/// A fixed-size window of recent samples.
struct Ring {
    samples: Vec<u32>,
    next: usize,
}

impl Ring {
    fn push(&mut self, v: u32) {
        if self.samples.len() < ENCODE_TIME_WINDOW {
            self.samples.push(v);
        } else {
            self.samples[self.next] = v;
        }
        self.next = (self.next + 1) % ENCODE_TIME_WINDOW;
    }

    /// The `q` quantile (0..=1) in milliseconds.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.samples.is_empty() {
            return None;
        }
        let mut v = self.samples.clone();
        let last = v.len() - 1;
        let i = ((last as f64 * q).round() as usize).min(last);
        let (_, x, _) = v.select_nth_unstable(i);
        Some(f64::from(*x) / 1000.0)
    }
}

/// A running game session. Dropping it stops the session.
pub struct GameSession {
    shared: Arc<Shared>,
    end_rx: watch::Receiver<Option<GameEnd>>,
    /// The parameters the session started with.
    params: GameParams,
    /// The parameters in force now (size and rate follow [`GameSession::set_video`]).
    video: Mutex<GameParams>,
    encoder: &'static str,
    started: Instant,
    /// The frames come from an external program, whose size is fixed.
    external: bool,
    /// The pacer's frame rate.
    fps: watch::Sender<u32>,
    /// Vibrations the game asks for, until [`GameSession::take_rumbles`] takes them.
    rumble: Mutex<Option<mpsc::Receiver<Rumble>>>,
}

impl std::fmt::Debug for GameSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GameSession")
            .field("params", &self.params)
            .field("encoder", &self.encoder)
            .field("ended", &self.ended())
            .finish()
    }
}

/// Work for the encoder thread.
enum Work {
    /// Render and encode frame slot `index` of the built-in game.
    Render {
        /// The slot's number.
        index: u64,
        /// When the slot is due, in microseconds after the session's epoch.
        at_us: u64,
    },
    /// Encode a frame from the external program.
    Frame(external::LatestFrame),
}

/// What the encoder thread works from.
enum ThreadSource {
    Builtin(Box<BuiltinGame>),
    External,
}

/// What the pacer feeds.
enum PaceSource {
    Builtin,
    External(Arc<external::FrameSlot>),
}

impl GameSession {
    /// Starts a session with the software (OpenH264) encoder: checks the parameters, starts
    /// the frame source (built-in game `params.title`, or the configured program), the encoder
    /// thread and the pacer. Frames arrive on the returned receiver; it yields `None` once the
    /// session has ended, and [`GameSession::ended`] then says why. Must be called within a
    /// Tokio runtime.
    pub fn start(
        params: GameParams,
        source: &GameSource,
        encoder_cfg: &EncoderConfig,
    ) -> Result<(GameSession, mpsc::Receiver<EncodedFrame>), GameError> {
        Self::start_with_encoder(params, source, encoder_cfg, encoder::openh264_factory())
    }

    /// [`GameSession::start`] with another encoder (a hardware one, say), made by
    /// `make_encoder` from the session's settings, and made again by it at a new size or frame
    /// rate ([`GameSession::set_video`]).
    pub fn start_with_encoder(
        params: GameParams,
        source: &GameSource,
        encoder_cfg: &EncoderConfig,
        make_encoder: EncoderFactory,
    ) -> Result<(GameSession, mpsc::Receiver<EncodedFrame>), GameError> {
        validate(&params)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(GameError::NoRuntime);
        }
        let (w, h, fps) = (params.width, params.height, params.fps);
        // The built-in game is made first: an unknown title should not cost an encoder.
        let builtin = match source {
            GameSource::Builtin {} => Some(Box::new(BuiltinGame::new(&params.title, w, h)?)),
            GameSource::Command { command } if command.is_empty() => {
                return Err(GameError::EmptyCommand {
                    title: params.title.clone(),
                })
            }
            GameSource::Command { .. } => None,
        };
        let threads = encoder_cfg.threads.max(1);
        let encoder = make_encoder(EncoderParams {
            width: w,
            height: h,
            fps,
            bitrate_kbps: params.bitrate_kbps,
            threads,
        })?;
        let encoder_name = encoder.name();

        let (end_tx, end_rx) = watch::channel(None);
        let (rumble_tx, rumble_rx) = mpsc::channel(RUMBLE_QUEUE);
        let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
        let cancel = CancellationToken::new();
        let mut external_parts = None;
        let external_source = builtin.is_none();
        let mut audio_pipe = None;
        let (sink, thread_source, pace_source) = match (builtin, source) {
            (Some(game), _) => (
                InputSink::Builtin(Vec::new()),
                ThreadSource::Builtin(game),
                PaceSource::Builtin,
            ),
            (None, GameSource::Command { command }) => {
                let mut spawned = external::spawn(command, &params.title, w, h, fps)?;
                audio_pipe = spawned.audio.take();
                let (input_tx, input_rx) = mpsc::channel(external::INPUT_QUEUE);
                let slot = Arc::new(external::FrameSlot::default());
                external_parts = Some((spawned, input_rx, slot.clone()));
                (
                    InputSink::External(input_tx),
                    ThreadSource::External,
                    PaceSource::External(slot),
                )
            }
            (None, GameSource::Builtin {}) => {
                // Unreachable by construction (builtin is Some for Builtin); refuse rather
                // than panic.
                return Err(GameError::InvalidParams {
                    title: params.title.clone(),
                    reason: "built-in game missing".into(),
                });
            }
        };
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            input: Mutex::new(InputState { last_seq: 0, sink }),
            force_idr: AtomicBool::new(false),
            new_bitrate: AtomicU32::new(0),
            bitrate: AtomicU32::new(params.bitrate_kbps),
            gate: Mutex::new(None),
            encode_times_us: Mutex::new(Ring {
                samples: Vec::new(),
                next: 0,
            }),
            end: end_tx,
            cancel,
            pool: Mutex::new(Vec::new()),
            video: Mutex::new(None),
            rumble: rumble_tx,
            epoch: audio::Epoch {
                at: Instant::now(),
                unix_us: unix_micros(),
            },
            synth: Arc::default(),
            audio_pipe: Mutex::new(audio_pipe),
            audio_started: AtomicBool::new(false),
        });
        let (fps_tx, fps_rx) = watch::channel(fps);

        // Capacity 1: a frame may wait while the previous one is encoded, but never more.
        let (work_tx, work_rx) = std_mpsc::sync_channel::<Work>(1);
        let idr_interval = (encoder_cfg.idr_interval_s > 0)
            .then(|| Duration::from_secs(encoder_cfg.idr_interval_s));
        let thread_shared = shared.clone();
        let thread = EncoderThread {
            shared: thread_shared,
            encoder,
            source: thread_source,
            frames: frames_tx,
            keyframes: KeyframePolicy::new(idr_interval),
            seq: 0,
            failures: 0,
            width: w as u16,
            height: h as u16,
            threads,
            factory: make_encoder,
        };
        std::thread::Builder::new()
            .name(thread_name(&params.title))
            .spawn(move || thread.run(work_rx))
            .map_err(GameError::Thread)?;

        if let Some((spawned, input_rx, slot)) = external_parts {
            external::run(
                spawned,
                shared.clone(),
                slot,
                input_rx,
                Arc::new(AtomicU64::new(0)),
                w,
                h,
            );
        }
        tokio::spawn(pace(shared.clone(), fps_rx, work_tx, pace_source));
        tracing::info!(
            title = %params.title,
            width = w,
            height = h,
            fps,
            bitrate_kbps = params.bitrate_kbps,
            encoder = encoder_name,
            "game session started"
        );
        Ok((
            GameSession {
                shared,
                end_rx,
                video: Mutex::new(params.clone()),
                params,
                encoder: encoder_name,
                started: Instant::now(),
                external: external_source,
                fps: fps_tx,
                rumble: Mutex::new(Some(rumble_rx)),
            },
            frames_rx,
        ))
    }

    /// The session's epoch on the Unix clock, microseconds: when frame slot 0 and audio sample
    /// 0 were due (the built-in game's beep and flash are timed from it).
    pub fn epoch_unix_us(&self) -> u64 {
        self.shared.epoch.unix_us
    }

    /// The parameters the session started with.
    pub fn params(&self) -> &GameParams {
        &self.params
    }

    /// The vibrations the game asks for (the built-in game: one on each hit of the ship, on
    /// the pad that sent input last); `None` after the first call. External programs ask for
    /// none (their contract has no channel for it).
    pub fn take_rumbles(&self) -> Option<mpsc::Receiver<Rumble>> {
        self.rumble.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The parameters in force now: the start's, with the size and frame rate of the last
    /// accepted [`GameSession::set_video`].
    pub fn current_params(&self) -> GameParams {
        self.video.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the picture size and frame rate without a new session: the pacer runs at the
    /// new rate at once, and the encoder thread, before its next frame, resizes the built-in
    /// game (its state carries over, the ship where it was relative to the arena) and makes a
    /// new encoder at the new size through the session's [`EncoderFactory`], whose first frame
    /// is an IDR. Changes that arrive faster than frames replace each other (the newest wins),
    /// so a flood costs at most one new encoder a frame. Refused, with the session unchanged,
    /// for sizes or rates outside what [`GameSession::start`] accepts and for external
    /// programs, which write frames of the size they were started with.
    pub fn set_video(&self, width: u32, height: u32, fps: u32) -> Result<(), GameError> {
        let mut video = self.video.lock().unwrap_or_else(|p| p.into_inner());
        let wanted = GameParams {
            width,
            height,
            fps,
            ..video.clone()
        };
        validate(&wanted)?;
        if self.external {
            return Err(GameError::InvalidParams {
                title: wanted.title,
                reason: format!(
                    "the frame source is an external program, which writes {}x{} frames; \
                     its size cannot change mid-session (start a new session instead)",
                    video.width, video.height
                ),
            });
        }
        // A new encoder even for a rate alone: its rate control budgets bits per frame.
        *self.shared.video.lock().unwrap_or_else(|p| p.into_inner()) = Some((width, height, fps));
        self.fps.send_replace(fps);
        *video = wanted;
        tracing::info!(width, height, fps, "video changed");
        Ok(())
    }

    /// Starts the session's sound, once: the built-in game's synthesiser, or the reader of an
    /// external program's audio pipe, each encoding Opus with `cfg`. Packets arrive on the
    /// returned receiver until the session ends. `None` when audio is disabled (an external
    /// program's pipe is then read and discarded, so it never blocks on it) or already started.
    pub fn start_audio(
        &self,
        cfg: &AudioConfig,
    ) -> Result<Option<audio::AudioReceiver>, audio::AudioError> {
        if self.shared.audio_started.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        let name = format!("audio-{}", &thread_name(&self.params.title)[5..]);
        let pipe = self
            .shared
            .audio_pipe
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match pipe {
            Some(pipe) => audio::spawn_pipe(
                cfg.enabled.then_some(cfg),
                pipe,
                self.shared.cancel.clone(),
                name,
            ),
            None if cfg.enabled => audio::spawn_builtin(
                cfg,
                self.shared.epoch,
                self.shared.synth.clone(),
                self.shared.cancel.clone(),
                name,
            )
            .map(Some),
            None => Ok(None),
        }
    }

    /// Applies one input event from the client's datagram `seq`. Events with a seq not above
    /// the last applied one are stale (datagrams arrive out of order) and ignored; keyframe
    /// requests force an IDR; pings are ignored. Cheap and callable from any thread.
    pub fn apply_input(&self, seq: u64, event: InputEvent) -> InputOutcome {
        if self.shared.cancel.is_cancelled() {
            return InputOutcome::Ended;
        }
        let c = &self.shared.counters;
        let mut input = self.shared.input.lock().unwrap_or_else(|p| p.into_inner());
        if seq <= input.last_seq {
            c.inputs_stale.fetch_add(1, Ordering::Relaxed);
            return InputOutcome::Stale;
        }
        let outcome = match event {
            InputEvent::KeyframeRequest => {
                self.shared.force_idr.store(true, Ordering::Release);
                InputOutcome::Applied
            }
            InputEvent::Ping { .. } => InputOutcome::Applied,
            event => match &mut input.sink {
                InputSink::Builtin(pending) if pending.len() < MAX_PENDING_INPUTS => {
                    pending.push(event);
                    InputOutcome::Applied
                }
                InputSink::Builtin(_) => InputOutcome::Dropped,
                InputSink::External(tx) => match tx.try_send((seq, event)) {
                    Ok(()) => InputOutcome::Applied,
                    Err(_) => InputOutcome::Dropped,
                },
            },
        };
        match outcome {
            InputOutcome::Applied => {
                input.last_seq = seq;
                c.inputs_applied.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                c.inputs_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        outcome
    }

    /// Makes the next frame an IDR (with SPS/PPS), e.g. after the client lost a frame.
    pub fn force_keyframe(&self) {
        self.shared.force_idr.store(true, Ordering::Release);
    }

    /// Changes the target bitrate from the next frame on (0 is ignored).
    pub fn set_bitrate(&self, kbps: u32) {
        if kbps > 0 {
            self.shared.bitrate.store(kbps, Ordering::Relaxed);
            self.shared.new_bitrate.store(kbps, Ordering::Release);
        }
    }

    /// Installs the gate asked before every frame slot (replacing any earlier one).
    pub fn set_gate(&self, gate: Arc<dyn FrameGate>) {
        *self.shared.gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(gate);
    }

    /// Counts a frame the sender reset after it was handed over (for [`GameStats`]).
    pub fn note_frame_reset(&self) {
        self.shared
            .counters
            .frames_reset
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counters and encoder timings so far.
    pub fn stats(&self) -> GameStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (p50, p99) = {
            let ring = self
                .shared
                .encode_times_us
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            (ring.quantile_ms(0.5), ring.quantile_ms(0.99))
        };
        let last_input_seq = self
            .shared
            .input
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_seq;
        GameStats {
            encoder: self.encoder,
            frames_rendered: get(&c.frames_rendered),
            frames_encoded: get(&c.frames_encoded),
            frames_sent: get(&c.frames_sent),
            frames_dropped_late: get(&c.frames_dropped_late),
            frames_dropped_backpressure: get(&c.frames_dropped_backpressure),
            source_frames_superseded: get(&c.source_frames_superseded),
            frames_skipped_congestion: get(&c.frames_skipped_congestion),
            frames_reset: get(&c.frames_reset),
            bitrate_kbps: self.shared.bitrate.load(Ordering::Relaxed),
            encode_failures: get(&c.encode_failures),
            keyframes: get(&c.keyframes),
            bytes_sent: get(&c.bytes_sent),
            inputs_applied: get(&c.inputs_applied),
            inputs_stale: get(&c.inputs_stale),
            inputs_dropped: get(&c.inputs_dropped),
            last_input_seq,
            encoder_ms_p50: p50,
            encoder_ms_p99: p99,
            uptime: self.started.elapsed(),
        }
    }

    /// Why the session ended, or `None` while it runs.
    pub fn ended(&self) -> Option<GameEnd> {
        self.end_rx.borrow().clone()
    }

    /// Waits until the session ends and says why.
    pub async fn closed(&self) -> GameEnd {
        let mut rx = self.end_rx.clone();
        let end = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            // The sender lives in `shared`, which `self` holds; it cannot be gone.
            Err(_) => None,
        };
        end.unwrap_or(GameEnd::Stopped)
    }

    /// Ends the session: no more frames are produced, an external program is killed.
    /// Idempotent; the reason is [`GameEnd::Stopped`] unless the session had already ended.
    pub fn stop(&self) {
        self.shared.end(GameEnd::Stopped);
    }
}

impl Drop for GameSession {
    fn drop(&mut self) {
        self.stop();
    }
}

fn validate(p: &GameParams) -> Result<(), GameError> {
    let bad = |reason: String| {
        Err(GameError::InvalidParams {
            title: p.title.clone(),
            reason,
        })
    };
    if p.width < 16 || p.height < 16 || !p.width.is_multiple_of(2) || !p.height.is_multiple_of(2) {
        return bad(format!(
            "{}x{} is not a supported size (even, at least 16x16)",
            p.width, p.height
        ));
    }
    if p.width.max(p.height) > 3840 || p.width.min(p.height) > 2160 {
        return bad(format!("{}x{} is larger than 3840x2160", p.width, p.height));
    }
    if p.fps == 0 || p.fps > MAX_FPS {
        return bad(format!("{} fps is outside 1..={MAX_FPS}", p.fps));
    }
    if p.bitrate_kbps == 0 {
        return bad("a bitrate of 0 kbit/s".into());
    }
    Ok(())
}

/// A thread name for the session's encoder thread: `game-` and the title's first letters,
/// without characters a thread name cannot hold (a NUL would make `spawn` panic).
fn thread_name(title: &str) -> String {
    let clean: String = title
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(10)
        .collect();
    format!("game-{clean}")
}

/// Microseconds since the Unix epoch (0 if the clock is before 1970).
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Hands frame slots to the encoder thread at the session's rate, dropping (not queueing) the
/// ones it cannot take.
async fn pace(
    shared: Arc<Shared>,
    mut fps: watch::Receiver<u32>,
    work: std_mpsc::SyncSender<Work>,
    source: PaceSource,
) {
    let rate = *fps.borrow_and_update();
    // Slot 0 is due at the session's epoch, the instant its sound's sample 0 is due too.
    let epoch = tokio::time::Instant::from_std(shared.epoch.at);
    let mut pacer = pacer::Pacer::new(rate, epoch);
    // Slot numbers count on across frame-rate changes (the built-in game steps once a slot),
    // so a new pacer's slots are numbered from where the old one stopped.
    let mut base = 0u64;
    let mut last = 0u64;
    let late = &shared.counters.frames_dropped_late;
    loop {
        let tick = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            changed = fps.changed() => {
                if changed.is_err() {
                    break;
                }
                let rate = *fps.borrow_and_update();
                base = last + 1;
                pacer = pacer::Pacer::new(rate, tokio::time::Instant::now());
                continue;
            }
            tick = pacer.tick() => pacer::Tick { index: base + tick.index, ..tick },
        };
        last = tick.index;
        late.fetch_add(tick.missed, Ordering::Relaxed);
        let gate = shared
            .gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if gate.is_some_and(|g| !g.admit(tick.index)) {
            // The path cannot take another frame now: skip the slot before rendering, never
            // queue. An external program's frame stays in its slot and is superseded.
            shared
                .counters
                .frames_skipped_congestion
                .fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let item = match &source {
            PaceSource::Builtin => Work::Render {
                index: tick.index,
                // The slot's place on the session's timeline, which the sound shares: after a
                // frame-rate change slot numbers no longer say it.
                at_us: u64::try_from(tick.due.saturating_duration_since(epoch).as_micros())
                    .unwrap_or(u64::MAX),
            },
            PaceSource::External(slot) => match slot.take() {
                Some(frame) => Work::Frame(frame),
                // The program has not produced a new frame since the last slot.
                None => continue,
            },
        };
        match work.try_send(item) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(item)) => {
                late.fetch_add(1, Ordering::Relaxed);
                if let Work::Frame(f) = item {
                    shared.recycle(f.frame.into_vec());
                }
            }
            // The encoder thread has ended (and set the reason).
            Err(std_mpsc::TrySendError::Disconnected(_)) => break,
        }
    }
    // Dropping `work` lets the encoder thread finish.
}

/// When to ask the encoder for an IDR.
struct KeyframePolicy {
    interval: Option<Duration>,
    last: Option<Instant>,
}

impl KeyframePolicy {
    fn new(interval: Option<Duration>) -> Self {
        Self {
            interval,
            last: None,
        }
    }

    /// Whether the frame captured at `now` must be an IDR: the first one, a requested one, or
    /// one a whole interval after the last IDR.
    fn wants_idr(&self, now: Instant, requested: bool) -> bool {
        match (self.last, self.interval) {
            (None, _) => true,
            _ if requested => true,
            (Some(last), Some(interval)) => now.saturating_duration_since(last) >= interval,
            (Some(_), None) => false,
        }
    }

    fn produced(&mut self, keyframe: bool, at: Instant) {
        if keyframe {
            self.last = Some(at);
        }
    }
}

/// The session's dedicated thread: renders (built-in games) and encodes.
struct EncoderThread {
    shared: Arc<Shared>,
    encoder: Box<dyn Encoder>,
    source: ThreadSource,
    frames: mpsc::Sender<EncodedFrame>,
    keyframes: KeyframePolicy,
    seq: u64,
    /// Encode failures since the last success.
    failures: u32,
    width: u16,
    height: u16,
    threads: u16,
    /// Makes the encoder again when the size or rate changes.
    factory: EncoderFactory,
}

impl EncoderThread {
    fn run(mut self, work: std_mpsc::Receiver<Work>) {
        // Ends when the pacer drops its sender (session over) or on a fatal error.
        while let Ok(item) = work.recv() {
            if self.shared.cancel.is_cancelled() {
                break;
            }
            if let Err(end) = self.one(item) {
                self.shared.end(end);
                break;
            }
        }
        // Dropping `self.frames` now closes the receiver, after the reason was recorded.
    }

    /// Applies a pending size or rate change: a new encoder from the factory (its first frame
    /// an IDR) and, for a built-in game, a resized picture. A factory that fails leaves the
    /// session as it was (logged): the player keeps a picture rather than losing the session.
    fn apply_video(&mut self) {
        let pending = self
            .shared
            .video
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some((width, height, fps)) = pending else {
            return;
        };
        let (Ok(w16), Ok(h16)) = (u16::try_from(width), u16::try_from(height)) else {
            return;
        };
        let params = EncoderParams {
            width,
            height,
            fps,
            bitrate_kbps: self.shared.bitrate.load(Ordering::Relaxed),
            threads: self.threads,
        };
        let encoder = match (self.factory)(params) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, width, height, fps, "no encoder at the new size; keeping the old one");
                return;
            }
        };
        if let ThreadSource::Builtin(game) = &mut self.source {
            if let Err(e) = game.resize(width, height) {
                tracing::warn!(error = %e, width, height, "the game cannot render at the new size");
                return;
            }
        }
        self.encoder = encoder;
        (self.width, self.height) = (w16, h16);
        self.shared.force_idr.store(true, Ordering::Release);
    }

    fn one(&mut self, item: Work) -> Result<(), GameEnd> {
        self.apply_video();
        let (captured, capture_ts_us, input_seq, external) = match item {
            Work::Render { index, at_us } => {
                let ThreadSource::Builtin(game) = &mut self.source else {
                    return Ok(());
                };
                let captured = Instant::now();
                let capture_ts_us = unix_micros();
                let input_seq = {
                    let mut input = self.shared.input.lock().unwrap_or_else(|p| p.into_inner());
                    if let InputSink::Builtin(pending) = &mut input.sink {
                        for event in pending.drain(..) {
                            game.apply_input(&event);
                        }
                    }
                    input.last_seq
                };
                let hits = game.hits();
                game.advance_to(index);
                if game.hits() > hits {
                    let _ = self.shared.rumble.try_send(Rumble {
                        pad: game.last_pad(),
                        strong_magnitude: HIT_RUMBLE.0,
                        weak_magnitude: HIT_RUMBLE.1,
                        duration_ms: HIT_RUMBLE.2,
                    });
                }
                game.render();
                if audio::flash_on(at_us) {
                    game.draw_flash();
                }
                let synth = &self.shared.synth;
                synth
                    .thrust_milli
                    .store((game.thrust() * 1000.0) as u32, Ordering::Relaxed);
                synth.hits.store(game.hits(), Ordering::Relaxed);
                self.shared
                    .counters
                    .frames_rendered
                    .fetch_add(1, Ordering::Relaxed);
                (captured, capture_ts_us, input_seq, None)
            }
            Work::Frame(f) => (f.captured, f.capture_ts_us, f.input_seq, Some(f.frame)),
        };
        let frame = match (&external, &self.source) {
            (Some(f), _) => f,
            (None, ThreadSource::Builtin(game)) => game.frame(),
            (None, ThreadSource::External) => return Ok(()),
        };

        let kbps = self.shared.new_bitrate.swap(0, Ordering::AcqRel);
        if kbps > 0 {
            if let Err(e) = self.encoder.set_bitrate(kbps) {
                if e.is_fatal() {
                    return Err(GameEnd::Encoder(e));
                }
                tracing::warn!(error = %e, "bitrate change refused");
            }
        }
        let requested = self.shared.force_idr.swap(false, Ordering::AcqRel);
        let force = self.keyframes.wants_idr(captured, requested);
        let t0 = Instant::now();
        let result = self.encoder.encode(frame, force);
        let encode_time = t0.elapsed();
        if let Some(buf) = external {
            self.shared.recycle(buf.into_vec());
        }
        let c = &self.shared.counters;
        let au = match result {
            Ok(Some(au)) => au,
            Ok(None) => return Ok(()),
            Err(e @ EncoderError::Encode { .. }) if self.failures + 1 < MAX_ENCODE_FAILURES => {
                // One bad picture should not end the game: lose it and restart from an IDR.
                self.failures += 1;
                c.encode_failures.fetch_add(1, Ordering::Relaxed);
                self.shared.force_idr.store(true, Ordering::Release);
                tracing::warn!(error = %e, "frame lost to an encoder failure");
                return Ok(());
            }
            Err(e) => {
                c.encode_failures.fetch_add(1, Ordering::Relaxed);
                return Err(GameEnd::Encoder(e));
            }
        };
        self.failures = 0;
        c.frames_encoded.fetch_add(1, Ordering::Relaxed);
        self.shared
            .encode_times_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(u32::try_from(encode_time.as_micros()).unwrap_or(u32::MAX));
        self.keyframes.produced(au.keyframe, captured);
        let out = EncodedFrame {
            seq: self.seq,
            capture_ts_us,
            encode_us: u32::try_from(captured.elapsed().as_micros()).unwrap_or(u32::MAX),
            keyframe: au.keyframe,
            input_seq,
            width: self.width,
            height: self.height,
            data: au.data,
        };
        self.seq += 1;
        let len = out.data.len() as u64;
        // Counted before the frame becomes visible to the receiver (and taken back if it is
        // not sent), so stats never lag behind what the receiver has seen.
        let keyframes = u64::from(au.keyframe);
        c.frames_sent.fetch_add(1, Ordering::Relaxed);
        c.bytes_sent.fetch_add(len, Ordering::Relaxed);
        c.keyframes.fetch_add(keyframes, Ordering::Relaxed);
        let unsend = || {
            c.frames_sent.fetch_sub(1, Ordering::Relaxed);
            c.bytes_sent.fetch_sub(len, Ordering::Relaxed);
            c.keyframes.fetch_sub(keyframes, Ordering::Relaxed);
        };
        match self.frames.try_send(out) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                unsend();
                // The decoder will miss this frame's reference: restart from an IDR.
                c.frames_dropped_backpressure
                    .fetch_add(1, Ordering::Relaxed);
                self.shared.force_idr.store(true, Ordering::Release);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                unsend();
                Err(GameEnd::ReceiverClosed)
            }
        }
    }
}
