//! Input events sent as QUIC datagrams (client -> gateway -> node).
//!
//! Datagrams are unreliable and unordered, so each carries its own sequence number and send
//! time; the node applies events in arrival order and reports the highest `seq` applied in every
//! frame header. The layout is fixed so the gateway can check the session id and forward the
//! datagram unchanged.
//!
//! Layout version 2 ([`INPUT_VERSION`]) carries the gamepad's index, its analog triggers and the
//! W3C Standard Gamepad's 17 buttons; receivers still accept version 1 (the gamepad event of
//! version 1 is pad 0 without analog triggers: each trigger reads full when its button bit is
//! set), and every other event is the same in both.

use thiserror::Error;

/// First byte of every input datagram.
pub const INPUT_MAGIC: u8 = 0x49; // 'I'
/// Second byte: the datagram layout version this build writes.
pub const INPUT_VERSION: u8 = 2;
/// The oldest layout version this build still reads.
pub const INPUT_VERSION_MIN: u8 = 1;
/// The buttons of the W3C Standard Gamepad layout, one bit each by their index: 0 A (bottom),
/// 1 B (right), 2 X (left), 3 Y (top), 4 left bumper, 5 right bumper, 6 left trigger, 7 right
/// trigger, 8 back/select, 9 start, 10 left stick press, 11 right stick press, 12 d-pad up, 13
/// down, 14 left, 15 right, 16 home. Analog buttons beyond the triggers count as pressed or not.
pub const STANDARD_BUTTONS: u32 = (1 << 17) - 1;
/// Bit of the left trigger in [`InputEvent::Gamepad`]'s `buttons`.
pub const BUTTON_LEFT_TRIGGER: u32 = 1 << 6;
/// Bit of the right trigger.
pub const BUTTON_RIGHT_TRIGGER: u32 = 1 << 7;

/// Gamepads one session may use (pad indices `0..MAX_PADS`).
pub const MAX_PADS: usize = 4;

/// One input event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEvent {
    /// Keyboard key (USB HID usage or platform key code, as the title expects).
    Key {
        /// Key code.
        code: u16,
        /// Pressed (true) or released.
        down: bool,
    },
    /// Relative mouse motion in pixels.
    MouseMove {
        /// Horizontal delta.
        dx: i32,
        /// Vertical delta.
        dy: i32,
    },
    /// Mouse button (0 left, 1 middle, 2 right, ...).
    MouseButton {
        /// Button index.
        button: u8,
        /// Pressed (true) or released.
        down: bool,
    },
    /// Scroll wheel in notches times 120 (the Windows convention).
    Wheel {
        /// Horizontal scroll.
        dx: i16,
        /// Vertical scroll.
        dy: i16,
    },
    /// One gamepad's full state: sticks, analog triggers and buttons.
    Gamepad {
        /// Which pad, `0..MAX_PADS` (a browser's pads in `navigator.getGamepads()` order).
        pad: u8,
        /// Stick axes: left x, left y, right x, right y (-32768..=32767; y grows downwards, as
        /// in the W3C Gamepad API).
        axes: [i16; 4],
        /// Left and right analog triggers, 0 (released) ..= 65535 (fully pressed).
        triggers: [u16; 2],
        /// The 17 buttons of the standard layout as bits ([`STANDARD_BUTTONS`]); higher bits
        /// are a decode error.
        buttons: u32,
    },
    /// Ask for an IDR frame (lossy shortcut for the reliable `ForceKeyframe`).
    KeyframeRequest,
    /// Liveness/RTT probe; a receiver that does not answer probes ignores it.
    Ping {
        /// Probe id.
        id: u32,
    },
}

impl InputEvent {
    fn tag(&self) -> u8 {
        match self {
            InputEvent::Key { .. } => 1,
            InputEvent::MouseMove { .. } => 2,
            InputEvent::MouseButton { .. } => 3,
            InputEvent::Wheel { .. } => 4,
            InputEvent::Gamepad { .. } => 5,
            InputEvent::KeyframeRequest => 6,
            InputEvent::Ping { .. } => 7,
        }
    }

    /// Payload length for an event tag, or `None` for an unknown tag.
    fn payload_len(tag: u8) -> Option<usize> {
        Some(match tag {
            1 => 3,
            2 => 8,
            3 => 2,
            4 => 4,
            5 => 17,
            6 => 0,
            7 => 4,
            _ => return None,
        })
    }
}

/// One input datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputDatagram {
    /// The play session (as in `PlayStarted`).
    pub session_id: u64,
    /// Per-session counter assigned by the client, starting at 1.
    pub seq: u64,
    /// Client send time, microseconds since the Unix epoch.
    pub sent_ts_us: u64,
    /// The event.
    pub event: InputEvent,
}

/// Why an input datagram was rejected. Always the sender's fault; the receiver drops it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InputError {
    /// Too short for the fixed header.
    #[error("input datagram of {got} bytes is shorter than the {needed}-byte header")]
    Short {
        /// Header length.
        needed: usize,
        /// Bytes received.
        got: usize,
    },
    /// The first byte is not [`INPUT_MAGIC`].
    #[error("bad input datagram magic 0x{0:02x}")]
    BadMagic(u8),
    /// A layout this build does not know.
    #[error("unsupported input datagram version {0}")]
    UnsupportedVersion(u8),
    /// An event tag this build does not know.
    #[error("unknown input event tag {0}")]
    UnknownEvent(u8),
    /// The payload length does not match the event tag.
    #[error("input event tag {tag} needs {expected} payload bytes, got {got}")]
    BadLength {
        /// The event tag.
        tag: u8,
        /// Required payload length.
        expected: usize,
        /// Actual payload length.
        got: usize,
    },
    /// A boolean byte other than 0 or 1.
    #[error("invalid boolean byte {0} in input event")]
    BadBool(u8),
    /// A gamepad index of [`MAX_PADS`] or more.
    #[error("gamepad {0} out of range (pads 0..{MAX_PADS})")]
    BadPad(u8),
    /// Gamepad button bits beyond the standard layout's 17.
    #[error("gamepad buttons 0x{0:x} set bits beyond the standard layout's 17")]
    BadButtons(u32),
}

impl InputDatagram {
    /// Bytes before the event payload.
    pub const HEADER_LEN: usize = 27;
    /// Longest encoding (a gamepad event).
    pub const MAX_LEN: usize = Self::HEADER_LEN + 17;

    /// Encodes into a new buffer of at most [`InputDatagram::MAX_LEN`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::MAX_LEN);
        out.push(INPUT_MAGIC);
        out.push(INPUT_VERSION);
        out.push(self.event.tag());
        out.extend_from_slice(&self.session_id.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.sent_ts_us.to_le_bytes());
        match self.event {
            InputEvent::Key { code, down } => {
                out.extend_from_slice(&code.to_le_bytes());
                out.push(u8::from(down));
            }
            InputEvent::MouseMove { dx, dy } => {
                out.extend_from_slice(&dx.to_le_bytes());
                out.extend_from_slice(&dy.to_le_bytes());
            }
            InputEvent::MouseButton { button, down } => {
                out.push(button);
                out.push(u8::from(down));
            }
            InputEvent::Wheel { dx, dy } => {
                out.extend_from_slice(&dx.to_le_bytes());
                out.extend_from_slice(&dy.to_le_bytes());
            }
            InputEvent::Gamepad {
                pad,
                axes,
                triggers,
                buttons,
            } => {
                out.push(pad);
                for axis in axes {
                    out.extend_from_slice(&axis.to_le_bytes());
                }
                for trigger in triggers {
                    out.extend_from_slice(&trigger.to_le_bytes());
                }
                out.extend_from_slice(&buttons.to_le_bytes());
            }
            InputEvent::KeyframeRequest => {}
            InputEvent::Ping { id } => out.extend_from_slice(&id.to_le_bytes()),
        }
        out
    }

    /// Reads just the session id, for a relay that forwards the datagram unchanged.
    pub fn peek_session_id(buf: &[u8]) -> Result<u64, InputError> {
        Self::decode(buf).map(|d| d.session_id)
    }

    /// Decodes a datagram; the length must match the event exactly.
    pub fn decode(buf: &[u8]) -> Result<InputDatagram, InputError> {
        let header: &[u8; Self::HEADER_LEN] = buf
            .get(..Self::HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(InputError::Short {
                needed: Self::HEADER_LEN,
                got: buf.len(),
            })?;
        if header[0] != INPUT_MAGIC {
            return Err(InputError::BadMagic(header[0]));
        }
        let version = header[1];
        if !(INPUT_VERSION_MIN..=INPUT_VERSION).contains(&version) {
            return Err(InputError::UnsupportedVersion(version));
        }
        let tag = header[2];
        let expected = match (version, tag) {
            // Version 1's gamepad: four axes and a button mask, no pad index, no triggers.
            (1, 5) => 12,
            _ => InputEvent::payload_len(tag).ok_or(InputError::UnknownEvent(tag))?,
        };
        let p = &buf[Self::HEADER_LEN..];
        if p.len() != expected {
            return Err(InputError::BadLength {
                tag,
                expected,
                got: p.len(),
            });
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&header[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let i16_at = |i: usize| i16::from_le_bytes([p[i], p[i + 1]]);
        let u16_at = |i: usize| u16::from_le_bytes([p[i], p[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let bool_at = |i: usize| match p[i] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(InputError::BadBool(other)),
        };
        // The length check above guarantees every index below is in bounds.
        let event = match tag {
            1 => InputEvent::Key {
                code: u16::from_le_bytes([p[0], p[1]]),
                down: bool_at(2)?,
            },
            2 => InputEvent::MouseMove {
                dx: u32_at(0) as i32,
                dy: u32_at(4) as i32,
            },
            3 => InputEvent::MouseButton {
                button: p[0],
                down: bool_at(1)?,
            },
            4 => InputEvent::Wheel {
                dx: i16_at(0),
                dy: i16_at(2),
            },
            5 if version == 1 => {
                let buttons = u32_at(8) & STANDARD_BUTTONS;
                let full = |bit: u32| if buttons & bit != 0 { u16::MAX } else { 0 };
                InputEvent::Gamepad {
                    pad: 0,
                    axes: [i16_at(0), i16_at(2), i16_at(4), i16_at(6)],
                    triggers: [full(BUTTON_LEFT_TRIGGER), full(BUTTON_RIGHT_TRIGGER)],
                    buttons,
                }
            }
            5 => {
                let pad = p[0];
                if usize::from(pad) >= MAX_PADS {
                    return Err(InputError::BadPad(pad));
                }
                let buttons = u32_at(13);
                if buttons & !STANDARD_BUTTONS != 0 {
                    return Err(InputError::BadButtons(buttons));
                }
                InputEvent::Gamepad {
                    pad,
                    axes: [i16_at(1), i16_at(3), i16_at(5), i16_at(7)],
                    triggers: [u16_at(9), u16_at(11)],
                    buttons,
                }
            }
            6 => InputEvent::KeyframeRequest,
            7 => InputEvent::Ping { id: u32_at(0) },
            other => return Err(InputError::UnknownEvent(other)),
        };
        Ok(InputDatagram {
            session_id: u64_at(3),
            seq: u64_at(11),
            sent_ts_us: u64_at(19),
            event,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips_within_64_bytes() {
        let events = [
            InputEvent::Key {
                code: 0x04,
                down: true,
            },
            InputEvent::MouseMove { dx: -5, dy: 70_000 },
            InputEvent::MouseButton {
                button: 2,
                down: false,
            },
            InputEvent::Wheel { dx: 0, dy: -120 },
            InputEvent::Gamepad {
                pad: 3,
                axes: [i16::MIN, -1, 1, i16::MAX],
                triggers: [0, u16::MAX],
                buttons: STANDARD_BUTTONS,
            },
            InputEvent::KeyframeRequest,
            InputEvent::Ping { id: 77 },
        ];
        for event in events {
            let d = InputDatagram {
                session_id: u64::MAX,
                seq: 3,
                sent_ts_us: 1_700_000_000_000_000,
                event,
            };
            let bytes = d.encode();
            assert!(
                bytes.len() < 64,
                "{event:?} encodes to {} bytes",
                bytes.len()
            );
            assert!(bytes.len() <= InputDatagram::MAX_LEN);
            assert_eq!(InputDatagram::decode(&bytes), Ok(d));
            // Every strict prefix and any extra byte are rejected.
            for cut in 0..bytes.len() {
                assert!(
                    InputDatagram::decode(&bytes[..cut]).is_err(),
                    "{event:?} cut {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(InputDatagram::decode(&longer).is_err());
        }
    }

    #[test]
    fn rejects_bad_magic_version_tag_and_bool() {
        let good = InputDatagram {
            session_id: 1,
            seq: 1,
            sent_ts_us: 1,
            event: InputEvent::Key {
                code: 1,
                down: true,
            },
        }
        .encode();
        let mut b = good.clone();
        b[0] = 0;
        assert_eq!(InputDatagram::decode(&b), Err(InputError::BadMagic(0)));
        let mut b = good.clone();
        b[1] = 9;
        assert_eq!(
            InputDatagram::decode(&b),
            Err(InputError::UnsupportedVersion(9))
        );
        let mut b = good.clone();
        b[2] = 200;
        assert_eq!(
            InputDatagram::decode(&b),
            Err(InputError::UnknownEvent(200))
        );
        let mut b = good;
        let last = b.len() - 1;
        b[last] = 2;
        assert_eq!(InputDatagram::decode(&b), Err(InputError::BadBool(2)));
    }

    fn pad(pad: u8, triggers: [u16; 2], buttons: u32) -> Vec<u8> {
        InputDatagram {
            session_id: 9,
            seq: 1,
            sent_ts_us: 1,
            event: InputEvent::Gamepad {
                pad,
                axes: [1, 2, 3, 4],
                triggers,
                buttons,
            },
        }
        .encode()
    }

    #[test]
    fn hostile_gamepads_are_rejected() {
        // Pads 0..=3 only.
        assert!(InputDatagram::decode(&pad(3, [0, 0], 0)).is_ok());
        for bad in [4, 7, 255] {
            assert_eq!(
                InputDatagram::decode(&pad(bad, [0, 0], 0)),
                Err(InputError::BadPad(bad))
            );
        }
        // Buttons beyond the standard 17.
        for bad in [1 << 17, 1 << 31, u32::MAX] {
            assert_eq!(
                InputDatagram::decode(&pad(0, [0, 0], bad)),
                Err(InputError::BadButtons(bad))
            );
        }
        // A version-1 length under version 2, and the other way round.
        let mut short = pad(0, [0, 0], 0);
        short.truncate(InputDatagram::HEADER_LEN + 12);
        assert!(matches!(
            InputDatagram::decode(&short),
            Err(InputError::BadLength {
                tag: 5,
                expected: 17,
                got: 12
            })
        ));
        let mut v1_long = pad(0, [0, 0], 0);
        v1_long[1] = 1;
        assert!(matches!(
            InputDatagram::decode(&v1_long),
            Err(InputError::BadLength {
                tag: 5,
                expected: 12,
                got: 17
            })
        ));
        // Versions 0 and 3 are unknown.
        for v in [0, 3] {
            let mut b = pad(0, [0, 0], 0);
            b[1] = v;
            assert_eq!(
                InputDatagram::decode(&b),
                Err(InputError::UnsupportedVersion(v))
            );
        }
    }

    #[test]
    fn version_1_datagrams_still_decode_and_gamepads_become_pad_0() {
        // A version-1 gamepad: axes, then a button mask with both trigger bits and a bit
        // beyond the standard layout (dropped).
        let mut b = vec![INPUT_MAGIC, 1, 5];
        b.extend_from_slice(&7u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        for a in [-5i16, 5, 0, 100] {
            b.extend_from_slice(&a.to_le_bytes());
        }
        let buttons = 1 | BUTTON_RIGHT_TRIGGER | (1 << 31);
        b.extend_from_slice(&buttons.to_le_bytes());
        assert_eq!(
            InputDatagram::decode(&b),
            Ok(InputDatagram {
                session_id: 7,
                seq: 2,
                sent_ts_us: 3,
                event: InputEvent::Gamepad {
                    pad: 0,
                    axes: [-5, 5, 0, 100],
                    triggers: [0, u16::MAX],
                    buttons: 1 | BUTTON_RIGHT_TRIGGER,
                },
            })
        );
        // Other events are the same in both versions.
        let mut key = InputDatagram {
            session_id: 1,
            seq: 1,
            sent_ts_us: 1,
            event: InputEvent::Key {
                code: 87,
                down: true,
            },
        }
        .encode();
        assert_eq!(key[1], INPUT_VERSION);
        key[1] = 1;
        assert!(InputDatagram::decode(&key).is_ok());
    }
}
