//! `bench real-ttft`: added TTFT and inter-token latency with a real inference server as the
//! node's upstream. llama-cpp-python's OpenAI server runs a tiny generated model
//! (`tests/python/llama_server.py`); path A is client -> gateway -> QUIC -> node -> upstream
//! HTTP -> server, path B is client -> server, interleaved request by request, timed at the
//! client exactly as `inference-latency` times the simulator. The tiny model never ends a
//! plain reply early, so every stream has `--tokens` chunks on both paths.
//!
//! Placement matters more here than anywhere else. llama.cpp's compute threads take every CPU
//! they may run on while they decode, so on a small machine the gateway and node would run
//! only between replies and a whole stream would arrive in one read (the first measurement,
//! +41 ms "added" TTFT, was that). So by default the server runs on CPU 1 with one llama.cpp
//! thread (`--llama-cpus`, `--llama-threads`), and the gateway, the node and this client share
//! CPU 0 (`--gateway-cpus 0`, `--worker-cpus 0`): at concurrency 1 they take turns along the
//! one request's path, so they never queue behind each other, and nothing of theirs queues
//! behind llama.cpp.

use super::child::Child;
use super::latency::{measure, Measure};
use super::serve::MODEL;
use super::system::{parse_cpus, start_gateway, stop_all, Liveness, Placement};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use serde_json::json;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The model name llama_server.py gives the server (`--model_alias`).
const UPSTREAM_MODEL: &str = "tiny";
const LAUNCHER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/llama_server.py");

#[derive(Debug, Clone, clap::Args)]
// The node and the load generator share the gateway's CPU here: the other one is llama.cpp's.
#[command(mut_arg("worker_cpus", |a| a.default_value("0")))]
pub struct RealTtftArgs {
    /// Requests per repeat, half through the gateway and half direct, interleaved.
    #[arg(long, default_value_t = 400)]
    pub requests: u32,
    /// Requests in flight at once. The server decodes one request at a time, so more than one
    /// measures its queue rather than the gateway.
    #[arg(long, default_value_t = 1)]
    pub concurrency: u32,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 16)]
    pub tokens: u32,
    /// Independent repeats (spread is reported across them).
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// Unrecorded requests first (connections, the server's prompt cache).
    #[arg(long, default_value_t = 20)]
    pub warmup: u32,
    /// The Python interpreter with `llama-cpp-python[server]` and `gguf`.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// CPUs of the llama server, its compute threads included (comma-separated; keep them
    /// apart from the gateway's and the node's, or they wait for llama.cpp to finish a reply).
    /// Ignored with --no-pin.
    #[arg(long, default_value = "1")]
    pub llama_cpus: String,
    /// llama.cpp threads for decoding and prompt processing (`n_threads`, `n_threads_batch`).
    /// One decodes the tiny model in well under a millisecond per token.
    #[arg(long, default_value_t = 1)]
    pub llama_threads: u32,
    #[command(flatten)]
    pub placement: Placement,
}

fn body(model: &str, tokens: u32) -> Bytes {
    // Greedy: both paths decode the same tokens, so their timings compare like for like.
    Bytes::from(
        json!({"model": model, "stream": true, "max_tokens": tokens, "temperature": 0, "seed": 1,
               "messages": [{"role": "user", "content": "Benchmark prompt: say something."}]})
        .to_string(),
    )
}

/// Polls `GET /v1/models` until the server answers 200 (bounded).
async fn wait_ready(addr: SocketAddr, within: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let answered = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).await.ok()?;
            Some(head[9..12] == *b"200")
        };
        if let Ok(Some(true)) = tokio::time::timeout(Duration::from_secs(5), answered).await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("the llama server at {addr} did not answer /v1/models within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(a: RealTtftArgs) -> anyhow::Result<()> {
    let p = &a.placement;
    let dir = tempfile::tempdir().context("a directory for the model")?;
    let mut launch = vec![
        LAUNCHER.to_string(),
        dir.path().display().to_string(),
        "--threads".into(),
        a.llama_threads.max(1).to_string(),
    ];
    if !p.no_pin {
        let llama = parse_cpus(&a.llama_cpus)?;
        let ours: Vec<usize> = [p.gateway_cpus(), p.node_cpus(), p.worker_cpus()]
            .iter()
            .map(|c| parse_cpus(c))
            .collect::<anyhow::Result<Vec<_>>>()?
            .concat();
        if let Some(shared) = llama.iter().find(|c| ours.contains(c)) {
            println!(
                "warning: the llama server shares CPU {shared} with the gateway, node or client: \
                 they will wait for llama.cpp between tokens"
            );
        }
        launch.extend(["--cpus".into(), a.llama_cpus.clone()]);
    }
    let llama = Child::spawn_program(
        "llama server",
        OsStr::new(&a.python),
        &launch,
        Duration::from_secs(120),
    )
    .context("starting tests/python/llama_server.py (python3 needs `llama-cpp-python[server]` and `gguf`)")?;
    let port = llama.info["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| anyhow!("llama_server.py's ready line lacks a port: {}", llama.info))?;
    let direct: SocketAddr = ([127, 0, 0, 1], port).into();
    let ready = wait_ready(direct, Duration::from_secs(60)).await?;
    println!("llama-cpp-python on {direct}, ready after {ready:?}");

    let gw = start_gateway(p, Liveness::default(), 4096)?;
    let args: Vec<String> = vec![
        "serve-nodes".into(),
        "--cpus".into(),
        p.node_cpus(),
        "--threads".into(),
        p.node_threads.to_string(),
        "--nodes".into(),
        "1".into(),
        "--capacity".into(),
        (a.concurrency * 4).max(8).to_string(),
        "--gateway-quic".into(),
        gw.quic.to_string(),
        "--sha256".into(),
        gw.sha256.clone(),
        "--token".into(),
        gw.token.clone(),
        "--upstream-url".into(),
        format!("http://{direct}/v1"),
        "--upstream-model".into(),
        UPSTREAM_MODEL.into(),
    ];
    let nodes = Child::spawn("nodes", &args, Duration::from_secs(90))?;
    let targets = [(gw.http, Some(gw.api_key.clone())), (direct, None)];
    let run = Measure {
        bench: "real-ttft",
        setup: format!(
            "llama-cpp-python, tiny model {UPSTREAM_MODEL:?}, greedy, {} llama.cpp thread(s) on CPU {}",
            a.llama_threads,
            if p.no_pin { "any" } else { &a.llama_cpus }
        ),
        params: json!({"server": "llama-cpp-python", "model": UPSTREAM_MODEL,
                       "llama_threads": a.llama_threads,
                       "llama_cpus": if p.no_pin { "" } else { &a.llama_cpus }}),
        requests: a.requests,
        concurrency: a.concurrency,
        tokens: a.tokens,
        repeats: a.repeats,
        warmup: a.warmup,
        placement: p,
    };
    let r = measure(
        run,
        &gw,
        targets,
        [body(MODEL, a.tokens), body(UPSTREAM_MODEL, a.tokens)],
    )
    .await;
    stop_all(vec![nodes, gw.child, llama]).await;
    r
}
