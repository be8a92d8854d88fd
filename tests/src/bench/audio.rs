//! `bench audio-transport`: game audio over QUIC datagrams against the same packets on one
//! stream, through the seeded UDP impairment relay (loss, delay, jitter). It measures the
//! reason PROTOCOL.md section 8 gives for datagrams: on a stream, one lost packet holds every
//! later one back for a retransmission, so a receiver that wants no gap must buffer for it.
//!
//! Both QUIC endpoints and the relay run in this process, so a packet's latency is its arrival
//! minus its capture time on one clock. Packets are 10 ms Opus-sized audio packets
//! (`AudioPacket`, the 25-byte header of `protocol/src/audio.rs` plus `--opus-bytes` of payload)
//! at 100 a second. Each loss rate runs twice on a fresh relay with the same seed: (a) one
//! datagram per packet, (b) every packet on one unidirectional stream, length-prefixed, in order.

use super::stats::{num, percentile_sorted, Summary};
use anyhow::{bail, Context};
use bytes::Bytes;
use nearpath_protocol::audio::{AudioPacket, SAMPLES_10MS};
use nearpath_protocol::tls::{client_config_with, server_config, ServerVerify, TransportOptions};
use nearpath_protocol::ALPN_NODE;
use nearpath_tests::impair::{Impairment, UdpRelay};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// One audio packet every this long.
const PACKET_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, clap::Args)]
pub struct AudioTransportArgs {
    /// Seconds of audio per run (100 packets a second).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Loss rates to compare, comma-separated, 0..1 (each direction).
    #[arg(long, default_value = "0,0.01,0.05")]
    pub losses: String,
    /// One-way delay each direction, ms.
    #[arg(long, default_value_t = 20.0)]
    pub delay_ms: f64,
    /// Jitter each direction (uniform, without reordering), ms.
    #[arg(long, default_value_t = 2.0)]
    pub jitter_ms: f64,
    /// Opus payload bytes per packet (120: 96 kbit/s at 10 ms), after the 25-byte header.
    #[arg(long, default_value_t = 120)]
    pub opus_bytes: usize,
    /// The relay's seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Accepted for the harness's uniform command line; this bench pins nothing.
    #[arg(long)]
    pub no_pin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Datagram,
    Stream,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Datagram => "datagram",
            Mode::Stream => "stream",
        }
    }
}

/// What one run measured.
#[derive(Debug)]
struct RunResult {
    sent: u64,
    /// Latency (ms) of each distinct packet received.
    latencies: Vec<f64>,
    /// Packets that came more than once or could not be decoded.
    bad: u64,
    /// Packets the relay dropped (both directions; includes acknowledgements).
    relay_lost: u64,
}

fn parse_losses(s: &str) -> anyhow::Result<Vec<f64>> {
    s.split(',')
        .map(|p| {
            let v: f64 = p
                .trim()
                .parse()
                .with_context(|| format!("--losses: {p:?} is not a number"))?;
            if !(0.0..1.0).contains(&v) {
                bail!("--losses: {v} is not in 0..1");
            }
            Ok(v)
        })
        .collect()
}

pub async fn run(a: AudioTransportArgs) -> anyhow::Result<()> {
    let losses = parse_losses(&a.losses)?;
    if !(a.seconds > 0.0 && a.seconds <= 3600.0) {
        bail!("--seconds must be in (0, 3600]");
    }
    if a.opus_bytes == 0 || a.opus_bytes > nearpath_protocol::audio::MAX_OPUS_PACKET {
        bail!(
            "--opus-bytes must be 1..={}",
            nearpath_protocol::audio::MAX_OPUS_PACKET
        );
    }
    let packets = (a.seconds * 1000.0 / PACKET_INTERVAL.as_millis() as f64).round() as u64;
    println!(
        "{:>6} {:>9} {:>6} {:>6} {:>8} {:>8} {:>9} {:>8} {:>10}",
        "loss", "mode", "sent", "lost", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "buffer ms"
    );
    let mut results = Vec::new();
    for &loss in &losses {
        for mode in [Mode::Datagram, Mode::Stream] {
            let imp = Impairment::delay(a.delay_ms)
                .with_jitter(a.jitter_ms, false)
                .with_loss(loss);
            let r = run_one(mode, imp, packets, a.opus_bytes, a.seed).await?;
            let row = summarise(mode, loss, &r);
            println!(
                "{:>5.1}% {:>9} {:>6} {:>6} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>10.1}",
                loss * 100.0,
                mode.name(),
                r.sent,
                row["lost"],
                row["latency_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
                row["latency_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
                row["latency_p999_ms"].as_f64().unwrap_or(f64::NAN),
                row["latency_ms"]["max"].as_f64().unwrap_or(f64::NAN),
                row["buffer_no_gap_ms"].as_f64().unwrap_or(f64::NAN),
            );
            results.push(row);
        }
    }
    println!(
        "{}",
        json!({
            "bench": "audio-transport",
            "seconds": a.seconds,
            "packets_per_run": packets,
            "packet_bytes": AudioPacket::HEADER_LEN + a.opus_bytes,
            "delay_ms": a.delay_ms,
            "jitter_ms": a.jitter_ms,
            "seed": a.seed,
            "results": results,
        })
    );
    Ok(())
}

/// One row of the summary. The base delay is the smallest latency seen (the path's one-way
/// delay plus this process's own handling); the buffer a receiver needs to hear no gap is the
/// p99.9 latency above it, and `buffer_max_ms` the worst case.
fn summarise(mode: Mode, loss: f64, r: &RunResult) -> Value {
    let mut lat = r.latencies.clone();
    let s = Summary::of(&mut lat);
    let p999 = percentile_sorted(&lat, 99.9);
    let received = lat.len() as u64;
    json!({
        "mode": mode.name(),
        "loss": loss,
        "sent": r.sent,
        "received": received,
        "lost": r.sent.saturating_sub(received),
        "bad": r.bad,
        "relay_dropped": r.relay_lost,
        "latency_ms": s.to_json(),
        "latency_p999_ms": num(p999),
        "buffer_no_gap_ms": num(p999 - s.min),
        "buffer_max_ms": num(s.max - s.min),
    })
}

/// Sends `packets` audio packets client → server through a fresh relay and collects, at the
/// server, each packet's latency.
async fn run_one(
    mode: Mode,
    imp: Impairment,
    packets: u64,
    opus_bytes: usize,
    seed: u64,
) -> anyhow::Result<RunResult> {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let cert = nearpath_gateway::tls::self_signed(&["localhost"])?;
    let transport = TransportOptions::default();
    let scfg = server_config(
        cert.chain.clone(),
        cert.key.clone_key(),
        &[ALPN_NODE],
        &transport,
    )?;
    let (server, _) =
        nearpath_protocol::net::server_endpoint(SocketAddr::new(localhost, 0), scfg, 8 << 20)?;
    let ccfg = client_config_with(
        ServerVerify::PinnedSha256(cert.sha256),
        &[ALPN_NODE],
        &transport,
    )?;
    let (client, _) =
        nearpath_protocol::net::client_endpoint(SocketAddr::new(localhost, 0), ccfg, 8 << 20)?;
    let relay = UdpRelay::start(
        SocketAddr::new(localhost, 0),
        server.local_addr()?,
        localhost,
        seed,
    )
    .await?;

    let accept = {
        let server = server.clone();
        tokio::spawn(async move {
            let incoming = server
                .accept()
                .await
                .context("the server endpoint closed")?;
            anyhow::Ok(incoming.await?)
        })
    };
    // The handshake runs on the unimpaired relay: only the audio is measured.
    let conn = client.connect(relay.addr(), "localhost")?.await?;
    let server_conn = tokio::time::timeout(Duration::from_secs(10), accept)
        .await
        .context("no connection within 10 s")???;
    relay.set_both(imp);

    // One clock for both ends: capture times are microseconds since `t0`.
    let t0 = Instant::now();
    let start = t0 + Duration::from_millis(20);
    let last_capture = start + PACKET_INTERVAL * packets.saturating_sub(1) as u32;
    let opus = Bytes::from(vec![0xfc; opus_bytes]);
    let sender = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut stream = match mode {
                Mode::Stream => Some(conn.open_uni().await?),
                Mode::Datagram => None,
            };
            let mut tick = tokio::time::interval_at(start.into(), PACKET_INTERVAL);
            // A sender held up (a blocked stream) catches up at once, as an audio capture
            // callback would deliver its backlog.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for seq in 0..packets as u32 {
                let captured: Instant = tick.tick().await.into();
                let p = AudioPacket {
                    session_id: 1,
                    seq,
                    capture_ts_us: captured.saturating_duration_since(t0).as_micros() as u64,
                    samples: SAMPLES_10MS,
                    flags: 0,
                    opus: opus.clone(),
                };
                let buf = p.encode()?;
                match &mut stream {
                    Some(s) => {
                        s.write_all(&(buf.len() as u16).to_be_bytes()).await?;
                        s.write_all(&buf).await?;
                    }
                    None => conn.send_datagram(buf.into())?,
                }
            }
            if let Some(mut s) = stream {
                s.finish()?;
            }
            anyhow::Ok(())
        })
    };

    let mut seen = vec![false; packets as usize];
    let mut latencies = Vec::with_capacity(packets as usize);
    let mut bad = 0u64;
    let mut note = |buf: &Bytes| {
        let now_us = Instant::now().saturating_duration_since(t0).as_micros() as u64;
        match AudioPacket::decode(buf) {
            Ok(p) if (p.seq as usize) < seen.len() && !seen[p.seq as usize] => {
                seen[p.seq as usize] = true;
                latencies.push(now_us.saturating_sub(p.capture_ts_us) as f64 / 1000.0);
            }
            _ => bad += 1,
        }
    };
    match mode {
        Mode::Datagram => {
            // Lost datagrams never come: stop once every packet has come or a second after
            // the last one was captured (far beyond any delay this path adds).
            let deadline = last_capture + Duration::from_secs(1);
            let mut received = 0u64;
            while received < packets {
                tokio::select! {
                    d = server_conn.read_datagram() => {
                        note(&d.context("the connection closed while reading datagrams")?);
                        received += 1;
                    }
                    _ = tokio::time::sleep_until(deadline.into()) => break,
                }
            }
        }
        Mode::Stream => {
            // A stream delivers everything; the read ends at the sender's finish.
            let mut recv = tokio::time::timeout(Duration::from_secs(10), server_conn.accept_uni())
                .await
                .context("no stream within 10 s")??;
            let read_all = async {
                let mut len = [0u8; 2];
                loop {
                    match recv.read_exact(&mut len).await {
                        Ok(()) => {}
                        Err(quinn::ReadExactError::FinishedEarly(0)) => break,
                        Err(e) => return Err(anyhow::Error::from(e)),
                    }
                    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    recv.read_exact(&mut buf).await?;
                    note(&Bytes::from(buf));
                }
                anyhow::Ok(())
            };
            // Generous: a stream at 5% loss delays, but never by this much.
            let limit =
                last_capture.saturating_duration_since(Instant::now()) + Duration::from_secs(30);
            tokio::time::timeout(limit, read_all)
                .await
                .context("the stream did not finish")??;
        }
    }
    sender.await??;
    let dropped = relay.up_stats()[2] + relay.down_stats()[2];
    conn.close(0u32.into(), b"done");
    server_conn.close(0u32.into(), b"done");
    relay.stop();
    Ok(RunResult {
        sent: packets,
        latencies,
        bad,
        relay_lost: dropped,
    })
}
