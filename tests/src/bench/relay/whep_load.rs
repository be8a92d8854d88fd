//! `bench webrtc-load`: N browser-like WebRTC players on one gateway, each fed pre-encoded
//! frames by a fake node, with the same N native QUIC players in the same run as the baseline.
//!
//! A player is a webrtc-rs peer connection that offers what `/play` offers (a recvonly H.264
//! video section, a recvonly Opus section, the ordered `input` data channel; abs-send-time and
//! playout-delay header extensions; NACK and receiver reports like a browser), POSTs it to
//! `/v1/games/{title}/whep` with the API key and applies the answer. It never decodes: it counts
//! RTP packets, bytes and frames (the marker bit), reads the gateway's `frame` messages on the
//! data channel (which map an RTP timestamp to the frame's `seq` and capture time) and pings
//! once a second as the page does, so the session is not ended as idle. The gateway's CPU is
//! read from `/proc` over the measured window; the generator (players, fake nodes) runs in this
//! process on the worker CPUs and its CPU is reported next to it.

use super::*;
use rtc::interceptor::{ReceiverReportBuilder, Registry};
use rtc::peer_connection::configuration::interceptor_registry::configure_nack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use std::sync::Mutex;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
};

const ABS_SEND_TIME_URI: &str = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time";
const PLAYOUT_DELAY_URI: &str = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay";

#[derive(Debug, Clone, clap::Args)]
pub struct WebrtcLoadArgs {
    /// Session counts (comma-separated); each is measured over WebRTC, WebTransport and native QUIC.
    #[arg(long, default_value = "1,4,8")]
    pub sessions: String,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Unrecorded seconds first (DTLS, the first IDR, allocator).
    #[arg(long, default_value_t = 4.0)]
    pub warmup_seconds: f64,
    /// Runs per session count and transport (median and spread are reported across them).
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Skip the native QUIC baseline.
    #[arg(long)]
    pub no_native: bool,
    /// Skip the WebTransport sessions (the same relay-capacity players, each reaching the
    /// gateway as a browser's WebTransport session does).
    #[arg(long)]
    pub no_webtransport: bool,
    /// Also run the WebRTC sessions on the gateway of this other `bench` binary (e.g. a
    /// release build of the main branch), interleaved with this build's: transport
    /// `webrtc-base` in the report, so before and after come from one run.
    #[arg(long)]
    pub baseline_gateway_exe: Option<std::path::PathBuf>,
    /// Game sessions each fake node serves (one QUIC connection per node).
    #[arg(long, default_value_t = 4)]
    pub sessions_per_node: u32,
    /// Nice value for the gateway and this process (negative needs root); 0 leaves it alone.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub nice: i32,
    #[command(flatten)]
    pub shape: StreamShape,
    #[command(flatten)]
    pub placement: Placement,
}

/// What one WebRTC player saw.
#[derive(Debug, Default)]
struct PlayerLog {
    /// Video RTP packets: count, payload bytes.
    packets: u64,
    bytes: u64,
    /// Video packets missing by sequence number (extended), at the end of the run.
    highest_seq: Option<u64>,
    lowest_seq: Option<u64>,
    last_seq16: Option<u16>,
    /// Marker packets (a frame's last packet): RTP timestamp, receive time (Unix µs).
    markers: Vec<(u32, u64)>,
    audio_packets: u64,
    /// The gateway's `frame` messages: seq, RTP timestamp, capture time (Unix µs), keyframe.
    frame_msgs: Vec<(u64, u32, u64, bool)>,
    pongs: u64,
    connected: bool,
    failed: bool,
    dc_open: bool,
}

impl PlayerLog {
    fn video_packet(&mut self, seq16: u16, marker: bool, ts: u32, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
        // Extend the 16-bit sequence number (packets on loopback arrive nearly in order).
        let ext = match (self.last_seq16, self.highest_seq) {
            (Some(last), Some(high)) => {
                let delta = seq16.wrapping_sub(last) as i16 as i64;
                (high as i64 + delta).max(0) as u64
            }
            _ => u64::from(seq16) + (1 << 20),
        };
        if self.highest_seq.is_none_or(|h| ext > h) {
            self.highest_seq = Some(ext);
            self.last_seq16 = Some(seq16);
        }
        if self.lowest_seq.is_none_or(|l| ext < l) {
            self.lowest_seq = Some(ext);
        }
        if marker {
            self.markers.push((ts, unix_micros()));
        }
    }

    fn lost_packets(&self) -> u64 {
        match (self.lowest_seq, self.highest_seq) {
            (Some(l), Some(h)) => (h - l + 1).saturating_sub(self.packets),
            _ => 0,
        }
    }

    /// Frames as [`Window`] counts them: a frame is delivered when its last packet arrived;
    /// its latency is that arrival minus its capture time.
    fn recv_log(&self) -> RecvLog {
        let arrivals: HashMap<u32, u64> = self.markers.iter().copied().collect();
        let mut frames: Vec<Got> = self
            .frame_msgs
            .iter()
            .filter_map(|&(seq, ts, cap, key)| {
                let at = *arrivals.get(&ts)?;
                Some(Got {
                    seq,
                    latency_us: at.saturating_sub(cap) as f64,
                    keyframe: key,
                    at_us: at,
                })
            })
            .collect();
        frames.sort_by_key(|g| g.seq);
        RecvLog {
            frames,
            ..Default::default()
        }
    }
}

/// Deviation of each frame's interarrival time from its capture interval (consecutive seqs in
/// `from..to` only), microseconds: the jitter a player's buffer must absorb.
pub(super) fn interarrival_jitter(log: &RecvLog, from: u64, to: u64) -> Vec<f64> {
    let f: Vec<&Got> = log
        .frames
        .iter()
        .filter(|g| g.seq >= from && g.seq < to)
        .collect();
    f.windows(2)
        .filter(|w| w[1].seq == w[0].seq + 1)
        .map(|w| {
            let arrival = w[1].at_us as f64 - w[0].at_us as f64;
            let capture =
                (w[1].at_us as f64 - w[1].latency_us) - (w[0].at_us as f64 - w[0].latency_us);
            (arrival - capture).abs()
        })
        .collect()
}

struct ClientHandler {
    log: Arc<Mutex<PlayerLog>>,
    gathered: tokio::sync::watch::Sender<bool>,
    connected: tokio::sync::watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ClientHandler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let mut l = self.log.lock().expect("player log");
        match state {
            RTCPeerConnectionState::Connected => {
                l.connected = true;
                let _ = self.connected.send(true);
            }
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => l.failed = true,
            _ => {}
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let log = self.log.clone();
        tokio::spawn(async move {
            let video = track.kind().await == RtpCodecKind::Video;
            while let Some(ev) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(p) = ev {
                    let mut l = log.lock().expect("player log");
                    if video {
                        l.video_packet(
                            p.header.sequence_number,
                            p.header.marker,
                            p.header.timestamp,
                            p.payload.len(),
                        );
                    } else {
                        l.audio_packets += 1;
                    }
                }
            }
        });
    }
}

/// A WebRTC player connected to the gateway.
struct WhepPlayer {
    session_id: u64,
    pc: Arc<dyn PeerConnection>,
    log: Arc<Mutex<PlayerLog>>,
    connected: tokio::sync::watch::Receiver<bool>,
    dc_open: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
}

/// The media engine of a Chromium-like receiver: H.264 Constrained Baseline (packetization
/// mode 1, what the gateway relays), Opus, and the header extensions `/play`'s offers carry.
fn client_media() -> anyhow::Result<MediaEngine> {
    let mut m = MediaEngine::default();
    m.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: "video/H264".into(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line:
                    "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
                rtcp_feedback: vec![],
            },
            payload_type: 102,
        },
        RtpCodecKind::Video,
    )?;
    m.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: "audio/opus".into(),
                clock_rate: 48_000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
                rtcp_feedback: vec![],
            },
            payload_type: 111,
        },
        RtpCodecKind::Audio,
    )?;
    for uri in [ABS_SEND_TIME_URI, PLAYOUT_DELAY_URI] {
        m.register_header_extension(
            RTCRtpHeaderExtensionCapability { uri: uri.into() },
            RtpCodecKind::Video,
            None,
        )?;
    }
    Ok(m)
}

impl WhepPlayer {
    async fn connect(http: SocketAddr, api_key: &str, shape: &StreamShape) -> anyhow::Result<Self> {
        let mut media = client_media()?;
        let registry = configure_nack(Registry::new(), &mut media).with(
            rtc::interceptor::Slot::ReceiverReport,
            ReceiverReportBuilder::new().build(),
        );
        let log = Arc::new(Mutex::new(PlayerLog::default()));
        let (gathered_tx, mut gathered_rx) = tokio::sync::watch::channel(false);
        let (connected_tx, connected) = tokio::sync::watch::channel(false);
        let pc: Arc<dyn PeerConnection> = Arc::new(
            PeerConnectionBuilder::new()
                .with_media_engine(media)
                .with_interceptor_registry(registry)
                .with_handler(Arc::new(ClientHandler {
                    log: log.clone(),
                    gathered: gathered_tx,
                    connected: connected_tx,
                }))
                .with_udp_addrs(vec!["127.0.0.1:0".parse::<SocketAddr>()?])
                .build()
                .await?,
        );
        for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
            pc.add_transceiver_from_kind(
                kind,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Recvonly,
                    ..Default::default()
                }),
            )
            .await?;
        }
        let dc = pc.create_data_channel(INPUT_LABEL, None).await?;
        let (open_tx, dc_open) = tokio::sync::watch::channel(false);
        let stop = CancellationToken::new();
        tokio::spawn(read_channel(dc, log.clone(), open_tx, stop.clone()));
        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer).await?;
        tokio::time::timeout(Duration::from_secs(5), gathered_rx.wait_for(|d| *d))
            .await
            .map_err(|_| anyhow!("ICE gathering did not complete within 5 s"))??;
        let offer = pc
            .local_description()
            .await
            .ok_or_else(|| anyhow!("no local description"))?
            .sdp;
        let (session_id, answer) = post_offer(http, api_key, shape, offer).await?;
        pc.set_remote_description(RTCSessionDescription::answer(answer)?)
            .await?;
        Ok(WhepPlayer {
            session_id,
            pc,
            log,
            connected,
            dc_open,
            stop,
        })
    }

    /// Waits until DTLS is up and the data channel is open.
    async fn ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let id = self.session_id;
        tokio::time::timeout(within, async {
            self.connected.wait_for(|c| *c).await?;
            self.dc_open.wait_for(|o| *o).await?;
            Ok::<_, anyhow::Error>(())
        })
        .await
        .map_err(|_| anyhow!("WebRTC session {id} not connected within {within:?}"))?
    }

    async fn close(self) {
        self.stop.cancel();
        let _ = self.pc.close().await;
    }
}

/// The label of `/play`'s data channel.
const INPUT_LABEL: &str = "input";

/// Reads the gateway's messages and pings once a second, as `/play` does, until `stop`.
async fn read_channel(
    dc: Arc<dyn DataChannel>,
    log: Arc<Mutex<PlayerLog>>,
    open: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    let mut id = 0u64;
    let mut is_open = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ping.tick(), if is_open => {
                id += 1;
                let msg = json!({"t": "ping", "id": id, "ts": unix_micros() as f64 / 1000.0});
                let _ = dc.send_text(&msg.to_string()).await;
            }
            ev = dc.poll() => match ev {
                None | Some(DataChannelEvent::OnClose) => return,
                Some(DataChannelEvent::OnOpen) => {
                    is_open = true;
                    log.lock().expect("player log").dc_open = true;
                    let _ = open.send(true);
                }
                Some(DataChannelEvent::OnMessage(m)) => {
                    let Ok(v) = serde_json::from_slice::<Value>(&m.data) else { continue };
                    let mut l = log.lock().expect("player log");
                    match v["t"].as_str() {
                        Some("frame") => {
                            let (Some(seq), Some(ts), Some(cap)) = (
                                v["seq"].as_u64(),
                                v["rtp_ts"].as_u64(),
                                v["capture_ts_us"].as_u64(),
                            ) else {
                                continue;
                            };
                            let key = v["key"].as_bool().unwrap_or(false);
                            l.frame_msgs.push((seq, ts as u32, cap, key));
                        }
                        Some("pong") => l.pongs += 1,
                        _ => {}
                    }
                }
                Some(_) => {}
            }
        }
    }
}

/// `POST /v1/games/{GAME}/whep`: returns the session id (from `Location`) and the answer.
async fn post_offer(
    http: SocketAddr,
    api_key: &str,
    shape: &StreamShape,
    offer: String,
) -> anyhow::Result<(u64, String)> {
    let mut conn = Conn::h1(http).await?;
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{http}/v1/games/{GAME}/whep?width=1280&height=720&fps={}&bitrate_kbps={}",
            shape.fps, shape.kbps
        ))
        .header("authorization", format!("Bearer {api_key}"))
        .header("content-type", "application/sdp")
        .body(Full::new(Bytes::from(offer)))?;
    let resp = conn.send(req).await?;
    let status = resp.status();
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.as_u16() != 201 {
        bail!("WHEP POST: HTTP {status}: {body}");
    }
    let id = location
        .as_deref()
        .and_then(|l| l.rsplit('/').next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("WHEP answer without a session Location: {location:?}"))?;
    Ok((id, body))
}

/// `DELETE /v1/sessions/{id}`.
async fn delete_session(http: SocketAddr, api_key: &str, id: u64) -> anyhow::Result<()> {
    let mut conn = Conn::h1(http).await?;
    let req = hyper::Request::builder()
        .method("DELETE")
        .uri(format!("http://{http}/v1/sessions/{id}"))
        .header("authorization", format!("Bearer {api_key}"))
        .body(Full::new(Bytes::new()))?;
    let status = conn.send(req).await?.status();
    if !status.is_success() {
        bail!("DELETE session {id}: HTTP {status}");
    }
    Ok(())
}

/// One measured run of `n` sessions over one transport.
#[derive(Debug, Clone)]
struct LoadRun {
    n: u32,
    transport: &'static str,
    window: Window,
    /// Percent of one core over the measured window.
    gw_cpu: f64,
    gen_cpu: f64,
    gw_dropped: f64,
    jitter: Summary,
    /// Video RTP packets lost (WebRTC only).
    rtp_lost: u64,
    rtp_packets: u64,
    rtp_bytes: u64,
    pongs: u64,
}

impl LoadRun {
    fn per_session(&self) -> f64 {
        self.gw_cpu / self.n.max(1) as f64
    }

    fn to_json(&self) -> Value {
        json!({
            "sessions": self.n, "transport": self.transport, "stats": self.window.to_json(),
            "gateway_cpu_percent": num(self.gw_cpu), "gateway_cpu_percent_per_session": num(self.per_session()),
            "generator_cpu_percent": num(self.gen_cpu), "gateway_frames_dropped": num(self.gw_dropped),
            "interarrival_jitter_us": self.jitter.to_json(), "rtp_packets": self.rtp_packets,
            "rtp_bytes": self.rtp_bytes, "rtp_lost": self.rtp_lost, "pongs": self.pongs,
        })
    }
}

async fn webrtc_run(
    a: &WebrtcLoadArgs,
    plan: &Arc<FramePlan>,
    n: u32,
    baseline: bool,
) -> anyhow::Result<LoadRun> {
    let mut placement = a.placement.clone();
    if baseline {
        placement.gateway_exe = a.baseline_gateway_exe.clone();
    }
    let g = start_gateway(&placement, Liveness::default(), 65_536)?;
    renice_gateway(&g, a.nice)?;
    // For attaching a profiler (`perf record -g -p <pid>`) while the run is on.
    eprintln!(
        "webrtc-load: gateway pid {} ({} sessions{})",
        g.child.pid,
        n,
        if baseline { ", baseline gateway" } else { "" }
    );
    let r = webrtc_inner(a, plan, n, &g).await;
    stop_all(vec![g.child]).await;
    let mut r = r?;
    if baseline {
        r.transport = "webrtc-base";
    }
    Ok(r)
}

async fn webrtc_inner(
    a: &WebrtcLoadArgs,
    plan: &Arc<FramePlan>,
    n: u32,
    g: &GatewayProc,
) -> anyhow::Result<LoadRun> {
    let gw = Gw::of(g)?;
    let stop = CancellationToken::new();
    let endpoint = node_endpoint()?;
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let per_node = a.sessions_per_node.max(1);
    let mut node_side: Keep = Vec::new();
    for i in 0..n.div_ceil(per_node) {
        let conn = connect_node(
            &endpoint,
            &gw,
            &format!("bench-node-{i}"),
            per_node + 2,
            opened_tx.clone(),
            stop.clone(),
        )
        .await?;
        node_side.push(Box::new(conn));
    }
    node_side.push(Box::new(endpoint));
    let mut pending = HashMap::new();
    let mut legs = Vec::new();
    let mut players = Vec::new();
    for _ in 0..n {
        let p = WhepPlayer::connect(g.http, &gw.api_key, &a.shape).await?;
        let node = opened_session(&mut opened_rx, &mut pending, p.session_id).await?;
        legs.push(Leg {
            conn: node.conn.clone(),
            session_id: p.session_id,
        });
        node_side.push(Box::new(node));
        players.push(p);
    }
    for p in &mut players {
        p.ready(Duration::from_secs(15)).await?;
    }
    let fps = plan.fps() as f64;
    let measured = ((a.seconds * fps).round() as u64).max(1);
    let warm = ((a.warmup_seconds.max(0.0) * fps).ceil() as u64).max(1);
    let interval = plan.interval();
    let gop = plan.gop() as u64;
    let start = Instant::now() + Duration::from_millis(200);
    let mut senders = Vec::new();
    for (i, leg) in legs.iter().cloned().enumerate() {
        // Each session its own slot in the frame interval and its own place in the group of
        // pictures, so frames and IDRs do not all land at once.
        let share = i as f64 / n as f64;
        senders.push(tokio::spawn(pace(
            plan.clone(),
            vec![leg],
            start + interval.mul_f64(share),
            warm + measured,
            idr_phase(i as u64, n as u64, gop, 0),
            (1280, 720),
        )));
    }
    let warm_end = start + plan.due(warm) + interval;
    tokio::time::sleep_until(warm_end).await;
    let gw_cpu = CpuMeter::start(gw.pid)?;
    let gen_cpu = CpuMeter::start(std::process::id())?;
    tokio::time::sleep_until(warm_end + plan.due(measured)).await;
    let gw_cpu = gw_cpu.percent()?;
    let gen_cpu = gen_cpu.percent()?;
    let mut logs = Vec::new();
    for s in senders {
        let l = s.await?;
        if let Some(e) = l.first_error {
            bail!("sending frames to the gateway: {e}");
        }
        logs.push(l.skipped);
    }
    // Wait (bounded) for the last frame of every player, then for nothing more.
    let last = warm + measured - 1;
    let until = Instant::now() + QUIET;
    while Instant::now() < until {
        let done = players.iter().all(|p| {
            let l = p.log.lock().expect("player log");
            l.frame_msgs.last().is_some_and(|f| f.0 >= last) || l.failed
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let page = gateway_metrics(gw.admin).await?;
    let gw_dropped = metric_sum(&page, "nearpath_game_frames_dropped_total");
    let mut recv = Vec::new();
    let (mut rtp_lost, mut rtp_packets, mut rtp_bytes, mut pongs) = (0, 0, 0, 0);
    let mut jitter = Vec::new();
    for (p, skipped) in players.iter().zip(logs) {
        let l = p.log.lock().expect("player log");
        let mut r = l.recv_log();
        r.not_sent = skipped.into_iter().collect();
        jitter.extend(interarrival_jitter(&r, warm, warm + measured));
        rtp_lost += l.lost_packets();
        rtp_packets += l.packets;
        rtp_bytes += l.bytes;
        pongs += l.pongs;
        recv.push(r);
    }
    for p in players {
        // As the page does when it stops: the session ends at once rather than by silence.
        let _ = delete_session(g.http, &gw.api_key, p.session_id).await;
        p.close().await;
    }
    sessions_ended(gw.admin).await;
    stop.cancel();
    drop(node_side);
    Ok(LoadRun {
        n,
        transport: "webrtc",
        window: Window::of(recv.iter().map(|r| (r, warm, warm + measured)), 1e6 / fps),
        gw_cpu,
        gen_cpu,
        gw_dropped,
        jitter: Summary::of(&mut jitter),
        rtp_lost,
        rtp_packets,
        rtp_bytes,
        pongs,
    })
}

/// The native QUIC baseline (or, with `PlayerTransport::Webtransport`, browser-shaped
/// WebTransport players): the relay-capacity run at `n` through the gateway.
async fn native_run(
    a: &WebrtcLoadArgs,
    plan: &Arc<FramePlan>,
    n: u32,
    transport: PlayerTransport,
) -> anyhow::Result<LoadRun> {
    let cap = RelayCapacityArgs {
        sessions: n,
        steps: String::new(),
        only: true,
        seconds: a.seconds,
        warmup_seconds: a.warmup_seconds,
        ramp_seconds: 0.0,
        repeats: 1,
        bisect: 0,
        keep_going: false,
        sessions_per_node: a.sessions_per_node,
        no_direct: true,
        direct_only: false,
        dump: None,
        nice: a.nice,
        transport,
        shape: a.shape.clone(),
        placement: a.placement.clone(),
    };
    let r = capacity_run(&cap, plan, n, Mode::Gateway).await?;
    if let Some(e) = &r.first_error {
        bail!("{} run at {n}: {e}", transport.as_str());
    }
    Ok(LoadRun {
        n,
        transport: transport.as_str(),
        window: r.window.clone(),
        gw_cpu: r.gw_cpu,
        gen_cpu: r.gen_cpu,
        gw_dropped: r.gw_dropped,
        jitter: Summary::of(&mut r.jitter_us.clone()),
        rtp_lost: 0,
        rtp_packets: 0,
        rtp_bytes: 0,
        pongs: 0,
    })
}

pub async fn run_webrtc_load(a: WebrtcLoadArgs) -> anyhow::Result<()> {
    let plan = Arc::new(FramePlan::new(&a.shape, 1)?);
    let priority = Priority::apply(a.nice)?;
    let steps: Vec<u32> = a
        .sessions
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|e| anyhow!("--sessions {s:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if steps.is_empty() || steps.contains(&0) {
        bail!("--sessions must name session counts above 0");
    }
    println!(
        "webrtc-load: {}; session counts {:?}, {} run(s) each over WebRTC{}, {} s measured after {} s warm-up; {}",
        describe_plan(&plan),
        steps,
        a.repeat.max(1),
        match (a.no_webtransport, a.no_native) {
            (false, false) => ", WebTransport and native QUIC",
            (false, true) => " and WebTransport",
            (true, false) => " and native QUIC",
            (true, true) => "",
        },
        a.seconds,
        a.warmup_seconds,
        describe_placement(&a.placement, &priority)
    );
    println!(
        "  gateway CPU is % of one core over the measured window; generator CPU is this process (players and fake nodes), \
         on the worker CPUs; late = latency above one frame interval ({:.1} ms); jitter = |interarrival - capture interval|",
        1e3 / plan.fps() as f64
    );
    let mut table = Table::new(&[
        "sessions",
        "transport",
        "gw cpu %",
        "gw %/session",
        "gen cpu %",
        "frames recv/exp",
        "late",
        "lost",
        "lat p50 ms",
        "lat p99 ms",
        "jitter p99 ms",
        "rtp lost",
    ]);
    let mut out = Vec::new();
    for &n in &steps {
        let mut by: Vec<(&'static str, Vec<LoadRun>)> = Vec::new();
        if a.baseline_gateway_exe.is_some() {
            by.push(("webrtc-base", Vec::new()));
        }
        by.push(("webrtc", Vec::new()));
        if !a.no_webtransport {
            by.push(("webtransport", Vec::new()));
        }
        if !a.no_native {
            by.push(("quic", Vec::new()));
        }
        for _ in 0..a.repeat.max(1) {
            // Interleaved, so that a change on the machine touches both transports alike.
            for (t, runs) in by.iter_mut() {
                let r = match *t {
                    "webrtc" => webrtc_run(&a, &plan, n, false).await?,
                    "webrtc-base" => webrtc_run(&a, &plan, n, true).await?,
                    "webtransport" => {
                        native_run(&a, &plan, n, PlayerTransport::Webtransport).await?
                    }
                    _ => native_run(&a, &plan, n, PlayerTransport::Quic).await?,
                };
                runs.push(r);
            }
        }
        let mut entry = serde_json::Map::new();
        entry.insert("sessions".into(), json!(n));
        let mut per: HashMap<&str, Repeated> = HashMap::new();
        for (t, runs) in &by {
            let gw = Repeated::new(runs.iter().map(|r| r.gw_cpu).collect());
            let ps = Repeated::new(runs.iter().map(LoadRun::per_session).collect());
            let gen = Repeated::new(runs.iter().map(|r| r.gen_cpu).collect());
            let recv: u64 = runs.iter().map(|r| r.window.received).sum();
            let exp: u64 = runs.iter().map(|r| r.window.expected).sum();
            let late: u64 = runs.iter().map(|r| r.window.late).sum();
            let lost: u64 = runs.iter().map(|r| r.window.missing()).sum();
            let p50 = Repeated::new(runs.iter().map(|r| r.window.lat.p50 / 1e3).collect());
            let p99 = Repeated::new(runs.iter().map(|r| r.window.lat.p99 / 1e3).collect());
            let jit = Repeated::new(runs.iter().map(|r| r.jitter.p99 / 1e3).collect());
            table.row(vec![
                n.to_string(),
                t.to_string(),
                gw.show(1),
                ps.show(2),
                gen.show(1),
                format!("{recv}/{exp}"),
                late.to_string(),
                lost.to_string(),
                p50.show(2),
                p99.show(2),
                jit.show(2),
                if t.starts_with("webrtc") {
                    runs.iter().map(|r| r.rtp_lost).sum::<u64>().to_string()
                } else {
                    "-".into()
                },
            ]);
            entry.insert(
                t.to_string(),
                json!({
                    "gateway_cpu_percent": gw.to_json(), "gateway_cpu_percent_per_session": ps.to_json(),
                    "generator_cpu_percent": gen.to_json(), "frames_received": recv, "frames_expected": exp,
                    "late": late, "missing": lost, "latency_p50_ms": p50.to_json(), "latency_p99_ms": p99.to_json(),
                    "interarrival_jitter_p99_ms": jit.to_json(),
                    "runs": runs.iter().map(LoadRun::to_json).collect::<Vec<_>>(),
                }),
            );
            per.insert(t, ps);
        }
        if let (Some(w), Some(q)) = (per.get("webrtc"), per.get("quic")) {
            let ratio = w.median() / q.median().max(1e-9);
            entry.insert("ratio_webrtc_over_quic_per_session".into(), num(ratio));
        }
        if let (Some(w), Some(q)) = (per.get("webtransport"), per.get("quic")) {
            let ratio = w.median() / q.median().max(1e-9);
            entry.insert(
                "ratio_webtransport_over_quic_per_session".into(),
                num(ratio),
            );
        }
        if let (Some(b), Some(q)) = (per.get("webrtc-base"), per.get("quic")) {
            let ratio = b.median() / q.median().max(1e-9);
            entry.insert("ratio_webrtc_base_over_quic_per_session".into(), num(ratio));
        }
        if let (Some(w), Some(b)) = (per.get("webrtc"), per.get("webrtc-base")) {
            let ratio = w.median() / b.median().max(1e-9);
            entry.insert(
                "ratio_webrtc_over_webrtc_base_per_session".into(),
                num(ratio),
            );
        }
        out.push(Value::Object(entry));
    }
    table.print();
    for e in &out {
        for (key, what) in [
            ("ratio_webrtc_over_quic_per_session", "WebRTC / native QUIC"),
            (
                "ratio_webtransport_over_quic_per_session",
                "WebTransport / native QUIC",
            ),
            (
                "ratio_webrtc_base_over_quic_per_session",
                "WebRTC (baseline gateway) / native QUIC",
            ),
            (
                "ratio_webrtc_over_webrtc_base_per_session",
                "WebRTC this build / baseline",
            ),
        ] {
            if let Some(r) = e[key].as_f64() {
                println!(
                    "  {} sessions: {what}, gateway CPU per session: {r:.2}x",
                    e["sessions"]
                );
            }
        }
    }
    println!(
        "{}",
        json!({"bench": "webrtc-load", "placement": a.placement.describe(), "fps": plan.fps(),
               "kbps": num(plan.kbps()), "results": out})
    );
    Ok(())
}
