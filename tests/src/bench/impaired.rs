//! `bench game-impaired`: one 720p60 session with the node behind the seeded UDP impairment relay
//! (gateway, node and client in this process; see `nearpath_tests::game_impaired`), and
//! `bench impair`, the relay alone for manual use.

use nearpath_config::CongestionController;
use nearpath_tests::game_impaired::{run, Scenario};
use nearpath_tests::impair::{Impairment, UdpRelay};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// A path's impairment, as flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PathArgs {
    /// One-way delay, ms.
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
    /// Jitter: each datagram's delay varies uniformly by up to this, ms.
    #[arg(long, default_value_t = 0.0)]
    pub jitter_ms: f64,
    /// Let jitter reorder datagrams.
    #[arg(long)]
    pub reorder: bool,
    /// Random loss, 0..1.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Bursty loss: probability per datagram of starting a burst (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub burst_p: f64,
    /// Bursty loss: mean burst length in datagrams.
    #[arg(long, default_value_t = 5.0)]
    pub burst_len: f64,
    /// Bottleneck rate, kbit/s (0: none).
    #[arg(long, default_value_t = 0)]
    pub rate_kbps: u64,
    /// The bottleneck's queue, as the longest wait in it, ms.
    #[arg(long, default_value_t = 100.0)]
    pub queue_ms: f64,
}

impl PathArgs {
    pub fn impairment(&self) -> Impairment {
        let mut i = Impairment::delay(self.delay_ms)
            .with_jitter(self.jitter_ms, self.reorder)
            .with_loss(self.loss);
        if self.burst_p > 0.0 {
            i = i.with_bursts(self.burst_p, self.burst_len);
        }
        if self.rate_kbps > 0 {
            i = i.with_rate(self.rate_kbps, self.queue_ms);
        }
        i
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct GameImpairedArgs {
    #[command(flatten)]
    pub path: PathArgs,
    /// Impair only node → gateway (default: both directions).
    #[arg(long)]
    pub up_only: bool,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Seconds before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Black the path out this many seconds into the measured time...
    #[arg(long)]
    pub blackout_at_s: Option<f64>,
    /// ...for this long, ms.
    #[arg(long, default_value_t = 3000)]
    pub blackout_ms: u64,
    /// The relay's seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The node's congestion controller: bbr, cubic or new_reno.
    #[arg(long, default_value = "bbr")]
    pub congestion: String,
    /// The node's reordering tolerance, packets.
    #[arg(long, default_value_t = 3)]
    pub reorder_threshold: u32,
    /// The session's bitrate, kbit/s.
    #[arg(long, default_value_t = 10_000)]
    pub bitrate_kbps: u32,
    /// The gateway's game.frame_budget_ms.
    #[arg(long, default_value_t = 2_000)]
    pub frame_budget_ms: u64,
}

pub async fn run_game(a: GameImpairedArgs) -> anyhow::Result<()> {
    let congestion = match a.congestion.as_str() {
        "bbr" => CongestionController::Bbr,
        "cubic" => CongestionController::Cubic,
        "new_reno" | "newreno" => CongestionController::NewReno,
        other => anyhow::bail!("--congestion {other:?}: expected bbr, cubic or new_reno"),
    };
    let up = a.path.impairment();
    let down = if a.up_only {
        Impairment::default()
    } else {
        up.clone()
    };
    let s = Scenario {
        up,
        down,
        seconds: a.seconds,
        warmup: a.warmup,
        blackout: a.blackout_at_s.map(|at| {
            (
                Duration::from_secs_f64(at),
                Duration::from_millis(a.blackout_ms),
            )
        }),
        seed: a.seed,
        congestion,
        reorder_packet_threshold: a.reorder_threshold,
        bitrate_kbps: a.bitrate_kbps,
        gateway_frame_budget_ms: a.frame_budget_ms,
        ..Scenario::default()
    };
    let r = run(&s).await?;
    println!(
        "{:>8} {:>8} {:>10} {:>10} {:>10} {:>9} {:>8} {:>6} {:>9}",
        "fps",
        "frames",
        "p50 ms",
        "p99 ms",
        "recv kbps",
        "enc kbps",
        "skipped",
        "reset",
        "evictions"
    );
    println!(
        "{:>8.1} {:>8} {:>10.1} {:>10.1} {:>10.0} {:>9} {:>8} {:>6} {:>9}",
        r.fps,
        r.frames,
        r.latency_p50_ms,
        r.latency_p99_ms,
        r.received_kbps,
        r.node_bitrate_kbps,
        r.node_skipped,
        r.node_reset,
        r.node_evictions
    );
    let mut j = r.json();
    j["bench"] = "game-impaired".into();
    j["congestion"] = a.congestion.clone().into();
    j["path"] = format!("{:?}", s.up).into();
    println!("{j}");
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct ImpairArgs {
    /// Where to listen.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where to forward.
    #[arg(long)]
    pub target: SocketAddr,
    /// Local IP to forward from.
    #[arg(long, default_value = "127.0.0.1")]
    pub upstream_ip: IpAddr,
    #[command(flatten)]
    pub path: PathArgs,
    /// Impair only listen → target (default: both directions).
    #[arg(long)]
    pub up_only: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub async fn run_impair(a: ImpairArgs) -> anyhow::Result<()> {
    let relay = UdpRelay::start(a.listen, a.target, a.upstream_ip, a.seed).await?;
    let imp = a.path.impairment();
    if !a.up_only {
        relay.set_down(imp.clone());
    }
    relay.set_up(imp);
    eprintln!("relaying {} -> {} (ctrl-c stops)", relay.addr(), a.target);
    tokio::signal::ctrl_c().await?;
    println!(
        "{}",
        serde_json::json!({"bench": "impair", "up": relay.up_stats(), "down": relay.down_stats()})
    );
    Ok(())
}
