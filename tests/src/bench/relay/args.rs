//! The command-line arguments of `bench relay-*` and the shape of every video stream.

use super::*;

/// The shape of every video stream.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamShape {
    /// Frames per second of every stream.
    #[arg(long, default_value_t = 60)]
    pub fps: u32,
    /// Average bitrate of every stream, kbit/s.
    #[arg(long, default_value_t = 10_000)]
    pub kbps: u32,
    /// Size of each IDR frame, bytes.
    #[arg(long, default_value_t = 60_000)]
    pub idr_bytes: u32,
    /// Seconds from one IDR to the next.
    #[arg(long, default_value_t = 2.0)]
    pub idr_every_s: f64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RelayLatencyArgs {
    /// Seconds per measured window.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Measured windows, back to back on the same sessions (spread is reported across them).
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// Unrecorded seconds first (handshakes, congestion windows, allocator).
    #[arg(long, default_value_t = 2.0)]
    pub warmup_seconds: f64,
    /// Skip the third path: the gateway's relay code alone (`relay_frame`) in a bare quinn
    /// relay, a thread of this process on the gateway's CPU.
    #[arg(long)]
    pub no_bare: bool,
    /// Nice value for the gateway and this process, every thread (negative needs root). On a
    /// machine shared with other work it keeps that work from delaying the measured processes;
    /// 0 leaves the scheduler alone.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub nice: i32,
    #[command(flatten)]
    pub shape: StreamShape,
    #[command(flatten)]
    pub placement: Placement,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RelayCapacityArgs {
    /// The largest session count to try; the ramp runs every step of --steps below it, then it.
    #[arg(long, default_value_t = 150)]
    pub sessions: u32,
    /// Session counts of the ramp (comma-separated).
    #[arg(long, default_value = "25,50,100,150,200")]
    pub steps: String,
    /// Run only --sessions: no ramp of session counts, no bisection.
    #[arg(long)]
    pub only: bool,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Unrecorded seconds first.
    #[arg(long, default_value_t = 3.0)]
    pub warmup_seconds: f64,
    /// Players join one after another over this many seconds of the warm-up (0: all within
    /// one frame interval).
    #[arg(long, default_value_t = 2.0)]
    pub ramp_seconds: f64,
    /// Runs per session count; a count passes when most of its runs are clean.
    #[arg(long, default_value_t = 1)]
    pub repeats: u32,
    /// Extra runs that halve the interval between the last clean count and the first failing one.
    #[arg(long, default_value_t = 2)]
    pub bisect: u32,
    /// Keep ramping after a failing count.
    #[arg(long)]
    pub keep_going: bool,
    /// Game sessions each fake node serves (one QUIC connection per node); a GPU node streams
    /// a handful of sessions.
    #[arg(long, default_value_t = 4)]
    pub sessions_per_node: u32,
    /// Skip the same sessions served straight from the fake nodes (the generator's own limit).
    #[arg(long)]
    pub no_direct: bool,
    /// Diagnostic: run only the direct sessions (the generator's own limit); the summary then
    /// describes them, and the gateway columns are empty.
    #[arg(long, conflicts_with = "no_direct")]
    pub direct_only: bool,
    /// Write every received frame (player, seq, receive time, latency) of each run as CSV into
    /// this directory, for looking at when late frames happened.
    #[arg(long)]
    pub dump: Option<std::path::PathBuf>,
    /// Nice value for the gateway and this process, every thread (negative needs root). On a
    /// machine shared with other work it keeps that work from delaying the measured processes;
    /// 0 leaves the scheduler alone.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub nice: i32,
    /// How the players reach the gateway: `quic` (native `nearpath/1`) or `webtransport` (a
    /// browser's WebTransport session: HTTP/3 CONNECT, frames on WebTransport uni streams). The
    /// direct sessions are native either way.
    #[arg(long, value_enum, default_value_t = PlayerTransport::Quic)]
    pub transport: PlayerTransport,
    #[command(flatten)]
    pub shape: StreamShape,
    #[command(flatten)]
    pub placement: Placement,
}

/// The players' transport (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlayerTransport {
    Quic,
    Webtransport,
}

impl PlayerTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            PlayerTransport::Quic => "quic",
            PlayerTransport::Webtransport => "webtransport",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RelayOverloadArgs {
    /// Sessions per run: this times the relay's capacity (`--sessions`, or what `--measure`
    /// finds), rounded up.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Find the capacity first with the relay-capacity ramp (same options) instead of taking
    /// `--sessions` as the capacity.
    #[arg(long)]
    pub measure: bool,
    /// Delivered frames must stay within this latency at the 99th percentile, milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub target_p99_ms: f64,
    /// `--sessions` is the relay's capacity here (the largest clean count of relay-capacity on
    /// this machine and placement).
    #[command(flatten)]
    pub run: RelayCapacityArgs,
}
