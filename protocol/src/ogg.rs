//! A small Ogg Opus writer (RFC 3533 pages, RFC 7845 encapsulation) for what a native player
//! receives: `nearpath play --audio-out FILE`.
//!
//! Packets are written in capture-time order, one Opus packet per page. Packets arrive as
//! datagrams, so some are lost or late: a late or duplicate packet (capture time not after the
//! last one written) is dropped, and a gap in capture time is filled with empty Opus packets
//! (a TOC byte with no frame data), which a decoder conceals like lost packets, so the file keeps
//! the session's timing and its duration matches the session's.

use crate::audio::{AudioPacket, AUDIO_CHANNELS, AUDIO_SAMPLE_RATE};
use std::io::{self, Write};

/// Samples a decoder drops at the start: libopus' lookahead in the restricted low-delay mode
/// the node encodes with (2.5 ms at 48 kHz).
pub const PRE_SKIP: u16 = 120;
/// The longest gap filled with concealment packets (10 s); longer gaps are closed up.
const MAX_FILL_SAMPLES: u64 = 10 * AUDIO_SAMPLE_RATE as u64;
/// An empty 10 ms CELT fullband stereo Opus packet (TOC config 30, stereo, one frame of zero
/// bytes: the decoder treats it as lost and conceals it).
const EMPTY_10MS: [u8; 1] = [(30 << 3) | (1 << 2)];

/// Writes an Ogg Opus stream to `W`.
pub struct OggOpusWriter<W: Write> {
    out: W,
    serial: u32,
    page_seq: u32,
    /// Samples (48 kHz) of every packet written so far, pre-skip included.
    granule: u64,
    /// The newest packet, held back so that the last page can carry the end-of-stream flag.
    held: Option<(Vec<u8>, u64)>,
    /// Capture time of the end of the last packet accepted, Unix microseconds.
    next_ts_us: Option<u64>,
    /// Packets dropped as late or duplicate.
    pub late: u64,
    /// Concealment packets inserted for gaps.
    pub filled: u64,
    /// Packets written.
    pub packets: u64,
}

impl<W: Write> OggOpusWriter<W> {
    /// Starts the stream: writes the `OpusHead` and `OpusTags` pages.
    pub fn new(out: W, serial: u32) -> io::Result<Self> {
        let mut w = Self {
            out,
            serial,
            page_seq: 0,
            granule: 0,
            held: None,
            next_ts_us: None,
            late: 0,
            filled: 0,
            packets: 0,
        };
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1); // version
        head.push(AUDIO_CHANNELS);
        head.extend_from_slice(&PRE_SKIP.to_le_bytes());
        head.extend_from_slice(&AUDIO_SAMPLE_RATE.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // channel mapping family 0: mono or stereo
        w.page(&head, 0, 0x02)?;
        let vendor = concat!("nearpath ", env!("CARGO_PKG_VERSION"));
        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor.as_bytes());
        tags.extend_from_slice(&0u32.to_le_bytes()); // no user comments
        w.page(&tags, 0, 0)?;
        Ok(w)
    }

    /// Adds a received packet (see the module's rules for late packets and gaps).
    pub fn push(&mut self, p: &AudioPacket) -> io::Result<()> {
        let dur_us = u64::from(p.samples) * 1_000_000 / u64::from(AUDIO_SAMPLE_RATE);
        if let Some(next) = self.next_ts_us {
            // Half a packet of tolerance for capture-time jitter (external sources stamp on
            // arrival).
            if p.capture_ts_us + dur_us / 2 < next {
                self.late += 1;
                return Ok(());
            }
            let gap_samples =
                p.capture_ts_us.saturating_sub(next) * u64::from(AUDIO_SAMPLE_RATE) / 1_000_000;
            let fill = gap_samples.min(MAX_FILL_SAMPLES) / 480;
            for _ in 0..fill {
                self.write_packet(EMPTY_10MS.to_vec(), 480)?;
                self.filled += 1;
            }
        }
        self.next_ts_us = Some(p.capture_ts_us + dur_us);
        self.packets += 1;
        self.write_packet(p.opus.to_vec(), u64::from(p.samples))
    }

    fn write_packet(&mut self, data: Vec<u8>, samples: u64) -> io::Result<()> {
        if let Some((held, granule)) = self.held.take() {
            self.page(&held, granule, 0)?;
        }
        self.granule += samples;
        self.held = Some((data, self.granule));
        Ok(())
    }

    /// Writes the last page (end of stream) and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        match self.held.take() {
            Some((held, granule)) => self.page(&held, granule, 0x04)?,
            // No audio at all: an empty end-of-stream page after the headers.
            None => self.page(&[], PRE_SKIP.into(), 0x04)?,
        }
        self.out.flush()?;
        Ok(self.out)
    }

    /// Seconds of audio written so far (after the pre-skip).
    pub fn duration_s(&self) -> f64 {
        self.granule.saturating_sub(PRE_SKIP.into()) as f64 / f64::from(AUDIO_SAMPLE_RATE)
    }

    /// One page holding one whole packet.
    fn page(&mut self, packet: &[u8], granule: u64, flags: u8) -> io::Result<()> {
        let mut lacing = vec![255u8; packet.len() / 255];
        lacing.push((packet.len() % 255) as u8);
        let mut page = Vec::with_capacity(27 + lacing.len() + packet.len());
        page.extend_from_slice(b"OggS");
        page.push(0); // version
        page.push(flags);
        page.extend_from_slice(&granule.to_le_bytes());
        page.extend_from_slice(&self.serial.to_le_bytes());
        page.extend_from_slice(&self.page_seq.to_le_bytes());
        page.extend_from_slice(&[0; 4]); // CRC, filled below
        page.push(lacing.len() as u8);
        page.extend_from_slice(&lacing);
        page.extend_from_slice(packet);
        let crc = crc32(&page);
        page[22..26].copy_from_slice(&crc.to_le_bytes());
        self.page_seq += 1;
        self.out.write_all(&page)
    }
}

/// Ogg's CRC-32: polynomial 0x04c11db7, initial value 0, no reflection, no final xor.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0u32;
    for &b in data {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn packet(ts: u64, len: usize) -> AudioPacket {
        AudioPacket {
            session_id: 1,
            seq: 0,
            capture_ts_us: ts,
            samples: 480,
            flags: 0,
            opus: Bytes::from(vec![0xf4; len]),
        }
    }

    /// Splits a stream into (flags, granule, seq, body) per page, checking each CRC.
    fn pages(mut b: &[u8]) -> Vec<(u8, u64, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(&b[..4], b"OggS");
            let n = b[26] as usize;
            let body: usize = b[27..27 + n].iter().map(|&x| x as usize).sum();
            let len = 27 + n + body;
            let mut page = b[..len].to_vec();
            let crc = u32::from_le_bytes(page[22..26].try_into().unwrap());
            page[22..26].copy_from_slice(&[0; 4]);
            assert_eq!(crc32(&page), crc, "page CRC");
            let granule = u64::from_le_bytes(b[6..14].try_into().unwrap());
            let seq = u32::from_le_bytes(b[18..22].try_into().unwrap());
            out.push((b[5], granule, seq, b[27 + n..len].to_vec()));
            b = &b[len..];
        }
        out
    }

    #[test]
    fn crc_matches_the_ogg_reference_value() {
        // CRC-32/CKSUM's check value is 0x765e7680 with its final xor; Ogg's has none.
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0x89a1_897f);
    }

    #[test]
    fn headers_granules_gaps_and_the_end_flag() {
        let mut w = OggOpusWriter::new(Vec::new(), 7).unwrap();
        w.push(&packet(1_000_000, 3)).unwrap();
        w.push(&packet(1_010_000, 300)).unwrap();
        // Late and duplicate packets are dropped.
        w.push(&packet(1_000_000, 3)).unwrap();
        // 30 ms gap: three concealment packets.
        w.push(&packet(1_050_000, 5)).unwrap();
        assert_eq!((w.packets, w.late, w.filled), (3, 1, 3));
        assert!((w.duration_s() - (6.0 * 0.01 - 0.0025)).abs() < 1e-9);
        let bytes = w.finish().unwrap();
        let p = pages(&bytes);
        assert_eq!(p.len(), 2 + 6);
        assert_eq!(p[0].0, 0x02);
        assert_eq!(&p[0].3[..8], b"OpusHead");
        assert_eq!(p[0].3[9], 2);
        assert_eq!(u16::from_le_bytes([p[0].3[10], p[0].3[11]]), PRE_SKIP);
        assert_eq!(&p[1].3[..8], b"OpusTags");
        let granules: Vec<u64> = p[2..].iter().map(|x| x.1).collect();
        assert_eq!(granules, [480, 960, 1440, 1920, 2400, 2880]);
        assert_eq!(p[3].3.len(), 300, "a 300-byte packet laced as 255 + 45");
        assert_eq!(p[4].3, EMPTY_10MS);
        assert_eq!(p.last().unwrap().0, 0x04, "end of stream on the last page");
        let seqs: Vec<u32> = p.iter().map(|x| x.2).collect();
        assert_eq!(seqs, (0..8).collect::<Vec<u32>>());
    }

    #[test]
    fn a_huge_gap_is_capped() {
        let mut w = OggOpusWriter::new(Vec::new(), 1).unwrap();
        w.push(&packet(0, 3)).unwrap();
        w.push(&packet(3_600_000_000, 3)).unwrap();
        assert_eq!(w.filled, 1000);
    }
}
