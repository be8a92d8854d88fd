//! `nearpath`: the client CLI for apps and players, speaking QUIC (ALPN `nearpath/1`) to a
//! gateway.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use nearpath_protocol::{Client, InferEvent, ServerVerify};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "nearpath", version, about = "Nearpath client: inference and games over QUIC")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Conn {
    /// Gateway QUIC address (host:port).
    #[arg(long, default_value = "127.0.0.1:4433")]
    gateway: String,
    /// API key (or NEARPATH_API_KEY).
    #[arg(long, env = "NEARPATH_API_KEY", default_value = "demo")]
    key: String,
    /// Trust this CA certificate file (PEM).
    #[arg(long, conflicts_with_all = ["pin", "insecure"])]
    ca: Option<PathBuf>,
    /// Trust a certificate with this SHA-256 (hex), as `gateway demo` prints.
    #[arg(long, conflicts_with = "insecure")]
    pin: Option<String>,
    /// Accept any certificate. For local development only: it gives no protection.
    #[arg(long)]
    insecure: bool,
    /// TLS server name (default: the host part of --gateway).
    #[arg(long)]
    server_name: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stream a chat completion to stdout; time to first token and tokens/s go to stderr.
    Infer {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, short)]
        model: String,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// The user message.
        prompt: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Infer { conn, model, max_tokens, prompt } => infer(conn, model, max_tokens, prompt).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn connect(c: &Conn) -> anyhow::Result<Client> {
    let addr: SocketAddr = match c.gateway.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(&c.gateway)
            .await
            .with_context(|| format!("resolving {}", c.gateway))?
            .next()
            .with_context(|| format!("{} has no addresses", c.gateway))?,
    };
    let verify = if c.insecure {
        eprintln!("warning: --insecure: the gateway's certificate is NOT checked (local development only)");
        ServerVerify::InsecureDangerous
    } else if let Some(ca) = &c.ca {
        ServerVerify::CaFile(ca.clone())
    } else if let Some(pin) = &c.pin {
        ServerVerify::PinnedSha256(nearpath_protocol::tls::parse_sha256_hex(pin)?)
    } else {
        bail!("say how to check the gateway's certificate: --ca FILE, --pin SHA256, or --insecure for local development");
    };
    let host = c.server_name.clone().unwrap_or_else(|| {
        c.gateway
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|| c.gateway.clone())
    });
    Ok(Client::connect(addr, &host, verify).await?)
}

async fn infer(conn: Conn, model: String, max_tokens: u32, prompt: String) -> anyhow::Result<()> {
    let client = connect(&conn).await?;
    let body = serde_json::json!({
        "model": model, "stream": true, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    });
    let started = Instant::now();
    let mut stream = client.infer(&conn.key, &body.to_string()).await?;
    let mut first: Option<f64> = None;
    let mut tokens = 0u32;
    let mut out = std::io::stdout();
    loop {
        match stream.next().await? {
            Some(InferEvent::Started(_)) => {}
            Some(InferEvent::Token(t)) => {
                first.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1000.0);
                tokens += 1;
                write!(out, "{}", t.text)?;
                out.flush()?;
            }
            Some(InferEvent::Done(d)) => {
                writeln!(out)?;
                let total = started.elapsed().as_secs_f64();
                let ttft = first.unwrap_or(total * 1000.0);
                let gen_s = (total - ttft / 1000.0).max(1e-9);
                eprintln!(
                    "ttft {ttft:.1} ms, {tokens} tokens in {total:.3} s, {:.1} tokens/s after the first, finish {}, usage {}+{}",
                    (tokens.saturating_sub(1)) as f64 / gen_s,
                    d.finish_reason,
                    d.prompt_tokens,
                    d.completion_tokens
                );
                return Ok(());
            }
            Some(InferEvent::Error(e)) => bail!("{} ({})", e.message, e.code),
            None => bail!("the gateway ended the stream without finishing"),
        }
    }
}
