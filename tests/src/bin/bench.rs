//! `bench`: the gateway's benchmark harness. The system under test (gateway, nodes, the direct
//! baseline server) runs in child processes started from this same binary, each pinned to its
//! CPU, so that the gateway's CPU time and memory can be read from `/proc`; the load generator
//! runs here. Every subcommand prints a table and then one JSON summary line.
//!
//! ```text
//! cargo build --release -p nearpath-tests --bin bench
//! target/release/bench inference-latency
//! target/release/bench real-ttft
//! target/release/bench inference-rps
//! target/release/bench inference-streams
//! target/release/bench inference-queue
//! target/release/bench nodes-register
//! target/release/bench trunk-ttft
//! target/release/bench game-hop
//! target/release/bench fleet-limits
//! ```

#[path = "../bench/mod.rs"]
mod bench;

use bench::system::parse_cpus;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Nearpath gateway benchmarks: each path through the gateway against the same path without it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Streaming TTFT and inter-token gaps, through the gateway and direct, interleaved.
    InferenceLatency(bench::latency::LatencyArgs),
    /// The same with a real inference server (llama-cpp-python on a tiny generated model) as
    /// the node's upstream, against that server directly. Needs python3 with
    /// `llama-cpp-python[server]` and `gguf`. The server runs on its own CPU with one llama.cpp
    /// thread (--llama-cpus 1, --llama-threads 1); the gateway, node and client share CPU 0.
    RealTtft(bench::real::RealTtftArgs),
    /// Non-streaming requests per second through a gateway on one core, and direct.
    InferenceRps(bench::rps::RpsArgs),
    /// Many concurrent slow SSE streams over HTTP/2: gateway memory per stream and CPU.
    InferenceStreams(bench::streams::StreamsArgs),
    /// Many more concurrent streams than slots (2,000 on 64): completion rate and queue wait.
    InferenceQueue(bench::queue::QueueArgs),
    /// Many nodes registering at once: admission time and gateway memory per idle node.
    NodesRegister(bench::register::RegisterArgs),
    /// Many nodes registering at once across three gateways sharing one PostgreSQL (started
    /// by the harness): time to all registered and store load from pg_stat_database.
    NodesFederation(bench::federation::FederationArgs),
    /// TTFT through the gateway-to-gateway trunk against the same node on one gateway
    /// (two federated gateways in this process, interleaved requests).
    TrunkTtft(bench::trunk::TrunkArgs),
    /// Frame latency and time to first frame of a native game session at B directly, at A
    /// over the trunk and at A redirected to B (three federated gateways in this process).
    GameHop(bench::gamehop::GameHopArgs),
    /// A key's limits under load on three gateways sharing one store (in this process):
    /// admitted/limit per minute window, store round trips per request, concurrency cap held.
    FleetLimits(bench::limits::LimitsArgs),
    /// The checker: tokens/s of a fully loaded node with the checker off and on (probes at
    /// random times), and the time from an impossible claim to the node's reclassification.
    Checker(bench::checker::CheckerArgs),
    /// Diagnostic: heap per idle QUIC connection by the stream limits the server grants.
    QuicIdleMemory(bench::quicmem::QuicMemArgs),
    /// Game frames node -> client through the gateway and direct, same frames at the same time.
    RelayLatency(bench::relay::RelayLatencyArgs),
    /// Concurrent 720p60 sessions one gateway relays without late or dropped frames.
    RelayCapacity(bench::relay::RelayCapacityArgs),
    /// Game relay past saturation: --factor times the relay's capacity; delivered-frame
    /// latency and drops per session.
    RelayOverload(bench::relay::RelayOverloadArgs),
    /// N WebRTC (WHEP) players at 720p60 on one gateway, then the same N as WebTransport and as
    /// native QUIC players: gateway CPU per session, frames delivered, latency and jitter.
    WebrtcLoad(bench::relay::WebrtcLoadArgs),
    /// One 720p60 game session with the node behind a seeded impairment relay: delivered fps,
    /// frame latency above the path delay, bitrate, skipped/reset frames, node evictions.
    GameImpaired(bench::impaired::GameImpairedArgs),
    /// Runs the seeded UDP impairment relay alone until ctrl-c.
    Impair(bench::impaired::ImpairArgs),
    /// 10 ms audio packets over QUIC datagrams vs one stream through the impairment relay, per
    /// loss rate: packets lost, latency p50/p99/max, the playout buffer a stream needs.
    AudioTransport(bench::audio::AudioTransportArgs),
    /// Video encoders' milliseconds per frame (x264, OpenH264, NVENC where present) at 720p
    /// and 1080p on the built-in game's frames, in one run.
    Encoders(bench::encoders::EncodersArgs),
    /// (internal) Runs a gateway; prints its addresses as JSON; stops when stdin closes.
    #[command(hide = true)]
    ServeGateway {
        #[command(flatten)]
        proc: ProcArgs,
        #[arg(long, default_value_t = 500)]
        heartbeat_ms: u64,
        #[arg(long, default_value_t = 3)]
        missed_heartbeats: u32,
        #[arg(long)]
        store_dir: Option<PathBuf>,
        /// Enter a CPU quota of this share of one core (percent) before starting.
        #[arg(long)]
        cpu_quota_percent: Option<u32>,
        #[arg(long)]
        frame_budget_ms: Option<u64>,
        #[arg(long)]
        recv_buffer_bytes: Option<usize>,
        #[arg(long)]
        header_read_timeout_ms: Option<u64>,
    },
    /// (internal) Runs edge nodes and/or the simulator's HTTP server; stops when stdin closes.
    #[command(hide = true)]
    ServeNodes {
        #[command(flatten)]
        proc: ProcArgs,
        #[arg(long)]
        gateway_quic: Option<SocketAddr>,
        #[arg(long)]
        sha256: Option<String>,
        #[arg(long)]
        token: Option<String>,
        #[arg(long, default_value_t = 1)]
        nodes: u32,
        #[arg(long, default_value = "node")]
        id_prefix: String,
        #[arg(long, default_value_t = 64)]
        capacity: u32,
        #[arg(long, default_value_t = 0)]
        ttft_ms: u64,
        #[arg(long, default_value_t = 0.0)]
        tokens_per_s: f64,
        #[arg(long)]
        backend_listen: Option<SocketAddr>,
        /// Relay the nodes' model to this OpenAI-compatible server instead of the simulator.
        #[arg(long)]
        upstream_url: Option<String>,
        /// The model name the upstream server knows.
        #[arg(long, default_value = "tiny")]
        upstream_model: String,
    },
}

/// How a child process runs: its CPUs, runtime threads and open-file limit.
#[derive(clap::Args)]
struct ProcArgs {
    /// CPUs to pin to (comma-separated; empty: no pinning).
    #[arg(long, default_value = "")]
    cpus: String,
    /// Runtime worker threads (0: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 4096)]
    nofile: u64,
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Pins this thread (so every thread started later) and raises the open-file limit.
fn prepare(cpus: &str, nofile: u64) -> anyhow::Result<(u64, u64)> {
    let cpus = parse_cpus(cpus)?;
    if !cpus.is_empty() {
        bench::os::pin_current_thread(&cpus)
            .map_err(|e| anyhow::anyhow!("pinning to CPUs {cpus:?}: {e}"))?;
    }
    Ok(bench::os::raise_nofile(nofile)?)
}

fn init_logging() {
    // Warnings only: per-request logging is not part of what is measured.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::ServeGateway {
            proc,
            heartbeat_ms,
            missed_heartbeats,
            store_dir,
            cpu_quota_percent,
            frame_budget_ms,
            recv_buffer_bytes,
            header_read_timeout_ms,
        } => {
            // Before any thread exists, so that every thread of the process is under it.
            let _quota = match cpu_quota_percent {
                Some(p) => Some(bench::os::CpuQuota::enter(p)?),
                None => None,
            };
            let nofile = prepare(&proc.cpus, proc.nofile)?;
            init_logging();
            runtime(proc.threads)?.block_on(bench::serve::serve_gateway(
                bench::serve::GatewayArgs {
                    store_dir,
                    heartbeat_ms,
                    missed_heartbeats,
                    frame_budget_ms,
                    recv_buffer_bytes,
                    header_read_timeout_ms,
                    nofile,
                },
            ))
        }
        Command::ServeNodes {
            proc,
            gateway_quic,
            sha256,
            token,
            nodes,
            id_prefix,
            capacity,
            ttft_ms,
            tokens_per_s,
            backend_listen,
            upstream_url,
            upstream_model,
        } => {
            let nofile = prepare(&proc.cpus, proc.nofile)?;
            init_logging();
            runtime(proc.threads)?.block_on(bench::serve::serve_nodes(bench::serve::NodesArgs {
                gateway_quic,
                sha256,
                token,
                nodes,
                id_prefix,
                capacity,
                sim: bench::serve::Sim {
                    ttft_ms,
                    tokens_per_s,
                },
                backend_listen,
                upstream: upstream_url.map(|u| (u, upstream_model)),
                nofile,
            }))
        }
        Command::GameImpaired(a) => {
            init_logging();
            runtime(2)?.block_on(bench::impaired::run_game(a))
        }
        Command::Impair(a) => {
            init_logging();
            runtime(1)?.block_on(bench::impaired::run_impair(a))
        }
        Command::AudioTransport(a) => {
            init_logging();
            runtime(2)?.block_on(bench::audio::run(a))
        }
        Command::Encoders(a) => {
            init_logging();
            bench::encoders::run(a)
        }
        Command::NodesFederation(a) => {
            init_logging();
            runtime(2)?.block_on(bench::federation::run(a))
        }
        Command::FleetLimits(a) => {
            init_logging();
            runtime(2)?.block_on(bench::limits::run(a))
        }
        command => {
            let unpinned = bench::system::Placement {
                gateway_cpus: String::new(),
                worker_cpus: String::new(),
                node_cpus: None,
                node_threads: 1,
                gateway_threads: 1,
                no_pin: true,
                store_dir: None,
                gateway_exe: None,
                gateway_cpu_quota_percent: None,
                gateway_frame_budget_ms: None,
                gateway_recv_buffer_bytes: None,
                gateway_header_read_timeout_ms: None,
            };
            let placement = match &command {
                Command::InferenceLatency(a) => &a.placement,
                Command::RealTtft(a) => &a.placement,
                Command::InferenceRps(a) => &a.placement,
                Command::InferenceStreams(a) => &a.placement,
                Command::InferenceQueue(a) => &a.placement,
                Command::NodesRegister(a) => &a.placement,
                Command::QuicIdleMemory(_)
                | Command::TrunkTtft(_)
                | Command::GameHop(_)
                | Command::Checker(_) => &unpinned,
                Command::RelayLatency(a) => &a.placement,
                Command::RelayCapacity(a) => &a.placement,
                Command::RelayOverload(a) => &a.run.placement,
                Command::WebrtcLoad(a) => &a.placement,
                Command::ServeGateway { .. }
                | Command::ServeNodes { .. }
                | Command::GameImpaired(_)
                | Command::NodesFederation(_)
                | Command::FleetLimits(_)
                | Command::Impair(_)
                | Command::AudioTransport(_)
                | Command::Encoders(_) => {
                    anyhow::bail!("these commands are handled above")
                }
            };
            // The load generator runs on the worker CPUs, one runtime thread per CPU.
            let cpus = parse_cpus(&placement.worker_cpus())?;
            prepare(&placement.worker_cpus(), 65_536)?;
            init_logging();
            let threads = if cpus.is_empty() {
                bench::os::allowed_cpus().len().max(1)
            } else {
                cpus.len()
            };
            let rt = runtime(threads)?;
            match command {
                Command::InferenceLatency(a) => rt.block_on(bench::latency::run(a)),
                Command::RealTtft(a) => rt.block_on(bench::real::run(a)),
                Command::InferenceRps(a) => rt.block_on(bench::rps::run(a)),
                Command::InferenceStreams(a) => rt.block_on(bench::streams::run(a)),
                Command::InferenceQueue(a) => rt.block_on(bench::queue::run(a)),
                Command::NodesRegister(a) => rt.block_on(bench::register::run(a)),
                Command::QuicIdleMemory(a) => rt.block_on(bench::quicmem::run(a)),
                Command::TrunkTtft(a) => rt.block_on(bench::trunk::run(a)),
                Command::GameHop(a) => rt.block_on(bench::gamehop::run(a)),
                Command::Checker(a) => rt.block_on(bench::checker::run(a)),
                Command::RelayLatency(a) => rt.block_on(bench::relay::run_latency(a)),
                Command::RelayCapacity(a) => rt.block_on(bench::relay::run_capacity(a)),
                Command::RelayOverload(a) => rt.block_on(bench::relay::run_overload(a)),
                Command::WebrtcLoad(a) => rt.block_on(bench::relay::run_webrtc_load(a)),
                Command::ServeGateway { .. }
                | Command::ServeNodes { .. }
                | Command::GameImpaired(_)
                | Command::NodesFederation(_)
                | Command::FleetLimits(_)
                | Command::Impair(_)
                | Command::AudioTransport(_)
                | Command::Encoders(_) => {
                    anyhow::bail!("these commands are handled above")
                }
            }
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
