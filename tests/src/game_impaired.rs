//! One game session over an impaired node path, in process: a gateway, an edge node behind a
//! seeded [`UdpRelay`] (both directions impaired), and a native client at 720p60 on a clean path.
//! Shared by the end-to-end tests (`tests/tests/impaired/media.rs`) and `bench game-impaired`.
//!
//! Frame latency is capture (the node's clock) to receipt by the client (the same machine's
//! clock), minus the path's configured one-way delay, so the figure is what the node and the
//! gateway add: queueing, retransmissions, jitter.

use crate::impair::{Impairment, UdpRelay};
use nearpath_config::{
    CapacityConfig, CongestionController, GameEntry, GameSource, GatewayConfig, GeoOverride,
    NodeConfig, NodeGatewayConfig, NodeIdentity,
};
use nearpath_edge_node::{EdgeNode, NodeOptions, NodeStatus};
use nearpath_gateway::store::{KycStatus, SqliteStore, Store};
use nearpath_gateway::{Gateway, Listeners};
use nearpath_protocol::{Client, ControlEvent, PlayParams, ServerVerify};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

const API_KEY: &str = "impaired-api-key";
/// Where the node dials from (the relay forwards from here too).
pub const NODE_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));
/// Where the client dials from.
pub const CLIENT_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 10));

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Node → gateway.
    pub up: Impairment,
    /// Gateway → node.
    pub down: Impairment,
    /// Seconds of play measured.
    pub seconds: f64,
    /// Seconds at the start left out of the figures (the controller finding the path).
    pub warmup: f64,
    /// A blackout of the node path this far into the measured time, for this long.
    pub blackout: Option<(Duration, Duration)>,
    /// The relay's seed.
    pub seed: u64,
    /// The node's congestion controller.
    pub congestion: CongestionController,
    /// The node's reordering tolerance in packets.
    pub reorder_packet_threshold: u32,
    /// The session's bitrate in kbit/s.
    pub bitrate_kbps: u32,
    /// The gateway's `game.frame_budget_ms`. The scenarios set it generous, so that what the
    /// node queues shows as latency instead of being dropped by the gateway.
    pub gateway_frame_budget_ms: u64,
    /// The gateway's heartbeat interval.
    pub heartbeat_ms: u64,
    /// The node's encoder. Default OpenH264, which the README's figures were measured with;
    /// the 2 Mbit/s test runs x264, what `auto` picks on a CPU node.
    pub encoder: nearpath_config::EncoderKind,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            up: Impairment::default(),
            down: Impairment::default(),
            seconds: 6.0,
            warmup: 1.0,
            blackout: None,
            seed: 1,
            congestion: nearpath_config::NodeQuicConfig::default().congestion,
            reorder_packet_threshold: nearpath_config::NodeQuicConfig::default()
                .reorder_packet_threshold,
            bitrate_kbps: 10_000,
            gateway_frame_budget_ms: 2_000,
            heartbeat_ms: 500,
            encoder: nearpath_config::EncoderKind::Openh264,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Frames received in the measured window.
    pub frames: u64,
    /// Frames per second received in the measured window.
    pub fps: f64,
    /// Frame latency above the path's one-way delay, median and 99th percentile, in ms.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// The worst frame latency above the path delay, in ms.
    pub latency_max_ms: f64,
    /// Video received per second in the measured window, in kbit/s.
    pub received_kbps: f64,
    /// Times the node lost its registration (evicted or disconnected) after the first.
    pub node_evictions: u32,
    /// `Paused` notices the client got.
    pub paused: u32,
    /// With a blackout: from the path's return to the first frame received after it, in ms
    /// (`None` without a blackout, or if no frame came before the end).
    pub resumed_after_path_ms: Option<f64>,
    /// Frame streams the client saw fail (aborted, not dropped on purpose).
    pub frame_errors: u64,
    /// The node's view at the end: slots skipped for congestion, frames reset, target bitrate.
    pub node_skipped: u64,
    pub node_reset: u64,
    pub node_bitrate_kbps: u32,
    /// Frames the node encoded.
    pub node_encoded: u64,
}

impl Report {
    /// The JSON summary line of `bench game-impaired`.
    pub fn json(&self) -> Value {
        json!({
            "frames": self.frames,
            "fps": round1(self.fps),
            "latency_p50_ms": round1(self.latency_p50_ms),
            "latency_p99_ms": round1(self.latency_p99_ms),
            "latency_max_ms": round1(self.latency_max_ms),
            "received_kbps": self.received_kbps.round(),
            "node_evictions": self.node_evictions,
            "paused": self.paused,
            "resumed_after_path_ms": self.resumed_after_path_ms.map(round1),
            "frame_errors": self.frame_errors,
            "node_skipped": self.node_skipped,
            "node_reset": self.node_reset,
            "node_bitrate_kbps": self.node_bitrate_kbps,
            "node_encoded": self.node_encoded,
        })
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `s` and reports what the client received.
pub async fn run(s: &Scenario) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let mut config = GatewayConfig::default();
    // Probe sessions would take node slots mid-measurement (`bench checker` measures them).
    config.checker.enabled = false;
    config.store.path = dir.path().join("gw.db");
    config.nodes.heartbeat_ms = s.heartbeat_ms;
    config.geo.reload_check_interval_s = 0;
    config.geo.overrides = vec![GeoOverride {
        cidr: "127.0.0.0/8".parse()?,
        country: "DE".into(),
        subdivision: None,
        lat: Some(52.52),
        lon: Some(13.40),
    }];
    config.game.frame_budget_ms = s.gateway_frame_budget_ms;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.store.path)?);
    let operator = store.create_operator("op", KycStatus::Verified)?;
    let (_, token) = store.create_enrolment_token(&operator.id)?;
    store.insert_api_key_secret(API_KEY, "tenant", 100_000, 100_000_000)?;
    let cert = nearpath_gateway::tls::self_signed(&["localhost"])?;
    let sha = cert.sha256;
    let gw = Gateway::with_parts(config, cert, store)?;
    let shutdown = CancellationToken::new();
    let (addrs, gw_task) = gw.start(Listeners::ephemeral().await?, shutdown.clone())?;

    let relay = UdpRelay::start("127.0.0.1:0".parse()?, addrs.quic, NODE_IP, s.seed).await?;
    relay.set_up(s.up.clone());
    relay.set_down(s.down.clone());

    let mut node_cfg = NodeConfig::new(
        NodeIdentity {
            id: "impaired-1".into(),
            enrolment_token: Some(token),
        },
        NodeGatewayConfig::pinned(
            relay.addr().to_string(),
            nearpath_protocol::tls::sha256_hex(&sha),
        ),
    );
    node_cfg.games = vec![GameEntry {
        title: "arena".into(),
        source: GameSource::Builtin {},
    }];
    node_cfg.capacity = CapacityConfig {
        game_sessions: 1,
        inference_concurrency: 1,
    };
    // Stopping the node at the end should not wait out a 30 s drain.
    node_cfg.drain.deadline_ms = 1_000;
    node_cfg.encoder.encoder = s.encoder;
    node_cfg.quic.congestion = s.congestion;
    node_cfg.quic.reorder_packet_threshold = s.reorder_packet_threshold;
    let node = EdgeNode::new(
        node_cfg,
        NodeOptions {
            use_nvml: false,
            verify: None,
            bind: Some(SocketAddr::new(NODE_IP, 0)),
        },
    )?;
    let sessions = node.sessions();
    let mut status = node.status();
    let node_stop = CancellationToken::new();
    let node_task = tokio::spawn(node.run(node_stop.clone()));
    tokio::time::timeout(Duration::from_secs(15), async {
        while !matches!(*status.borrow_and_update(), NodeStatus::Registered { .. }) {
            status.changed().await?;
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("the node did not register within 15 s"))??;
    // Every later loss of registration is an eviction (or a dropped connection). Only a
    // registered node can lose its registration: redial attempts while the path is dark are
    // not counted again.
    let evictions = Arc::new(AtomicU32::new(0));
    let watcher = {
        let evictions = evictions.clone();
        tokio::spawn(async move {
            let mut registered = true;
            while status.changed().await.is_ok() {
                match *status.borrow_and_update() {
                    NodeStatus::Registered { .. } => registered = true,
                    NodeStatus::Connecting { .. } if registered => {
                        registered = false;
                        evictions.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
    };

    let client = Client::connect_from(
        SocketAddr::new(CLIENT_IP, 0),
        addrs.quic,
        "localhost",
        ServerVerify::PinnedSha256(sha),
    )
    .await?;
    let params = PlayParams {
        bitrate_kbps: s.bitrate_kbps,
        ..PlayParams::hd("arena")
    };
    let session = client.play(API_KEY, params).await?;
    let (mut control, mut frames, _input) = session.split();
    let one_way_us = (s.up.delay_ms * 1000.0) as u64;
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(s.warmup);
    let end = measure_from + Duration::from_secs_f64(s.seconds);
    let mut blackout = s.blackout.map(|(at, d)| (measure_from + at, d));
    // When the path comes back; the first frame after it measures the resumption.
    let path_back = s.blackout.map(|(at, d)| measure_from + at + d);
    let mut latencies = Vec::new();
    let mut bytes = 0u64;
    let mut report = Report::default();
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if let Some((at, d)) = blackout {
            if now >= at {
                relay.blackout(d);
                blackout = None;
            }
        }
        tokio::select! {
            f = frames.next() => match f {
                Ok(Some(f)) => {
                    if let Some(back) = path_back {
                        let now = Instant::now();
                        // Fresh video: captured after the path returned (not a frame sent
                        // before the blackout and retransmitted).
                        let since_back_us = now.saturating_duration_since(back).as_micros() as u64;
                        let fresh = f.header.capture_ts_us >= unix_micros().saturating_sub(since_back_us);
                        if now >= back && fresh && report.resumed_after_path_ms.is_none() {
                            report.resumed_after_path_ms = Some((now - back).as_secs_f64() * 1000.0);
                        }
                    }
                    if Instant::now() >= measure_from {
                        let age = unix_micros().saturating_sub(f.header.capture_ts_us);
                        latencies.push(age.saturating_sub(one_way_us) as f64 / 1000.0);
                        bytes += f.payload.len() as u64;
                    }
                }
                Ok(None) => break,
                Err(_) => report.frame_errors += 1,
            },
            c = control.next() => match c {
                Ok(Some(ControlEvent::Paused(_))) => report.paused += 1,
                Ok(Some(ControlEvent::Ended(e))) => anyhow::bail!("the session ended: {e:?}"),
                Ok(Some(ControlEvent::Error(e))) => anyhow::bail!("the session failed: {e:?}"),
                // Video changes and rumble are not part of this measurement.
                Ok(Some(ControlEvent::Resumed))
                | Ok(Some(ControlEvent::VideoChanged(_)))
                | Ok(Some(ControlEvent::VideoRefused(_)))
                | Ok(Some(ControlEvent::Rumble(_))) => {}
                Ok(None) | Err(_) => anyhow::bail!("the session's control stream closed"),
            },
            _ = tokio::time::sleep_until(end.into()) => break,
        }
    }
    let measured = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(0.001);
    if let Some((_, stats)) = sessions.game_stats().into_iter().next() {
        report.node_skipped = stats.frames_skipped_congestion;
        report.node_reset = stats.frames_reset;
        report.node_bitrate_kbps = stats.bitrate_kbps;
        report.node_encoded = stats.frames_encoded;
    }
    let _ = control.close("done").await;
    latencies.sort_by(|a, b| a.total_cmp(b));
    report.frames = latencies.len() as u64;
    report.fps = latencies.len() as f64 / measured;
    report.latency_p50_ms = quantile(&latencies, 0.5);
    report.latency_p99_ms = quantile(&latencies, 0.99);
    report.latency_max_ms = latencies.last().copied().unwrap_or(0.0);
    report.received_kbps = bytes as f64 * 8.0 / 1000.0 / measured;
    report.node_evictions = evictions.load(Ordering::Relaxed);

    watcher.abort();
    drop(frames);
    client.close().await;
    node_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), node_task).await;
    relay.stop();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), gw_task).await;
    Ok(report)
}
