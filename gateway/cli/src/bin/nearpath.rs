//! `nearpath`: the client CLI for apps and players, speaking QUIC (ALPN `nearpath/1`) to a
//! gateway.

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};
use nearpath_edge_node::clidoc;
use nearpath_protocol::ogg::OggOpusWriter;
use nearpath_protocol::{
    Client, ControlEvent, FrameSeqStats, InferEvent, InputEvent, PlayParams, ServerVerify,
    VideoCodec,
};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "nearpath",
    version,
    about = "Nearpath client: inference and games over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Conn {
    /// Gateway QUIC address (host:port). Used as given: no probing.
    #[arg(long, default_value = "127.0.0.1:4433", conflicts_with_all = ["gateways", "discover"])]
    gateway: String,
    /// Several gateways' QUIC addresses, comma-separated: the CLI measures the handshake
    /// round trip to each and uses the nearest.
    #[arg(long, value_delimiter = ',', conflicts_with = "discover")]
    gateways: Vec<String>,
    /// URL of a gateway's `GET /v1/gateways` list (e.g. http://gw:8080/v1/gateways, fetched
    /// with --key): the CLI probes the live gateways listed and uses the nearest. The list only
    /// says where gateways are; their certificates are still checked with --pin or --ca.
    #[arg(long)]
    discover: Option<String>,
    /// API key (or NEARPATH_API_KEY).
    #[arg(long, env = "NEARPATH_API_KEY", default_value = "demo")]
    key: String,
    /// Trust this CA certificate file (PEM).
    #[arg(long, conflicts_with_all = ["pin", "insecure"])]
    ca: Option<PathBuf>,
    /// Trust a certificate with this SHA-256 (hex), as `gateway demo` prints. Repeat it (or
    /// separate with commas) to trust each gateway of a federation.
    #[arg(long, conflicts_with = "insecure", value_delimiter = ',')]
    pin: Vec<String>,
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
        /// The model to ask (`nearpath-sim` in the demo).
        #[arg(long, short)]
        model: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// The user message.
        prompt: String,
    },
    /// Play a game: receive H.264 frames (optionally into a file that ffplay/VLC plays), send
    /// scripted input, and print fps, bitrate, drops, network latency and input-to-photon.
    Play {
        #[command(flatten)]
        conn: Conn,
        /// The game's title (`testpattern` in the demo).
        #[arg(long)]
        game: String,
        /// Video width in pixels.
        #[arg(long, default_value_t = 1280)]
        width: u32,
        /// Video height in pixels.
        #[arg(long, default_value_t = 720)]
        height: u32,
        /// Frames per second.
        #[arg(long, default_value_t = 60)]
        fps: u32,
        /// Target bitrate in kbit/s.
        #[arg(long, default_value_t = 10_000)]
        bitrate: u32,
        /// Write the stream here (H.264 and HEVC as Annex B, AV1 as OBUs; plays with
        /// `ffplay FILE.h264`, `ffplay FILE.hevc`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Codecs to accept, most preferred first, comma-separated (`h264`, `hevc`, `av1`); the
        /// gateway picks the first one a node encodes.
        #[arg(long, value_delimiter = ',', value_parser = parse_codec, default_value = "h264")]
        codecs: Vec<VideoCodec>,
        /// Write the session's sound here as Ogg Opus (48 kHz stereo; plays with `ffplay
        /// FILE.opus`); lost packets become concealed gaps, so the file keeps the session's
        /// timing.
        #[arg(long)]
        audio_out: Option<PathBuf>,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// With several gateways (--gateways, --discover): when nothing at all has arrived from
        /// the gateway for this many milliseconds while frames should flow, give it up and
        /// resume the session through the nearest other gateway of the federation.
        #[arg(long, default_value_t = 1000)]
        resume_after_ms: u64,
        /// Change the picture size and frame rate mid-session, AFTER the start: `3s:1920x1080@60`
        /// (`ms` or `s`; repeat the flag for several changes). The session goes on; the first
        /// frame at the new size is a keyframe. A refused change is printed with its reason.
        #[arg(long = "resize-after", value_name = "AFTER:WxH@FPS", value_parser = parse_resize)]
        resize_after: Vec<Resize>,
        /// Play inside this W3C trace (`00-<trace id>-<parent span id>-<flags>`): the
        /// gateway's and the node's session spans join it (with OTLP export on). Without it
        /// the gateway starts a trace of its own.
        #[arg(long, value_name = "TRACEPARENT", value_parser = parse_traceparent)]
        traceparent: Option<String>,
    },
    /// Print the shell completion script for SHELL to stdout (the packages install them).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clidoc::Shell,
    },
    /// Print the man page to stdout, or with --dir write one page per command there.
    Man {
        /// Write nearpath.1 and a page per subcommand (nearpath-SUB.1) into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// A `--traceparent` the gateway would keep: refused here, with the reason, rather than
/// silently ignored by the gateway.
fn parse_traceparent(s: &str) -> Result<String, String> {
    if nearpath_protocol::message::is_valid_traceparent(s.as_bytes()) {
        Ok(s.to_string())
    } else {
        Err("not a W3C traceparent: expected 00-<32 lowercase hex digits>-<16 lowercase hex digits>-<2 hex digits>, ids not all zero".into())
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The documentation commands need no runtime.
    match &cli.cmd {
        Cmd::Completions { shell } => {
            return clidoc::print_completions(Cli::command(), *shell);
        }
        Cmd::Man { dir } => return nearpath_gateway_cli::cli::man(Cli::command(), dir.as_deref()),
        _ => {}
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Infer {
                conn,
                model,
                max_tokens,
                prompt,
            } => infer(conn, model, max_tokens, prompt).await,
            Cmd::Play {
                conn,
                game,
                width,
                height,
                fps,
                bitrate,
                out,
                codecs,
                audio_out,
                seconds,
                resume_after_ms,
                resize_after,
                traceparent,
            } => {
                let params = PlayParams {
                    game,
                    width,
                    height,
                    fps,
                    bitrate_kbps: bitrate,
                };
                let options = PlayOptions {
                    codecs,
                    out,
                    audio_out,
                    seconds,
                    resume_after: Duration::from_millis(resume_after_ms),
                    resizes: resize_after,
                    traceparent,
                };
                play(conn, params, options).await
            }
            // Answered above, before the runtime.
            Cmd::Completions { .. } | Cmd::Man { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", nearpath_protocol::report::chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn connect(c: &Conn) -> anyhow::Result<Client> {
    let verify = verify_of(c)?;
    match candidates_of(c, &verify).await? {
        Some(candidates) => nearest(c, &candidates, verify).await,
        None => connect_to(c, &c.gateway, verify).await,
    }
}

/// How the gateways' certificates are checked, from the flags.
fn verify_of(c: &Conn) -> anyhow::Result<ServerVerify> {
    Ok(if c.insecure {
        eprintln!("warning: --insecure: the gateway's certificate is NOT checked (local development only)");
        ServerVerify::InsecureDangerous
    } else if let Some(ca) = &c.ca {
        ServerVerify::CaFile(ca.clone())
    } else if let [pin] = c.pin.as_slice() {
        ServerVerify::PinnedSha256(nearpath_protocol::tls::parse_sha256_hex(pin)?)
    } else if !c.pin.is_empty() {
        ServerVerify::PinnedAnySha256(
            c.pin
                .iter()
                .map(|p| nearpath_protocol::tls::parse_sha256_hex(p))
                .collect::<Result<_, _>>()?,
        )
    } else {
        bail!("say how to check the gateway's certificate: --ca FILE, --pin SHA256, or --insecure for local development");
    })
}

/// The gateways to choose among (`--gateways` or `--discover`), or `None` for the one
/// `--gateway`.
async fn candidates_of(c: &Conn, verify: &ServerVerify) -> anyhow::Result<Option<Vec<String>>> {
    if let Some(url) = &c.discover {
        // With pins, entries whose certificate is not pinned are skipped before probing.
        let pins: Vec<[u8; 32]> = match verify {
            ServerVerify::PinnedSha256(p) => vec![*p],
            ServerVerify::PinnedAnySha256(p) => p.clone(),
            _ => Vec::new(),
        };
        let pins = (!pins.is_empty()).then_some(pins.as_slice());
        let list = nearpath_edge_node::bootstrap::fetch_gateway_list(url, Some(&c.key), pins)
            .await
            .map_err(|e| anyhow::anyhow!("discovering gateways: {e}"))?;
        if list.is_empty() {
            bail!("{url} lists no live gateway (that the given pins trust)");
        }
        Ok(Some(list))
    } else if !c.gateways.is_empty() {
        Ok(Some(c.gateways.clone()))
    } else {
        Ok(None)
    }
}

async fn nearest(c: &Conn, candidates: &[String], verify: ServerVerify) -> anyhow::Result<Client> {
    let started = Instant::now();
    let (client, address) =
        nearpath_gateway_cli::pick::nearest(candidates, c.server_name.as_deref(), verify)
            .await
            .map_err(anyhow::Error::msg)?;
    eprintln!(
        "using gateway {address} (handshake {:.1} ms, nearest of {})",
        started.elapsed().as_secs_f64() * 1000.0,
        candidates.len()
    );
    Ok(client)
}

async fn connect_to(c: &Conn, gateway: &str, verify: ServerVerify) -> anyhow::Result<Client> {
    nearpath_gateway_cli::pick::connect(gateway, c.server_name.as_deref(), verify)
        .await
        .map_err(anyhow::Error::msg)
}

async fn infer(conn: Conn, model: String, max_tokens: u32, prompt: String) -> anyhow::Result<()> {
    let client = connect(&conn).await?;
    let result = infer_on(&client, &conn, model, max_tokens, prompt).await;
    // Whatever happened, tell the gateway before the process exits.
    client.close().await;
    result
}

async fn infer_on(
    client: &Client,
    conn: &Conn,
    model: String,
    max_tokens: u32,
    prompt: String,
) -> anyhow::Result<()> {
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
            Some(InferEvent::Chunk(c)) => {
                first.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1000.0);
                tokens += 1;
                // Text deltas print as text; anything else (a tool call, logprobs) as its JSON.
                let v: serde_json::Value = serde_json::from_str(&c.json).unwrap_or_default();
                match v["choices"][0]["delta"]["content"].as_str() {
                    Some(text)
                        if v["choices"][0]["delta"]
                            .as_object()
                            .is_some_and(|d| d.len() == 1) =>
                    {
                        write!(out, "{text}")?
                    }
                    _ => writeln!(out, "\n{}", c.json)?,
                }
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

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A codec named on the command line.
fn parse_codec(s: &str) -> Result<VideoCodec, String> {
    VideoCodec::from_name(s).ok_or_else(|| format!("unknown codec {s:?} (h264, hevc or av1)"))
}

/// One `--resize-after`: when, after the start, and the values to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resize {
    after: Duration,
    width: u32,
    height: u32,
    fps: u32,
}

/// Parses `3s:1920x1080@60` (or `500ms:...`, `2.5s:...`).
fn parse_resize(s: &str) -> Result<Resize, String> {
    let bad = || format!("{s:?} is not AFTER:WxH@FPS (e.g. 3s:1920x1080@60)");
    let (after, video) = s.split_once(':').ok_or_else(bad)?;
    let after = if let Some(ms) = after.strip_suffix("ms") {
        Duration::from_millis(ms.parse().map_err(|_| bad())?)
    } else if let Some(secs) = after.strip_suffix('s') {
        let secs: f64 = secs.parse().map_err(|_| bad())?;
        Duration::try_from_secs_f64(secs).map_err(|_| bad())?
    } else {
        return Err(bad());
    };
    let (size, fps) = video.split_once('@').ok_or_else(bad)?;
    let (width, height) = size.split_once('x').ok_or_else(bad)?;
    Ok(Resize {
        after,
        width: width.parse().map_err(|_| bad())?,
        height: height.parse().map_err(|_| bad())?,
        fps: fps.parse().map_err(|_| bad())?,
    })
}

/// What `nearpath play` does beyond the session's parameters.
struct PlayOptions {
    /// Codecs to accept, most preferred first.
    codecs: Vec<VideoCodec>,
    /// Where the frames go (Annex B H.264, or the codec's elementary stream).
    out: Option<PathBuf>,
    /// Where the sound goes (Ogg Opus).
    audio_out: Option<PathBuf>,
    /// How long to play.
    seconds: f64,
    /// Resume through another gateway when the connection is silent this long.
    resume_after: Duration,
    /// `--resize-after` changes.
    resizes: Vec<Resize>,
    /// `--traceparent`: the trace the session joins.
    traceparent: Option<String>,
}

async fn play(conn: Conn, params: PlayParams, options: PlayOptions) -> anyhow::Result<()> {
    let client = connect(&conn).await?;
    let mut holder = Some(client);
    let result = play_on(&mut holder, &conn, params, options).await;
    // However the session ended (its time is up, the gateway ended it, Ctrl-C, an error), the
    // connection is closed cleanly and the close is sent before the process exits: the gateway
    // then ends the session and frees its node slot at once, instead of after the idle timeout.
    if let Some(client) = holder {
        client.close().await;
    }
    result
}

/// Resumes session `session_id` through the nearest other gateway (see
/// [`nearpath_gateway_cli::pick::resume_nearest`]).
async fn resume_elsewhere(
    conn: &Conn,
    lost: std::net::SocketAddr,
    session_id: u64,
    token: &str,
) -> anyhow::Result<(Client, nearpath_protocol::PlaySession)> {
    let verify = verify_of(conn)?;
    let candidates = candidates_of(conn, &verify)
        .await?
        .unwrap_or_else(|| vec![conn.gateway.clone()]);
    let (client, session, address) = nearpath_gateway_cli::pick::resume_nearest(
        &candidates,
        lost,
        conn.server_name.as_deref(),
        verify,
        &conn.key,
        session_id,
        token,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    eprintln!("resuming through gateway {address}");
    Ok((client, session))
}

/// Why one gateway's share of a session stopped.
enum Leg {
    /// The player's time is up, or Ctrl-C.
    Stop,
    /// The gateway ended the session.
    Ended(String),
    /// The gateway went silent or its connection failed.
    Lost(String),
}

async fn play_on(
    holder: &mut Option<Client>,
    conn: &Conn,
    params: PlayParams,
    options: PlayOptions,
) -> anyhow::Result<()> {
    let PlayOptions {
        codecs,
        out,
        audio_out,
        seconds,
        resume_after,
        mut resizes,
        traceparent,
    } = options;
    let Some(client) = holder.as_ref() else {
        bail!("no gateway connection");
    };
    let mut session = client
        .play_traced(&conn.key, params.clone(), &codecs, traceparent.as_deref())
        .await?;
    let started = *session.started();
    eprintln!(
        "session {} started: {}x{} @ {} fps, {} kbps, {}",
        started.session_id,
        started.width,
        started.height,
        started.fps,
        started.bitrate_kbps,
        started.codec
    );
    let mut file = match &out {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let begun = tokio::time::Instant::now();
    let deadline = begun + Duration::from_secs_f64(seconds);
    // Due times, latest first, so that the next one is popped off the end.
    resizes.sort_by_key(|r| std::cmp::Reverse(r.after));
    let mut resizes: Vec<(tokio::time::Instant, Resize)> =
        resizes.into_iter().map(|r| (begun + r.after, r)).collect();
    let mut ogg = match &audio_out {
        Some(p) => {
            let f =
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
            Some(OggOpusWriter::new(
                std::io::BufWriter::new(f),
                started.session_id as u32,
            )?)
        }
        None => None,
    };
    let mut audio_packets = 0u64;
    let mut audio_ms = Vec::new();
    let t0 = Instant::now();
    let (mut count, mut bytes, mut keyframes) = (0u64, 0u64, 0u64);
    // Frames travel on their own streams and may overtake each other: a late frame is not a
    // missing one.
    let mut seqs = FrameSeqStats::default();
    let mut net_ms = Vec::new();
    let mut i2p_ms = Vec::new();
    let mut pauses = 0u32;
    let mut resumes = 0u32;
    let mut ended: Option<String> = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    // Set while a resume is in progress: when the gateway was given up, for the figure.
    let mut lost_at: Option<Instant> = None;
    loop {
        let token = session.resume_token().map(str::to_string);
        let gateway = session.gateway();
        let mut audio = session.audio();
        let (mut control, mut frames, input) = session.split();
        let leg = {
            let Some(client) = holder.as_ref() else {
                bail!("no gateway connection");
            };
            play_leg(
                client,
                &mut control,
                &mut frames,
                &mut audio,
                input,
                deadline,
                &mut ctrl_c,
                resume_after,
                &mut LegStats {
                    file: file.as_mut(),
                    count: &mut count,
                    bytes: &mut bytes,
                    keyframes: &mut keyframes,
                    seqs: &mut seqs,
                    net_ms: &mut net_ms,
                    i2p_ms: &mut i2p_ms,
                    pauses: &mut pauses,
                    lost_at: &mut lost_at,
                    resizes: &mut resizes,
                    ogg: ogg.as_mut(),
                    audio_packets: &mut audio_packets,
                    audio_ms: &mut audio_ms,
                },
            )
            .await?
        };
        match leg {
            Leg::Stop => {
                // Say why the session ends (outcome `ok`) and wait until the gateway has taken
                // it (it finishes the control stream) before the connection closes. Bounded: a
                // gateway that does not answer must not hold the player up; the close that
                // follows ends the session anyway.
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    if control.close("done").await.is_ok() {
                        while let Ok(Some(ev)) = control.next().await {
                            if matches!(ev, ControlEvent::Ended(_) | ControlEvent::Error(_)) {
                                break;
                            }
                        }
                    }
                })
                .await;
                break;
            }
            Leg::Ended(reason) => {
                ended = Some(reason);
                break;
            }
            Leg::Lost(why) => {
                let Some(token) = token else {
                    bail!("lost the gateway ({why}), and it gave no resume token (not in a federation)");
                };
                eprintln!(
                    "gateway {gateway} lost ({why}); resuming session {}",
                    started.session_id
                );
                lost_at = Some(Instant::now());
                drop((control, frames, audio));
                if let Some(old) = holder.take() {
                    // Nothing is sent to a dead gateway; the connection is only let go of.
                    drop(old);
                }
                let (client, next) =
                    resume_elsewhere(conn, gateway, started.session_id, &token).await?;
                *holder = Some(client);
                session = next;
                resumes += 1;
                // Another node, or the same one on a new connection: frames count from 0.
                seqs.restart();
            }
        }
    }
    seqs.finish();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "frames {count} in {secs:.2} s = {:.1} fps (target {}), {:.2} Mbit/s, keyframes {keyframes}, missing/dropped {}, reordered {}, duplicates {}, pauses {pauses}, resumes {resumes}",
        count as f64 / secs,
        started.fps,
        bytes as f64 * 8.0 / secs / 1e6,
        seqs.missing(),
        seqs.reordered,
        seqs.duplicates
    );
    println!(
        "network latency (capture -> receive) p50 {:.2} ms, p95 {:.2} ms; input-to-photon p50 {:.2} ms, p95 {:.2} ms ({} samples)",
        percentile(&mut net_ms, 0.5),
        percentile(&mut net_ms, 0.95),
        percentile(&mut i2p_ms, 0.5),
        percentile(&mut i2p_ms, 0.95),
        i2p_ms.len()
    );
    println!(
        "audio packets {audio_packets} ({:.2} s); audio latency (capture -> receive) p50 {:.2} ms, p95 {:.2} ms",
        audio_packets as f64 * 0.01,
        percentile(&mut audio_ms, 0.5),
        percentile(&mut audio_ms, 0.95),
    );
    if let Some(r) = ended {
        println!("session ended: {r}");
    }
    if let (Some(w), Some(p)) = (ogg, &audio_out) {
        let (late, filled) = (w.late, w.filled);
        w.finish()
            .with_context(|| format!("writing {}", p.display()))?;
        println!(
            "wrote {} (Ogg Opus; {late} late packets dropped, {filled} lost packets concealed)",
            p.display()
        );
    }
    if let Some(p) = out {
        println!(
            "wrote {} (play it with: ffplay {})",
            p.display(),
            p.display()
        );
    }
    Ok(())
}

/// Counters a session accumulates across its gateways.
struct LegStats<'a> {
    file: Option<&'a mut std::fs::File>,
    count: &'a mut u64,
    bytes: &'a mut u64,
    keyframes: &'a mut u64,
    seqs: &'a mut FrameSeqStats,
    net_ms: &'a mut Vec<f64>,
    i2p_ms: &'a mut Vec<f64>,
    pauses: &'a mut u32,
    lost_at: &'a mut Option<Instant>,
    /// `--resize-after` changes not yet asked for, latest first.
    resizes: &'a mut Vec<(tokio::time::Instant, Resize)>,
    ogg: Option<&'a mut OggOpusWriter<std::io::BufWriter<std::fs::File>>>,
    audio_packets: &'a mut u64,
    audio_ms: &'a mut Vec<f64>,
}

/// Plays one gateway's share of a session: frames in, scripted input out, until the time is
/// up, the session ends, or the gateway is lost (its connection failed, or nothing at all
/// arrived from it for `resume_after` while frames were expected).
#[allow(clippy::too_many_arguments)]
async fn play_leg(
    client: &Client,
    control: &mut nearpath_protocol::PlayControl,
    frames: &mut nearpath_protocol::FrameStream,
    audio: &mut nearpath_protocol::AudioStream,
    input: nearpath_protocol::InputSender,
    deadline: tokio::time::Instant,
    ctrl_c: &mut std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<()>>>,
    resume_after: Duration,
    st: &mut LegStats<'_>,
) -> anyhow::Result<Leg> {
    // Scripted input: hold each direction for a while, one key event every 50 ms.
    let keys = [68u16, 83, 65, 87];
    let sent: std::sync::Arc<std::sync::Mutex<HashMap<u64, Instant>>> = Default::default();
    let sent2 = sent.clone();
    let script = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut i = 0usize;
        loop {
            tick.tick().await;
            let code = keys[(i / 20) % keys.len()];
            let down = i.is_multiple_of(2);
            match input.send(InputEvent::Key { code, down }) {
                Ok(seq) => {
                    sent2
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(seq, Instant::now());
                }
                Err(_) => return,
            }
            i += 1;
        }
    });
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _script = AbortOnDrop(script);
    let mut last_input_seen = 0u64;
    let mut paused = false;
    // The gateway answers every keep-alive, so a connection on which nothing at all arrives
    // for `resume_after` while frames should flow has lost its gateway; QUIC's idle timeout
    // would say so only seconds later.
    let mut watch = tokio::time::interval(Duration::from_millis(100));
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rx_seen = (client.connection().stats().udp_rx.datagrams, Instant::now());
    let mut audio_open = true;
    loop {
        tokio::select! {
            a = audio.next(), if audio_open => match a {
                Some(p) => {
                    *st.audio_packets += 1;
                    st.audio_ms.push(now_us().saturating_sub(p.capture_ts_us) as f64 / 1000.0);
                    if let Some(w) = st.ogg.as_mut() {
                        w.push(&p)?;
                    }
                }
                // The connection closed; the frame stream says so too.
                None => audio_open = false,
            },
            _ = tokio::time::sleep_until(deadline) => return Ok(Leg::Stop),
            _ = sleep_until_opt(st.resizes.last().map(|(at, _)| *at)) => {
                if let Some((_, r)) = st.resizes.pop() {
                    eprintln!("asking for {}x{} @ {} fps", r.width, r.height, r.fps);
                    if let Err(e) = control.set_video(r.width, r.height, r.fps).await {
                        return Ok(Leg::Lost(e.to_string()));
                    }
                }
            }
            _ = ctrl_c.as_mut() => {
                eprintln!("interrupted");
                return Ok(Leg::Stop);
            }
            _ = watch.tick() => {
                let rx = client.connection().stats().udp_rx.datagrams;
                if rx != rx_seen.0 || paused {
                    rx_seen = (rx, Instant::now());
                } else if rx_seen.1.elapsed() >= resume_after {
                    return Ok(Leg::Lost(format!("nothing received for {} ms", rx_seen.1.elapsed().as_millis())));
                }
            }
            f = frames.next() => match f {
                Ok(Some(f)) => {
                    let now = now_us();
                    if let Some(at) = st.lost_at.take() {
                        eprintln!(
                            "resumed: first frame {:.0} ms after the gateway was lost (keyframe {})",
                            at.elapsed().as_secs_f64() * 1000.0,
                            f.header.keyframe
                        );
                    }
                    *st.count += 1;
                    *st.bytes += f.payload.len() as u64;
                    *st.keyframes += f.header.keyframe as u64;
                    st.seqs.record(f.header.seq);
                    st.net_ms.push(now.saturating_sub(f.header.capture_ts_us) as f64 / 1000.0);
                    if f.header.input_seq > last_input_seen {
                        last_input_seen = f.header.input_seq;
                        if let Some(t) = sent.lock().unwrap_or_else(|p| p.into_inner()).remove(&f.header.input_seq) {
                            st.i2p_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    if let Some(file) = st.file.as_mut() {
                        file.write_all(&f.payload)?;
                    }
                }
                Ok(None) => return Ok(Leg::Lost("the connection closed".into())),
                Err(e) => return Ok(Leg::Lost(e.to_string())),
            },
            c = control.next() => match c {
                Ok(Some(ControlEvent::Paused(p))) => { *st.pauses += 1; paused = true; eprintln!("paused: {}", p.reason); }
                Ok(Some(ControlEvent::Resumed)) => {
                    // The session moved to another node, whose frames count from 0 again.
                    st.seqs.restart();
                    paused = false;
                    eprintln!("resumed");
                }
                Ok(Some(ControlEvent::Ended(e))) => return Ok(Leg::Ended(e.reason)),
                Ok(Some(ControlEvent::Error(e))) => bail!("{} ({})", e.message, e.code),
                Ok(Some(ControlEvent::VideoChanged(v))) => eprintln!("video changed: {}x{} @ {} fps", v.width, v.height, v.fps),
                Ok(Some(ControlEvent::VideoRefused(e))) => eprintln!("video change refused: {}", e.message),
                Ok(Some(ControlEvent::Rumble(r))) => eprintln!(
                    "rumble: pad {} strong {} weak {} for {} ms",
                    r.pad, r.strong_magnitude, r.weak_magnitude, r.duration_ms
                ),
                Ok(None) => return Ok(Leg::Ended("the gateway finished the session".into())),
                Err(e) => return Ok(Leg::Lost(e.to_string())),
            },
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_flag_must_be_a_w3c_traceparent() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse_traceparent(good), Ok(good.to_string()));
        for bad in [
            "",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_err(), "{bad}");
        }
        let args = |tp: &str| {
            Cli::try_parse_from([
                "nearpath",
                "play",
                "--gateway",
                "127.0.0.1:1",
                "--key",
                "k",
                "--game",
                "arena",
                "--traceparent",
                tp,
            ])
        };
        assert!(args(good).is_ok());
        let err = args("nope").err().expect("refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn resize_flags_parse_and_nonsense_is_refused() {
        assert_eq!(
            parse_resize("3s:1920x1080@60"),
            Ok(Resize {
                after: Duration::from_secs(3),
                width: 1920,
                height: 1080,
                fps: 60
            })
        );
        assert_eq!(
            parse_resize("250ms:640x360@30").map(|r| r.after),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(
            parse_resize("2.5s:640x360@30").map(|r| r.after),
            Ok(Duration::from_millis(2500))
        );
        for bad in [
            "",
            "3:1920x1080@60",
            "3s1920x1080@60",
            "3s:1920x1080",
            "3s:1920@60",
            "-1s:640x360@30",
            "1e400s:640x360@30",
            "3s:-1x1080@60",
            "3s:99999999999x1080@60",
        ] {
            assert!(parse_resize(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_help_entry_of_nearpath_has_a_description() {
        Cli::command().debug_assert();
        let missing = clidoc::undocumented(&Cli::command());
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
