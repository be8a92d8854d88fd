//! Placing and starting the system under test for a benchmark, and printing results.

use super::child::Child;
use super::serve::Sim;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where each process runs. The machine has two cores: by default the gateway gets core 0 to
/// itself and the nodes and the load generator share core 1.
#[derive(Debug, Clone, clap::Args)]
pub struct Placement {
    /// CPUs of the gateway process (comma-separated).
    #[arg(long, default_value = "0")]
    pub gateway_cpus: String,
    /// CPUs of the node processes and of this load generator.
    #[arg(long, default_value = "1")]
    pub worker_cpus: String,
    /// CPUs of the node processes, when they should differ from --worker-cpus.
    #[arg(long)]
    pub node_cpus: Option<String>,
    /// Runtime worker threads of each node process.
    #[arg(long, default_value_t = 1)]
    pub node_threads: usize,
    /// Gateway runtime worker threads (0: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub gateway_threads: usize,
    /// Pin nothing (every process may use every CPU).
    #[arg(long)]
    pub no_pin: bool,
    /// Directory for the gateway's SQLite store (default: the system temp dir).
    #[arg(long)]
    pub store_dir: Option<PathBuf>,
    /// Run the gateway from this `bench` binary (its hidden `serve-gateway`) instead of this
    /// one: another build of the gateway under the same load, e.g. the main branch's.
    #[arg(long)]
    pub gateway_exe: Option<PathBuf>,
    /// Run the gateway under a CPU quota of this share of one core, in percent (a cgroup with
    /// 10 ms periods; needs root and a writable cgroup `cpu` controller): a smaller relay whose
    /// capacity this machine's load generator can exceed (`relay-overload`). Default: none.
    #[arg(long)]
    pub gateway_cpu_quota_percent: Option<u32>,
    /// The gateway's `game.frame_budget_ms` (default: the gateway's own, 100).
    #[arg(long)]
    pub gateway_frame_budget_ms: Option<u64>,
    /// The gateway's `quic.recv_buffer_bytes`: the UDP receive buffer its QUIC socket asks for
    /// (default: the gateway's own).
    #[arg(long)]
    pub gateway_recv_buffer_bytes: Option<usize>,
    /// The gateway's `http.header_read_timeout_ms`, which also closes an HTTP/1.1 keep-alive
    /// connection left idle that long (default: the gateway's own, 10000).
    #[arg(long)]
    pub gateway_header_read_timeout_ms: Option<u64>,
}

impl Placement {
    pub fn gateway_cpus(&self) -> String {
        if self.no_pin {
            String::new()
        } else {
            self.gateway_cpus.clone()
        }
    }

    pub fn worker_cpus(&self) -> String {
        if self.no_pin {
            String::new()
        } else {
            self.worker_cpus.clone()
        }
    }

    pub fn node_cpus(&self) -> String {
        match (&self.node_cpus, self.no_pin) {
            (_, true) => String::new(),
            (Some(c), false) => c.clone(),
            (None, false) => self.worker_cpus.clone(),
        }
    }

    pub fn describe(&self) -> String {
        if self.no_pin {
            "unpinned".into()
        } else {
            format!(
                "gateway on CPU {} ({}), nodes on CPU {} ({} thread(s)), load generator on CPU {}",
                self.gateway_cpus,
                match self.gateway_threads {
                    0 => "current-thread runtime".to_string(),
                    n => format!("{n} runtime worker thread(s)"),
                },
                self.node_cpus(),
                self.node_threads,
                self.worker_cpus
            )
        }
    }
}

/// Parses a CPU list such as `0` or `0,1`; empty means no pinning.
pub fn parse_cpus(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<usize>()
                .map_err(|e| anyhow::anyhow!("CPU list {s:?}: {p:?}: {e}"))
        })
        .collect()
}

/// A gateway child and what the load generator needs from it.
pub struct GatewayProc {
    pub child: Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub quic: SocketAddr,
    pub sha256: String,
    pub token: String,
    pub api_key: String,
    pub admin_token: String,
}

/// Liveness settings of the gateway under test.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub heartbeat_ms: u64,
    pub missed_before_gone: u32,
}

impl Default for Liveness {
    /// The gateway's own defaults (`[nodes]` in the config).
    fn default() -> Self {
        let n = nearpath_config::NodesConfig::default();
        Liveness {
            heartbeat_ms: n.heartbeat_ms,
            missed_before_gone: n.missed_heartbeats_before_gone,
        }
    }
}

pub fn start_gateway(p: &Placement, live: Liveness, nofile: u64) -> anyhow::Result<GatewayProc> {
    let mut args: Vec<String> = vec![
        "serve-gateway".into(),
        "--cpus".into(),
        p.gateway_cpus(),
        "--threads".into(),
        p.gateway_threads.to_string(),
        "--heartbeat-ms".into(),
        live.heartbeat_ms.to_string(),
        "--missed-heartbeats".into(),
        live.missed_before_gone.to_string(),
        "--nofile".into(),
        nofile.to_string(),
    ];
    if let Some(d) = &p.store_dir {
        args.push("--store-dir".into());
        args.push(d.display().to_string());
    }
    if let Some(q) = p.gateway_cpu_quota_percent {
        args.push("--cpu-quota-percent".into());
        args.push(q.to_string());
    }
    if let Some(ms) = p.gateway_frame_budget_ms {
        args.push("--frame-budget-ms".into());
        args.push(ms.to_string());
    }
    if let Some(bytes) = p.gateway_recv_buffer_bytes {
        args.push("--recv-buffer-bytes".into());
        args.push(bytes.to_string());
    }
    if let Some(ms) = p.gateway_header_read_timeout_ms {
        args.push("--header-read-timeout-ms".into());
        args.push(ms.to_string());
    }
    let child = match &p.gateway_exe {
        Some(exe) => {
            Child::spawn_program("gateway", exe.as_os_str(), &args, Duration::from_secs(30))?
        }
        None => Child::spawn("gateway", &args, Duration::from_secs(30))?,
    };
    Ok(GatewayProc {
        http: child.addr("http")?,
        admin: child.addr("admin")?,
        quic: child.addr("quic")?,
        sha256: child.str("sha256")?,
        token: child.str("token")?,
        api_key: child.str("api_key")?,
        admin_token: child.str("admin_token")?,
        child,
    })
}

/// A process with edge nodes and/or the direct backend.
pub struct NodesProc {
    pub child: Child,
    pub backend: Option<SocketAddr>,
}

pub struct NodesSpec<'a> {
    pub gateway: Option<&'a GatewayProc>,
    pub nodes: u32,
    pub capacity: u32,
    pub sim: Sim,
    pub backend: bool,
    pub cpus: String,
    pub threads: usize,
    pub nofile: u64,
}

pub fn start_nodes(s: NodesSpec<'_>) -> anyhow::Result<NodesProc> {
    let mut args: Vec<String> = vec![
        "serve-nodes".into(),
        "--cpus".into(),
        s.cpus,
        "--threads".into(),
        s.threads.to_string(),
        "--nofile".into(),
        s.nofile.to_string(),
        "--nodes".into(),
        s.nodes.to_string(),
        "--capacity".into(),
        s.capacity.to_string(),
        "--ttft-ms".into(),
        s.sim.ttft_ms.to_string(),
        "--tokens-per-s".into(),
        s.sim.tokens_per_s.to_string(),
    ];
    if let Some(gw) = s.gateway {
        args.extend([
            "--gateway-quic".into(),
            gw.quic.to_string(),
            "--sha256".into(),
            gw.sha256.clone(),
            "--token".into(),
            gw.token.clone(),
        ]);
    }
    if s.backend {
        args.extend(["--backend-listen".into(), "127.0.0.1:0".into()]);
    }
    let name = if s.nodes > 0 {
        "nodes"
    } else {
        "direct backend"
    };
    let child = Child::spawn(name, &args, Duration::from_secs(90))?;
    let backend = match &child.info["backend"] {
        serde_json::Value::String(_) => Some(child.addr("backend")?),
        _ => None,
    };
    Ok(NodesProc { child, backend })
}

/// Stops children off the async threads (stopping waits).
pub async fn stop_all(children: Vec<Child>) {
    let _ = tokio::task::spawn_blocking(move || {
        for c in children {
            c.stop(Duration::from_secs(15));
        }
    })
    .await;
}

/// A text table with right-aligned columns after the first.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for (i, r) in self.rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(c, s)| {
                    if c == 0 {
                        format!("{s:<w$}", w = width[c])
                    } else {
                        format!("{s:>w$}", w = width[c])
                    }
                })
                .collect();
            println!("  {}", line.join("  "));
            if i == 0 {
                println!(
                    "  {}",
                    width
                        .iter()
                        .map(|w| "-".repeat(*w))
                        .collect::<Vec<_>>()
                        .join("  ")
                );
            }
        }
    }
}

/// `PASS`/`MISS` against a target.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("0").unwrap(), vec![0]);
        assert_eq!(parse_cpus(" 0, 1 ").unwrap(), vec![0, 1]);
        assert!(parse_cpus("").unwrap().is_empty());
        assert!(parse_cpus("x").is_err());
    }
}
