//! `bench real-ttft`: added TTFT and inter-token latency with a real inference server as the
//! node's upstream. llama-cpp-python's OpenAI server runs a tiny generated model
//! (`tests/python/llama_server.py`); path A is client -> gateway -> QUIC -> node -> upstream
//! HTTP -> server, path B is client -> server, interleaved request by request, timed at the
//! client exactly as `inference-latency` times the simulator. The tiny model never ends a
//! plain reply early, so every stream has `--tokens` chunks on both paths.

use super::child::Child;
use super::latency::{measure, Measure};
use super::serve::MODEL;
use super::system::{start_gateway, stop_all, Liveness, Placement};
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
    let llama = Child::spawn_program(
        "llama server",
        OsStr::new(&a.python),
        &[LAUNCHER.into(), dir.path().display().to_string()],
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
        setup: format!("llama-cpp-python, tiny model {UPSTREAM_MODEL:?}, greedy"),
        params: json!({"server": "llama-cpp-python", "model": UPSTREAM_MODEL}),
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
