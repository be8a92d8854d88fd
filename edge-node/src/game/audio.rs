//! Game sound: 48 kHz stereo s16 PCM, from the built-in game's synthesiser or an external
//! program's audio pipe, encoded to Opus in 10 ms packets on a thread per session.
//!
//! ```text
//!  built-in: synth(sample clock, thrust, hits) --PCM--+
//!                                                     +--> Opus encoder --EncodedAudio--> queue
//!  external: program fd 3 (s16le 48k stereo) --PCM----+
//! ```
//!
//! The built-in game's sound and picture share one timeline, the session's epoch (the instant
//! the pacer's slot 0 is due): frame slot `i` is at `i / fps` seconds and sample `n` at
//! `n / 48000` seconds after it. The periodic beep ([`beep_on`]) and the picture's flash
//! ([`flash_on`]) are the same window of that timeline, so any offset a player measures between
//! them is the pipeline's. Synthesised packets are paced by sample count from a monotonic clock
//! (packet `k` is made at `epoch + k * 10 ms`, when its first sample is due, as a frame slot is
//! rendered when it is due), never by sleeping 10 ms, so the sound does not drift from the
//! picture.

use bytes::Bytes;
use nearpath_config::AudioConfig;
use nearpath_protocol::audio::{AUDIO_FLAG_FEC, MAX_OPUS_PACKET, SAMPLES_10MS};
use std::io::Read;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Sample rate of game sound.
pub const SAMPLE_RATE: u32 = 48_000;
/// Interleaved channels of game sound.
pub const CHANNELS: usize = 2;
/// Samples per channel in one packet (10 ms).
pub const FRAME_SAMPLES: usize = SAMPLES_10MS as usize;
/// Bytes of s16le stereo PCM in one packet, as read from an external program's pipe.
pub const FRAME_BYTES: usize = FRAME_SAMPLES * CHANNELS * 2;
/// Encoded packets buffered for the session's sender (160 ms); when full the *oldest* is
/// dropped (see [`AudioSender::push`]).
pub const AUDIO_QUEUE: usize = 16;
/// Time between two sync beeps (and flashes), in microseconds of session time.
pub const BEEP_PERIOD_US: u64 = 2_000_000;
/// Length of a beep (and of its flash), in microseconds.
pub const BEEP_LEN_US: u64 = 60_000;
/// Pitch of the beep, in Hz.
pub const BEEP_HZ: f64 = 1000.0;
/// Packets the synthesiser may be behind its clock before it skips ahead instead of catching up
/// (a stalled thread would otherwise burst old sound).
const MAX_BEHIND_PACKETS: u64 = 10;

/// Whether the sync beep sounds at `t_us` microseconds of session time.
pub fn beep_on(t_us: u64) -> bool {
    t_us % BEEP_PERIOD_US < BEEP_LEN_US
}

/// Whether the picture flashes at `t_us` microseconds of session time: the same window as
/// [`beep_on`], by definition.
pub fn flash_on(t_us: u64) -> bool {
    beep_on(t_us)
}

/// Session time of sample `n`, in microseconds.
pub fn sample_time_us(n: u64) -> u64 {
    n.saturating_mul(1_000_000) / u64::from(SAMPLE_RATE)
}

/// One encoded Opus packet, ready for an audio datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedAudio {
    /// Packet counter from 0 per session (wraps); a gap means packets were dropped on the node.
    pub seq: u32,
    /// When the packet's first sample was captured, Unix microseconds (the clock of video
    /// frames' `capture_ts_us`).
    pub capture_ts_us: u64,
    /// Samples per channel the packet decodes to.
    pub samples: u16,
    /// Whether the encoder had in-band FEC on.
    pub fec: bool,
    /// The Opus packet.
    pub data: Bytes,
}

/// Why audio could not start or stopped.
#[derive(Debug, Error)]
pub enum AudioError {
    /// libopus refused a setting or failed to encode (its error code and text).
    #[error("opus {call} failed: {message} ({code})")]
    Opus {
        /// The libopus call.
        call: &'static str,
        /// Its return code.
        code: i32,
        /// `opus_strerror` of it.
        message: String,
    },
    /// The audio thread could not be started.
    #[error("cannot start the audio thread: {0}")]
    Thread(std::io::Error),
}

/// What the built-in game tells its synthesiser, updated by the encoder thread each frame.
#[derive(Debug, Default)]
pub struct SynthInputs {
    /// Ship speed, 1/1000 of full speed.
    pub thrust_milli: AtomicU32,
    /// Collisions so far.
    pub hits: AtomicU64,
}

/// An Opus encoder for 48 kHz stereo (libopus through `audiopus_sys`, linked via pkg-config).
pub struct OpusEncoder {
    raw: std::ptr::NonNull<audiopus_sys::OpusEncoder>,
    fec: bool,
}

// The encoder state is plain memory owned by this value; libopus keeps no thread-local state.
unsafe impl Send for OpusEncoder {}

fn opus_error(call: &'static str, code: i32) -> AudioError {
    // SAFETY: opus_strerror returns a pointer to a static NUL-terminated string for any code.
    let message = unsafe { std::ffi::CStr::from_ptr(audiopus_sys::opus_strerror(code)) }
        .to_string_lossy()
        .into_owned();
    AudioError::Opus {
        call,
        code,
        message,
    }
}

impl OpusEncoder {
    /// An encoder with the restricted low-delay application (no speech/music analysis delay)
    /// and the bitrate, FEC, DTX and expected loss of `cfg`.
    pub fn new(cfg: &AudioConfig) -> Result<Self, AudioError> {
        let mut err = 0;
        // SAFETY: valid rate, channel count and application; `err` is a valid out pointer.
        let raw = unsafe {
            audiopus_sys::opus_encoder_create(
                SAMPLE_RATE as i32,
                CHANNELS as i32,
                audiopus_sys::OPUS_APPLICATION_RESTRICTED_LOWDELAY,
                &mut err,
            )
        };
        let raw = match std::ptr::NonNull::new(raw) {
            Some(raw) if err == audiopus_sys::OPUS_OK => raw,
            _ => return Err(opus_error("opus_encoder_create", err)),
        };
        let enc = Self { raw, fec: cfg.fec };
        let kbps = cfg.bitrate_kbps.clamp(6, 510) as i32;
        enc.ctl(
            "OPUS_SET_BITRATE",
            audiopus_sys::OPUS_SET_BITRATE_REQUEST,
            kbps * 1000,
        )?;
        enc.ctl(
            "OPUS_SET_INBAND_FEC",
            audiopus_sys::OPUS_SET_INBAND_FEC_REQUEST,
            i32::from(cfg.fec),
        )?;
        enc.ctl(
            "OPUS_SET_PACKET_LOSS_PERC",
            audiopus_sys::OPUS_SET_PACKET_LOSS_PERC_REQUEST,
            cfg.expected_loss_percent.min(100) as i32,
        )?;
        enc.ctl(
            "OPUS_SET_DTX",
            audiopus_sys::OPUS_SET_DTX_REQUEST,
            i32::from(cfg.dtx),
        )?;
        Ok(enc)
    }

    fn ctl(&self, call: &'static str, request: i32, value: i32) -> Result<(), AudioError> {
        // SAFETY: every request used here is a SET request taking one opus_int32.
        let code = unsafe { audiopus_sys::opus_encoder_ctl(self.raw.as_ptr(), request, value) };
        if code == audiopus_sys::OPUS_OK {
            Ok(())
        } else {
            Err(opus_error(call, code))
        }
    }

    /// Encodes one 10 ms packet of interleaved stereo samples.
    pub fn encode(&mut self, pcm: &[i16; FRAME_SAMPLES * CHANNELS]) -> Result<Bytes, AudioError> {
        let mut out = [0u8; MAX_OPUS_PACKET];
        // SAFETY: `pcm` holds FRAME_SAMPLES samples per channel; `out` is MAX_OPUS_PACKET long
        // and that is the capacity passed.
        let n = unsafe {
            audiopus_sys::opus_encode(
                self.raw.as_ptr(),
                pcm.as_ptr(),
                FRAME_SAMPLES as i32,
                out.as_mut_ptr(),
                MAX_OPUS_PACKET as i32,
            )
        };
        if n <= 0 {
            return Err(opus_error("opus_encode", n));
        }
        Ok(Bytes::copy_from_slice(&out[..n as usize]))
    }

    /// Whether packets carry in-band FEC.
    pub fn fec(&self) -> bool {
        self.fec
    }
}

impl Drop for OpusEncoder {
    fn drop(&mut self) {
        // SAFETY: created by opus_encoder_create and destroyed once, here.
        unsafe { audiopus_sys::opus_encoder_destroy(self.raw.as_ptr()) }
    }
}

/// The built-in game's sound: an engine tone whose pitch and level follow the ship's speed, a
/// noise burst on each collision, and the 1 kHz sync beep.
#[derive(Debug)]
pub struct Synth {
    /// The next sample's index on the session timeline.
    next_sample: u64,
    engine_phase: f64,
    /// Smoothed thrust, so the engine glides instead of clicking at each frame.
    thrust: f64,
    hits_seen: u64,
    /// Samples left of the current hit sound.
    hit_left: u32,
    noise: u32,
}

/// Length of the hit sound, in samples (150 ms).
const HIT_SAMPLES: u32 = SAMPLE_RATE * 150 / 1000;

impl Default for Synth {
    fn default() -> Self {
        Self {
            next_sample: 0,
            engine_phase: 0.0,
            thrust: 0.0,
            hits_seen: 0,
            hit_left: 0,
            noise: 0x1234_5678,
        }
    }
}

impl Synth {
    /// Index of the next sample to be synthesised.
    pub fn next_sample(&self) -> u64 {
        self.next_sample
    }

    /// Skips to sample `n` (when the thread fell behind), keeping the tone's phase.
    pub fn skip_to(&mut self, n: u64) {
        self.next_sample = self.next_sample.max(n);
    }

    /// Synthesises the next 10 ms with the game's current thrust (0..=1) and hit count.
    pub fn fill(&mut self, thrust: f32, hits: u64, out: &mut [i16; FRAME_SAMPLES * CHANNELS]) {
        if hits > self.hits_seen {
            self.hits_seen = hits;
            self.hit_left = HIT_SAMPLES;
        }
        let rate = f64::from(SAMPLE_RATE);
        let target = f64::from(thrust.clamp(0.0, 1.0));
        for frame in out.chunks_exact_mut(CHANNELS) {
            let n = self.next_sample;
            self.next_sample += 1;
            // About 20 ms to follow the ship.
            self.thrust += (target - self.thrust) * (1.0 / 960.0);
            let freq = 70.0 + 110.0 * self.thrust;
            self.engine_phase = (self.engine_phase + freq / rate).fract();
            let p = self.engine_phase * std::f64::consts::TAU;
            let engine = (0.03 + 0.15 * self.thrust) * (p.sin() + 0.4 * (2.0 * p).sin());
            let mut v = engine;
            if self.hit_left > 0 {
                self.noise ^= self.noise << 13;
                self.noise ^= self.noise >> 17;
                self.noise ^= self.noise << 5;
                let white = f64::from(self.noise) / f64::from(u32::MAX) * 2.0 - 1.0;
                let env = f64::from(self.hit_left) / f64::from(HIT_SAMPLES);
                v += 0.4 * white * env * env;
                self.hit_left -= 1;
            }
            let t_us = sample_time_us(n);
            if beep_on(t_us) {
                let t = n as f64 / rate;
                v += 0.5 * (std::f64::consts::TAU * BEEP_HZ * t).sin();
            }
            let s = (v.clamp(-1.0, 1.0) * 32767.0) as i16;
            frame.fill(s);
        }
    }
}

/// The timeline a session's sound and picture share.
#[derive(Debug, Clone, Copy)]
pub struct Epoch {
    /// When frame slot 0 and sample 0 are due (monotonic).
    pub at: Instant,
    /// The same instant on the Unix clock, microseconds.
    pub unix_us: u64,
}

/// The queue between a session's audio thread and its sender: bounded, and when full it drops
/// the oldest packet, not the newest. After a stall of the sender longer than the queue, the
/// newest 160 ms is what is still worth sending: a player schedules by capture time, so older
/// packets arrive past their playout time and are discarded; dropping the newest instead kept
/// the first 160 ms of the stall and lost the sound a player could still play.
pub fn audio_queue(capacity: usize) -> (AudioSender, AudioReceiver) {
    let shared = Arc::new(QueueShared {
        capacity: capacity.max(1),
        packets: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(capacity)),
        ready: tokio::sync::Notify::new(),
        sender_gone: std::sync::atomic::AtomicBool::new(false),
        receiver_gone: std::sync::atomic::AtomicBool::new(false),
    });
    (AudioSender(shared.clone()), AudioReceiver(shared))
}

#[derive(Debug)]
struct QueueShared {
    capacity: usize,
    packets: std::sync::Mutex<std::collections::VecDeque<EncodedAudio>>,
    ready: tokio::sync::Notify,
    sender_gone: std::sync::atomic::AtomicBool,
    receiver_gone: std::sync::atomic::AtomicBool,
}

impl QueueShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<EncodedAudio>> {
        self.packets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The audio thread's end of [`audio_queue`].
#[derive(Debug)]
pub struct AudioSender(Arc<QueueShared>);

impl AudioSender {
    /// Queues `packet`, dropping the oldest queued one when full; returns whether one was
    /// dropped. Never blocks on the receiver.
    pub fn push(&self, packet: EncodedAudio) -> bool {
        let dropped = {
            let mut q = self.0.lock();
            let dropped = q.len() >= self.0.capacity && q.pop_front().is_some();
            q.push_back(packet);
            dropped
        };
        // One consumer: a stored permit wakes it even if it is not waiting yet.
        self.0.ready.notify_one();
        dropped
    }

    /// Whether the receiver is gone (the session ended): the thread can stop.
    pub fn is_closed(&self) -> bool {
        self.0.receiver_gone.load(Ordering::Acquire)
    }
}

impl Drop for AudioSender {
    fn drop(&mut self) {
        self.0.sender_gone.store(true, Ordering::Release);
        self.0.ready.notify_one();
    }
}

/// The session sender's end of [`audio_queue`].
#[derive(Debug)]
pub struct AudioReceiver(Arc<QueueShared>);

impl AudioReceiver {
    /// The oldest queued packet, waiting for one; `None` once the sender is gone and the queue
    /// is empty.
    pub async fn recv(&mut self) -> Option<EncodedAudio> {
        loop {
            let ready = self.0.ready.notified();
            if let Some(p) = self.0.lock().pop_front() {
                return Some(p);
            }
            if self.0.sender_gone.load(Ordering::Acquire) {
                // A last push may have landed between the pop above and the flag.
                return self.0.lock().pop_front();
            }
            ready.await;
        }
    }

    /// The oldest queued packet, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<EncodedAudio> {
        self.0.lock().pop_front()
    }
}

impl Drop for AudioReceiver {
    fn drop(&mut self) {
        self.0.receiver_gone.store(true, Ordering::Release);
    }
}

/// Starts the built-in game's audio thread: synthesises and encodes a packet every 10 ms of
/// the epoch's clock until `cancel` fires or the receiver is dropped.
pub fn spawn_builtin(
    cfg: &AudioConfig,
    epoch: Epoch,
    inputs: Arc<SynthInputs>,
    cancel: CancellationToken,
    thread_name: String,
) -> Result<AudioReceiver, AudioError> {
    let mut encoder = OpusEncoder::new(cfg)?;
    let (tx, rx) = audio_queue(AUDIO_QUEUE);
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let mut synth = Synth::default();
            let mut pcm = [0i16; FRAME_SAMPLES * CHANNELS];
            let mut seq = 0u32;
            let period = Duration::from_millis(10);
            loop {
                let k = synth.next_sample() / FRAME_SAMPLES as u64;
                // Packet k holds samples of [k, k+1) * 10 ms. Synthesised sound needs no
                // waiting for its samples to happen: it is made when its first sample is due,
                // as the picture of a frame slot is rendered when the slot is due.
                let due = epoch.at + period * u32::try_from(k).unwrap_or(u32::MAX);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                } else {
                    let behind = now.duration_since(due).as_millis() as u64 / 10;
                    if behind > MAX_BEHIND_PACKETS {
                        synth.skip_to((k + behind) * FRAME_SAMPLES as u64);
                        continue;
                    }
                }
                if cancel.is_cancelled() || tx.is_closed() {
                    break;
                }
                let first = synth.next_sample();
                synth.fill(
                    inputs.thrust_milli.load(Ordering::Relaxed) as f32 / 1000.0,
                    inputs.hits.load(Ordering::Relaxed),
                    &mut pcm,
                );
                match encoder.encode(&pcm) {
                    Ok(data) => {
                        let packet = EncodedAudio {
                            seq,
                            capture_ts_us: epoch.unix_us + sample_time_us(first),
                            samples: SAMPLES_10MS,
                            fec: encoder.fec(),
                            data,
                        };
                        seq = seq.wrapping_add(1);
                        // Full: the sender is behind; the oldest packet makes room.
                        tx.push(packet);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "audio packet lost to an encoder failure");
                    }
                }
            }
        })
        .map_err(AudioError::Thread)?;
    Ok(rx)
}

/// Starts the thread that reads an external program's PCM (s16le, 48 kHz, stereo) from its
/// audio pipe, 10 ms at a time, and encodes it. The program paces its sound; each packet's
/// capture time is when its last byte arrived, less its 10 ms. Ends at the pipe's end (the
/// program exited or closed it; the session goes on silent), on a read error, when `cancel`
/// fires, or when the receiver is dropped. With no encoder (audio disabled) it reads and
/// discards, so that a program never blocks on a full pipe.
pub fn spawn_pipe(
    cfg: Option<&AudioConfig>,
    mut pipe: std::fs::File,
    cancel: CancellationToken,
    thread_name: String,
) -> Result<Option<AudioReceiver>, AudioError> {
    let mut encoder = cfg.map(OpusEncoder::new).transpose()?;
    let (tx, rx) = audio_queue(AUDIO_QUEUE);
    let rx = encoder.as_ref().map(|_| rx);
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let mut buf = [0u8; FRAME_BYTES];
            let mut pcm = [0i16; FRAME_SAMPLES * CHANNELS];
            let mut seq = 0u32;
            loop {
                // `read_exact` handles short reads; a partial packet at the end is dropped.
                if pipe.read_exact(&mut buf).is_err() || cancel.is_cancelled() {
                    break;
                }
                let Some(enc) = encoder.as_mut() else {
                    continue;
                };
                if tx.is_closed() {
                    break;
                }
                let arrived = nearpath_protocol::unix_micros();
                for (s, b) in pcm.iter_mut().zip(buf.chunks_exact(2)) {
                    *s = i16::from_le_bytes([b[0], b[1]]);
                }
                match enc.encode(&pcm) {
                    Ok(data) => {
                        let packet = EncodedAudio {
                            seq,
                            capture_ts_us: arrived.saturating_sub(10_000),
                            samples: SAMPLES_10MS,
                            fec: enc.fec(),
                            data,
                        };
                        seq = seq.wrapping_add(1);
                        tx.push(packet);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "audio packet lost to an encoder failure");
                    }
                }
            }
            tracing::debug!("external program's audio pipe ended");
        })
        .map_err(AudioError::Thread)?;
    Ok(rx)
}

/// The flags byte of an audio datagram for `packet`.
pub fn flags(packet: &EncodedAudio) -> u8 {
    if packet.fec {
        AUDIO_FLAG_FEC
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes Opus packets for the tests (libopus' decoder).
    struct Decoder(std::ptr::NonNull<audiopus_sys::OpusDecoder>);

    impl Decoder {
        fn new() -> Self {
            let mut err = 0;
            let raw = unsafe { audiopus_sys::opus_decoder_create(48_000, 2, &mut err) };
            Self(std::ptr::NonNull::new(raw).expect("decoder"))
        }

        fn decode(&mut self, packet: &[u8]) -> Vec<i16> {
            let mut out = vec![0i16; 5760 * 2];
            let n = unsafe {
                audiopus_sys::opus_decode(
                    self.0.as_ptr(),
                    packet.as_ptr(),
                    packet.len() as i32,
                    out.as_mut_ptr(),
                    5760,
                    0,
                )
            };
            assert!(n > 0, "decode failed: {n}");
            out.truncate(n as usize * 2);
            out
        }
    }

    impl Drop for Decoder {
        fn drop(&mut self) {
            unsafe { audiopus_sys::opus_decoder_destroy(self.0.as_ptr()) }
        }
    }

    fn rms(s: &[i16]) -> f64 {
        (s.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / s.len() as f64).sqrt()
    }

    /// Energy at `hz` (Goertzel) relative to the signal's, over the left channel.
    fn tone_share(s: &[i16], hz: f64) -> f64 {
        let left: Vec<f64> = s.iter().step_by(2).map(|&v| f64::from(v)).collect();
        let w = std::f64::consts::TAU * hz / 48_000.0;
        let (mut s1, mut s2) = (0.0, 0.0);
        for x in &left {
            let s0 = x + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
        let total: f64 = left.iter().map(|x| x * x).sum::<f64>() * left.len() as f64 / 2.0;
        power / total.max(1.0)
    }

    /// Session time of frame slot `index` at `fps`, in microseconds, as the pacer makes it due.
    fn slot_time_us(index: u64, fps: u32) -> u64 {
        crate::game::pacer::slot_offset(index, fps).as_micros() as u64
    }

    #[test]
    fn beep_and_flash_are_one_window_of_the_session_timeline() {
        for fps in [30, 60, 144] {
            for i in 0..(fps as u64 * 5) {
                let t = slot_time_us(i, fps);
                assert_eq!(flash_on(t), beep_on(t));
            }
        }
        assert!(beep_on(0) && beep_on(59_999) && !beep_on(60_000));
        assert!(beep_on(2_000_000) && !beep_on(1_999_999));
        // 60 fps: frames 0..=3 flash (0, 16.7, 33.3, 50 ms), frame 4 (66.7 ms) does not.
        let flashing: Vec<u64> = (0..130)
            .filter(|&i| flash_on(slot_time_us(i, 60)))
            .collect();
        assert_eq!(flashing, [0, 1, 2, 3, 120, 121, 122, 123]);
    }

    #[test]
    fn synth_beeps_exactly_in_the_window_and_the_engine_follows_thrust() {
        let mut synth = Synth::default();
        let mut pcm = [0i16; FRAME_SAMPLES * CHANNELS];
        let mut packets = Vec::new();
        for _ in 0..200 {
            synth.fill(0.0, 0, &mut pcm);
            packets.push(pcm.to_vec());
        }
        // Packets 0..6 (0..60 ms) beep, the rest of the first 2 s does not.
        for (k, p) in packets.iter().enumerate() {
            let share = tone_share(p, BEEP_HZ);
            if k < 6 {
                assert!(share > 0.5, "packet {k}: beep share {share}");
            } else {
                assert!(share < 0.01, "packet {k}: beep share {share}");
            }
        }
        let idle = rms(&packets[100]);
        for _ in 0..20 {
            synth.fill(1.0, 0, &mut pcm);
        }
        let full = rms(&pcm);
        assert!(
            full > idle * 3.0,
            "engine at full thrust {full} vs idle {idle}"
        );
        // A hit adds a burst that decays.
        synth.fill(1.0, 1, &mut pcm);
        let hit = rms(&pcm);
        assert!(hit > full * 1.5, "hit {hit} vs engine {full}");
        for _ in 0..20 {
            synth.fill(1.0, 1, &mut pcm);
        }
        assert!(rms(&pcm) < hit, "the hit sound ends");
    }

    #[test]
    fn opus_round_trip_keeps_the_beep_in_10ms_packets() {
        let cfg = AudioConfig::default();
        let mut enc = OpusEncoder::new(&cfg).unwrap();
        let mut dec = Decoder::new();
        let mut synth = Synth::default();
        let mut pcm = [0i16; FRAME_SAMPLES * CHANNELS];
        let mut decoded = Vec::new();
        for _ in 0..20 {
            synth.fill(0.0, 0, &mut pcm);
            let packet = enc.encode(&pcm).unwrap();
            assert!(!packet.is_empty() && packet.len() <= MAX_OPUS_PACKET);
            // 96 kbit/s is 120 bytes per 10 ms; VBR stays near it.
            assert!(packet.len() < 400, "{} bytes", packet.len());
            let out = dec.decode(&packet);
            assert_eq!(out.len(), FRAME_SAMPLES * CHANNELS);
            decoded.extend(out);
        }
        // The decoded beep is there (allowing the codec's few ms of delay).
        let beep = &decoded[2 * 480 * 2..5 * 480 * 2];
        assert!(tone_share(beep, BEEP_HZ) > 0.3);
        let after = &decoded[10 * 480 * 2..];
        assert!(tone_share(after, BEEP_HZ) < 0.05);
    }

    #[test]
    fn every_config_the_validator_accepts_makes_an_encoder() {
        for (kbps, fec, dtx, loss) in [
            (6, false, true, 0),
            (510, true, false, 100),
            (96, true, true, 5),
        ] {
            let cfg = AudioConfig {
                enabled: true,
                bitrate_kbps: kbps,
                fec,
                dtx,
                expected_loss_percent: loss,
            };
            let mut enc = OpusEncoder::new(&cfg).unwrap();
            assert_eq!(enc.fec(), fec);
            enc.encode(&[0; FRAME_SAMPLES * CHANNELS]).unwrap();
        }
    }

    fn packet(seq: u32) -> EncodedAudio {
        EncodedAudio {
            seq,
            capture_ts_us: u64::from(seq) * 10_000,
            samples: SAMPLES_10MS,
            fec: false,
            data: Bytes::from_static(&[0xfc]),
        }
    }

    #[tokio::test]
    async fn a_full_audio_queue_drops_the_oldest_packet_not_the_newest() {
        // The regression this guards: the queue was a tokio channel whose full `try_send`
        // dropped the packet being sent, so after a stall the sender sent the oldest 160 ms
        // (already past its playout time) and lost the newest.
        let (tx, mut rx) = audio_queue(AUDIO_QUEUE);
        let n = AUDIO_QUEUE as u32 + 4;
        let dropped: Vec<bool> = (0..n).map(|seq| tx.push(packet(seq))).collect();
        assert!(dropped[..AUDIO_QUEUE].iter().all(|d| !d), "{dropped:?}");
        assert!(dropped[AUDIO_QUEUE..].iter().all(|d| *d), "{dropped:?}");
        let mut seqs = Vec::new();
        while let Some(p) = rx.try_recv() {
            seqs.push(p.seq);
        }
        assert_eq!(seqs, (4..n).collect::<Vec<_>>());
        // Not full any more: nothing is dropped.
        assert!(!tx.push(packet(n)));
        assert_eq!(rx.recv().await.map(|p| p.seq), Some(n));
    }

    #[tokio::test]
    async fn the_audio_queue_wakes_its_receiver_and_ends_with_either_side() {
        let (tx, mut rx) = audio_queue(4);
        // A push from the audio thread wakes a receiver already waiting.
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.push(packet(7));
            tx
        });
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("woken within 10 s");
        assert_eq!(got.map(|p| p.seq), Some(7));
        let tx = pusher.join().unwrap();
        // The sender gone: what is queued still comes, then the end.
        tx.push(packet(8));
        drop(tx);
        assert_eq!(rx.recv().await.map(|p| p.seq), Some(8));
        assert!(rx.recv().await.is_none());
        // The receiver gone: the audio thread learns to stop.
        let (tx, rx) = audio_queue(4);
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
    }

    #[tokio::test]
    async fn builtin_thread_paces_by_sample_count_and_stamps_the_epoch_clock() {
        let epoch = Epoch {
            at: Instant::now(),
            unix_us: 1_000_000_000,
        };
        let cancel = CancellationToken::new();
        let mut rx = spawn_builtin(
            &AudioConfig::default(),
            epoch,
            Arc::default(),
            cancel.clone(),
            "audio-test".into(),
        )
        .unwrap();
        let mut got = Vec::new();
        while got.len() < 50 {
            let p = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a packet within 10 s")
                .expect("thread running");
            got.push(p);
        }
        let elapsed = epoch.at.elapsed();
        for (k, p) in got.iter().enumerate() {
            assert_eq!(p.seq as usize, k);
            assert_eq!(p.capture_ts_us, 1_000_000_000 + k as u64 * 10_000);
            assert_eq!(p.samples, 480);
            assert!(p.fec);
        }
        // Packet 49 is not made before 490 ms of the clock: paced, not bursted.
        assert!(elapsed >= Duration::from_millis(490), "{elapsed:?}");
        cancel.cancel();
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while rx.recv().await.is_some() {}
        })
        .await;
        assert!(end.is_ok(), "the thread ends when cancelled");
    }

    #[tokio::test]
    async fn pipe_reader_encodes_10ms_chunks_and_ends_with_the_pipe() {
        let (read, write) = std::io::pipe().unwrap();
        let cancel = CancellationToken::new();
        let mut rx = spawn_pipe(
            Some(&AudioConfig::default()),
            std::fs::File::from(std::os::fd::OwnedFd::from(read)),
            cancel,
            "audio-pipe-test".into(),
        )
        .unwrap()
        .unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut w = write;
            // 5 packets in odd-sized writes, then half a packet, then close.
            let bytes = vec![0x11u8; FRAME_BYTES * 5 + FRAME_BYTES / 2];
            for chunk in bytes.chunks(777) {
                w.write_all(chunk).unwrap();
            }
        });
        let mut seqs = Vec::new();
        while let Some(p) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the reader ends at the pipe's end")
        {
            seqs.push(p.seq);
        }
        writer.join().unwrap();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
    }
}
