//! Node liveness as a sans-IO state machine: heartbeats in (`handle_heartbeat(now)`), samples of
//! the connection's received-datagram count in (`handle_rx(now, count)`), timer checks in
//! (`poll(now)`), misses and the verdict out. The async driver in `control` owns the clock and
//! the connection; tests drive it with a virtual one.
//!
//! Heartbeats share the node's QUIC connection with its video, so a congested path delays them
//! although the node is fine. The rule therefore tells *slow* from *gone*: a node whose
//! heartbeats are late by the lease (`missed_before_gone` intervals) but whose connection still
//! delivers datagrams is slow (kept, no new sessions); one from which nothing at all has arrived
//! lately is gone. Slow lasts at most `slow_max`.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Heartbeats are late by the lease, but datagrams keep arriving on the connection: the
    /// node is alive behind a congested path. It keeps its sessions and gets no new ones.
    Slow,
    /// No heartbeat for the lease and nothing received lately, or slow for longer than
    /// `slow_max`: the node is treated as gone.
    Gone,
}

#[derive(Debug, Clone)]
pub struct LivenessTracker {
    interval: Duration,
    missed_before_gone: u32,
    slow_max: Duration,
    last_heartbeat: Instant,
    /// When the received-datagram count was last seen to grow (or the last heartbeat, if later).
    last_activity: Instant,
    /// The count at the last sample and when it was taken.
    rx_count: Option<u64>,
    last_sample: Instant,
    /// Misses already reported, so each missed interval is counted once.
    misses_reported: u32,
    total_misses: u64,
}

impl LivenessTracker {
    pub fn new(
        now: Instant,
        interval: Duration,
        missed_before_gone: u32,
        slow_max: Duration,
    ) -> Self {
        LivenessTracker {
            interval: interval.max(Duration::from_millis(1)),
            missed_before_gone: missed_before_gone.max(1),
            slow_max,
            last_heartbeat: now,
            last_activity: now,
            rx_count: None,
            last_sample: now,
            misses_reported: 0,
            total_misses: 0,
        }
    }

    pub fn handle_heartbeat(&mut self, now: Instant) {
        self.last_heartbeat = now;
        self.last_activity = self.last_activity.max(now);
        self.misses_reported = 0;
    }

    /// A sample of how many datagrams the connection has received so far; growth since the
    /// previous sample is activity at `now`. The driver samples at every `poll`.
    pub fn handle_rx(&mut self, now: Instant, datagrams: u64) {
        if self.rx_count.is_some_and(|c| datagrams > c) {
            self.last_activity = self.last_activity.max(now);
        }
        self.rx_count = Some(datagrams);
        self.last_sample = now;
    }

    /// The heartbeat lease: silence this long makes the node slow or gone.
    fn lease(&self) -> Duration {
        self.interval * self.missed_before_gone
    }

    /// How often the datagram count is sampled while a heartbeat is overdue.
    fn sample_period(&self) -> Duration {
        self.interval / 4
    }

    /// Longest time without any datagram for a node past its lease to count as slow. Activity
    /// is seen up to one sample period late, so this is the lease less one interval less one
    /// sample period: a node killed just after a heartbeat is still gone at the end of its
    /// lease, exactly as when only heartbeats counted.
    fn quiet(&self) -> Duration {
        self.lease()
            .saturating_sub(self.interval + self.sample_period())
            .max(self.sample_period())
    }

    /// Missed intervals since the last heartbeat (a heartbeat is "missed" once a full interval
    /// plus half an interval of grace has passed, so ordinary jitter is not counted).
    fn missed_at(&self, now: Instant) -> u32 {
        let since = now.saturating_duration_since(self.last_heartbeat);
        let grace = self.interval / 2;
        if since < self.interval + grace {
            return 0;
        }
        ((since - grace).as_nanos() / self.interval.as_nanos()) as u32
    }

    /// The verdict at `now`, without advancing anything.
    pub fn verdict(&self, now: Instant) -> Liveness {
        let since_hb = now.saturating_duration_since(self.last_heartbeat);
        if since_hb < self.lease() {
            return Liveness::Alive;
        }
        let since_rx = now.saturating_duration_since(self.last_activity);
        if since_rx >= self.quiet() || since_hb >= self.lease() + self.slow_max {
            Liveness::Gone
        } else {
            Liveness::Slow
        }
    }

    /// Advances the tracker; returns the newly missed intervals and the verdict.
    pub fn poll(&mut self, now: Instant) -> (u32, Liveness) {
        let missed = self.missed_at(now);
        let new = missed.saturating_sub(self.misses_reported);
        self.misses_reported = self.misses_reported.max(missed);
        self.total_misses += new as u64;
        (new, self.verdict(now))
    }

    /// When the driver should call `poll` next (sampling the datagram count first): the next
    /// miss, the end of the lease, and, once a heartbeat is overdue, every sample period.
    pub fn next_deadline(&self) -> Instant {
        let grace = self.interval / 2;
        let next_miss = self.last_heartbeat + grace + self.interval * (self.misses_reported + 1);
        let next_sample =
            (self.last_sample + self.sample_period()).max(self.last_heartbeat + self.interval);
        let lease_end = self.last_heartbeat + self.lease();
        let next = next_miss.min(next_sample);
        if self.last_sample < lease_end {
            next.min(lease_end)
        } else {
            next
        }
    }

    pub fn last_heartbeat(&self) -> Instant {
        self.last_heartbeat
    }

    pub fn total_misses(&self) -> u64 {
        self.total_misses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_millis(500);
    const SLOW_MAX: Duration = Duration::from_secs(15);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn steady_heartbeats_never_miss() {
        let t0 = Instant::now();
        let mut l = LivenessTracker::new(t0, HB, 3, SLOW_MAX);
        for i in 1..100u32 {
            // Jitter of +/- 100 ms around the interval.
            let jitter = if i % 2 == 0 { 100 } else { 0 };
            let now = t0 + HB * i + ms(jitter);
            assert_eq!(l.poll(now), (0, Liveness::Alive));
            l.handle_heartbeat(now);
        }
        assert_eq!(l.total_misses(), 0);
    }

    #[test]
    fn silence_is_gone_within_three_intervals_and_misses_counted_once() {
        let t0 = Instant::now();
        let mut l = LivenessTracker::new(t0, HB, 3, SLOW_MAX);
        assert_eq!(l.poll(t0 + ms(700)), (0, Liveness::Alive));
        assert_eq!(l.poll(t0 + ms(760)), (1, Liveness::Alive));
        assert_eq!(l.poll(t0 + ms(800)), (0, Liveness::Alive));
        assert_eq!(l.poll(t0 + ms(1260)), (1, Liveness::Alive));
        assert_eq!(l.poll(t0 + ms(1499)), (0, Liveness::Alive));
        assert_eq!(l.poll(t0 + ms(1500)), (0, Liveness::Gone));
        assert_eq!(l.total_misses(), 2);
    }

    #[test]
    fn a_heartbeat_resets_the_count_and_deadline_follows() {
        let t0 = Instant::now();
        let mut l = LivenessTracker::new(t0, HB, 3, SLOW_MAX);
        // Nothing to check before a heartbeat is due.
        assert_eq!(l.next_deadline(), t0 + ms(500));
        l.handle_rx(t0 + ms(500), 10);
        // Overdue: sampled every quarter interval, and the first miss at 750 ms.
        assert_eq!(l.next_deadline(), t0 + ms(625));
        l.poll(t0 + ms(1300));
        l.handle_rx(t0 + ms(1300), 10);
        assert_eq!(l.next_deadline(), t0 + ms(1425));
        l.handle_heartbeat(t0 + ms(1300));
        assert_eq!(l.poll(t0 + ms(1900)), (0, Liveness::Alive));
        assert_eq!(l.next_deadline(), t0 + ms(1800));
    }

    /// Samples the count every `step` from `from` to `to`, the count growing while `arriving`
    /// says so, polling after each sample as the driver does; returns the last verdict.
    fn run(
        l: &mut LivenessTracker,
        t0: Instant,
        from: u64,
        to: u64,
        step: u64,
        count: &mut u64,
        arriving: impl Fn(u64) -> bool,
    ) -> Vec<(u64, Liveness)> {
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            if arriving(t) {
                *count += 3;
            }
            l.handle_rx(t0 + ms(t), *count);
            out.push((t, l.poll(t0 + ms(t)).1));
            t += step;
        }
        out
    }

    #[test]
    fn late_heartbeats_on_a_connection_that_still_delivers_are_slow_not_gone() {
        let t0 = Instant::now();
        let mut l = LivenessTracker::new(t0, HB, 3, SLOW_MAX);
        let mut count = 0;
        // Video keeps arriving, heartbeats are stuck behind it for 4 s.
        let seen = run(&mut l, t0, 0, 4000, 125, &mut count, |_| true);
        assert!(seen.iter().all(|(_, v)| *v != Liveness::Gone), "{seen:?}");
        assert_eq!(l.verdict(t0 + ms(1500)), Liveness::Slow);
        // The late heartbeat arrives: alive again.
        l.handle_heartbeat(t0 + ms(4010));
        assert_eq!(l.poll(t0 + ms(4020)).1, Liveness::Alive);
    }

    #[test]
    fn a_slow_node_whose_datagrams_stop_is_gone_within_the_quiet_time() {
        let t0 = Instant::now();
        let mut l = LivenessTracker::new(t0, HB, 3, SLOW_MAX);
        let mut count = 0;
        let seen = run(&mut l, t0, 0, 6000, 125, &mut count, |t| t < 3000);
        let gone_at = seen
            .iter()
            .find(|(_, v)| *v == Liveness::Gone)
            .map(|(t, _)| *t)
            .expect("never gone");
        // Quiet time is 2 intervals less a sample (875 ms) after the last datagram (3000 ms at
        // the latest sample that saw growth, 2875 ms), plus at most one sample period.
        assert!((3625..=3875).contains(&gone_at), "{gone_at}");
    }

    #[test]
    fn slow_for_longer_than_slow_max_is_gone() {
        let t0 = Instant::now();
        let mut l = LivenessTracker::new(t0, HB, 3, Duration::from_secs(2));
        let mut count = 0;
        let seen = run(&mut l, t0, 0, 5000, 125, &mut count, |_| true);
        let gone_at = seen.iter().find(|(_, v)| *v == Liveness::Gone).unwrap().0;
        assert_eq!(gone_at, 3500);
    }

    #[test]
    fn a_killed_node_is_gone_no_later_than_when_only_heartbeats_counted() {
        // The node dies `k` ms after its last heartbeat (at 0), with its video arriving until
        // then; the old rule declared it gone at the end of the lease (1500 ms).
        for k in (0..500).step_by(20) {
            let t0 = Instant::now();
            let mut l = LivenessTracker::new(t0, HB, 3, SLOW_MAX);
            let mut t = 0;
            let gone_at = loop {
                let now = t0 + ms(t);
                // A datagram every 10 ms until the node dies; sampled at each deadline only.
                let count = t.min(k) / 10 + 1;
                l.handle_rx(now, count);
                if l.poll(now).1 == Liveness::Gone {
                    break t;
                }
                t = (l.next_deadline() - t0).as_millis() as u64;
            };
            assert!(
                gone_at <= 1500,
                "killed {k} ms after a heartbeat: gone at {gone_at}"
            );
        }
    }
}
