//! Input datagrams: unreliable QUIC datagrams from clients that the gateway relays to the node
//! serving the session after reading the session id.
//!
//! Asserts: a datagram of the current layout version that decodes re-encodes to exactly its
//! bytes (so the length matches the event and nothing trails), one of an older version that
//! decodes re-encodes to the same value; either is at most `MAX_LEN` bytes; `peek_session_id` agrees with `decode`;
//! and every datagram value encodes to bytes that decode to it again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nearpath_protocol::input::{INPUT_VERSION, MAX_PADS, STANDARD_BUTTONS};
use nearpath_protocol::{InputDatagram, InputEvent};

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

fn i16_at(b: &[u8], i: usize) -> i16 {
    i16::from_le_bytes([b[i], b[i + 1]])
}

fuzz_target!(|data: &[u8]| {
    let decoded = InputDatagram::decode(data);
    if let Ok(d) = &decoded {
        if data[1] == INPUT_VERSION {
            assert_eq!(d.encode(), data, "non-canonical datagram");
        } else {
            assert_eq!(InputDatagram::decode(&d.encode()).as_ref(), Ok(d));
        }
        assert!(data.len() <= InputDatagram::MAX_LEN);
    }
    assert_eq!(
        InputDatagram::peek_session_id(data),
        decoded.map(|d| d.session_id)
    );

    // Any datagram value round-trips, whatever the fields hold.
    if data.len() >= 42 {
        let event = match data[24] % 7 {
            0 => InputEvent::Key {
                code: u16::from_le_bytes([data[25], data[26]]),
                down: data[27] & 1 == 1,
            },
            1 => InputEvent::MouseMove {
                dx: i32::from_le_bytes(data[25..29].try_into().unwrap()),
                dy: i32::from_le_bytes(data[29..33].try_into().unwrap()),
            },
            2 => InputEvent::MouseButton {
                button: data[25],
                down: data[26] & 1 == 1,
            },
            3 => InputEvent::Wheel {
                dx: i16_at(data, 25),
                dy: i16_at(data, 27),
            },
            4 => InputEvent::Gamepad {
                pad: data[37] % MAX_PADS as u8,
                triggers: [
                    u16::from_le_bytes([data[38], data[39]]),
                    u16::from_le_bytes([data[40], data[41]]),
                ],
                axes: [
                    i16_at(data, 25),
                    i16_at(data, 27),
                    i16_at(data, 29),
                    i16_at(data, 31),
                ],
                buttons: u32::from_le_bytes(data[33..37].try_into().unwrap()) & STANDARD_BUTTONS,
            },
            5 => InputEvent::KeyframeRequest,
            _ => InputEvent::Ping {
                id: u32::from_le_bytes(data[25..29].try_into().unwrap()),
            },
        };
        let datagram = InputDatagram {
            session_id: u64_at(data, 0),
            seq: u64_at(data, 8),
            sent_ts_us: u64_at(data, 16),
            event,
        };
        let bytes = datagram.encode();
        assert!(bytes.len() <= InputDatagram::MAX_LEN);
        assert_eq!(InputDatagram::decode(&bytes), Ok(datagram));
    }
});
