//! The `gateway` command line: `run`, `demo`, `check-config`, `cert`, `geo lookup`,
//! `completions`, `man`.

use crate::demo;
use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use nearpath_edge_node::clidoc;
use nearpath_gateway::cert::CertOrigin;
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
    /// Run a configured gateway. Without quic.cert_file and quic.key_file it creates a
    /// self-signed certificate on its first start (quic.generated_cert_dir, by default next to
    /// the SQLite file) and reuses it afterwards; it prints the certificate's pin.
    Run {
        /// Gateway config file (see config/examples/gateway.toml).
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
        /// The gateway config file to check.
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
    /// Print the shell completion script for SHELL to stdout (the packages install them).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clidoc::Shell,
    },
    /// Print the man page to stdout, or with --dir write one page per command there.
    Man {
        /// Write gateway.1 and a page per subcommand (gateway-SUB.1) into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// QUIC certificate tools: create a self-signed pair, print a certificate's pin.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create a self-signed certificate and key, quic-cert.pem and quic-key.pem (mode 0600), in
    /// DIR and print the pin nodes need. Existing files are never overwritten.
    Generate {
        /// Folder to write the files to (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// A DNS name or IP address the certificate names (repeatable). Default: localhost.
        #[arg(long = "name", value_name = "DNS")]
        names: Vec<String>,
    },
    /// Print the pin of a PEM certificate (the first one in FILE): the SHA-256 of its DER
    /// encoding as 64 hex digits, the form of nodes' pinned_cert_sha256.
    Pin {
        /// The PEM certificate file.
        file: PathBuf,
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
        /// IPv4 or IPv6 addresses to look up.
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
        Cmd::Cert {
            cmd: CertCmd::Generate { out, names },
        } => cert_generate(&out, names),
        Cmd::Cert {
            cmd: CertCmd::Pin { file },
        } => cert_pin(&file),
        Cmd::Completions { shell } => clidoc::print_completions(Cli::command(), shell),
        Cmd::Man { dir } => man(Cli::command(), dir.as_deref()),
        Cmd::Run { config } => run_async(async move {
            // The same load and checks as check-config: a file one accepts, the other does.
            let cfg = nearpath_config::load_gateway_checked(&config, &nearpath_gateway::preflight)
                .map_err(anyhow::Error::msg)?;
            nearpath_gateway::init_tracing(&cfg.log);
            let gateway = Gateway::load(cfg)?;
            print_pin(&gateway);
            let result = gateway.run(shutdown_on_signal()).await;
            // The last spans reach the collector before the process exits.
            nearpath_telemetry::shutdown();
            result?;
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

/// Tells the operator, on stdout, which certificate the gateway serves and the line a node's
/// config needs to trust it.
fn print_pin(gateway: &Gateway) {
    if let Some(files) = gateway.cert_files() {
        let how = match files.origin {
            CertOrigin::Created => "created now",
            CertOrigin::Reused => "self-signed, created on an earlier start",
            CertOrigin::Configured => "configured",
        };
        println!(
            "QUIC certificate {} ({how}); key {}",
            files.cert_file.display(),
            files.key_file.display()
        );
    }
    println!("nodes trust this gateway with, in edge-node.toml [gateway]:");
    println!("pinned_cert_sha256 = \"{}\"", gateway.cert().sha256_hex());
}

fn cert_generate(out: &std::path::Path, names: Vec<String>) -> ExitCode {
    let names = if names.is_empty() {
        vec!["localhost".to_string()]
    } else {
        names
    };
    match nearpath_gateway::cert::create(out, &names) {
        Ok(made) => {
            println!("certificate {}", made.files.cert_file.display());
            println!("key         {}", made.files.key_file.display());
            println!(
                "use them with [quic] cert_file and key_file; nodes trust them with, in \
                 edge-node.toml [gateway]:"
            );
            println!("pinned_cert_sha256 = \"{}\"", made.pair.sha256_hex());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cert_pin(file: &std::path::Path) -> ExitCode {
    match nearpath_gateway::cert::pin_of_file(file) {
        Ok(pin) => {
            println!("{pin}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `man` for the binaries of this crate: the page to stdout, or every page into `dir`.
pub fn man(cmd: clap::Command, dir: Option<&std::path::Path>) -> ExitCode {
    let result = match dir {
        Some(dir) => clidoc::write_man_pages(cmd, dir).map(|_| ()),
        None => clidoc::write_man(cmd, &mut std::io::stdout()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the man pages: {e}");
            ExitCode::FAILURE
        }
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
            eprintln!("error: {}", nearpath_protocol::report::chain(e.as_ref()));
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
            eprintln!("error: {}", nearpath_protocol::report::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_help_entry_of_gateway_has_a_description() {
        Cli::command().debug_assert();
        let missing = clidoc::undocumented(&Cli::command());
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
