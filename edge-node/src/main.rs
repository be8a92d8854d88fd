//! The `edge-node` binary.

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use nearpath_edge_node::clidoc;
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
        /// The node config file to check.
        file: PathBuf,
        /// Print nothing on success (errors still go to stderr).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Serve the config's models over an OpenAI-compatible HTTP API, without a gateway (for
    /// testing a node's backends, and as the no-gateway baseline in benchmarks). Any address
    /// but loopback requires an API key.
    ServeOpenai {
        /// Node config file whose [[models]] are served.
        #[arg(long, short)]
        config: PathBuf,
        /// HTTP listener address (host:port).
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
    /// Print the shell completion script for SHELL to stdout (the packages install them).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clidoc::Shell,
    },
    /// Print the man page to stdout, or with --dir write one page per command there.
    Man {
        /// Write edge-node.1 and a page per subcommand (edge-node-SUB.1) into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The documentation commands need no runtime.
    match &cli.cmd {
        Some(Cmd::Completions { shell }) => {
            return clidoc::print_completions(Cli::command(), *shell);
        }
        Some(Cmd::Man { dir }) => return man(dir.as_deref()),
        _ => {}
    }
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
        // Answered above, before the runtime.
        (Some(Cmd::Completions { .. } | Cmd::Man { .. }), _) => Ok(()),
        (None, Some(config)) => rt.block_on(run(config)),
        (None, None) => {
            eprintln!("error: --config FILE is required (see --help)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once, even where a message already shows its source.
            eprintln!("error: {}", nearpath_protocol::report::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn man(dir: Option<&std::path::Path>) -> ExitCode {
    let result = match dir {
        Some(dir) => clidoc::write_man_pages(Cli::command(), dir).map(|_| ()),
        None => clidoc::write_man(Cli::command(), &mut std::io::stdout()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the man pages: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The gateway's subscriber set-up (`nearpath_telemetry`): `[log]` level, format, colour and
/// OTLP export; an exporter that cannot be built is logged and the node runs without it.
fn init_tracing(cfg: &nearpath_config::LogConfig) {
    if let Err(e) = nearpath_telemetry::init(cfg, "nearpath-edge-node") {
        tracing::error!(error = %e, "logging set up without it");
    }
}

async fn run(config: PathBuf) -> anyhow::Result<()> {
    // The same load and checks as check-config: a file one accepts, the other does.
    let cfg = nearpath_config::load_node_checked(&config, &nearpath_edge_node::preflight)
        .map_err(anyhow::Error::msg)?;
    init_tracing(&cfg.log);
    let node = EdgeNode::new(cfg, NodeOptions::default())?;
    let result = node.run(shutdown_on_signal()).await;
    // The last spans (the drain) reach the collector before the process exits.
    nearpath_telemetry::shutdown();
    result?;
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
    init_tracing(&cfg.log);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_help_entry_of_edge_node_has_a_description() {
        Cli::command().debug_assert();
        let missing = clidoc::undocumented(&Cli::command());
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
