//! H.264 encoding behind a small trait, so a hardware encoder (NVENC through ffmpeg or
//! GStreamer, say) can be added without touching the session code.
//!
//! The software implementation is Cisco's OpenH264, set up for browsers and low latency:
//! Constrained Baseline (no B-frames, CAVLC), Annex B output with start codes, SPS and PPS in
//! front of every IDR (so a decoder can join at any keyframe), bitrate rate control with frame
//! skipping off (a skipped frame would look like a stall), and IDRs only when the caller asks
//! (the session asks at the start, on request and every `idr_interval_s`).

use super::frame::I420Frame;
use bytes::Bytes;
use openh264::encoder::{
    BitRate, Complexity, EncoderConfig as H264Config, FrameRate, FrameType, IntraFramePeriod,
    Profile, RateControlMode, UsageType,
};
use openh264::formats::YUVSlices;
use openh264::{OpenH264API, Timestamp};
use std::ffi::{c_char, c_int, c_void, CStr};
use thiserror::Error;

/// Receives OpenH264's own log messages, which it would otherwise print to standard error
/// outside the logger (the parameter adjustments it reports while initialising, at WARNING):
/// they become `tracing` events on target `openh264` at the library's level, where the default
/// filter caps them at `error` (`nearpath_telemetry::LIBRARY_CAPS`).
unsafe extern "C" fn openh264_log(_ctx: *mut c_void, level: c_int, text: *const c_char) {
    use openh264_sys2::{WELS_LOG_DEBUG, WELS_LOG_ERROR, WELS_LOG_INFO, WELS_LOG_WARNING};
    if text.is_null() {
        return;
    }
    // SAFETY: OpenH264 passes a NUL-terminated string that lives for the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim_end();
    match level {
        l if l <= WELS_LOG_ERROR as c_int => tracing::error!(target: "openh264", "{text}"),
        l if l <= WELS_LOG_WARNING as c_int => tracing::warn!(target: "openh264", "{text}"),
        l if l <= WELS_LOG_INFO as c_int => tracing::info!(target: "openh264", "{text}"),
        l if l <= WELS_LOG_DEBUG as c_int => tracing::debug!(target: "openh264", "{text}"),
        _ => tracing::trace!(target: "openh264", "{text}"),
    }
}

/// An OpenH264 encoder whose messages go through [`openh264_log`]. The callback is installed
/// before the codec initialises (on the first frame), which is when it warns.
fn open_codec(config: H264Config) -> Result<openh264::encoder::Encoder, openh264::Error> {
    use openh264_sys2::{WelsTraceCallback, ENCODER_OPTION_TRACE_CALLBACK};
    let mut inner =
        openh264::encoder::Encoder::with_api_config(OpenH264API::from_source(), config)?;
    let mut callback: WelsTraceCallback = Some(openh264_log);
    // SAFETY: the trace options are accepted before initialisation; the option is a pointer to
    // the callback, which OpenH264 copies, and the callback is a plain function.
    let rc = unsafe {
        inner.raw_api().set_option(
            ENCODER_OPTION_TRACE_CALLBACK,
            std::ptr::from_mut(&mut callback).cast(),
        )
    };
    if rc != 0 {
        tracing::debug!(
            rc,
            "OpenH264 refused the log callback; its messages go to stderr"
        );
    }
    Ok(inner)
}

/// One encoded access unit: every NAL unit of one picture, Annex B (start-code prefixed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    /// The bitstream; starts with SPS and PPS when `keyframe` is set.
    pub data: Bytes,
    /// Whether the access unit holds an IDR picture (a decoder can start here).
    pub keyframe: bool,
}

/// What went wrong in an encoder.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncoderError {
    /// The encoder could not be created with these settings (the session's parameters or the
    /// node's build are at fault; retrying the same settings fails again).
    #[error("{encoder}: cannot start an encoder for {width}x{height}@{fps} at {bitrate_kbps} kbit/s: {reason}")]
    Init {
        /// Encoder name.
        encoder: &'static str,
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
        /// Requested frame rate.
        fps: u32,
        /// Requested bitrate.
        bitrate_kbps: u32,
        /// What the encoder said.
        reason: String,
    },
    /// A frame of another size than the encoder was opened for (a frame source bug).
    #[error("{encoder}: got a {got_width}x{got_height} frame, opened for {width}x{height}")]
    FrameSize {
        /// Encoder name.
        encoder: &'static str,
        /// Size the encoder was opened for.
        width: u32,
        /// Size the encoder was opened for.
        height: u32,
        /// Size of the frame given.
        got_width: u32,
        /// Size of the frame given.
        got_height: u32,
    },
    /// Encoding one frame failed inside the codec; the session cannot continue with it.
    #[error("{encoder}: encoding frame {frame} failed: {reason}")]
    Encode {
        /// Encoder name.
        encoder: &'static str,
        /// Frames encoded before this one.
        frame: u64,
        /// What the encoder said.
        reason: String,
    },
    /// The codec refused a new bitrate; the old one stays in force (the session goes on).
    #[error("{encoder}: cannot change the bitrate to {kbps} kbit/s: {reason}")]
    Bitrate {
        /// Encoder name.
        encoder: &'static str,
        /// The bitrate asked for.
        kbps: u32,
        /// What the encoder said.
        reason: String,
    },
}

impl EncoderError {
    /// Whether the session can go on after this error (only a refused bitrate change leaves
    /// the encoder usable).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, EncoderError::Bitrate { .. })
    }
}

/// What a session needs from a video encoder. Implementations run on the session's dedicated
/// encoder thread, one frame at a time, so they need `Send` but not `Sync`.
pub trait Encoder: Send {
    /// A short name for logs and stats ("openh264", "nvenc", ...).
    fn name(&self) -> &'static str;

    /// Encodes one frame; `force_idr` asks for an IDR picture with SPS/PPS in front. `None`
    /// means the encoder produced nothing for this frame (not expected with frame skipping
    /// off, but a caller must cope). After an [`EncoderError::Encode`] the frame is lost but
    /// the encoder must be usable again (re-opened if need be); the session asks for an IDR
    /// next and gives up after a few failures in a row.
    fn encode(
        &mut self,
        frame: &I420Frame,
        force_idr: bool,
    ) -> Result<Option<AccessUnit>, EncoderError>;

    /// Changes the target bitrate from the next frame on.
    fn set_bitrate(&mut self, kbps: u32) -> Result<(), EncoderError>;
}

/// Makes encoders for a session: at its start, and again whenever the session needs a new one
/// (`SetVideo` changes the picture size or frame rate), so it must be callable more than once.
/// Built once per node from `[encoder]` (see `game::select`).
pub type EncoderFactory =
    std::sync::Arc<dyn Fn(EncoderParams) -> Result<Box<dyn Encoder>, EncoderError> + Send + Sync>;

/// The factory of OpenH264 encoders with the default options.
pub fn openh264_factory() -> EncoderFactory {
    std::sync::Arc::new(|p| Ok(Box::new(OpenH264Encoder::new(p)?) as Box<dyn Encoder>))
}

/// Settings an encoder is opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderParams {
    /// Frame width in pixels (even).
    pub width: u32,
    /// Frame height in pixels (even).
    pub height: u32,
    /// Frames per second the session runs at (rate control budgets bits per frame from it).
    pub fps: u32,
    /// Target bitrate in kbit/s.
    pub bitrate_kbps: u32,
    /// Encoder threads (`[encoder] threads`); 1 encodes each picture as one slice.
    pub threads: u16,
}

/// Which OpenH264 tuning to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentHint {
    /// Natural motion (camera mode): what rendered games look like. The default.
    #[default]
    Motion,
    /// Desktop-like content with large static areas (OpenH264's screen-content mode).
    Screen,
}

/// OpenH264 knobs beyond [`EncoderParams`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenH264Options {
    /// Camera or screen-content tuning.
    pub content: ContentHint,
    /// Trade quality for speed. `Low` is the fastest.
    pub complexity: H264Complexity,
}

/// OpenH264's speed/quality trade-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum H264Complexity {
    /// Fastest.
    #[default]
    Low,
    /// OpenH264's default.
    Medium,
    /// Slowest, best quality.
    High,
}

impl Default for OpenH264Options {
    fn default() -> Self {
        Self {
            content: ContentHint::Motion,
            complexity: H264Complexity::Low,
        }
    }
}

/// Largest NAL unit, in bytes, when several threads share a picture: slices that fit one RTP
/// packet (a 1200-byte MTU budget), so each becomes a single-NAL RTP payload.
const THREADED_SLICE_BYTES: u32 = 1200;

/// The software H.264 encoder (Cisco OpenH264, built from source with nasm).
pub struct OpenH264Encoder {
    params: EncoderParams,
    options: OpenH264Options,
    inner: openh264::encoder::Encoder,
    /// Whether the codec has been initialised (OpenH264 does that on the first frame; options
    /// can only be set afterwards).
    started: bool,
    /// The settings `inner` was made with, kept to remake it when the bitrate changes before
    /// the first frame (OpenH264 only takes options once initialised).
    config: H264Config,
    /// The target bitrate the codec runs with, in kbit/s.
    current_kbps: u32,
    frames: u64,
    /// Size of the previous access unit, to allocate the next one in one go.
    last_len: usize,
}

impl std::fmt::Debug for OpenH264Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenH264Encoder")
            .field("params", &self.params)
            .field("options", &self.options)
            .field("frames", &self.frames)
            .finish()
    }
}

impl OpenH264Encoder {
    /// Name reported by [`Encoder::name`].
    pub const NAME: &'static str = "openh264";

    /// Opens an encoder with the default options.
    pub fn new(params: EncoderParams) -> Result<Self, EncoderError> {
        Self::with_options(params, OpenH264Options::default())
    }

    /// Opens an encoder.
    pub fn with_options(
        params: EncoderParams,
        options: OpenH264Options,
    ) -> Result<Self, EncoderError> {
        let init_err = |reason: String| EncoderError::Init {
            encoder: Self::NAME,
            width: params.width,
            height: params.height,
            fps: params.fps,
            bitrate_kbps: params.bitrate_kbps,
            reason,
        };
        if I420Frame::byte_len(params.width, params.height).is_none()
            || params.width < 16
            || params.height < 16
        {
            return Err(init_err(
                "width and height must be even and at least 16".into(),
            ));
        }
        // OpenH264 stops at level 5.2.
        if params.width.max(params.height) > 3840 || params.width.min(params.height) > 2160 {
            return Err(init_err("OpenH264 encodes at most 3840x2160".into()));
        }
        if params.fps == 0 || params.bitrate_kbps == 0 {
            return Err(init_err("fps and bitrate must be greater than 0".into()));
        }
        let bps = bitrate_bps(params.bitrate_kbps);
        let threads = params.threads.max(1);
        let mut config = H264Config::new()
            .profile(Profile::Baseline)
            .usage_type(match options.content {
                ContentHint::Motion => UsageType::CameraVideoRealTime,
                ContentHint::Screen => UsageType::ScreenContentRealTime,
            })
            .rate_control_mode(RateControlMode::Bitrate)
            .bitrate(BitRate::from_bps(bps))
            .max_frame_rate(FrameRate::from_hz(params.fps as f32))
            .skip_frames(false)
            // IDRs come only when the session asks: no periodic ones, no scene-change ones
            // (an unasked IDR is a bitrate spike the player sees as a stall).
            .intra_frame_period(IntraFramePeriod::from_num_frames(0))
            .scene_change_detect(false)
            .complexity(match options.complexity {
                H264Complexity::Low => Complexity::Low,
                H264Complexity::Medium => Complexity::Medium,
                H264Complexity::High => Complexity::High,
            })
            .num_threads(threads);
        if threads > 1 {
            // OpenH264 only spreads a picture over threads when it has several slices; with
            // size-limited slices each thread codes its own part of the picture.
            config = config.max_slice_len(THREADED_SLICE_BYTES);
        }
        let inner = open_codec(config).map_err(|e| init_err(e.to_string()))?;
        Ok(Self {
            params,
            options,
            inner,
            started: false,
            config,
            current_kbps: params.bitrate_kbps,
            frames: 0,
            last_len: 0,
        })
    }

    /// The parameters the encoder was opened with (bitrate as opened, not as changed since).
    pub fn params(&self) -> EncoderParams {
        self.params
    }

    fn apply_bitrate(&mut self, kbps: u32) -> Result<(), EncoderError> {
        use openh264_sys2::{
            SBitrateInfo, ENCODER_OPTION, ENCODER_OPTION_BITRATE, ENCODER_OPTION_MAX_BITRATE,
            SPATIAL_LAYER_0,
        };
        let err = |reason: String| EncoderError::Bitrate {
            encoder: Self::NAME,
            kbps,
            reason,
        };
        let bps = i32::try_from(bitrate_bps(kbps)).map_err(|_| err("too large".into()))?;
        let set = |inner: &mut openh264::encoder::Encoder, option: ENCODER_OPTION| {
            let mut info = SBitrateInfo {
                iLayer: SPATIAL_LAYER_0,
                iBitrate: bps,
            };
            // SAFETY: the codec is initialised (first frame encoded), `info` is the struct the
            // bitrate options expect, and it outlives the call, which copies it.
            let rc = unsafe {
                inner
                    .raw_api()
                    .set_option(option, std::ptr::from_mut(&mut info).cast())
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(err(format!("SetOption({option}) returned {rc}")))
            }
        };
        // The encoder runs with ceiling = target, and OpenH264 rejects a ceiling below the
        // target: raising moves the ceiling first, lowering moves the target first.
        if kbps >= self.current_kbps {
            set(&mut self.inner, ENCODER_OPTION_MAX_BITRATE)?;
            set(&mut self.inner, ENCODER_OPTION_BITRATE)?;
        } else {
            set(&mut self.inner, ENCODER_OPTION_BITRATE)?;
            set(&mut self.inner, ENCODER_OPTION_MAX_BITRATE)?;
        }
        self.current_kbps = kbps;
        Ok(())
    }

    /// Replaces the codec with a fresh one at the current settings; it starts with an IDR.
    fn reopen(&mut self) {
        match open_codec(self.config) {
            Ok(inner) => {
                self.inner = inner;
                self.started = false;
            }
            Err(e) => tracing::warn!(error = %e, "cannot reopen the OpenH264 encoder"),
        }
    }

    /// The target bitrate in force, in kbit/s.
    pub fn bitrate_kbps(&self) -> u32 {
        self.current_kbps
    }
}

fn bitrate_bps(kbps: u32) -> u32 {
    kbps.saturating_mul(1000)
}

impl Encoder for OpenH264Encoder {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn encode(
        &mut self,
        frame: &I420Frame,
        force_idr: bool,
    ) -> Result<Option<AccessUnit>, EncoderError> {
        let (w, h) = (frame.width(), frame.height());
        if (w, h) != (self.params.width, self.params.height) {
            return Err(EncoderError::FrameSize {
                encoder: Self::NAME,
                width: self.params.width,
                height: self.params.height,
                got_width: w,
                got_height: h,
            });
        }
        // The first frame is always an IDR; forcing one before initialisation is not possible.
        if self.started && force_idr {
            self.inner.force_intra_frame();
        }
        // The sizes were checked above, so the planes have exactly the lengths YUVSlices
        // asserts on.
        let (w, h) = (w as usize, h as usize);
        let source = YUVSlices::new((frame.y(), frame.u(), frame.v()), (w, h), (w, w / 2, w / 2));
        let ts = Timestamp::from_millis(self.frames * 1000 / u64::from(self.params.fps));
        let frame_no = self.frames;
        let stream = match self.inner.encode_at(&source, ts) {
            Ok(stream) => stream,
            Err(e) => {
                let err = EncoderError::Encode {
                    encoder: Self::NAME,
                    frame: frame_no,
                    reason: e.to_string(),
                };
                // OpenH264 tears its context down when a picture overflows its output buffer
                // (noise-like content at a high bitrate): start a fresh codec so the next
                // frame can be coded, as an IDR.
                self.reopen();
                return Err(err);
            }
        };
        let keyframe = match stream.frame_type() {
            FrameType::IDR => true,
            FrameType::I | FrameType::P | FrameType::IPMixed => false,
            FrameType::Skip => return Ok(None),
            FrameType::Invalid => {
                return Err(EncoderError::Encode {
                    encoder: Self::NAME,
                    frame: frame_no,
                    reason: "the codec returned an invalid frame type".into(),
                })
            }
        };
        let mut data = Vec::with_capacity(self.last_len + self.last_len / 4);
        stream.write_vec(&mut data);
        self.last_len = data.len();
        self.frames += 1;
        self.started = true;
        Ok(Some(AccessUnit {
            data: Bytes::from(data),
            keyframe,
        }))
    }

    fn set_bitrate(&mut self, kbps: u32) -> Result<(), EncoderError> {
        if kbps == 0 {
            return Err(EncoderError::Bitrate {
                encoder: Self::NAME,
                kbps,
                reason: "must be greater than 0".into(),
            });
        }
        if self.started {
            self.apply_bitrate(kbps)
        } else {
            // Not initialised yet: remake the (cheap, unallocated) codec with the new rate.
            let config = self.config.bitrate(BitRate::from_bps(bitrate_bps(kbps)));
            self.inner = open_codec(config).map_err(|e| EncoderError::Bitrate {
                encoder: Self::NAME,
                kbps,
                reason: e.to_string(),
            })?;
            self.config = config;
            self.current_kbps = kbps;
            Ok(())
        }
    }
}

/// NAL unit types (the low five bits of each NAL header) of an Annex B stream, in order:
/// 7 SPS, 8 PPS, 5 IDR slice, 1 non-IDR slice, 6 SEI, ... Both 3- and 4-byte start codes are
/// recognised; bytes before the first start code are ignored.
pub fn nal_types(annex_b: &[u8]) -> Vec<u8> {
    nal_units(annex_b).map(|n| n[0] & 0x1f).collect()
}

/// The NAL units of an Annex B stream without their start codes (each starts with its NAL
/// header byte). Empty units (two start codes in a row) are skipped.
pub fn nal_units(annex_b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = match find_start_code(annex_b) {
        Some((at, len)) => &annex_b[at + len..],
        None => &[][..],
    };
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        let (unit, next) = match find_start_code(rest) {
            Some((at, len)) => {
                // A 4-byte start code's leading zero belongs to it, not to this unit.
                (&rest[..at], &rest[at + len..])
            }
            None => (rest, &[][..]),
        };
        rest = next;
        if !unit.is_empty() {
            return Some(unit);
        }
    })
}

/// Position and length (3 or 4) of the first start code in `b`.
fn find_start_code(b: &[u8]) -> Option<(usize, usize)> {
    let i = b.windows(3).position(|w| w == [0, 0, 1])?;
    if i > 0 && b[i - 1] == 0 {
        Some((i - 1, 4))
    } else {
        Some((i, 3))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::game::builtin::BuiltinGame;

    fn params(w: u32, h: u32) -> EncoderParams {
        EncoderParams {
            width: w,
            height: h,
            fps: 60,
            bitrate_kbps: 2000,
            threads: 1,
        }
    }

    /// Events on target `openh264` while `f` runs on this thread, as `LEVEL text` lines.
    fn openh264_events(f: impl FnOnce()) -> Vec<String> {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Seen(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                struct Msg(String);
                impl tracing::field::Visit for Msg {
                    fn record_debug(&mut self, _: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                        self.0 = format!("{v:?}");
                    }
                }
                if event.metadata().target() == "openh264" {
                    let mut m = Msg(String::new());
                    event.record(&mut m);
                    self.0
                        .lock()
                        .unwrap()
                        .push(format!("{} {}", event.metadata().level(), m.0));
                }
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone());
        tracing::subscriber::with_default(subscriber, f);
        let lines = seen.0.lock().unwrap().clone();
        lines
    }

    #[test]
    fn openh264_messages_go_through_tracing_not_stderr() {
        // Every encoder warns once while initialising (frame skipping is off, as low latency
        // wants): "[OpenH264] this = 0x..., Warning:bEnableFrameSkip = 0,bitrate can't be
        // controlled ...". It used to be printed on stderr.
        let lines = openh264_events(|| {
            let mut g = BuiltinGame::new("arena", 320, 240).unwrap();
            let mut enc = OpenH264Encoder::new(params(320, 240)).unwrap();
            let _ = enc.encode(g.render(), true);
        });
        assert!(
            lines.iter().any(|l| l.starts_with("WARN ")),
            "no OpenH264 warning reached tracing: {lines:?}"
        );
    }

    #[test]
    fn splits_annex_b_with_both_start_code_lengths() {
        let s = [
            9, 0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 0, 0, 0, 1,
        ];
        let units: Vec<&[u8]> = nal_units(&s).collect();
        assert_eq!(units, vec![&[0x67, 1, 2][..], &[0x68, 3], &[0x65]]);
        assert_eq!(nal_types(&s), vec![7, 8, 5]);
        assert!(nal_types(&[1, 2, 3]).is_empty());
        assert!(nal_types(&[]).is_empty());
    }

    #[test]
    fn refuses_sizes_openh264_cannot_do() {
        for (w, h) in [(15, 16), (8, 8), (4096, 2160), (0, 0)] {
            let err = OpenH264Encoder::new(params(w, h)).unwrap_err();
            assert!(matches!(err, EncoderError::Init { .. }), "{w}x{h}: {err}");
        }
        let mut p = params(64, 64);
        p.fps = 0;
        assert!(OpenH264Encoder::new(p).is_err());
    }

    #[test]
    fn first_frame_is_an_idr_with_constrained_baseline_parameter_sets() {
        let mut g = BuiltinGame::new("arena", 320, 240).unwrap();
        let mut enc = OpenH264Encoder::new(params(320, 240)).unwrap();
        let au = enc.encode(g.render(), true).unwrap().expect("a frame");
        assert!(au.keyframe);
        let types = nal_types(&au.data);
        assert_eq!(&types[..2], &[7, 8], "SPS and PPS first, got {types:?}");
        assert!(types.contains(&5), "an IDR slice, got {types:?}");
        assert!(au.data.starts_with(&[0, 0, 0, 1]), "Annex B start code");
        let sps = nal_units(&au.data).next().unwrap();
        assert_eq!(sps[1], 66, "profile_idc Baseline");
        assert_eq!(
            sps[2] & 0xc0,
            0xc0,
            "constraint_set0 and set1: Constrained Baseline, got {:#x}",
            sps[2]
        );

        // The following frames are P frames without parameter sets.
        g.step();
        let au = enc.encode(g.render(), false).unwrap().unwrap();
        assert!(!au.keyframe);
        let types = nal_types(&au.data);
        assert!(types.contains(&1) && !types.contains(&5) && !types.contains(&7));

        // An IDR on request carries SPS and PPS again.
        g.step();
        let au = enc.encode(g.render(), true).unwrap().unwrap();
        assert!(au.keyframe);
        let types = nal_types(&au.data);
        assert!(
            types.starts_with(&[7, 8]) && types.contains(&5),
            "{types:?}"
        );
    }

    #[test]
    fn level_covers_1080p60() {
        let mut g = BuiltinGame::new("arena", 1920, 1080).unwrap();
        let mut p = params(1920, 1080);
        p.bitrate_kbps = 20_000;
        let mut enc = OpenH264Encoder::new(p).unwrap();
        let au = enc.encode(g.render(), true).unwrap().unwrap();
        let sps = nal_units(&au.data).next().unwrap();
        assert!(sps[3] >= 42, "level_idc {} is below 4.2", sps[3]);
    }

    /// Encodes ten frames of the `w`x`h` test pattern with `enc` (the first an IDR) and checks
    /// that OpenH264's decoder gets each back at that size with the white bar at the left edge
    /// intact. Shared by every H.264 encoder's tests.
    pub(crate) fn assert_test_pattern_round_trips(enc: &mut dyn Encoder, w: u32, h: u32) {
        let mut g = BuiltinGame::new("testpattern", w, h).unwrap();
        let mut dec = openh264::decoder::Decoder::new().unwrap();
        let mut decoded = 0;
        for i in 0..10 {
            g.step();
            let au = enc.encode(g.render(), i == 0).unwrap().unwrap();
            if let Some(yuv) = dec.decode(&au.data).unwrap() {
                use openh264::formats::YUVSource;
                assert_eq!(yuv.dimensions(), (w as usize, h as usize));
                // The white bar at the left edge of the test pattern survives coding.
                let y = yuv.y()[(h as usize / 3) * yuv.strides().0 + 2];
                assert!(y > 200, "white bar decoded as luma {y}");
                decoded += 1;
            }
        }
        assert_eq!(decoded, 10);
    }

    #[test]
    fn output_decodes_to_the_right_size_and_content() {
        let mut enc = OpenH264Encoder::new(params(320, 180)).unwrap();
        assert_test_pattern_round_trips(&mut enc, 320, 180);
    }

    /// Frames of pseudo-random noise of `amplitude` levels around mid grey (0: the full
    /// range): full-range noise cannot be compressed at all, faint noise costs whatever bits
    /// the encoder may spend.
    fn noise_frames(w: u32, h: u32, n: usize, amplitude: u8) -> Vec<I420Frame> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|_| {
                let mut f = I420Frame::black(w, h).unwrap();
                for b in f.as_bytes_mut() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let level = (state >> 24) as u8;
                    *b = match amplitude {
                        0 => level,
                        a => 128 - a / 2 + level % a,
                    };
                }
                f
            })
            .collect()
    }

    #[test]
    fn bitrate_changes_take_effect_before_and_after_the_first_frame() {
        let frames = noise_frames(320, 240, 24, 24);
        let mut p = params(320, 240);
        p.fps = 30;
        p.bitrate_kbps = 4000;
        let mut enc = OpenH264Encoder::new(p).unwrap();
        assert!(enc.set_bitrate(0).is_err());
        enc.set_bitrate(150).unwrap();
        assert_eq!(enc.bitrate_kbps(), 150);
        let mut sizes = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            if i == 12 {
                enc.set_bitrate(2500).unwrap();
                assert_eq!(enc.bitrate_kbps(), 2500);
            }
            sizes.push(enc.encode(f, i == 0).unwrap().unwrap().data.len());
        }
        // Skip the IDR and the frames right after the change, where rate control settles.
        let low: usize = sizes[2..12].iter().sum::<usize>() / 10;
        let high: usize = sizes[16..].iter().sum::<usize>() / 8;
        assert!(
            low * 4 < high,
            "2500 kbit/s frames should be far larger than 150 kbit/s ones: {sizes:?}"
        );
        enc.set_bitrate(100).unwrap();
        assert!(enc.encode(&frames[0], false).unwrap().is_some());
    }

    #[test]
    fn recovers_from_a_picture_that_overflows_the_codec() {
        // An IDR of pure noise at a generous bitrate overflows OpenH264's output buffer at
        // this size, which tears down its context.
        let noise = noise_frames(320, 240, 1, 0);
        let mut p = params(320, 240);
        p.bitrate_kbps = 20_000;
        let mut enc = OpenH264Encoder::new(p).unwrap();
        let err = enc.encode(&noise[0], true).unwrap_err();
        assert!(
            matches!(err, EncoderError::Encode { frame: 0, .. }),
            "{err}"
        );
        assert!(err.is_fatal());
        let mut g = BuiltinGame::new("arena", 320, 240).unwrap();
        let au = enc.encode(g.render(), false).unwrap().unwrap();
        assert!(au.keyframe, "a fresh codec starts with an IDR");
        assert!(nal_types(&au.data).starts_with(&[7, 8]));
    }

    #[test]
    fn frames_of_the_wrong_size_are_refused() {
        let mut enc = OpenH264Encoder::new(params(64, 64)).unwrap();
        let f = I420Frame::black(32, 32).unwrap();
        assert!(matches!(
            enc.encode(&f, false),
            Err(EncoderError::FrameSize { got_width: 32, .. })
        ));
    }

    #[test]
    fn threads_use_size_limited_slices() {
        let mut g = BuiltinGame::new("arena", 640, 360).unwrap();
        let mut p = params(640, 360);
        p.threads = 2;
        let mut enc = OpenH264Encoder::new(p).unwrap();
        let mut dec = openh264::decoder::Decoder::new().unwrap();
        for i in 0..3 {
            g.step();
            let au = enc.encode(g.render(), i == 0).unwrap().unwrap();
            for unit in nal_units(&au.data) {
                assert!(
                    unit.len() <= THREADED_SLICE_BYTES as usize,
                    "{}",
                    unit.len()
                );
            }
            assert!(dec.decode(&au.data).unwrap().is_some());
        }
    }
}
