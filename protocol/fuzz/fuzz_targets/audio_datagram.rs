//! Audio datagrams: Opus packets an edge node (run by a stranger) sends the gateway, which checks
//! the session id and forwards them unchanged to the player (`AudioPacket::peek_session_id` on the
//! relay, `AudioPacket::decode` in the game service and the native client).
//!
//! Asserts, beyond "no panic":
//! - a datagram that decodes re-encodes to exactly its bytes (the Opus packet runs to the end,
//!   nothing is dropped or added) and is at most `MAX_LEN` bytes, starting with the magic byte;
//! - `peek_session_id` (the relay's check) agrees with `decode`, error for error;
//! - no datagram is both an audio and an input datagram (the two share a connection);
//! - any packet value that validates encodes to bytes that decode to it again, and one that does
//!   not validate is refused by the encoder with the decoder's error.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nearpath_protocol::{AudioPacket, InputDatagram};

fuzz_target!(|data: &[u8]| {
    let buf = Bytes::copy_from_slice(data);
    let decoded = AudioPacket::decode(&buf);
    if let Ok(p) = &decoded {
        assert_eq!(
            p.encode().as_deref(),
            Ok(data),
            "non-canonical audio datagram"
        );
        assert!(data.len() <= AudioPacket::MAX_LEN);
        assert!(AudioPacket::is_audio(data));
        assert!(
            InputDatagram::decode(data).is_err(),
            "a datagram decodes as both audio and input"
        );
    }
    assert_eq!(
        AudioPacket::peek_session_id(data),
        decoded.as_ref().map(|p| p.session_id).map_err(Clone::clone)
    );

    // Any packet value: fields from the input, the rest of it as the Opus packet.
    if data.len() >= 23 {
        let u64_at = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
        let value = AudioPacket {
            session_id: u64_at(0),
            seq: u32::from_le_bytes(data[8..12].try_into().unwrap()),
            capture_ts_us: u64_at(12),
            samples: u16::from_le_bytes([data[20], data[21]]),
            flags: data[22],
            opus: Bytes::copy_from_slice(&data[23..]),
        };
        match value.encode() {
            Ok(bytes) => {
                assert!(value.validate().is_ok());
                assert!(bytes.len() <= AudioPacket::MAX_LEN);
                assert_eq!(AudioPacket::decode(&Bytes::from(bytes)), Ok(value));
            }
            Err(e) => {
                assert_eq!(value.validate(), Err(e.clone()));
                // The decoder refuses the same bytes for the same reason.
                let mut raw = vec![nearpath_protocol::audio::AUDIO_MAGIC];
                raw.push(nearpath_protocol::audio::AUDIO_VERSION);
                raw.push(value.flags);
                raw.extend_from_slice(&value.session_id.to_be_bytes());
                raw.extend_from_slice(&value.seq.to_be_bytes());
                raw.extend_from_slice(&value.capture_ts_us.to_be_bytes());
                raw.extend_from_slice(&value.samples.to_be_bytes());
                raw.extend_from_slice(&value.opus);
                assert_eq!(AudioPacket::decode(&Bytes::from(raw)), Err(e));
            }
        }
    }
});
