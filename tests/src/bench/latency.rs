//! `bench inference-latency`: streamed requests through the gateway (A: client -> gateway ->
//! QUIC -> node simulator) interleaved with the same requests straight to the node's backend
//! (B: the same simulator behind `serve_openai`). TTFT and every inter-token gap are timed at
//! the client; the gateway's cost is A minus B. The gateway is reached over OpenAI HTTP/SSE, over
//! the native `nearpath/1` QUIC protocol (`Client::infer`), or both in the same run; the direct
//! baseline is always the simulator's own HTTP/SSE server.

use super::client::{chat_body, chat_request, stream_once, Conn, StreamOutcome, TokenClock};
use super::os::{loadavg_1m, CpuMeter};
use super::serve::Sim;
use super::stats::{num, Repeated, Summary};
use super::system::{
    start_gateway, start_nodes, stop_all, verdict, GatewayProc, Liveness, NodesSpec, Placement,
    Table,
};
use anyhow::anyhow;
use bytes::Bytes;
use nearpath_protocol::tls::{parse_sha256_hex, ServerVerify};
use nearpath_protocol::{Client, InferEvent};
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which of the gateway's front ends the gateway path goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// OpenAI chat completions over HTTP/1.1 with server-sent events.
    Http,
    /// `nearpath/1` over QUIC: `InferRequest` on a bidi stream, `Token`s back.
    Quic,
    /// Both gateway paths and the direct one, interleaved in one run.
    Both,
}

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
    /// How the gateway path reaches the gateway: `http` (OpenAI SSE), `quic` (the native
    /// client, one connection per worker, one stream per request) or `both`. The direct
    /// baseline is the simulator's HTTP/SSE server in every case.
    #[arg(long, value_enum, default_value_t = Transport::Http)]
    pub transport: Transport,
    #[command(flatten)]
    pub placement: Placement,
}

/// How one measured path reaches the tokens.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// OpenAI chat completions over HTTP/1.1 + SSE to `addr`, with a bearer key when given.
    Http {
        addr: SocketAddr,
        key: Option<String>,
        body: Bytes,
    },
    /// `nearpath/1` over QUIC to the gateway at `addr`, its certificate pinned by SHA-256.
    Quic {
        addr: SocketAddr,
        sha256: [u8; 32],
        key: String,
        body: String,
    },
}

/// One path of the comparison. The last path of a run is the direct baseline; every other
/// path goes through the gateway and its added cost is reported against the baseline.
#[derive(Debug, Clone)]
pub(crate) struct Path {
    /// Its key in the JSON summary (`gateway`, `gateway_quic`, `direct`).
    pub name: &'static str,
    /// Its column in the table.
    pub label: &'static str,
    /// What it is, for the header.
    pub describe: String,
    pub target: Target,
}

/// A worker's open connection for one path, reused for every request it sends there.
enum Link {
    Http(Conn),
    // Boxed: a client is several times the size of an HTTP connection handle.
    Quic(Box<Client>),
}

impl Target {
    async fn connect(&self) -> anyhow::Result<Link> {
        Ok(match self {
            Target::Http { addr, .. } => Link::Http(Conn::h1(*addr).await?),
            Target::Quic { addr, sha256, .. } => Link::Quic(Box::new(
                Client::connect(*addr, "localhost", ServerVerify::PinnedSha256(*sha256)).await?,
            )),
        })
    }

    async fn once(&self, link: &mut Link, tokens: u32) -> anyhow::Result<StreamOutcome> {
        match (self, link) {
            (Target::Http { addr, key, body }, Link::Http(conn)) => {
                let req = chat_request(*addr, key.as_deref(), body.clone());
                stream_once(conn, req, true, || {}).await
            }
            (Target::Quic { key, body, .. }, Link::Quic(client)) => {
                quic_once(client, key, body, tokens).await
            }
            _ => Err(anyhow!("a path's connection is of another transport")),
        }
    }
}

/// One streamed request over `nearpath/1`: `InferRequest` on a new bidi stream, then
/// `InferStarted`, a `Token` (or `Chunk`) per generated piece and `Done`. Timed by the same
/// [`TokenClock`] rule as the SSE path; the outcome's status is 200 once `InferStarted` came.
async fn quic_once(
    client: &Client,
    key: &str,
    body: &str,
    tokens: u32,
) -> anyhow::Result<StreamOutcome> {
    let mut clock = TokenClock::start(true);
    let mut stream = client.infer(key, body).await?;
    let mut out = StreamOutcome::default();
    while let Some(event) = stream.next().await? {
        let now = Instant::now();
        match event {
            InferEvent::Started(_) => out.status = 200,
            InferEvent::Token(_) | InferEvent::Chunk(_) => {
                clock.token(&mut out, now);
            }
            InferEvent::Done(d) => {
                out.done = true;
                // The usage the gateway reports must agree with what arrived.
                if d.completion_tokens != tokens {
                    out.error = true;
                }
            }
            InferEvent::Error(e) => {
                return Err(anyhow!(
                    "the gateway answered {} ({}) after {} tokens",
                    e.code,
                    e.message,
                    out.tokens
                ));
            }
        }
    }
    out.total = clock.elapsed();
    Ok(out)
}

struct Worker {
    /// By path.
    links: Vec<Link>,
}

struct Round {
    /// By path: outcomes of complete responses.
    ok: Vec<Vec<StreamOutcome>>,
    failures: Vec<String>,
}

async fn round(
    workers: Vec<Worker>,
    paths: Arc<[Path]>,
    requests: u32,
    tokens: u32,
) -> (Vec<Worker>, Round) {
    let next = Arc::new(AtomicU32::new(0));
    let n = paths.len();
    let mut tasks = Vec::new();
    for mut w in workers {
        let next = next.clone();
        let paths = paths.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok: Vec<Vec<StreamOutcome>> = vec![Vec::new(); n];
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                // Rotating by request number interleaves the paths across all workers.
                let path = i as usize % n;
                let p = &paths[path];
                let r = tokio::time::timeout(
                    Duration::from_secs(30),
                    p.target.once(&mut w.links[path], tokens),
                )
                .await;
                let broken = matches!(r, Ok(Err(_)) | Err(_));
                match r {
                    Ok(Ok(o)) if o.complete(tokens) => ok[path].push(o),
                    Ok(Ok(o)) => failures.push(format!("{}: incomplete stream {o:?}", p.name)),
                    Ok(Err(e)) => failures.push(format!("{}: {e:#}", p.name)),
                    Err(_) => failures.push(format!("{}: no answer within 30 s", p.name)),
                }
                if failures.len() > 20 {
                    break;
                }
                if broken {
                    match p.target.connect().await {
                        Ok(c) => w.links[path] = c,
                        Err(e) => {
                            failures.push(format!("{}: reconnecting: {e:#}", p.name));
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
        ok: vec![Vec::new(); n],
        failures: Vec::new(),
    };
    for t in tasks {
        match t.await {
            Ok((w, ok, f)) => {
                workers.push(w);
                for (all, mine) in out.ok.iter_mut().zip(ok) {
                    all.extend(mine);
                }
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
    let http = |label| Path {
        name: "gateway",
        label,
        describe: "OpenAI HTTP/1.1 + SSE to the gateway".into(),
        target: Target::Http {
            addr: gw.http,
            key: Some(gw.api_key.clone()),
            body: body.clone(),
        },
    };
    let quic = |label| -> anyhow::Result<Path> {
        Ok(Path {
            name: "gateway_quic",
            label,
            describe: "nearpath/1 over QUIC to the gateway (Client::infer; one connection per \
                       worker, one stream per request)"
                .into(),
            target: Target::Quic {
                addr: gw.quic,
                sha256: parse_sha256_hex(&gw.sha256)?,
                key: gw.api_key.clone(),
                body: String::from_utf8(body.to_vec())?,
            },
        })
    };
    let direct = |label| Path {
        name: "direct",
        label,
        describe: "the simulator's own HTTP/1.1 + SSE server, no gateway".into(),
        target: Target::Http {
            addr: backend,
            key: None,
            body: body.clone(),
        },
    };
    let paths = match a.transport {
        Transport::Http => Ok(vec![http("through gateway"), direct("direct")]),
        Transport::Quic => quic("through gateway (QUIC)").map(|q| vec![q, direct("direct (HTTP)")]),
        Transport::Both => quic("through gateway (QUIC)")
            .map(|q| vec![q, http("through gateway (HTTP)"), direct("direct (HTTP)")]),
    };
    let r = match paths {
        Ok(paths) => measure_paths(run, &gw, paths).await,
        Err(e) => Err(e),
    };
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

/// Runs `a.repeats` rounds of streamed requests, alternating between the gateway over HTTP/SSE
/// (`targets[0]`, `bodies[0]`) and the direct path (`targets[1]`, `bodies[1]`), prints the table
/// and the JSON summary, and fails if any request failed.
pub(crate) async fn measure(
    a: Measure<'_>,
    gw: &GatewayProc,
    targets: [(SocketAddr, Option<String>); 2],
    bodies: [Bytes; 2],
) -> anyhow::Result<()> {
    let [(gw_addr, gw_key), (direct_addr, direct_key)] = targets;
    let [gw_body, direct_body] = bodies;
    let paths = vec![
        Path {
            name: "gateway",
            label: "through gateway",
            describe: "OpenAI HTTP/1.1 + SSE to the gateway".into(),
            target: Target::Http {
                addr: gw_addr,
                key: gw_key,
                body: gw_body,
            },
        },
        Path {
            name: "direct",
            label: "direct",
            describe: "the backend's own HTTP/1.1 + SSE server, no gateway".into(),
            target: Target::Http {
                addr: direct_addr,
                key: direct_key,
                body: direct_body,
            },
        },
    ];
    measure_paths(a, gw, paths).await
}

/// The summary key of a gateway path's figure: `gateway` -> `added`, `gateway_quic` ->
/// `added_quic` (so a plain HTTP run keeps the keys it always had).
fn suffixed(prefix: &str, path: &str) -> String {
    format!("{prefix}{}", path.strip_prefix("gateway").unwrap_or(path))
}

/// [`measure`] over any number of paths: every path but the last goes through the gateway,
/// the last is the direct baseline. Requests rotate over the paths, so all are measured under
/// the same load, interleaved.
pub(crate) async fn measure_paths(
    a: Measure<'_>,
    gw: &GatewayProc,
    paths: Vec<Path>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        paths.len() >= 2,
        "a comparison needs a gateway path and a direct one"
    );
    let n = paths.len();
    let gws = n - 1;
    let paths: Arc<[Path]> = paths.into();
    let load_start = loadavg_1m();
    let p = a.placement;
    let mut workers = Vec::new();
    for _ in 0..a.concurrency.max(1) {
        let mut links = Vec::new();
        for path in paths.iter() {
            links.push(path.target.connect().await?);
        }
        workers.push(Worker { links });
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
    for path in paths.iter() {
        println!("  {}: {}", path.name, path.describe);
    }
    let (w, warm) = round(workers, paths.clone(), a.warmup, a.tokens).await;
    workers = w;
    if !warm.failures.is_empty() {
        anyhow::bail!(
            "warm-up failed: {:?}",
            &warm.failures[..warm.failures.len().min(5)]
        );
    }

    // By path: TTFT and gap samples pooled over the repeats.
    let mut pooled: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); n];
    // By path, then figure (TTFT p50, TTFT p99, gap p50, gap p99): one value per repeat.
    let mut per_path: Vec<[Vec<f64>; 4]> = vec![Default::default(); n];
    // By gateway path, then figure: that path minus the direct one, per repeat.
    let mut added: Vec<[Vec<f64>; 4]> = vec![Default::default(); gws];
    let mut gw_cpu = Vec::new();
    let mut failures = Vec::new();
    let mut per_repeat = Vec::new();
    for r in 0..a.repeats.max(1) {
        let cpu = CpuMeter::start(gw.child.pid)?;
        let (w, res) = round(workers, paths.clone(), a.requests, a.tokens).await;
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
        let base = s[gws];
        for (g, fig) in added.iter_mut().enumerate() {
            let x = s[g];
            for (k, d) in [
                x.0.p50 - base.0.p50,
                x.0.p99 - base.0.p99,
                x.1.p50 - base.1.p50,
                x.1.p99 - base.1.p99,
            ]
            .into_iter()
            .enumerate()
            {
                fig[k].push(d);
            }
        }
        let each = |f: &dyn Fn(&(Summary, Summary)) -> String| {
            paths
                .iter()
                .zip(&s)
                .map(|(path, x)| format!("{} {}", path.name, f(x)))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "  repeat {}: TTFT p50 ms {}; gap p50 us {}; complete {}; {} failed, load {:.2}",
            r + 1,
            each(&|x| format!("{:.3}", x.0.p50)),
            each(&|x| format!("{:.0}", x.1.p50)),
            each(&|x| x.0.n.to_string()),
            res.failures.len(),
            loadavg_1m()
        );
        let mut rep = Map::new();
        for (path, x) in paths.iter().zip(&s) {
            rep.insert(
                path.name.into(),
                json!({"ttft_ms": x.0.to_json(), "gap_us": x.1.to_json()}),
            );
        }
        rep.insert("failures".into(), json!(res.failures.len()));
        per_repeat.push(Value::Object(rep));
    }
    let load_end = loadavg_1m();
    let rep = |v: &Vec<f64>| Repeated::new(v.clone());
    let added_r: Vec<Vec<Repeated>> = added.iter().map(|f| f.iter().map(rep).collect()).collect();
    let mut header = vec!["median over repeats [min .. max]".to_string()];
    header.extend(paths.iter().map(|path| path.label.to_string()));
    for path in &paths[..gws] {
        header.push(match path.label.strip_prefix("through gateway") {
            Some(rest) if gws > 1 => format!("added{rest}"),
            _ => "added".into(),
        });
    }
    header.extend(["target".into(), String::new()]);
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = Table::new(&header);
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
        let mut row = vec![names[k].to_string()];
        row.extend(per_path.iter().map(|f| rep(&f[k]).show(digits)));
        row.extend(added_r.iter().map(|f| f[k].show(digits)));
        row.push(target.map(|x| format!("<= {x}")).unwrap_or_default());
        row.push(
            target
                .map(|x| {
                    added_r
                        .iter()
                        .map(|f| verdict(f[k].median() <= x))
                        .collect::<Vec<_>>()
                        .join(" / ")
                })
                .unwrap_or_default(),
        );
        t.row(row);
    }
    println!();
    t.print();
    let mut pooled_json = Vec::new();
    for (path, (tt, gg)) in paths.iter().zip(pooled.iter_mut()) {
        let (ts, gs) = (Summary::of(tt), Summary::of(gg));
        println!(
            "  {:<12} all repeats: TTFT ms p5 {:.3} p50 {:.3} p95 {:.3} p99 {:.3} max {:.3} (n {}); gap us p5 {:.0} p50 {:.0} p95 {:.0} p99 {:.0} (n {})",
            path.name, ts.p5, ts.p50, ts.p95, ts.p99, ts.max, ts.n, gs.p5, gs.p50, gs.p95, gs.p99, gs.n
        );
        pooled_json
            .push(json!({"path": path.name, "ttft_ms": ts.to_json(), "gap_us": gs.to_json()}));
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
    let mut summary = Map::new();
    summary.insert("bench".into(), json!(a.bench));
    summary.insert(
        "params".into(),
        json!({"requests": a.requests, "concurrency": a.concurrency, "tokens": a.tokens,
               "backend": a.params, "repeats": a.repeats, "placement": p.describe()}),
    );
    summary.insert(
        "paths".into(),
        json!(paths.iter().map(|p| p.name).collect::<Vec<_>>()),
    );
    for (path, f) in paths[..gws].iter().zip(&added_r) {
        summary.insert(
            suffixed("added", path.name),
            json!({"ttft_p50_ms": f[0].to_json(), "ttft_p99_ms": f[1].to_json(),
                   "gap_p50_us": f[2].to_json(), "gap_p99_us": f[3].to_json()}),
        );
        summary.insert(
            suffixed("targets_met", path.name),
            json!({"ttft_p50": f[0].median() <= 0.5, "ttft_p99": f[1].median() <= 2.0,
                   "gap_p50": f[2].median() <= 100.0}),
        );
    }
    for (path, f) in paths.iter().zip(&per_path) {
        summary.insert(
            path.name.into(),
            json!({"ttft_p50_ms": rep(&f[0]).to_json(), "ttft_p99_ms": rep(&f[1]).to_json(),
                   "gap_p50_us": rep(&f[2]).to_json(), "gap_p99_us": rep(&f[3]).to_json()}),
        );
    }
    summary.insert("pooled".into(), Value::Array(pooled_json));
    summary.insert("per_repeat".into(), Value::Array(per_repeat));
    summary.insert("gateway_cpu_percent".into(), gw_cpu.to_json());
    summary.insert("failures".into(), json!(failures.len()));
    summary.insert("loadavg_1m".into(), json!([num(load_start), num(load_end)]));
    println!("{}", Value::Object(summary));
    for w in workers {
        for link in w.links {
            if let Link::Quic(c) = link {
                // Sends the close now, so the gateway does not hold the connection until
                // its idle timeout.
                (*c).close().await;
            }
        }
    }
    if !failures.is_empty() {
        anyhow::bail!("{} requests failed", failures.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_keys_of_the_http_gateway_path_are_unchanged() {
        assert_eq!(suffixed("added", "gateway"), "added");
        assert_eq!(suffixed("added", "gateway_quic"), "added_quic");
        assert_eq!(suffixed("targets_met", "gateway_quic"), "targets_met_quic");
    }
}
