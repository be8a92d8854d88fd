//! `bench nodes-register`: many nodes registering at once against one gateway process, spoken
//! by hand from this process (one QUIC endpoint, one connection and control stream per node),
//! then heartbeating; measures how long admission takes and what an idle node costs the gateway.

use super::client::admin_get;
use super::os::{loadavg_1m, mem_status, CpuMeter, MemStatus};
use super::stats::{num, Summary};
use super::system::{start_gateway, stop_all, verdict, Liveness, Placement, Table};
use anyhow::{anyhow, Context};
use nearpath_protocol::tls::{client_config, parse_sha256_hex, ServerVerify};
use nearpath_protocol::ALPN_NODE;
use nearpath_tests::fake_node::{
    heartbeat_loop, FakeNode, FakeNodeError, HeartbeatCount, Registration,
};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct RegisterArgs {
    /// Nodes registering at once.
    #[arg(long, default_value_t = 1000)]
    pub nodes: u32,
    /// Heartbeat interval the gateway asks for.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// Nodes registered and disconnected first, so the "0 nodes" reading is of a warm gateway.
    #[arg(long, default_value_t = 20)]
    pub warmup_nodes: u32,
    /// Seconds to idle before each memory reading (tokio retires idle blocking-pool threads
    /// after 10 s; the registration burst starts some for the store).
    #[arg(long, default_value_t = 12.0)]
    pub settle_seconds: f64,
    #[command(flatten)]
    pub placement: Placement,
}

/// Counters the raw nodes update.
#[derive(Default)]
struct Counters {
    registered: AtomicU32,
    rejected: AtomicU32,
    failed: AtomicU32,
    /// Heartbeats sent and acks read, over all nodes.
    heartbeats: Arc<HeartbeatCount>,
    /// Microseconds from the burst's start to each node's `Registered`.
    registered_at_us: Mutex<Vec<f64>>,
    /// Microseconds from the burst's start to each node's completed QUIC handshake.
    handshake_at_us: Mutex<Vec<f64>>,
    errors: Mutex<Vec<String>>,
}

impl Counters {
    fn error(&self, e: String) {
        let mut v = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < 10 {
            v.push(e);
        }
    }
}

struct Fleet {
    endpoint: quinn::Endpoint,
    quic: SocketAddr,
    token: String,
}

/// One node: connect, register, heartbeat until `stop`, then close the connection.
async fn raw_node(
    fleet: Arc<Fleet>,
    id: String,
    t0: Instant,
    stop: CancellationToken,
    c: Arc<Counters>,
) {
    let r = async {
        let conn = fleet
            .endpoint
            .connect(fleet.quic, "localhost")
            .context("connect")?
            .await
            .context("handshake")?;
        let at = t0.elapsed().as_secs_f64() * 1e6;
        c.handshake_at_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(at);
        let reg = Registration::new(&id, &fleet.token).models(&[super::serve::MODEL], 4);
        let node = FakeNode::try_register_on(
            fleet.endpoint.clone(),
            conn,
            reg.message(),
            Duration::from_secs(60),
        )
        .await
        .context("registering")?;
        let heartbeat_ms = match node.registered() {
            Ok(ms) => {
                let at = t0.elapsed().as_secs_f64() * 1e6;
                c.registered_at_us
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(at);
                c.registered.fetch_add(1, Ordering::Relaxed);
                ms
            }
            Err(e) => {
                if let FakeNodeError::Rejected { .. } = e {
                    c.rejected.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e.into());
            }
        };
        let (conn, tx, rx) = node.into_parts();
        // Heartbeats run on a timer and acks are read apart from it (see `heartbeat_loop`).
        let sent = heartbeat_loop(
            tx,
            rx,
            Duration::from_millis(heartbeat_ms.max(1)),
            stop,
            c.heartbeats.clone(),
        )
        .await;
        sent.context("sending Heartbeat")?;
        conn.close(0u32.into(), b"benchmark done");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = r {
        c.failed.fetch_add(1, Ordering::Relaxed);
        c.error(format!("{id}: {e:#}"));
    }
}

async fn node_count(admin: SocketAddr, token: &str) -> anyhow::Result<usize> {
    let v = admin_get(admin, "/admin/nodes", token).await?;
    v["data"]
        .as_array()
        .map(Vec::len)
        .ok_or_else(|| anyhow!("/admin/nodes has no data array: {v}"))
}

/// Polls (bounded) until the admin API lists `want` nodes.
async fn wait_count(
    admin: SocketAddr,
    token: &str,
    want: usize,
    within: Duration,
) -> anyhow::Result<usize> {
    let until = Instant::now() + within;
    loop {
        let n = node_count(admin, token).await?;
        if n == want || Instant::now() >= until {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Burst {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    counters: Arc<Counters>,
    t0: Instant,
}

fn start_burst(fleet: &Arc<Fleet>, prefix: &str, n: u32) -> Burst {
    let stop = CancellationToken::new();
    let counters = Arc::new(Counters::default());
    let t0 = Instant::now();
    let tasks = (0..n)
        .map(|i| {
            tokio::spawn(raw_node(
                fleet.clone(),
                format!("{prefix}-{i}"),
                t0,
                stop.clone(),
                counters.clone(),
            ))
        })
        .collect();
    Burst {
        stop,
        tasks,
        counters,
        t0,
    }
}

impl Burst {
    /// Waits (bounded) until every node has registered or failed.
    async fn admitted(&self, n: u32, within: Duration) -> Duration {
        let until = self.t0 + within;
        loop {
            let c = &self.counters;
            let done = c.registered.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed);
            if done >= n || Instant::now() >= until {
                return self.t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn end(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// A command to a child, answered synchronously (off the async worker while it waits).
fn ask(child: &mut super::child::Child, command: &str) -> anyhow::Result<serde_json::Value> {
    tokio::task::block_in_place(|| child.ask(command))
}

fn mib(k: u64) -> String {
    format!("{:.1}", k as f64 / 1024.0)
}

pub async fn run(a: RegisterArgs) -> anyhow::Result<()> {
    let load_start = loadavg_1m();
    let p = &a.placement;
    let mut gw = start_gateway(
        p,
        Liveness {
            heartbeat_ms: a.heartbeat_ms,
            ..Liveness::default()
        },
        65_536,
    )?;
    let pid = gw.child.pid;
    let cold = mem_status(pid)?;
    let cfg = client_config(
        ServerVerify::PinnedSha256(parse_sha256_hex(&gw.sha256)?),
        &[ALPN_NODE],
    )?;
    let (endpoint, buffer) =
        nearpath_protocol::net::client_endpoint("127.0.0.1:0".parse()?, cfg, 8 << 20)?;
    let fleet = Arc::new(Fleet {
        endpoint,
        quic: gw.quic,
        token: gw.token.clone(),
    });
    println!(
        "nodes-register: {} nodes at once from one QUIC endpoint (receive buffer {} B granted of {} asked), heartbeat {} ms; {}",
        a.nodes,
        buffer.effective,
        buffer.requested,
        a.heartbeat_ms,
        p.describe()
    );
    let settle = Duration::from_secs_f64(a.settle_seconds);
    if a.warmup_nodes > 0 {
        let warm = start_burst(&fleet, "warm", a.warmup_nodes);
        warm.admitted(a.warmup_nodes, Duration::from_secs(60)).await;
        let n = warm.counters.registered.load(Ordering::Relaxed);
        warm.end().await;
        if n < a.warmup_nodes {
            anyhow::bail!("warm-up: only {n} of {} nodes registered", a.warmup_nodes);
        }
        let left = wait_count(gw.admin, &gw.admin_token, 0, Duration::from_secs(30)).await?;
        if left != 0 {
            anyhow::bail!("warm-up nodes still listed after 30 s: {left}");
        }
    }
    tokio::time::sleep(settle).await;
    let zero = mem_status(pid)?;
    let heap0 = ask(&mut gw.child, "heap")?;

    let cpu = CpuMeter::start(pid)?;
    let own_cpu = CpuMeter::start(std::process::id())?;
    let burst = start_burst(&fleet, "node", a.nodes);
    let took = burst.admitted(a.nodes, Duration::from_secs(120)).await;
    let burst_cpu = cpu.percent()?;
    let own_burst_cpu = own_cpu.percent()?;
    let c = burst.counters.clone();
    let registered = c.registered.load(Ordering::Relaxed);
    let mut at = c
        .registered_at_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let at = Summary::of(&mut at);
    let mut hs = c
        .handshake_at_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let hs = Summary::of(&mut hs);
    let just_after = mem_status(pid)?;
    let listed = node_count(gw.admin, &gw.admin_token).await?;
    println!(
        "  {registered} of {} registered ({} rejected, {} failed) in {:.0} ms; admin API lists {listed}; load {:.2}",
        a.nodes,
        c.rejected.load(Ordering::Relaxed),
        c.failed.load(Ordering::Relaxed),
        took.as_secs_f64() * 1e3,
        loadavg_1m()
    );
    // Idle: a few heartbeats at least, and long enough for the burst's extra threads to go.
    let idle_for = settle.max(Duration::from_millis(a.heartbeat_ms * 6));
    let (acks0, sent0) = (
        c.heartbeats.acks.load(Ordering::Relaxed),
        c.heartbeats.sent.load(Ordering::Relaxed),
    );
    let idle_cpu = CpuMeter::start(pid)?;
    tokio::time::sleep(idle_for).await;
    let idle_cpu = idle_cpu.percent()?;
    let idle: MemStatus = mem_status(pid)?;
    let heap1 = ask(&mut gw.child, "heap")?;
    // Diagnostic, after the readings above: how much of the RSS is free heap glibc keeps.
    let trimmed = ask(&mut gw.child, "trim")?;
    let acks = c.heartbeats.acks.load(Ordering::Relaxed) - acks0;
    let sent = c.heartbeats.sent.load(Ordering::Relaxed) - sent0;
    let listed_idle = node_count(gw.admin, &gw.admin_token).await?;
    let per_node = (idle.rss_kib as f64 - zero.rss_kib as f64) / a.nodes.max(1) as f64;
    let field = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let heap_per_node = (field(&heap1, "heap_in_use") - field(&heap0, "heap_in_use"))
        / 1024.0
        / a.nodes.max(1) as f64;
    burst.end().await;
    let after = wait_count(gw.admin, &gw.admin_token, 0, Duration::from_secs(30)).await?;
    let load_end = loadavg_1m();
    let errors = c.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();

    let mut t = Table::new(&["", "value"]);
    t.row(vec![
        "registered (Registered answers)".into(),
        format!("{registered} / {}", a.nodes),
    ]);
    t.row(vec![
        "listed by GET /admin/nodes (after burst / idle)".into(),
        format!("{listed} / {listed_idle}"),
    ]);
    t.row(vec![
        "first connect -> last Registered (ms)".into(),
        format!("{:.0}", at.max / 1e3),
    ]);
    t.row(vec![
        "Registered at p50 / p99 (ms)".into(),
        format!("{:.0} / {:.0}", at.p50 / 1e3, at.p99 / 1e3),
    ]);
    t.row(vec![
        "QUIC handshake done at p50 / p99 / max (ms)".into(),
        format!(
            "{:.0} / {:.0} / {:.0}",
            hs.p50 / 1e3,
            hs.p99 / 1e3,
            hs.max / 1e3
        ),
    ]);
    t.row(vec![
        "CPU during the burst: gateway / this harness (%)".into(),
        format!("{burst_cpu:.0} / {own_burst_cpu:.0}"),
    ]);
    t.row(vec![
        format!(
            "heartbeats sent / acked in {:.1} s idle",
            idle_for.as_secs_f64()
        ),
        format!("{sent} / {acks}"),
    ]);
    t.row(vec![
        "gateway CPU while idle (%)".into(),
        format!("{idle_cpu:.1}"),
    ]);
    t.row(vec![
        "gateway RSS cold / 0 nodes warm (MiB)".into(),
        format!("{} / {}", mib(cold.rss_kib), mib(zero.rss_kib)),
    ]);
    t.row(vec![
        "gateway RSS right after burst / idle (MiB)".into(),
        format!("{} / {}", mib(just_after.rss_kib), mib(idle.rss_kib)),
    ]);
    t.row(vec![
        "gateway threads 0 nodes / burst / idle".into(),
        format!(
            "{} / {} / {}",
            zero.threads, just_after.threads, idle.threads
        ),
    ]);
    t.row(vec![
        "memory per idle node: RSS delta (KiB)".into(),
        format!("{per_node:.1}"),
    ]);
    t.row(vec![
        "  of which heap in use (KiB, glibc mallinfo2)".into(),
        format!("{heap_per_node:.1}"),
    ]);
    t.row(vec![
        "  heap free but held: 0 nodes / idle (MiB)".into(),
        format!(
            "{:.1} / {:.1}",
            field(&heap0, "heap_free_held") / 1048576.0,
            field(&heap1, "heap_free_held") / 1048576.0
        ),
    ]);
    t.row(vec![
        "  RSS after malloc_trim (MiB)".into(),
        format!("{:.1}", field(&trimmed, "rss_kib") / 1024.0),
    ]);
    t.row(vec![
        "nodes listed after disconnect".into(),
        after.to_string(),
    ]);
    println!();
    t.print();
    let all = registered == a.nodes && listed_idle == a.nodes as usize;
    println!(
        "  target <= 16 KiB per idle node: {} ({per_node:.1} KiB); all registered and listed: {all}; load average (1 min) {:.2} -> {:.2}",
        verdict(per_node <= 16.0),
        load_start,
        load_end
    );
    for e in errors.iter().take(5) {
        println!("  error: {e}");
    }
    let summary = json!({
        "bench": "nodes-register",
        "params": {"nodes": a.nodes, "heartbeat_ms": a.heartbeat_ms, "warmup_nodes": a.warmup_nodes,
                   "settle_s": a.settle_seconds, "placement": p.describe(),
                   "client_recv_buffer": buffer.effective},
        "registered": registered, "rejected": c.rejected.load(Ordering::Relaxed), "failed": c.failed.load(Ordering::Relaxed),
        "listed_after_burst": listed, "listed_idle": listed_idle, "listed_after_disconnect": after,
        "first_connect_to_last_registered_ms": num(at.max / 1e3),
        "registered_at_ms": {"p50": num(at.p50 / 1e3), "p99": num(at.p99 / 1e3), "max": num(at.max / 1e3)},
        "handshake_done_at_ms": {"p50": num(hs.p50 / 1e3), "p99": num(hs.p99 / 1e3), "max": num(hs.max / 1e3)},
        "burst_cpu_percent": num(burst_cpu), "harness_burst_cpu_percent": num(own_burst_cpu), "idle_cpu_percent": num(idle_cpu),
        "heartbeats_sent_idle": sent, "heartbeat_acks_idle": acks,
        "rss_kib": {"cold": cold.rss_kib, "zero_nodes": zero.rss_kib, "after_burst": just_after.rss_kib, "idle": idle.rss_kib},
        "threads": {"zero_nodes": zero.threads, "after_burst": just_after.threads, "idle": idle.threads},
        "per_idle_node_kib": num(per_node),
        "per_idle_node_heap_in_use_kib": num(heap_per_node),
        "heap": {"zero_nodes": heap0, "idle": heap1, "after_trim": trimmed},
        "target_met": per_node <= 16.0,
        "all_registered": all,
        "loadavg_1m": [num(load_start), num(load_end)],
    });
    println!("{summary}");
    fleet.endpoint.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), fleet.endpoint.wait_idle()).await;
    stop_all(vec![gw.child]).await;
    if !all {
        anyhow::bail!(
            "{} of {} nodes registered and {listed_idle} listed",
            registered,
            a.nodes
        );
    }
    Ok(())
}
