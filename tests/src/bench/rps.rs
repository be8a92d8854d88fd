//! `bench inference-rps`: non-streaming requests to a zero-delay simulator over HTTP/1.1
//! keep-alive connections, through a gateway process pinned to one core (A), then the same load
//! straight to the simulator's own HTTP server pinned to that same core (B).

use super::client::{chat_body, chat_request, plain_once, Conn};
use super::os::{loadavg_1m, CpuMeter};
use super::serve::Sim;
use super::stats::{num, Repeated, Summary};
use super::system::{
    start_gateway, start_nodes, stop_all, verdict, Liveness, NodesSpec, Placement, Table,
};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct RpsArgs {
    /// Measured seconds per path and repeat.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Keep-alive connections (one request in flight on each).
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Independent repeats; each measures both paths (in alternating order).
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// Unmeasured seconds of load on each path first.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_seconds: f64,
    #[command(flatten)]
    pub placement: Placement,
}

struct Phase {
    ok: u64,
    errors: Vec<String>,
    /// Connections the server had closed while idle, opened again before the clock started.
    reopened: u64,
    latencies_us: Vec<f64>,
    elapsed: Duration,
}

async fn phase(
    conns: Vec<Conn>,
    addr: SocketAddr,
    key: Option<String>,
    tokens: u32,
    duration: Duration,
) -> (Vec<Conn>, Phase) {
    let body = chat_body(false, tokens);
    let (conns, reopened, mut prime_errors) = prime(conns, addr, &key, &body, tokens).await;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for mut c in conns {
        let body = body.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = Vec::new();
            while Instant::now() < deadline && errors.len() < 10 {
                let req = chat_request(addr, key.as_deref(), body.clone());
                match tokio::time::timeout(Duration::from_secs(10), plain_once(&mut c, req, tokens))
                    .await
                {
                    Ok(Ok(d)) => lat.push(d.as_secs_f64() * 1e6),
                    Ok(Err(e)) => {
                        errors.push(format!("{e:#}"));
                        if let Ok(n) = Conn::h1(addr).await {
                            c = n;
                        }
                    }
                    Err(_) => {
                        errors.push("no answer within 10 s".into());
                        if let Ok(n) = Conn::h1(addr).await {
                            c = n;
                        }
                    }
                }
            }
            (c, lat, errors)
        }));
    }
    let mut out = Phase {
        ok: 0,
        errors: std::mem::take(&mut prime_errors),
        reopened,
        latencies_us: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut conns = Vec::new();
    for t in tasks {
        match t.await {
            Ok((c, lat, errors)) => {
                conns.push(c);
                out.ok += lat.len() as u64;
                out.latencies_us.extend(lat);
                out.errors.extend(errors);
            }
            Err(e) => out.errors.push(format!("worker task: {e}")),
        }
    }
    // Requests still in flight at the deadline finish after it; count the time they took.
    out.elapsed = start.elapsed();
    (conns, out)
}

/// Readies every connection for a phase, before its clock starts: one unmeasured request each,
/// on a fresh connection where the server had closed the old one. A path's connections sit idle while the other
/// path is measured, and the gateway closes an HTTP/1.1 keep-alive connection idle for
/// `http.header_read_timeout_ms` (10 s: hyper's header timer runs from the previous response),
/// so with 10 s phases the first request of every connection failed inside the measured window
/// once per run: the `errors: 64` of every default run. A pooled client opens a new connection
/// the same way. Returns the connections, how many were opened again, and the requests that
/// failed on a fresh connection too (real errors).
async fn prime(
    conns: Vec<Conn>,
    addr: SocketAddr,
    key: &Option<String>,
    body: &bytes::Bytes,
    tokens: u32,
) -> (Vec<Conn>, u64, Vec<String>) {
    let mut tasks = Vec::new();
    for mut c in conns {
        let (key, body) = (key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            match one_request(&mut c, addr, key.as_deref(), &body, tokens).await {
                Ok(()) => return (Some(c), false, None),
                // Only a connection the server has closed is opened again: any other failure
                // (an error answer, no answer) is the server's, and counts.
                Err((e, timed_out)) if timed_out || c.usable().await => {
                    return (Some(c), false, Some(e))
                }
                Err(_) => {}
            }
            let mut fresh = match Conn::h1(addr).await {
                Ok(f) => f,
                Err(e) => return (None, true, Some(format!("reconnecting: {e:#}"))),
            };
            let error = one_request(&mut fresh, addr, key.as_deref(), &body, tokens)
                .await
                .err()
                .map(|(e, _)| e);
            (Some(fresh), true, error)
        }));
    }
    let (mut out, mut reopened, mut errors) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        match t.await {
            Ok((c, again, error)) => {
                out.extend(c);
                reopened += u64::from(again);
                errors.extend(error);
            }
            Err(e) => errors.push(format!("worker task: {e}")),
        }
    }
    (out, reopened, errors)
}

/// One unmeasured request on `c` (see [`prime`]), or what went wrong and whether it was that
/// no answer came.
async fn one_request(
    c: &mut Conn,
    addr: SocketAddr,
    key: Option<&str>,
    body: &bytes::Bytes,
    tokens: u32,
) -> Result<(), (String, bool)> {
    let req = chat_request(addr, key, body.clone());
    match tokio::time::timeout(Duration::from_secs(10), plain_once(c, req, tokens)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err((format!("{e:#}"), false)),
        Err(_) => Err(("no answer within 10 s".into(), true)),
    }
}

pub async fn run(a: RpsArgs) -> anyhow::Result<()> {
    let load_start = loadavg_1m();
    let p = &a.placement;
    let zero = Sim {
        ttft_ms: 0,
        tokens_per_s: 0.0,
    };
    let capacity = (a.concurrency * 4).max(256);
    let gw = start_gateway(p, Liveness::default(), 4096)?;
    let nodes = start_nodes(NodesSpec {
        gateway: Some(&gw),
        nodes: 1,
        capacity,
        sim: zero,
        backend: false,
        cpus: p.node_cpus(),
        threads: p.node_threads,
        nofile: 4096,
    })?;
    // The direct path's server gets the gateway's CPU and runtime, so both are "one core".
    let direct = start_nodes(NodesSpec {
        gateway: None,
        nodes: 0,
        capacity,
        sim: zero,
        backend: true,
        cpus: p.gateway_cpus(),
        threads: p.gateway_threads,
        nofile: 4096,
    })?;
    let backend = direct
        .backend
        .ok_or_else(|| anyhow::anyhow!("the direct process reported no backend address"))?;
    println!(
        "inference-rps: {} s x {} repeats per path, {} keep-alive connections, max_tokens {}, zero-delay sim; {}",
        a.seconds,
        a.repeats,
        a.concurrency,
        a.max_tokens,
        p.describe()
    );
    let targets = [(gw.http, Some(gw.api_key.clone())), (backend, None)];
    let mut conns: [Vec<Conn>; 2] = [Vec::new(), Vec::new()];
    for (path, (addr, _)) in targets.iter().enumerate() {
        for _ in 0..a.concurrency.max(1) {
            conns[path].push(Conn::h1(*addr).await?);
        }
    }
    for (path, (addr, key)) in targets.iter().enumerate() {
        let c = std::mem::take(&mut conns[path]);
        let (c, warm) = phase(
            c,
            *addr,
            key.clone(),
            a.max_tokens,
            Duration::from_secs_f64(a.warmup_seconds),
        )
        .await;
        conns[path] = c;
        if warm.ok == 0 {
            anyhow::bail!(
                "warm-up of path {path} failed: {:?}",
                &warm.errors[..warm.errors.len().min(5)]
            );
        }
    }

    let names = ["gateway", "direct"];
    let mut rps: [Vec<f64>; 2] = Default::default();
    let mut p50: [Vec<f64>; 2] = Default::default();
    let mut p99: [Vec<f64>; 2] = Default::default();
    let mut server_cpu: [Vec<f64>; 2] = Default::default();
    let mut node_cpu = Vec::new();
    let mut load_cpu: [Vec<f64>; 2] = Default::default();
    let mut ratio = Vec::new();
    let mut errors = Vec::new();
    let mut reopened = 0;
    let mut per_repeat = Vec::new();
    let me = std::process::id();
    for r in 0..a.repeats.max(1) {
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut this = [0.0f64; 2];
        let mut rep_json = serde_json::Map::new();
        for path in order {
            let (addr, key) = &targets[path];
            let server_pid = if path == 0 {
                gw.child.pid
            } else {
                direct.child.pid
            };
            let (cs, cn, cl) = (
                CpuMeter::start(server_pid)?,
                CpuMeter::start(nodes.child.pid)?,
                CpuMeter::start(me)?,
            );
            let c = std::mem::take(&mut conns[path]);
            let (c, mut ph) = phase(
                c,
                *addr,
                key.clone(),
                a.max_tokens,
                Duration::from_secs_f64(a.seconds),
            )
            .await;
            conns[path] = c;
            let (scpu, ncpu, lcpu) = (cs.percent()?, cn.percent()?, cl.percent()?);
            let rate = ph.ok as f64 / ph.elapsed.as_secs_f64();
            let s = Summary::of(&mut ph.latencies_us);
            this[path] = rate;
            rps[path].push(rate);
            p50[path].push(s.p50);
            p99[path].push(s.p99);
            server_cpu[path].push(scpu);
            load_cpu[path].push(lcpu);
            if path == 0 {
                node_cpu.push(ncpu);
            }
            println!(
                "  repeat {} {:<7}: {:>8.0} req/s, latency p50 {:.0} us p99 {:.0} us, server CPU {:.0}%, node CPU {:.0}%, load generator CPU {:.0}%, {} errors, {} idle connections reopened, load {:.2}",
                r + 1,
                names[path],
                rate,
                s.p50,
                s.p99,
                scpu,
                ncpu,
                lcpu,
                ph.errors.len(),
                ph.reopened,
                loadavg_1m()
            );
            rep_json.insert(
                names[path].into(),
                json!({"rps": num(rate), "latency_us": s.to_json(), "server_cpu_percent": num(scpu),
                       "node_cpu_percent": num(ncpu), "loadgen_cpu_percent": num(lcpu), "errors": ph.errors.len(),
                       "reopened": ph.reopened}),
            );
            errors.extend(ph.errors);
            reopened += ph.reopened;
        }
        ratio.push(this[0] / this[1]);
        per_repeat.push(serde_json::Value::Object(rep_json));
    }
    let load_end = loadavg_1m();
    let rep = |v: &Vec<f64>| Repeated::new(v.clone());
    let added50: Vec<f64> = p50[0].iter().zip(&p50[1]).map(|(x, y)| x - y).collect();
    let added99: Vec<f64> = p99[0].iter().zip(&p99[1]).map(|(x, y)| x - y).collect();
    let mut t = Table::new(&[
        "median over repeats [min .. max]",
        "through gateway",
        "direct",
        "gateway / direct or added",
    ]);
    t.row(vec![
        "requests/s".into(),
        rep(&rps[0]).show(0),
        rep(&rps[1]).show(0),
        rep(&ratio).show(3),
    ]);
    t.row(vec![
        "latency p50 (us)".into(),
        rep(&p50[0]).show(0),
        rep(&p50[1]).show(0),
        rep(&added50).show(0),
    ]);
    t.row(vec![
        "latency p99 (us)".into(),
        rep(&p99[0]).show(0),
        rep(&p99[1]).show(0),
        rep(&added99).show(0),
    ]);
    t.row(vec![
        "server CPU (% of one core)".into(),
        rep(&server_cpu[0]).show(0),
        rep(&server_cpu[1]).show(0),
        String::new(),
    ]);
    t.row(vec![
        "node process CPU (%)".into(),
        rep(&node_cpu).show(0),
        "-".into(),
        String::new(),
    ]);
    t.row(vec![
        "load generator CPU (%)".into(),
        rep(&load_cpu[0]).show(0),
        rep(&load_cpu[1]).show(0),
        String::new(),
    ]);
    println!();
    t.print();
    let met = rep(&rps[0]).median() >= 5000.0;
    println!(
        "  target >= 5000 req/s through the gateway: {}; errors {}; idle connections reopened before a phase {}; load average (1 min) {:.2} -> {:.2}",
        verdict(met),
        errors.len(),
        reopened,
        load_start,
        load_end
    );
    for e in errors.iter().take(5) {
        println!("  error: {e}");
    }
    let summary = json!({
        "bench": "inference-rps",
        "params": {"seconds": a.seconds, "concurrency": a.concurrency, "max_tokens": a.max_tokens, "repeats": a.repeats,
                   "placement": p.describe()},
        "gateway": {"rps": rep(&rps[0]).to_json(), "latency_p50_us": rep(&p50[0]).to_json(), "latency_p99_us": rep(&p99[0]).to_json(),
                    "cpu_percent": rep(&server_cpu[0]).to_json(), "node_cpu_percent": rep(&node_cpu).to_json(),
                    "loadgen_cpu_percent": rep(&load_cpu[0]).to_json()},
        "direct": {"rps": rep(&rps[1]).to_json(), "latency_p50_us": rep(&p50[1]).to_json(), "latency_p99_us": rep(&p99[1]).to_json(),
                   "cpu_percent": rep(&server_cpu[1]).to_json(), "loadgen_cpu_percent": rep(&load_cpu[1]).to_json()},
        "ratio_gateway_over_direct": rep(&ratio).to_json(),
        "added_latency_p50_us": rep(&added50).to_json(),
        "added_latency_p99_us": rep(&added99).to_json(),
        "target_met": met,
        "per_repeat": per_repeat,
        "errors": errors.len(),
        "reopened": reopened,
        "loadavg_1m": [num(load_start), num(load_end)],
    });
    println!("{summary}");
    drop(conns);
    stop_all(vec![nodes.child, direct.child, gw.child]).await;
    if !errors.is_empty() {
        anyhow::bail!("{} requests failed", errors.len());
    }
    Ok(())
}
