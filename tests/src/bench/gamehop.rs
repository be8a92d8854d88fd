//! `bench game-hop`: the frame latency and time to first frame a cross-gateway hop adds to a
//! native game session. Three federated gateways on loopback in this process, sharing one
//! SQLite store and one in-memory directory: B holds the only game node (a fake node that
//! sends frames of `--frame-bytes` at `--fps`), A-trunk relays games over the trunk
//! (`game_route = "trunk"`), A-redirect redirects them (`game_route = "redirect"`). Sessions
//! go in turn (a) to B directly, (b) to A-trunk (client -> A -> trunk -> B -> node), (c) to
//! A-redirect (the client follows the redirect to B). Per frame the latency is the capture
//! time in the frame header to its arrival at the client (one clock: same process); per
//! session the time to first frame is from `play` to the first frame's arrival.

use super::fleet::{live_record, poisoned, Fleet};
use super::stats::{num, Summary};
use nearpath_config::{CrossRoute, GatewayConfig, GeoOverride};
use nearpath_gateway::store::{GatewayRecord, KycStatus, NodeDirEntry, SqliteStore, Store};
use nearpath_gateway::{Gateway, Listeners};
use nearpath_protocol::tls::ServerVerify;
use nearpath_protocol::{Client, ControlEvent, PlayParams};
use nearpath_tests::fake_node::{FakeNode, GatewayTarget, Registration};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct GameHopArgs {
    /// Measured sessions per path (B directly, A over the trunk, A redirected), interleaved.
    #[arg(long, default_value_t = 20)]
    pub sessions: u32,
    /// Frames per session.
    #[arg(long, default_value_t = 60)]
    pub frames: u32,
    /// Payload bytes of each frame (10 kB: a 720p60 frame at about 5 Mbit/s).
    #[arg(long, default_value_t = 10_000)]
    pub frame_bytes: usize,
    /// Frames per second the node sends.
    #[arg(long, default_value_t = 60)]
    pub fps: u32,
    /// Unrecorded sessions per path first (connections, the trunk's dial).
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
}

const KEY: &str = "bench-game-hop-key";
const GAME: &str = "arena";
const NODE: &str = "bench-game-node-b";
const PATHS: [&str; 3] = ["direct (B)", "trunk (A -> B)", "redirect (A => B)"];

struct Started {
    id: String,
    quic: SocketAddr,
    http: SocketAddr,
    sha: [u8; 32],
    token: String,
}

impl GatewayTarget for Started {
    fn quic_addr(&self) -> SocketAddr {
        self.quic
    }
    fn cert_sha256(&self) -> [u8; 32] {
        self.sha
    }
    fn enrolment_token(&self) -> String {
        self.token.clone()
    }
}

async fn gateway(
    id: &str,
    route: CrossRoute,
    store: Arc<dyn Store>,
    fleet: Arc<Fleet>,
    token: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Started> {
    let mut config = GatewayConfig::default();
    // Probe sessions would take the node's slots mid-measurement.
    config.checker.enabled = false;
    config.admin.token = Some("bench-admin-token-0123456789".into());
    config.federation.gateway_id = Some(id.to_string());
    config.federation.node_directory_interval_ms = 50;
    config.federation.game_route = route;
    // Every loopback peer (node and players) in one place, so that the geofence admits the node
    // and places nothing differently per path.
    config.geo.overrides = vec![GeoOverride {
        cidr: "127.0.0.0/8".parse()?,
        country: "DE".into(),
        subdivision: None,
        lat: Some(52.52),
        lon: Some(13.40),
    }];
    // The fake node sends no heartbeats; the run is far shorter than this.
    config.nodes.heartbeat_ms = 60_000;
    // Every session of the run is a new start of the one key.
    config.game.default_session_starts_per_minute = 1_000_000;
    let cert = nearpath_gateway::tls::self_signed(&["localhost", "127.0.0.1"])?;
    let sha = cert.sha256;
    let gw = Gateway::with_parts(config, cert, store)?.with_fleet_source(fleet.clone());
    if let Some(f) = gw.shared().games.federation() {
        // Redirects read the same directory as the trunk.
        f.set_view(fleet);
    }
    let (addrs, _task) = gw.start(Listeners::ephemeral().await?, shutdown.clone())?;
    Ok(Started {
        id: id.to_string(),
        quic: addrs.quic,
        http: addrs.http,
        sha,
        token: token.to_string(),
    })
}

fn record(g: &Started, now_ms: u64) -> GatewayRecord {
    live_record(&g.id, g.quic, g.http, &g.sha, now_ms)
}

/// What one session measured.
struct Session {
    ttff_ms: f64,
    latency_ms: Vec<f64>,
    /// Frames that did not reach the player within a second (a relay dropped them as late).
    lost: u32,
}

/// How long a frame may take before it counts as lost.
const FRAME_WAIT: Duration = Duration::from_secs(1);

/// One session at `gw`: play, the node accepts, then `frames` frames paced at `fps`, each
/// awaited at the client; then the client closes and waits for `Ended`.
async fn session(
    gw: &Started,
    node: &FakeNode,
    a: &GameHopArgs,
    expect_redirect: bool,
) -> anyhow::Result<Session> {
    let client = Client::connect_from(
        "127.0.0.1:0".parse()?,
        gw.quic,
        "localhost",
        ServerVerify::PinnedSha256(gw.sha),
    )
    .await?;
    let params = PlayParams {
        game: GAME.into(),
        width: 1280,
        height: 720,
        fps: a.fps,
        bitrate_kbps: 5_000,
    };
    let t0 = Instant::now();
    let (s, g) = tokio::join!(client.play(KEY, params), node.accept_game());
    let mut s = s?;
    anyhow::ensure!(
        s.redirect().is_some() == expect_redirect,
        "session at {} redirected: {}",
        gw.id,
        s.redirect().is_some()
    );
    let payload = vec![0x5a_u8; a.frame_bytes.max(8)];
    let mut latency_ms = Vec::with_capacity(a.frames as usize);
    let mut ttff_ms = f64::NAN;
    let mut lost = 0u32;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(a.fps.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 0..u64::from(a.frames.max(1)) {
        tick.tick().await;
        node.send_video_frame(g.session_id, seq, &payload)
            .await
            .map_err(|e| anyhow::anyhow!("frame {seq}: {e}"))?;
        // This frame, skipping any earlier one that arrives after it was counted lost.
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        let f = loop {
            match tokio::time::timeout_at(deadline, s.next_frame()).await {
                Err(_) => break None,
                Ok(r) => {
                    let f =
                        r?.ok_or_else(|| anyhow::anyhow!("the session ended before frame {seq}"))?;
                    if f.header.seq == seq {
                        break Some(f);
                    }
                }
            }
        };
        let Some(f) = f else {
            lost += 1;
            continue;
        };
        let now_us = nearpath_tests::fake_node::unix_micros_now();
        if seq == 0 {
            ttff_ms = t0.elapsed().as_secs_f64() * 1e3;
        }
        latency_ms.push(now_us.saturating_sub(f.header.capture_ts_us) as f64 / 1e3);
    }
    s.close("done").await?;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.next_control().await {
                Ok(Some(ControlEvent::Ended(_))) | Ok(None) | Err(_) => return,
                Ok(Some(_)) => continue,
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no Ended within 10 s of Close"))?;
    drop(g);
    Ok(Session {
        ttff_ms,
        latency_ms,
        lost,
    })
}

pub async fn run(a: GameHopArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("fleet.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path)?);
    let operator = store.create_operator("bench-operator", KycStatus::Verified)?;
    let (_, token) = store.create_enrolment_token(&operator.id)?;
    store.insert_api_key_secret(KEY, "bench", 1_000_000, 1_000_000_000)?;
    let fleet = Arc::new(Fleet::default());
    let shutdown = CancellationToken::new();
    let b = gateway(
        "gw-b",
        CrossRoute::Trunk,
        store.clone(),
        fleet.clone(),
        &token,
        &shutdown,
    )
    .await?;
    let a_trunk = gateway(
        "gw-a-trunk",
        CrossRoute::Trunk,
        store.clone(),
        fleet.clone(),
        &token,
        &shutdown,
    )
    .await?;
    let a_redirect = gateway(
        "gw-a-redirect",
        CrossRoute::Redirect,
        store.clone(),
        fleet.clone(),
        &token,
        &shutdown,
    )
    .await?;
    let now_ms = nearpath_gateway::clock::system_unix_ms();
    *fleet.gateways.lock().map_err(poisoned)? = vec![
        record(&b, now_ms),
        record(&a_trunk, now_ms),
        record(&a_redirect, now_ms),
    ];
    let reg = Registration::new(NODE, &token)
        .gpu("rtx4090", "rtx4090", 24_000)
        .games(&[GAME], 4);
    let node = FakeNode::register(&b, "127.0.0.1".parse()?, reg.message()).await;
    node.registered()
        .map_err(|e| anyhow::anyhow!("the node did not register with B: {e}"))?;
    *fleet.nodes.lock().map_err(poisoned)? = vec![NodeDirEntry {
        node_id: NODE.into(),
        operator_id: operator.id.clone(),
        gateway_id: b.id.clone(),
        country: Some("DE".into()),
        lat: Some(52.52),
        lon: Some(13.40),
        gpu_classes: vec!["rtx4090".into()],
        models: vec![],
        games: vec![GAME.into()],
        inference_slots: 0,
        inference_free: 0,
        game_slots: 4,
        game_free: 4,
        accepting: true,
        verification: "unverified".into(),
        updated_at_ms: now_ms,
        encoders: Vec::new(),
        model_caps: Vec::new(),
        subdivision: None,
    }];
    // The A gateways read the directory every 50 ms: wait (bounded) until both place a session.
    let targets = [&b, &a_trunk, &a_redirect];
    let deadline = Instant::now() + Duration::from_secs(10);
    for (p, gw) in targets.iter().enumerate().skip(1) {
        let warm = GameHopArgs {
            frames: 1,
            ..a.clone()
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(5), session(gw, &node, &warm, p == 2))
                .await
            {
                Ok(Ok(_)) => break,
                other => {
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "{} never placed a session on B's node: {why}",
                        gw.id
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    let mut latency: [Vec<f64>; 3] = Default::default();
    let mut ttff: [Vec<f64>; 3] = Default::default();
    let mut failures = 0u32;
    let mut lost = [0u32; 3];
    for i in 0..3 * (a.warmup + a.sessions) {
        let p = (i % 3) as usize;
        match session(targets[p], &node, &a, p == 2).await {
            Ok(s) if i >= 3 * a.warmup => {
                latency[p].extend(s.latency_ms);
                ttff[p].push(s.ttff_ms);
                lost[p] += s.lost;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("session on path {} failed: {e}", PATHS[p]);
                failures += 1;
            }
        }
    }
    shutdown.cancel();

    let lat: Vec<Summary> = latency.iter_mut().map(Summary::of).collect();
    let first: Vec<Summary> = ttff.iter_mut().map(Summary::of).collect();
    println!(
        "game sessions: {} per path, {} frames of {} bytes at {} fps each, interleaved",
        a.sessions, a.frames, a.frame_bytes, a.fps
    );
    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "path", "lat p5", "lat p50", "lat p95", "lat max", "ttff p50", "ttff p95"
    );
    for (p, name) in PATHS.iter().enumerate() {
        println!(
            "{:<20} {:>9.3} {:>9.3} {:>9.3} {:>9.3} | {:>9.2} {:>9.2}",
            name, lat[p].p5, lat[p].p50, lat[p].p95, lat[p].max, first[p].p50, first[p].p95
        );
    }
    println!(
        "frame latency added by the trunk: p50 {:+.3} ms, p95 {:+.3} ms; by a redirect: p50 {:+.3} ms; \
         time to first frame added by the redirect: p50 {:+.2} ms, by the trunk: p50 {:+.2} ms; \
         frames lost (direct, trunk, redirect) {lost:?}; failed sessions {failures}",
        lat[1].p50 - lat[0].p50,
        lat[1].p95 - lat[0].p95,
        lat[2].p50 - lat[0].p50,
        first[2].p50 - first[0].p50,
        first[1].p50 - first[0].p50,
    );
    println!(
        "{}",
        json!({
            "bench": "game-hop",
            "sessions_per_path": a.sessions,
            "frames_per_session": a.frames,
            "frame_bytes": a.frame_bytes,
            "fps": a.fps,
            "direct": {"frame_latency_ms": lat[0].to_json(), "ttff_ms": first[0].to_json(), "frames_lost": lost[0]},
            "trunk": {"frame_latency_ms": lat[1].to_json(), "ttff_ms": first[1].to_json(), "frames_lost": lost[1]},
            "redirect": {"frame_latency_ms": lat[2].to_json(), "ttff_ms": first[2].to_json(), "frames_lost": lost[2]},
            "trunk_added_latency_p50_ms": num(lat[1].p50 - lat[0].p50),
            "trunk_added_latency_p95_ms": num(lat[1].p95 - lat[0].p95),
            "redirect_added_latency_p50_ms": num(lat[2].p50 - lat[0].p50),
            "redirect_added_ttff_p50_ms": num(first[2].p50 - first[0].p50),
            "trunk_added_ttff_p50_ms": num(first[1].p50 - first[0].p50),
            "failures": failures,
        })
    );
    Ok(())
}
