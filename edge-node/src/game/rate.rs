//! Congestion-aware sending of a game session's frames: a sans-IO core that decides, for each
//! frame slot, whether to encode at all, which bitrate the encoder targets, and which frames
//! already sent are too late to keep.
//!
//! The node→gateway path, not the encoder, sets the pace. Without this the node encoded at the
//! session's full rate and let quinn queue what the path could not carry: frame latency climbed
//! from 45 ms to seconds within 3 s. The rules:
//!
//! - **Never queue.** A frame slot is skipped *before encoding* when the frames in flight (sent,
//!   not yet acknowledged) already fill quinn's congestion window, or hold more than the
//!   delivered rate carries in a round trip plus [`RateConfig::queue_allowance`]: anything sent
//!   now would wait behind unsent bytes. Skipping before encoding keeps the encoder's reference
//!   chain intact, so no keyframe is needed.
//! - **Drop what is late.** A frame still unacknowledged [`RateConfig::max_frame_delay`] past its
//!   expected acknowledgement (base RTT) is reset, which removes its unsent bytes from quinn; the
//!   next frame is then an IDR, because the decoder lost a reference.
//! - **Bitrate follows delivery (delay-based AIMD).** Every acknowledgement is a sample of the
//!   frame's send-to-ack time. The base RTT is the windowed minimum; the queueing delay is the
//!   minimum over the last [`RECENT_WINDOW`] minus the base, a minimum so that a frame delayed by
//!   one retransmission (random loss, which is not congestion) does not count, while a standing
//!   queue, which delays every frame, does. When it exceeds [`RateConfig::queue_delay_threshold`],
//!   or a frame is reset, skipped for a full path, or refused by the gateway, the target backs
//!   off multiplicatively (at most once per round trip) to below the delivered rate; otherwise it
//!   probes up a few percent per [`PROBE_INTERVAL`], but only while the encoder actually uses the
//!   target: it must produce at least [`FILL_TO_PROBE`] of it, unless the target is still below
//!   the highest rate delivered in the last [`BASE_WINDOW`]. A static scene, or an encoder that
//!   undershoots (x264 under a VBV cap), does not license a higher target: the target would
//!   otherwise climb past what the path has ever carried, and the encoder's next complex scene
//!   would fill it and queue.
//! - **Back after a dip.** A target the path carried calmly in the last [`BASE_WINDOW`] is
//!   remembered, and after a back-off the target climbs back to it whatever the encoder makes
//!   of it, so an encoder that undershoots is not walked down by repeated dips of the path.
//! - **Limits.** The target stays within `[min_kbps, max_kbps]` (the session's bitrate is the
//!   ceiling). Only when the bitrate sits at the floor and the path is still congested does the
//!   frame rate fall (every 2nd, 3rd, 4th slot); it comes back before the bitrate rises.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Acknowledgement samples whose minimum is the "recent" delay.
pub const RECENT_WINDOW: Duration = Duration::from_millis(300);
/// Fewest samples in [`RECENT_WINDOW`] for a recent delay (fewer, at a low frame rate, would
/// make its minimum follow the jitter).
const RECENT_MIN_SAMPLES: usize = 4;
/// While quinn's congestion controller is still finding the path (its start-up), a window too
/// small for the encoder's rate is not the path's verdict: no back-off on skipped slots before
/// this.
pub const STARTUP_GRACE: Duration = Duration::from_secs(2);
/// How long the base RTT (minimum ack delay) is remembered before it is measured afresh, so a
/// route change to a longer path is learnt.
pub const BASE_WINDOW: Duration = Duration::from_secs(10);
/// Window over which delivered and sent rates are measured.
pub const RATE_WINDOW: Duration = Duration::from_millis(500);
/// How often the target may probe up.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// No probing this long after a back-off, so the queue it relieved can drain.
pub const HOLD_AFTER_BACKOFF: Duration = Duration::from_millis(500);
/// Multiplicative back-off factor.
const BACKOFF: f64 = 0.85;
/// Share of the delivered rate a back-off goes to at most (below it, the queue drains).
const DELIVERED_SHARE: f64 = 0.9;
/// Multiplicative probe per [`PROBE_INTERVAL`] (about +34 % per second).
const PROBE: f64 = 1.03;
/// Share of the target the encoder must produce (over [`RATE_WINDOW`]) for the target to probe
/// up. At 0.7, x264 on the built-in game (which produces about two thirds of its target) kept
/// the target rising to about 2.7 Mbit/s on a 2 Mbit/s path while 1.8 Mbit/s arrived.
pub const FILL_TO_PROBE: f64 = 0.85;
/// Share of the target the encoder must produce for the target to be remembered as one the
/// path carried (see [`RateController`]'s `good_kbps`): a static scene, producing a few
/// percent of any target, shows nothing about the path.
const FILL_TO_REMEMBER: f64 = 0.5;
/// Share of what is sent that must be delivered (over [`RATE_WINDOW`]) for the path to count as
/// keeping up with the encoder.
const KEEPS_UP: f64 = 0.85;
/// How long the target must be held calmly before it is remembered as one the path carries.
const CALM_TO_REMEMBER: Duration = Duration::from_secs(1);
/// Largest frame-rate divisor (60 fps → 15 fps).
pub const MAX_FPS_DIVISOR: u32 = 4;

/// What the core is configured with (per session).
#[derive(Debug, Clone, PartialEq)]
pub struct RateConfig {
    /// The session's bitrate: never exceeded.
    pub max_kbps: u32,
    /// The floor, below which the frame rate falls instead.
    pub min_kbps: u32,
    /// Queueing delay above the base RTT that counts as congestion.
    pub queue_delay_threshold: Duration,
    /// How late past the base RTT a frame's acknowledgement may be before it is reset.
    pub max_frame_delay: Duration,
    /// Time worth of frames (at the delivered rate) that may be in flight above one round trip.
    pub queue_allowance: Duration,
}

impl RateConfig {
    /// Defaults for a session asking for `max_kbps`, with a floor of `min_kbps` (clamped so the
    /// floor never exceeds the ceiling).
    pub fn new(max_kbps: u32, min_kbps: u32, max_frame_delay: Duration) -> RateConfig {
        let max_kbps = max_kbps.max(1);
        RateConfig {
            max_kbps,
            min_kbps: min_kbps.clamp(1, max_kbps),
            queue_delay_threshold: Duration::from_millis(40),
            max_frame_delay,
            queue_allowance: Duration::from_millis(60),
        }
    }
}

/// What to do with a frame slot, decided before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotDecision {
    /// Render and encode it.
    Encode,
    /// Skip it: the frames in flight fill the path; a new one would only wait.
    SkipPathFull,
    /// Skip it: the bitrate is at its floor and the frame rate is reduced.
    SkipFrameRate,
}

/// How a frame sent on its own stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameOutcome {
    /// The gateway acknowledged every byte.
    Acked,
    /// The gateway stopped the stream (it dropped the frame: late, over its budget, or no
    /// session).
    Refused,
    /// This side reset it (see [`RateController::poll_reset`]).
    Reset,
    /// The connection failed or the stream could not be opened.
    Failed,
}

/// Per-session counters and the current state, for stats and tracing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RateStats {
    /// The encoder's target now, in kbit/s.
    pub target_kbps: u32,
    /// Frame slots skipped before encoding because the path was full.
    pub skipped_path_full: u64,
    /// Frame slots skipped because the frame rate was reduced at the bitrate floor.
    pub skipped_frame_rate: u64,
    /// Frames reset because they were too late.
    pub reset: u64,
    /// Frames the gateway refused.
    pub refused: u64,
    /// Frames acknowledged.
    pub acked: u64,
    /// Times the target backed off.
    pub backoffs: u64,
    /// The current frame-rate divisor (1: full rate).
    pub fps_divisor: u32,
    /// Base RTT (minimum send-to-ack time), if measured.
    pub base_rtt: Option<Duration>,
    /// Recent queueing delay above the base RTT, if measured.
    pub queue_delay: Option<Duration>,
    /// Delivered rate over the last [`RATE_WINDOW`], in kbit/s.
    pub delivered_kbps: u32,
    /// Frames in flight now.
    pub in_flight_frames: u32,
    /// Bytes in flight now.
    pub in_flight_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    sent: Instant,
    bytes: u64,
    keyframe: bool,
    reset_requested: bool,
}

/// The sans-IO core. Feed it events with their time; ask it what to do.
#[derive(Debug)]
pub struct RateController {
    cfg: RateConfig,
    target_kbps: u32,
    /// Whether the encoder must be told a new target.
    target_changed: bool,
    keyframe_wanted: bool,
    /// The newest IDR sent (or asked for, as the seq after the newest sent frame).
    last_keyframe: Option<u64>,
    /// One past the newest frame sent.
    next_seq_hint: u64,
    in_flight: BTreeMap<u64, InFlight>,
    in_flight_bytes: u64,
    /// Congestion window quinn reported last, in bytes.
    cwnd: Option<u64>,
    /// quinn's smoothed round-trip time, last reported.
    srtt: Option<Duration>,
    /// (when, send-to-ack delay) of recent acknowledgements.
    recent: VecDeque<(Instant, Duration)>,
    /// The base RTT and when that minimum was seen.
    base: Option<(Duration, Instant)>,
    /// A candidate for the next base, collected while the current one ages.
    next_base: Option<Duration>,
    /// (when, bytes) acknowledged / sent, over [`RATE_WINDOW`].
    delivered: VecDeque<(Instant, u64)>,
    sent: VecDeque<(Instant, u64)>,
    last_backoff: Option<Instant>,
    /// The highest delivered rate (kbit/s) of the last [`BASE_WINDOW`] and when it was seen:
    /// what the path has shown it carries.
    path_kbps: Option<(u32, Instant)>,
    /// The highest target of the last [`BASE_WINDOW`] that the path carried calmly (no queue,
    /// no back-off for [`HOLD_AFTER_BACKOFF`], what was sent delivered, the encoder producing at
    /// least [`FILL_TO_REMEMBER`] of it), and when it was last held. After a back-off the target
    /// may climb back to it whatever the encoder makes of it. `path_kbps` alone is not enough
    /// for an encoder that undershoots: the rate it delivers is its own output, a share of the
    /// target, so each dip of the path let the target climb back only to that share, and
    /// repeated dips walked it down (4,000 → 3,200 → 2,560 kbit/s at 80% fill).
    good_kbps: Option<(u32, Instant)>,
    /// Since when the target has been held calmly, and its lowest value since.
    calm: Option<(Instant, u32)>,
    /// The last acknowledgement.
    last_ack: Option<Instant>,
    last_probe: Instant,
    /// A congestion signal seen since the last back-off decision.
    congested: bool,
    /// It came from the path itself (skips for a full path, refusals), not from delays.
    hard: bool,
    /// When slots were skipped for a full path, over [`RATE_WINDOW`].
    skips: VecDeque<Instant>,
    /// Since when the queueing delay has been above the threshold.
    queue_since: Option<Instant>,
    fps_divisor: u32,
    started: Instant,
    stats: RateStats,
}

impl RateController {
    /// A controller starting at the session's bitrate.
    pub fn new(now: Instant, cfg: RateConfig) -> RateController {
        let target_kbps = cfg.max_kbps;
        RateController {
            cfg,
            target_kbps,
            target_changed: false,
            keyframe_wanted: false,
            last_keyframe: None,
            next_seq_hint: 0,
            in_flight: BTreeMap::new(),
            in_flight_bytes: 0,
            cwnd: None,
            srtt: None,
            recent: VecDeque::new(),
            base: None,
            next_base: None,
            delivered: VecDeque::new(),
            sent: VecDeque::new(),
            last_backoff: None,
            path_kbps: None,
            good_kbps: None,
            calm: None,
            last_ack: None,
            last_probe: now,
            congested: false,
            hard: false,
            skips: VecDeque::new(),
            queue_since: None,
            fps_divisor: 1,
            started: now,
            stats: RateStats::default(),
        }
    }

    /// The encoder's target bitrate now, in kbit/s.
    pub fn target_kbps(&self) -> u32 {
        self.target_kbps
    }

    /// Changes the session's ceiling (the client asked for another bitrate); the target follows
    /// at once if it is above.
    pub fn set_max_kbps(&mut self, kbps: u32) {
        if kbps == 0 {
            return;
        }
        self.cfg.max_kbps = kbps;
        self.cfg.min_kbps = self.cfg.min_kbps.min(kbps);
        if self.target_kbps > kbps {
            self.set_target(kbps);
        }
    }

    /// What quinn says about the path now: its congestion window in bytes and its smoothed
    /// round-trip time.
    pub fn handle_path(&mut self, _now: Instant, cwnd: u64, srtt: Duration) {
        self.cwnd = Some(cwnd);
        self.srtt = Some(srtt);
    }

    /// Decides frame slot `index` (the pacer's slot number) before anything is rendered.
    pub fn poll_slot(&mut self, now: Instant, index: u64) -> SlotDecision {
        self.update(now);
        if self.fps_divisor > 1 && !index.is_multiple_of(u64::from(self.fps_divisor)) {
            self.stats.skipped_frame_rate += 1;
            return SlotDecision::SkipFrameRate;
        }
        if self.path_full(now) {
            self.stats.skipped_path_full += 1;
            self.skips.push_back(now);
            self.update(now);
            return SlotDecision::SkipPathFull;
        }
        SlotDecision::Encode
    }

    /// Whether a new frame would wait behind bytes the path has not taken yet.
    fn path_full(&self, now: Instant) -> bool {
        let Some(oldest) = self.in_flight.values().map(|f| f.sent).min() else {
            // One frame always goes, so a frame larger than the window (an IDR) still does.
            return false;
        };
        // Stalled: nothing acknowledged since the oldest frame in flight went out, a round trip
        // (200 ms while none is measured) and the allowance ago. This covers the start, before
        // any rate is known, and a path that stopped (a blackout): frames sent now would queue.
        // A frame held up by one retransmission does not count, as later ones are acknowledged.
        // The round trip is the larger of the base and quinn's smoothed one, plus half of that:
        // on a jittery path most frames take well over the minimum.
        let expected = match (self.base_rtt(), self.srtt) {
            (None, None) => Duration::from_millis(200),
            (b, s) => {
                let rtt = b.unwrap_or_default().max(s.unwrap_or_default());
                rtt + rtt / 2
            }
        };
        let progressed = self.last_ack.is_some_and(|a| a >= oldest);
        if !progressed
            && now.saturating_duration_since(oldest) > expected + self.cfg.queue_allowance
        {
            return true;
        }
        // quinn cannot have more than its window in flight: bytes beyond it wait unsent.
        self.cwnd.is_some_and(|cwnd| self.in_flight_bytes >= cwnd)
    }

    /// A frame went out on its stream (handed to quinn); `keyframe`: it is an IDR.
    pub fn handle_sent(&mut self, now: Instant, seq: u64, bytes: u64, keyframe: bool) {
        if self.in_flight.contains_key(&seq) {
            return;
        }
        if keyframe {
            self.last_keyframe = Some(self.last_keyframe.map_or(seq, |k| k.max(seq)));
        }
        self.in_flight.insert(
            seq,
            InFlight {
                sent: now,
                bytes,
                keyframe,
                reset_requested: false,
            },
        );
        self.in_flight_bytes += bytes;
        self.next_seq_hint = self.next_seq_hint.max(seq + 1);
        self.sent.push_back((now, bytes));
        self.update(now);
    }

    /// How frame `seq` ended. Unknown or repeated sequence numbers are ignored.
    pub fn handle_outcome(&mut self, now: Instant, seq: u64, outcome: FrameOutcome) {
        let Some(f) = self.in_flight.remove(&seq) else {
            return;
        };
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(f.bytes);
        match outcome {
            FrameOutcome::Acked => {
                self.stats.acked += 1;
                let delay = now.saturating_duration_since(f.sent);
                self.last_ack = Some(now);
                self.delivered.push_back((now, f.bytes));
                self.note_path(now);
                // An IDR is several frames' worth of bytes: its acknowledgement time includes
                // its own transmission, which is not queueing (the first one, on a slow path,
                // would otherwise make the base RTT hundreds of milliseconds).
                if !f.keyframe {
                    self.recent.push_back((now, delay));
                    self.note_base(now, delay);
                }
            }
            FrameOutcome::Refused => {
                self.stats.refused += 1;
                self.congested = true;
                self.hard = true;
            }
            FrameOutcome::Reset => {
                // Counted when the reset was decided.
            }
            FrameOutcome::Failed => {}
        }
        self.update(now);
    }

    /// The next frame to reset because it is too late, if any; each is returned once. The next
    /// encoded frame is then an IDR ([`Self::poll_keyframe`]).
    pub fn poll_reset(&mut self, now: Instant) -> Option<u64> {
        let seq = self
            .in_flight
            .iter()
            .find(|(_, f)| !f.reset_requested && self.deadline(f).is_some_and(|d| now > d))
            .map(|(seq, _)| *seq)?;
        if let Some(f) = self.in_flight.get_mut(&seq) {
            f.reset_requested = true;
        }
        self.stats.reset += 1;
        // Not a congestion signal by itself: a standing queue shows in the acknowledgement
        // delays long before a frame is this late, so a late frame is one that lost packets
        // (twice) or met a blackout; lowering the bitrate would not bring it sooner.
        // The decoder needs an IDR after a lost reference, unless one sent after the lost frame
        // is already on its way (a burst of resets asks once).
        if self.last_keyframe.is_none_or(|k| seq >= k) {
            self.keyframe_wanted = true;
            // Frames up to the next one encoded are covered by the IDR asked for now.
            self.last_keyframe = Some(self.next_seq_hint);
        }
        self.update(now);
        Some(seq)
    }

    /// When a frame in flight is too late: a round trip, its own transmission time at the
    /// delivered rate (a big IDR on a slow path takes a while and is not late for it), and
    /// [`RateConfig::max_frame_delay`]. Nothing is late before the first acknowledgement: until
    /// then there is no round trip to measure against, and resetting the first IDR would only
    /// make the next frame another one.
    fn deadline(&self, f: &InFlight) -> Option<Instant> {
        let base = self.base_rtt()?;
        let transmission = self.delivered_bps().map_or(Duration::ZERO, |bps| {
            Duration::from_secs_f64(f.bytes as f64 * 8.0 / bps.max(1.0))
        });
        Some(f.sent + base + transmission + self.cfg.max_frame_delay)
    }

    /// Whether the next frame must be an IDR (asked once per reset burst).
    pub fn poll_keyframe(&mut self) -> bool {
        std::mem::take(&mut self.keyframe_wanted)
    }

    /// A new target for the encoder, once per change.
    pub fn poll_bitrate(&mut self) -> Option<u32> {
        std::mem::take(&mut self.target_changed).then_some(self.target_kbps)
    }

    /// When [`Self::poll_reset`] may next have something: the earliest deadline of a frame in
    /// flight.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.in_flight
            .values()
            .filter(|f| !f.reset_requested)
            .filter_map(|f| self.deadline(f))
            .min()
    }

    /// Counters and state now.
    pub fn stats(&self) -> RateStats {
        RateStats {
            target_kbps: self.target_kbps,
            fps_divisor: self.fps_divisor,
            base_rtt: self.base_rtt(),
            queue_delay: self.queue_delay(),
            delivered_kbps: self
                .delivered_bps()
                .map_or(0, |b| (b / 1000.0).round() as u32),
            in_flight_frames: self.in_flight.len() as u32,
            in_flight_bytes: self.in_flight_bytes,
            ..self.stats
        }
    }

    fn base_rtt(&self) -> Option<Duration> {
        self.base.map(|(d, _)| d)
    }

    /// Minimum of the recent ack delays, above the base.
    fn queue_delay(&self) -> Option<Duration> {
        let base = self.base_rtt()?;
        if self.recent.len() < RECENT_MIN_SAMPLES {
            return None;
        }
        let recent = self.recent.iter().map(|(_, d)| *d).min()?;
        Some(recent.saturating_sub(base))
    }

    fn delivered_bps(&self) -> Option<f64> {
        // Not before a whole window of acknowledgements exists: a rate from a few samples
        // right after the start would be noise.
        let first = self.delivered.front()?.0;
        let last = self.delivered.back()?.0;
        if self.delivered.len() < 2
            || last.saturating_duration_since(self.started) < RATE_WINDOW / 2
        {
            return None;
        }
        let bytes: u64 = self.delivered.iter().map(|(_, b)| *b).sum();
        let span = last.saturating_duration_since(first);
        if span >= RATE_WINDOW / 2 {
            // The first acknowledgement's bytes crossed the path before the span began: counting
            // them overstated the rate by a frame, 15 % with the large frames of a slow path
            // (eight in a window), enough to pass for headroom the path does not have.
            let first_bytes = self.delivered.front().map_or(0, |(_, b)| *b);
            return Some((bytes - first_bytes) as f64 * 8.0 / span.as_secs_f64());
        }
        Some(bytes as f64 * 8.0 / (RATE_WINDOW / 2).as_secs_f64())
    }

    fn sent_bps(&self, now: Instant) -> f64 {
        let bytes: u64 = self.sent.iter().map(|(_, b)| *b).sum();
        let span = now
            .saturating_duration_since(self.started)
            .min(RATE_WINDOW)
            .max(Duration::from_millis(50));
        bytes as f64 * 8.0 / span.as_secs_f64()
    }

    fn note_base(&mut self, now: Instant, delay: Duration) {
        match self.base {
            None => self.base = Some((delay, now)),
            Some((b, _)) if delay <= b => self.base = Some((delay, now)),
            Some((_, at)) if now.saturating_duration_since(at) > BASE_WINDOW => {
                // The minimum is old: take the best of what was seen since.
                let fresh = self.next_base.take().unwrap_or(delay).min(delay);
                self.base = Some((fresh, now));
            }
            Some(_) => {
                self.next_base = Some(self.next_base.map_or(delay, |n| n.min(delay)));
            }
        }
    }

    /// Keeps the highest delivered rate, forgetting it after [`BASE_WINDOW`] (then the rate
    /// now replaces it), so that a path that slowed down is learnt.
    fn note_path(&mut self, now: Instant) {
        let Some(bps) = self.delivered_bps() else {
            return;
        };
        let kbps = (bps / 1000.0) as u32;
        match self.path_kbps {
            Some((k, at)) if kbps < k && now.saturating_duration_since(at) <= BASE_WINDOW => {}
            _ => self.path_kbps = Some((kbps, now)),
        }
    }

    /// Remembers the target as one the path carries when it is held calmly (see `good_kbps`),
    /// forgetting a higher one after [`BASE_WINDOW`], so that a path that slowed down for good
    /// is learnt.
    fn note_good_target(&mut self, now: Instant) {
        let calm = self.queue_since.is_none()
            && self.skips.is_empty()
            && self
                .last_backoff
                .is_none_or(|t| now.saturating_duration_since(t) >= HOLD_AFTER_BACKOFF);
        let sent = self.sent_bps(now);
        let carried = self
            .delivered_bps()
            .is_some_and(|delivered| delivered >= KEEPS_UP * sent);
        if !calm
            || !carried
            || sent < FILL_TO_REMEMBER * f64::from(self.target_kbps) * 1000.0
            || now.saturating_duration_since(self.started) < STARTUP_GRACE
        {
            self.calm = None;
            return;
        }
        // Calm for a while, and at the lowest target of that while: a target probing up is
        // calm for a moment after it passes the path's rate, until the queue it builds shows.
        let (since, lowest) = self.calm.get_or_insert((now, self.target_kbps));
        *lowest = (*lowest).min(self.target_kbps);
        let (since, lowest) = (*since, *lowest);
        if now.saturating_duration_since(since) < CALM_TO_REMEMBER {
            return;
        }
        // The next while starts now (the lowest of the whole calm stretch would keep the low
        // start of a climb back).
        self.calm = Some((now, self.target_kbps));
        match self.good_kbps {
            Some((k, at)) if lowest < k && now.saturating_duration_since(at) <= BASE_WINDOW => {}
            _ => self.good_kbps = Some((lowest, now)),
        }
    }

    fn set_target(&mut self, kbps: u32) {
        let kbps = kbps.clamp(self.cfg.min_kbps, self.cfg.max_kbps);
        if kbps != self.target_kbps {
            self.target_kbps = kbps;
            self.target_changed = true;
        }
    }

    /// Expires old samples and runs the AIMD step.
    fn update(&mut self, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RECENT_WINDOW)
        {
            self.recent.pop_front();
        }
        for q in [&mut self.delivered, &mut self.sent] {
            while q
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_WINDOW)
            {
                q.pop_front();
            }
        }
        while self
            .skips
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > RATE_WINDOW)
        {
            self.skips.pop_front();
        }
        // A queue is a delay that persists: above the threshold for a whole round trip (at
        // least 100 ms), so that jitter, which comes and goes, is not taken for one.
        if self
            .queue_delay()
            .is_some_and(|q| q > self.cfg.queue_delay_threshold)
        {
            let since = *self.queue_since.get_or_insert(now);
            let persist = self
                .base_rtt()
                .unwrap_or_default()
                .max(Duration::from_millis(100));
            if now.saturating_duration_since(since) >= persist {
                self.congested = true;
            }
        } else {
            self.queue_since = None;
        }
        // The path cannot carry the target: slots keep being skipped for a full window and
        // what arrives is well below the target. A skip alone is not congestion (after a
        // random loss the window shrinks for a moment; the frame rate dips, not the bitrate).
        if self.skips.len() >= 3
            && now.saturating_duration_since(self.started) >= STARTUP_GRACE
            && self
                .delivered_bps()
                .is_some_and(|bps| bps < 0.8 * f64::from(self.target_kbps) * 1000.0)
        {
            self.congested = true;
            self.hard = true;
        }
        let rtt = self
            .base_rtt()
            .unwrap_or(Duration::from_millis(100))
            .max(Duration::from_millis(50));
        let may_back_off = self.last_backoff.is_none_or(|t| {
            now.saturating_duration_since(t) >= rtt + self.cfg.queue_delay_threshold
        });
        if self.congested {
            self.congested = false;
            if !may_back_off {
                // Same episode: one back-off per round trip.
                self.hard = false;
                return;
            }
            self.last_backoff = Some(now);
            self.stats.backoffs += 1;
            if self.target_kbps <= self.cfg.min_kbps {
                // Only the path's own verdict (slots skipped for a full window, frames the
                // gateway refused) lowers the frame rate: a delay signal at a low frame rate is
                // mostly jitter, and following it would spiral down to the lowest rate.
                if std::mem::take(&mut self.hard) {
                    self.fps_divisor = (self.fps_divisor + 1).min(MAX_FPS_DIVISOR);
                }
                return;
            }
            let hard = std::mem::take(&mut self.hard);
            let mut next = f64::from(self.target_kbps) * BACKOFF;
            // Below the delivered rate only when the path, not the encoder, set it: more was
            // sent than delivered (a queue), or slots were skipped for a full path (the skips
            // keep what is sent near what is delivered, so the first test misses it; without
            // this the target only stepped down by `BACKOFF` until the encoder's output fit,
            // which for an encoder producing two thirds of its target left the target half as
            // high again as the path).
            if let Some(bps) = self.delivered_bps() {
                if hard || self.sent_bps(now) > 1.15 * bps {
                    next = next.min(bps / 1000.0 * DELIVERED_SHARE);
                }
            }
            self.set_target(next as u32);
            return;
        }
        self.note_good_target(now);
        let held = self
            .last_backoff
            .is_some_and(|t| now.saturating_duration_since(t) < HOLD_AFTER_BACKOFF);
        if held || now.saturating_duration_since(self.last_probe) < PROBE_INTERVAL {
            return;
        }
        self.last_probe = now;
        if self.fps_divisor > 1 {
            // The frame rate comes back before the bitrate rises.
            self.fps_divisor -= 1;
            return;
        }
        // Probe only while the encoder uses what it has: otherwise a static scene, or an
        // encoder that undershoots, would license a target the path has never carried.
        let using = self.sent_bps(now) >= FILL_TO_PROBE * f64::from(self.target_kbps) * 1000.0;
        // Up to the highest rate delivered lately, the target may rise whatever the encoder
        // makes of it: the path has shown it carries that much. (Without this, an encoder that
        // undershoots would stay wherever a back-off left it, however brief the dip.)
        let below_path = self.path_kbps.is_some_and(|(p, _)| self.target_kbps < p);
        // Back up to a target the path carried calmly a moment ago (before a dip), even when the
        // encoder undershoots it: that target is what the other rules had reached.
        let below_good = self.good_kbps.is_some_and(|(g, at)| {
            self.target_kbps < g && now.saturating_duration_since(at) <= BASE_WINDOW
        });
        if (using || below_path || below_good) && self.target_kbps < self.cfg.max_kbps {
            let next = (f64::from(self.target_kbps) * PROBE).ceil() as u32;
            self.set_target(next.max(self.target_kbps + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const MS: Duration = Duration::from_millis(1);

    fn cfg(max: u32) -> RateConfig {
        RateConfig::new(max, 300, Duration::from_millis(200))
    }

    /// A simulated path: a FIFO bottleneck of `rate_kbps` with a one-way delay, random loss
    /// costing a retransmission round trip, and acknowledgements a round trip after a frame's
    /// last byte leaves the bottleneck. Frames come at 60 fps with a size that follows the
    /// encoder's target. Returns (delivered fps, p99 frame latency, controller stats).
    struct Sim {
        rate_kbps: f64,
        one_way: Duration,
        loss: f64,
        seconds: u64,
        cwnd: u64,
        /// Share of the target the encoder produces (1.0: exactly the target; x264 under its
        /// VBV cap produces about two thirds to three quarters of it on the built-in game).
        fill: f64,
        /// Repeated dips of the path's rate, if any.
        dip: Option<Dip>,
    }

    /// The path falls to `rate_kbps` for `length` at the start of every `every` (the first dip
    /// starts one `every` in).
    #[derive(Clone, Copy)]
    struct Dip {
        every: Duration,
        length: Duration,
        rate_kbps: f64,
    }

    impl Sim {
        /// The path's rate `ms` into the run.
        fn rate_at(&self, ms: u64) -> f64 {
            match self.dip {
                Some(d) if ms >= d.every.as_millis() as u64 => {
                    let into = ms % d.every.as_millis() as u64;
                    if into < d.length.as_millis() as u64 {
                        d.rate_kbps
                    } else {
                        self.rate_kbps
                    }
                }
                _ => self.rate_kbps,
            }
        }

        /// A BBR-like window: twice the bandwidth-delay product, at least 10 packets.
        fn bbr_cwnd(&self, rate_kbps: f64) -> u64 {
            let bdp = rate_kbps * 1000.0 / 8.0 * (self.one_way * 2).as_secs_f64();
            (2.0 * bdp).max(12_000.0) as u64
        }

        /// Steps 1 ms at a time. The bottleneck drains its FIFO at `rate_kbps`; a frame whose
        /// last byte leaves arrives one way (plus a retransmission round trip when one of its
        /// packets was lost) later and is acknowledged one way after that. A reset frame leaves
        /// the queue (its unsent bytes are dropped, as quinn does) and is never acknowledged.
        fn run(&self, rc: &mut RateController, t0: Instant) -> (f64, Duration, RateStats) {
            let (fps, p99, stats, _) = self.run_tracking(rc, t0);
            (fps, p99, stats)
        }

        /// [`Sim::run`], also returning the highest target of the second half of the run (the
        /// steady state, after the start-up back-off).
        fn run_tracking(
            &self,
            rc: &mut RateController,
            t0: Instant,
        ) -> (f64, Duration, RateStats, u32) {
            let mut late_max_target = 0u32;
            let half = self.seconds * 1000 / 2;
            let (fps, p99, stats) = self.run_observed(rc, t0, &mut |ms, target| {
                if ms >= half {
                    late_max_target = late_max_target.max(target);
                }
            });
            (fps, p99, stats, late_max_target)
        }

        /// [`Sim::run`], calling `observe(ms, target)` at every frame slot.
        fn run_observed(
            &self,
            rc: &mut RateController,
            t0: Instant,
            observe: &mut dyn FnMut(u64, u32),
        ) -> (f64, Duration, RateStats) {
            let mut rng = StdRng::seed_from_u64(7);
            // (seq, bytes left, capture time, lost)
            let mut queue: VecDeque<(u64, f64, Instant, bool)> = VecDeque::new();
            // (ack time, seq, arrival, capture)
            let mut pending: Vec<(Instant, u64, Instant, Instant)> = Vec::new();
            let mut latencies = Vec::new();
            let mut seq = 0u64;
            let mut bitrate = rc.target_kbps();
            let total_ms = self.seconds * 1000;
            let mut next_slot = 0u64;
            for ms in 0..total_ms {
                let now = t0 + MS * ms as u32;
                let rate_kbps = self.rate_at(ms);
                // The link.
                let mut budget = rate_kbps / 8.0;
                while budget > 0.0 {
                    let Some(head) = queue.front_mut() else { break };
                    let take = head.1.min(budget);
                    head.1 -= take;
                    budget -= take;
                    if head.1 <= 0.0 {
                        let (s, _, captured, lost) = queue.pop_front().unwrap();
                        let retransmit = if lost {
                            self.one_way * 2 + self.one_way / 4
                        } else {
                            Duration::ZERO
                        };
                        let arrived = now + self.one_way + retransmit;
                        pending.push((arrived + self.one_way, s, arrived, captured));
                    }
                }
                pending.sort_by_key(|p| p.0);
                while pending.first().is_some_and(|p| p.0 <= now) {
                    let (at, s, arrived, captured) = pending.remove(0);
                    rc.handle_outcome(at, s, FrameOutcome::Acked);
                    latencies.push(arrived - captured);
                }
                while let Some(reset) = rc.poll_reset(now) {
                    pending.retain(|p| p.1 != reset);
                    queue.retain(|q| q.0 != reset);
                    rc.handle_outcome(now, reset, FrameOutcome::Reset);
                }
                // Frame slots at 60 fps.
                if ms * 60 < next_slot * 1000 {
                    continue;
                }
                let slot = next_slot;
                next_slot += 1;
                rc.handle_path(
                    now,
                    self.cwnd.min(self.bbr_cwnd(rate_kbps)),
                    self.one_way * 2,
                );
                if let Some(b) = rc.poll_bitrate() {
                    bitrate = b;
                }
                observe(ms, bitrate);
                if rc.poll_slot(now, slot) != SlotDecision::Encode {
                    continue;
                }
                let key = rc.poll_keyframe() || seq == 0;
                let mut bytes = (f64::from(bitrate) * self.fill) as u64 * 1000 / 8 / 60;
                if key {
                    bytes *= 4;
                }
                rc.handle_sent(now, seq, bytes, key);
                let packets = bytes.div_ceil(1200);
                let lost = (0..packets).any(|_| rng.random_bool(self.loss));
                queue.push_back((seq, bytes as f64, now, lost));
                seq += 1;
            }
            latencies.sort();
            let p99 = latencies
                .get(latencies.len() * 99 / 100)
                .copied()
                .unwrap_or_default();
            (
                latencies.len() as f64 / self.seconds as f64,
                p99,
                rc.stats(),
            )
        }
    }

    #[test]
    fn an_uncongested_path_keeps_the_full_rate_and_bitrate() {
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(8000));
        let sim = Sim {
            rate_kbps: 100_000.0,
            one_way: 20 * MS,
            loss: 0.0,
            seconds: 10,
            cwnd: 1 << 20,
            dip: None,
            fill: 1.0,
        };
        let (fps, p99, stats) = sim.run(&mut rc, t0);
        assert!(fps > 59.0, "{fps} fps, {stats:?}");
        assert!(p99 < 30 * MS, "{p99:?}");
        assert_eq!(stats.target_kbps, 8000, "{stats:?}");
        assert_eq!(stats.skipped_path_full + stats.reset, 0, "{stats:?}");
    }

    #[test]
    fn a_slow_path_lowers_the_bitrate_instead_of_queueing() {
        // The collapse this guards: 10 Mbit/s of video into a 2 Mbit/s path. Without the
        // controller the queue (and latency) grows by 4 s every second of play.
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(10_000));
        let sim = Sim {
            rate_kbps: 2_000.0,
            one_way: 25 * MS,
            loss: 0.0,
            seconds: 20,
            cwnd: 1 << 20,
            dip: None,
            fill: 1.0,
        };
        let (fps, p99, stats) = sim.run(&mut rc, t0);
        // The target saws around the path's rate (probing up, backing off below it).
        assert!(stats.target_kbps <= 2_600, "{stats:?}");
        assert!(stats.target_kbps >= 800, "{stats:?}");
        assert!(stats.delivered_kbps <= 2_100, "{stats:?}");
        assert!(p99 < 400 * MS, "p99 {p99:?}, {stats:?}");
        assert!(fps > 45.0, "{fps} fps, {stats:?}");
    }

    #[test]
    fn an_encoder_producing_well_under_its_target_does_not_raise_it_past_the_path() {
        // The drift this guards: x264 on a 2 Mbit/s path produced about two thirds of its
        // target, so the target kept probing up (the encoder never filled it, the path never
        // queued) to about 2.7 Mbit/s while 1.8 Mbit/s arrived. The encoder's next complex
        // scene would then fill the target and queue behind the path.
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(10_000));
        let sim = Sim {
            rate_kbps: 2_000.0,
            one_way: 10 * MS,
            loss: 0.0,
            seconds: 20,
            cwnd: 1 << 20,
            dip: None,
            fill: 0.75,
        };
        let (fps, p99, stats, late_max) = sim.run_tracking(&mut rc, t0);
        // The target stays near what the path carries. Before, the start-up back-off stepped
        // down by 0.85 until the encoder's output fit (2,314 kbit/s here), and the probe rule
        // (probe while 70% of the target is produced) let it climb to 2,667 (0.75 of that fills
        // the path).
        assert!(late_max <= 2_400, "late max target {late_max}, {stats:?}");
        assert!(
            f64::from(stats.target_kbps) <= f64::from(stats.delivered_kbps) / 0.75 * 1.1,
            "{stats:?}"
        );
        // Not starved either: what arrives is most of the target's share.
        assert!(stats.delivered_kbps >= 1_000, "{stats:?}");
        assert!(p99 < 300 * MS, "p99 {p99:?}, {stats:?}");
        // Slots are skipped only while the start-up overshoot drains.
        assert!(fps > 50.0, "{fps} fps, {stats:?}");
    }

    #[test]
    fn an_encoder_filling_its_target_still_probes_back_up_after_a_back_off() {
        // The other side of the rule above: an encoder that uses its target gets it back once
        // the path has room again.
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(4_000));
        let fast = Sim {
            rate_kbps: 100_000.0,
            one_way: 10 * MS,
            loss: 0.0,
            seconds: 10,
            cwnd: 1 << 20,
            dip: None,
            fill: 0.9,
        };
        rc.set_target(1_000);
        let (_, _, stats) = fast.run(&mut rc, t0);
        assert_eq!(stats.target_kbps, 4_000, "{stats:?}");
    }

    /// The targets of a run with repeated dips, per cycle: (the highest target in the 4 s before
    /// each dip, the lowest during it).
    fn targets_around_dips(sim: &Sim, rc: &mut RateController, t0: Instant) -> Vec<(u32, u32)> {
        let dip = sim.dip.unwrap();
        let every = dip.every.as_millis() as u64;
        let length = dip.length.as_millis() as u64;
        let cycles = (sim.seconds * 1000 / every) as usize;
        let mut out = vec![(0u32, u32::MAX); cycles];
        sim.run_observed(rc, t0, &mut |ms, target| {
            let (cycle, into) = ((ms / every) as usize, ms % every);
            if into >= every - 4_000 && cycle < cycles {
                out[cycle].0 = out[cycle].0.max(target);
            }
            if cycle >= 1 && into < length {
                out[cycle - 1].1 = out[cycle - 1].1.min(target);
            }
        });
        out
    }

    #[test]
    fn repeated_path_dips_do_not_walk_an_undershooting_encoders_target_down() {
        // The gap this guards: after a dip, an encoder making under FILL_TO_PROBE of its target
        // could climb back only to the highest rate *delivered* in the last BASE_WINDOW, which is
        // its own output (80% of the target), so each dip left the target 20% lower:
        // 4,000 -> 3,200 -> 2,560 ... on a path that carries 4,000 between the dips. Measured,
        // highest target before dips 2 to 5: 3,955, 3,170, 2,578, 2,089 kbit/s before the fix;
        // 4,867, 5,009, 5,009, 5,009 after (the encoder's output, 80% of it, fills the path).
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(10_000));
        let sim = Sim {
            rate_kbps: 4_000.0,
            one_way: 10 * MS,
            loss: 0.0,
            seconds: 61,
            cwnd: 1 << 20,
            dip: Some(Dip {
                every: Duration::from_secs(12),
                length: Duration::from_secs(2),
                rate_kbps: 1_000.0,
            }),
            fill: 0.8,
        };
        let cycles = targets_around_dips(&sim, &mut rc, t0);
        println!("(highest target before each dip, lowest during it) kbit/s: {cycles:?}");
        for (i, &(before, during)) in cycles.iter().enumerate() {
            // Each dip is followed down (the test would prove nothing otherwise)...
            assert!(during <= 1_500, "dip {i} not followed: {cycles:?}");
            if i == 0 {
                // Before the first dip: the start-up, from 10,000 kbit/s.
                continue;
            }
            // ...and the target comes back to where the encoder's output (80% of it) is about
            // the path's rate, every time, without climbing past it (see the test above).
            let output = f64::from(before) * sim.fill;
            assert!(
                (0.85 * sim.rate_kbps..=1.1 * sim.rate_kbps).contains(&output),
                "cycle {i}: target {before} kbit/s before the dip: {cycles:?}"
            );
            if i > 1 {
                assert!(
                    f64::from(before) >= 0.95 * f64::from(cycles[i - 1].0),
                    "cycle {i} lower than the one before: {cycles:?}"
                );
            }
        }
    }

    #[test]
    fn random_loss_is_not_taken_for_congestion() {
        // 1% loss per packet on a 50 ms path: about one frame in eight needs a retransmission,
        // which must not drag the bitrate down (the path has plenty of capacity).
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(8000));
        let sim = Sim {
            rate_kbps: 50_000.0,
            one_way: 50 * MS,
            loss: 0.01,
            seconds: 20,
            cwnd: 1 << 20,
            dip: None,
            fill: 1.0,
        };
        let (fps, _p99, stats) = sim.run(&mut rc, t0);
        assert!(stats.target_kbps >= 6000, "{stats:?}");
        assert!(fps > 55.0, "{fps} fps, {stats:?}");
    }

    #[test]
    fn a_full_congestion_window_skips_the_slot_before_encoding() {
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(8000));
        assert_eq!(rc.poll_slot(t0, 0), SlotDecision::Encode);
        rc.handle_path(t0, 30_000, 20 * MS);
        rc.handle_sent(t0, 0, 20_000, false);
        assert_eq!(rc.poll_slot(t0 + 16 * MS, 1), SlotDecision::Encode);
        rc.handle_sent(t0 + 16 * MS, 1, 20_000, false);
        // 40 kB in flight, 30 kB window: the next frame would wait unsent.
        assert_eq!(rc.poll_slot(t0 + 33 * MS, 2), SlotDecision::SkipPathFull);
        rc.handle_outcome(t0 + 40 * MS, 0, FrameOutcome::Acked);
        assert_eq!(rc.poll_slot(t0 + 50 * MS, 3), SlotDecision::Encode);
        let s = rc.stats();
        assert_eq!((s.skipped_path_full, s.in_flight_frames), (1, 1));
        // A skipped slot keeps the reference chain: no keyframe is asked for.
        assert!(!rc.poll_keyframe());
    }

    #[test]
    fn a_frame_unacknowledged_past_its_deadline_is_reset_once_and_the_next_is_an_idr() {
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(8000));
        rc.handle_sent(t0, 0, 10_000, false);
        rc.handle_outcome(t0 + 40 * MS, 0, FrameOutcome::Acked);
        rc.handle_sent(t0 + 50 * MS, 1, 10_000, false);
        // Base RTT 40 ms + 200 ms allowance.
        assert_eq!(rc.next_timeout(), Some(t0 + 290 * MS));
        assert_eq!(rc.poll_reset(t0 + 280 * MS), None);
        assert_eq!(rc.poll_reset(t0 + 300 * MS), Some(1));
        assert_eq!(rc.poll_reset(t0 + 400 * MS), None, "reset only once");
        assert!(rc.poll_keyframe());
        assert!(!rc.poll_keyframe());
        rc.handle_outcome(t0 + 301 * MS, 1, FrameOutcome::Reset);
        let s = rc.stats();
        assert_eq!((s.reset, s.in_flight_frames), (1, 0));
        // A late frame alone is loss, not congestion: the bitrate stays.
        assert_eq!(s.target_kbps, 8000);
    }

    #[test]
    fn at_the_floor_the_frame_rate_falls_and_comes_back_first() {
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, RateConfig::new(300, 300, 200 * MS));
        rc.handle_sent(t0, 0, 1000, false);
        rc.handle_outcome(t0 + 20 * MS, 0, FrameOutcome::Acked);
        // The gateway refuses frames twice, a round trip apart: congestion at the floor.
        for (i, at) in [(1u64, 30u32), (2, 200)] {
            rc.handle_sent(t0 + at * MS, i, 1000, false);
            rc.handle_outcome(t0 + (at + 5) * MS, i, FrameOutcome::Refused);
        }
        assert_eq!(rc.stats().fps_divisor, 3);
        assert_eq!(rc.poll_slot(t0 + 210 * MS, 4), SlotDecision::SkipFrameRate);
        assert_eq!(rc.poll_slot(t0 + 211 * MS, 6), SlotDecision::Encode);
        // Calm for a while: the divisor steps back to 1 before anything else.
        let mut now = t0 + 800 * MS;
        for _ in 0..3 {
            rc.poll_slot(now, 1);
            now += 110 * MS;
        }
        assert_eq!(rc.stats().fps_divisor, 1);
        assert_eq!(rc.target_kbps(), 300);
    }

    #[test]
    fn outcomes_for_unknown_or_repeated_frames_are_ignored() {
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(8000));
        rc.handle_outcome(t0, 99, FrameOutcome::Refused);
        rc.handle_sent(t0, 1, 500, false);
        rc.handle_sent(t0, 1, 900_000, false);
        rc.handle_outcome(t0 + 10 * MS, 1, FrameOutcome::Acked);
        rc.handle_outcome(t0 + 11 * MS, 1, FrameOutcome::Refused);
        let s = rc.stats();
        assert_eq!((s.acked, s.refused, s.in_flight_bytes), (1, 0, 0));
        assert_eq!(s.target_kbps, 8000);
    }

    #[test]
    fn the_session_bitrate_is_a_ceiling_the_target_follows() {
        let t0 = Instant::now();
        let mut rc = RateController::new(t0, cfg(8000));
        rc.set_max_kbps(2000);
        assert_eq!(rc.poll_bitrate(), Some(2000));
        assert_eq!(rc.poll_bitrate(), None);
        rc.set_max_kbps(0);
        assert_eq!(rc.target_kbps(), 2000);
        // A ceiling below the floor lowers the floor too (never a target above the ceiling).
        rc.set_max_kbps(100);
        assert_eq!(rc.target_kbps(), 100);
    }
}
