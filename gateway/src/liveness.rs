//! Node liveness as a sans-IO state machine: heartbeats in (`handle_heartbeat(now)`), timer
//! checks in (`poll(now)`), misses and the "gone" verdict out. The async driver in `control`
//! owns the clock; tests drive it with a virtual one.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// No heartbeat for `missed_before_gone` whole intervals: the node is treated as gone.
    Gone,
}

#[derive(Debug, Clone)]
pub struct LivenessTracker {
    interval: Duration,
    missed_before_gone: u32,
    last_heartbeat: Instant,
    /// Misses already reported, so each missed interval is counted once.
    misses_reported: u32,
    total_misses: u64,
}

impl LivenessTracker {
    pub fn new(now: Instant, interval: Duration, missed_before_gone: u32) -> Self {
        LivenessTracker {
            interval: interval.max(Duration::from_millis(1)),
            missed_before_gone: missed_before_gone.max(1),
            last_heartbeat: now,
            misses_reported: 0,
            total_misses: 0,
        }
    }

    pub fn handle_heartbeat(&mut self, now: Instant) {
        self.last_heartbeat = now;
        self.misses_reported = 0;
    }

    /// Missed intervals since the last heartbeat (a heartbeat is "missed" once a full interval
    /// plus half an interval of grace has passed, so ordinary jitter is not counted).
    fn missed_at(&self, now: Instant) -> u32 {
        let since = now.saturating_duration_since(self.last_heartbeat);
        let grace = self.interval / 2;
        if since <= self.interval + grace {
            return 0;
        }
        ((since - grace).as_nanos() / self.interval.as_nanos()) as u32
    }

    /// Advances the tracker; returns the newly missed intervals and the verdict.
    pub fn poll(&mut self, now: Instant) -> (u32, Liveness) {
        let missed = self.missed_at(now);
        let new = missed.saturating_sub(self.misses_reported);
        self.misses_reported = self.misses_reported.max(missed);
        self.total_misses += new as u64;
        let since = now.saturating_duration_since(self.last_heartbeat);
        let verdict = if since >= self.interval * self.missed_before_gone {
            Liveness::Gone
        } else {
            Liveness::Alive
        };
        (new, verdict)
    }

    /// When the driver should call `poll` next.
    pub fn next_deadline(&self) -> Instant {
        let grace = self.interval / 2;
        let next_miss = self.last_heartbeat + grace + self.interval * (self.misses_reported + 1);
        next_miss.min(self.last_heartbeat + self.interval * self.missed_before_gone)
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

    #[test]
    fn steady_heartbeats_never_miss() {
        let t0 = Instant::now();
        let mut l = LivenessTracker::new(t0, HB, 3);
        for i in 1..100u32 {
            // Jitter of +/- 100 ms around the interval.
            let jitter = if i % 2 == 0 { 100 } else { 0 };
            let now = t0 + HB * i + Duration::from_millis(jitter);
            assert_eq!(l.poll(now), (0, Liveness::Alive));
            l.handle_heartbeat(now);
        }
        assert_eq!(l.total_misses(), 0);
    }

    #[test]
    fn silence_is_gone_within_three_intervals_and_misses_counted_once() {
        let t0 = Instant::now();
        let mut l = LivenessTracker::new(t0, HB, 3);
        assert_eq!(
            l.poll(t0 + Duration::from_millis(700)),
            (0, Liveness::Alive)
        );
        assert_eq!(
            l.poll(t0 + Duration::from_millis(760)),
            (1, Liveness::Alive)
        );
        assert_eq!(
            l.poll(t0 + Duration::from_millis(800)),
            (0, Liveness::Alive)
        );
        assert_eq!(
            l.poll(t0 + Duration::from_millis(1260)),
            (1, Liveness::Alive)
        );
        assert_eq!(
            l.poll(t0 + Duration::from_millis(1499)),
            (0, Liveness::Alive)
        );
        assert_eq!(
            l.poll(t0 + Duration::from_millis(1500)),
            (0, Liveness::Gone)
        );
        assert_eq!(l.total_misses(), 2);
    }

    #[test]
    fn a_heartbeat_resets_the_count_and_deadline_follows() {
        let t0 = Instant::now();
        let mut l = LivenessTracker::new(t0, HB, 3);
        assert_eq!(l.next_deadline(), t0 + Duration::from_millis(750));
        l.poll(t0 + Duration::from_millis(1300));
        assert_eq!(l.next_deadline(), t0 + Duration::from_millis(1500));
        l.handle_heartbeat(t0 + Duration::from_millis(1300));
        assert_eq!(
            l.poll(t0 + Duration::from_millis(1900)),
            (0, Liveness::Alive)
        );
        assert_eq!(l.next_deadline(), t0 + Duration::from_millis(2050));
    }
}
