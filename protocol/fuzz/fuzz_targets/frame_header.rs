//! The 48-byte header that starts every video frame stream, read by the gateway from nodes and by
//! clients from the gateway.
//!
//! Asserts: a header that decodes re-encodes to the same 48 bytes; the decoder reports the first
//! rule an input breaks, in the documented order (length, magic, version, reserved bits); and
//! every header value encodes to bytes that decode to it again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nearpath_protocol::frame::{FLAG_KEYFRAME, FRAME_MAGIC, FRAME_VERSION};
use nearpath_protocol::{FrameHeader, FrameHeaderError};

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let decoded = FrameHeader::decode(data);
    let expected_err = if data.len() < FrameHeader::LEN {
        Some(FrameHeaderError::Short {
            needed: FrameHeader::LEN,
            got: data.len(),
        })
    } else if data[0] != FRAME_MAGIC {
        Some(FrameHeaderError::BadMagic(data[0]))
    } else if data[1] != FRAME_VERSION {
        Some(FrameHeaderError::UnsupportedVersion(data[1]))
    } else if data[2] & !FLAG_KEYFRAME != 0 || data[3] != 0 {
        Some(FrameHeaderError::ReservedBits {
            flags: data[2],
            reserved: data[3],
        })
    } else {
        None
    };
    match (&decoded, expected_err) {
        (Ok(header), None) => {
            assert_eq!(&header.encode()[..], &data[..FrameHeader::LEN]);
            assert_eq!(header.keyframe, data[2] == FLAG_KEYFRAME);
        }
        (Err(got), Some(want)) => assert_eq!(*got, want),
        (got, want) => panic!("decode gave {got:?}, expected error {want:?}"),
    }

    // Any header value round-trips, whatever the fields hold.
    if data.len() >= 41 {
        let header = FrameHeader {
            session_id: u64_at(data, 0),
            seq: u64_at(data, 8),
            capture_ts_us: u64_at(data, 16),
            input_seq: u64_at(data, 24),
            encode_us: u32::from_le_bytes(data[32..36].try_into().unwrap()),
            payload_len: u32::from_le_bytes(data[36..40].try_into().unwrap()),
            width: u16::from(data[40]) << 8 | u16::from(data[0]),
            height: u16::from(data[40]) | u16::from(data[1]) << 8,
            keyframe: data[40] & 1 == 1,
        };
        assert_eq!(FrameHeader::decode(&header.encode()), Ok(header));
    }
});
