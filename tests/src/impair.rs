//! A seeded userspace UDP impairment relay: the stand-in for `netem`, which this kernel lacks.
//!
//! [`UdpRelay`] listens on one address and forwards every datagram to a target. Each source
//! address gets its own upstream socket (bound to a chosen local IP, so a node behind the relay
//! still appears to the gateway from its test "place"), and replies come back the same way. Each
//! direction has its own [`Impairment`]: fixed delay, jitter with or without reordering, random
//! loss, bursty loss (a two-state Gilbert–Elliott chain), a rate limit with a bounded queue
//! (tail drop), and blackouts. Everything random comes from one seeded generator per direction,
//! so a run with the same seed and the same packet order drops and delays the same packets.
//!
//! The relay is a harness, not a product: it is used by the end-to-end tests
//! (`tests/tests/impaired.rs`) and the benchmark harness (`bench game-impaired`, `bench impair`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What one direction of the path does to datagrams. The default passes everything unchanged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Impairment {
    /// Fixed one-way delay added to every datagram.
    pub delay_ms: f64,
    /// Each datagram's delay is `delay_ms` plus a uniform sample in `[-jitter_ms, +jitter_ms]`
    /// (never below zero).
    pub jitter_ms: f64,
    /// With jitter, whether a datagram may overtake an earlier one. Without reordering a
    /// datagram leaves no earlier than the one before it (jitter then only bunches packets).
    pub reorder: bool,
    /// Probability in `[0, 1]` that a datagram is dropped, independently of the others.
    pub loss: f64,
    /// Bursty loss: the probability of entering the "bad" state per datagram, and the mean burst
    /// length in datagrams (every datagram in the bad state is lost). `None`: no bursts.
    pub burst: Option<(f64, f64)>,
    /// Bottleneck rate in kbit/s; datagrams are serialised at this rate behind a queue.
    pub rate_kbps: Option<u64>,
    /// The rate limiter's queue, as the longest time a datagram may wait in it; a datagram that
    /// would wait longer is dropped (tail drop). Ignored without `rate_kbps`.
    pub queue_ms: f64,
}

impl Impairment {
    /// A path with only a fixed delay.
    pub fn delay(ms: f64) -> Impairment {
        Impairment {
            delay_ms: ms,
            ..Default::default()
        }
    }

    /// Adds random loss.
    pub fn with_loss(mut self, p: f64) -> Impairment {
        self.loss = p;
        self
    }

    /// Adds jitter, reordering or not.
    pub fn with_jitter(mut self, ms: f64, reorder: bool) -> Impairment {
        self.jitter_ms = ms;
        self.reorder = reorder;
        self
    }

    /// Adds a rate limit with a queue of `queue_ms`.
    pub fn with_rate(mut self, kbps: u64, queue_ms: f64) -> Impairment {
        self.rate_kbps = Some(kbps);
        self.queue_ms = queue_ms;
        self
    }

    /// Adds bursty loss.
    pub fn with_bursts(mut self, enter_p: f64, mean_len: f64) -> Impairment {
        self.burst = Some((enter_p, mean_len));
        self
    }
}

/// Packet counts per direction, for assertions and reports.
#[derive(Debug, Default)]
pub struct DirStats {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    pub blackholed: AtomicU64,
    pub queue_dropped: AtomicU64,
}

impl DirStats {
    pub fn snapshot(&self) -> [u64; 5] {
        [
            self.received.load(Ordering::Relaxed),
            self.forwarded.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
            self.blackholed.load(Ordering::Relaxed),
            self.queue_dropped.load(Ordering::Relaxed),
        ]
    }
}

/// One direction's live state: its impairment, its generator, its loss chain and its queue.
struct Dir {
    imp: Impairment,
    rng: StdRng,
    bad: bool,
    /// When the rate limiter's link is next free.
    link_free: Instant,
    /// The departure time of the last datagram scheduled (for jitter without reordering).
    last_departure: Instant,
}

impl Dir {
    fn new(seed: u64) -> Dir {
        let now = Instant::now();
        Dir {
            imp: Impairment::default(),
            rng: StdRng::seed_from_u64(seed),
            bad: false,
            link_free: now,
            last_departure: now,
        }
    }

    /// Decides one datagram's fate: `None` if it is lost, else when it leaves.
    fn schedule(&mut self, now: Instant, len: usize, stats: &DirStats) -> Option<Instant> {
        let imp = &self.imp;
        if let Some((enter, mean_len)) = imp.burst {
            // Leave the bad state with probability 1/mean_len per datagram: geometric bursts.
            if self.bad {
                if self.rng.random::<f64>() < 1.0 / mean_len.max(1.0) {
                    self.bad = false;
                }
            } else if self.rng.random::<f64>() < enter {
                self.bad = true;
            }
            if self.bad {
                stats.lost.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        if imp.loss > 0.0 && self.rng.random::<f64>() < imp.loss {
            stats.lost.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut at = now;
        if let Some(kbps) = imp.rate_kbps {
            let start = self.link_free.max(now);
            let wait = start - now;
            if wait.as_secs_f64() * 1000.0 > imp.queue_ms {
                stats.queue_dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let tx = Duration::from_secs_f64(len as f64 * 8.0 / (kbps.max(1) as f64 * 1000.0));
            self.link_free = start + tx;
            at = self.link_free;
        }
        let mut delay = imp.delay_ms;
        if imp.jitter_ms > 0.0 {
            delay += self.rng.random_range(-imp.jitter_ms..=imp.jitter_ms);
        }
        at += Duration::from_secs_f64(delay.max(0.0) / 1000.0);
        if !imp.reorder {
            at = at.max(self.last_departure);
        }
        self.last_departure = self.last_departure.max(at);
        Some(at)
    }
}

struct Shared {
    up: Mutex<Dir>,
    down: Mutex<Dir>,
    /// Until when everything is dropped, both ways (`None`: no blackout).
    blackout_until: Mutex<Option<Instant>>,
    up_stats: DirStats,
    down_stats: DirStats,
}

impl Shared {
    fn blacked_out(&self, now: Instant) -> bool {
        matches!(*self.blackout_until.lock().unwrap(), Some(t) if now < t)
    }
}

/// A running relay. Dropping it (or [`UdpRelay::stop`]) stops forwarding.
pub struct UdpRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

/// A datagram waiting for its departure time; ordered by time, then arrival (stable).
type Pending = Reverse<(Instant, u64, Vec<u8>, SocketAddr)>;

impl UdpRelay {
    /// Starts a relay listening on `listen` (port 0 for any) that forwards to `target`, sending
    /// upstream from sockets bound to `upstream_ip`. `seed` fixes every random choice.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        upstream_ip: IpAddr,
        seed: u64,
    ) -> std::io::Result<UdpRelay> {
        let socket = Arc::new(UdpSocket::bind(listen).await?);
        let addr = socket.local_addr()?;
        let shared = Arc::new(Shared {
            up: Mutex::new(Dir::new(seed)),
            down: Mutex::new(Dir::new(seed ^ 0x9e37_79b9_7f4a_7c15)),
            blackout_until: Mutex::new(None),
            up_stats: DirStats::default(),
            down_stats: DirStats::default(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(run_up(
            socket,
            target,
            upstream_ip,
            shared.clone(),
            stop.clone(),
        ));
        Ok(UdpRelay { addr, shared, stop })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the impairment from the listening side towards the target.
    pub fn set_up(&self, imp: Impairment) {
        self.shared.up.lock().unwrap().imp = imp;
    }

    /// Sets the impairment from the target back towards the listening side.
    pub fn set_down(&self, imp: Impairment) {
        self.shared.down.lock().unwrap().imp = imp;
    }

    /// Sets the same impairment both ways.
    pub fn set_both(&self, imp: Impairment) {
        self.set_up(imp.clone());
        self.set_down(imp);
    }

    /// Drops every datagram, both ways, for `d` from now (replacing any blackout under way).
    pub fn blackout(&self, d: Duration) {
        *self.shared.blackout_until.lock().unwrap() = Some(Instant::now() + d);
    }

    /// Drops every datagram from now until [`UdpRelay::restore`].
    pub fn blackout_forever(&self) {
        self.blackout(Duration::from_secs(365 * 24 * 3600));
    }

    /// Ends a blackout now.
    pub fn restore(&self) {
        *self.shared.blackout_until.lock().unwrap() = None;
    }

    /// Counts towards the target: received, forwarded, lost, blackholed, queue-dropped.
    pub fn up_stats(&self) -> [u64; 5] {
        self.shared.up_stats.snapshot()
    }

    /// Counts back from the target.
    pub fn down_stats(&self) -> [u64; 5] {
        self.shared.down_stats.snapshot()
    }

    /// Stops forwarding; queued datagrams are discarded.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Admits one datagram into a direction's schedule (or drops it).
fn admit(
    shared: &Shared,
    dir: &Mutex<Dir>,
    stats: &DirStats,
    seq: &mut u64,
    heap: &mut BinaryHeap<Pending>,
    data: &[u8],
    to: SocketAddr,
) {
    let now = Instant::now();
    stats.received.fetch_add(1, Ordering::Relaxed);
    if shared.blacked_out(now) {
        stats.blackholed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if let Some(at) = dir.lock().unwrap().schedule(now, data.len(), stats) {
        *seq += 1;
        heap.push(Reverse((at, *seq, data.to_vec(), to)));
    }
}

/// Sends every datagram whose time has come; returns when the next one is due.
fn flush(
    heap: &mut BinaryHeap<Pending>,
    shared: &Shared,
    stats: &DirStats,
    send: impl Fn(&[u8], SocketAddr) -> std::io::Result<usize>,
) -> Option<Instant> {
    let now = Instant::now();
    while let Some(Reverse((at, _, _, _))) = heap.peek() {
        if *at > now {
            return Some(*at);
        }
        let Reverse((_, _, data, to)) = heap.pop().unwrap();
        // A blackout also swallows what was already on the wire.
        if shared.blacked_out(now) {
            stats.blackholed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if send(&data, to).is_ok() {
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
    None
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Listening side → target. Each new source gets an upstream socket and a task for the way back.
async fn run_up(
    socket: Arc<UdpSocket>,
    target: SocketAddr,
    upstream_ip: IpAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut flows: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut heap: BinaryHeap<Pending> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut next: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                if let std::collections::hash_map::Entry::Vacant(flow) = flows.entry(from) {
                    let Ok(up) = UdpSocket::bind(SocketAddr::new(upstream_ip, 0)).await else { continue };
                    if up.connect(target).await.is_err() {
                        continue;
                    }
                    // Regression: `try_send` on a socket the reactor has not polled yet fails
                    // with WouldBlock (tokio knows no readiness before the first event), so the
                    // first datagram of every flow (a QUIC Initial) was dropped and each
                    // handshake through a relay took a 1 s retransmission longer.
                    if up.writable().await.is_err() {
                        continue;
                    }
                    let up = Arc::new(up);
                    tokio::spawn(run_down(up.clone(), socket.clone(), from, shared.clone(), stop.clone()));
                    flow.insert(up);
                }
                // The flow's upstream socket is found again at departure by the source address.
                admit(&shared, &shared.up, &shared.up_stats, &mut seq, &mut heap, &buf[..n], from);
            }
            _ = sleep_until(next) => {}
        }
        next = flush(
            &mut heap,
            &shared,
            &shared.up_stats,
            |data, from| match flows.get(&from) {
                Some(up) => up.try_send(data),
                None => Ok(0),
            },
        );
    }
}

/// Target → listening side, for one flow.
async fn run_down(
    up: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut heap: BinaryHeap<Pending> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut next: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = up.recv(&mut buf) => {
                let Ok(n) = r else { continue };
                admit(&shared, &shared.down, &shared.down_stats, &mut seq, &mut heap, &buf[..n], client);
            }
            _ = sleep_until(next) => {}
        }
        next = flush(&mut heap, &shared, &shared.down_stats, |data, to| {
            socket.try_send_to(data, to)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, task)
    }

    async fn relay_to_echo(seed: u64) -> (UdpRelay, UdpSocket) {
        let (target, _task) = echo().await;
        let relay = UdpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            target,
            "127.0.0.1".parse().unwrap(),
            seed,
        )
        .await
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay.addr()).await.unwrap();
        (relay, client)
    }

    /// Receives until `n` datagrams arrived or nothing came for `quiet`.
    async fn collect(client: &UdpSocket, n: usize, quiet: Duration) -> Vec<u32> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < n {
            match tokio::time::timeout(quiet, client.recv(&mut buf)).await {
                Ok(Ok(len)) if len >= 4 => {
                    got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()))
                }
                _ => break,
            }
        }
        got
    }

    #[tokio::test]
    async fn delay_is_added_each_way() {
        let (relay, client) = relay_to_echo(1).await;
        relay.set_both(Impairment::delay(40.0));
        let t0 = std::time::Instant::now();
        client.send(&7u32.to_be_bytes()).await.unwrap();
        let got = collect(&client, 1, Duration::from_secs(2)).await;
        let rtt = t0.elapsed();
        assert_eq!(got, vec![7]);
        assert!(rtt >= Duration::from_millis(80), "round trip {rtt:?}");
        assert!(rtt < Duration::from_millis(500), "round trip {rtt:?}");
    }

    #[tokio::test]
    async fn loss_is_seeded_and_close_to_the_rate() {
        let mut runs = Vec::new();
        for _ in 0..2 {
            let (relay, client) = relay_to_echo(42).await;
            relay.set_up(Impairment::default().with_loss(0.2));
            for i in 0..1000u32 {
                client.send(&i.to_be_bytes()).await.unwrap();
                // Keep the echo server's receive buffer from overflowing (that would be loss
                // the relay did not choose).
                if i % 50 == 49 {
                    tokio::task::yield_now().await;
                }
            }
            let got = collect(&client, 1000, Duration::from_millis(300)).await;
            let lost = relay.up_stats()[2];
            runs.push((got.len(), lost));
            assert!(
                (150..=250).contains(&lost),
                "lost {lost} of 1000 at p = 0.2"
            );
        }
        assert_eq!(runs[0].1, runs[1].1, "same seed, same losses");
    }

    #[tokio::test]
    async fn jitter_reorders_only_when_asked() {
        for reorder in [false, true] {
            let (relay, client) = relay_to_echo(7).await;
            relay.set_up(Impairment::delay(20.0).with_jitter(20.0, reorder));
            for i in 0..200u32 {
                client.send(&i.to_be_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let got = collect(&client, 200, Duration::from_millis(500)).await;
            assert_eq!(got.len(), 200);
            let inversions = got.windows(2).filter(|w| w[1] < w[0]).count();
            if reorder {
                assert!(inversions > 10, "{inversions} inversions with reordering");
            } else {
                assert_eq!(inversions, 0, "jitter without reordering kept order");
            }
        }
    }

    #[tokio::test]
    async fn a_blackout_drops_everything_then_ends() {
        let (relay, client) = relay_to_echo(3).await;
        relay.blackout(Duration::from_millis(200));
        for i in 0..10u32 {
            client.send(&i.to_be_bytes()).await.unwrap();
        }
        assert!(collect(&client, 1, Duration::from_millis(100))
            .await
            .is_empty());
        tokio::time::sleep(Duration::from_millis(150)).await;
        client.send(&99u32.to_be_bytes()).await.unwrap();
        assert_eq!(collect(&client, 1, Duration::from_secs(1)).await, vec![99]);
        assert_eq!(relay.up_stats()[3], 10);
    }

    #[tokio::test]
    async fn the_rate_limit_queues_then_tail_drops() {
        let (relay, client) = relay_to_echo(5).await;
        // 1000-byte datagrams at 800 kbit/s: 10 ms each; a 50 ms queue holds about 5.
        relay.set_up(Impairment::default().with_rate(800, 50.0));
        let t0 = std::time::Instant::now();
        for i in 0..20u32 {
            let mut d = vec![0u8; 1000];
            d[..4].copy_from_slice(&i.to_be_bytes());
            client.send(&d).await.unwrap();
        }
        let got = collect(&client, 20, Duration::from_millis(300)).await;
        assert!((5..=7).contains(&got.len()), "{} delivered", got.len());
        assert!(relay.up_stats()[4] >= 13);
        assert!(t0.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn bursts_lose_runs_of_datagrams() {
        let (relay, client) = relay_to_echo(11).await;
        relay.set_up(Impairment::default().with_bursts(0.02, 10.0));
        for i in 0..2000u32 {
            client.send(&i.to_be_bytes()).await.unwrap();
            if i % 50 == 49 {
                tokio::task::yield_now().await;
            }
        }
        let got = collect(&client, 2000, Duration::from_millis(300)).await;
        // Gaps in the delivered sequence: fewer, longer runs than independent loss would give.
        let gaps: Vec<u32> = got
            .windows(2)
            .map(|w| w[1] - w[0] - 1)
            .filter(|g| *g > 0)
            .collect();
        let lost: u32 = gaps.iter().sum();
        assert!(lost > 100, "lost {lost}");
        let mean = lost as f64 / gaps.len() as f64;
        assert!(mean > 4.0, "mean burst {mean}");
    }
}
