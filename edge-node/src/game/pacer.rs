//! Frame pacing from a monotonic clock.
//!
//! Frame `n` is due at `start + n / fps` (computed from the start every time, so rounding never
//! accumulates into drift). When the consumer falls behind, the frames whose time has passed are
//! skipped and counted, never queued: a game stream shows the newest picture or nothing.

use std::time::Duration;
use tokio::time::Instant;

/// One frame slot handed out by [`Pacer::tick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Frame slot number since the pacer started (0, 1, 2, ...; gaps where slots were missed).
    pub index: u64,
    /// When this slot was due.
    pub due: Instant,
    /// Slots skipped right before this one because they were already past.
    pub missed: u64,
}

/// Hands out frame slots at a fixed rate.
#[derive(Debug)]
pub struct Pacer {
    fps: u32,
    start: Instant,
    next: u64,
    missed_total: u64,
}

impl Pacer {
    /// A pacer whose slot 0 is due at `start`. `fps` 0 is treated as 1.
    pub fn new(fps: u32, start: Instant) -> Self {
        Self {
            fps: fps.max(1),
            start,
            next: 0,
            missed_total: 0,
        }
    }

    /// When slot `index` is due.
    pub fn due(&self, index: u64) -> Instant {
        self.start + slot_offset(index, self.fps)
    }

    /// Slots skipped so far.
    pub fn missed(&self) -> u64 {
        self.missed_total
    }

    /// Picks the slot to run at time `now` without waiting: the next slot if it is not yet
    /// over, else the newest slot that has begun, counting the ones in between as missed.
    /// Returns the slot and whether one must wait for it to be due.
    pub fn plan(&mut self, now: Instant) -> (Tick, bool) {
        let index = if now >= self.due(self.next + 1) {
            // Behind: the newest slot whose time has come.
            let elapsed = now.saturating_duration_since(self.start);
            slots_elapsed(elapsed, self.fps).max(self.next)
        } else {
            self.next
        };
        let missed = index - self.next;
        self.missed_total += missed;
        self.next = index + 1;
        let due = self.due(index);
        (Tick { index, due, missed }, due > now)
    }

    /// Waits for the next slot (at once if it is already due) and returns it.
    pub async fn tick(&mut self) -> Tick {
        let (tick, wait) = self.plan(Instant::now());
        if wait {
            tokio::time::sleep_until(tick.due).await;
        }
        tick
    }
}

/// Time from the start to slot `index`: `index / fps` seconds, rounded down to a nanosecond.
pub(crate) fn slot_offset(index: u64, fps: u32) -> Duration {
    let nanos = u128::from(index) * 1_000_000_000 / u128::from(fps);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The newest slot that has begun after `elapsed`.
fn slots_elapsed(elapsed: Duration, fps: u32) -> u64 {
    let slots = elapsed.as_nanos() * u128::from(fps) / 1_000_000_000;
    u64::try_from(slots).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_do_not_drift() {
        assert_eq!(slot_offset(60, 60), Duration::from_secs(1));
        assert_eq!(slot_offset(3600 * 60, 60), Duration::from_secs(3600));
        assert_eq!(slot_offset(1, 60), Duration::from_nanos(16_666_666));
        assert_eq!(slots_elapsed(Duration::from_nanos(16_666_666), 60), 0);
        assert_eq!(slots_elapsed(Duration::from_nanos(16_666_667), 60), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sixty_frames_a_second_on_time() {
        let start = Instant::now();
        let mut pacer = Pacer::new(60, start);
        let mut ticks = Vec::new();
        while Instant::now() < start + Duration::from_secs(1) {
            ticks.push(pacer.tick().await);
        }
        // Slots 0..=60 begin within [0 s, 1 s]; the loop stops once 1 s has passed.
        assert_eq!(ticks.len(), 61);
        assert_eq!(pacer.missed(), 0);
        for (i, t) in ticks.iter().enumerate() {
            assert_eq!(t.index, i as u64);
            assert_eq!(t.missed, 0);
        }
        assert_eq!(ticks[60].due - start, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_skips_slots_instead_of_queueing_them() {
        let start = Instant::now();
        let mut pacer = Pacer::new(60, start);
        let mut ran = 0;
        loop {
            let tick = pacer.tick().await;
            if tick.due >= start + Duration::from_secs(1) {
                break;
            }
            ran += 1;
            // Every frame takes 40 ms: 2.4 slots.
            tokio::time::advance(Duration::from_millis(40)).await;
        }
        // One frame per 40 ms is 25 frames in a second; the other slots are counted as missed.
        assert_eq!(ran, 25);
        // Slots 0 to 59 all either ran or were counted as missed.
        assert_eq!(ran + pacer.missed(), 60);
    }

    #[test]
    fn plan_runs_a_late_slot_once_then_waits() {
        let start = Instant::now();
        let mut pacer = Pacer::new(10, start);
        let (t, wait) = pacer.plan(start);
        assert_eq!((t.index, t.missed, wait), (0, 0, false));
        // Slot 1 is due at 100 ms; at 150 ms it is late but not over: run it, miss nothing.
        let (t, wait) = pacer.plan(start + Duration::from_millis(150));
        assert_eq!((t.index, t.missed, wait), (1, 0, false));
        // At 450 ms slots 2 and 3 are over and slot 4 has begun.
        let (t, wait) = pacer.plan(start + Duration::from_millis(450));
        assert_eq!((t.index, t.missed, wait), (4, 2, false));
        let (t, wait) = pacer.plan(start + Duration::from_millis(460));
        assert_eq!((t.index, t.missed, wait), (5, 0, true));
        assert_eq!(pacer.missed(), 2);
    }
}
