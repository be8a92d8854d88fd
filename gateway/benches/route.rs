//! Router benchmark: `route()` over 10,000 registered nodes, indexed vs exhaustive scans.
//!
//! Run: `cargo bench -p nearpath-gateway --bench route` (pin with `taskset -c N` for one core).
//! Before the criterion groups it prints per-call percentiles (criterion reports means and
//! medians, not p99): each call is timed on its own with `Instant`, which adds ~20-40 ns.

use criterion::Criterion;
use nearpath_gateway::router::{
    Deny, LatLon, NodeId, NodeRouteInfo, NodeState, RouteOutcome, RouteParams, RouterIndex,
    Workload,
};
use nearpath_geo::Coords;
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
    nearpath_geo::distance_km(Coords { lat: a.0, lon: a.1 }, Coords { lat: b.0, lon: b.1 })
}

fn build(rtt: GatewayRtt) -> (RouterIndex, Vec<NodeRouteInfo>) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut index = match RouterIndex::new(RouteParams::default()) {
        Ok(index) => index,
        Err(e) => panic!("default params rejected: {e}"),
    };
    let mut infos = Vec::new();
    for id in 0..NODES {
        let (lat, lon) = (
            rng.random_range(-50.0..70.0),
            rng.random_range(-180.0..180.0),
        );
        let mut games = vec![ALL_NAME.to_string()];
        games.extend(
            GAMES
                .iter()
                .filter(|_| rng.random_bool(0.5))
                .map(|s| s.to_string()),
        );
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
                penalty_events_recent: if rng.random_bool(0.1) {
                    rng.random_range(1..=3)
                } else {
                    0
                },
                operator_flagged: rng.random_bool(0.01),
                check_penalty_ms: 0.0,
            },
        };
        index.upsert(NodeId(id), info.clone());
        infos.push(info);
    }
    (index, infos)
}

/// The textbook baseline: every node, a trigonometric haversine each, the full score, top 3.
fn naive(infos: &[NodeRouteInfo], client: Option<LatLon>) -> Vec<(f64, usize)> {
    let p = RouteParams::default();
    let mut top: Vec<(f64, usize)> = Vec::with_capacity(4);
    for (i, n) in infos.iter().enumerate() {
        let s = &n.state;
        if s.draining || s.game_slots_free == 0 || !n.games.iter().any(|g| g == ALL_NAME) {
            continue;
        }
        let est = match (client, n.location) {
            (Some(c), Some(l)) => {
                haversine_km((c.lat(), c.lon()), (l.lat(), l.lon())) / p.km_per_ms * p.path_stretch
            }
            (Some(_), None) => p.unknown_location_rtt_ms,
            (None, _) => 0.0,
        };
        let flagged = if s.operator_flagged {
            p.suspended_penalty_ms
        } else {
            0.0
        };
        let score = est
            + s.gateway_rtt_ms
            + p.load_penalty_ms * f64::from(s.load)
            + p.reliability_penalty_ms * f64::from(s.penalty_events_recent)
            + flagged;
        if top.len() < p.max_candidates || score < top[top.len() - 1].0 {
            let pos = top.iter().position(|t| score < t.0).unwrap_or(top.len());
            top.insert(pos, (score, i));
            top.truncate(p.max_candidates);
        }
    }
    top
}

const ALL_NAME: &str = "arena";

fn clients(n: usize, unknown: bool) -> Vec<Option<LatLon>> {
    let mut rng = StdRng::seed_from_u64(2);
    (0..n)
        .map(|_| {
            if unknown {
                None
            } else {
                LatLon::new(
                    rng.random_range(-50.0..70.0),
                    rng.random_range(-180.0..180.0),
                )
                .ok()
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

/// Times `f` once per client; `f` returns how many nodes it scored.
fn percentiles(
    label: &str,
    clients: &[Option<LatLon>],
    mut f: impl FnMut(Option<LatLon>) -> usize,
) -> Percentiles {
    // Warm caches and branch predictors on the same inputs first.
    for &c in clients.iter().take(clients.len() / 10) {
        black_box(f(c));
    }
    let mut times = Vec::with_capacity(clients.len());
    let mut examined = 0usize;
    for &c in clients {
        let start = Instant::now();
        let scored = black_box(f(black_box(c)));
        times.push(start.elapsed());
        examined += scored;
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
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn percentile_report() {
    println!("route() over {NODES} nodes, max_candidates=3, per-call timings:");
    for rtt in [GatewayRtt::Random, GatewayRtt::FromFrankfurt] {
        let (index, infos) = build(rtt);
        for unknown in [false, true] {
            let who = if unknown {
                "unknown client"
            } else {
                "random clients"
            };
            let fast = percentiles(
                &format!("indexed {rtt:?}, {who}"),
                &clients(20_000, unknown),
                |c| indexed(&index, c).examined,
            );
            let slow = percentiles(
                &format!("linear  {rtt:?}, {who}"),
                &clients(1_000, unknown),
                |c| linear(&index, c).examined,
            );
            let naive = percentiles(
                &format!("naive   {rtt:?}, {who}"),
                &clients(1_000, unknown),
                |c| {
                    black_box(naive(&infos, c));
                    infos.len()
                },
            );
            let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
            println!(
                "  -> linear/indexed p50 x{:.0}, p99 x{:.0}; naive/indexed p50 x{:.0}, p99 x{:.0}",
                ratio(slow.p50, fast.p50),
                ratio(slow.p99, fast.p99),
                ratio(naive.p50, fast.p50),
                ratio(naive.p99, fast.p99),
            );
        }
    }
}

fn criterion_benches(c: &mut Criterion) {
    let (index, infos) = build(GatewayRtt::Random);
    let clients = clients(4096, false);
    let mut group = c.benchmark_group("route_10k");
    for (name, f) in [
        ("indexed", indexed as RouteFn),
        ("linear", linear as RouteFn),
    ] {
        group.bench_function(name, |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % clients.len();
                black_box(f(&index, black_box(clients[i])))
            })
        });
    }
    group.bench_function("naive", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % clients.len();
            black_box(naive(&infos, black_box(clients[i])))
        })
    });
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
