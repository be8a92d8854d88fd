//! `bench inference-latency`: streamed requests through the gateway (A: client -> gateway ->
//! QUIC -> node simulator) interleaved with the same requests straight to the node's backend
//! (B: the same simulator behind `serve_openai`). TTFT and every inter-token gap are timed at
//! the client; the gateway's cost is A minus B.

use super::client::{chat_body, chat_request, stream_once, Conn, StreamOutcome};
use super::os::{loadavg_1m, CpuMeter};
use super::serve::Sim;
use super::stats::{num, Repeated, Summary};
use super::system::{
    start_gateway, start_nodes, stop_all, verdict, GatewayProc, Liveness, NodesSpec, Placement,
    Table,
};
use bytes::Bytes;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    /// Requests per repeat, half through the gateway and half direct, interleaved.
    #[arg(long, default_value_t = 2000)]
    pub requests: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u32,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 32)]
    pub tokens: u32,
    /// Simulator time to first token.
    #[arg(long, default_value_t = 5)]
    pub ttft_ms: u64,
    /// Simulator token rate.
    #[arg(long, default_value_t = 200.0)]
    pub tokens_per_s: f64,
    /// Independent repeats (spread is reported across them).
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// Unrecorded requests first (connections, caches, allocator).
    #[arg(long, default_value_t = 100)]
    pub warmup: u32,
    #[command(flatten)]
    pub placement: Placement,
}

const PATHS: [&str; 2] = ["gateway", "direct"];

struct Worker {
    conns: [Conn; 2],
}

struct Round {
    /// By path: outcomes of complete responses.
    ok: [Vec<StreamOutcome>; 2],
    failures: Vec<String>,
}

async fn round(
    workers: Vec<Worker>,
    targets: [(SocketAddr, Option<String>); 2],
    bodies: [Bytes; 2],
    requests: u32,
    tokens: u32,
) -> (Vec<Worker>, Round) {
    let next = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for mut w in workers {
        let next = next.clone();
        let bodies = bodies.clone();
        let targets = targets.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok: [Vec<StreamOutcome>; 2] = [Vec::new(), Vec::new()];
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                // Alternating by request number interleaves the two paths across all workers.
                let path = (i % 2) as usize;
                let (addr, key) = &targets[path];
                let req = chat_request(*addr, key.as_deref(), bodies[path].clone());
                let r = tokio::time::timeout(
                    Duration::from_secs(30),
                    stream_once(&mut w.conns[path], req, true, || {}),
                )
                .await;
                let broken = matches!(r, Ok(Err(_)) | Err(_));
                match r {
                    Ok(Ok(o)) if o.complete(tokens) => ok[path].push(o),
                    Ok(Ok(o)) => failures.push(format!("{}: incomplete stream {o:?}", PATHS[path])),
                    Ok(Err(e)) => failures.push(format!("{}: {e:#}", PATHS[path])),
                    Err(_) => failures.push(format!("{}: no answer within 30 s", PATHS[path])),
                }
                if failures.len() > 20 {
                    break;
                }
                if broken {
                    match Conn::h1(*addr).await {
                        Ok(c) => w.conns[path] = c,
                        Err(e) => {
                            failures.push(format!("{}: reconnecting: {e:#}", PATHS[path]));
                            break;
                        }
                    }
                }
            }
            (w, ok, failures)
        }));
    }
    let mut workers = Vec::new();
    let mut out = Round {
        ok: [Vec::new(), Vec::new()],
        failures: Vec::new(),
    };
    for t in tasks {
        match t.await {
            Ok((w, ok, f)) => {
                workers.push(w);
                let [a, b] = ok;
                out.ok[0].extend(a);
                out.ok[1].extend(b);
                out.failures.extend(f);
            }
            Err(e) => out.failures.push(format!("worker task: {e}")),
        }
    }
    (workers, out)
}

fn ttft_ms(v: &[StreamOutcome]) -> Vec<f64> {
    v.iter()
        .filter_map(|o| o.ttft)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect()
}

fn gaps_us(v: &[StreamOutcome]) -> Vec<f64> {
    v.iter()
        .flat_map(|o| o.gaps.iter().map(|d| d.as_secs_f64() * 1e6))
        .collect()
}

pub async fn run(a: LatencyArgs) -> anyhow::Result<()> {
    let sim = Sim {
        ttft_ms: a.ttft_ms,
        tokens_per_s: a.tokens_per_s,
    };
    let p = &a.placement;
    let gw = start_gateway(p, Liveness::default(), 4096)?;
    let nodes = start_nodes(NodesSpec {
        gateway: Some(&gw),
        nodes: 1,
        capacity: (a.concurrency * 4).max(64),
        sim,
        backend: true,
        cpus: p.node_cpus(),
        threads: p.node_threads,
        nofile: 4096,
    })?;
    let backend = nodes
        .backend
        .ok_or_else(|| anyhow::anyhow!("the node process reported no backend address"))?;
    let targets = [(gw.http, Some(gw.api_key.clone())), (backend, None)];
    let body = chat_body(true, a.tokens);
    let run = Measure {
        bench: "inference-latency",
        setup: format!("sim ttft {} ms, {} tokens/s", a.ttft_ms, a.tokens_per_s),
        params: json!({"ttft_ms": a.ttft_ms, "tokens_per_s": a.tokens_per_s}),
        requests: a.requests,
        concurrency: a.concurrency,
        tokens: a.tokens,
        repeats: a.repeats,
        warmup: a.warmup,
        placement: &a.placement,
    };
    let r = measure(run, &gw, targets, [body.clone(), body]).await;
    stop_all(vec![nodes.child, gw.child]).await;
    r
}

/// One interleaved gateway-versus-direct comparison: what to send and how often.
pub(crate) struct Measure<'a> {
    /// The subcommand's name, first in the summary line.
    pub bench: &'static str,
    /// What serves the tokens, for the header line.
    pub setup: String,
    /// Backend parameters for the summary's `params`.
    pub params: serde_json::Value,
    pub requests: u32,
    pub concurrency: u32,
    pub tokens: u32,
    pub repeats: u32,
    pub warmup: u32,
    pub placement: &'a super::system::Placement,
}

/// Runs `a.repeats` rounds of streamed requests, alternating between the gateway
/// (`targets[0]`, `bodies[0]`) and the direct path (`targets[1]`, `bodies[1]`), prints the table
/// and the JSON summary, and fails if any request failed.
pub(crate) async fn measure(
    a: Measure<'_>,
    gw: &GatewayProc,
    targets: [(SocketAddr, Option<String>); 2],
    bodies: [Bytes; 2],
) -> anyhow::Result<()> {
    let load_start = loadavg_1m();
    let p = a.placement;
    let mut workers = Vec::new();
    for _ in 0..a.concurrency.max(1) {
        workers.push(Worker {
            conns: [Conn::h1(targets[0].0).await?, Conn::h1(targets[1].0).await?],
        });
    }
    println!(
        "{}: {} requests x {} repeats, concurrency {}, {} tokens, {}; {}",
        a.bench,
        a.requests,
        a.repeats,
        a.concurrency,
        a.tokens,
        a.setup,
        p.describe()
    );
    let (w, warm) = round(workers, targets.clone(), bodies.clone(), a.warmup, a.tokens).await;
    workers = w;
    if !warm.failures.is_empty() {
        anyhow::bail!(
            "warm-up failed: {:?}",
            &warm.failures[..warm.failures.len().min(5)]
        );
    }

    let mut pooled: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    let mut added = [Vec::new(), Vec::new(), Vec::new(), Vec::new()]; // ttft p50, ttft p99, gap p50, gap p99
    let mut per_path = [
        [Vec::new(), Vec::new(), Vec::new(), Vec::new()],
        [Vec::new(), Vec::new(), Vec::new(), Vec::new()],
    ];
    let mut gw_cpu = Vec::new();
    let mut failures = Vec::new();
    let mut per_repeat = Vec::new();
    for r in 0..a.repeats.max(1) {
        let cpu = CpuMeter::start(gw.child.pid)?;
        let (w, res) = round(
            workers,
            targets.clone(),
            bodies.clone(),
            a.requests,
            a.tokens,
        )
        .await;
        workers = w;
        gw_cpu.push(cpu.percent()?);
        failures.extend(res.failures.iter().cloned());
        let mut s = Vec::new();
        for (path, outcomes) in res.ok.iter().enumerate() {
            let mut t = ttft_ms(outcomes);
            let mut g = gaps_us(outcomes);
            pooled[path].0.extend(&t);
            pooled[path].1.extend(&g);
            let (ts, gs) = (Summary::of(&mut t), Summary::of(&mut g));
            for (k, v) in [ts.p50, ts.p99, gs.p50, gs.p99].into_iter().enumerate() {
                per_path[path][k].push(v);
            }
            s.push((ts, gs));
        }
        for (k, (x, y)) in [
            (s[0].0.p50, s[1].0.p50),
            (s[0].0.p99, s[1].0.p99),
            (s[0].1.p50, s[1].1.p50),
            (s[0].1.p99, s[1].1.p99),
        ]
        .into_iter()
        .enumerate()
        {
            added[k].push(x - y);
        }
        println!(
            "  repeat {}: gateway TTFT p50 {:.3} ms / direct {:.3} ms, gap p50 {:.0} / {:.0} us, {} + {} complete, {} failed, load {:.2}",
            r + 1,
            s[0].0.p50,
            s[1].0.p50,
            s[0].1.p50,
            s[1].1.p50,
            s[0].0.n,
            s[1].0.n,
            res.failures.len(),
            loadavg_1m()
        );
        per_repeat.push(json!({
            "gateway": {"ttft_ms": s[0].0.to_json(), "gap_us": s[0].1.to_json()},
            "direct": {"ttft_ms": s[1].0.to_json(), "gap_us": s[1].1.to_json()},
            "failures": res.failures.len(),
        }));
    }
    let load_end = loadavg_1m();
    let rep = |v: &Vec<f64>| Repeated::new(v.clone());
    let [ref a_fig, ref b_fig] = per_path;
    let added_r: Vec<Repeated> = added.iter().map(rep).collect();
    let mut t = Table::new(&[
        "median over repeats [min .. max]",
        "through gateway",
        "direct",
        "added",
        "target",
        "",
    ]);
    let targets_ms = [Some(0.5), Some(2.0), Some(100.0), None];
    let names = [
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "inter-token p50 (us)",
        "inter-token p99 (us)",
    ];
    for k in 0..4 {
        let digits = if k < 2 { 3 } else { 0 };
        let target = targets_ms[k];
        t.row(vec![
            names[k].into(),
            rep(&a_fig[k]).show(digits),
            rep(&b_fig[k]).show(digits),
            added_r[k].show(digits),
            target.map(|x| format!("<= {x}")).unwrap_or_default(),
            target
                .map(|x| verdict(added_r[k].median() <= x).to_string())
                .unwrap_or_default(),
        ]);
    }
    println!();
    t.print();
    let mut pooled_json = Vec::new();
    for (path, (tt, gg)) in pooled.iter_mut().enumerate() {
        let (ts, gs) = (Summary::of(tt), Summary::of(gg));
        println!(
            "  {:<8} all repeats: TTFT ms p5 {:.3} p50 {:.3} p95 {:.3} p99 {:.3} max {:.3} (n {}); gap us p5 {:.0} p50 {:.0} p95 {:.0} p99 {:.0} (n {})",
            PATHS[path], ts.p5, ts.p50, ts.p95, ts.p99, ts.max, ts.n, gs.p5, gs.p50, gs.p95, gs.p99, gs.n
        );
        pooled_json
            .push(json!({"path": PATHS[path], "ttft_ms": ts.to_json(), "gap_us": gs.to_json()}));
    }
    let gw_cpu = Repeated::new(gw_cpu);
    println!(
        "  gateway CPU {}% of one core; failures {}; load average (1 min) {:.2} -> {:.2}",
        gw_cpu.show(1),
        failures.len(),
        load_start,
        load_end
    );
    for f in failures.iter().take(5) {
        println!("  failure: {f}");
    }
    let summary = json!({
        "bench": a.bench,
        "params": {"requests": a.requests, "concurrency": a.concurrency, "tokens": a.tokens,
                   "backend": a.params, "repeats": a.repeats, "placement": p.describe()},
        "added": {"ttft_p50_ms": added_r[0].to_json(), "ttft_p99_ms": added_r[1].to_json(),
                  "gap_p50_us": added_r[2].to_json(), "gap_p99_us": added_r[3].to_json()},
        "gateway": {"ttft_p50_ms": rep(&a_fig[0]).to_json(), "ttft_p99_ms": rep(&a_fig[1]).to_json(),
                    "gap_p50_us": rep(&a_fig[2]).to_json(), "gap_p99_us": rep(&a_fig[3]).to_json()},
        "direct": {"ttft_p50_ms": rep(&b_fig[0]).to_json(), "ttft_p99_ms": rep(&b_fig[1]).to_json(),
                   "gap_p50_us": rep(&b_fig[2]).to_json(), "gap_p99_us": rep(&b_fig[3]).to_json()},
        "pooled": pooled_json,
        "per_repeat": per_repeat,
        "targets_met": {"ttft_p50": added_r[0].median() <= 0.5, "ttft_p99": added_r[1].median() <= 2.0,
                        "gap_p50": added_r[2].median() <= 100.0},
        "gateway_cpu_percent": gw_cpu.to_json(),
        "failures": failures.len(),
        "loadavg_1m": [num(load_start), num(load_end)],
    });
    println!("{summary}");
    drop(workers);
    if !failures.is_empty() {
        anyhow::bail!("{} requests failed", failures.len());
    }
    Ok(())
}
