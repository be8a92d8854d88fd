//! The fixed-layout header that starts every video frame's unidirectional stream.
//!
//! The layout is fixed (no varints) so that a relay can read exactly [`FrameHeader::LEN`] bytes,
//! learn the session and payload length, and forward header and payload byte for byte.

use thiserror::Error;

/// First byte of every frame header.
pub const FRAME_MAGIC: u8 = 0x4e; // 'N'
/// Second byte: the header layout version.
pub const FRAME_VERSION: u8 = 1;
/// Flag bit: the payload starts with an IDR (decoders can join here).
pub const FLAG_KEYFRAME: u8 = 0x01;

/// Header of one encoded video frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameHeader {
    /// The session the frame belongs to (same id on node and client legs).
    pub session_id: u64,
    /// Frame counter of the producing node, starting at 0 per `Open`.
    pub seq: u64,
    /// Capture time on the node, microseconds since the Unix epoch.
    pub capture_ts_us: u64,
    /// Time the node spent from capture to encoded payload, in microseconds.
    pub encode_us: u32,
    /// Whether the payload starts with an IDR frame.
    pub keyframe: bool,
    /// Highest input datagram `seq` applied before capture (input-to-photon latency).
    pub input_seq: u64,
    /// Coded width in pixels.
    pub width: u16,
    /// Coded height in pixels.
    pub height: u16,
    /// Length of the H.264 Annex B payload that follows the header.
    pub payload_len: u32,
}

/// Why a frame header was rejected. Always the sender's fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameHeaderError {
    /// Fewer than [`FrameHeader::LEN`] bytes.
    #[error("frame header needs {needed} bytes, got {got}")]
    Short {
        /// [`FrameHeader::LEN`].
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// The first byte is not [`FRAME_MAGIC`]: the stream is not a Nearpath video frame.
    #[error("bad frame magic 0x{0:02x}")]
    BadMagic(u8),
    /// A header layout this build does not know.
    #[error("unsupported frame header version {0}")]
    UnsupportedVersion(u8),
    /// Unknown flag bits or a non-zero reserved byte.
    #[error("reserved frame header bits set: flags 0x{flags:02x}, reserved 0x{reserved:02x}")]
    ReservedBits {
        /// The flags byte.
        flags: u8,
        /// The reserved byte.
        reserved: u8,
    },
}

impl FrameHeader {
    /// Encoded size in bytes.
    pub const LEN: usize = 48;

    /// Encodes the header (little-endian integers at fixed offsets; see PROTOCOL.md).
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0] = FRAME_MAGIC;
        out[1] = FRAME_VERSION;
        out[2] = if self.keyframe { FLAG_KEYFRAME } else { 0 };
        out[3] = 0;
        out[4..12].copy_from_slice(&self.session_id.to_le_bytes());
        out[12..20].copy_from_slice(&self.seq.to_le_bytes());
        out[20..28].copy_from_slice(&self.capture_ts_us.to_le_bytes());
        out[28..36].copy_from_slice(&self.input_seq.to_le_bytes());
        out[36..40].copy_from_slice(&self.encode_us.to_le_bytes());
        out[40..44].copy_from_slice(&self.payload_len.to_le_bytes());
        out[44..46].copy_from_slice(&self.width.to_le_bytes());
        out[46..48].copy_from_slice(&self.height.to_le_bytes());
        out
    }

    /// Decodes a header from the first [`FrameHeader::LEN`] bytes of `buf`; later bytes are
    /// ignored (they are the payload).
    pub fn decode(buf: &[u8]) -> Result<FrameHeader, FrameHeaderError> {
        let b: &[u8; Self::LEN] = buf.get(..Self::LEN).and_then(|s| s.try_into().ok()).ok_or(
            FrameHeaderError::Short {
                needed: Self::LEN,
                got: buf.len(),
            },
        )?;
        if b[0] != FRAME_MAGIC {
            return Err(FrameHeaderError::BadMagic(b[0]));
        }
        if b[1] != FRAME_VERSION {
            return Err(FrameHeaderError::UnsupportedVersion(b[1]));
        }
        if b[2] & !FLAG_KEYFRAME != 0 || b[3] != 0 {
            return Err(FrameHeaderError::ReservedBits {
                flags: b[2],
                reserved: b[3],
            });
        }
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                b[i],
                b[i + 1],
                b[i + 2],
                b[i + 3],
                b[i + 4],
                b[i + 5],
                b[i + 6],
                b[i + 7],
            ])
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(FrameHeader {
            session_id: u64_at(4),
            seq: u64_at(12),
            capture_ts_us: u64_at(20),
            input_seq: u64_at(28),
            encode_us: u32_at(36),
            payload_len: u32_at(40),
            width: u16_at(44),
            height: u16_at(46),
            keyframe: b[2] & FLAG_KEYFRAME != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_land_at_documented_offsets() {
        let h = FrameHeader {
            session_id: 0x0102_0304_0506_0708,
            seq: 9,
            capture_ts_us: 10,
            encode_us: 11,
            keyframe: true,
            input_seq: 12,
            width: 1280,
            height: 720,
            payload_len: 20_000,
        };
        let b = h.encode();
        assert_eq!(&b[..4], &[FRAME_MAGIC, FRAME_VERSION, FLAG_KEYFRAME, 0]);
        assert_eq!(&b[4..12], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(b[12], 9);
        assert_eq!(b[20], 10);
        assert_eq!(b[28], 12);
        assert_eq!(b[36], 11);
        assert_eq!(&b[40..44], &20_000u32.to_le_bytes());
        assert_eq!(&b[44..46], &1280u16.to_le_bytes());
        assert_eq!(&b[46..48], &720u16.to_le_bytes());
        assert_eq!(FrameHeader::decode(&b), Ok(h));
    }

    #[test]
    fn header_rejects_short_magic_version_and_reserved() {
        let good = FrameHeader::default().encode();
        assert_eq!(
            FrameHeader::decode(&good[..47]),
            Err(FrameHeaderError::Short {
                needed: 48,
                got: 47
            })
        );
        let mut b = good;
        b[0] = 0;
        assert_eq!(FrameHeader::decode(&b), Err(FrameHeaderError::BadMagic(0)));
        let mut b = good;
        b[1] = 2;
        assert_eq!(
            FrameHeader::decode(&b),
            Err(FrameHeaderError::UnsupportedVersion(2))
        );
        let mut b = good;
        b[2] = 0x82;
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameHeaderError::ReservedBits { flags: 0x82, .. })
        ));
        let mut b = good;
        b[3] = 1;
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameHeaderError::ReservedBits { reserved: 1, .. })
        ));
    }
}
