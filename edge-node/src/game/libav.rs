//! Video encoders of Debian's FFmpeg libraries (libavcodec), behind the same [`Encoder`] trait
//! as OpenH264: `libx264` on the CPU, NVIDIA's `h264_nvenc`, `hevc_nvenc` and `av1_nvenc`,
//! `h264_vaapi` on a DRM render node, and, for tests, `libx265` and `libaom-av1` on the CPU.
//!
//! Every encoder is set up the same way for interactive streaming: no B-frames, no lookahead
//! (one frame in, its access unit out before the next frame: [`LibavEncoder::encode`] fails a
//! frame rather than return a late one), IDRs only when the session asks (the GOP is
//! "infinite"), the parameter sets in front of every IDR (no global header, so a browser can
//! join at any keyframe), and constant-bitrate rate control with a VBV of about two frames, so
//! a single frame cannot grow far beyond its share of the bitrate. H.264 and HEVC come out as
//! Annex B access units; AV1 as a temporal unit of low-overhead OBUs.
//!
//! The bindings are `ffmpeg-sys-next` (bindgen over the installed headers, FFmpeg 5.1 on
//! Debian bookworm); the safe `ffmpeg-next` wrapper needs libavformat even for encoding and
//! cannot set up a hardware frames context, so this module holds the little unsafe code
//! encoding needs, with the invariants next to each block.

use super::encoder::{AccessUnit, Encoder, EncoderError, EncoderParams};
use super::frame::I420Frame;
use bytes::Bytes;
use ffmpeg_sys_next as ff;
use nearpath_protocol::VideoCodec;
use std::ffi::{c_int, CStr, CString};
use std::ptr;

/// One libavcodec encoder this node knows how to set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LibavCodec {
    /// `libx264`: H.264 on the CPU (Constrained Baseline, for browsers).
    X264,
    /// `h264_nvenc`: H.264 on an NVIDIA GPU.
    H264Nvenc,
    /// `hevc_nvenc`: HEVC on an NVIDIA GPU.
    HevcNvenc,
    /// `av1_nvenc`: AV1 on an NVIDIA GPU (Ada and later).
    Av1Nvenc,
    /// `h264_vaapi`: H.264 on a VAAPI device (Intel, AMD).
    H264Vaapi,
    /// `libx265`: HEVC on the CPU (slow; tests and small sizes).
    X265,
    /// `libsvtav1`: AV1 on the CPU. It keeps frames in its pipeline even in low-delay mode,
    /// so the probe refuses it; kept to show why.
    SvtAv1,
    /// `libaom-av1` in real-time mode: AV1 on the CPU (slow; tests and small sizes).
    Aom,
}

impl LibavCodec {
    /// Every encoder, for listings.
    pub const ALL: [LibavCodec; 8] = [
        LibavCodec::X264,
        LibavCodec::H264Nvenc,
        LibavCodec::HevcNvenc,
        LibavCodec::Av1Nvenc,
        LibavCodec::H264Vaapi,
        LibavCodec::X265,
        LibavCodec::SvtAv1,
        LibavCodec::Aom,
    ];

    /// The implementation name reported in logs, stats and `Register` (`x264`, `h264_nvenc`).
    pub fn name(self) -> &'static str {
        match self {
            LibavCodec::X264 => "x264",
            LibavCodec::H264Nvenc => "h264_nvenc",
            LibavCodec::HevcNvenc => "hevc_nvenc",
            LibavCodec::Av1Nvenc => "av1_nvenc",
            LibavCodec::H264Vaapi => "h264_vaapi",
            LibavCodec::X265 => "x265",
            LibavCodec::SvtAv1 => "svtav1",
            LibavCodec::Aom => "aom",
        }
    }

    /// libavcodec's name for the encoder.
    pub fn ffmpeg_name(self) -> &'static str {
        match self {
            LibavCodec::X264 => "libx264",
            LibavCodec::X265 => "libx265",
            LibavCodec::SvtAv1 => "libsvtav1",
            LibavCodec::Aom => "libaom-av1",
            other => other.name(),
        }
    }

    /// The codec it produces.
    pub fn codec(self) -> VideoCodec {
        match self {
            LibavCodec::X264 | LibavCodec::H264Nvenc | LibavCodec::H264Vaapi => VideoCodec::H264,
            LibavCodec::HevcNvenc | LibavCodec::X265 => VideoCodec::Hevc,
            LibavCodec::Av1Nvenc | LibavCodec::SvtAv1 | LibavCodec::Aom => VideoCodec::Av1,
        }
    }

    fn is_nvenc(self) -> bool {
        matches!(
            self,
            LibavCodec::H264Nvenc | LibavCodec::HevcNvenc | LibavCodec::Av1Nvenc
        )
    }

    /// Whether the encoder takes a new bitrate without being reopened (libavcodec's wrappers
    /// of x264 and NVENC reconfigure on the next frame when `bit_rate` changes).
    fn reconfigures_bitrate(self) -> bool {
        matches!(self, LibavCodec::X264) || self.is_nvenc()
    }
}

/// Knobs beyond [`EncoderParams`] (from `[encoder]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LibavOptions {
    /// x264: periodic intra refresh (one sweep a second) besides IDRs on request.
    pub intra_refresh: bool,
    /// VAAPI: the DRM render node (`/dev/dri/renderD128`).
    pub vaapi_device: String,
}

/// Silences libavcodec's own messages below `error` (x264 prints its settings at `info` on
/// every open), once per process. FFmpeg's log callback takes a C `va_list`, which stable
/// Rust cannot format, so the messages are capped rather than routed through `tracing`.
fn quiet_ffmpeg_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sets a global integer; no other state is touched.
        unsafe { ff::av_log_set_level(ff::AV_LOG_ERROR) };
    });
}

/// FFmpeg's text for an error code.
fn av_error(code: c_int) -> String {
    let mut buf = [0 as std::ffi::c_char; 128];
    // SAFETY: the buffer is writable for its length, and av_strerror NUL-terminates within it.
    unsafe {
        ff::av_strerror(code, buf.as_mut_ptr(), buf.len());
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    }
}

/// Why an NVIDIA encoder cannot work on this machine before libavcodec is even asked, in the
/// words an operator needs ("no NVIDIA driver (libcuda.so.1 not found)"); `None` when the
/// driver libraries load (libavcodec's own open then decides).
pub fn nvidia_unavailable() -> Option<String> {
    for lib in ["libcuda.so.1", "libnvidia-encode.so.1"] {
        let name = CString::new(lib).expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle is closed right away, and loading
        // the NVIDIA driver's libraries runs no code of ours.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Some(format!("no NVIDIA driver ({lib} not found)"));
        }
        // SAFETY: a handle dlopen returned, closed once.
        unsafe { libc::dlclose(handle) };
    }
    None
}

/// An open libavcodec encoder. Not `Sync`; it lives on the session's encoder thread.
pub struct LibavEncoder {
    codec: LibavCodec,
    params: EncoderParams,
    options: LibavOptions,
    ctx: *mut ff::AVCodecContext,
    /// The software picture frames are copied into (I420, or NV12 for VAAPI).
    frame: *mut ff::AVFrame,
    packet: *mut ff::AVPacket,
    /// VAAPI only: the device's frames context the picture is uploaded to.
    hw_frames: *mut ff::AVBufferRef,
    hw_device: *mut ff::AVBufferRef,
    /// Frames given to the codec since it was opened (the presentation timestamp).
    pts: i64,
    /// Frames encoded over the encoder's life, for error messages.
    frames: u64,
    current_kbps: u32,
    /// The next frame must be an IDR (after a reopen).
    idr_next: bool,
}

// SAFETY: the encoder owns its libavcodec context, frame and packet exclusively and is used by
// one thread at a time (the trait needs `Send`, not `Sync`); libavcodec contexts may move
// between threads as long as calls on one are not concurrent.
unsafe impl Send for LibavEncoder {}

impl std::fmt::Debug for LibavEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibavEncoder")
            .field("codec", &self.codec)
            .field("params", &self.params)
            .field("frames", &self.frames)
            .finish()
    }
}

impl LibavEncoder {
    /// Opens `codec` for `params`.
    pub fn open(
        codec: LibavCodec,
        params: EncoderParams,
        options: LibavOptions,
    ) -> Result<Self, EncoderError> {
        quiet_ffmpeg_logs();
        let mut enc = LibavEncoder {
            codec,
            params,
            options,
            ctx: ptr::null_mut(),
            frame: ptr::null_mut(),
            packet: ptr::null_mut(),
            hw_frames: ptr::null_mut(),
            hw_device: ptr::null_mut(),
            pts: 0,
            frames: 0,
            current_kbps: params.bitrate_kbps,
            idr_next: true,
        };
        enc.init(params.bitrate_kbps)
            .map_err(|reason| EncoderError::Init {
                encoder: codec.name(),
                width: params.width,
                height: params.height,
                fps: params.fps,
                bitrate_kbps: params.bitrate_kbps,
                reason,
            })?;
        Ok(enc)
    }

    /// The encoder this is.
    pub fn codec(&self) -> LibavCodec {
        self.codec
    }

    /// The bitrate the encoder targets now, in kbit/s.
    pub fn bitrate_kbps(&self) -> u32 {
        self.current_kbps
    }

    /// Frees everything libavcodec gave us; the encoder is unusable until [`Self::init`].
    fn release(&mut self) {
        // SAFETY: each pointer is null or was allocated by the matching FFmpeg function and is
        // owned by us alone; the free functions accept pointers to null and null them.
        unsafe {
            ff::avcodec_free_context(&mut self.ctx);
            ff::av_frame_free(&mut self.frame);
            ff::av_packet_free(&mut self.packet);
            ff::av_buffer_unref(&mut self.hw_frames);
            ff::av_buffer_unref(&mut self.hw_device);
        }
    }

    /// Opens the codec at `kbps` (the session's parameters otherwise), with everything it
    /// needs; on error everything allocated is released again.
    fn init(&mut self, kbps: u32) -> Result<(), String> {
        let r = self.try_init(kbps);
        if r.is_err() {
            self.release();
        }
        r
    }

    fn try_init(&mut self, kbps: u32) -> Result<(), String> {
        let p = self.params;
        if I420Frame::byte_len(p.width, p.height).is_none() || p.width < 16 || p.height < 16 {
            return Err("width and height must be even and at least 16".into());
        }
        if p.width > 8192 || p.height > 8192 {
            return Err("at most 8192x8192".into());
        }
        if p.fps == 0 || kbps == 0 {
            return Err("fps and bitrate must be greater than 0".into());
        }
        if self.codec.is_nvenc() {
            if let Some(why) = nvidia_unavailable() {
                return Err(why);
            }
        }
        if self.codec == LibavCodec::H264Vaapi
            && !std::path::Path::new(&self.options.vaapi_device).exists()
        {
            return Err(format!(
                "no VAAPI device ({} does not exist)",
                self.options.vaapi_device
            ));
        }
        let name = CString::new(self.codec.ffmpeg_name()).expect("no NUL");
        // SAFETY: a valid C string; the returned codec is static data of libavcodec.
        let codec = unsafe { ff::avcodec_find_encoder_by_name(name.as_ptr()) };
        if codec.is_null() {
            return Err(format!(
                "this FFmpeg build has no {} encoder",
                self.codec.ffmpeg_name()
            ));
        }
        let bps = i64::from(kbps) * 1000;
        let fps = p.fps as c_int;
        // SAFETY: every pointer below is freshly allocated and checked for null before use;
        // fields are written before avcodec_open2, as its contract requires; the option
        // strings are valid C strings that outlive the calls that copy them.
        unsafe {
            self.ctx = ff::avcodec_alloc_context3(codec);
            self.frame = ff::av_frame_alloc();
            self.packet = ff::av_packet_alloc();
            if self.ctx.is_null() || self.frame.is_null() || self.packet.is_null() {
                return Err("out of memory".into());
            }
            let ctx = &mut *self.ctx;
            ctx.width = p.width as c_int;
            ctx.height = p.height as c_int;
            ctx.time_base = ff::AVRational { num: 1, den: fps };
            ctx.framerate = ff::AVRational { num: fps, den: 1 };
            ctx.pix_fmt = ff::AVPixelFormat::AV_PIX_FMT_YUV420P;
            ctx.bit_rate = bps;
            ctx.rc_max_rate = bps;
            // A VBV of two frames: a frame may take twice its share, no more.
            ctx.rc_buffer_size = (bps.saturating_mul(2) / i64::from(p.fps)).max(1) as c_int;
            if self.codec == LibavCodec::SvtAv1 {
                // SVT-AV1 refuses a ceiling equal to the target; without one it runs CBR.
                ctx.rc_max_rate = 0;
                ctx.rc_buffer_size = 0;
            }
            ctx.max_b_frames = 0;
            // IDRs come when the session asks (forced per frame); intra refresh needs a
            // period to sweep in, one second.
            ctx.gop_size = if self.codec == LibavCodec::X264 && self.options.intra_refresh {
                fps
            } else {
                i32::MAX
            };
            ctx.thread_count = c_int::from(p.threads.max(1));
            // Parameter sets in the stream, in front of every IDR, not in extradata.
            ctx.flags &= !(ff::AV_CODEC_FLAG_GLOBAL_HEADER as c_int);
            ctx.flags |= ff::AV_CODEC_FLAG_LOW_DELAY as c_int;

            let mut opts: Vec<(&str, String)> = Vec::new();
            match self.codec {
                LibavCodec::X264 => {
                    opts.push(("preset", "ultrafast".into()));
                    opts.push(("tune", "zerolatency".into()));
                    // Constrained Baseline, what WebRTC's 42e01f offers.
                    opts.push(("profile", "baseline".into()));
                    opts.push(("forced-idr", "1".into()));
                    if self.options.intra_refresh {
                        opts.push(("intra-refresh", "1".into()));
                    }
                    // One frame, one NAL unit per thread (sliced threads): no frame delay.
                    opts.push(("x264-params", "sliced-threads=1:rc-lookahead=0:sync-lookahead=0:scenecut=0:repeat-headers=1".into()));
                }
                LibavCodec::H264Nvenc | LibavCodec::HevcNvenc | LibavCodec::Av1Nvenc => {
                    opts.push(("preset", "p1".into()));
                    opts.push(("tune", "ull".into()));
                    opts.push(("zerolatency", "1".into()));
                    opts.push(("delay", "0".into()));
                    opts.push(("rc", "cbr".into()));
                    opts.push(("forced-idr", "1".into()));
                    opts.push(("rc-lookahead", "0".into()));
                    if self.codec == LibavCodec::H264Nvenc {
                        opts.push(("profile", "baseline".into()));
                    }
                }
                LibavCodec::H264Vaapi => {
                    opts.push(("profile", "constrained_baseline".into()));
                    opts.push(("rc_mode", "CBR".into()));
                    opts.push(("async_depth", "1".into()));
                    self.open_vaapi(p)?;
                }
                LibavCodec::X265 => {
                    opts.push(("preset", "ultrafast".into()));
                    opts.push(("tune", "zerolatency".into()));
                    opts.push(("forced-idr", "1".into()));
                    opts.push(("x265-params", "repeat-headers=1:frame-threads=1:rc-lookahead=0:bframes=0:scenecut=0:log-level=error".into()));
                }
                LibavCodec::Aom => {
                    // Real-time mode without lag: one frame in, its temporal unit out.
                    opts.push(("usage", "realtime".into()));
                    opts.push(("cpu-used", "8".into()));
                    opts.push(("lag-in-frames", "0".into()));
                    opts.push(("row-mt", "1".into()));
                }
                LibavCodec::SvtAv1 => {
                    opts.push(("preset", "12".into()));
                    // Low-delay prediction, no lookahead.
                    opts.push((
                        "svtav1-params",
                        "pred-struct=1:hierarchical-levels=0:lookahead=0:scd=0".into(),
                    ));
                }
            }
            let mut dict: *mut ff::AVDictionary = ptr::null_mut();
            for (k, v) in &opts {
                let k = CString::new(*k).expect("no NUL");
                let v = CString::new(v.as_str()).map_err(|_| "NUL in an option".to_string())?;
                ff::av_dict_set(&mut dict, k.as_ptr(), v.as_ptr(), 0);
            }
            let rc = ff::avcodec_open2(self.ctx, codec, &mut dict);
            ff::av_dict_free(&mut dict);
            if rc < 0 {
                return Err(self.open_failure(rc));
            }

            let frame = &mut *self.frame;
            frame.format = if self.codec == LibavCodec::H264Vaapi {
                ff::AVPixelFormat::AV_PIX_FMT_NV12 as c_int
            } else {
                ff::AVPixelFormat::AV_PIX_FMT_YUV420P as c_int
            };
            frame.width = p.width as c_int;
            frame.height = p.height as c_int;
            let rc = ff::av_frame_get_buffer(self.frame, 0);
            if rc < 0 {
                return Err(format!("cannot allocate a frame: {}", av_error(rc)));
            }
        }
        self.current_kbps = kbps;
        self.pts = 0;
        self.idr_next = true;
        Ok(())
    }

    /// Why `avcodec_open2` failed, with what an operator can act on for NVENC.
    fn open_failure(&self, rc: c_int) -> String {
        let base = format!("avcodec_open2: {}", av_error(rc));
        if self.codec.is_nvenc() {
            if !std::path::Path::new("/dev/nvidia0").exists() {
                return format!("{base} (no NVIDIA GPU: /dev/nvidia0 missing)");
            }
            return format!("{base} (the GPU or driver lacks {})", self.codec.name());
        }
        base
    }

    /// VAAPI: opens the device and a frames context of NV12 surfaces the codec encodes from.
    ///
    /// # Safety
    /// `self.ctx` is an allocated, not yet opened codec context.
    unsafe fn open_vaapi(&mut self, p: EncoderParams) -> Result<(), String> {
        let dev = CString::new(self.options.vaapi_device.as_str())
            .map_err(|_| "NUL in vaapi_device".to_string())?;
        // SAFETY (whole block): the caller's contract; the device and frames references are
        // owned by `self` and released in `release`; the codec context takes its own
        // reference to the frames context.
        unsafe {
            let rc = ff::av_hwdevice_ctx_create(
                &mut self.hw_device,
                ff::AVHWDeviceType::AV_HWDEVICE_TYPE_VAAPI,
                dev.as_ptr(),
                ptr::null_mut(),
                0,
            );
            if rc < 0 {
                return Err(format!(
                    "cannot open the VAAPI device {}: {}",
                    self.options.vaapi_device,
                    av_error(rc)
                ));
            }
            self.hw_frames = ff::av_hwframe_ctx_alloc(self.hw_device);
            if self.hw_frames.is_null() {
                return Err("out of memory".into());
            }
            let fc = &mut *((*self.hw_frames).data as *mut ff::AVHWFramesContext);
            fc.format = ff::AVPixelFormat::AV_PIX_FMT_VAAPI;
            fc.sw_format = ff::AVPixelFormat::AV_PIX_FMT_NV12;
            fc.width = p.width as c_int;
            fc.height = p.height as c_int;
            fc.initial_pool_size = 4;
            let rc = ff::av_hwframe_ctx_init(self.hw_frames);
            if rc < 0 {
                return Err(format!("cannot set up VAAPI surfaces: {}", av_error(rc)));
            }
            (*self.ctx).pix_fmt = ff::AVPixelFormat::AV_PIX_FMT_VAAPI;
            (*self.ctx).hw_frames_ctx = ff::av_buffer_ref(self.hw_frames);
            if (*self.ctx).hw_frames_ctx.is_null() {
                return Err("out of memory".into());
            }
        }
        Ok(())
    }

    /// Copies `src` into the codec's frame (I420 as is, NV12 with U and V interleaved).
    fn fill(&mut self, src: &I420Frame) -> Result<(), String> {
        let (w, h) = (src.width() as usize, src.height() as usize);
        // SAFETY: the frame was allocated by av_frame_get_buffer for exactly w x h of its
        // format; after av_frame_make_writable its planes are ours to write, each plane row
        // `linesize` apart and at least as wide as the row written.
        unsafe {
            let rc = ff::av_frame_make_writable(self.frame);
            if rc < 0 {
                return Err(format!("frame not writable: {}", av_error(rc)));
            }
            let f = &mut *self.frame;
            let copy = |plane: usize, data: &[u8], width: usize, rows: usize| {
                let stride = f.linesize[plane] as usize;
                for r in 0..rows {
                    ptr::copy_nonoverlapping(
                        data.as_ptr().add(r * width),
                        f.data[plane].add(r * stride),
                        width,
                    );
                }
            };
            copy(0, src.y(), w, h);
            if self.codec == LibavCodec::H264Vaapi {
                let stride = f.linesize[1] as usize;
                let (u, v) = (src.u(), src.v());
                for r in 0..h / 2 {
                    let row = std::slice::from_raw_parts_mut(f.data[1].add(r * stride), w);
                    for c in 0..w / 2 {
                        row[2 * c] = u[r * (w / 2) + c];
                        row[2 * c + 1] = v[r * (w / 2) + c];
                    }
                }
            } else {
                copy(1, src.u(), w / 2, h / 2);
                copy(2, src.v(), w / 2, h / 2);
            }
        }
        Ok(())
    }

    /// Sends the filled frame and collects the access unit it produced.
    fn encode_filled(&mut self, idr: bool) -> Result<Option<AccessUnit>, String> {
        // SAFETY: ctx, frame and packet are open/allocated (init succeeded); a hardware frame
        // is allocated from our frames context and freed before returning; packets are
        // unreferenced after their bytes are copied.
        unsafe {
            let f = &mut *self.frame;
            f.pts = self.pts;
            f.pict_type = if idr {
                ff::AVPictureType::AV_PICTURE_TYPE_I
            } else {
                ff::AVPictureType::AV_PICTURE_TYPE_NONE
            };
            f.key_frame = c_int::from(idr);
            let rc = if self.hw_frames.is_null() {
                ff::avcodec_send_frame(self.ctx, self.frame)
            } else {
                let mut hw = ff::av_frame_alloc();
                if hw.is_null() {
                    return Err("out of memory".into());
                }
                let mut rc = ff::av_hwframe_get_buffer(self.hw_frames, hw, 0);
                if rc >= 0 {
                    rc = ff::av_hwframe_transfer_data(hw, self.frame, 0);
                }
                if rc >= 0 {
                    (*hw).pts = f.pts;
                    (*hw).pict_type = f.pict_type;
                    (*hw).key_frame = f.key_frame;
                    rc = ff::avcodec_send_frame(self.ctx, hw);
                }
                ff::av_frame_free(&mut hw);
                rc
            };
            if rc < 0 {
                return Err(format!("avcodec_send_frame: {}", av_error(rc)));
            }
            self.pts += 1;
            let mut data: Vec<u8> = Vec::new();
            let mut keyframe = false;
            loop {
                let rc = ff::avcodec_receive_packet(self.ctx, self.packet);
                if rc == ff::AVERROR(libc::EAGAIN) || rc == ff::AVERROR_EOF {
                    break;
                }
                if rc < 0 {
                    return Err(format!("avcodec_receive_packet: {}", av_error(rc)));
                }
                let pkt = &*self.packet;
                if pkt.size > 0 && !pkt.data.is_null() {
                    data.extend_from_slice(std::slice::from_raw_parts(pkt.data, pkt.size as usize));
                }
                keyframe |= pkt.flags & ff::AV_PKT_FLAG_KEY != 0;
                ff::av_packet_unref(self.packet);
            }
            if data.is_empty() {
                return Ok(None);
            }
            Ok(Some(AccessUnit {
                data: Bytes::from(data),
                keyframe,
            }))
        }
    }
}

impl Drop for LibavEncoder {
    fn drop(&mut self) {
        self.release();
    }
}

impl Encoder for LibavEncoder {
    fn name(&self) -> &'static str {
        self.codec.name()
    }

    fn encode(
        &mut self,
        frame: &I420Frame,
        force_idr: bool,
    ) -> Result<Option<AccessUnit>, EncoderError> {
        let (w, h) = (frame.width(), frame.height());
        if (w, h) != (self.params.width, self.params.height) {
            return Err(EncoderError::FrameSize {
                encoder: self.codec.name(),
                width: self.params.width,
                height: self.params.height,
                got_width: w,
                got_height: h,
            });
        }
        let name = self.codec.name();
        let err = |frame: u64, reason: String| EncoderError::Encode {
            encoder: name,
            frame,
            reason,
        };
        if self.ctx.is_null() {
            // A previous failure left no codec: reopen (it starts with an IDR).
            self.init(self.current_kbps)
                .map_err(|r| err(self.frames, format!("cannot reopen: {r}")))?;
        }
        let idr = force_idr || self.idr_next;
        let result = self.fill(frame).and_then(|()| self.encode_filled(idr));
        let frame_no = self.frames;
        self.frames += 1;
        match result {
            Ok(au) => {
                if au.is_some() {
                    self.idr_next = false;
                }
                Ok(au)
            }
            Err(reason) => {
                // The codec's state is unknown after a failure: start afresh next frame.
                self.release();
                Err(err(frame_no, reason))
            }
        }
    }

    fn set_bitrate(&mut self, kbps: u32) -> Result<(), EncoderError> {
        let name = self.codec.name();
        let err = |reason: String| EncoderError::Bitrate {
            encoder: name,
            kbps,
            reason,
        };
        if kbps == 0 {
            return Err(err("must be greater than 0".into()));
        }
        if kbps > 1_000_000 {
            return Err(err("too large".into()));
        }
        if kbps == self.current_kbps {
            return Ok(());
        }
        if self.ctx.is_null() {
            // Reopened at this bitrate on the next frame.
            self.current_kbps = kbps;
            return Ok(());
        }
        if self.codec.reconfigures_bitrate() {
            let bps = i64::from(kbps) * 1000;
            // SAFETY: the context is open and used by this thread only; the wrappers read
            // these fields at the next frame and reconfigure the encoder with them.
            unsafe {
                let ctx = &mut *self.ctx;
                ctx.bit_rate = bps;
                ctx.rc_max_rate = bps;
                ctx.rc_buffer_size =
                    (bps.saturating_mul(2) / i64::from(self.params.fps)).max(1) as c_int;
            }
            self.current_kbps = kbps;
            return Ok(());
        }
        // The others take a bitrate at open only: reopen, which costs an IDR.
        let old = self.current_kbps;
        self.release();
        match self.init(kbps) {
            Ok(()) => Ok(()),
            Err(reason) => {
                // Keep the old bitrate; the next frame reopens with it.
                self.current_kbps = old;
                Err(err(reason))
            }
        }
    }
}

/// Opens `codec` at a small size and encodes one frame: whether it works on this machine, or
/// why not (what `auto` logs and an explicit choice reports).
pub fn probe(codec: LibavCodec, threads: u16, options: &LibavOptions) -> Result<(), String> {
    let params = EncoderParams {
        width: 256,
        height: 144,
        fps: 30,
        bitrate_kbps: 500,
        threads: threads.max(1),
    };
    let mut enc = LibavEncoder::open(codec, params, options.clone()).map_err(|e| match e {
        EncoderError::Init { reason, .. } => reason,
        other => other.to_string(),
    })?;
    let frame = I420Frame::black(params.width, params.height).map_err(|e| e.to_string())?;
    match enc.encode(&frame, true) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("produced no picture for the first frame (buffers frames)".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::game::builtin::BuiltinGame;
    use crate::game::encoder::{nal_types, nal_units};

    fn params(w: u32, h: u32) -> EncoderParams {
        EncoderParams {
            width: w,
            height: h,
            fps: 60,
            bitrate_kbps: 2000,
            threads: 1,
        }
    }

    fn x264(p: EncoderParams) -> LibavEncoder {
        LibavEncoder::open(LibavCodec::X264, p, LibavOptions::default()).unwrap()
    }

    #[test]
    fn x264_gives_one_constrained_baseline_access_unit_per_frame_idr_on_request() {
        let mut g = BuiltinGame::new("arena", 320, 240).unwrap();
        let mut enc = x264(params(320, 240));
        assert_eq!(enc.name(), "x264");
        let au = enc
            .encode(g.render(), true)
            .unwrap()
            .expect("the first frame's AU");
        assert!(au.keyframe);
        let types = nal_types(&au.data);
        assert!(au.data.starts_with(&[0, 0, 0, 1]), "Annex B");
        assert!(
            types.contains(&7) && types.contains(&8) && types.contains(&5),
            "{types:?}"
        );
        let sps = nal_units(&au.data).find(|u| u[0] & 0x1f == 7).unwrap();
        assert_eq!(sps[1], 66, "profile_idc Baseline");
        assert_eq!(sps[2] & 0xc0, 0xc0, "Constrained Baseline: {:#x}", sps[2]);
        // Zero latency: every frame's AU comes back from the call that gave the frame (a
        // buffering encoder would return None here, and the old frame later).
        for i in 1..30 {
            g.step();
            let au = enc.encode(g.render(), false).unwrap();
            let au = au.unwrap_or_else(|| panic!("frame {i} gave no access unit"));
            assert!(!au.keyframe, "frame {i}: no IDR unasked");
            let types = nal_types(&au.data);
            assert!(!types.contains(&5) && !types.contains(&7), "{i}: {types:?}");
        }
        g.step();
        let au = enc.encode(g.render(), true).unwrap().unwrap();
        assert!(au.keyframe);
        let types = nal_types(&au.data);
        assert!(
            types.contains(&7) && types.contains(&8) && types.contains(&5),
            "{types:?}"
        );
    }

    #[test]
    fn x264_output_decodes_with_openh264_at_720p() {
        let mut enc = x264(params(1280, 720));
        crate::game::encoder::tests::assert_test_pattern_round_trips(&mut enc, 1280, 720);
    }

    #[test]
    fn x264_with_threads_and_intra_refresh_still_has_no_delay() {
        let mut g = BuiltinGame::new("arena", 640, 360).unwrap();
        let mut p = params(640, 360);
        p.threads = 2;
        let opts = LibavOptions {
            intra_refresh: true,
            ..LibavOptions::default()
        };
        let mut enc = LibavEncoder::open(LibavCodec::X264, p, opts).unwrap();
        let mut dec = openh264::decoder::Decoder::new().unwrap();
        for i in 0..90 {
            g.step();
            let au = enc.encode(g.render(), i == 0).unwrap();
            let au = au.unwrap_or_else(|| panic!("frame {i} gave no access unit"));
            assert!(dec.decode(&au.data).is_ok(), "frame {i}");
        }
    }

    #[test]
    fn x264_bitrate_changes_take_effect() {
        // Faint noise: costs whatever bits the encoder may spend.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let frames: Vec<I420Frame> = (0..40)
            .map(|_| {
                let mut f = I420Frame::black(320, 240).unwrap();
                for b in f.as_bytes_mut() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *b = 116 + (state >> 24) as u8 % 24;
                }
                f
            })
            .collect();
        let mut p = params(320, 240);
        p.fps = 30;
        p.bitrate_kbps = 150;
        let mut enc = x264(p);
        assert!(enc.set_bitrate(0).is_err());
        let mut sizes = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            if i == 20 {
                enc.set_bitrate(2500).unwrap();
                assert_eq!(enc.bitrate_kbps(), 2500);
            }
            sizes.push(enc.encode(f, i == 0).unwrap().unwrap().data.len());
        }
        let low: usize = sizes[5..20].iter().sum::<usize>() / 15;
        let high: usize = sizes[25..].iter().sum::<usize>() / 15;
        assert!(
            low * 4 < high,
            "2500 kbit/s frames should be far larger: {sizes:?}"
        );
    }

    #[test]
    fn wrong_sizes_and_settings_are_refused() {
        for (w, h) in [(15, 16), (8, 8), (0, 0), (9000, 720)] {
            let err = LibavEncoder::open(LibavCodec::X264, params(w, h), LibavOptions::default())
                .unwrap_err();
            assert!(matches!(err, EncoderError::Init { .. }), "{w}x{h}: {err}");
        }
        let mut enc = x264(params(64, 64));
        let f = I420Frame::black(32, 32).unwrap();
        assert!(matches!(
            enc.encode(&f, false),
            Err(EncoderError::FrameSize { got_width: 32, .. })
        ));
    }

    #[test]
    fn nvenc_without_a_driver_says_so() {
        if nvidia_unavailable().is_none() {
            eprintln!("skipped: an NVIDIA driver is present");
            return;
        }
        let err = probe(LibavCodec::H264Nvenc, 1, &LibavOptions::default()).unwrap_err();
        assert!(
            err.starts_with("no NVIDIA driver (libcuda.so.1 not found)"),
            "{err}"
        );
    }

    /// The NVENC path on a real GPU; prints why it is skipped elsewhere.
    #[test]
    fn nvenc_encodes_h264_hevc_av1_where_a_gpu_is_present() {
        if !std::path::Path::new("/dev/nvidia0").exists() || nvidia_unavailable().is_some() {
            eprintln!("skipped: no NVIDIA GPU (/dev/nvidia0 and libcuda.so.1 needed)");
            return;
        }
        let mut g = BuiltinGame::new("arena", 1280, 720).unwrap();
        for codec in [
            LibavCodec::H264Nvenc,
            LibavCodec::HevcNvenc,
            LibavCodec::Av1Nvenc,
        ] {
            let mut enc =
                match LibavEncoder::open(codec, params(1280, 720), LibavOptions::default()) {
                    Ok(e) => e,
                    Err(e) if codec == LibavCodec::Av1Nvenc => {
                        eprintln!("av1_nvenc unavailable on this GPU: {e}");
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
            let first = enc.encode(g.render(), true).unwrap().expect("no delay");
            assert!(first.keyframe, "{codec:?}");
            for i in 0..30 {
                g.step();
                let au = enc.encode(g.render(), i == 15).unwrap();
                let au = au.unwrap_or_else(|| panic!("{codec:?} frame {i}: buffered"));
                assert_eq!(au.keyframe, i == 15, "{codec:?} frame {i}");
            }
            enc.set_bitrate(8000).unwrap();
            g.step();
            assert!(enc.encode(g.render(), false).unwrap().is_some());
        }
    }

    #[test]
    fn software_hevc_and_av1_open_and_give_keyframes() {
        let mut g = BuiltinGame::new("arena", 320, 240).unwrap();
        for codec in [LibavCodec::X265, LibavCodec::SvtAv1, LibavCodec::Aom] {
            let mut enc = LibavEncoder::open(codec, params(320, 240), LibavOptions::default())
                .unwrap_or_else(|e| panic!("{e}"));
            let mut aus = Vec::new();
            for i in 0..10 {
                g.step();
                if let Some(au) = enc.encode(g.render(), i == 0 || i == 6).unwrap() {
                    aus.push((i, au));
                }
            }
            eprintln!(
                "{codec:?}: access units for frames {:?}",
                aus.iter().map(|(i, _)| *i).collect::<Vec<_>>()
            );
            assert!(aus.first().is_some_and(|(_, au)| au.keyframe), "{codec:?}");
            if codec == LibavCodec::SvtAv1 {
                // SVT-AV1 1.4 keeps three frames in its pipeline even in low-delay mode, so
                // the probe refuses it: a node never offers an encoder that lags.
                assert_eq!(aus[0].0, 3, "SVT-AV1's delay changed: revisit the probe");
                let err = probe(codec, 1, &LibavOptions::default()).unwrap_err();
                assert!(err.contains("buffers frames"), "{err}");
                continue;
            }
            assert_eq!(aus.len(), 10, "{codec:?} lags");
            let keyframes: Vec<usize> = aus
                .iter()
                .filter(|(_, au)| au.keyframe)
                .map(|(i, _)| *i)
                .collect();
            assert_eq!(keyframes, [0, 6], "{codec:?}: keyframes on request only");
            if codec == LibavCodec::Aom {
                // AV1: a temporal delimiter OBU (type 2), then the sequence header (type 1),
                // on every keyframe.
                for (i, au) in &aus {
                    let types = (au.data[0] >> 3 & 0xf, au.data[2] >> 3 & 0xf);
                    if au.keyframe {
                        assert_eq!(types, (2, 1), "frame {i}: {:x?}", &au.data[..4]);
                    } else {
                        assert_ne!(types.1, 1, "frame {i}: a sequence header unasked");
                    }
                }
            }
            if codec == LibavCodec::X265 {
                // HEVC: VPS (32), SPS (33), PPS (34) in front of the IDR.
                let types: Vec<u8> = nal_units(&aus[0].1.data)
                    .map(|u| (u[0] >> 1) & 0x3f)
                    .collect();
                assert!(types.starts_with(&[32, 33, 34]), "{types:?}");
            }
        }
    }
}
