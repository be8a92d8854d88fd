//! Reconnect backoff: exponential with full jitter, reset after a successful registration.
//!
//! Pure (the caller supplies the random source), so it is tested without clocks.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial: initial.max(Duration::from_millis(1)),
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling for the next wait: initial * 2^attempt, capped at max.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u64.checked_shl(self.attempt.min(32)).unwrap_or(u64::MAX);
        let ms = (self.initial.as_millis() as u64).saturating_mul(factor);
        Duration::from_millis(ms).min(self.max)
    }

    /// The next wait, given a uniform random number in [0, 1): "full jitter" spreads a fleet of
    /// nodes that lost the same gateway so they do not reconnect in lockstep.
    pub fn next_delay(&mut self, unit_random: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let r = unit_random.clamp(0.0, 1.0);
        // Never zero: a floor of half the initial delay keeps a hot loop impossible.
        let floor = self.initial / 2;
        floor + (ceiling.saturating_sub(floor)).mul_f64(r)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_then_caps() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let ceilings: Vec<u64> = (0..10)
            .map(|_| {
                let c = b.ceiling().as_millis() as u64;
                b.next_delay(0.5);
                c
            })
            .collect();
        assert_eq!(
            ceilings,
            vec![250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn jitter_stays_within_floor_and_ceiling_and_reset_restarts() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..5 {
            b.next_delay(0.0);
        }
        let lo = b.clone().next_delay(0.0);
        let hi = b.clone().next_delay(0.999_999);
        assert_eq!(lo, Duration::from_millis(50));
        assert!(hi <= Duration::from_millis(3200) && hi > Duration::from_millis(3100));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
