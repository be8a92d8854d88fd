//! `bench inference-streams`: many concurrent SSE streams over HTTP/2 through the gateway, each
//! at a slow token rate, to measure what an open stream costs the gateway in memory and CPU;
//! then the same streams straight to the simulator's own HTTP server for comparison.

use super::client::{chat_body, chat_request, stream_once, Conn};
use super::os::{loadavg_1m, mem_status, CpuMeter, MemStatus};
use super::serve::Sim;
use super::stats::{num, Summary};
use super::system::{
    start_gateway, start_nodes, stop_all, verdict, Liveness, NodesSpec, Placement, Table,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// hyper's HTTP/2 server default for concurrent streams per connection (hyper 1.x,
/// `proto::h2::server::Config::default`); the gateway does not change it.
pub const HYPER_H2_DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Concurrent bidirectional streams a node lets the gateway open on its QUIC connection
/// (`TransportOptions::default().max_concurrent_bidi_streams`).
pub const NODE_QUIC_BIDI_STREAMS: u32 = 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct StreamsArgs {
    /// Streams open at once.
    #[arg(long, default_value_t = 10_000)]
    pub streams: u32,
    /// Simulator token rate per stream.
    #[arg(long, default_value_t = 10.0)]
    pub tokens_per_s: f64,
    /// Tokens per stream (max_tokens).
    #[arg(long, default_value_t = 30)]
    pub tokens: u32,
    /// Simulator time to first token.
    #[arg(long, default_value_t = 100)]
    pub ttft_ms: u64,
    /// HTTP/2 connections the streams are spread over.
    #[arg(long, default_value_t = 100)]
    pub connections: u32,
    /// Concurrent requests each node accepts (capacity and model max_concurrency); at most
    /// the node's QUIC stream limit.
    #[arg(long, default_value_t = 1000)]
    pub per_node: u32,
    /// Streams run to completion before the "before" memory reading.
    #[arg(long, default_value_t = 500)]
    pub warmup_streams: u32,
    /// Skip the direct (no gateway) comparison.
    #[arg(long)]
    pub no_direct: bool,
    /// Heartbeat intervals without a heartbeat before the gateway drops a node (the gateway's
    /// default is 3; a starved node process misses them under this load).
    #[arg(long, default_value_t = 3)]
    pub missed_heartbeats: u32,
    /// Open-file limit to ask for in every process.
    #[arg(long, default_value_t = 65_536)]
    pub nofile: u64,
    #[command(flatten)]
    pub placement: Placement,
}

#[derive(Default)]
struct Samples {
    peak: MemStatus,
    at_max_open: (i64, u64),
}

struct Run {
    ok: u32,
    failures: Vec<String>,
    before: MemStatus,
    peak_rss_kib: u64,
    max_open: i64,
    rss_at_max_open_kib: u64,
    after: MemStatus,
    cpu_percent: f64,
    /// CPU of the other processes involved (node process, this load generator).
    others_cpu: Vec<(&'static str, f64)>,
    wall: Duration,
    ttft_ms: Summary,
    duration_ms: Summary,
    tokens: u64,
}

/// Runs `n` streams over `conns` and returns (complete, failures, ttfts, durations, tokens).
async fn burst(
    conns: &[Conn],
    addr: SocketAddr,
    key: Option<&str>,
    n: u32,
    tokens: u32,
    open: Arc<AtomicI64>,
    limit: Duration,
) -> (u32, Vec<String>, Vec<f64>, Vec<f64>, u64) {
    let body = chat_body(true, tokens);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let Some(mut conn) = conns[i as usize % conns.len()].share() else {
            return (
                0,
                vec!["streams need HTTP/2 connections".into()],
                Vec::new(),
                Vec::new(),
                0,
            );
        };
        let req = chat_request(addr, key, body.clone());
        let open = open.clone();
        tasks.push(tokio::spawn(async move {
            let mut opened = false;
            let r = tokio::time::timeout(
                limit,
                stream_once(&mut conn, req, false, || {
                    opened = true;
                    open.fetch_add(1, Ordering::Relaxed);
                }),
            )
            .await;
            if opened {
                open.fetch_sub(1, Ordering::Relaxed);
            }
            r
        }));
    }
    let (mut ok, mut failures, mut ttft, mut dur, mut toks) =
        (0, Vec::new(), Vec::new(), Vec::new(), 0u64);
    for t in tasks {
        match t.await {
            Ok(Ok(Ok(o))) => {
                toks += o.tokens as u64;
                if o.complete(tokens) {
                    ok += 1;
                    ttft.extend(o.ttft.map(|d| d.as_secs_f64() * 1e3));
                    dur.push(o.total.as_secs_f64() * 1e3);
                } else if failures.len() < 10 {
                    failures.push(format!(
                        "incomplete: status {} tokens {} done {} error {}",
                        o.status, o.tokens, o.done, o.error
                    ));
                } else {
                    failures.push(String::new());
                }
            }
            Ok(Ok(Err(e))) => failures.push(format!("{e:#}")),
            Ok(Err(_)) => failures.push(format!("not finished within {limit:?}")),
            Err(e) => failures.push(format!("task: {e}")),
        }
    }
    (ok, failures, ttft, dur, toks)
}

async fn run_path(
    server_pid: u32,
    others: &[(&'static str, u32)],
    addr: SocketAddr,
    key: Option<&str>,
    a: &StreamsArgs,
) -> anyhow::Result<Run> {
    let mut conns = Vec::new();
    for _ in 0..a.connections.max(1) {
        conns.push(Conn::h2(addr).await?);
    }
    let stream_time = Duration::from_secs_f64(
        a.ttft_ms as f64 / 1e3 + a.tokens as f64 / a.tokens_per_s.max(0.001),
    );
    let limit = stream_time * 4 + Duration::from_secs(60);
    let open = Arc::new(AtomicI64::new(0));
    if a.warmup_streams > 0 {
        let (ok, failures, ..) = burst(
            &conns,
            addr,
            key,
            a.warmup_streams,
            a.tokens,
            open.clone(),
            limit,
        )
        .await;
        if ok < a.warmup_streams {
            anyhow::bail!(
                "warm-up: {} of {} streams failed: {:?}",
                failures.len(),
                a.warmup_streams,
                &failures[..failures.len().min(3)]
            );
        }
    }
    // Let the server drop what the warm-up left (finished tasks, closed QUIC streams).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = mem_status(server_pid)?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, open) = (stop.clone(), open.clone());
        tokio::spawn(async move {
            let mut s = Samples::default();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(m) = mem_status(server_pid) {
                    let o = open.load(Ordering::Relaxed);
                    if m.rss_kib > s.peak.rss_kib {
                        s.peak = m;
                    }
                    if o > s.at_max_open.0 {
                        s.at_max_open = (o, m.rss_kib);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            s
        })
    };
    let cpu = CpuMeter::start(server_pid)?;
    let other_meters = others
        .iter()
        .map(|(n, pid)| Ok((*n, CpuMeter::start(*pid)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let (ok, failures, mut ttft, mut dur, tokens) =
        burst(&conns, addr, key, a.streams, a.tokens, open.clone(), limit).await;
    let wall = t0.elapsed();
    let cpu_percent = cpu.percent()?;
    let others_cpu = other_meters
        .iter()
        .map(|(n, m)| Ok((*n, m.percent()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await?;
    let after = mem_status(server_pid)?;
    Ok(Run {
        ok,
        failures: failures.into_iter().filter(|f| !f.is_empty()).collect(),
        before,
        peak_rss_kib: samples.peak.rss_kib.max(before.rss_kib),
        max_open: samples.at_max_open.0,
        rss_at_max_open_kib: samples.at_max_open.1,
        after,
        cpu_percent,
        others_cpu,
        wall,
        ttft_ms: Summary::of(&mut ttft),
        duration_ms: Summary::of(&mut dur),
        tokens,
    })
}

fn per_stream_kib(r: &Run, streams: u32) -> f64 {
    (r.peak_rss_kib as f64 - r.before.rss_kib as f64) / streams.max(1) as f64
}

/// The same delta over the streams that were really open at once (the ramp can be slower than
/// a stream's life on a loaded machine, so fewer than all may overlap).
fn per_open_stream_kib(r: &Run) -> f64 {
    (r.peak_rss_kib as f64 - r.before.rss_kib as f64) / r.max_open.max(1) as f64
}

fn run_json(r: &Run, streams: u32) -> Value {
    json!({
        "complete": r.ok, "failed": r.failures.len(), "max_open_at_once": r.max_open,
        "rss_before_kib": r.before.rss_kib, "rss_peak_kib": r.peak_rss_kib, "rss_at_max_open_kib": r.rss_at_max_open_kib,
        "rss_after_kib": r.after.rss_kib, "hwm_kib": r.after.hwm_kib, "threads": r.after.threads,
        "per_stream_kib": num(per_stream_kib(r, streams)), "per_open_stream_kib": num(per_open_stream_kib(r)),
        "cpu_percent": num(r.cpu_percent),
        "others_cpu_percent": r.others_cpu.iter().map(|(n, c)| json!({"process": n, "cpu_percent": num(*c)})).collect::<Vec<_>>(),
        "wall_s": num(r.wall.as_secs_f64()), "tokens": r.tokens,
        "tokens_per_s": num(r.tokens as f64 / r.wall.as_secs_f64()),
        "ttft_ms": r.ttft_ms.to_json(), "stream_ms": r.duration_ms.to_json(),
    })
}

pub async fn run(a: StreamsArgs) -> anyhow::Result<()> {
    let load_start = loadavg_1m();
    let p = &a.placement;
    let sim = Sim {
        ttft_ms: a.ttft_ms,
        tokens_per_s: a.tokens_per_s,
    };
    if a.per_node > NODE_QUIC_BIDI_STREAMS {
        eprintln!(
            "warning: --per-node {} exceeds the node's QUIC limit of {} concurrent streams; the gateway will wait for stream credit",
            a.per_node, NODE_QUIC_BIDI_STREAMS
        );
    }
    // 10% headroom so that uneven routing never finds every node full.
    let nodes_n = ((a.streams as f64 * 1.1) / a.per_node.max(1) as f64)
        .ceil()
        .max(1.0) as u32;
    let gw = start_gateway(
        p,
        Liveness {
            missed_before_gone: a.missed_heartbeats,
            ..Liveness::default()
        },
        a.nofile,
    )?;
    let nodes = start_nodes(NodesSpec {
        gateway: Some(&gw),
        nodes: nodes_n,
        capacity: a.per_node,
        sim,
        backend: false,
        cpus: p.node_cpus(),
        threads: p.node_threads,
        nofile: a.nofile,
    })?;
    let per_conn = a.streams.div_ceil(a.connections.max(1));
    println!(
        "inference-streams: {} streams over {} HTTP/2 connections ({} per connection; hyper's server default allows {}), {} tokens at {} tokens/s each, sim ttft {} ms",
        a.streams, a.connections, per_conn, HYPER_H2_DEFAULT_MAX_CONCURRENT_STREAMS, a.tokens, a.tokens_per_s, a.ttft_ms
    );
    println!(
        "  {} nodes x {} concurrent requests (node QUIC limit {} streams per connection); open-file limit gateway {}, nodes {}; {}",
        nodes_n, a.per_node, NODE_QUIC_BIDI_STREAMS, gw.child.info["nofile"], nodes.child.info["nofile"], p.describe()
    );
    if per_conn > HYPER_H2_DEFAULT_MAX_CONCURRENT_STREAMS {
        eprintln!("warning: {per_conn} streams per connection exceed the server's limit; the excess queue in the client");
    }
    let me = std::process::id();
    let through = run_path(
        gw.child.pid,
        &[("node process", nodes.child.pid), ("load generator", me)],
        gw.http,
        Some(&gw.api_key),
        &a,
    )
    .await?;
    println!(
        "  gateway: {} of {} complete in {:.1} s, at most {} open at once, load {:.2}",
        through.ok,
        a.streams,
        through.wall.as_secs_f64(),
        through.max_open,
        loadavg_1m()
    );
    let mut children = vec![nodes.child, gw.child];
    let direct = if a.no_direct {
        None
    } else {
        let d = start_nodes(NodesSpec {
            gateway: None,
            nodes: 0,
            capacity: a.streams + a.warmup_streams + 100,
            sim,
            backend: true,
            cpus: p.gateway_cpus(),
            threads: p.gateway_threads,
            nofile: a.nofile,
        })?;
        let addr = d
            .backend
            .ok_or_else(|| anyhow::anyhow!("the direct process reported no backend address"))?;
        let r = run_path(d.child.pid, &[("load generator", me)], addr, None, &a).await?;
        println!(
            "  direct:  {} of {} complete in {:.1} s, at most {} open at once, load {:.2}",
            r.ok,
            a.streams,
            r.wall.as_secs_f64(),
            r.max_open,
            loadavg_1m()
        );
        children.push(d.child);
        Some(r)
    };
    let load_end = loadavg_1m();
    let mut t = Table::new(&["", "through gateway", "direct (server's own memory)"]);
    let both = |f: &dyn Fn(&Run) -> String| -> Vec<String> {
        vec![
            f(&through),
            direct.as_ref().map(f).unwrap_or_else(|| "-".into()),
        ]
    };
    let mut row = |name: &str, f: &dyn Fn(&Run) -> String| {
        let mut cells = vec![name.to_string()];
        cells.extend(both(f));
        t.row(cells);
    };
    row("complete streams", &|r| format!("{} / {}", r.ok, a.streams));
    row("max open at once", &|r| r.max_open.to_string());
    row("server RSS before (MiB)", &|r| {
        format!("{:.1}", r.before.rss_kib as f64 / 1024.0)
    });
    row("server RSS peak (MiB)", &|r| {
        format!("{:.1}", r.peak_rss_kib as f64 / 1024.0)
    });
    row("server RSS after (MiB)", &|r| {
        format!("{:.1}", r.after.rss_kib as f64 / 1024.0)
    });
    row("memory per stream (KiB)", &|r| {
        format!("{:.1}", per_stream_kib(r, a.streams))
    });
    row("  per stream open at the peak (KiB)", &|r| {
        format!("{:.1}", per_open_stream_kib(r))
    });
    row("server CPU (% of one core)", &|r| {
        format!("{:.0}", r.cpu_percent)
    });
    row("other CPU (%)", &|r| {
        r.others_cpu
            .iter()
            .map(|(n, c)| format!("{n} {c:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    row("tokens/s delivered", &|r| {
        format!("{:.0}", r.tokens as f64 / r.wall.as_secs_f64())
    });
    row("TTFT p50 / p99 (ms)", &|r| {
        format!("{:.1} / {:.1}", r.ttft_ms.p50, r.ttft_ms.p99)
    });
    row("stream time p50 / p99 (ms)", &|r| {
        format!("{:.0} / {:.0}", r.duration_ms.p50, r.duration_ms.p99)
    });
    println!();
    t.print();
    // Judged on the streams really open at once, the conservative reading.
    let per = per_open_stream_kib(&through);
    let all = through.ok == a.streams && direct.as_ref().is_none_or(|d| d.ok == a.streams);
    println!(
        "  target <= 32 KiB per open stream through the gateway: {} ({per:.1} KiB); all streams complete: {}; load average (1 min) {:.2} -> {:.2}",
        verdict(per <= 32.0),
        all,
        load_start,
        load_end
    );
    for f in through
        .failures
        .iter()
        .chain(direct.iter().flat_map(|d| d.failures.iter()))
        .take(5)
    {
        println!("  failure: {f}");
    }
    let summary = json!({
        "bench": "inference-streams",
        "params": {"streams": a.streams, "connections": a.connections, "tokens": a.tokens, "tokens_per_s": a.tokens_per_s,
                   "ttft_ms": a.ttft_ms, "nodes": nodes_n, "per_node": a.per_node, "missed_heartbeats": a.missed_heartbeats,
                   "h2_max_concurrent_streams_default": HYPER_H2_DEFAULT_MAX_CONCURRENT_STREAMS,
                   "node_quic_bidi_streams": NODE_QUIC_BIDI_STREAMS, "placement": p.describe()},
        "gateway": run_json(&through, a.streams),
        "direct": direct.as_ref().map(|d| run_json(d, a.streams)),
        "target_met": per <= 32.0,
        "all_complete": all,
        "loadavg_1m": [num(load_start), num(load_end)],
    });
    println!("{summary}");
    stop_all(children).await;
    if !all {
        anyhow::bail!("not every stream completed with {} tokens", a.tokens);
    }
    Ok(())
}
