//! The one source of time for the gateway's core.
//!
//! Components read time through a [`SharedClock`] handed to them at assembly, never through
//! `SystemTime::now()` or `Instant::now()` of their own, so that the session rules can be driven
//! by a [`ManualClock`] in tests: a virtual clock that only moves when the test says so.
//!
//! Two readings exist because they answer different questions: [`Clock::now`] is monotonic and
//! measures durations and deadlines; [`Clock::unix_ms`] is wall time and is what gets written to
//! the store, to logs and onto the wire.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of monotonic and wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time, for durations and deadlines.
    fn now(&self) -> Instant;
    /// Wall-clock time in milliseconds since the Unix epoch.
    fn unix_ms(&self) -> u64;
    /// Wall-clock time in microseconds since the Unix epoch.
    fn unix_us(&self) -> u64 {
        self.unix_ms().saturating_mul(1000)
    }
}

/// The clock every component of one gateway shares.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn unix_ms(&self) -> u64 {
        system_unix_us() / 1000
    }
    fn unix_us(&self) -> u64 {
        system_unix_us()
    }
}

/// The system clock as a [`SharedClock`].
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// Wall-clock microseconds since the Unix epoch, read from the operating system. The one place
/// the gateway reads `SystemTime`: code with a [`SharedClock`] uses that instead; this is for
/// code outside the core (the store's default timestamps, command-line tools).
pub fn system_unix_us() -> u64 {
    // A clock set before 1970 reads as the epoch rather than panicking.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Wall-clock milliseconds since the Unix epoch, read from the operating system (see
/// [`system_unix_us`]).
pub fn system_unix_ms() -> u64 {
    system_unix_us() / 1000
}

/// A virtual clock for deterministic tests: it starts at a fixed instant and wall time and moves
/// only when [`ManualClock::advance`] is called.
#[derive(Debug)]
pub struct ManualClock {
    inner: Mutex<(Instant, u64)>,
}

impl ManualClock {
    /// A clock at `unix_ms` of wall time.
    pub fn new(unix_ms: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            inner: Mutex::new((Instant::now(), unix_ms.saturating_mul(1000))),
        })
    }

    /// Moves both readings forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += d;
        g.1 = g.1.saturating_add(d.as_micros() as u64);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0
    }
    fn unix_ms(&self) -> u64 {
        self.unix_us() / 1000
    }
    fn unix_us(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let c = ManualClock::new(1_000);
        let t0 = c.now();
        assert_eq!(c.unix_ms(), 1_000);
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_millis(250));
        assert_eq!(c.unix_ms(), 1_250);
        assert_eq!(c.now() - t0, Duration::from_millis(250));
    }

    #[test]
    fn the_system_clock_agrees_with_the_operating_system() {
        let a = system_unix_ms();
        let b = SystemClock.unix_ms();
        assert!(b >= a && b - a < 60_000);
    }
}
