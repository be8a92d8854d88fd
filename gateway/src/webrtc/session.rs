//! The session task: the async driver of one browser session. It moves frames into RTP
//! packets, peer connection events, RTCP feedback and the game's notices into the session's
//! [`SessionControl`], and executes what that decides; the rules live there.

use super::bundle::FrameBundle;
use super::datachannel::{flush, frame_message, read_input, tell};
use super::negotiate::{Negotiated, PcEvent};
use super::policy::{Action, Feedback, FrameVerdict, Limits, PcState, SessionControl};
use super::{Counters, SessionHandle, Sessions, ABS_SEND_TIME_URI, INPUT_LABEL, PLAYOUT_DELAY_URI};
use crate::clock::SharedClock;
use crate::game::{self, ClientEvent, GameService};
use bytes::Bytes;
use nearpath_protocol::message::GameParams;
use nearpath_protocol::message::VideoCodec;
use nearpath_protocol::FrameHeader;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp::codec::av1::Av1Payloader;
use rtc::rtp::codec::h265::HevcPayloader;
use rtc::rtp::packetizer::{new_packetizer, Packetizer};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

/// RTP packet size, leaving room for SRTP and IP/UDP headers under common path MTUs.
const RTP_MTU: usize = 1200;
/// The RTP clock rate of video.
const VIDEO_CLOCK_HZ: u64 = 90_000;
/// The RTP clock rate of Opus.
const AUDIO_CLOCK_HZ: u64 = 48_000;

/// The RTP timestamp of media captured at `capture_ts_us` (Unix microseconds, the node's
/// capture clock) at `clock_hz`, from a random origin. Both tracks take their timestamps from
/// the same capture clock, so the RTP time of a picture and of the sound made with it map to
/// the same instant, and the browser lines them up by the sender reports.
fn rtp_ts(base: u32, capture_ts_us: u64, clock_hz: u64) -> u32 {
    // u128: a Unix time in microseconds times 90 000 overflows u64.
    let ticks = u128::from(capture_ts_us) * u128::from(clock_hz) / 1_000_000;
    base.wrapping_add(ticks as u32)
}

/// How often each track sends a sender report (RFC 3550 suggests about every 5 s for a few
/// members; Chromium's lip sync needs two reports per track before it acts, so once a second).
const SENDER_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// A sender report for a track: NTP time is the capture time of a packet (Unix µs → NTP) and
/// RTP time is exactly that packet's RTP timestamp (`rtp_ts` with the same origin and rate), so
/// the reports of both tracks put their media on the one capture clock, whatever each track's
/// capture-to-send latency.
fn sender_report(
    ssrc: u32,
    ts_base: u32,
    clock_hz: u64,
    capture_ts_us: u64,
    packets: u32,
    octets: u32,
) -> SenderReport {
    SenderReport {
        ssrc,
        ntp_time: rtc::shared::time::SystemInstant::unix2ntp(Duration::from_micros(capture_ts_us)),
        rtp_time: rtp_ts(ts_base, capture_ts_us, clock_hz),
        packet_count: packets,
        octet_count: octets,
        ..Default::default()
    }
}

/// One track's sender-report state: counts and when the last report went out.
struct SenderReports {
    ssrc: u32,
    ts_base: u32,
    clock_hz: u64,
    packets: u32,
    octets: u32,
    last: Option<Instant>,
}

impl SenderReports {
    fn new(ssrc: u32, ts_base: u32, clock_hz: u64) -> Self {
        SenderReports {
            ssrc,
            ts_base,
            clock_hz,
            packets: 0,
            octets: 0,
            last: None,
        }
    }

    fn count(&mut self, payload_len: usize) {
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(payload_len as u32);
    }

    /// The report to send after a packet captured at `capture_ts_us`, if one is due.
    fn due(&mut self, now: Instant, capture_ts_us: u64) -> Option<SenderReport> {
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < SENDER_REPORT_INTERVAL)
        {
            return None;
        }
        self.last = Some(now);
        Some(sender_report(
            self.ssrc,
            self.ts_base,
            self.clock_hz,
            capture_ts_us,
            self.packets,
            self.octets,
        ))
    }
}

/// Writes `packets` to `track` as one bundle (see `bundle.rs`), with `report` after them when
/// one is due: one pass of the peer connection's driver for all of them.
async fn write_bundle(
    track: &TrackLocalStaticRTP,
    packets: Vec<rtc::rtp::packet::Packet>,
    report: Option<SenderReport>,
) -> Result<(), String> {
    let mut writes: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(FrameBundle { packets })];
    writes.extend(report.map(|sr| Box::new(sr) as Box<dyn rtc::rtcp::Packet>));
    track.write_rtcp(writes).await.map_err(|e| e.to_string())
}

/// The audio sender once the connection is up.
struct Audio {
    track: Arc<TrackLocalStaticRTP>,
    payload_type: u8,
    ssrc: u32,
    seq: u16,
    ts_base: u32,
    /// The next packet starts a talk spurt (RTP marker): the first one, or the first after a
    /// gap.
    marker: bool,
    /// Capture time of the end of the last packet written.
    next_ts_us: u64,
    reports: SenderReports,
}

impl Audio {
    async fn send(&mut self, p: &nearpath_protocol::AudioPacket) -> Result<(), String> {
        let dur_us = u64::from(p.samples) * 1_000_000 / AUDIO_CLOCK_HZ;
        // More than one packet missing (a failover, loss upstream): a new talk spurt.
        let marker = self.marker || p.capture_ts_us > self.next_ts_us + dur_us;
        self.marker = false;
        self.next_ts_us = p.capture_ts_us + dur_us;
        let header = rtc::rtp::header::Header {
            version: 2,
            marker,
            payload_type: self.payload_type,
            sequence_number: self.seq,
            timestamp: rtp_ts(self.ts_base, p.capture_ts_us, AUDIO_CLOCK_HZ),
            ssrc: self.ssrc,
            ..Default::default()
        };
        self.seq = self.seq.wrapping_add(1);
        self.reports.count(p.opus.len());
        // A one-packet bundle (see `bundle.rs`), like a video frame: it skips the sender's
        // per-packet parameter rebuild, and a due sender report shares its driver pass.
        let packet = rtc::rtp::packet::Packet {
            header,
            payload: p.opus.clone(),
        };
        let report = self.reports.due(Instant::now(), p.capture_ts_us);
        write_bundle(&self.track, vec![packet], report).await
    }
}

/// The audio sender, when the browser's offer asked for sound (an audio section whose codec is
/// Opus).
async fn start_audio(n: &Negotiated) -> Option<Audio> {
    let params = n.audio.sender.get_parameters().await.ok()?;
    let pt = params
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case("audio/opus"))
        .map(|c| c.payload_type)?;
    debug!(payload_type = pt, ssrc = n.audio.ssrc, "audio sender ready");
    let ts_base = rand::random();
    Some(Audio {
        track: n.audio.track.clone(),
        payload_type: pt,
        ssrc: n.audio.ssrc,
        seq: rand::random(),
        ts_base,
        marker: true,
        next_ts_us: 0,
        reports: SenderReports::new(n.audio.ssrc, ts_base, AUDIO_CLOCK_HZ),
    })
}
/// The playout-delay extension's value for "no playout delay": 12 bits min, 12 bits max, both 0.
const PLAYOUT_DELAY_ZERO: [u8; 3] = [0, 0, 0];

/// The video sender once the connection is up.
struct Video {
    track: Arc<TrackLocalStaticRTP>,
    /// The negotiated codec: the node encodes it, the packetizer's payloader writes it.
    codec: VideoCodec,
    packetizer: Box<dyn Packetizer>,
    /// RTP timestamp origin (random): capture times map to 90 kHz from here.
    ts_base: u32,
    /// Negotiated id of the playout-delay extension, if the browser offered it.
    playout_delay_id: Option<u8>,
    /// Negotiated id of abs-send-time. Set on every packet: Chromium's receive-side estimator
    /// skips packets without it and would measure only a fraction of the rate (the packetizer's
    /// own option marks only a frame's last packet).
    abs_send_time_id: Option<u8>,
    reports: SenderReports,
}

impl Video {
    /// Packetises one access unit captured at `capture_ts_us` and writes it; returns its RTP
    /// timestamp.
    async fn send(
        &mut self,
        payload: &Bytes,
        at: Instant,
        capture_ts_us: u64,
        counters: &Counters,
        clock: &SharedClock,
    ) -> Result<u32, String> {
        let ts = rtp_ts(self.ts_base, capture_ts_us, VIDEO_CLOCK_HZ);
        // webrtc-rs's AV1 payloader indexes the OBUs' sizes without checking them; a node's
        // frame is checked first, so that a malformed one is dropped rather than panic here.
        if self.codec == VideoCodec::Av1 && !av1_temporal_unit_ok(payload) {
            return Err("malformed AV1 temporal unit".into());
        }
        let mut packets = self
            .packetizer
            .packetize(at, payload, 0)
            .map_err(|e| e.to_string())?;
        counters
            .rtp_packets
            .fetch_add(packets.len() as u64, Ordering::Relaxed);
        // One send time for the whole frame: its packets are written within microseconds of
        // each other (the extension's unit is 3.8 µs), and one buffer serves them all.
        let send_time = self.abs_send_time_id.map(|id| (id, abs_send_time(clock)));
        for p in &mut packets {
            p.header.timestamp = ts;
            if let Some(id) = self.playout_delay_id {
                p.header
                    .set_extension(id, Bytes::from_static(&PLAYOUT_DELAY_ZERO))
                    .map_err(|e| e.to_string())?;
            }
            if let Some((id, t)) = &send_time {
                p.header
                    .set_extension(*id, t.clone())
                    .map_err(|e| e.to_string())?;
            }
            self.reports.count(p.payload.len());
        }
        // The whole frame is one write to the peer connection (see `bundle.rs`): one pass of
        // its driver, and a frame's equal-sized packets leave in one GSO send. A due sender
        // report rides in the same list, after the frame whose last packet it counts.
        let report = self.reports.due(at, capture_ts_us);
        write_bundle(&self.track, packets, report).await?;
        Ok(ts)
    }
}

/// Whether `tu` is a temporal unit of low-overhead AV1 OBUs (AV1 spec 5.3, 5.2) that
/// webrtc-rs's payloader can walk: every OBU's header and size fit in the buffer, and at least
/// one OBU is of a type it sends (temporal delimiters, tile lists and padding are dropped). Sizes
/// are read as leb128 of at most 4 bytes (a frame of 256 MiB is not one), which the payloader
/// decodes the same way.
fn av1_temporal_unit_ok(tu: &[u8]) -> bool {
    const OBU_TEMPORAL_DELIMITER: u8 = 2;
    const OBU_TILE_LIST: u8 = 8;
    const OBU_PADDING: u8 = 15;
    let mut i = 0;
    let mut sent = false;
    while i < tu.len() {
        let header = tu[i];
        let typ = (header >> 3) & 0x0f;
        let header_len = if header & 0x04 != 0 { 2 } else { 1 };
        if i + header_len > tu.len() {
            return false;
        }
        let body = i + header_len;
        let end = if header & 0x02 != 0 {
            let mut size = 0usize;
            let mut n = 0;
            loop {
                let Some(&b) = tu.get(body + n) else {
                    return false;
                };
                size |= usize::from(b & 0x7f) << (7 * n);
                n += 1;
                if b & 0x80 == 0 {
                    break;
                }
                if n == 4 {
                    return false;
                }
            }
            body + n + size
        } else {
            // Without a size field the OBU runs to the end of the unit.
            tu.len()
        };
        if end > tu.len() {
            return false;
        }
        sent |= !matches!(typ, OBU_TEMPORAL_DELIMITER | OBU_TILE_LIST | OBU_PADDING);
        i = end;
    }
    sent
}

/// The abs-send-time value for now: NTP time, 6.18 fixed-point seconds (24 bits).
fn abs_send_time(clock: &SharedClock) -> Bytes {
    let since_epoch = Duration::from_micros(clock.unix_us());
    let v = rtc::shared::time::SystemInstant::unix2ntp(since_epoch) >> 14;
    Bytes::copy_from_slice(&[(v >> 16) as u8, (v >> 8) as u8, v as u8])
}

async fn start_video(n: &Negotiated, now: Instant) -> Result<Video, String> {
    let params = n.sender.get_parameters().await.map_err(|e| e.to_string())?;
    let pt = params
        .rtp_parameters
        .codecs
        .first()
        .map(|c| c.payload_type)
        .ok_or_else(|| "the sender has no negotiated codec".to_string())?;
    let packetizer = new_packetizer(
        now,
        RTP_MTU,
        pt,
        n.ssrc,
        match n.codec {
            VideoCodec::H264 => Box::new(super::h264::H264Payloader::default()),
            VideoCodec::Av1 => Box::new(Av1Payloader::default()),
            VideoCodec::Hevc => Box::new(HevcPayloader),
        },
        Box::new(rtc::rtp::sequence::new_random_sequencer()),
        VIDEO_CLOCK_HZ as u32,
    );
    let ext_id = |uri: &str| {
        params
            .rtp_parameters
            .header_extensions
            .iter()
            .find(|e| e.uri == uri)
            .and_then(|e| u8::try_from(e.id).ok())
    };
    let playout_delay_id = ext_id(PLAYOUT_DELAY_URI);
    let abs_send_time_id = ext_id(ABS_SEND_TIME_URI);
    debug!(
        payload_type = pt,
        ssrc = n.ssrc,
        codec = %n.codec,
        ?playout_delay_id,
        ?abs_send_time_id,
        "video sender ready"
    );
    let ts_base = rand::random();
    Ok(Video {
        track: n.track.clone(),
        codec: n.codec,
        packetizer: Box::new(packetizer),
        ts_base,
        playout_delay_id,
        abs_send_time_id,
        reports: SenderReports::new(n.ssrc, ts_base, VIDEO_CLOCK_HZ),
    })
}

/// Forwards RTCP feedback about the video track to the session task.
async fn read_feedback(track: Arc<TrackLocalStaticRTP>, tx: mpsc::Sender<Feedback>) {
    while let Some(TrackLocalEvent::OnRtcpPacket(packets)) = track.poll().await {
        for p in &packets {
            let a = p.as_any();
            let fb = if a.is::<PictureLossIndication>() || a.is::<FullIntraRequest>() {
                Feedback::KeyframeRequest
            } else if let Some(remb) = a.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
                Feedback::Remb(f64::from(remb.bitrate))
            } else {
                continue;
            };
            let _ = tx.try_send(fb);
        }
    }
}

fn pc_state(s: RTCPeerConnectionState) -> PcState {
    match s {
        RTCPeerConnectionState::Connected => PcState::Connected,
        RTCPeerConnectionState::Disconnected => PcState::Disconnected,
        RTCPeerConnectionState::Failed => PcState::Failed,
        RTCPeerConnectionState::Closed => PcState::Closed,
        _ => PcState::Other,
    }
}

/// What a running session needs besides its peer connection.
pub(super) struct SessionDeps {
    pub games: Arc<GameService>,
    pub state: Arc<Sessions>,
    pub shutdown: CancellationToken,
}

pub(super) async fn run_session(
    deps: SessionDeps,
    handle: Arc<SessionHandle>,
    mut n: Negotiated,
    started: game::Started,
    mut frames: mpsc::Receiver<(FrameHeader, Bytes)>,
    mut audio: mpsc::Receiver<nearpath_protocol::AudioPacket>,
    params: GameParams,
) {
    let game::Started {
        events,
        mut notices,
        relay,
        ..
    } = started;
    let games = deps.games;
    let clock = games.clock().clone();
    let g = games.config();
    let counters = handle.counters.clone();
    let idle = Duration::from_millis(g.player_idle_timeout_ms);
    let mut control = SessionControl::new(
        clock.now(),
        Limits {
            connect_timeout: Duration::from_millis(g.webrtc_connect_timeout_ms),
            idle_timeout: idle,
            frame_budget_us: g.frame_budget_ms.saturating_mul(1000),
            bitrate_kbps: params.bitrate_kbps,
        },
    );
    let mut video: Option<Video> = None;
    let mut sound: Option<Audio> = None;
    let mut dc: Option<Arc<dyn DataChannel>> = None;
    let (fb_tx, mut fb_rx) = mpsc::channel::<Feedback>(64);
    let (heard_tx, mut heard_rx) = mpsc::channel::<bool>(64);
    let reason = 'session: loop {
        while let Some(action) = control.poll_action() {
            match action {
                Action::StartVideo => {
                    let now = clock.now();
                    match start_video(&n, now).await {
                        Ok(v) => {
                            video = Some(v);
                            sound = start_audio(&n).await;
                            tokio::spawn(
                                read_feedback(n.track.clone(), fb_tx.clone()).in_current_span(),
                            );
                            info!("browser connected");
                            control.handle_video_started(now, true);
                        }
                        Err(e) => {
                            warn!(error = %e, "video sender not ready");
                            control.handle_video_started(now, false);
                        }
                    }
                }
                Action::ToGame(ev @ (ClientEvent::ForceKeyframe | ClientEvent::SetBitrate(_))) => {
                    let _ = events.try_send(ev);
                }
                Action::ToGame(ev) => {
                    let _ = events.send(ev).await;
                }
                Action::KeyframeRequest => {
                    counters.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                    let _ = events.try_send(ClientEvent::ForceKeyframe);
                }
                Action::Bitrate(kbps) => {
                    debug!(kbps, "bitrate follows REMB");
                    counters.target_kbps.store(kbps, Ordering::Relaxed);
                    let _ = events.try_send(ClientEvent::SetBitrate(kbps));
                }
                Action::Tell(msg) => tell(&dc, &msg).await,
                Action::Flush => flush(&dc).await,
                Action::End(reason) => {
                    match reason {
                        "connect timeout" => warn!(
                            "the browser did not connect within {} ms",
                            g.webrtc_connect_timeout_ms
                        ),
                        "disconnected" => warn!("the browser stayed disconnected for {idle:?}"),
                        "page silent" => {
                            warn!("the page stopped pinging for {idle:?}; ending the session")
                        }
                        _ => {}
                    }
                    break 'session reason;
                }
            }
        }
        let deadline = control.poll_timeout();
        tokio::select! {
            ev = n.events.recv() => match ev {
                Some(PcEvent::State(s)) => {
                    debug!(state = %s, "peer connection state");
                    control.handle_connection_state(clock.now(), pc_state(s));
                }
                Some(PcEvent::DataChannel(channel)) => {
                    let label = channel.label().await.unwrap_or_default();
                    if label == INPUT_LABEL && dc.is_none() {
                        tokio::spawn(
                            read_input(channel.clone(), relay.clone(), events.clone(), heard_tx.clone(), counters.clone(), clock.clone()).in_current_span(),
                        );
                        dc = Some(channel);
                    } else {
                        debug!(%label, "unexpected data channel closed");
                        let _ = channel.close().await;
                    }
                }
                None => control.handle_source_ended("peer connection driver stopped"),
            },
            f = frames.recv() => {
                let Some((header, payload)) = f else {
                    control.handle_source_ended("frame source ended");
                    continue;
                };
                let at = clock.now();
                let gw_us = clock.unix_us();
                match control.handle_frame(gw_us, &header) {
                    FrameVerdict::NotConnected => {}
                    FrameVerdict::Late => {
                        games.count_drop(&relay, game::DropReason::Late);
                        relay.request_keyframe();
                    }
                    FrameVerdict::SkipUntilKeyframe => {
                        counters.frames_skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    FrameVerdict::Send => {
                        let Some(v) = video.as_mut() else { continue };
                        match v.send(&payload, at, header.capture_ts_us, &counters, &clock).await {
                            Ok(rtp_ts) => {
                                control.handle_sent(at, payload.len());
                                counters.frames_sent.fetch_add(1, Ordering::Relaxed);
                                tell(&dc, &frame_message(&header, gw_us, rtp_ts)).await;
                            }
                            Err(e) => debug!(error = %e, "frame not written"),
                        }
                    }
                }
            }
            Some(packet) = audio.recv() => {
                // Before the browser is connected (or when it asked for no sound) packets are
                // dropped: sound does not wait.
                if let Some(a) = sound.as_mut() {
                    match a.send(&packet).await {
                        Ok(()) => {
                            counters.audio_packets.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => debug!(error = %e, "audio packet not written"),
                    }
                }
            }
            fb = fb_rx.recv() => {
                if let Some(fb) = fb {
                    if let Feedback::Remb(bps) = fb {
                        counters.remb_kbps.store((bps / 1000.0) as u32, Ordering::Relaxed);
                    }
                    control.handle_feedback(clock.now(), fb);
                }
            }
            notice = notices.recv() => control.handle_notice(notice),
            Some(ping) = heard_rx.recv() => control.handle_page_message(clock.now(), ping),
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline.unwrap_or_else(Instant::now))), if deadline.is_some() => {
                // Messages already read count before the verdict: a busy task must not take
                // its own delay for the page's silence.
                let now = clock.now();
                while let Ok(ping) = heard_rx.try_recv() {
                    control.handle_page_message(now, ping);
                }
                control.handle_timeout(now);
            }
            _ = handle.stop.cancelled() => control.handle_deleted(),
            _ = deps.shutdown.cancelled() => control.handle_shutdown(),
        }
    };
    deps.state.remove(handle.id);
    if let Err(e) = n.pc.close().await {
        debug!(error = %e, "peer connection close");
    }
    info!(
        reason,
        frames_sent = counters.frames_sent.load(Ordering::Relaxed),
        audio_packets = counters.audio_packets.load(Ordering::Relaxed),
        inputs = counters.inputs.load(Ordering::Relaxed),
        "WebRTC session ended"
    );
    drop(n.port);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the AV1 path against a node's malformed frames: the check refuses what would make
    /// webrtc-rs's payloader index out of bounds, and what it passes packetises.
    #[test]
    fn av1_temporal_units_are_checked_before_the_payloader_walks_them() {
        // Temporal delimiter (type 2, has size, 0 bytes), then a frame OBU (type 6) of 3 bytes.
        let good = [0x12, 0x00, 0x32, 0x03, 1, 2, 3];
        assert!(av1_temporal_unit_ok(&good));
        let mut p = Av1Payloader::default();
        use rtc::rtp::packetizer::Payloader;
        assert!(!p
            .payload(1200, &Bytes::copy_from_slice(&good))
            .unwrap()
            .is_empty());
        // A last OBU without a size field runs to the end.
        assert!(av1_temporal_unit_ok(&[0x12, 0x00, 0x30, 9, 9]));
        for bad in [
            &[][..],                                  // nothing
            &[0x12, 0x00],                            // a delimiter only: nothing to send
            &[0x32, 0x05, 1, 2],                      // size past the end
            &[0x32],                                  // size field missing
            &[0x32, 0x80, 0x80, 0x80, 0x80, 0x01, 1], // a 5-byte leb128
            &[0x36],                                  // extension byte missing
            &[0x32, 0xff, 0xff, 0xff, 0x7f],          // 256 MiB claimed
        ] {
            assert!(!av1_temporal_unit_ok(bad), "{bad:?}");
        }
        // Whatever bytes come, the check never panics, and what it passes packetises.
        let mut x = 0x9e37_79b9u32;
        for len in 0..2000usize {
            let buf: Vec<u8> = (0..len % 64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if av1_temporal_unit_ok(&buf) {
                p.payload(1200, &Bytes::from(buf)).unwrap();
            }
        }
    }

    /// Guards A/V sync: both tracks' RTP timestamps come from the capture clock, so media
    /// captured at the same instant have RTP times that map back to it.
    #[test]
    fn rtp_timestamps_follow_the_capture_clock_at_each_rate() {
        let t = 1_765_000_000_123_456u64;
        let a0 = rtp_ts(7, t, AUDIO_CLOCK_HZ);
        let v0 = rtp_ts(9, t, VIDEO_CLOCK_HZ);
        // 10 ms later: 480 ticks of audio, 900 of video.
        assert_eq!(rtp_ts(7, t + 10_000, AUDIO_CLOCK_HZ).wrapping_sub(a0), 480);
        assert_eq!(rtp_ts(9, t + 10_000, VIDEO_CLOCK_HZ).wrapping_sub(v0), 900);
        // Wrapping is fine: a random origin near the top.
        let a = rtp_ts(u32::MAX, t, AUDIO_CLOCK_HZ);
        assert_eq!(
            rtp_ts(u32::MAX, t + 20_000, AUDIO_CLOCK_HZ).wrapping_sub(a),
            960
        );
    }

    /// Guards A/V sync: each track's sender report pairs a packet's capture time (as NTP) with
    /// exactly the RTP timestamp that packet carries, so audio and video captured at the same
    /// instant map to the same NTP time, whatever their rates, origins or send times.
    #[test]
    fn sender_reports_map_rtp_time_to_the_capture_clock_for_both_tracks() {
        use rtc::shared::time::SystemInstant;
        let t = 1_765_000_000_123_456u64;
        let (abase, vbase) = (0xdead_beef_u32, 0x0123_4567_u32);
        let a = sender_report(1, abase, AUDIO_CLOCK_HZ, t, 10, 1000);
        let v = sender_report(2, vbase, VIDEO_CLOCK_HZ, t, 20, 2000);
        // The RTP time is the packet's own timestamp.
        assert_eq!(a.rtp_time, rtp_ts(abase, t, AUDIO_CLOCK_HZ));
        assert_eq!(v.rtp_time, rtp_ts(vbase, t, VIDEO_CLOCK_HZ));
        // Both reports name the same instant: the capture time, not a send time.
        assert_eq!(a.ntp_time, v.ntp_time);
        let back = SystemInstant::ntp2unix(a.ntp_time).as_micros() as i128;
        assert!((back - i128::from(t)).abs() <= 1, "{back} vs {t}");
        assert_eq!((a.ssrc, a.packet_count, a.octet_count), (1, 10, 1000));
        // A later report of either track extrapolates like the other: 1 s later is 48 000
        // audio ticks and 90 000 video ticks after the first, at NTP + 1 s.
        let a2 = sender_report(1, abase, AUDIO_CLOCK_HZ, t + 1_000_000, 0, 0);
        let v2 = sender_report(2, vbase, VIDEO_CLOCK_HZ, t + 1_000_000, 0, 0);
        assert_eq!(a2.rtp_time.wrapping_sub(a.rtp_time), 48_000);
        assert_eq!(v2.rtp_time.wrapping_sub(v.rtp_time), 90_000);
        assert_eq!(a2.ntp_time - a.ntp_time, 1 << 32);
        assert_eq!(v2.ntp_time, a2.ntp_time);
    }

    /// Guards the report rate: one per track per second, counting every packet.
    #[test]
    fn sender_reports_go_out_once_a_second_with_the_counts() {
        let mut r = SenderReports::new(5, 0, AUDIO_CLOCK_HZ);
        let t0 = Instant::now();
        r.count(100);
        let first = r.due(t0, 1_000).expect("the first report goes out at once");
        assert_eq!((first.packet_count, first.octet_count), (1, 100));
        r.count(50);
        assert!(r.due(t0 + Duration::from_millis(999), 2_000).is_none());
        let next = r.due(t0 + Duration::from_millis(1000), 3_000).unwrap();
        assert_eq!((next.packet_count, next.octet_count), (2, 150));
        assert_eq!(next.rtp_time, rtp_ts(0, 3_000, AUDIO_CLOCK_HZ));
    }
}
