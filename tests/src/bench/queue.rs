//! `bench inference-queue`: many more concurrent streams than the node has slots (2,000 against
//! 64 by default), all sent at once through the gateway, which queues what finds no free slot
//! (`inference.queue_max_wait_ms`, `inference.queue_max_depth`). Reports how many completed,
//! how many were refused (429), and the queue wait: each stream's time to first token minus the
//! unqueued time to first token (the median of a few streams sent one at a time first).

use super::client::{chat_body, chat_request, stream_once, Conn};
use super::os::loadavg_1m;
use super::serve::Sim;
use super::stats::{num, Summary};
use super::system::{start_gateway, start_nodes, stop_all, Liveness, NodesSpec, Placement, Table};
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct QueueArgs {
    /// Streams sent at once.
    #[arg(long, default_value_t = 2_000)]
    pub streams: u32,
    /// Inference slots of the one node (its capacity and the model's max_concurrency).
    #[arg(long, default_value_t = 64)]
    pub slots: u32,
    /// Tokens per stream (max_tokens).
    #[arg(long, default_value_t = 10)]
    pub tokens: u32,
    /// Simulator token rate per stream.
    #[arg(long, default_value_t = 100.0)]
    pub tokens_per_s: f64,
    /// Simulator time to first token.
    #[arg(long, default_value_t = 100)]
    pub ttft_ms: u64,
    /// HTTP/2 connections the streams are spread over.
    #[arg(long, default_value_t = 100)]
    pub connections: u32,
    /// Streams sent one at a time first, to measure the unqueued time to first token.
    #[arg(long, default_value_t = 10)]
    pub baseline: u32,
    /// Open-file limit to ask for in every process.
    #[arg(long, default_value_t = 65_536)]
    pub nofile: u64,
    #[command(flatten)]
    pub placement: Placement,
}

pub async fn run(a: QueueArgs) -> anyhow::Result<()> {
    let load_start = loadavg_1m();
    let p = &a.placement;
    let gw = start_gateway(p, Liveness::default(), a.nofile)?;
    let nodes = start_nodes(NodesSpec {
        gateway: Some(&gw),
        nodes: 1,
        capacity: a.slots,
        sim: Sim {
            ttft_ms: a.ttft_ms,
            tokens_per_s: a.tokens_per_s,
        },
        backend: false,
        cpus: p.node_cpus(),
        threads: p.node_threads,
        nofile: a.nofile,
    })?;
    println!(
        "inference-queue: {} streams at once against one node with {} slots, {} tokens at {} tokens/s, sim ttft {} ms, over {} HTTP/2 connections; {}",
        a.streams, a.slots, a.tokens, a.tokens_per_s, a.ttft_ms, a.connections, p.describe()
    );
    let body = chat_body(true, a.tokens);
    let key = gw.api_key.clone();
    // The unqueued time to first token: streams one at a time.
    let mut one = Conn::h2(gw.http).await?;
    let mut base = Vec::new();
    for _ in 0..a.baseline.max(1) {
        let o = stream_once(
            &mut one,
            chat_request(gw.http, Some(&key), body.clone()),
            false,
            || {},
        )
        .await?;
        if !o.complete(a.tokens) {
            anyhow::bail!("baseline stream incomplete: status {}", o.status);
        }
        base.extend(o.ttft.map(|d| d.as_secs_f64() * 1e3));
    }
    let baseline = Summary::of(&mut base);
    let mut conns = Vec::new();
    for _ in 0..a.connections.max(1) {
        conns.push(Conn::h2(gw.http).await?);
    }
    let stream_time = Duration::from_secs_f64(
        a.ttft_ms as f64 / 1e3 + a.tokens as f64 / a.tokens_per_s.max(0.001),
    );
    // Past the gateway's queue wait, a stream must have been answered one way or the other.
    let limit =
        Duration::from_millis(nearpath_config::InferenceConfig::default().queue_max_wait_ms)
            + stream_time * 4
            + Duration::from_secs(30);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(a.streams as usize);
    for i in 0..a.streams {
        let Some(mut conn) = conns[i as usize % conns.len()].share() else {
            anyhow::bail!("streams need HTTP/2 connections");
        };
        let req = chat_request(gw.http, Some(&key), body.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(limit, stream_once(&mut conn, req, false, || {})).await
        }));
    }
    let (mut ok, mut refused, mut other) = (0u32, 0u32, Vec::new());
    let mut waits = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(Ok(o))) if o.complete(a.tokens) => {
                ok += 1;
                if let Some(ttft) = o.ttft {
                    waits.push((ttft.as_secs_f64() * 1e3 - baseline.p50).max(0.0));
                }
            }
            Ok(Ok(Ok(o))) if o.status == 429 => refused += 1,
            Ok(Ok(Ok(o))) => other.push(format!(
                "incomplete: status {} tokens {} done {} error {}",
                o.status, o.tokens, o.done, o.error
            )),
            Ok(Ok(Err(e))) => other.push(format!("{e:#}")),
            Ok(Err(_)) => other.push(format!("not finished within {limit:?}")),
            Err(e) => other.push(format!("task: {e}")),
        }
    }
    let wall = t0.elapsed();
    let wait = Summary::of(&mut waits);
    let rate = ok as f64 / a.streams.max(1) as f64;
    let mut t = Table::new(&["", "through gateway"]);
    t.row(vec![
        "complete streams".into(),
        format!("{ok} / {} ({:.1}%)", a.streams, rate * 100.0),
    ]);
    t.row(vec!["refused (429)".into(), refused.to_string()]);
    t.row(vec!["other failures".into(), other.len().to_string()]);
    t.row(vec![
        "unqueued TTFT p50 (ms)".into(),
        format!("{:.1}", baseline.p50),
    ]);
    t.row(vec![
        "queue wait p50 / p99 / max (ms)".into(),
        format!("{:.0} / {:.0} / {:.0}", wait.p50, wait.p99, wait.max),
    ]);
    t.row(vec![
        "wall (s)".into(),
        format!("{:.1}", wall.as_secs_f64()),
    ]);
    println!();
    t.print();
    for f in other.iter().take(5) {
        println!("  failure: {f}");
    }
    let load_end = loadavg_1m();
    let summary = json!({
        "bench": "inference-queue",
        "params": {"streams": a.streams, "slots": a.slots, "tokens": a.tokens, "tokens_per_s": a.tokens_per_s,
                   "ttft_ms": a.ttft_ms, "connections": a.connections, "placement": p.describe()},
        "complete": ok, "refused": refused, "failed": other.len(),
        "completion_rate": num(rate),
        "unqueued_ttft_ms": baseline.to_json(),
        "queue_wait_ms": wait.to_json(),
        "wall_s": num(wall.as_secs_f64()),
        "loadavg_1m": [num(load_start), num(load_end)],
    });
    println!("{summary}");
    stop_all(vec![nodes.child, gw.child]).await;
    Ok(())
}
