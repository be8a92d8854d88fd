//! The relay's per-frame `game_frame_latency_seconds` observation (commit 55474ac), measured:
//! what one `observe` costs when 1, 2 and 8 threads (the relay's per-node-connection tasks on
//! tokio's workers) share the histogram, against the same loop without it.
//!
//! Run: `cargo bench -p nearpath-gateway --bench frame_latency`. Before the criterion groups it
//! prints, for each variant and thread count, the median and the range over 15 runs of the
//! wall-clock nanoseconds per observation (all threads' observations together: the throughput
//! cost, which is what the relay pays; on a machine with fewer cores than threads the threads
//! also preempt each other, which is when a lock's holder can be descheduled).
//!
//! Variants:
//! - `none`: the frame's age computed and discarded, no histogram (the baseline);
//! - `prometheus`: `prometheus_client::metrics::histogram::Histogram`, a `parking_lot::Mutex`
//!   per `observe`, as the relay uses it;
//! - `striped`: [`AtomicHistogram`] below, the candidate fix: no lock, one stripe of relaxed
//!   atomics per thread.
//!
//! Result (README "Benchmarks"): on the 2-core development machine all three variants of the
//! observation cost 15-27 ns, the lock no more than the striped atomics, against about 57 us of
//! relay work per 720p60 frame; the relay keeps `prometheus_client`'s histogram. Rerun this on a
//! many-core gateway host before changing that.

use criterion::Criterion;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
enum Variant {
    None,
    Prometheus,
    Striped,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::Prometheus => "prometheus",
            Variant::Striped => "striped",
        }
    }
}

/// The relay's buckets for `game_frame_latency_seconds` (`gateway/src/metrics.rs`).
fn frame_latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, std::f64::consts::SQRT_2, 21)
}

/// How many stripes an [`AtomicHistogram`] spreads its observations over.
const HISTOGRAM_STRIPES: usize = 8;

/// The candidate replacement: observing takes no lock and, from different threads, mostly
/// touches different cache lines. Each thread adds to one of [`HISTOGRAM_STRIPES`] stripes
/// (its own count, sum and buckets, each stripe on its own cache lines) with relaxed atomics;
/// a scrape would add the stripes up.
#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: std::sync::Arc<AtomicHistogramInner>,
}

#[derive(Debug)]
struct AtomicHistogramInner {
    /// Upper bounds, ascending, the last `+Inf`.
    bounds: Box<[f64]>,
    stripes: Box<[Stripe]>,
}

/// One stripe's counts, aligned so that two stripes never share a cache line (128 bytes: the
/// adjacent-line prefetcher pairs lines on x86). Its buckets are a separate allocation.
#[derive(Debug)]
#[repr(align(128))]
struct Stripe {
    count: std::sync::atomic::AtomicU64,
    /// The sum of the observations, as `f64` bits.
    sum: std::sync::atomic::AtomicU64,
    /// Per-bucket (not cumulative) counts, one per bound.
    buckets: Box<[std::sync::atomic::AtomicU64]>,
}

impl AtomicHistogram {
    /// A histogram with these upper bounds (non-finite ones are dropped, `+Inf` is added), as
    /// `prometheus_client`'s `Histogram::new`.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let mut bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        bounds.push(f64::INFINITY);
        let stripes = (0..HISTOGRAM_STRIPES)
            .map(|_| Stripe {
                count: Default::default(),
                sum: std::sync::atomic::AtomicU64::new(0f64.to_bits()),
                buckets: bounds.iter().map(|_| Default::default()).collect(),
            })
            .collect();
        Self {
            inner: std::sync::Arc::new(AtomicHistogramInner {
                bounds: bounds.into(),
                stripes,
            }),
        }
    }

    /// Records `v`. NaN counts in `+Inf`, as in `prometheus_client`.
    pub fn observe(&self, v: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        let stripe = &self.inner.stripes[stripe_of_this_thread()];
        let last = self.inner.bounds.len() - 1;
        let bucket = if v.is_nan() {
            last
        } else {
            self.inner.bounds.partition_point(|&b| b < v).min(last)
        };
        stripe.buckets[bucket].fetch_add(1, Relaxed);
        // This thread is usually the stripe's only writer, so the exchange rarely retries.
        let _ = stripe.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
        stripe.count.fetch_add(1, Relaxed);
    }

    /// The sum, the count and the per-bucket counts `(upper bound, count)`, over all stripes.
    #[allow(dead_code)]
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut buckets: Vec<(f64, u64)> = self.inner.bounds.iter().map(|&b| (b, 0)).collect();
        let (mut sum, mut count) = (0.0, 0);
        for stripe in self.inner.stripes.iter() {
            sum += f64::from_bits(stripe.sum.load(Relaxed));
            count += stripe.count.load(Relaxed);
            for (out, n) in buckets.iter_mut().zip(stripe.buckets.iter()) {
                out.1 += n.load(Relaxed);
            }
        }
        (sum, count, buckets)
    }
}

/// The stripe this thread observes into: threads take stripes in turn as they first observe,
/// so that up to [`HISTOGRAM_STRIPES`] threads (tokio's workers) each have their own.
fn stripe_of_this_thread() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % HISTOGRAM_STRIPES;
    }
    STRIPE.with(|s| *s)
}

/// Wall time for `total` observations split over `threads` threads sharing one histogram,
/// from the moment they all start (at a barrier, spawning excluded) until the last ends.
fn run(variant: Variant, threads: usize, total: u64) -> Duration {
    let prom = Histogram::new(frame_latency_buckets());
    let atomic = AtomicHistogram::new(frame_latency_buckets());
    let per_thread = total / threads as u64;
    let barrier = Barrier::new(threads + 1);
    let elapsed = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (prom, atomic, barrier) = (&prom, &atomic, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    // Ages spread over the buckets the way frame ages are (0..40 ms).
                    let mut age_us = 1_000 + t as u64 * 997;
                    for _ in 0..per_thread {
                        age_us = (age_us * 1_103_515_245 + 12_345) % 40_000;
                        let v = black_box(age_us) as f64 / 1e6;
                        match variant {
                            Variant::None => {
                                black_box(v);
                            }
                            Variant::Prometheus => prom.observe(v),
                            Variant::Striped => atomic.observe(v),
                        }
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            h.join().expect("bench thread");
        }
        start.elapsed()
    });
    black_box((&prom, &atomic));
    elapsed
}

fn report() {
    const TOTAL: u64 = 4_000_000;
    const RUNS: usize = 15;
    println!("ns per observation (wall clock, all threads together), median [min .. max] of {RUNS} runs of {TOTAL}:");
    for threads in [1, 2, 8] {
        for variant in [Variant::None, Variant::Prometheus, Variant::Striped] {
            let mut ns: Vec<f64> = (0..RUNS)
                .map(|_| run(variant, threads, TOTAL).as_nanos() as f64 / TOTAL as f64)
                .collect();
            ns.sort_by(f64::total_cmp);
            println!(
                "  {threads} thread(s) {:<10} {:>7.2} [{:.2} .. {:.2}]",
                variant.name(),
                ns[RUNS / 2],
                ns[0],
                ns[RUNS - 1]
            );
        }
    }
}

fn criterion_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_latency_observe");
    for threads in [1, 2, 8] {
        for variant in [Variant::None, Variant::Prometheus, Variant::Striped] {
            group.bench_function(format!("{}/{threads}", variant.name()), |b| {
                b.iter_custom(|iters| run(variant, threads, iters.max(threads as u64)))
            });
        }
    }
    group.finish();
}

fn main() {
    // `cargo test --benches` runs bench targets without `--bench`: keep that quick.
    if std::env::args().any(|a| a == "--bench") {
        report();
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
}
