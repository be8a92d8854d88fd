//! Whether the gateway's own runtime is saturated: the signal the game relay sheds frames on
//! ([`crate::relay::FrameBudget::admit`]).
//!
//! A relay past its capacity cannot forward every frame, and what it cannot forward waits in its
//! UDP receive queue, where every frame ages alike. Frame ages alone cannot tell that queue from
//! a slow or jittery path to one node; the runtime's busy time can. The tokio workers are busy
//! (not parked) nearly all the time only when work arrives faster than they finish it, and a
//! CPU quota that stalls the process counts as busy too, since the workers are not parked then.
//!
//! [`SaturationCore`] is the rule, sans-IO: it takes samples of the workers' total busy time
//! and says whether the runtime is saturated. [`Saturation::run`] is its driver, reading
//! tokio's runtime metrics every [`SAMPLE_INTERVAL`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the driver samples the runtime's busy time.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// The share of the interval the workers must have been busy, on average, for a sample to count
/// as saturated.
pub const BUSY_SHARE: f64 = 0.9;
/// Saturated samples in a row before the runtime counts as saturated: one busy burst (a TLS
/// handshake storm, a large store read) is not overload.
pub const SAMPLES_TO_ENTER: u32 = 2;
/// Samples in a row below [`BUSY_SHARE`] before a saturated runtime no longer counts as
/// saturated: shedding frees a little time now and then, and leaving at the first quiet
/// sample would let the receive queue build up again before the next two busy ones.
pub const SAMPLES_TO_LEAVE: u32 = 3;

/// The rule: saturated after [`SAMPLES_TO_ENTER`] samples in a row with the workers busy at
/// least [`BUSY_SHARE`] of the time; no longer after [`SAMPLES_TO_LEAVE`] samples in a row
/// below it.
#[derive(Debug, Default)]
pub struct SaturationCore {
    last: Option<(Instant, Duration)>,
    busy_samples: u32,
    quiet_samples: u32,
    saturated: bool,
}

impl SaturationCore {
    /// Takes the workers' total busy time (summed over `workers`) at `now`; returns whether the
    /// runtime is saturated now. A clock or counter that went backwards (a runtime rebuilt)
    /// restarts the rule.
    pub fn handle_sample(&mut self, now: Instant, busy_total: Duration, workers: usize) -> bool {
        let Some((at, busy)) = self.last.replace((now, busy_total)) else {
            return false;
        };
        let wall = now.saturating_duration_since(at);
        if wall.is_zero() || busy_total < busy || workers == 0 {
            *self = SaturationCore {
                last: self.last,
                ..SaturationCore::default()
            };
            return false;
        }
        let share = (busy_total - busy).as_secs_f64() / (wall.as_secs_f64() * workers as f64);
        if share >= BUSY_SHARE {
            self.busy_samples = self.busy_samples.saturating_add(1);
            self.quiet_samples = 0;
        } else {
            self.busy_samples = 0;
            self.quiet_samples = self.quiet_samples.saturating_add(1);
        }
        if self.busy_samples >= SAMPLES_TO_ENTER {
            self.saturated = true;
        } else if self.quiet_samples >= SAMPLES_TO_LEAVE {
            self.saturated = false;
        }
        self.saturated
    }
}

/// The runtime's saturation as the relay reads it, kept current by [`Saturation::run`].
#[derive(Debug, Default)]
pub struct Saturation {
    saturated: AtomicBool,
}

impl Saturation {
    pub fn new() -> Arc<Saturation> {
        Arc::new(Saturation::default())
    }

    /// Whether the runtime is saturated now.
    pub fn is_saturated(&self) -> bool {
        self.saturated.load(Ordering::Relaxed)
    }

    /// Samples the current runtime's workers until `shutdown`, calling `changed` with the new
    /// state whenever it changes (for the metric and the log).
    pub async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        mut changed: impl FnMut(bool) + Send + 'static,
    ) {
        let metrics = tokio::runtime::Handle::current().metrics();
        let mut core = SaturationCore::default();
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        // A saturated runtime runs timers late; a burst of catch-up ticks would measure nothing.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let workers = metrics.num_workers();
            let busy: Duration = (0..workers)
                .map(|w| metrics.worker_total_busy_duration(w))
                .sum();
            let now = core.handle_sample(Instant::now(), busy, workers);
            if self.saturated.swap(now, Ordering::Relaxed) != now {
                changed(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn saturated_after_two_busy_samples_in_a_row_and_no_longer_after_three_quiet_ones() {
        let t0 = Instant::now();
        let mut c = SaturationCore::default();
        // The first sample only sets the baseline.
        assert!(!c.handle_sample(t0, Duration::ZERO, 1));
        // 95 ms busy of 100: busy, but one sample is a burst.
        assert!(!c.handle_sample(t0 + 100 * MS, 95 * MS, 1));
        assert!(!c.handle_sample(t0 + 200 * MS, 145 * MS, 1));
        assert!(!c.handle_sample(t0 + 300 * MS, 240 * MS, 1));
        assert!(c.handle_sample(t0 + 400 * MS, 335 * MS, 1));
        // 50 ms busy: still saturated for two quiet samples, no longer at the third.
        assert!(c.handle_sample(t0 + 500 * MS, 385 * MS, 1));
        assert!(c.handle_sample(t0 + 600 * MS, 435 * MS, 1));
        // A busy sample between quiet ones starts the count again.
        assert!(c.handle_sample(t0 + 700 * MS, 535 * MS, 1));
        assert!(c.handle_sample(t0 + 800 * MS, 585 * MS, 1));
        assert!(c.handle_sample(t0 + 900 * MS, 635 * MS, 1));
        assert!(!c.handle_sample(t0 + 1000 * MS, 685 * MS, 1));
        assert!(!c.handle_sample(t0 + 1100 * MS, 785 * MS, 1));
        assert!(c.handle_sample(t0 + 1200 * MS, 885 * MS, 1));
    }

    #[test]
    fn busy_time_is_shared_across_workers() {
        let t0 = Instant::now();
        let mut c = SaturationCore::default();
        c.handle_sample(t0, Duration::ZERO, 4);
        // One of four workers flat out is 25% of the runtime, not saturation.
        for k in 1..5u32 {
            assert!(!c.handle_sample(t0 + k * 100 * MS, k * 100 * MS, 4));
        }
        // All four busy.
        let base = 400 * MS;
        assert!(!c.handle_sample(t0 + 500 * MS, base + 400 * MS, 4));
        assert!(c.handle_sample(t0 + 600 * MS, base + 800 * MS, 4));
    }

    #[test]
    fn a_counter_that_goes_backwards_restarts_the_rule() {
        let t0 = Instant::now();
        let mut c = SaturationCore::default();
        c.handle_sample(t0, Duration::ZERO, 1);
        c.handle_sample(t0 + 100 * MS, 100 * MS, 1);
        assert!(c.handle_sample(t0 + 200 * MS, 200 * MS, 1));
        assert!(!c.handle_sample(t0 + 300 * MS, 10 * MS, 1));
        assert!(!c.handle_sample(t0 + 300 * MS, 10 * MS, 0));
        // Busy again from the new baseline: two samples to enter, as at the start.
        assert!(!c.handle_sample(t0 + 400 * MS, 110 * MS, 1));
        assert!(c.handle_sample(t0 + 500 * MS, 210 * MS, 1));
    }

    /// The driver reads real busy time: a runtime kept busy by a spinning task is saturated,
    /// and stops being so when the task stops.
    #[test]
    fn the_driver_sees_a_busy_current_thread_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = Saturation::new();
            let stop = CancellationToken::new();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(s.clone().run(stop.clone(), move |v| {
                let _ = tx.send(v);
            }));
            let spin = CancellationToken::new();
            let spinning = spin.clone();
            tokio::spawn(async move {
                while !spinning.is_cancelled() {
                    // Busy for 5 ms, then let the timer run.
                    let until = Instant::now() + 5 * MS;
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                    tokio::task::yield_now().await;
                }
            });
            let entered = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            assert_eq!(entered.unwrap(), Some(true));
            assert!(s.is_saturated());
            spin.cancel();
            let left = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            assert_eq!(left.unwrap(), Some(false));
            assert!(!s.is_saturated());
            stop.cancel();
        });
    }
}
