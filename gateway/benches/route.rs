//! Router benchmark: `route()` over 10,000 registered nodes, indexed vs exhaustive scan.
//!
//! Run: `cargo bench -p nearpath-gateway --bench route` (pin with `taskset -c N` for one core).
//! Before the criterion groups it prints per-call percentiles (criterion reports means and
//! medians, not p99): each call is timed on its own with `Instant`, which adds ~20-40 ns.

use criterion::Criterion;
use nearpath_gateway::router::{
    Deny, LatLon, NodeId, NodeRouteInfo, NodeState, RouteOutcome, RouteParams, RouterIndex,
    Workload,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::time::{Duration, Instant};

const NODES: u64 = 10_000;
/// Every node serves this title, so a route for it ranks all 10,000 nodes.
const ALL: Workload<'static> = Workload::Game("arena");
const GAMES: [&str; 4] = ["doom", "quake", "tetris", "myst"];
const MODELS: [&str; 2] = ["llama-3-8b", "qwen-2-7b"];

#[derive(Clone, Copy, Debug)]
enum GatewayRtt {
    /// Uniform 1..30 ms, independent of where the node is.
    Random,
    /// The node's distance from a gateway in Frankfurt (at 100 km/ms, x1.5) plus 0..5 ms: the
    /// search cannot prune far nodes by gateway RTT alone, the hardest realistic layout.
    FromFrankfurt,
}

fn haversine_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (p1, p2) = (a.0.to_radians(), b.0.to_radians());
    let (dp, dl) = (p2 - p1, (b.1 - a.1).to_radians());
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0088 * h.sqrt().min(1.0).asin()
}

fn build(rtt: GatewayRtt) -> RouterIndex {
    let mut rng = StdRng::seed_from_u64(1);
    let mut index = match RouterIndex::new(RouteParams::default()) {
        Ok(index) => index,
        Err(e) => panic!("default params rejected: {e}"),
    };
    for id in 0..NODES {
        let (lat, lon) = (rng.random_range(-50.0..70.0), rng.random_range(-180.0..180.0));
        let mut games = vec![ALL_NAME.to_string()];
        games.extend(GAMES.iter().filter(|_| rng.random_bool(0.5)).map(|s| s.to_string()));
        let gateway_rtt_ms = match rtt {
            GatewayRtt::Random => rng.random_range(1.0..30.0),
            GatewayRtt::FromFrankfurt => {
                haversine_km((50.11, 8.68), (lat, lon)) / 100.0 * 1.5 + rng.random_range(0.0..5.0)
            }
        };
        let info = NodeRouteInfo {
            location: LatLon::new(lat, lon).ok(),
            games,
            models: vec![MODELS[rng.random_range(0..MODELS.len())].to_string()],
            state: NodeState {
                game_slots_free: rng.random_range(0..=4),
                inference_free: rng.random_range(0..=8),
                load: rng.random_range(0.0..1.0),
                draining: rng.random_bool(0.03),
                gateway_rtt_ms,
                penalty_events_recent: if rng.random_bool(0.1) { rng.random_range(1..=3) } else { 0 },
                operator_flagged: rng.random_bool(0.01),
            },
        };
        index.upsert(NodeId(id), info);
    }
    index
}

const ALL_NAME: &str = "arena";

fn clients(n: usize, unknown: bool) -> Vec<Option<LatLon>> {
    let mut rng = StdRng::seed_from_u64(2);
    (0..n)
        .map(|_| {
            if unknown {
                None
            } else {
                LatLon::new(rng.random_range(-50.0..70.0), rng.random_range(-180.0..180.0)).ok()
            }
        })
        .collect()
}

fn allow(_: NodeId) -> Result<(), Deny> {
    Ok(())
}

type RouteFn = fn(&RouterIndex, Option<LatLon>) -> RouteOutcome;

fn indexed(index: &RouterIndex, client: Option<LatLon>) -> RouteOutcome {
    index.route(client, ALL, allow)
}

fn linear(index: &RouterIndex, client: Option<LatLon>) -> RouteOutcome {
    index.route_linear(client, ALL, allow)
}

struct Percentiles {
    p50: Duration,
    p99: Duration,
}

fn percentiles(label: &str, index: &RouterIndex, clients: &[Option<LatLon>], f: RouteFn) -> Percentiles {
    // Warm caches and branch predictors on the same inputs first.
    for &c in clients.iter().take(clients.len() / 10) {
        black_box(f(index, c));
    }
    let mut times = Vec::with_capacity(clients.len());
    let mut examined = 0usize;
    for &c in clients {
        let start = Instant::now();
        let out = black_box(f(index, black_box(c)));
        times.push(start.elapsed());
        examined += out.examined;
    }
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "{label:<44} n={:<6} p50 {:>9.2?}  p90 {:>9.2?}  p99 {:>9.2?}  p99.9 {:>9.2?}  max {:>9.2?}  examined/route {:.0}",
        times.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        at(1.0),
        examined as f64 / clients.len() as f64,
    );
    Percentiles { p50: at(0.5), p99: at(0.99) }
}

fn percentile_report() {
    println!("route() over {NODES} nodes, max_candidates=3, per-call timings:");
    for rtt in [GatewayRtt::Random, GatewayRtt::FromFrankfurt] {
        let index = build(rtt);
        for unknown in [false, true] {
            let who = if unknown { "unknown client" } else { "random clients" };
            let fast = percentiles(
                &format!("indexed {rtt:?}, {who}"),
                &index,
                &clients(20_000, unknown),
                indexed,
            );
            let slow = percentiles(
                &format!("linear  {rtt:?}, {who}"),
                &index,
                &clients(1_000, unknown),
                linear,
            );
            println!(
                "  -> linear/indexed: p50 x{:.0}, p99 x{:.0}",
                slow.p50.as_secs_f64() / fast.p50.as_secs_f64(),
                slow.p99.as_secs_f64() / fast.p99.as_secs_f64()
            );
        }
    }
}

fn criterion_benches(c: &mut Criterion) {
    let index = build(GatewayRtt::Random);
    let clients = clients(4096, false);
    let mut group = c.benchmark_group("route_10k");
    for (name, f) in [("indexed", indexed as RouteFn), ("linear", linear as RouteFn)] {
        group.bench_function(name, |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % clients.len();
                black_box(f(&index, black_box(clients[i])))
            })
        });
    }
    group.finish();
}

fn main() {
    // `cargo test --benches` runs bench targets without `--bench`: keep that quick.
    if std::env::args().any(|a| a == "--bench") {
        percentile_report();
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
}
