//! The `gateway` command line: `run`, `demo`, `check-config`, `geo lookup`.

use crate::demo;
use anyhow::Context;
use clap::{Parser, Subcommand};
use nearpath_gateway::Gateway;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "gateway", version, about = "Nearpath edge gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a configured gateway.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a self-contained demo: gateway, one in-process edge node (built-in game and inference
    /// simulator), embedded GeoIP database, temporary store, development credentials.
    Demo {
        /// Client HTTP listener (OpenAI API, player page).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin HTTP listener (admin API, /metrics).
        #[arg(long, default_value = "127.0.0.1:8081")]
        admin_listen: SocketAddr,
        /// QUIC listener (UDP) for edge nodes and native clients.
        #[arg(long, default_value = "127.0.0.1:4433")]
        quic_listen: SocketAddr,
        /// Keep the demo's store here instead of a temporary file.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Check a gateway config file exactly as `run` would before serving (certificates, GeoIP
    /// databases, store path, placeholders): a one-line summary (exit 0) or every error with
    /// its file, line and column (exit 2).
    CheckConfig {
        file: PathBuf,
        /// Print nothing on success (errors still go to stderr).
        #[arg(long, short)]
        quiet: bool,
    },
    /// GeoIP tools.
    Geo {
        #[command(subcommand)]
        cmd: GeoCmd,
    },
}

#[derive(Subcommand)]
enum GeoCmd {
    /// Look addresses up: one JSON object per line, with the geofence decisions for each GPU
    /// class named in the config.
    Lookup {
        /// Gateway config (database, overrides, geofence). Default: built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A MaxMind DB file to use instead of the configured one.
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(required = true)]
        ips: Vec<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { file, quiet } => check_config(&file, quiet),
        Cmd::Geo {
            cmd: GeoCmd::Lookup { config, db, ips },
        } => geo_lookup(config, db, &ips),
        Cmd::Run { config } => run_async(async move {
            // The same load and checks as check-config: a file one accepts, the other does.
            let cfg = nearpath_config::load_gateway_checked(&config, &nearpath_gateway::preflight)
                .map_err(anyhow::Error::msg)?;
            nearpath_gateway::init_tracing(&cfg.log);
            Gateway::load(cfg)?.run(shutdown_on_signal()).await?;
            Ok(())
        }),
        Cmd::Demo {
            listen,
            admin_listen,
            quic_listen,
            store,
        } => run_async(async move {
            let opts = demo::DemoOptions {
                listen,
                admin_listen,
                quic_listen,
                store,
            };
            demo::run(opts, shutdown_on_signal()).await
        }),
    }
}

fn run_async(f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        t.cancel();
    });
    token
}

fn check_config(file: &std::path::Path, quiet: bool) -> ExitCode {
    match nearpath_config::load_gateway_checked(file, &nearpath_gateway::preflight) {
        Ok(cfg) => {
            if !quiet {
                println!("{}: ok: {}", file.display(), cfg.summary());
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
    }
}

fn geo_lookup(config: Option<PathBuf>, db: Option<PathBuf>, ips: &[String]) -> ExitCode {
    let result = (|| -> anyhow::Result<bool> {
        let mut cfg = match &config {
            Some(path) => nearpath_config::load_gateway(path).map_err(anyhow::Error::msg)?,
            None => nearpath_config::GatewayConfig::default(),
        };
        if let Some(db) = db {
            cfg.geo.database = Some(db);
        }
        let geo = nearpath_geo::GeoDb::open(&cfg.geo).context("opening the GeoIP database")?;
        let policy = nearpath_geo::Policy::compile(&cfg.geofence)
            .map_err(|e| anyhow::anyhow!("compiling the geofence: {e}"))?;
        // The classes to report: every class the geofence names, plus two uncontrolled ones.
        let mut classes: Vec<String> = cfg.geofence.controlled_gpu_classes.clone();
        for extra in ["rtx3080", "cpu"] {
            if !classes.iter().any(|c| c == extra) {
                classes.push(extra.to_string());
            }
        }
        let mut all_ok = true;
        for raw in ips {
            match raw.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    let report = nearpath_geo::lookup_report(&geo, &policy, ip, &classes);
                    println!("{report}");
                }
                Err(_) => {
                    all_ok = false;
                    println!(
                        "{}",
                        serde_json::json!({"ip": raw, "error": format!("{raw:?} is not an IPv4 or IPv6 address")})
                    );
                }
            }
        }
        Ok(all_ok)
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
