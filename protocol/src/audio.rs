//! Audio packets sent as QUIC datagrams (node -> gateway -> native client).
//!
//! One datagram carries one Opus packet (10 ms at 48 kHz by default) with the session it belongs
//! to, a per-session sequence number and its capture time on the same clock as video frames'
//! `capture_ts_us`, so a player can line audio up with video. The layout is fixed and
//! big-endian, so the gateway checks the session id and forwards the datagram unchanged.
//!
//! Datagrams rather than a stream: a lost 10 ms packet is hidden by Opus' in-band FEC or the
//! decoder's packet-loss concealment, while a stream would hold every later packet back until
//! the lost one is retransmitted (head-of-line blocking), which a player hears as a gap anyway
//! and then as added latency. Packets are far below the datagram size a path allows.

use thiserror::Error;

/// First byte of every audio datagram.
pub const AUDIO_MAGIC: u8 = 0x41; // 'A'
/// Second byte: the datagram layout version.
pub const AUDIO_VERSION: u8 = 1;
/// Flags bit 0: the Opus packet was encoded with in-band FEC on (it may carry a low-bitrate copy
/// of the previous packet, which a decoder can use when that one was lost).
pub const AUDIO_FLAG_FEC: u8 = 0x01;
/// Flags this version defines; any other bit set is a decode error.
pub const AUDIO_FLAGS_KNOWN: u8 = AUDIO_FLAG_FEC;
/// Sample rate of every audio packet (Opus' native rate).
pub const AUDIO_SAMPLE_RATE: u32 = 48_000;
/// Channels of every audio packet (stereo).
pub const AUDIO_CHANNELS: u8 = 2;
/// Samples per channel of one 10 ms packet at 48 kHz.
pub const SAMPLES_10MS: u16 = 480;
/// Largest Opus packet a datagram may carry.
pub const MAX_OPUS_PACKET: usize = 1000;

/// One audio datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioPacket {
    /// The play session (as in `PlayStarted`).
    pub session_id: u64,
    /// Per-session counter assigned by the node, wrapping at `u32::MAX`; a gap is a lost packet.
    pub seq: u32,
    /// When the packet's first sample was captured, microseconds since the Unix epoch (the clock
    /// of video frames' `capture_ts_us`).
    pub capture_ts_us: u64,
    /// Samples per channel the packet decodes to (480 for 10 ms).
    pub samples: u16,
    /// Flags ([`AUDIO_FLAG_FEC`]).
    pub flags: u8,
    /// The Opus packet (1..=[`MAX_OPUS_PACKET`] bytes).
    pub opus: bytes::Bytes,
}

/// Why an audio datagram was rejected. Always the sender's fault; the receiver drops it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AudioError {
    /// Too short for the fixed header.
    #[error("audio datagram of {got} bytes is shorter than the {needed}-byte header")]
    Short {
        /// Header length.
        needed: usize,
        /// Bytes received.
        got: usize,
    },
    /// The first byte is not [`AUDIO_MAGIC`].
    #[error("bad audio datagram magic 0x{0:02x}")]
    BadMagic(u8),
    /// A layout this build does not know.
    #[error("unsupported audio datagram version {0}")]
    UnsupportedVersion(u8),
    /// A flag bit this version does not define.
    #[error("unknown audio flags 0x{0:02x}")]
    UnknownFlags(u8),
    /// A sample count that is not an Opus frame duration at 48 kHz (2.5 to 60 ms).
    #[error("{0} samples per channel is not an Opus frame size at 48 kHz")]
    BadSampleCount(u16),
    /// No Opus packet after the header.
    #[error("audio datagram without an Opus packet")]
    Empty,
    /// An Opus packet over [`MAX_OPUS_PACKET`] bytes.
    #[error("Opus packet of {0} bytes is larger than the {MAX_OPUS_PACKET}-byte limit")]
    TooLarge(usize),
}

/// Samples per channel of the Opus frame durations at 48 kHz (2.5, 5, 10, 20, 40, 60 ms).
const OPUS_FRAME_SIZES: [u16; 6] = [120, 240, 480, 960, 1920, 2880];

impl AudioPacket {
    /// Bytes before the Opus packet.
    pub const HEADER_LEN: usize = 25;
    /// Longest encoding.
    pub const MAX_LEN: usize = Self::HEADER_LEN + MAX_OPUS_PACKET;

    /// Whether `buf` starts like an audio datagram (its magic byte), to tell it from other
    /// datagrams on the same connection before decoding.
    pub fn is_audio(buf: &[u8]) -> bool {
        buf.first() == Some(&AUDIO_MAGIC)
    }

    /// Checks the fields an encoder controls, so a sender never emits what receivers refuse.
    pub fn validate(&self) -> Result<(), AudioError> {
        if self.flags & !AUDIO_FLAGS_KNOWN != 0 {
            return Err(AudioError::UnknownFlags(self.flags));
        }
        if !OPUS_FRAME_SIZES.contains(&self.samples) {
            return Err(AudioError::BadSampleCount(self.samples));
        }
        match self.opus.len() {
            0 => Err(AudioError::Empty),
            n if n > MAX_OPUS_PACKET => Err(AudioError::TooLarge(n)),
            _ => Ok(()),
        }
    }

    /// Encodes into a new buffer of at most [`AudioPacket::MAX_LEN`] bytes.
    pub fn encode(&self) -> Result<Vec<u8>, AudioError> {
        self.validate()?;
        let mut out = Vec::with_capacity(Self::HEADER_LEN + self.opus.len());
        out.push(AUDIO_MAGIC);
        out.push(AUDIO_VERSION);
        out.push(self.flags);
        out.extend_from_slice(&self.session_id.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.capture_ts_us.to_be_bytes());
        out.extend_from_slice(&self.samples.to_be_bytes());
        out.extend_from_slice(&self.opus);
        Ok(out)
    }

    /// Reads just the session id after checking the whole datagram, for a relay that forwards
    /// it unchanged.
    pub fn peek_session_id(buf: &[u8]) -> Result<u64, AudioError> {
        Self::check_header(buf).map(|h| h.0)
    }

    /// Checks everything but copies nothing: (session id, seq, capture time, samples, flags).
    fn check_header(buf: &[u8]) -> Result<(u64, u32, u64, u16, u8), AudioError> {
        let h: &[u8; Self::HEADER_LEN] = buf
            .get(..Self::HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(AudioError::Short {
                needed: Self::HEADER_LEN,
                got: buf.len(),
            })?;
        if h[0] != AUDIO_MAGIC {
            return Err(AudioError::BadMagic(h[0]));
        }
        if h[1] != AUDIO_VERSION {
            return Err(AudioError::UnsupportedVersion(h[1]));
        }
        let flags = h[2];
        if flags & !AUDIO_FLAGS_KNOWN != 0 {
            return Err(AudioError::UnknownFlags(flags));
        }
        let mut u64b = [0u8; 8];
        u64b.copy_from_slice(&h[3..11]);
        let session_id = u64::from_be_bytes(u64b);
        let seq = u32::from_be_bytes([h[11], h[12], h[13], h[14]]);
        u64b.copy_from_slice(&h[15..23]);
        let capture_ts_us = u64::from_be_bytes(u64b);
        let samples = u16::from_be_bytes([h[23], h[24]]);
        if !OPUS_FRAME_SIZES.contains(&samples) {
            return Err(AudioError::BadSampleCount(samples));
        }
        match buf.len() - Self::HEADER_LEN {
            0 => return Err(AudioError::Empty),
            n if n > MAX_OPUS_PACKET => return Err(AudioError::TooLarge(n)),
            _ => {}
        }
        Ok((session_id, seq, capture_ts_us, samples, flags))
    }

    /// Decodes a datagram (the Opus packet shares `buf`'s memory).
    pub fn decode(buf: &bytes::Bytes) -> Result<AudioPacket, AudioError> {
        let (session_id, seq, capture_ts_us, samples, flags) = Self::check_header(buf)?;
        Ok(AudioPacket {
            session_id,
            seq,
            capture_ts_us,
            samples,
            flags,
            opus: buf.slice(Self::HEADER_LEN..),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn packet() -> AudioPacket {
        AudioPacket {
            session_id: 0x0102_0304_0506_0708,
            seq: u32::MAX,
            capture_ts_us: 1_700_000_000_000_000,
            samples: SAMPLES_10MS,
            flags: AUDIO_FLAG_FEC,
            opus: Bytes::from_static(&[0xfc, 0xff, 0xfe]),
        }
    }

    #[test]
    fn round_trips_big_endian_with_the_documented_offsets() {
        let p = packet();
        let bytes = p.encode().unwrap();
        assert_eq!(bytes.len(), AudioPacket::HEADER_LEN + 3);
        assert_eq!(&bytes[..3], &[0x41, 1, 1]);
        assert_eq!(&bytes[3..11], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&bytes[11..15], &[0xff; 4]);
        assert_eq!(&bytes[23..25], &[0x01, 0xe0]);
        let decoded = AudioPacket::decode(&Bytes::from(bytes.clone())).unwrap();
        assert_eq!(decoded, p);
        assert_eq!(
            AudioPacket::peek_session_id(&bytes),
            Ok(0x0102_0304_0506_0708)
        );
        assert!(AudioPacket::is_audio(&bytes));
    }

    #[test]
    fn every_truncation_of_the_header_is_rejected() {
        // The Opus packet runs to the datagram's end (a datagram is never split), so only a
        // cut into the header, or one leaving no payload, is detectable.
        let bytes = packet().encode().unwrap();
        for cut in 0..=AudioPacket::HEADER_LEN {
            let r = AudioPacket::decode(&Bytes::copy_from_slice(&bytes[..cut]));
            assert!(r.is_err(), "cut at {cut} decoded: {r:?}");
        }
    }

    #[test]
    fn rejects_bad_magic_version_flags_and_sample_counts() {
        let good = packet().encode().unwrap();
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            AudioPacket::decode(&Bytes::from(b))
        };
        assert_eq!(with(0, 0x49), Err(AudioError::BadMagic(0x49)));
        assert_eq!(with(1, 2), Err(AudioError::UnsupportedVersion(2)));
        assert_eq!(with(2, 0x80), Err(AudioError::UnknownFlags(0x80)));
        assert_eq!(with(24, 0), Err(AudioError::BadSampleCount(0x100)));
        let mut b = good.clone();
        b[23] = 0xff;
        b[24] = 0xff;
        assert_eq!(
            AudioPacket::decode(&Bytes::from(b)),
            Err(AudioError::BadSampleCount(u16::MAX))
        );
    }

    #[test]
    fn rejects_huge_and_empty_opus_packets_both_ways() {
        let mut p = packet();
        p.opus = Bytes::from(vec![0u8; MAX_OPUS_PACKET]);
        let max = p.encode().unwrap();
        assert_eq!(max.len(), AudioPacket::MAX_LEN);
        assert!(AudioPacket::decode(&Bytes::from(max.clone())).is_ok());
        let mut over = max;
        over.push(0);
        assert_eq!(
            AudioPacket::decode(&Bytes::from(over)),
            Err(AudioError::TooLarge(MAX_OPUS_PACKET + 1))
        );
        // A hostile 64 KiB datagram is refused without copying it.
        let mut huge = packet().encode().unwrap();
        huge.resize(65_535, 0xaa);
        assert!(matches!(
            AudioPacket::decode(&Bytes::from(huge)),
            Err(AudioError::TooLarge(_))
        ));
        p.opus = Bytes::from(vec![0u8; MAX_OPUS_PACKET + 1]);
        assert_eq!(p.encode(), Err(AudioError::TooLarge(MAX_OPUS_PACKET + 1)));
        p.opus = Bytes::new();
        assert_eq!(p.encode(), Err(AudioError::Empty));
        let header_only = &packet().encode().unwrap()[..AudioPacket::HEADER_LEN];
        assert_eq!(
            AudioPacket::decode(&Bytes::copy_from_slice(header_only)),
            Err(AudioError::Empty)
        );
    }

    #[test]
    fn input_datagrams_are_not_audio() {
        let input = crate::InputDatagram {
            session_id: 1,
            seq: 1,
            sent_ts_us: 1,
            event: crate::InputEvent::Ping { id: 1 },
        }
        .encode();
        assert!(!AudioPacket::is_audio(&input));
        assert!(AudioPacket::decode(&Bytes::from(input)).is_err());
    }
}
