//! A video frame's RTP packets carried to the peer connection's core as one write.
//!
//! webrtc-rs' `TrackLocal::write_rtp` takes one packet: each one is a message on the peer
//! connection driver's channel, a pass of the driver's loop (three core locks, a `select!` set up
//! anew), the sender's per-packet checks (which rebuild the sender's parameters, codec names and
//! all) and one `sendmsg` of its own, because the driver flushes after every message it handles.
//! At 720p60 and 10 Mbit/s that is ~1,500 passes a second per player, and it was most of the
//! gateway's cost per browser session (issue 17's profile: `sendmsg` alone 32–37% of the
//! samples, most of it per-packet kernel work).
//!
//! `write_rtcp` takes a list, so a frame travels as one [`FrameBundle`] "RTCP packet" and the
//! session's application-most interceptor ([`unbundle`], called by `negotiate.rs`'s tap) opens
//! it into its RTP packets before any other interceptor sees them. Everything network-ward of
//! the tap — the NACK responder's history, the outbound statistics, SRTP — sees ordinary RTP
//! packets. The driver then finds the whole frame in the core's queue in one pass and sends
//! equal-sized runs of it with UDP GSO (its `flush_writes`).
//!
//! A bundle is never on the wire: it has no encoding, and marshalling one fails (so, if it
//! ever got past the tap, the frame would be dropped with an error logged rather than sent as
//! garbage). The packets in it are built by the gateway's own payloaders; none comes from a
//! peer, so nothing here parses network input.

use bytes::Buf;
use rtc::interceptor::Packet;
use rtc::rtcp::header::{Header, PacketType};
use rtc::shared::error::{Error, Result};
use rtc::shared::marshal::{Marshal, MarshalSize, Unmarshal};
use std::any::Any;
use std::fmt;

/// The RTP packets of one video frame, in send order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FrameBundle {
    pub packets: Vec<rtc::rtp::packet::Packet>,
}

impl fmt::Display for FrameBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frame bundle of {} RTP packets", self.packets.len())
    }
}

impl MarshalSize for FrameBundle {
    fn marshal_size(&self) -> usize {
        0
    }
}

impl Marshal for FrameBundle {
    fn marshal_to(&self, _buf: &mut [u8]) -> Result<usize> {
        Err(Error::Other(
            "a frame bundle reached the wire unopened (the session's interceptor is missing)"
                .into(),
        ))
    }
}

impl Unmarshal for FrameBundle {
    fn unmarshal<B>(_buf: &mut B) -> Result<Self>
    where
        B: Buf,
    {
        Err(Error::Other("a frame bundle has no wire form".into()))
    }
}

impl rtc::rtcp::Packet for FrameBundle {
    fn header(&self) -> Header {
        // No RTCP type is this; `Unsupported` keeps every statistic and feedback matcher
        // (which look at application-defined types and feedback formats) away from it.
        Header {
            packet_type: PacketType::Unsupported,
            ..Default::default()
        }
    }

    fn destination_ssrc(&self) -> Vec<u32> {
        self.packets
            .first()
            .map(|p| vec![p.header.ssrc])
            .unwrap_or_default()
    }

    fn raw_size(&self) -> usize {
        0
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn equal(&self, other: &dyn rtc::rtcp::Packet) -> bool {
        other.as_any().downcast_ref::<FrameBundle>() == Some(self)
    }

    fn cloned(&self) -> Box<dyn rtc::rtcp::Packet> {
        Box::new(self.clone())
    }
}

/// Opens the bundles of an outgoing RTCP list: `out` receives, in order, the RTP packets of
/// each bundle, then (if any remain) the list's real RTCP packets as one message. A list
/// without a bundle comes back unchanged as the one message.
pub fn unbundle(packet: Packet, mut out: impl FnMut(Packet)) {
    let Packet::Rtcp(list) = packet else {
        out(packet);
        return;
    };
    if !list.iter().any(|p| p.as_any().is::<FrameBundle>()) {
        out(Packet::Rtcp(list));
        return;
    }
    let mut rest = Vec::new();
    for p in list {
        match p.as_any().downcast_ref::<FrameBundle>() {
            // The bundle is owned behind a `Box<dyn Packet>` without `into_any`, so its
            // packets are cloned out: a header and a refcounted payload each, no payload copy.
            Some(bundle) => bundle
                .packets
                .iter()
                .cloned()
                .map(Packet::Rtp)
                .for_each(&mut out),
            None => rest.push(p),
        }
    }
    if !rest.is_empty() {
        out(Packet::Rtcp(rest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rtc::rtcp::sender_report::SenderReport;

    fn rtp(seq: u16) -> rtc::rtp::packet::Packet {
        rtc::rtp::packet::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                sequence_number: seq,
                ssrc: 7,
                ..Default::default()
            },
            payload: Bytes::from(vec![seq as u8; 3]),
        }
    }

    fn seqs(out: &[Packet]) -> Vec<Option<u16>> {
        out.iter()
            .map(|p| match p {
                Packet::Rtp(r) => Some(r.header.sequence_number),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_bundle_opens_into_its_packets_in_order() {
        let bundle = FrameBundle {
            packets: vec![rtp(1), rtp(2), rtp(3)],
        };
        let mut out = Vec::new();
        unbundle(Packet::Rtcp(vec![Box::new(bundle)]), |p| out.push(p));
        assert_eq!(seqs(&out), vec![Some(1), Some(2), Some(3)]);
        match &out[2] {
            Packet::Rtp(r) => assert_eq!(r.payload, Bytes::from(vec![3u8; 3])),
            _ => unreachable!(),
        }
    }

    #[test]
    fn real_rtcp_beside_a_bundle_is_kept_after_its_packets() {
        let sr = SenderReport {
            ssrc: 7,
            ..Default::default()
        };
        let list: Vec<Box<dyn rtc::rtcp::Packet>> = vec![
            Box::new(sr.clone()),
            Box::new(FrameBundle {
                packets: vec![rtp(9)],
            }),
        ];
        let mut out = Vec::new();
        unbundle(Packet::Rtcp(list), |p| out.push(p));
        assert_eq!(seqs(&out), vec![Some(9), None]);
        match &out[1] {
            Packet::Rtcp(l) => {
                assert_eq!(l.len(), 1);
                assert_eq!(l[0].as_any().downcast_ref::<SenderReport>(), Some(&sr));
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn rtcp_without_a_bundle_and_rtp_pass_unchanged() {
        let mut out = Vec::new();
        unbundle(Packet::Rtcp(vec![Box::new(SenderReport::default())]), |p| {
            out.push(p)
        });
        unbundle(Packet::Rtp(rtp(4)), |p| out.push(p));
        assert_eq!(seqs(&out), vec![None, Some(4)]);
    }

    #[test]
    fn a_bundle_that_escapes_the_tap_cannot_be_marshalled() {
        // Guards the failure mode: a frame sent as garbage RTCP rather than dropped.
        let b = FrameBundle {
            packets: vec![rtp(1)],
        };
        assert!(b.marshal().is_err());
        assert_eq!(rtc::rtcp::Packet::raw_size(&b), 0);
    }
}
