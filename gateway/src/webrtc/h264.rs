//! H.264 RTP payloading (RFC 6184, packetization mode 1) for the video track: the same packets
//! as webrtc-rs's `H264Payloader`, made cheaper.
//!
//! The profile of a loaded gateway showed webrtc-rs's payloader as its largest user-space
//! symbol: it looks for start codes one byte at a time and allocates every FU-A fragment on its
//! own. This one finds start codes with `memchr` (the `0x01` of a start code, then the zeros
//! before it) and writes all fragments of a NAL unit into one buffer that the packets share.
//! Its output is byte for byte that of `H264Payloader` (a test compares them), including the
//! quirks: SPS and PPS are held back and sent as one STAP-A in front of the next NAL unit, AUD
//! and filler NAL units are dropped, and a buffer without a start code is one NAL unit.

use bytes::{BufMut, Bytes, BytesMut};
use rtc::rtp::packetizer::Payloader;

const NALU_TYPE_BITMASK: u8 = 0x1f;
const NALU_REF_IDC_BITMASK: u8 = 0x60;
const FUA_NALU_TYPE: u8 = 28;
const SPS_NALU_TYPE: u8 = 7;
const PPS_NALU_TYPE: u8 = 8;
const AUD_NALU_TYPE: u8 = 9;
const FILLER_NALU_TYPE: u8 = 12;
const FUA_HEADER_SIZE: usize = 2;
/// The STAP-A NAL header webrtc-rs writes (F 0, NRI 3, type 24).
const OUTPUT_STAP_AHEADER: u8 = 0x78;

/// The next start code at or after `from`: (its first byte, its length). Like webrtc-rs, the
/// start code is a `0x01` after at least two zeros, and every zero before the `0x01` (back to
/// `from`) belongs to it.
fn next_start_code(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut at = from;
    while let Some(i) = memchr::memchr(1, &buf[at..]) {
        let one = at + i;
        let zeros = buf[from..one].iter().rev().take_while(|&&b| b == 0).count();
        if zeros >= 2 {
            return Some((one - zeros, zeros + 1));
        }
        at = one + 1;
    }
    None
}

/// RFC 6184 payloader, packetization mode 1 (single NAL unit, STAP-A for parameter sets,
/// FU-A). Keeps the last SPS and PPS until the NAL unit they go out with.
#[derive(Debug, Default, Clone)]
pub(super) struct H264Payloader {
    sps: Option<Bytes>,
    pps: Option<Bytes>,
}

impl H264Payloader {
    fn emit(&mut self, nalu: Bytes, mtu: usize, out: &mut Vec<Bytes>) {
        let Some(&head) = nalu.first() else { return };
        let typ = head & NALU_TYPE_BITMASK;
        let ref_idc = head & NALU_REF_IDC_BITMASK;
        match typ {
            AUD_NALU_TYPE | FILLER_NALU_TYPE => return,
            SPS_NALU_TYPE => {
                self.sps = Some(nalu);
                return;
            }
            PPS_NALU_TYPE => {
                self.pps = Some(nalu);
                return;
            }
            _ => {}
        }
        // Only a pair goes out (and is then forgotten); a lone SPS or PPS waits for its twin.
        if let (Some(sps), Some(pps)) = (&self.sps, &self.pps) {
            let mut stap = BytesMut::with_capacity(1 + 2 + sps.len() + 2 + pps.len());
            stap.put_u8(OUTPUT_STAP_AHEADER);
            stap.put_u16(sps.len() as u16);
            stap.put_slice(sps);
            stap.put_u16(pps.len() as u16);
            stap.put_slice(pps);
            if stap.len() <= mtu {
                out.push(stap.freeze());
            }
            self.sps = None;
            self.pps = None;
        }
        if nalu.len() <= mtu {
            out.push(nalu);
            return;
        }
        // FU-A: the NAL header byte is not sent as such; its NRI and type travel in each
        // fragment's two header bytes.
        let max_fragment = mtu as isize - FUA_HEADER_SIZE as isize;
        let data = &nalu[1..];
        if max_fragment <= 0 || data.is_empty() {
            return;
        }
        let max_fragment = max_fragment as usize;
        let fragments = data.len().div_ceil(max_fragment);
        // One allocation for every fragment of the NAL unit; each packet is a view of it.
        let mut buf = BytesMut::with_capacity(data.len() + fragments * FUA_HEADER_SIZE);
        for (k, chunk) in data.chunks(max_fragment).enumerate() {
            let mut fu = typ;
            if k == 0 {
                fu |= 0x80;
            } else if k + 1 == fragments {
                fu |= 0x40;
            }
            buf.put_u8(FUA_NALU_TYPE | ref_idc);
            buf.put_u8(fu);
            buf.put_slice(chunk);
            out.push(buf.split().freeze());
        }
    }
}

impl Payloader for H264Payloader {
    fn payload(&mut self, mtu: usize, payload: &Bytes) -> rtc::shared::error::Result<Vec<Bytes>> {
        let mut out = Vec::new();
        if payload.is_empty() || mtu == 0 {
            return Ok(out);
        }
        let Some((mut start, mut len)) = next_start_code(payload, 0) else {
            self.emit(payload.clone(), mtu, &mut out);
            return Ok(out);
        };
        loop {
            let from = start + len;
            match next_start_code(payload, from) {
                Some((s, l)) => {
                    self.emit(payload.slice(from..s), mtu, &mut out);
                    (start, len) = (s, l);
                }
                None => {
                    self.emit(payload.slice(from..), mtu, &mut out);
                    return Ok(out);
                }
            }
        }
    }

    fn clone_to(&self) -> Box<dyn Payloader> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtp::codec::h264::H264Payloader as Reference;

    fn both(mine: &mut H264Payloader, theirs: &mut Reference, mtu: usize, buf: &[u8]) {
        let b = Bytes::copy_from_slice(buf);
        let a = mine.payload(mtu, &b).unwrap();
        let r = theirs.payload(mtu, &b).unwrap();
        assert_eq!(a, r, "mtu {mtu}, input {buf:02x?}");
    }

    /// Guards the browser path's packets: for access units shaped like the nodes' (start
    /// codes of 3 and 4 bytes, SPS and PPS before an IDR, AUDs, NAL units larger than the MTU)
    /// and for arbitrary bytes, the payloads are exactly webrtc-rs's.
    #[test]
    fn payloads_equal_webrtc_rs_for_access_units_and_arbitrary_bytes() {
        let mut x = 0x2545_f491u32;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let nal = |typ: u8, len: usize, fill: &mut dyn FnMut() -> u32| {
            let mut v = vec![0x60 | typ];
            v.extend((0..len).map(|_| (fill() % 255 + 1) as u8));
            v
        };
        let (mut mine, mut theirs) = (H264Payloader::default(), Reference::default());
        for mtu in [1, 2, 3, 100, 1200] {
            // AUD, SPS, PPS, IDR of 5000 bytes, then a P frame with a 3-byte start code.
            let mut au = vec![0, 0, 0, 1, 0x09, 0xf0];
            for (t, len) in [(7, 12), (8, 4), (5, 5000)] {
                au.extend([0, 0, 0, 1]);
                au.extend(nal(t, len, &mut rnd));
            }
            both(&mut mine, &mut theirs, mtu, &au);
            let mut p = vec![0, 0, 1];
            p.extend(nal(1, 2500, &mut rnd));
            both(&mut mine, &mut theirs, mtu, &p);
            // Exactly the MTU, and one byte over it.
            for extra in [0, 1] {
                let mut q = vec![0, 0, 0, 1];
                q.extend(nal(1, mtu.saturating_sub(1) + extra, &mut rnd));
                both(&mut mine, &mut theirs, mtu, &q);
            }
        }
        // Arbitrary bytes, biased towards zeros and ones so that start codes, runs of zeros
        // and trailing zeros occur; the parameter-set state carries across calls in both.
        for round in 0..3000 {
            let len = (rnd() % 300) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| match rnd() % 8 {
                    0..=2 => 0,
                    3 => 1,
                    4 => [7u8, 8, 9, 12, 5][(rnd() % 5) as usize],
                    _ => rnd() as u8,
                })
                .collect();
            let mtu = [1usize, 2, 3, 10, 50, 1200][round % 6];
            both(&mut mine, &mut theirs, mtu, &buf);
        }
    }

    #[test]
    fn start_codes_take_every_zero_before_the_one() {
        assert_eq!(next_start_code(&[0, 0, 1], 0), Some((0, 3)));
        assert_eq!(next_start_code(&[9, 0, 0, 0, 0, 1, 5], 0), Some((1, 5)));
        // Zeros before `from` are not counted.
        assert_eq!(next_start_code(&[0, 0, 0, 1], 2), None);
        assert_eq!(next_start_code(&[0, 1, 0, 0, 1], 0), Some((2, 3)));
        assert_eq!(next_start_code(&[1, 1, 0, 1], 0), None);
    }
}
