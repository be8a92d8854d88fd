//! The `edge-node` binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use nearpath_edge_node::{EdgeNode, NodeOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "edge-node", version, about = "Nearpath edge node")]
struct Cli {
    /// Node config file (runs the node).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a node config file exactly as running the node (`--config`) would before dialling
    /// the gateway (placeholders, CA file, models): a one-line summary (exit 0) or every error
    /// with its file, line and column (exit 2).
    CheckConfig {
        file: PathBuf,
        /// Print nothing on success (errors still go to stderr).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Serve the config's models over an OpenAI-compatible HTTP API, without a gateway (for
    /// testing a node's backends, and as the no-gateway baseline in benchmarks). Any address
    /// but loopback requires an API key.
    ServeOpenai {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// File holding the API key clients must send as `Authorization: Bearer <key>` (first
        /// line, surrounding whitespace ignored). Required unless --listen is loopback.
        #[arg(long, value_name = "FILE")]
        api_key_file: Option<PathBuf>,
        /// The API key itself, from the environment only (a command line is visible to every
        /// user of the machine).
        #[arg(skip = std::env::var("NEARPATH_OPENAI_API_KEY").ok())]
        api_key_env: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match (cli.cmd, cli.config) {
        (Some(Cmd::CheckConfig { file, quiet }), _) => {
            return match nearpath_config::load_node_checked(&file, &nearpath_edge_node::preflight) {
                Ok(cfg) => {
                    if !quiet {
                        println!("{}: ok: {}", file.display(), cfg.summary());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        (
            Some(Cmd::ServeOpenai {
                config,
                listen,
                api_key_file,
                api_key_env,
            }),
            _,
        ) => rt.block_on(serve_openai(config, listen, api_key_file, api_key_env)),
        (None, Some(config)) => rt.block_on(run(config)),
        (None, None) => {
            eprintln!("error: --config FILE is required (see --help)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

async fn run(config: PathBuf) -> anyhow::Result<()> {
    // The same load and checks as check-config: a file one accepts, the other does.
    let cfg = nearpath_config::load_node_checked(&config, &nearpath_edge_node::preflight)
        .map_err(anyhow::Error::msg)?;
    init_tracing(&cfg.log.level);
    let node = EdgeNode::new(cfg, NodeOptions::default())?;
    node.run(shutdown_on_signal()).await?;
    Ok(())
}

async fn serve_openai(
    config: PathBuf,
    listen: SocketAddr,
    api_key_file: Option<PathBuf>,
    api_key_env: Option<String>,
) -> anyhow::Result<()> {
    let api_key = match api_key_file {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading --api-key-file {}", path.display()))?;
            let key = text.lines().next().unwrap_or("").trim().to_string();
            anyhow::ensure!(
                !key.is_empty(),
                "--api-key-file {}: the file holds no key",
                path.display()
            );
            Some(key)
        }
        None => api_key_env.filter(|k| !k.trim().is_empty()),
    };
    let options = nearpath_edge_node::inference::ServerOptions {
        api_key,
        ..Default::default()
    };
    // Checked before anything is loaded or bound: a keyless server never listens off loopback.
    nearpath_edge_node::inference::check_exposure(listen, &options)?;
    let cfg = nearpath_config::load_node(&config).map_err(anyhow::Error::msg)?;
    init_tracing(&cfg.log.level);
    let registry = nearpath_edge_node::inference::ModelRegistry::from_config(&cfg.models, None)
        .context("building the models")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("serving OpenAI API on http://{}/v1", listener.local_addr()?);
    nearpath_edge_node::inference::serve_openai_with(
        listener,
        std::sync::Arc::new(registry),
        options,
        shutdown_on_signal(),
    )
    .await;
    Ok(())
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        t.cancel();
    });
    token
}
