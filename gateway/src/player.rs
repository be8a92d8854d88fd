//! Player liveness for game sessions, as sans-IO state machines: the driver feeds observations
//! with the time (`handle_*(now, ..)`) and asks whether the player is gone (`poll_*(now)`); tests
//! drive them with a virtual clock.
//!
//! A game session holds a node's slot and is billed by the second, so a player who vanished
//! must be noticed by the gateway within `game.player_idle_timeout_ms` whatever the player's
//! software does. The client library asks for a 3 s QUIC idle timeout (the smaller of both ends'
//! values applies), but an old or hostile client may ask for none; these rules do not depend on
//! the client's settings.
//!
//! **Native players** ([`PlayerSilence`]): while the gateway sends a player anything
//! ack-eliciting (every video frame is), a player that is there answers within a round trip
//! with at least an acknowledgement. So: something was sent and nothing at all (no UDP datagram)
//! has arrived since for the idle timeout → gone. A session with nothing to send (a paused
//! failover, with no keep-alive configured) is never judged, as there is nothing to answer.
//!
//! A hostile client that keeps acknowledging but never reads its frames is alive by this rule,
//! and stays so: QUIC acknowledges packets below the application. It gains nothing: its unread
//! streams fill its flow-control windows and stream limit, the relay's in-flight budget
//! (`game.max_in_flight_frames` / `_bytes`) caps what is outstanding, and every frame that cannot
//! be handed over by its deadline is reset and counted `overload` (dropped, never queued). It
//! holds one node slot, within its key's session cap, and pays for it by the second, like a
//! player who leaves the game running.
//!
//! **Browsers** ([`ChannelSilence`]): the `/play` page pings on the `input` data channel every
//! second. Once a page has pinged, nothing on the channel for the idle timeout → gone. A WHEP
//! client that never pings (an older page, a plain WHEP player) is judged by ICE alone.

use quinn::ConnectionStats;
use std::time::{Duration, Instant};

/// What the gateway can observe of a player's QUIC connection: counters that only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnSample {
    /// UDP datagrams received from the player (anything: acknowledgements included).
    pub rx_datagrams: u64,
    /// Frames sent to the player that the player must acknowledge (stream data, pings,
    /// datagrams, resets, flow-control updates); acknowledgements alone do not count, since
    /// nobody answers them.
    pub tx_ack_eliciting: u64,
}

impl ConnSample {
    /// Reads the counters from quinn's connection statistics.
    pub fn of(stats: &ConnectionStats) -> ConnSample {
        let f = &stats.frame_tx;
        ConnSample {
            rx_datagrams: stats.udp_rx.datagrams,
            tx_ack_eliciting: f.stream
                + f.ping
                + f.datagram
                + f.reset_stream
                + f.stop_sending
                + f.max_data
                + f.max_stream_data
                + f.max_streams_bidi
                + f.max_streams_uni,
        }
    }
}

/// The native player rule: gone when something was sent to the player and nothing at all has
/// been received from it since, for `timeout`.
#[derive(Debug, Clone)]
pub struct PlayerSilence {
    timeout: Duration,
    last: Option<ConnSample>,
    /// When the first send that is still unanswered was observed.
    unanswered_since: Option<Instant>,
}

impl PlayerSilence {
    pub fn new(timeout: Duration) -> PlayerSilence {
        PlayerSilence {
            timeout,
            last: None,
            unanswered_since: None,
        }
    }

    /// How often the driver should sample: fine enough that the verdict comes at most a few
    /// percent after the timeout.
    pub fn sample_interval(&self) -> Duration {
        (self.timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(100))
    }

    /// Records the connection's counters as read at `now`. A send is taken to have happened at
    /// the first sample that shows it (never earlier than it did), so the rule errs towards
    /// keeping the player.
    pub fn handle_sample(&mut self, now: Instant, s: ConnSample) {
        let Some(last) = self.last.as_mut() else {
            self.last = Some(s);
            return;
        };
        if s.rx_datagrams != last.rx_datagrams {
            // The player answered: everything sent up to now counts as answered.
            *last = s;
            self.unanswered_since = None;
        } else if s.tx_ack_eliciting != last.tx_ack_eliciting {
            last.tx_ack_eliciting = s.tx_ack_eliciting;
            self.unanswered_since.get_or_insert(now);
        }
    }

    /// Whether the player is gone at `now`.
    pub fn poll_gone(&self, now: Instant) -> bool {
        self.unanswered_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.timeout)
    }
}

/// The browser rule: once the page has pinged on its `input` channel, it is gone when nothing
/// has arrived on the channel for `timeout`.
#[derive(Debug, Clone)]
pub struct ChannelSilence {
    timeout: Duration,
    /// When the last message arrived, once a ping has armed the rule.
    last: Option<Instant>,
}

impl ChannelSilence {
    pub fn new(timeout: Duration) -> ChannelSilence {
        ChannelSilence {
            timeout,
            last: None,
        }
    }

    /// Records a message from the page at `now`; `ping` says whether it was a ping (which arms
    /// the rule: that page promises one a second).
    pub fn handle_message(&mut self, now: Instant, ping: bool) {
        if ping || self.last.is_some() {
            self.last = Some(now);
        }
    }

    /// When the page will count as gone if nothing more arrives; `None` while unarmed.
    pub fn poll_deadline(&self) -> Option<Instant> {
        self.last.map(|t| t + self.timeout)
    }

    /// Whether the page is gone at `now`.
    pub fn poll_gone(&self, now: Instant) -> bool {
        self.poll_deadline().is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(3000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn sample(rx: u64, tx: u64) -> ConnSample {
        ConnSample {
            rx_datagrams: rx,
            tx_ack_eliciting: tx,
        }
    }

    /// A streaming session: a frame every 16 ms, the player's acknowledgements every other
    /// frame; then the player vanishes at `vanish` (the gateway keeps sending).
    fn stream_until(vanish: Duration, until: Duration) -> (PlayerSilence, Option<Duration>) {
        let t0 = Instant::now();
        let mut p = PlayerSilence::new(TIMEOUT);
        let (mut rx, mut tx) = (0, 0);
        let step = p.sample_interval();
        let mut t = Duration::ZERO;
        let mut verdict = None;
        while t <= until {
            tx += 2;
            if t < vanish {
                rx += 1;
            }
            p.handle_sample(t0 + t, sample(rx, tx));
            if verdict.is_none() && p.poll_gone(t0 + t) {
                verdict = Some(t);
            }
            t += step;
        }
        (p, verdict)
    }

    #[test]
    fn a_player_that_answers_is_never_gone() {
        let (_, verdict) = stream_until(ms(60_000), ms(30_000));
        assert_eq!(verdict, None);
    }

    #[test]
    fn a_vanished_player_is_gone_just_after_the_timeout() {
        let (_, verdict) = stream_until(ms(2_000), ms(10_000));
        let at = verdict.expect("never judged gone");
        // Not before the timeout has passed since the player's last packet; at most two
        // sampling intervals after.
        assert!(at >= ms(2_000) + TIMEOUT, "{at:?}");
        assert!(at <= ms(2_000) + TIMEOUT + ms(200), "{at:?}");
    }

    #[test]
    fn silence_with_nothing_sent_is_not_judged() {
        let t0 = Instant::now();
        let mut p = PlayerSilence::new(TIMEOUT);
        p.handle_sample(t0, sample(10, 10));
        // A paused session: nothing sent, nothing received, for a minute.
        for s in 1..=600 {
            p.handle_sample(t0 + ms(100 * s), sample(10, 10));
        }
        assert!(!p.poll_gone(t0 + ms(60_000)));
        // Then the gateway sends: the clock starts there, not at the last packet received.
        p.handle_sample(t0 + ms(60_100), sample(10, 11));
        assert!(!p.poll_gone(t0 + ms(63_000)));
        assert!(p.poll_gone(t0 + ms(63_100)));
        // And an answer clears it.
        p.handle_sample(t0 + ms(63_200), sample(11, 11));
        assert!(!p.poll_gone(t0 + ms(70_000)));
    }

    #[test]
    fn acknowledgements_alone_keep_a_player_that_never_sends_anything_else() {
        // The hostile client that reads nothing still acknowledges: it is there.
        let t0 = Instant::now();
        let mut p = PlayerSilence::new(TIMEOUT);
        for s in 0..1000u64 {
            p.handle_sample(t0 + ms(50 * s), sample(s / 4, s * 3));
        }
        assert!(!p.poll_gone(t0 + ms(50_000)));
    }

    #[test]
    fn the_first_sample_is_only_a_baseline() {
        let t0 = Instant::now();
        let mut p = PlayerSilence::new(TIMEOUT);
        p.handle_sample(t0, sample(5, 100));
        assert!(!p.poll_gone(t0 + ms(10_000)));
    }

    #[test]
    fn a_page_is_judged_only_after_it_has_pinged() {
        let t0 = Instant::now();
        let mut c = ChannelSilence::new(TIMEOUT);
        // Input without pings (an older page): never judged.
        c.handle_message(t0, false);
        assert_eq!(c.poll_deadline(), None);
        assert!(!c.poll_gone(t0 + ms(60_000)));
        // The first ping arms it; any message then keeps it alive.
        c.handle_message(t0 + ms(1_000), true);
        c.handle_message(t0 + ms(3_500), false);
        assert!(!c.poll_gone(t0 + ms(6_499)));
        assert!(c.poll_gone(t0 + ms(6_500)));
        assert_eq!(c.poll_deadline(), Some(t0 + ms(6_500)));
    }
}
