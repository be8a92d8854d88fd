//! `bench relay-latency`, `bench relay-capacity` and `bench relay-overload`: the game relay (frames node -> gateway ->
//! native player, one QUIC uni stream per frame) driven with pre-encoded frames.
//!
//! No encoder runs. A [`FramePlan`] holds a realistic size sequence (an IDR every few seconds,
//! P frames sized so that the stream averages the target bitrate) over arbitrary payload bytes,
//! since nobody decodes them. Fake nodes speak `nearpath-node/1` by hand: they register serving
//! the game [`GAME`], answer the gateway's `Open{Game}` with `Accepted`, and send each frame on
//! its own uni stream with `capture_ts_us` set to the send time. The same process also serves
//! players directly (ALPN `nearpath/1`: `PlayRequest` -> `PlayStarted` -> frames), so the path
//! without the gateway carries the same frames at the same time. Players are the native client
//! library (`Client::play`); a frame's latency is the time its whole payload has been read,
//! minus `capture_ts_us`, on one host clock.

use super::client::Conn;
use super::os::{loadavg_1m, mem_status, pin_current_thread, CpuMeter};
use super::stats::{num, Repeated, Summary};
use super::system::{
    parse_cpus, start_gateway, stop_all, verdict, GatewayProc, Liveness, Placement, Table,
};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use nearpath_protocol::message::{Message, PlayRequest, PlayStarted};
use nearpath_protocol::stream::{recv_frame_header, relay_frame, send, send_frame, FramedRecv};
use nearpath_protocol::tls::{
    client_config, negotiated_alpn, parse_sha256_hex, self_signed, server_config, ServerVerify,
    TransportOptions,
};
use nearpath_protocol::{
    net, unix_micros, Client, FrameHeader, FrameStream, PlayControl, PlayParams, ALPN_CLIENT,
    ALPN_NODE, MAX_CONTROL_FRAME, MAX_VIDEO_FRAME,
};
use nearpath_tests::fake_node::{
    self, heartbeat_loop, serve_sessions, FakeNode, HeartbeatCount, OpenedGame, Registration,
    Serving,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Sets the nice value of every thread of process `pid` (Linux keeps one per thread; threads
/// started later inherit their creator's). Returns how many threads were changed.
pub fn renice(pid: u32, nice: i32) -> anyhow::Result<usize> {
    let dir = format!("/proc/{pid}/task");
    let mut changed = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // SAFETY: setpriority takes plain integers; a thread that exited meanwhile fails with
        // ESRCH, which is ignored.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        if rc == 0 {
            changed += 1;
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                bail!("setting nice {nice} on thread {tid} of process {pid}: {e}");
            }
        }
    }
    Ok(changed)
}

/// The nice value in the text of `/proc/<pid>/autogroup` (`/autogroup-36 nice 0`).
pub fn parse_autogroup_nice(text: &str) -> Option<i32> {
    let mut words = text.split_whitespace().skip_while(|w| *w != "nice");
    words.next()?;
    words.next()?.parse().ok()
}

/// This process's scheduling priority for a run, put back when dropped. Linux gives every
/// session (autogroup) a fair share of a CPU whatever its threads' nice values, so with
/// `kernel.sched_autogroup_enabled` a compile job in another session still takes half of the
/// gateway's core at any thread nice; the autogroup's own nice is set as well.
pub struct Priority {
    nice: i32,
    autogroup_before: Option<i32>,
}

const AUTOGROUP: &str = "/proc/self/autogroup";

impl Priority {
    /// Sets `nice` on every thread of this process (the gateway started later inherits it)
    /// and on its autogroup when there is one; 0 changes nothing.
    pub fn apply(nice: i32) -> anyhow::Result<Priority> {
        let mut p = Priority {
            nice,
            autogroup_before: None,
        };
        if nice == 0 {
            return Ok(p);
        }
        renice(std::process::id(), nice)?;
        if let Some(before) = std::fs::read_to_string(AUTOGROUP)
            .ok()
            .as_deref()
            .and_then(parse_autogroup_nice)
        {
            std::fs::write(AUTOGROUP, nice.to_string())
                .with_context(|| format!("writing nice {nice} to {AUTOGROUP}"))?;
            p.autogroup_before = Some(before);
        }
        Ok(p)
    }

    pub fn describe(&self) -> String {
        match (self.nice, self.autogroup_before) {
            (0, _) => String::new(),
            (n, Some(_)) => {
                format!("; gateway and generator threads and their session's autogroup at nice {n}")
            }
            (n, None) => format!("; gateway and generator threads at nice {n}"),
        }
    }
}

impl Drop for Priority {
    fn drop(&mut self) {
        if let Some(before) = self.autogroup_before {
            let _ = std::fs::write(AUTOGROUP, before.to_string());
        }
    }
}

/// Renices the gateway child explicitly too, whichever thread spawned it.
fn renice_gateway(gw: &GatewayProc, nice: i32) -> anyhow::Result<()> {
    if nice != 0 {
        renice(gw.child.pid, nice)?;
    }
    Ok(())
}

/// The title every fake node serves.
pub const GAME: &str = "bench";
/// What the gateway asks of its QUIC socket by default (`quic.recv_buffer_bytes`).
const GATEWAY_RECV_BUFFER: usize = 4 * 1024 * 1024;
/// Session ids of the paths without the gateway, fixed and distinct from each other so that a
/// frame on the wrong connection is caught by the client's session check (the gateway's own
/// ids are random).
const DIRECT_SESSION_BASE: u64 = 1 << 40;
const BARE_SESSION: u64 = 1 << 41;
/// A player that has seen no frame for this long after the last one was due has all it will get.
const QUIET: Duration = Duration::from_secs(3);

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
    #[command(flatten)]
    pub shape: StreamShape,
    #[command(flatten)]
    pub placement: Placement,
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

/// Why a [`StreamShape`] cannot be turned into frames.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("--fps must be between 1 and 1000, got {0}")]
    Fps(u32),
    #[error("--idr-every-s must be positive and finite, got {0}")]
    IdrInterval(f64),
    #[error("an IDR every {gop} frames leaves no P frames: raise --idr-every-s")]
    NoPFrames { gop: usize },
    #[error(
        "an IDR of {idr} bytes every {gop} frames leaves {left} bytes for {p_frames} P frames at {kbps} kbit/s \
         (at least {min} each): raise --kbps or lower --idr-bytes"
    )]
    Budget {
        idr: u32,
        gop: usize,
        kbps: u32,
        p_frames: usize,
        left: i64,
        min: u32,
    },
    #[error("frames of {0} bytes exceed the protocol's {MAX_VIDEO_FRAME}-byte limit")]
    TooLarge(u32),
}

/// A pre-encoded stream: frame sizes of one group of pictures (IDR first) over shared payload
/// bytes. Sessions start at different places in the group, so their IDRs do not coincide.
#[derive(Debug, Clone)]
pub struct FramePlan {
    sizes: Vec<u32>,
    payload: Bytes,
    fps: u32,
}

/// The smallest P frame the plan makes (a nearly static scene still costs a few packets).
const MIN_P_FRAME: u32 = 500;

impl FramePlan {
    pub fn new(shape: &StreamShape, seed: u64) -> Result<FramePlan, PlanError> {
        if shape.fps == 0 || shape.fps > 1000 {
            return Err(PlanError::Fps(shape.fps));
        }
        if !(shape.idr_every_s.is_finite() && shape.idr_every_s > 0.0) {
            return Err(PlanError::IdrInterval(shape.idr_every_s));
        }
        let gop = ((shape.fps as f64 * shape.idr_every_s).round() as usize).max(1);
        let p_frames = gop - 1;
        if p_frames == 0 {
            return Err(PlanError::NoPFrames { gop });
        }
        let per_frame = shape.kbps as f64 * 1000.0 / 8.0 / shape.fps as f64;
        let total = (per_frame * gop as f64).round() as i64;
        let left = total - shape.idr_bytes as i64;
        if left < p_frames as i64 * MIN_P_FRAME as i64 {
            return Err(PlanError::Budget {
                idr: shape.idr_bytes,
                gop,
                kbps: shape.kbps,
                p_frames,
                left,
                min: MIN_P_FRAME,
            });
        }
        // P frames vary by +-30% around their mean, as a moving scene does; the weights are
        // scaled so the group adds up to the bitrate exactly.
        let mut state = seed | 1;
        let weights: Vec<f64> = (0..p_frames)
            .map(|_| 0.7 + 0.6 * unit(&mut state))
            .collect();
        let scale = left as f64 / weights.iter().sum::<f64>();
        let mut sizes = vec![shape.idr_bytes];
        sizes.extend(
            weights
                .iter()
                .map(|w| ((w * scale).round() as u32).max(MIN_P_FRAME)),
        );
        // Rounding leaves a few bytes over or under: the largest P frame absorbs them.
        let sum: i64 = sizes.iter().map(|&s| s as i64).sum();
        let biggest = (1..sizes.len()).max_by_key(|&i| sizes[i]).unwrap_or(1);
        sizes[biggest] = (sizes[biggest] as i64 + total - sum).max(MIN_P_FRAME as i64) as u32;
        let max = sizes.iter().copied().max().unwrap_or(0);
        if max as usize > MAX_VIDEO_FRAME {
            return Err(PlanError::TooLarge(max));
        }
        let payload: Vec<u8> = (0..max).map(|_| (unit(&mut state) * 256.0) as u8).collect();
        Ok(FramePlan {
            sizes,
            payload: Bytes::from(payload),
            fps: shape.fps,
        })
    }

    /// Frames from one IDR to the next.
    pub fn gop(&self) -> usize {
        self.sizes.len()
    }

    pub fn fps(&self) -> u32 {
        self.fps
    }

    pub fn interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / self.fps as u64)
    }

    /// When frame `k` is due, from the start of the stream.
    pub fn due(&self, k: u64) -> Duration {
        Duration::from_nanos((k as u128 * 1_000_000_000 / self.fps as u128) as u64)
    }

    /// Mean payload bytes per frame.
    pub fn mean_bytes(&self) -> f64 {
        self.sizes.iter().map(|&s| s as f64).sum::<f64>() / self.sizes.len() as f64
    }

    /// Mean P-frame payload bytes.
    pub fn mean_p_bytes(&self) -> f64 {
        self.sizes[1..].iter().map(|&s| s as f64).sum::<f64>() / (self.sizes.len() - 1) as f64
    }

    /// Average bitrate in kbit/s.
    pub fn kbps(&self) -> f64 {
        self.mean_bytes() * 8.0 * self.fps as f64 / 1000.0
    }

    /// Frame `k` of a stream that starts `phase` frames into the group: (keyframe, payload).
    pub fn frame(&self, k: u64, phase: u64) -> (bool, Bytes) {
        let i = ((k + phase) % self.sizes.len() as u64) as usize;
        (i == 0, self.payload.slice(..self.sizes[i] as usize))
    }
}

/// xorshift64*: uniform in [0, 1). Deterministic, so every run sends the same sizes.
fn unit(state: &mut u64) -> f64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

/// What the harness needs of the gateway child.
struct Gw {
    quic: SocketAddr,
    admin: SocketAddr,
    sha: [u8; 32],
    token: String,
    api_key: String,
    pid: u32,
}

impl Gw {
    fn of(p: &GatewayProc) -> anyhow::Result<Gw> {
        Ok(Gw {
            quic: p.quic,
            admin: p.admin,
            sha: parse_sha256_hex(&p.sha256)?,
            token: p.token.clone(),
            api_key: p.api_key.clone(),
            pid: p.child.pid,
        })
    }
}

/// A game session the gateway opened on a fake node.
type OpenedSession = OpenedGame;

/// The fake nodes' shared endpoint (one UDP socket, one connection per node).
fn node_endpoint() -> anyhow::Result<quinn::Endpoint> {
    Ok(fake_node::node_endpoint(
        "127.0.0.1:0".parse()?,
        ServerVerify::InsecureDangerous,
        GATEWAY_RECV_BUFFER,
    )?)
}

/// Registers one fake node serving [`GAME`] with room for `game_sessions`, then heartbeats and
/// accepts sessions in background tasks until `stop`. Every opened session is sent to `opened`.
async fn connect_node(
    endpoint: &quinn::Endpoint,
    gw: &Gw,
    id: &str,
    game_sessions: u32,
    opened: mpsc::UnboundedSender<OpenedSession>,
    stop: CancellationToken,
) -> anyhow::Result<quinn::Connection> {
    let reg = Registration::new(id, &gw.token).games(&[GAME], game_sessions);
    let node = FakeNode::try_register(
        endpoint,
        gw.quic,
        gw.sha,
        reg.message(),
        Duration::from_secs(10),
    )
    .await
    .with_context(|| format!("node {id}: registering with {}", gw.quic))?;
    let heartbeat_ms = node.registered().with_context(|| format!("node {id}"))?;
    let (conn, tx, rx) = node.into_parts();
    // Heartbeats go ahead of queued frame data: a node whose uplink is backed up must not be
    // declared gone for it (and lose every session) while the benchmark probes the relay.
    let _ = tx.set_priority(1);
    let every = Duration::from_millis(heartbeat_ms.max(10));
    let count = Arc::new(HeartbeatCount::default());
    tokio::spawn(heartbeat_loop(tx, rx, every, stop.clone(), count));
    tokio::spawn(serve_sessions(
        conn.clone(),
        Serving::games_only(),
        opened,
        stop,
    ));
    Ok(conn)
}

/// A QUIC server in this process that plays the role of a node serving players directly.
struct DirectServer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    sha: [u8; 32],
}

impl DirectServer {
    fn start(alpn: &[&[u8]]) -> anyhow::Result<DirectServer> {
        let cert = self_signed(&["localhost".to_string()])?;
        let cfg = server_config(
            vec![cert.cert.clone()],
            cert.key.clone_key(),
            alpn,
            &TransportOptions::default(),
        )?;
        let (endpoint, _) = net::server_endpoint("127.0.0.1:0".parse()?, cfg, GATEWAY_RECV_BUFFER)?;
        Ok(DirectServer {
            addr: endpoint.local_addr()?,
            endpoint,
            sha: cert.sha256,
        })
    }
}

/// A player connected straight to a fake node.
struct DirectPlayer {
    session_id: u64,
    conn: quinn::Connection,
    _ctl: (quinn::SendStream, FramedRecv),
}

/// Completes the handshake of one incoming player and answers its `PlayRequest`.
async fn serve_player(incoming: quinn::Incoming, session_id: u64) -> anyhow::Result<DirectPlayer> {
    let conn = incoming.await.context("player handshake")?;
    let (mut tx, rx) = conn
        .accept_bi()
        .await
        .context("waiting for the player's request stream")?;
    let mut rx = FramedRecv::new(rx, MAX_CONTROL_FRAME);
    let req: PlayRequest = match rx.next().await? {
        Some(Message::PlayRequest(r)) => r,
        other => bail!("expected PlayRequest, got {other:?}"),
    };
    let started = PlayStarted {
        session_id,
        width: req.width,
        height: req.height,
        fps: req.fps,
        bitrate_kbps: req.bitrate_kbps,
    };
    send(&mut tx, &Message::PlayStarted(started)).await?;
    Ok(DirectPlayer {
        session_id,
        conn,
        _ctl: (tx, rx),
    })
}

/// Accepts `n` players on `endpoint`, numbering their sessions from `base`.
fn accept_players(
    endpoint: quinn::Endpoint,
    n: u32,
    base: u64,
) -> mpsc::UnboundedReceiver<anyhow::Result<DirectPlayer>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for i in 0..n as u64 {
            let Some(incoming) = endpoint.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(serve_player(incoming, base + i).await);
            });
        }
    });
    rx
}

/// The gateway's relay step alone: a bare quinn relay (accept a frame stream, read its header,
/// `relay_frame` it to the player) on its own thread and runtime, pinned like the gateway. The
/// difference between it and the gateway is what the gateway adds around the relay code.
struct BareRelay {
    addr: SocketAddr,
    sha: [u8; 32],
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareRelay {
    fn start(cpus: Vec<usize>) -> anyhow::Result<BareRelay> {
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) =
            std::sync::mpsc::channel::<anyhow::Result<(SocketAddr, [u8; 32])>>();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bare-relay".into())
            .spawn(move || {
                let run = || -> anyhow::Result<()> {
                    if !cpus.is_empty() {
                        pin_current_thread(&cpus)
                            .with_context(|| format!("pinning the bare relay to CPUs {cpus:?}"))?;
                    }
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let server = DirectServer::start(&[ALPN_CLIENT, ALPN_NODE])?;
                        let _ = ready_tx.send(Ok((server.addr, server.sha)));
                        tokio::select! {
                            _ = thread_stop.cancelled() => Ok(()),
                            r = serve_bare(server.endpoint) => r,
                        }
                    })
                };
                if let Err(e) = run() {
                    eprintln!("bare relay: {e:#}");
                    let _ = ready_tx.send(Err(e));
                }
            })?;
        let (addr, sha) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the bare relay thread did not start"))??;
        Ok(BareRelay {
            addr,
            sha,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for BareRelay {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One player (ALPN `nearpath/1`), then one node (`nearpath-node/1`, no registration) whose frame
/// streams are relayed to the player.
async fn serve_bare(endpoint: quinn::Endpoint) -> anyhow::Result<()> {
    let incoming = endpoint
        .accept()
        .await
        .ok_or_else(|| anyhow!("bare relay endpoint closed"))?;
    let player = serve_player(incoming, BARE_SESSION).await?;
    let node = endpoint
        .accept()
        .await
        .ok_or_else(|| anyhow!("bare relay endpoint closed"))?
        .await
        .context("node handshake")?;
    if negotiated_alpn(&node).as_deref() != Some(ALPN_NODE) {
        bail!("the second connection to the bare relay is not a node");
    }
    while let Ok(mut recv) = node.accept_uni().await {
        let out = player.conn.clone();
        tokio::spawn(async move {
            if let Ok(header) = recv_frame_header(&mut recv).await {
                let _ = relay_frame(recv, &header, &out, MAX_VIDEO_FRAME).await;
            }
        });
    }
    Ok(())
}

/// Where one copy of a frame goes: a connection and the session id the player expects.
#[derive(Clone)]
struct Leg {
    conn: quinn::Connection,
    session_id: u64,
}

#[derive(Debug, Default)]
struct SendLog {
    sent: u64,
    errors: u64,
    first_error: Option<String>,
    /// How late the sender woke for each frame, microseconds (the generator's own lag).
    wake_late_us: Vec<f64>,
    /// Frames not sent because the sender was more than a frame interval behind.
    skipped: Vec<u64>,
}

/// Sends `frames` frames to every leg at the plan's rate from `start`, each on its own uni stream
/// stamped with the time it was handed to quinn.
async fn pace(
    plan: Arc<FramePlan>,
    legs: Vec<Leg>,
    start: Instant,
    frames: u64,
    phase: u64,
    size: (u16, u16),
) -> SendLog {
    let mut log = SendLog::default();
    for k in 0..frames {
        let due = start + plan.due(k);
        tokio::time::sleep_until(due).await;
        let lag = Instant::now().saturating_duration_since(due);
        log.wake_late_us.push(lag.as_secs_f64() * 1e6);
        if lag > plan.interval() {
            // A live source that has fallen a frame behind drops the frame rather than sending a
            // late burst; the gap is the generator's, and is not counted against the relay.
            log.skipped.push(k);
            continue;
        }
        let (keyframe, payload) = plan.frame(k, phase);
        // Alternating which leg goes first shares the cost of going second between the paths.
        for j in 0..legs.len() {
            let leg = &legs[(j + k as usize) % legs.len()];
            let header = FrameHeader {
                session_id: leg.session_id,
                seq: k,
                capture_ts_us: unix_micros(),
                encode_us: 0,
                keyframe,
                input_seq: 0,
                width: size.0,
                height: size.1,
                payload_len: 0,
            };
            match send_frame(&leg.conn, header, payload.clone()).await {
                Ok(()) => log.sent += 1,
                Err(e) => {
                    log.errors += 1;
                    log.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
    log
}

/// One frame as a player received it.
#[derive(Debug, Clone, Copy)]
struct Got {
    seq: u64,
    latency_us: f64,
    keyframe: bool,
    /// Receive time, microseconds since the Unix epoch.
    at_us: u64,
}

#[derive(Debug, Default)]
struct RecvLog {
    frames: Vec<Got>,
    errors: u64,
    first_error: Option<String>,
    /// Frames the sender skipped (filled in from its [`SendLog`]): not expected.
    not_sent: std::collections::HashSet<u64>,
}

/// Reads frames until frame `last` arrives, the connection closes, or nothing comes for
/// [`QUIET`] after `not_before`.
async fn collect(mut frames: FrameStream, last: u64, not_before: Instant) -> RecvLog {
    let mut log = RecvLog::default();
    loop {
        let limit = not_before.max(Instant::now()) + QUIET;
        match tokio::time::timeout_at(limit, frames.next()).await {
            Ok(Ok(Some(f))) => {
                let now = unix_micros();
                log.frames.push(Got {
                    seq: f.header.seq,
                    latency_us: now.saturating_sub(f.header.capture_ts_us) as f64,
                    keyframe: f.header.keyframe,
                    at_us: now,
                });
                if f.header.seq >= last {
                    break;
                }
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                log.errors += 1;
                log.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => break,
        }
    }
    log
}

/// Latency and completeness of frames `from..to` of one or more players.
#[derive(Debug, Clone)]
struct Window {
    lat: Summary,
    idr_p50: f64,
    p_p50: f64,
    expected: u64,
    received: u64,
    late: u64,
}

impl Window {
    /// Frames `from..to` of one player.
    fn of_one(log: &RecvLog, from: u64, to: u64, late_us: f64) -> Window {
        Window::of([(log, from, to)], late_us)
    }

    /// Frames of several players, each with its own `from..to` range of sequence numbers.
    fn of<'a>(parts: impl IntoIterator<Item = (&'a RecvLog, u64, u64)>, late_us: f64) -> Window {
        let (mut all, mut idr, mut p) = (Vec::new(), Vec::new(), Vec::new());
        let (mut expected, mut received, mut late) = (0, 0, 0);
        for (log, from, to) in parts {
            let skipped = log
                .not_sent
                .iter()
                .filter(|&&k| k >= from && k < to)
                .count() as u64;
            expected += to.saturating_sub(from) - skipped;
            let mut seen = vec![false; to.saturating_sub(from) as usize];
            for g in log.frames.iter().filter(|g| g.seq >= from && g.seq < to) {
                let slot = &mut seen[(g.seq - from) as usize];
                if *slot {
                    continue;
                }
                *slot = true;
                received += 1;
                late += u64::from(g.latency_us > late_us);
                all.push(g.latency_us);
                if g.keyframe {
                    idr.push(g.latency_us);
                } else {
                    p.push(g.latency_us);
                }
            }
        }
        Window {
            lat: Summary::of(&mut all),
            idr_p50: Summary::of(&mut idr).p50,
            p_p50: Summary::of(&mut p).p50,
            expected,
            received,
            late,
        }
    }

    fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    fn to_json(&self) -> Value {
        json!({"latency_us": self.lat.to_json(), "idr_p50_us": num(self.idr_p50), "p_frame_p50_us": num(self.p_p50),
               "expected": self.expected, "received": self.received, "missing": self.missing(), "late": self.late})
    }
}

/// `GET /metrics` from the gateway's admin listener.
async fn gateway_metrics(admin: SocketAddr) -> anyhow::Result<String> {
    let mut conn = Conn::h1(admin).await?;
    let req = hyper::Request::builder()
        .uri(format!("http://{admin}/metrics"))
        .body(Full::new(Bytes::new()))
        .context("building GET /metrics")?;
    let resp = conn.send(req).await?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading /metrics")?
        .to_bytes();
    if !status.is_success() {
        bail!("GET /metrics: HTTP {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The `reason` labels of `nearpath_game_frames_dropped_total`.
const DROP_REASONS: [&str; 4] = ["late", "overload", "foreign", "relay"];

/// The value of one exact series (`name{labels}`) on a Prometheus text page; 0 if absent.
pub fn metric_value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Sum of every sample of metric `name` (all label sets) on a Prometheus text page; 0 if absent.
pub fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum`: an empty f64 sum is -0.0, which prints as "-0".
        .fold(0.0, |acc, v| acc + v)
}

/// The kernel's UDP receive-buffer picture: `net.core.rmem_max`, what a request for the
/// gateway's default buffer is granted, and the system-wide count of datagrams dropped for a
/// full buffer so far.
#[derive(Debug, Clone, Copy)]
struct UdpPicture {
    rmem_max: Option<u64>,
    granted: Option<usize>,
    rcvbuf_errors: Option<u64>,
}

fn udp_picture() -> UdpPicture {
    let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let granted = std::net::UdpSocket::bind("127.0.0.1:0")
        .ok()
        .and_then(|s| net::set_recv_buffer(&s, GATEWAY_RECV_BUFFER).ok())
        .map(|b| b.effective);
    let rcvbuf_errors = std::fs::read_to_string("/proc/net/snmp")
        .ok()
        .and_then(|s| snmp_udp_field(&s, "RcvbufErrors"));
    UdpPicture {
        rmem_max,
        granted,
        rcvbuf_errors,
    }
}

/// A field of the `Udp:` lines of `/proc/net/snmp` (a header line of names, then one of values).
pub fn snmp_udp_field(text: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Datagrams the kernel dropped on the UDP socket bound to `port` (the `drops` column of
/// `/proc/net/udp`), summed over sockets on that port.
pub fn udp_port_drops(text: &str, port: u16) -> Option<u64> {
    let want = format!(":{port:04X}");
    let mut found = None;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 13 || !cols[1].ends_with(&want) {
            continue;
        }
        let drops: u64 = cols[12].parse().ok()?;
        found = Some(found.unwrap_or(0) + drops);
    }
    found
}

fn gateway_socket_drops(port: u16) -> Option<u64> {
    udp_port_drops(&std::fs::read_to_string("/proc/net/udp").ok()?, port)
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}

fn play_params(shape: &StreamShape) -> PlayParams {
    PlayParams {
        fps: shape.fps,
        bitrate_kbps: shape.kbps,
        ..PlayParams::hd(GAME)
    }
}

fn describe_plan(plan: &FramePlan) -> String {
    format!(
        "720p{} at {:.0} kbit/s pre-encoded (IDR {} B every {} frames, P frames {:.0} B on average, {:.0} B per frame overall)",
        plan.fps(),
        plan.kbps(),
        plan.sizes[0],
        plan.gop(),
        plan.mean_p_bytes(),
        plan.mean_bytes()
    )
}

fn describe_placement(p: &Placement, priority: &Priority) -> String {
    let nice = priority.describe();
    if p.no_pin {
        format!("unpinned{nice}")
    } else {
        format!(
            "gateway process on CPU {} ({} runtime thread(s)); fake nodes, direct server and players (the load generator) in this process on CPU {}{nice}",
            p.gateway_cpus, p.gateway_threads, p.worker_cpus
        )
    }
}

/// A player connected and playing, split into the parts the benchmark keeps.
struct Playing {
    session_id: u64,
    frames: FrameStream,
    _control: PlayControl,
    _client: Client,
}

async fn play(
    addr: SocketAddr,
    sha: [u8; 32],
    api_key: &str,
    params: PlayParams,
) -> anyhow::Result<Playing> {
    let client = Client::connect(addr, "localhost", ServerVerify::PinnedSha256(sha))
        .await
        .with_context(|| format!("player connecting to {addr}"))?;
    let session = client
        .play(api_key, params)
        .await
        .with_context(|| format!("player at {addr}: play"))?;
    let session_id = session.started().session_id;
    let (control, frames, _input) = session.split();
    Ok(Playing {
        session_id,
        frames,
        _control: control,
        _client: client,
    })
}

/// Waits (bounded) for the node side of gateway session `id`.
async fn opened_session(
    rx: &mut mpsc::UnboundedReceiver<OpenedSession>,
    pending: &mut HashMap<u64, OpenedSession>,
    id: u64,
) -> anyhow::Result<OpenedSession> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = pending.remove(&id) {
            return Ok(s);
        }
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(s)) => {
                pending.insert(s.session_id, s);
            }
            Ok(None) => bail!("every fake node stopped before session {id} was opened"),
            Err(_) => bail!("the gateway did not open session {id} on a fake node within 10 s"),
        }
    }
}

const PATHS: [&str; 3] = ["gateway", "direct", "bare relay"];

pub async fn run_latency(a: RelayLatencyArgs) -> anyhow::Result<()> {
    let plan = Arc::new(FramePlan::new(&a.shape, 1)?);
    let load_start = loadavg_1m();
    let priority = Priority::apply(a.nice)?;
    let gw_proc = start_gateway(&a.placement, Liveness::default(), 4096)?;
    renice_gateway(&gw_proc, a.nice)?;
    let stop = CancellationToken::new();
    let result = latency_inner(&a, plan, &gw_proc, load_start, &priority, stop.clone()).await;
    stop.cancel();
    stop_all(vec![gw_proc.child]).await;
    result
}

async fn latency_inner(
    a: &RelayLatencyArgs,
    plan: Arc<FramePlan>,
    gw_proc: &GatewayProc,
    load_start: f64,
    priority: &Priority,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let gw = Gw::of(gw_proc)?;
    let p = &a.placement;
    let udp = udp_picture();
    let endpoint = node_endpoint()?;
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let node_conn =
        connect_node(&endpoint, &gw, "bench-node-0", 4, opened_tx, stop.clone()).await?;
    let params = play_params(&a.shape);

    // Path A: through the gateway.
    let a_player = play(gw.quic, gw.sha, &gw.api_key, params.clone()).await?;
    let mut pending = HashMap::new();
    let a_node = opened_session(&mut opened_rx, &mut pending, a_player.session_id).await?;

    // Path B: the same process serving the player directly.
    let direct = DirectServer::start(&[ALPN_CLIENT])?;
    let mut direct_rx = accept_players(direct.endpoint.clone(), 1, DIRECT_SESSION_BASE);
    let b_player = play(direct.addr, direct.sha, "unused", params.clone()).await?;
    let b_node = direct_rx
        .recv()
        .await
        .ok_or_else(|| anyhow!("the direct server stopped"))??;

    // Path C: the relay code alone.
    let bare = if a.no_bare {
        None
    } else {
        let relay = BareRelay::start(parse_cpus(&p.gateway_cpus())?)?;
        let c_player = play(relay.addr, relay.sha, "unused", params.clone()).await?;
        let cfg = client_config(ServerVerify::PinnedSha256(relay.sha), &[ALPN_NODE])?;
        let conn = endpoint
            .connect_with(cfg, relay.addr, "localhost")?
            .await
            .context("node connecting to the bare relay")?;
        Some((relay, c_player, conn))
    };

    let fps = plan.fps() as f64;
    let warm = (a.warmup_seconds * fps).round() as u64;
    let window_frames = ((a.seconds * fps).round() as u64).max(1);
    let windows = a.repeats.max(1) as u64;
    let frames = warm + window_frames * windows;
    let size = (params.width as u16, params.height as u16);
    println!(
        "relay-latency: {}; {} window(s) of {} s after {} s warm-up; {}",
        describe_plan(&plan),
        windows,
        a.seconds,
        a.warmup_seconds,
        describe_placement(p, priority)
    );
    println!(
        "  paths: gateway = fake node -> gateway child -> Client::play; direct = the same fake node's own QUIC server -> Client::play, \
         same frames at the same time (send order alternates per frame){}",
        if bare.is_some() {
            "; bare relay = the fake node -> relay_frame in a bare quinn relay thread on the gateway's CPU -> Client::play, \
             half a frame interval later so it never contends with the gateway"
        } else {
            ""
        }
    );
    println!(
        "  UDP: net.core.rmem_max {} B; a {} B receive-buffer request (the gateway's quic.recv_buffer_bytes) is granted {} B (Linux reports double)",
        opt(udp.rmem_max),
        GATEWAY_RECV_BUFFER,
        opt(udp.granted)
    );

    let start = Instant::now() + Duration::from_millis(200);
    let legs = vec![
        Leg {
            conn: a_node.conn.clone(),
            session_id: a_player.session_id,
        },
        Leg {
            conn: b_node.conn.clone(),
            session_id: b_node.session_id,
        },
    ];
    let mut senders = vec![tokio::spawn(pace(
        plan.clone(),
        legs,
        start,
        frames,
        0,
        size,
    ))];
    let end = start + plan.due(frames);
    let mut receivers = vec![
        tokio::spawn(collect(a_player.frames, frames - 1, end)),
        tokio::spawn(collect(b_player.frames, frames - 1, end)),
    ];
    let mut keep = Vec::new();
    if let Some((relay, c_player, conn)) = bare {
        let legs = vec![Leg {
            conn: conn.clone(),
            session_id: BARE_SESSION,
        }];
        senders.push(tokio::spawn(pace(
            plan.clone(),
            legs,
            start + plan.interval() / 2,
            frames,
            0,
            size,
        )));
        receivers.push(tokio::spawn(collect(c_player.frames, frames - 1, end)));
        keep.push((relay, conn, c_player._control, c_player._client));
    }
    // CPU of the gateway and of this process over the measured windows only.
    tokio::time::sleep_until(start + plan.due(warm)).await;
    let gw_cpu = CpuMeter::start(gw.pid)?;
    let gen_cpu = CpuMeter::start(std::process::id())?;
    let mut window_load = Vec::new();
    for w in 1..=windows {
        tokio::time::sleep_until(start + plan.due(warm + window_frames * w)).await;
        window_load.push(loadavg_1m());
    }
    let (gw_cpu, gen_cpu) = (gw_cpu.percent()?, gen_cpu.percent()?);
    let mut sent = Vec::new();
    for s in senders {
        sent.push(s.await?);
    }
    let mut logs = Vec::new();
    for (i, r) in receivers.into_iter().enumerate() {
        let mut log = r.await?;
        // The gateway and direct players share the first sender; the bare relay's has its own.
        log.not_sent = sent[usize::from(i >= 2)].skipped.iter().copied().collect();
        logs.push(log);
    }
    let metrics = gateway_metrics(gw.admin).await.unwrap_or_default();
    let gw_dropped = metric_sum(&metrics, "nearpath_game_frames_dropped_total");
    let load_end = loadavg_1m();

    let late_us = 1e6 / fps;
    let n_paths = logs.len();
    // [path][figure] over windows: p50, p99, max.
    let mut fig: Vec<[Vec<f64>; 3]> = vec![Default::default(); n_paths];
    let mut added = [Vec::new(), Vec::new(), Vec::new()];
    let mut ratio = Vec::new();
    let mut per_window = Vec::new();
    for w in 0..windows {
        let (from, to) = (warm + w * window_frames, warm + (w + 1) * window_frames);
        let ws: Vec<Window> = logs
            .iter()
            .map(|l| Window::of_one(l, from, to, late_us))
            .collect();
        for (i, s) in ws.iter().enumerate() {
            fig[i][0].push(s.lat.p50);
            fig[i][1].push(s.lat.p99);
            fig[i][2].push(s.lat.max);
        }
        added[0].push(ws[0].lat.p50 - ws[1].lat.p50);
        added[1].push(ws[0].lat.p99 - ws[1].lat.p99);
        added[2].push(ws[0].lat.max - ws[1].lat.max);
        ratio.push(ws[0].lat.p50 / ws[1].lat.p50);
        println!(
            "  window {}: p50/p99 us gateway {:.0}/{:.0}, direct {:.0}/{:.0}{}; added p50 {:.0} us; missing {}/{}; load {:.2}",
            w + 1,
            ws[0].lat.p50,
            ws[0].lat.p99,
            ws[1].lat.p50,
            ws[1].lat.p99,
            ws.get(2).map(|c| format!(", bare relay {:.0}/{:.0}", c.lat.p50, c.lat.p99)).unwrap_or_default(),
            ws[0].lat.p50 - ws[1].lat.p50,
            ws[0].missing(),
            ws[1].missing(),
            window_load[w as usize]
        );
        per_window.push(json!({
            "window": w + 1,
            "paths": ws.iter().enumerate().map(|(i, s)| json!({"path": PATHS[i], "stats": s.to_json()})).collect::<Vec<_>>(),
            "loadavg_1m": num(window_load[w as usize]),
        }));
    }
    let rep = |v: &Vec<f64>| Repeated::new(v.clone());
    let mut header = vec!["median over windows [min .. max], us"];
    header.extend(PATHS.iter().copied().take(n_paths));
    header.extend(["added (gateway - direct)", "target", ""]);
    let mut t = Table::new(&header);
    let targets = [Some(150.0), Some(1000.0), None];
    for (k, name) in ["p50", "p99", "max"].iter().enumerate() {
        let mut row = vec![(*name).to_string()];
        row.extend(fig.iter().map(|f| rep(&f[k]).show(0)));
        row.push(rep(&added[k]).show(0));
        row.push(targets[k].map(|x| format!("<= {x}")).unwrap_or_default());
        row.push(
            targets[k]
                .map(|x| verdict(rep(&added[k]).median() <= x).to_string())
                .unwrap_or_default(),
        );
        t.row(row);
    }
    let mut row = vec!["ratio p50 (gateway / direct)".to_string()];
    row.extend(std::iter::repeat_n(String::new(), n_paths));
    row.push(rep(&ratio).show(2));
    t.row(row);
    println!();
    t.print();
    let total_from = warm;
    let total_to = warm + windows * window_frames;
    let mut pooled = Vec::new();
    for (i, l) in logs.iter().enumerate() {
        let s = Window::of_one(l, total_from, total_to, late_us);
        let sl = &sent[if i < 2 { 0 } else { 1 }];
        println!(
            "  {:<10} all windows: p5 {:.0} p50 {:.0} p95 {:.0} p99 {:.0} max {:.0} us (n {}); IDR p50 {:.0} us, P p50 {:.0} us; late (> {:.1} ms) {}, missing {}, frame errors {}{}",
            PATHS[i],
            s.lat.p5,
            s.lat.p50,
            s.lat.p95,
            s.lat.p99,
            s.lat.max,
            s.lat.n,
            s.idr_p50,
            s.p_p50,
            late_us / 1e3,
            s.late,
            s.missing(),
            l.errors,
            l.first_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        );
        if sl.errors > 0 || !sl.skipped.is_empty() {
            println!(
                "  {:<10} send errors {} {}; frames the generator skipped (it had fallen a frame behind) {}",
                PATHS[i],
                sl.errors,
                sl.first_error.as_deref().unwrap_or(""),
                sl.skipped.len()
            );
        }
        pooled.push(
            json!({"path": PATHS[i], "stats": s.to_json(), "frame_errors": l.errors,
                           "generator_skipped": sl.skipped.len()}),
        );
    }
    let mut wake = sent
        .iter()
        .flat_map(|s| s.wake_late_us.iter().copied())
        .collect::<Vec<_>>();
    let wake = Summary::of(&mut wake);
    println!(
        "  gateway CPU {:.1}% of a core, this process {:.1}%; gateway dropped {} frames (metric); sender wake-up lag p50 {:.0} us p99 {:.0} us; load average (1 min) {:.2} -> {:.2}",
        gw_cpu, gen_cpu, gw_dropped, wake.p50, wake.p99, load_start, load_end
    );
    let added_r: Vec<Repeated> = added.iter().map(rep).collect();
    let summary = json!({
        "bench": "relay-latency",
        "params": {"seconds": a.seconds, "windows": windows, "warmup_seconds": a.warmup_seconds, "fps": plan.fps(),
                   "kbps": num(plan.kbps()), "idr_bytes": plan.sizes[0], "gop_frames": plan.gop(),
                   "p_frame_mean_bytes": num(plan.mean_p_bytes()), "placement": describe_placement(p, priority)},
        "added_us": {"p50": added_r[0].to_json(), "p99": added_r[1].to_json(), "max": added_r[2].to_json()},
        "ratio_p50": rep(&ratio).to_json(),
        "paths": fig.iter().enumerate().map(|(i, f)| json!({"path": PATHS[i], "p50_us": rep(&f[0]).to_json(),
                  "p99_us": rep(&f[1]).to_json(), "max_us": rep(&f[2]).to_json()})).collect::<Vec<_>>(),
        "pooled": pooled,
        "per_window": per_window,
        "targets_met": {"added_p50_le_150us": added_r[0].median() <= 150.0, "added_p99_le_1ms": added_r[1].median() <= 1000.0},
        "gateway_cpu_percent": num(gw_cpu),
        "generator_cpu_percent": num(gen_cpu),
        "gateway_frames_dropped": num(gw_dropped),
        "udp": {"rmem_max": udp.rmem_max, "granted_for_4mib_request": udp.granted},
        "loadavg_1m": [num(load_start), num(load_end)],
    });
    println!("{summary}");
    drop(a_player._control);
    drop(a_player._client);
    sessions_ended(gw.admin).await;
    drop(a_node);
    drop(keep);
    drop(node_conn);
    Ok(())
}

/// Whether the sessions went through the gateway or straight to the fake nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Gateway,
    Direct,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Gateway => "gateway",
            Mode::Direct => "direct",
        }
    }
}

/// One capacity run: `n` sessions for warm-up plus the measured seconds.
#[derive(Debug, Clone)]
struct CapRun {
    n: u32,
    mode: Mode,
    window: Window,
    frame_errors: u64,
    send_errors: u64,
    /// Measured frames the generator skipped because it had fallen behind.
    skipped: u64,
    first_error: Option<String>,
    /// `nearpath_game_frames_dropped_total` over the whole run (gateway mode).
    gw_dropped: f64,
    gw_relayed: f64,
    /// Percent of one core over the measured interval.
    gw_cpu: f64,
    gen_cpu: f64,
    wake: Summary,
    rss_idle_kib: u64,
    rss_peak_kib: u64,
    gw_socket_drops: Option<u64>,
    rcvbuf_errors: Option<u64>,
    load: f64,
    /// Frames each player never received (dropped anywhere on the way), one entry per session.
    missing_per_session: Vec<u64>,
    /// `nearpath_game_frames_dropped_total` by reason (gateway mode).
    gw_dropped_by: Vec<(&'static str, f64)>,
}

impl CapRun {
    fn clean(&self) -> bool {
        self.window.late == 0
            && self.window.missing() == 0
            && self.frame_errors == 0
            && self.send_errors == 0
            && self.skipped == 0
            && self.gw_dropped == 0.0
    }

    /// The generator could not keep up: nearly all of its core, or senders waking half a frame
    /// late (the timer's 1 ms granularity and other processes on a shared machine account for
    /// a few milliseconds of lag without that meaning much).
    fn generator_bound(&self) -> bool {
        self.skipped > 0 || self.gen_cpu >= 90.0 || self.wake.p99 > 8_000.0
    }

    fn missing_summary(&self) -> Summary {
        Summary::of(&mut self.missing_per_session.iter().map(|&m| m as f64).collect())
    }

    fn rss_per_session_kib(&self) -> f64 {
        (self.rss_peak_kib as f64 - self.rss_idle_kib as f64) / self.n.max(1) as f64
    }

    fn to_json(&self) -> Value {
        json!({
            "sessions": self.n, "mode": self.mode.as_str(), "clean": self.clean(), "stats": self.window.to_json(),
            "frame_errors": self.frame_errors, "send_errors": self.send_errors, "generator_skipped": self.skipped, "first_error": self.first_error,
            "gateway_frames_dropped": num(self.gw_dropped), "gateway_frames_relayed": num(self.gw_relayed),
            "gateway_cpu_percent": num(self.gw_cpu), "gateway_cpu_percent_per_session": num(self.gw_cpu / self.n.max(1) as f64),
            "generator_cpu_percent": num(self.gen_cpu), "generator_bound": self.generator_bound(),
            "sender_wake_lag_us": self.wake.to_json(),
            "gateway_rss_idle_kib": self.rss_idle_kib, "gateway_rss_peak_kib": self.rss_peak_kib,
            "gateway_rss_per_session_kib": num(self.rss_per_session_kib()),
            "gateway_socket_drops": self.gw_socket_drops, "udp_rcvbuf_errors": self.rcvbuf_errors,
            "loadavg_1m": num(self.load),
            "missing_per_session": self.missing_summary().to_json(),
            "gateway_frames_dropped_by_reason": self.gw_dropped_by.iter().map(|(r, v)| (r.to_string(), num(*v))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

type Keep = Vec<Box<dyn std::any::Any + Send>>;

/// Everything a run keeps alive until it is measured.
struct Fleet {
    stop: CancellationToken,
    legs: Vec<Leg>,
    players: Vec<FrameStream>,
    /// Player-side handles (client connection, control stream).
    player_side: Keep,
    /// Node-side handles (node connections and endpoint, session streams).
    node_side: Keep,
}

impl Fleet {
    /// Players leave first, so the gateway ends each session as a departed client instead of
    /// seeing its node vanish (which it would count against the node and fail over).
    async fn end(self, gw: Option<&Gw>) {
        drop(self.player_side);
        if let Some(gw) = gw {
            sessions_ended(gw.admin).await;
        }
        self.stop.cancel();
        drop(self.node_side);
    }
}

/// Waits (bounded) until the gateway reports no game session in progress.
async fn sessions_ended(admin: SocketAddr) {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match gateway_metrics(admin).await {
            Ok(page) if metric_sum(&page, "nearpath_game_active_sessions") == 0.0 => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => return,
        }
    }
}

async fn gateway_fleet(a: &RelayCapacityArgs, gw: &Gw, n: u32) -> anyhow::Result<Fleet> {
    let stop = CancellationToken::new();
    let endpoint = node_endpoint()?;
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let per_node = a.sessions_per_node.max(1);
    let nodes = n.div_ceil(per_node);
    let mut node_side: Keep = Vec::new();
    let mut player_side: Keep = Vec::new();
    for i in 0..nodes {
        // A little headroom per node so that routing by load never finds every node full.
        let conn = connect_node(
            &endpoint,
            gw,
            &format!("bench-node-{i}"),
            per_node + 2,
            opened_tx.clone(),
            stop.clone(),
        )
        .await?;
        node_side.push(Box::new(conn));
    }
    node_side.push(Box::new(endpoint));
    let params = play_params(&a.shape);
    let mut pending = HashMap::new();
    let (mut legs, mut players) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let p = play(gw.quic, gw.sha, &gw.api_key, params.clone()).await?;
        let node = opened_session(&mut opened_rx, &mut pending, p.session_id).await?;
        legs.push(Leg {
            conn: node.conn.clone(),
            session_id: p.session_id,
        });
        players.push(p.frames);
        node_side.push(Box::new(node));
        player_side.push(Box::new((p._control, p._client)));
    }
    Ok(Fleet {
        stop,
        legs,
        players,
        player_side,
        node_side,
    })
}

async fn direct_fleet(a: &RelayCapacityArgs, n: u32) -> anyhow::Result<Fleet> {
    let server = DirectServer::start(&[ALPN_CLIENT])?;
    let mut accepted = accept_players(server.endpoint.clone(), n, DIRECT_SESSION_BASE);
    let params = play_params(&a.shape);
    let mut pending: HashMap<u64, DirectPlayer> = HashMap::new();
    let (mut legs, mut players) = (Vec::new(), Vec::new());
    let mut node_side: Keep = Vec::new();
    let mut player_side: Keep = Vec::new();
    for _ in 0..n {
        let p = play(server.addr, server.sha, "unused", params.clone()).await?;
        let node = loop {
            if let Some(d) = pending.remove(&p.session_id) {
                break d;
            }
            let d = tokio::time::timeout(Duration::from_secs(10), accepted.recv())
                .await
                .map_err(|_| anyhow!("the direct server did not answer a player within 10 s"))?
                .ok_or_else(|| anyhow!("the direct server stopped accepting"))??;
            pending.insert(d.session_id, d);
        };
        legs.push(Leg {
            conn: node.conn.clone(),
            session_id: node.session_id,
        });
        players.push(p.frames);
        node_side.push(Box::new(node));
        player_side.push(Box::new((p._control, p._client)));
    }
    node_side.push(Box::new(server.endpoint));
    Ok(Fleet {
        stop: CancellationToken::new(),
        legs,
        players,
        player_side,
        node_side,
    })
}

async fn capacity_run(
    a: &RelayCapacityArgs,
    plan: &Arc<FramePlan>,
    n: u32,
    mode: Mode,
) -> anyhow::Result<CapRun> {
    let gw_proc = match mode {
        Mode::Gateway => {
            let g = start_gateway(&a.placement, Liveness::default(), 65_536)?;
            renice_gateway(&g, a.nice)?;
            Some(g)
        }
        Mode::Direct => None,
    };
    let r = capacity_inner(a, plan, n, mode, gw_proc.as_ref()).await;
    if let Some(g) = gw_proc {
        stop_all(vec![g.child]).await;
    }
    r
}

async fn capacity_inner(
    a: &RelayCapacityArgs,
    plan: &Arc<FramePlan>,
    n: u32,
    mode: Mode,
    gw_proc: Option<&GatewayProc>,
) -> anyhow::Result<CapRun> {
    let gw = gw_proc.map(Gw::of).transpose()?;
    let mut fleet = match &gw {
        Some(gw) => gateway_fleet(a, gw, n).await?,
        None => direct_fleet(a, n).await?,
    };
    let gw_pid = gw.as_ref().map(|g| g.pid);
    let rss_idle_kib = match gw_pid {
        Some(pid) => mem_status(pid)?.rss_kib,
        None => 0,
    };
    let fps = plan.fps() as f64;
    let measured = ((a.seconds * fps).round() as u64).max(1);
    let start = Instant::now() + Duration::from_millis(200);
    // The measured window, from `start`: every session sends `measured` frames inside it.
    let warm_at = Duration::from_secs_f64(a.warmup_seconds.max(0.0));
    let measured_for = plan.due(measured);
    let interval = plan.interval();
    let ramp = Duration::from_secs_f64(a.ramp_seconds.clamp(0.0, a.warmup_seconds.max(0.0)));
    let gop = plan.gop() as u64;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    // (first measured seq, seqs sent) per session.
    let mut ranges = Vec::new();
    let end = start + warm_at + measured_for + interval;
    // Players join one after another over the ramp (over one frame interval without one), as
    // arriving players would: a few hundred sessions whose congestion windows all open in the
    // same 16 ms are a start-up storm, not the steady state this measures. Their frames stay
    // spread over the frame interval and their IDRs over the group of pictures.
    for (i, (leg, player)) in fleet
        .legs
        .iter()
        .cloned()
        .zip(std::mem::take(&mut fleet.players))
        .enumerate()
    {
        let share = i as f64 / n as f64;
        // Whole frame intervals into the ramp, then a slot of its own inside the interval:
        // deriving both from one fraction of the ramp would bunch the sessions on a few slots
        // (a 2 s ramp over 150 sessions is 13.3 ms apart, which is only 5 slots mod 16.7 ms).
        let join_frames = (ramp.as_secs_f64() * fps * share).floor() as u64;
        let join = plan.due(join_frames) + interval.mul_f64(share);
        let first = (warm_at.saturating_sub(join).as_secs_f64() * fps).ceil() as u64;
        let count = first + measured;
        let phase = idr_phase(i as u64, n as u64, gop, join_frames);
        senders.push(tokio::spawn(pace(
            plan.clone(),
            vec![leg],
            start + join,
            count,
            phase,
            (1280, 720),
        )));
        receivers.push(tokio::spawn(collect(player, count - 1, end)));
        ranges.push((first, count));
    }
    let udp_before = udp_picture();
    let drops_before = gw
        .as_ref()
        .and_then(|g| gateway_socket_drops(g.quic.port()));
    tokio::time::sleep_until(start + warm_at).await;
    let gw_cpu = gw_pid.map(CpuMeter::start).transpose()?;
    let gen_cpu = CpuMeter::start(std::process::id())?;
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = gw_pid.map(|pid| {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                if let Ok(m) = mem_status(pid) {
                    peak = peak.max(m.rss_kib);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    });
    tokio::time::sleep_until(start + warm_at + measured_for).await;
    let gw_cpu = gw_cpu.map(|m| m.percent()).transpose()?.unwrap_or(0.0);
    let gen_cpu = gen_cpu.percent()?;
    let load = loadavg_1m();
    sampling.store(false, Ordering::Relaxed);
    let rss_peak_kib = match sampler {
        Some(s) => s.await?,
        None => 0,
    };
    let mut wake = Vec::new();
    let (mut send_errors, mut first_error) = (0, None);
    let mut skipped_by = Vec::new();
    for s in senders {
        let l = s.await?;
        send_errors += l.errors;
        if first_error.is_none() {
            first_error = l.first_error;
        }
        wake.extend(l.wake_late_us);
        skipped_by.push(l.skipped);
    }
    // Sender i feeds player i.
    let mut logs = Vec::new();
    for (r, skipped) in receivers.into_iter().zip(skipped_by) {
        let mut log = r.await?;
        log.not_sent = skipped.into_iter().collect();
        logs.push(log);
    }
    let skipped = logs
        .iter()
        .zip(&ranges)
        .map(|(l, &(first, _))| l.not_sent.iter().filter(|&&k| k >= first).count() as u64)
        .sum();
    let frame_errors = logs.iter().map(|l| l.errors).sum();
    if first_error.is_none() {
        first_error = logs.iter().find_map(|l| l.first_error.clone());
    }
    let (gw_dropped, gw_relayed, gw_dropped_by) = match &gw {
        Some(g) => {
            let page = gateway_metrics(g.admin).await?;
            (
                metric_sum(&page, "nearpath_game_frames_dropped_total"),
                metric_sum(&page, "nearpath_game_frames_relayed_total"),
                DROP_REASONS
                    .iter()
                    .map(|&r| {
                        let series =
                            format!("nearpath_game_frames_dropped_total{{reason=\"{r}\"}}");
                        (r, metric_value(&page, &series))
                    })
                    .collect(),
            )
        }
        None => (0.0, 0.0, Vec::new()),
    };
    let missing_per_session = logs
        .iter()
        .zip(&ranges)
        .map(|(l, &(first, count))| Window::of_one(l, first, count, 1e6 / fps).missing())
        .collect();
    let udp_after = udp_picture();
    let drops_after = gw
        .as_ref()
        .and_then(|g| gateway_socket_drops(g.quic.port()));
    fleet.end(gw.as_ref()).await;
    if let Some(dir) = &a.dump {
        dump_frames(dir, &format!("{}-{n}", mode.as_str()), &logs)?;
    }
    Ok(CapRun {
        n,
        mode,
        window: Window::of(
            logs.iter()
                .zip(&ranges)
                .map(|(l, &(first, count))| (l, first, count)),
            1e6 / fps,
        ),
        frame_errors,
        send_errors,
        skipped,
        first_error,
        gw_dropped,
        gw_relayed,
        gw_cpu,
        gen_cpu,
        wake: Summary::of(&mut wake),
        rss_idle_kib,
        rss_peak_kib,
        gw_socket_drops: drops_after
            .zip(drops_before)
            .map(|(a, b)| a.saturating_sub(b)),
        rcvbuf_errors: udp_after
            .rcvbuf_errors
            .zip(udp_before.rcvbuf_errors)
            .map(|(a, b)| a.saturating_sub(b)),
        load,
        missing_per_session,
        gw_dropped_by,
    })
}

/// Where in its group of pictures session `i` of `n` starts, given that it joins `join_frames`
/// frame intervals after the first, so that the sessions' IDRs fall on evenly spread frame
/// slots of the group in wall-clock time. Spreading by `i` alone is not enough: with a join
/// ramp as long as the group, the two offsets cancel and every IDR lands on the same slot (150
/// IDRs of 60 KB at once are a 9 MB burst).
pub fn idr_phase(i: u64, n: u64, gop: u64, join_frames: u64) -> u64 {
    let slot = i * gop / n.max(1);
    (join_frames % gop + gop - slot % gop) % gop
}

/// Writes `<dir>/relay-<name>-<unix time>.csv`: one line per received frame.
fn dump_frames(dir: &std::path::Path, name: &str, logs: &[RecvLog]) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("relay-{name}-{}.csv", unix_micros() / 1_000_000));
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    writeln!(w, "player,seq,recv_at_us,latency_us,keyframe")?;
    for (i, log) in logs.iter().enumerate() {
        for g in &log.frames {
            writeln!(
                w,
                "{i},{},{},{},{}",
                g.seq,
                g.at_us,
                g.latency_us,
                u8::from(g.keyframe)
            )?;
        }
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    println!("  wrote {}", path.display());
    Ok(())
}

/// Session counts of the ramp: every step up to `max`, then `max`, ascending.
pub fn ramp(steps: &str, max: u32, only: bool) -> anyhow::Result<Vec<u32>> {
    if only {
        return Ok(vec![max]);
    }
    let mut v = Vec::new();
    for s in steps.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let n: u32 = s
            .parse()
            .map_err(|e| anyhow!("--steps {steps:?}: {s:?}: {e}"))?;
        if n > 0 && n <= max {
            v.push(n);
        }
    }
    v.push(max);
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Most runs clean (a shared machine sometimes stalls one run; say so rather than hide it).
fn passes(runs: &[CapRun]) -> bool {
    let clean = runs.iter().filter(|r| r.clean()).count();
    !runs.is_empty() && clean * 2 > runs.len()
}

fn print_run(r: &CapRun) {
    let gateway = match r.mode {
        Mode::Gateway => format!(
            "gw dropped {}; gateway CPU {:.1}% ({:.2}%/session), RSS {:.1} -> {:.1} MiB, socket drops {}; ",
            r.gw_dropped,
            r.gw_cpu,
            r.gw_cpu / r.n.max(1) as f64,
            r.rss_idle_kib as f64 / 1024.0,
            r.rss_peak_kib as f64 / 1024.0,
            opt(r.gw_socket_drops),
        ),
        Mode::Direct => String::new(),
    };
    println!(
        "  {:>4} {:<7} {}: frames {}/{}, late {}, missing {}, errors {}, p50 {:.0} us p99 {:.0} us max {:.0} us; \
         {gateway}generator CPU {:.1}%, wake-up lag p99 {:.0} us, skipped {}{}; RcvbufErrors {}; load {:.2}{}",
        r.n,
        r.mode.as_str(),
        if r.clean() { "clean" } else { "NOT CLEAN" },
        r.window.received,
        r.window.expected,
        r.window.late,
        r.window.missing(),
        r.frame_errors + r.send_errors,
        r.window.lat.p50,
        r.window.lat.p99,
        r.window.lat.max,
        r.gen_cpu,
        r.wake.p99,
        r.skipped,
        if r.generator_bound() { " (generator saturated)" } else { "" },
        opt(r.rcvbuf_errors),
        r.load,
        r.first_error.as_deref().map(|e| format!("; first error: {e}")).unwrap_or_default()
    );
}

/// Every run at `n` sessions: through the gateway, and direct unless turned off.
async fn runs_at(
    a: &RelayCapacityArgs,
    plan: &Arc<FramePlan>,
    n: u32,
) -> anyhow::Result<(Vec<CapRun>, Vec<CapRun>)> {
    let mut through = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..a.repeats.max(1) {
        if a.direct_only {
            let r = capacity_run(a, plan, n, Mode::Direct)
                .await
                .with_context(|| format!("{n} sessions direct"))?;
            print_run(&r);
            through.push(r);
            continue;
        }
        let r = capacity_run(a, plan, n, Mode::Gateway)
            .await
            .with_context(|| format!("{n} sessions through the gateway"))?;
        print_run(&r);
        through.push(r);
        if !a.no_direct {
            let r = capacity_run(a, plan, n, Mode::Direct)
                .await
                .with_context(|| format!("{n} sessions direct"))?;
            print_run(&r);
            direct.push(r);
        }
    }
    Ok((through, direct))
}

pub async fn run_capacity(a: RelayCapacityArgs) -> anyhow::Result<()> {
    capacity_report(&a).await.map(|_| ())
}

/// The relay-capacity ramp with its report; returns the largest clean session count.
async fn capacity_report(a: &RelayCapacityArgs) -> anyhow::Result<u32> {
    let a = a.clone();
    let plan = Arc::new(FramePlan::new(&a.shape, 1)?);
    let load_start = loadavg_1m();
    let priority = Priority::apply(a.nice)?;
    let udp = udp_picture();
    let steps = ramp(&a.steps, a.sessions, a.only)?;
    println!(
        "relay-capacity: {}; session counts {:?}, {} run(s) each, {} s measured after {} s warm-up (players join over the first {} s), \
         {} sessions per fake node; {}",
        describe_plan(&plan),
        steps,
        a.repeats.max(1),
        a.seconds,
        a.warmup_seconds,
        a.ramp_seconds.clamp(0.0, a.warmup_seconds.max(0.0)),
        a.sessions_per_node,
        describe_placement(&a.placement, &priority)
    );
    println!(
        "  late = latency above one frame interval ({:.1} ms); missing = frames never received (gaps in seq); a count is clean with 0 late, 0 missing, \
         0 errors and 0 frames dropped by the gateway (nearpath_game_frames_dropped_total)",
        1e3 / plan.fps() as f64
    );
    println!(
        "  UDP: net.core.rmem_max {} B; the gateway's {} B receive-buffer request is granted {} B (Linux reports double)",
        opt(udp.rmem_max),
        GATEWAY_RECV_BUFFER,
        opt(udp.granted)
    );
    let mut results: Vec<(u32, Vec<CapRun>, Vec<CapRun>)> = Vec::new();
    let mut last_pass = 0u32;
    let mut first_fail: Option<u32> = None;
    for &n in &steps {
        let (through, direct) = runs_at(&a, &plan, n).await?;
        let ok = passes(&through);
        results.push((n, through, direct));
        if ok {
            if first_fail.is_none() {
                last_pass = n;
            }
        } else {
            first_fail.get_or_insert(n);
            if !a.keep_going {
                break;
            }
        }
    }
    if let (Some(mut hi), false) = (first_fail, a.only) {
        let mut lo = last_pass;
        for _ in 0..a.bisect {
            // Multiples of 5 keep the figure readable; stop when the interval is that narrow.
            let mid = ((lo + hi) / 2 / 5) * 5;
            if mid <= lo || mid >= hi {
                break;
            }
            let (through, direct) = runs_at(&a, &plan, mid).await?;
            let ok = passes(&through);
            results.push((mid, through, direct));
            if ok {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        last_pass = lo;
        first_fail = Some(hi);
    }
    results.sort_by_key(|(n, ..)| *n);
    let load_end = loadavg_1m();
    println!();
    let mut t = Table::new(&[
        "sessions (median of runs)",
        "clean runs",
        "late",
        "missing",
        "gw dropped",
        "p50 us",
        "p99 us",
        "max us",
        "gw CPU %",
        "gw CPU %/session",
        "gw RSS MiB",
        "gw KiB/session",
        "gen CPU %",
        "direct clean",
        "direct p99 us",
    ]);
    let med =
        |runs: &[CapRun], f: &dyn Fn(&CapRun) -> f64| Repeated::new(runs.iter().map(f).collect());
    for (n, through, direct) in &results {
        t.row(vec![
            n.to_string(),
            format!(
                "{}/{}",
                through.iter().filter(|r| r.clean()).count(),
                through.len()
            ),
            med(through, &|r| r.window.late as f64).show(0),
            med(through, &|r| r.window.missing() as f64).show(0),
            med(through, &|r| r.gw_dropped).show(0),
            med(through, &|r| r.window.lat.p50).show(0),
            med(through, &|r| r.window.lat.p99).show(0),
            med(through, &|r| r.window.lat.max).show(0),
            med(through, &|r| r.gw_cpu).show(1),
            med(through, &|r| r.gw_cpu / r.n.max(1) as f64).show(2),
            med(through, &|r| r.rss_peak_kib as f64 / 1024.0).show(1),
            med(through, &|r| r.rss_per_session_kib()).show(0),
            med(through, &|r| r.gen_cpu).show(0),
            if direct.is_empty() {
                "-".into()
            } else {
                format!(
                    "{}/{}",
                    direct.iter().filter(|r| r.clean()).count(),
                    direct.len()
                )
            },
            if direct.is_empty() {
                "-".into()
            } else {
                med(direct, &|r| r.window.lat.p99).show(0)
            },
        ]);
    }
    t.print();
    let best = results.iter().find(|(n, ..)| *n == last_pass);
    let generator_bound = first_fail
        .and_then(|f| results.iter().find(|(n, ..)| *n == f))
        .is_some_and(|(_, through, direct)| {
            through.iter().any(CapRun::generator_bound) || (!direct.is_empty() && !passes(direct))
        });
    println!(
        "  largest clean session count: {}{} (target >= 150: {}){}; load average (1 min) {:.2} -> {:.2}",
        last_pass,
        first_fail.map(|f| format!(", first failing {f}")).unwrap_or_else(|| ", none failed".into()),
        verdict(last_pass >= 150),
        if generator_bound {
            "; the load generator was saturated (or failed direct) at the failing count, so this is a lower bound for the gateway"
        } else {
            ""
        },
        load_start,
        load_end
    );
    if let Some((n, through, _)) = best {
        println!(
            "  at {n} sessions the gateway used {}% of a core ({}% per session) and {} KiB RSS per session",
            med(through, &|r| r.gw_cpu).show(1),
            med(through, &|r| r.gw_cpu / r.n.max(1) as f64).show(2),
            med(through, &|r| r.rss_per_session_kib()).show(0)
        );
    }
    let summary = json!({
        "bench": "relay-capacity",
        "params": {"ramp": steps, "seconds": a.seconds, "warmup_seconds": a.warmup_seconds, "repeats": a.repeats.max(1),
                   "sessions_per_node": a.sessions_per_node, "ramp_seconds": a.ramp_seconds, "fps": plan.fps(), "kbps": num(plan.kbps()),
                   "idr_bytes": plan.sizes[0], "gop_frames": plan.gop(), "placement": describe_placement(&a.placement, &priority)},
        "largest_clean_sessions": last_pass,
        "first_failing_sessions": first_fail,
        "generator_bound_at_failure": generator_bound,
        "target_met": last_pass >= 150,
        "runs": results.iter().map(|(n, t, d)| json!({"sessions": n, "gateway": t.iter().map(CapRun::to_json).collect::<Vec<_>>(),
                  "direct": d.iter().map(CapRun::to_json).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "udp": {"rmem_max": udp.rmem_max, "granted_for_4mib_request": udp.granted},
        "loadavg_1m": [num(load_start), num(load_end)],
    });
    println!("{summary}");
    Ok(last_pass)
}

/// `bench relay-overload`: the relay past saturation. Runs `factor` times the relay's capacity
/// through the gateway and reports what the players got: delivered-frame latency and the frames
/// each session lost (the gateway drops frames rather than queue them; its drop counters by
/// reason are read from `/metrics`).
pub async fn run_overload(a: RelayOverloadArgs) -> anyhow::Result<()> {
    if !(a.factor.is_finite() && a.factor > 0.0) {
        bail!("--factor must be positive, got {}", a.factor);
    }
    let capacity = if a.measure {
        let found = capacity_report(&a.run).await?;
        if found == 0 {
            bail!("relay-capacity found no clean session count to overload");
        }
        found
    } else {
        a.run.sessions.max(1)
    };
    let n = (f64::from(capacity) * a.factor).ceil() as u32;
    let plan = Arc::new(FramePlan::new(&a.run.shape, 1)?);
    let priority = Priority::apply(a.run.nice)?;
    println!(
        "relay-overload: {n} sessions = {} x capacity {capacity} ({}); {}; {} run(s) of {} s measured after {} s warm-up; {}",
        a.factor,
        if a.measure { "measured above" } else { "from --sessions" },
        describe_plan(&plan),
        a.run.repeats.max(1),
        a.run.seconds,
        a.run.warmup_seconds,
        describe_placement(&a.run.placement, &priority)
    );
    println!(
        "  delivered = frames the players received whole; missing = dropped anywhere (the gateway drops late or over-budget frames, never queues them)"
    );
    let mut runs = Vec::new();
    for _ in 0..a.run.repeats.max(1) {
        let r = capacity_run(&a.run, &plan, n, Mode::Gateway)
            .await
            .with_context(|| format!("{n} sessions through the gateway"))?;
        print_run(&r);
        let m = r.missing_summary();
        println!(
            "    delivered {}/{} frames: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; missing per session: min {:.0} p50 {:.0} max {:.0} (of {} each); gateway drops by reason: {}",
            r.window.received,
            r.window.expected,
            r.window.lat.p50 / 1e3,
            r.window.lat.p99 / 1e3,
            r.window.lat.max / 1e3,
            m.min,
            m.p50,
            m.max,
            r.window.expected / u64::from(n.max(1)),
            r.gw_dropped_by
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        runs.push(r);
    }
    let p99_ms = Repeated::new(runs.iter().map(|r| r.window.lat.p99 / 1e3).collect());
    let met = runs
        .iter()
        .all(|r| r.window.lat.p99 / 1e3 <= a.target_p99_ms);
    println!(
        "  delivered-frame p99 {} ms at {n} sessions ({}x capacity {capacity}) (target <= {} ms: {})",
        p99_ms.show(1),
        a.factor,
        a.target_p99_ms,
        verdict(met)
    );
    let summary = json!({
        "bench": "relay-overload",
        "params": {"factor": a.factor, "capacity": capacity, "capacity_measured": a.measure, "sessions": n,
                   "seconds": a.run.seconds, "warmup_seconds": a.run.warmup_seconds, "repeats": a.run.repeats.max(1),
                   "sessions_per_node": a.run.sessions_per_node, "fps": plan.fps(), "kbps": num(plan.kbps()),
                   "placement": describe_placement(&a.run.placement, &priority)},
        "target_p99_ms": a.target_p99_ms,
        "target_met": met,
        "runs": runs.iter().map(CapRun::to_json).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> StreamShape {
        StreamShape {
            fps: 60,
            kbps: 10_000,
            idr_bytes: 60_000,
            idr_every_s: 2.0,
        }
    }

    #[test]
    fn plan_hits_the_bitrate_with_an_idr_per_group() {
        let plan = FramePlan::new(&shape(), 7).unwrap();
        assert_eq!(plan.gop(), 120);
        // 10 Mbit/s at 60 fps is 20833 bytes a frame; the group adds up to it exactly.
        let total: u64 = plan.sizes.iter().map(|&s| s as u64).sum();
        assert_eq!(total, (10_000_000.0f64 / 8.0 / 60.0 * 120.0).round() as u64);
        assert!((plan.kbps() - 10_000.0).abs() < 1.0, "{}", plan.kbps());
        let (key, idr) = plan.frame(0, 0);
        assert!(key);
        assert_eq!(idr.len(), 60_000);
        assert!(!plan.frame(1, 0).0);
        assert!(plan.frame(120, 0).0 && plan.frame(100, 20).0);
        // P frames vary around their mean but stay well below the IDR.
        let mean = plan.mean_p_bytes();
        let (lo, hi) = (
            plan.sizes[1..].iter().min().unwrap(),
            plan.sizes[1..].iter().max().unwrap(),
        );
        assert!(
            *lo as f64 >= 0.65 * mean && (*hi as f64) <= 1.35 * mean,
            "{lo}..{hi} around {mean}"
        );
        assert!(hi > lo, "sizes vary");
        // Same seed, same sequence: every run sends the same bytes.
        assert_eq!(FramePlan::new(&shape(), 7).unwrap().sizes, plan.sizes);
    }

    #[test]
    fn plan_refuses_shapes_it_cannot_make() {
        assert_eq!(
            FramePlan::new(&StreamShape { fps: 0, ..shape() }, 1).unwrap_err(),
            PlanError::Fps(0)
        );
        assert!(matches!(
            FramePlan::new(
                &StreamShape {
                    idr_every_s: f64::NAN,
                    ..shape()
                },
                1
            ),
            Err(PlanError::IdrInterval(_))
        ));
        assert!(matches!(
            FramePlan::new(
                &StreamShape {
                    idr_every_s: 0.01,
                    ..shape()
                },
                1
            ),
            Err(PlanError::NoPFrames { gop: 1 })
        ));
        // 1 Mbit/s cannot carry a 60 KB IDR every 2 s plus 119 P frames.
        assert!(matches!(
            FramePlan::new(
                &StreamShape {
                    kbps: 200,
                    ..shape()
                },
                1
            ),
            Err(PlanError::Budget { .. })
        ));
    }

    #[test]
    fn frames_are_due_on_the_frame_clock() {
        let plan = FramePlan::new(&shape(), 1).unwrap();
        assert_eq!(plan.due(0), Duration::ZERO);
        assert_eq!(plan.due(60), Duration::from_secs(1));
        assert_eq!(plan.due(1).as_micros(), 16_666);
    }

    #[test]
    fn windows_count_late_missing_and_duplicate_frames() {
        let log = RecvLog {
            frames: vec![
                Got {
                    seq: 0,
                    latency_us: 100.0,
                    keyframe: true,
                    at_us: 0,
                },
                Got {
                    seq: 1,
                    latency_us: 200.0,
                    keyframe: false,
                    at_us: 0,
                },
                Got {
                    seq: 1,
                    latency_us: 900.0,
                    keyframe: false,
                    at_us: 0,
                },
                Got {
                    seq: 3,
                    latency_us: 20_000.0,
                    keyframe: false,
                    at_us: 0,
                },
                Got {
                    seq: 9,
                    latency_us: 5.0,
                    keyframe: false,
                    at_us: 0,
                },
            ],
            ..Default::default()
        };
        let w = Window::of_one(&log, 0, 4, 16_667.0);
        assert_eq!((w.expected, w.received, w.missing(), w.late), (4, 3, 1, 1));
        assert_eq!(w.lat.max, 20_000.0);
        assert_eq!(w.idr_p50, 100.0);
        let two = Window::of([(&log, 1, 3), (&log, 0, 2)], 16_667.0);
        // Each player is counted over its own range: seqs 1..3 miss 2, seqs 0..2 are complete.
        assert_eq!((two.expected, two.received, two.late), (4, 3, 0));
    }

    #[test]
    fn metric_sum_adds_label_sets_of_one_name_only() {
        let page = "# TYPE nearpath_game_frames_dropped counter\n\
                    nearpath_game_frames_dropped_total{reason=\"late\"} 3\n\
                    nearpath_game_frames_dropped_total{reason=\"relay\"} 2\n\
                    nearpath_game_frames_dropped_total_other 100\n\
                    nearpath_game_frames_relayed_total 42\n";
        assert_eq!(metric_sum(page, "nearpath_game_frames_dropped_total"), 5.0);
        assert_eq!(metric_sum(page, "nearpath_game_frames_relayed_total"), 42.0);
        assert_eq!(metric_sum(page, "absent_total"), 0.0);
    }

    #[test]
    fn proc_net_parsers() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 10 0 7 12 7 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 99 0\n";
        assert_eq!(snmp_udp_field(snmp, "RcvbufErrors"), Some(7));
        assert_eq!(snmp_udp_field(snmp, "Nope"), None);
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   1: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 5\n\
                   2: 0100007F:0050 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 2 0000000000000000 9\n";
        assert_eq!(udp_port_drops(udp, 8080), Some(5));
        assert_eq!(udp_port_drops(udp, 80), Some(9));
        assert_eq!(udp_port_drops(udp, 81), None);
    }

    #[test]
    fn renice_reaches_every_thread_and_names_a_missing_process() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let _ = wait.recv();
        });
        // SAFETY: getpriority takes plain integers. Re-applying the value the threads already
        // have (inherited from this one) needs no privilege.
        let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let changed = renice(std::process::id(), current).unwrap();
        assert!(changed >= 2, "{changed} threads");
        release.send(()).unwrap();
        other.join().unwrap();
        assert!(renice(u32::MAX - 1, 0).is_err());
    }

    /// The machinery both benchmarks rest on: a paced stream sent by a fake node reaches
    /// `Client::play` through the bare relay and directly, every frame once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_frames_reach_players_directly_and_through_the_bare_relay() {
        let plan = Arc::new(FramePlan::new(&shape(), 3).unwrap());
        let params = play_params(&shape());
        let direct = DirectServer::start(&[ALPN_CLIENT]).unwrap();
        let mut accepted = accept_players(direct.endpoint.clone(), 1, DIRECT_SESSION_BASE);
        let d_player = play(direct.addr, direct.sha, "k", params.clone())
            .await
            .unwrap();
        let d_node = accepted.recv().await.unwrap().unwrap();
        assert_eq!(d_player.session_id, d_node.session_id);

        let relay = BareRelay::start(Vec::new()).unwrap();
        let r_player = play(relay.addr, relay.sha, "k", params).await.unwrap();
        assert_eq!(r_player.session_id, BARE_SESSION);
        let cfg = client_config(ServerVerify::PinnedSha256(relay.sha), &[ALPN_NODE]).unwrap();
        let r_node = node_endpoint()
            .unwrap()
            .connect_with(cfg, relay.addr, "localhost")
            .unwrap()
            .await
            .unwrap();

        let frames = 30;
        let legs = vec![
            Leg {
                conn: d_node.conn.clone(),
                session_id: d_node.session_id,
            },
            Leg {
                conn: r_node.clone(),
                session_id: BARE_SESSION,
            },
        ];
        let start = Instant::now();
        let sender = tokio::spawn(pace(plan.clone(), legs, start, frames, 119, (1280, 720)));
        let end = start + plan.due(frames);
        let (d, r) = tokio::join!(
            collect(d_player.frames, frames - 1, end),
            collect(r_player.frames, frames - 1, end)
        );
        let sent = sender.await.unwrap();
        assert_eq!((sent.sent, sent.errors), (2 * frames, 0));
        for log in [&d, &r] {
            assert_eq!(log.errors, 0, "{:?}", log.first_error);
            let seqs: Vec<u64> = log.frames.iter().map(|g| g.seq).collect();
            assert_eq!(seqs, (0..frames).collect::<Vec<_>>());
            // Phase 119 puts the group's IDR at frame 1.
            assert!(log.frames[1].keyframe && !log.frames[0].keyframe);
            let w = Window::of_one(log, 0, frames, 1e6);
            assert_eq!((w.missing(), w.late), (0, 0));
            assert!(w.lat.min > 0.0, "{:?}", w.lat);
        }
    }

    #[test]
    fn autogroup_nice_is_read_from_its_proc_line() {
        assert_eq!(parse_autogroup_nice("/autogroup-36 nice 0\n"), Some(0));
        assert_eq!(parse_autogroup_nice("/autogroup-7 nice -20"), Some(-20));
        assert_eq!(parse_autogroup_nice("/autogroup-7"), None);
    }

    #[test]
    fn idrs_are_spread_over_the_group_in_wall_clock_time() {
        let (n, gop) = (150u64, 120u64);
        // Session i joins 2 s * i / n after the first (a ramp as long as the group).
        let slots: std::collections::HashSet<u64> = (0..n)
            .map(|i| {
                let join = (2.0 * 60.0 * i as f64 / n as f64).round() as u64;
                let phase = idr_phase(i, n, gop, join);
                // Frame k is an IDR when (k + phase) % gop == 0; its wall-clock slot is join + k.
                let k = (gop - phase) % gop;
                (join + k) % gop
            })
            .collect();
        // 150 sessions over 120 slots: every slot is used.
        assert_eq!(slots.len(), 120);
        // Without a ramp the phase alone spreads them.
        assert_eq!(idr_phase(0, n, gop, 0), 0);
        assert_eq!(idr_phase(75, n, gop, 0), 60);
    }

    #[test]
    fn ramp_runs_steps_up_to_the_maximum() {
        assert_eq!(
            ramp("25,50,100,150,200", 150, false).unwrap(),
            vec![25, 50, 100, 150]
        );
        assert_eq!(ramp("25,50", 120, false).unwrap(), vec![25, 50, 120]);
        assert_eq!(ramp("25,50", 120, true).unwrap(), vec![120]);
        assert!(ramp("25,x", 120, false).is_err());
    }
}
