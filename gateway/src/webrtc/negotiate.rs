//! SDP answers and the peer connection: codecs, header extensions, the RTCP feedback tap,
//! sockets, and the answer rewrite for a 1:1 NAT.

use super::ports::{PortLease, PortLeases};
use super::{WhepError, ABS_SEND_TIME_URI, PLAYOUT_DELAY_URI};
use nearpath_config::GameConfig;
use nearpath_protocol::message::{GameParams, VideoCodec};
use rtc::interceptor::{
    Attribute, AttributedPacket, Interceptor, NackResponderBuilder, Packet, Slot, StreamInfo,
    TaggedPacket,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::warn;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::RtpSender;

/// Host candidates gather in milliseconds; this only bounds a pathological case.
const GATHER_TIMEOUT: Duration = Duration::from_secs(3);
/// Payload type registered for the video codec; the browser's own number is what gets used.
const VIDEO_PAYLOAD_TYPE: u8 = 102;
/// Payload type registered for Opus; likewise the offer's number is used.
const OPUS_PAYLOAD_TYPE: u8 = 111;

/// The game's sound: Opus, 48 kHz, stereo, 10 ms packets with in-band FEC (what the node
/// encodes; the gateway forwards the packets unchanged).
fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "audio/opus".to_string(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1".to_string(),
        rtcp_feedback: vec![],
    }
}

// Offer checks and trickle fragments live in `crate::sdp`, which needs no webrtc-rs, so that the
// fuzz targets in `fuzz/` compile that exact code without the rest of the gateway.

/// The H.264 `level_idc` a stream of this size and rate needs (Table A-1 of the H.264 spec:
/// frame size and macroblock rate limits), as the last byte of `profile-level-id`.
pub fn h264_level(width: u32, height: u32, fps: u32) -> u8 {
    let mbs = u64::from(width.div_ceil(16)) * u64::from(height.div_ceil(16));
    let rate = mbs * u64::from(fps.max(1));
    // (level_idc, max frame size in macroblocks, max macroblocks per second)
    const LEVELS: [(u8, u64, u64); 8] = [
        (0x1f, 3_600, 108_000),     // 3.1
        (0x20, 5_120, 216_000),     // 3.2
        (0x28, 8_192, 245_760),     // 4.0
        (0x2a, 8_704, 522_240),     // 4.2
        (0x32, 22_080, 589_824),    // 5.0
        (0x33, 36_864, 983_040),    // 5.1
        (0x34, 36_864, 2_073_600),  // 5.2
        (0x3c, 139_264, 4_177_920), // 6.0
    ];
    LEVELS
        .iter()
        .find(|(_, fs, mbps)| mbs <= *fs && rate <= *mbps)
        .map(|(l, _, _)| *l)
        .unwrap_or(0x3e) // 6.2: the largest there is
}

/// Replaces the address of every non-loopback host candidate with `public` (1:1 NAT: the
/// gateway's interfaces have private addresses; browsers must be told the public one), dropping
/// the duplicates that leaves when several interfaces share the port. `webrtc` 0.21 keeps a NAT
/// 1:1 setting but does not apply it, hence this rewrite of the answer.
pub fn advertise_public_ip(sdp: &str, public: IpAddr) -> String {
    let mut seen = HashSet::new();
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        if let Some(cand) = body.strip_prefix("a=candidate:") {
            let mut f: Vec<&str> = cand.split(' ').collect();
            let host = f
                .iter()
                .position(|x| *x == "typ")
                .and_then(|i| f.get(i + 1))
                == Some(&"host");
            let rewrite =
                host && f.len() > 5 && f[4].parse::<IpAddr>().is_ok_and(|a| !a.is_loopback());
            if rewrite {
                let public = public.to_string();
                f[4] = &public;
                if !seen.insert((public.clone(), f[5].to_string(), f[2].to_string())) {
                    continue;
                }
                out.push_str("a=candidate:");
                out.push_str(&f.join(" "));
                out.push_str(&line[body.len()..]);
                continue;
            }
        }
        out.push_str(line);
    }
    out
}

/// Marks PLI, FIR and REMB for delivery to the application (the chain's terminus drops every
/// inbound RTCP packet that no interceptor vouched for). Other packets of a compound are left
/// to the interceptors that act on them.
#[derive(Default)]
struct FeedbackTap {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

fn wanted_feedback(p: &dyn rtc::rtcp::Packet) -> bool {
    let a = p.as_any();
    a.is::<PictureLossIndication>()
        || a.is::<FullIntraRequest>()
        || a.is::<ReceiverEstimatedMaximumBitrate>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for FeedbackTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        // This slot is application-most, so every interceptor that acts on RTCP (the NACK
        // responder, the report interceptors) has already seen the whole compound packet.
        if let Packet::Rtcp(packets) = &msg.message.packet {
            if packets.iter().any(|p| wanted_feedback(p.as_ref())) {
                let wanted: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                    .iter()
                    .filter(|p| wanted_feedback(p.as_ref()))
                    .cloned()
                    .collect();
                msg.message.packet = Packet::Rtcp(wanted);
                msg.message.attributes.push(Attribute::DeliverToApplication);
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        // Application-most on the write walk too: a frame's bundle (`bundle.rs`) opens here
        // into its RTP packets, so every other interceptor sees them as the RTP they are.
        let (now, transport, attributes) = (msg.now, msg.transport, msg.message.attributes);
        let write = &mut self.write;
        super::bundle::unbundle(msg.message.packet, |packet| {
            write.push_back(TaggedPacket {
                now,
                transport,
                message: AttributedPacket {
                    attributes: attributes.clone(),
                    packet,
                },
            })
        });
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write.pop_front()
    }
}

impl Interceptor for FeedbackTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

pub(super) enum PcEvent {
    State(RTCPeerConnectionState),
    DataChannel(Arc<dyn DataChannel>),
}

/// Forwards the driver's callbacks to the session task (callbacks run on the driver and must
/// not block it).
struct Handler {
    events: mpsc::UnboundedSender<PcEvent>,
    gathered: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.events.send(PcEvent::State(state));
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let _ = self.events.send(PcEvent::DataChannel(dc));
    }
}

/// The session's Opus track.
pub(super) struct AudioTrack {
    pub track: Arc<TrackLocalStaticRTP>,
    pub sender: Arc<dyn RtpSender>,
    pub ssrc: u32,
}

/// A peer connection that has answered an offer.
pub(super) struct Negotiated {
    pub pc: Arc<dyn PeerConnection>,
    pub track: Arc<TrackLocalStaticRTP>,
    pub sender: Arc<dyn RtpSender>,
    pub ssrc: u32,
    /// The video codec the answer names (the session's `GameParams.codec`).
    pub codec: VideoCodec,
    pub audio: AudioTrack,
    pub answer: String,
    pub events: mpsc::UnboundedReceiver<PcEvent>,
    pub port: PortLease,
}

/// The addresses a session binds: every interface (the stack expands the wildcard, skipping
/// loopback) and, for a player on loopback, the loopback address too.
fn bind_addrs(client: IpAddr, port: u16) -> Vec<SocketAddr> {
    let mut out = vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)];
    match client {
        IpAddr::V4(v4) if v4.is_loopback() => {
            out.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        }
        IpAddr::V6(v6) if v6.is_loopback() => {
            out.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port))
        }
        IpAddr::V6(_) => out.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)),
        IpAddr::V4(_) => {}
    }
    out
}

/// The session's video codec as the media engine registers it. Only this one is registered, so
/// the answer offers the browser nothing else. The fmtp lines name what the nodes' encoders
/// write: H.264 Constrained Baseline in packetization mode 1; AV1 Main profile (webrtc-rs
/// matches fmtp parameters both sides name, so the profile alone matches Chromium's
/// `level-idx=5;profile=0;tier=0`); H.265 Main profile.
pub(super) fn video_codec(params: &GameParams) -> RTCRtpCodec {
    let (mime_type, sdp_fmtp_line) = match params.codec {
        VideoCodec::H264 => (
            "video/H264",
            format!(
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e0{:02x}",
                h264_level(params.width, params.height, params.fps)
            ),
        ),
        VideoCodec::Av1 => ("video/AV1", "profile=0".to_string()),
        VideoCodec::Hevc => ("video/H265", "profile-id=1".to_string()),
    };
    RTCRtpCodec {
        mime_type: mime_type.to_string(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line,
        rtcp_feedback: vec![],
    }
}

/// Builds a peer connection for `params`, answers `offer` and waits for the host candidates.
pub(super) async fn negotiate(
    g: &GameConfig,
    ports: &Arc<PortLeases>,
    offer: &str,
    params: &GameParams,
    client: IpAddr,
) -> Result<Negotiated, WhepError> {
    let internal = |what: &'static str| {
        move |e: rtc::shared::error::Error| WhepError::Internal {
            what,
            reason: e.to_string(),
        }
    };
    let codec = video_codec(params);
    let mut tried = HashSet::new();
    // A port that probed free can be taken by another process before the stack binds it; try
    // a few before giving up.
    for _ in 0..4 {
        let port = ports.lease(g.webrtc_udp_port_min, g.webrtc_udp_port_max, &tried)?;
        tried.insert(port.port());
        let mut media = MediaEngine::default();
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: codec.clone(),
                    payload_type: VIDEO_PAYLOAD_TYPE,
                },
                RtpCodecKind::Video,
            )
            .map_err(internal("registering the video codec"))?;
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: opus_codec(),
                    payload_type: OPUS_PAYLOAD_TYPE,
                },
                RtpCodecKind::Audio,
            )
            .map_err(internal("registering Opus"))?;
        for (typ, parameter) in [
            ("ccm", "fir"),
            ("goog-remb", ""),
            ("nack", ""),
            ("nack", "pli"),
        ] {
            media.register_feedback(
                RTCPFeedback {
                    typ: typ.to_string(),
                    parameter: parameter.to_string(),
                },
                RtpCodecKind::Video,
            );
        }
        for uri in [ABS_SEND_TIME_URI, PLAYOUT_DELAY_URI] {
            media
                .register_header_extension(
                    RTCRtpHeaderExtensionCapability {
                        uri: uri.to_string(),
                    },
                    RtpCodecKind::Video,
                    None,
                )
                .map_err(internal("registering a header extension"))?;
        }
        // No sender-report interceptor: it maps a track's RTP time to the time its last packet
        // was *sent*, which differs between the tracks by their capture-to-send latencies. The
        // session writes its own sender reports from the capture clock (`session.rs`,
        // `SenderReports`), so audio and video map to one timeline.
        //
        // Every interceptor sees every packet, so the chain holds only what a send-only peer
        // uses: the NACK responder (retransmissions; `nack` and `nack pli` are in the answer)
        // and the feedback tap. The browser sends no RTP, so a NACK generator and a
        // receiver-report interceptor (what `configure_nack` and the default registry add) would
        // only add per-packet work.
        let registry = Registry::new()
            .with(Slot::NackResponder, NackResponderBuilder::new().build())
            .with(Slot::from(12_500), FeedbackTap::default());
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (gathered_tx, mut gathered_rx) = watch::channel(false);
        let built = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::default().build())
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings.build())
            .with_handler(Arc::new(Handler {
                events: events_tx,
                gathered: gathered_tx,
            }))
            .with_udp_addrs(bind_addrs(client, port.port()))
            .build()
            .await;
        let pc: Arc<dyn PeerConnection> = match built {
            Ok(pc) => Arc::new(pc),
            Err(e) if port.port() != 0 => {
                warn!(port = port.port(), error = %e, "WebRTC sockets did not bind; trying another port");
                continue;
            }
            Err(e) => return Err(internal("starting a peer connection")(e)),
        };
        let result = async {
            let ssrc = rand::random::<u32>();
            let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                "nearpath".to_string(),
                "video".to_string(),
                "game".to_string(),
                RtpCodecKind::Video,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: codec.clone(),
                    ..Default::default()
                }],
            )));
            let sender = pc
                .add_track(track.clone() as Arc<dyn TrackLocal>)
                .await
                .map_err(internal("adding the video track"))?;
            // The sound, in the same stream as the picture, so the browser lip-syncs them by
            // their RTP timestamps and sender reports. An offer without an audio section gets
            // an answer without one, and these packets go nowhere.
            let audio_ssrc = rand::random::<u32>();
            let audio_track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                "nearpath".to_string(),
                "audio".to_string(),
                "game-audio".to_string(),
                RtpCodecKind::Audio,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(audio_ssrc),
                        ..Default::default()
                    },
                    codec: opus_codec(),
                    ..Default::default()
                }],
            )));
            let audio_sender = pc
                .add_track(audio_track.clone() as Arc<dyn TrackLocal>)
                .await
                .map_err(internal("adding the audio track"))?;
            let desc = RTCSessionDescription::offer(offer.to_string()).map_err(|e| {
                WhepError::BadOffer {
                    reason: e.to_string(),
                }
            })?;
            pc.set_remote_description(desc)
                .await
                .map_err(|e| WhepError::BadOffer {
                    reason: e.to_string(),
                })?;
            let answer = pc
                .create_answer(None)
                .await
                .map_err(|e| WhepError::BadOffer {
                    reason: e.to_string(),
                })?;
            pc.set_local_description(answer)
                .await
                .map_err(|e| WhepError::BadOffer {
                    reason: e.to_string(),
                })?;
            // Host candidates only: gathering completes in milliseconds; the bound keeps a broken
            // stack from holding the request.
            let _ = tokio::time::timeout(GATHER_TIMEOUT, gathered_rx.wait_for(|done| *done)).await;
            let mut answer = pc
                .local_description()
                .await
                .ok_or_else(|| WhepError::Internal {
                    what: "answering",
                    reason: "no local description".into(),
                })?
                .sdp;
            if let Some(ip) = g.webrtc_public_ip {
                answer = advertise_public_ip(&answer, ip);
            }
            let audio = AudioTrack {
                track: audio_track,
                sender: audio_sender,
                ssrc: audio_ssrc,
            };
            Ok::<_, WhepError>((track, sender, ssrc, audio, answer))
        }
        .await;
        return match result {
            Ok((track, sender, ssrc, audio, answer)) => Ok(Negotiated {
                pc,
                track,
                sender,
                ssrc,
                codec: params.codec,
                audio,
                answer,
                events: events_rx,
                port,
            }),
            Err(e) => {
                let _ = pc.close().await;
                Err(e)
            }
        };
    }
    Err(WhepError::NoUdpPort {
        min: g.webrtc_udp_port_min,
        max: g.webrtc_udp_port_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_follows_size_and_rate() {
        assert_eq!(h264_level(1280, 720, 30), 0x1f);
        assert_eq!(h264_level(1280, 720, 60), 0x20);
        assert_eq!(h264_level(1920, 1080, 30), 0x28);
        assert_eq!(h264_level(1920, 1080, 60), 0x2a);
        assert_eq!(h264_level(3840, 2160, 60), 0x34);
        assert_eq!(h264_level(640, 360, 30), 0x1f);
        assert_eq!(h264_level(7680, 4320, 240), 0x3e);
    }

    #[test]
    fn host_candidates_advertise_the_public_address_once() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
a=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\n\
a=candidate:2 1 udp 2130706431 172.17.0.2 40000 typ host\r\n\
a=candidate:3 1 udp 2130706431 127.0.0.1 40000 typ host\r\n\
a=candidate:4 1 udp 1694498815 198.51.100.1 40001 typ srflx raddr 10.0.0.5 rport 40000\r\na=mid:0\r\n";
        let out = advertise_public_ip(sdp, "203.0.113.7".parse().unwrap());
        assert_eq!(
            out,
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
a=candidate:1 1 udp 2130706431 203.0.113.7 40000 typ host\r\n\
a=candidate:3 1 udp 2130706431 127.0.0.1 40000 typ host\r\n\
a=candidate:4 1 udp 1694498815 198.51.100.1 40001 typ srflx raddr 10.0.0.5 rport 40000\r\na=mid:0\r\n"
        );
    }

    #[test]
    fn the_feedback_tap_lets_keyframe_requests_and_remb_through_and_nothing_else() {
        use rtc::rtcp::receiver_report::ReceiverReport;
        let tagged = |packets: Vec<Box<dyn rtc::rtcp::Packet>>| TaggedPacket {
            now: Instant::now(),
            transport: Default::default(),
            message: Packet::Rtcp(packets).into(),
        };
        let mut tap = FeedbackTap::default();
        // A compound of a receiver report and a PLI: the PLI alone is delivered.
        let rr: Box<dyn rtc::rtcp::Packet> = Box::new(ReceiverReport {
            ssrc: 1,
            ..Default::default()
        });
        let pli: Box<dyn rtc::rtcp::Packet> = Box::new(PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc: 7,
        });
        tap.handle_read(tagged(vec![rr.clone(), pli])).unwrap();
        let out = tap.poll_read().unwrap();
        assert!(out.message.has(&Attribute::DeliverToApplication));
        let Packet::Rtcp(p) = &out.message.packet else {
            panic!("not RTCP")
        };
        assert_eq!(p.len(), 1);
        assert!(p[0].as_any().is::<PictureLossIndication>());
        // REMB is delivered too.
        let remb: Box<dyn rtc::rtcp::Packet> = Box::new(ReceiverEstimatedMaximumBitrate {
            sender_ssrc: 1,
            bitrate: 5e6,
            ssrcs: vec![7],
        });
        tap.handle_read(tagged(vec![remb])).unwrap();
        assert!(tap
            .poll_read()
            .unwrap()
            .message
            .has(&Attribute::DeliverToApplication));
        // A report alone is left to the interceptors (the chain's end drops it).
        tap.handle_read(tagged(vec![rr])).unwrap();
        assert!(!tap
            .poll_read()
            .unwrap()
            .message
            .has(&Attribute::DeliverToApplication));
        assert!(tap.poll_read().is_none());
    }

    /// Guards the frame bundle's premise (`bundle.rs`): the NACK responder, network-ward of the
    /// tap, must keep the bundled packets in its history, or a browser's NACK would go
    /// unanswered and every lost packet would cost a keyframe.
    #[test]
    fn a_bundled_frames_packets_are_retransmitted_on_a_nack() {
        use rtc::interceptor::{RTCPFeedback, Registry};
        use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};
        let mut chain = Registry::new()
            .with(Slot::NackResponder, NackResponderBuilder::new().build())
            .with(Slot::from(12_500), FeedbackTap::default())
            .build();
        chain.bind_local_stream(&StreamInfo {
            ssrc: 7,
            payload_type: 96,
            clock_rate: 90_000,
            rtcp_feedback: vec![RTCPFeedback {
                typ: "nack".into(),
                parameter: String::new(),
            }],
            ..Default::default()
        });
        let rtp = |seq: u16| rtc::rtp::packet::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                payload_type: 96,
                sequence_number: seq,
                ssrc: 7,
                ..Default::default()
            },
            payload: bytes::Bytes::from(vec![seq as u8; 10]),
        };
        let now = Instant::now();
        let bundle = super::super::bundle::FrameBundle {
            packets: (100..104).map(rtp).collect(),
        };
        chain
            .handle_write(TaggedPacket {
                now,
                transport: Default::default(),
                message: Packet::Rtcp(vec![Box::new(bundle)]).into(),
            })
            .unwrap();
        let mut sent = Vec::new();
        while let Some(p) = chain.poll_write() {
            match p.message.packet {
                Packet::Rtp(r) => sent.push(r.header.sequence_number),
                other => panic!("the bundle reached the wire side unopened: {other:?}"),
            }
        }
        assert_eq!(sent, vec![100, 101, 102, 103]);
        let nack = TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc: 7,
            nacks: vec![NackPair {
                packet_id: 101,
                lost_packets: 0b10,
            }],
        };
        chain
            .handle_read(TaggedPacket {
                now,
                transport: Default::default(),
                message: Packet::Rtcp(vec![Box::new(nack)]).into(),
            })
            .unwrap();
        chain.handle_timeout(now).unwrap();
        let mut resent = Vec::new();
        while let Some(p) = chain.poll_write() {
            if let Packet::Rtp(r) = p.message.packet {
                resent.push((r.header.sequence_number, r.payload[0]));
            }
        }
        assert_eq!(resent, vec![(101, 101), (103, 103)]);
    }
}
