//! WebRTC session control as a sans-IO state machine: the session task (`super::session`)
//! feeds what happened with the time (`handle_*(now, ..)`) and executes what the machine asks
//! for (`poll_action`), sleeping until `poll_timeout`. Tests drive it with a virtual clock.
//!
//! The rules:
//! * The browser must connect (ICE and DTLS) within `game.webrtc_connect_timeout_ms` of the
//!   answer, or the session ends (`connect timeout`, the player left): it must not hold a node's
//!   slot. Once connected, a connection that stays disconnected for
//!   `game.player_idle_timeout_ms` is a player gone (`disconnected`); one that fails or closes
//!   ends the session at once.
//! * On the first connection the video sender starts and the node is asked for a keyframe (the
//!   frames sent before the browser could receive them are lost, the first IDR among them).
//!   Until a keyframe arrives, frames are skipped: the browser cannot decode what follows a gap.
//! * A frame older than `game.frame_budget_ms` when its turn comes is dropped, not sent late.
//! * PLI/FIR become keyframe requests, at most one per [`KEYFRAME_REQUEST_INTERVAL`].
//! * REMB moves the encoder's bitrate ([`RateControl`]).
//! * The game's notices go to the page; the game's end, a DELETE and the gateway's shutdown end
//!   the session, telling the page why.
//!
//! * A page that has pinged on its `input` channel and then falls silent for
//!   `game.player_idle_timeout_ms` is a player gone ([`ChannelSilence`]): the session ends
//!   (`page silent`) and the game hears `ClientEvent::Lost`.

use crate::game::{ClientEvent, Notice};
use crate::player::ChannelSilence;
use nearpath_protocol::FrameHeader;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Keyframe requests closer together than this are merged (a PLI storm must not turn the
/// stream into all-IDR).
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(300);
/// Lowest bitrate REMB may push the encoder to, kbit/s.
pub const MIN_BITRATE_KBPS: u32 = 300;
/// REMB is ignored this long after connecting: Chromium's receive-side estimator reports its
/// start value (about 300 kbit/s) until it has measured the incoming rate for 5 s.
pub const REMB_WARMUP: Duration = Duration::from_secs(6);
/// Bitrate changes at most this often.
pub const REMB_MIN_INTERVAL: Duration = Duration::from_millis(500);

/// The peer connection's state, as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcState {
    Connected,
    Disconnected,
    Failed,
    Closed,
    /// New, connecting: nothing to decide.
    Other,
}

/// Feedback about the video track from the browser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Feedback {
    /// PLI or FIR.
    KeyframeRequest,
    /// REMB, bits per second.
    Remb(f64),
}

/// What the session task must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start the video sender, then report with [`SessionControl::handle_video_started`].
    StartVideo,
    /// Tell the game session (the driver of the node side).
    ToGame(ClientEvent),
    /// A browser keyframe request passed the throttle: count it and pass it to the game.
    KeyframeRequest,
    /// REMB moved the encoder's target: count it, pass it to the game, tell the page.
    Bitrate(u32),
    /// Send a message to the page on the `input` channel.
    Tell(String),
    /// Wait (bounded) for the page's messages to leave before closing.
    Flush,
    /// The session is over, for this reason (for the log).
    End(&'static str),
}

/// What to do with a frame from the game.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameVerdict {
    /// The browser is not connected yet: nothing to send it on.
    NotConnected,
    /// Older than the frame budget: drop it and ask for a keyframe.
    Late,
    /// Not a keyframe while one is awaited: skip it (counted).
    SkipUntilKeyframe,
    Send,
}

/// The rules' settings, from `[game]` and the session's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub frame_budget_us: u64,
    /// The session's bitrate: REMB never moves the encoder above it.
    pub bitrate_kbps: u32,
}

/// One WebRTC session's control rules. See the module docs.
pub struct SessionControl {
    limits: Limits,
    /// Armed until the browser connects, and again while it is disconnected.
    deadline: Option<Instant>,
    /// Whether the video sender runs (the browser connected once).
    video: bool,
    waiting_for_idr: bool,
    keyframes: KeyframeThrottle,
    rate: Option<RateControl>,
    sent: SendRate,
    /// The page's pings, once it has pinged.
    page: ChannelSilence,
    ended: bool,
    actions: VecDeque<Action>,
}

/// A JSON string literal (quotes included) for a reason text.
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn ended_message(reason: &str) -> String {
    format!(r#"{{"t":"ended","reason":{}}}"#, json_str(reason))
}

impl SessionControl {
    /// A session whose answer was sent at `now`.
    pub fn new(now: Instant, limits: Limits) -> SessionControl {
        SessionControl {
            limits,
            deadline: Some(now + limits.connect_timeout),
            video: false,
            waiting_for_idr: true,
            keyframes: KeyframeThrottle::default(),
            rate: None,
            sent: SendRate::default(),
            page: ChannelSilence::new(limits.idle_timeout),
            ended: false,
            actions: VecDeque::new(),
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Self::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended {
            return None;
        }
        match (self.deadline, self.page.poll_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A well-formed message from the page arrived (`ping`: it was a ping, which arms the
    /// page's liveness rule).
    pub fn handle_page_message(&mut self, now: Instant, ping: bool) {
        self.page.handle_message(now, ping);
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    fn end(&mut self, to_game: Option<ClientEvent>, reason: &'static str) {
        if let Some(ev) = to_game {
            self.actions.push_back(Action::ToGame(ev));
        }
        self.actions.push_back(Action::End(reason));
        self.ended = true;
        self.deadline = None;
    }

    /// The peer connection changed state.
    pub fn handle_connection_state(&mut self, now: Instant, state: PcState) {
        if self.ended {
            return;
        }
        match state {
            PcState::Connected if !self.video => self.actions.push_back(Action::StartVideo),
            PcState::Connected => self.deadline = None,
            PcState::Disconnected if self.video => {
                self.deadline = Some(now + self.limits.idle_timeout)
            }
            PcState::Failed => self.end(Some(ClientEvent::Lost), "peer connection failed"),
            PcState::Closed => self.end(Some(ClientEvent::Gone), "peer connection closed"),
            _ => {}
        }
    }

    /// The video sender asked for by [`Action::StartVideo`] started (or did not).
    pub fn handle_video_started(&mut self, now: Instant, ok: bool) {
        if self.ended {
            return;
        }
        if !ok {
            self.end(Some(ClientEvent::Gone), "video sender failed");
            return;
        }
        self.video = true;
        self.deadline = None;
        self.rate = Some(RateControl::new(self.limits.bitrate_kbps, now));
        // Frames sent before the browser could receive them are lost, the first IDR among
        // them: ask for a new one.
        self.actions
            .push_back(Action::ToGame(ClientEvent::ForceKeyframe));
    }

    /// A frame from the game, captured at `header.capture_ts_us`, its turn come at `gw_us`
    /// (Unix microseconds). The frame's age is checked again here: a frame that waited past
    /// its budget is dropped, not sent late.
    pub fn handle_frame(&mut self, gw_us: u64, header: &FrameHeader) -> FrameVerdict {
        if !self.video || self.ended {
            return FrameVerdict::NotConnected;
        }
        if gw_us.saturating_sub(header.capture_ts_us) > self.limits.frame_budget_us {
            return FrameVerdict::Late;
        }
        if self.waiting_for_idr {
            if !header.keyframe {
                return FrameVerdict::SkipUntilKeyframe;
            }
            self.waiting_for_idr = false;
        }
        FrameVerdict::Send
    }

    /// A frame of `bytes` went out at `now`.
    pub fn handle_sent(&mut self, now: Instant, bytes: usize) {
        self.sent.record(now, bytes);
    }

    /// Feedback about the video track arrived.
    pub fn handle_feedback(&mut self, now: Instant, fb: Feedback) {
        if self.ended {
            return;
        }
        match fb {
            Feedback::KeyframeRequest => {
                if self.keyframes.allow(now) {
                    self.actions.push_back(Action::KeyframeRequest);
                }
            }
            Feedback::Remb(bps) => {
                let sending = self.sent.kbps(now);
                if let Some(kbps) = self
                    .rate
                    .as_mut()
                    .and_then(|r| r.on_remb(bps, sending, now))
                {
                    self.actions.push_back(Action::Bitrate(kbps));
                    self.actions
                        .push_back(Action::Tell(format!(r#"{{"t":"rate","kbps":{kbps}}}"#)));
                }
            }
        }
    }

    /// What the game session tells the player; `None` when the game session is gone.
    pub fn handle_notice(&mut self, notice: Option<Notice>) {
        if self.ended {
            return;
        }
        match notice {
            Some(Notice::Paused(reason)) => self.actions.push_back(Action::Tell(format!(
                r#"{{"t":"paused","reason":{}}}"#,
                json_str(&reason)
            ))),
            Some(Notice::Resumed) => self
                .actions
                .push_back(Action::Tell(r#"{"t":"resumed"}"#.into())),
            Some(Notice::VideoChanged(v)) => self.actions.push_back(Action::Tell(format!(
                r#"{{"t":"video","width":{},"height":{},"fps":{}}}"#,
                v.width, v.height, v.fps
            ))),
            Some(Notice::VideoRefused(reason)) => self.actions.push_back(Action::Tell(format!(
                r#"{{"t":"video_refused","reason":{}}}"#,
                json_str(&reason)
            ))),
            Some(Notice::Rumble(r)) => self.actions.push_back(Action::Tell(format!(
                r#"{{"t":"rumble","pad":{},"strong":{},"weak":{},"duration_ms":{}}}"#,
                r.pad, r.strong_magnitude, r.weak_magnitude, r.duration_ms
            ))),
            Some(Notice::Ended(reason)) => {
                self.actions.push_back(Action::Tell(ended_message(&reason)));
                self.actions.push_back(Action::Flush);
                self.end(None, "the game ended");
            }
            None => self.end(None, "the game session ended"),
        }
    }

    /// The client deleted the session (WHEP `DELETE`).
    pub fn handle_deleted(&mut self) {
        self.close_by_us(
            "the client deleted the session",
            "deleted",
            "deleted by the client",
        );
    }

    /// The gateway is shutting down.
    pub fn handle_shutdown(&mut self) {
        let why = "the gateway is shutting down";
        self.close_by_us(why, why, "gateway shutdown");
    }

    fn close_by_us(&mut self, to_game: &str, to_page: &str, reason: &'static str) {
        if self.ended {
            return;
        }
        self.actions
            .push_back(Action::ToGame(ClientEvent::Close(to_game.into())));
        self.actions.push_back(Action::Tell(ended_message(to_page)));
        self.actions.push_back(Action::Flush);
        self.end(None, reason);
    }

    /// Something the session depends on stopped (the peer connection's driver, the frame
    /// source).
    pub fn handle_source_ended(&mut self, reason: &'static str) {
        if !self.ended {
            self.end(None, reason);
        }
    }

    /// The connect or disconnect deadline, or the page's silence.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        match self.deadline {
            Some(d) if now >= d => {
                if self.video {
                    self.end(Some(ClientEvent::Lost), "disconnected");
                } else {
                    self.end(Some(ClientEvent::Gone), "connect timeout");
                }
            }
            _ if self.page.poll_gone(now) => self.end(Some(ClientEvent::Lost), "page silent"),
            _ => {}
        }
    }
}

/// Merges keyframe requests that come closer together than [`KEYFRAME_REQUEST_INTERVAL`].
#[derive(Debug, Default)]
pub struct KeyframeThrottle {
    last: Option<Instant>,
}

impl KeyframeThrottle {
    pub fn allow(&mut self, now: Instant) -> bool {
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
pub struct RateControl {
    cap_kbps: u32,
    current_kbps: u32,
    connected_at: Instant,
    last_change: Option<Instant>,
}

impl RateControl {
    pub fn new(cap_kbps: u32, connected_at: Instant) -> Self {
        RateControl {
            cap_kbps,
            current_kbps: cap_kbps,
            connected_at,
            last_change: None,
        }
    }

    /// A REMB of `bps` arrived at `now` while `sending_kbps` leave: the new target, if it
    /// should change.
    pub fn on_remb(&mut self, bps: f64, sending_kbps: u32, now: Instant) -> Option<u32> {
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
pub struct SendRate {
    window: VecDeque<(Instant, usize)>,
    bytes: usize,
}

impl SendRate {
    const WINDOW: Duration = Duration::from_secs(1);

    pub fn record(&mut self, at: Instant, bytes: usize) {
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

    pub fn kbps(&mut self, now: Instant) -> u32 {
        self.expire(now);
        (self.bytes as u64 * 8 / 1000) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        Limits {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_millis(2_500),
            frame_budget_us: 100_000,
            bitrate_kbps: 10_000,
        }
    }

    fn drain(c: &mut SessionControl) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn connected(t0: Instant) -> SessionControl {
        let mut c = SessionControl::new(t0, limits());
        c.handle_connection_state(t0 + 100 * MS, PcState::Connected);
        assert_eq!(drain(&mut c), vec![Action::StartVideo]);
        c.handle_video_started(t0 + 100 * MS, true);
        assert_eq!(
            drain(&mut c),
            vec![Action::ToGame(ClientEvent::ForceKeyframe)],
            "the first connection asks the node for a keyframe"
        );
        c
    }

    fn frame(capture_ts_us: u64, keyframe: bool) -> FrameHeader {
        FrameHeader {
            capture_ts_us,
            keyframe,
            ..FrameHeader::default()
        }
    }

    #[test]
    fn a_browser_that_does_not_connect_in_time_ends_the_session_as_gone() {
        let t0 = Instant::now();
        let mut c = SessionControl::new(t0, limits());
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        c.handle_timeout(t0 + Duration::from_secs(10) - MS);
        assert!(drain(&mut c).is_empty());
        c.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(
            drain(&mut c),
            vec![
                Action::ToGame(ClientEvent::Gone),
                Action::End("connect timeout")
            ]
        );
        assert!(c.is_ended());
    }

    #[test]
    fn a_browser_disconnected_for_the_idle_timeout_is_lost_and_one_back_in_time_is_kept() {
        let t0 = Instant::now();
        let mut c = connected(t0);
        assert_eq!(c.poll_timeout(), None, "connected: no deadline");
        c.handle_connection_state(t0 + Duration::from_secs(1), PcState::Disconnected);
        assert_eq!(
            c.poll_timeout(),
            Some(t0 + Duration::from_secs(1) + Duration::from_millis(2_500))
        );
        c.handle_connection_state(t0 + Duration::from_secs(2), PcState::Connected);
        assert_eq!(c.poll_timeout(), None);
        assert!(drain(&mut c).is_empty(), "no second video sender");
        c.handle_connection_state(t0 + Duration::from_secs(5), PcState::Disconnected);
        c.handle_timeout(t0 + Duration::from_millis(7_500));
        assert_eq!(
            drain(&mut c),
            vec![
                Action::ToGame(ClientEvent::Lost),
                Action::End("disconnected")
            ]
        );
    }

    #[test]
    fn a_failed_or_closed_peer_connection_ends_the_session_at_once() {
        let t0 = Instant::now();
        let mut c = connected(t0);
        c.handle_connection_state(t0 + MS, PcState::Failed);
        assert_eq!(
            drain(&mut c),
            vec![
                Action::ToGame(ClientEvent::Lost),
                Action::End("peer connection failed")
            ]
        );
        let mut c = SessionControl::new(t0, limits());
        c.handle_connection_state(t0 + MS, PcState::Closed);
        assert_eq!(
            drain(&mut c),
            vec![
                Action::ToGame(ClientEvent::Gone),
                Action::End("peer connection closed")
            ]
        );
        // Nothing after the end.
        c.handle_connection_state(t0 + 2 * MS, PcState::Connected);
        c.handle_feedback(t0 + 2 * MS, Feedback::KeyframeRequest);
        assert!(drain(&mut c).is_empty());
    }

    #[test]
    fn frames_wait_for_a_keyframe_and_late_frames_are_dropped_not_sent() {
        let t0 = Instant::now();
        let mut c = SessionControl::new(t0, limits());
        let now_us = 1_000_000_000;
        assert_eq!(
            c.handle_frame(now_us, &frame(now_us, true)),
            FrameVerdict::NotConnected
        );
        let mut c = connected(t0);
        assert_eq!(
            c.handle_frame(now_us, &frame(now_us, false)),
            FrameVerdict::SkipUntilKeyframe
        );
        assert_eq!(
            c.handle_frame(now_us, &frame(now_us - 100_001, true)),
            FrameVerdict::Late
        );
        assert_eq!(
            c.handle_frame(now_us, &frame(now_us - 100_000, true)),
            FrameVerdict::Send
        );
        assert_eq!(
            c.handle_frame(now_us, &frame(now_us, false)),
            FrameVerdict::Send
        );
    }

    #[test]
    fn browser_keyframe_requests_are_throttled_to_one_per_interval() {
        let t0 = Instant::now();
        let mut c = connected(t0);
        c.handle_feedback(t0 + Duration::from_secs(1), Feedback::KeyframeRequest);
        c.handle_feedback(t0 + Duration::from_millis(1_200), Feedback::KeyframeRequest);
        assert_eq!(drain(&mut c), vec![Action::KeyframeRequest]);
        c.handle_feedback(t0 + Duration::from_millis(1_300), Feedback::KeyframeRequest);
        assert_eq!(drain(&mut c), vec![Action::KeyframeRequest]);
    }

    #[test]
    fn remb_moves_the_encoder_after_warmup_when_the_path_carries_less_than_is_sent() {
        let t0 = Instant::now();
        let mut c = connected(t0);
        // 9 Mbit/s leave in the last second.
        for i in 0..60u64 {
            c.handle_sent(t0 + Duration::from_millis(6_100 + i * 16), 18_750);
        }
        c.handle_feedback(t0 + Duration::from_secs(5), Feedback::Remb(4e6));
        assert!(drain(&mut c).is_empty(), "warm-up");
        c.handle_feedback(t0 + Duration::from_millis(7_000), Feedback::Remb(4e6));
        assert_eq!(
            drain(&mut c),
            vec![
                Action::Bitrate(3_800),
                Action::Tell(r#"{"t":"rate","kbps":3800}"#.into())
            ]
        );
    }

    #[test]
    fn the_games_end_a_delete_and_shutdown_tell_the_page_and_end_the_session() {
        let t0 = Instant::now();
        let mut c = connected(t0);
        c.handle_notice(Some(Notice::Paused("node \"x\" lost".into())));
        c.handle_notice(Some(Notice::Resumed));
        assert_eq!(
            drain(&mut c),
            vec![
                Action::Tell(r#"{"t":"paused","reason":"node \"x\" lost"}"#.into()),
                Action::Tell(r#"{"t":"resumed"}"#.into())
            ]
        );
        c.handle_notice(Some(Notice::Ended("bye".into())));
        assert_eq!(
            drain(&mut c),
            vec![
                Action::Tell(r#"{"t":"ended","reason":"bye"}"#.into()),
                Action::Flush,
                Action::End("the game ended")
            ]
        );
        let mut c = connected(t0);
        c.handle_deleted();
        assert_eq!(
            drain(&mut c),
            vec![
                Action::ToGame(ClientEvent::Close("the client deleted the session".into())),
                Action::Tell(r#"{"t":"ended","reason":"deleted"}"#.into()),
                Action::Flush,
                Action::End("deleted by the client")
            ]
        );
        let mut c = connected(t0);
        c.handle_shutdown();
        assert_eq!(drain(&mut c).last(), Some(&Action::End("gateway shutdown")));
    }

    #[test]
    fn a_video_sender_that_does_not_start_ends_the_session() {
        let t0 = Instant::now();
        let mut c = SessionControl::new(t0, limits());
        c.handle_connection_state(t0, PcState::Connected);
        drain(&mut c);
        c.handle_video_started(t0, false);
        assert_eq!(
            drain(&mut c),
            vec![
                Action::ToGame(ClientEvent::Gone),
                Action::End("video sender failed")
            ]
        );
    }

    #[test]
    fn a_page_that_stops_pinging_for_the_idle_timeout_ends_the_session_as_lost() {
        let t0 = Instant::now();
        let mut c = connected(t0);
        // Input alone does not arm the rule: a page that never pings is judged by ICE alone.
        c.handle_page_message(t0 + Duration::from_secs(1), false);
        assert_eq!(c.poll_timeout(), None);
        c.handle_page_message(t0 + Duration::from_secs(2), true);
        c.handle_page_message(t0 + Duration::from_secs(3), false);
        let gone_at = t0 + Duration::from_millis(5_500);
        assert_eq!(c.poll_timeout(), Some(gone_at));
        c.handle_timeout(gone_at - MS);
        assert!(drain(&mut c).is_empty());
        c.handle_timeout(gone_at);
        assert_eq!(
            drain(&mut c),
            vec![
                Action::ToGame(ClientEvent::Lost),
                Action::End("page silent")
            ]
        );
    }
}
