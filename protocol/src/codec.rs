//! Sans-IO framing and the primitive encodings shared by every message.
//!
//! A stream carries a sequence of frames, each `varint length | u8 type | body`, where `length`
//! counts the type byte and the body. Integers are unsigned LEB128 varints in their canonical
//! (shortest) form, so every value has exactly one encoding and a decoded frame re-encodes to the
//! same bytes; the fuzz target relies on that to catch asymmetric encoders.

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;

use crate::message::Message;

/// The longest LEB128 encoding of a `u64`.
pub const MAX_VARINT_LEN: usize = 10;

/// Why a frame could not be decoded.
///
/// Every variant is the remote peer's fault (it sent bytes this build cannot accept); retrying the
/// same bytes never helps. [`DecodeError::is_fatal`] says whether the stream can still be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The length prefix announces a frame larger than the receiver allows.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The receiver's limit.
        max: usize,
    },
    /// The length prefix itself is malformed (overlong or non-canonical).
    #[error("malformed frame length prefix: {detail}")]
    BadLength {
        /// What was wrong with it.
        detail: &'static str,
    },
    /// A frame of length zero has no room for the message type byte.
    #[error("empty frame: no message type byte")]
    EmptyFrame,
    /// The message type byte names no message this build knows.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// The body ended before `field` was complete.
    #[error("truncated body while reading {field}")]
    Truncated {
        /// The field being read, as `Message.field`.
        field: &'static str,
    },
    /// A string field is not valid UTF-8.
    #[error("invalid UTF-8 in {field}")]
    InvalidUtf8 {
        /// The offending field.
        field: &'static str,
    },
    /// A field holds a value outside its domain.
    #[error("invalid value for {field}: {detail}")]
    InvalidValue {
        /// The offending field.
        field: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// The body is longer than the message it encodes.
    #[error("{count} trailing bytes after {message}")]
    TrailingBytes {
        /// The message name.
        message: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
    /// A versioned message carries a protocol version this build does not speak.
    #[error("{message} carries protocol version {got}, this build speaks {supported}")]
    UnsupportedVersion {
        /// The message name.
        message: &'static str,
        /// The version the peer sent.
        got: u16,
        /// The version this build speaks.
        supported: u16,
    },
}

impl DecodeError {
    /// Whether the stream has lost frame synchronisation.
    ///
    /// A bad length prefix leaves no way to find the next frame, so the decoder refuses to go on.
    /// Every other error is confined to one frame, which the decoder has already consumed: the
    /// caller may skip it (for example an [`DecodeError::UnknownType`] from a newer peer) and
    /// keep polling.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DecodeError::FrameTooLarge { .. } | DecodeError::BadLength { .. }
        )
    }
}

/// Encodes `value` as a canonical unsigned LEB128 varint.
pub fn put_varint<B: BufMut + ?Sized>(buf: &mut B, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

/// The number of bytes [`put_varint`] writes for `value`.
pub fn varint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Outcome of parsing a varint from a possibly incomplete buffer.
enum Varint {
    /// The value and the number of bytes it took.
    Complete(u64, usize),
    /// More bytes are needed.
    Incomplete,
}

/// Parses a canonical LEB128 varint from the start of `buf`.
fn parse_varint(buf: &[u8]) -> Result<Varint, &'static str> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let low = u64::from(byte & 0x7f);
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err("varint overflows 64 bits");
        }
        value |= low << (7 * i);
        if byte & 0x80 == 0 {
            // A final zero byte after other bytes adds nothing: the shorter form was available.
            if byte == 0 && i > 0 {
                return Err("non-canonical varint (trailing zero group)");
            }
            return Ok(Varint::Complete(value, i + 1));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        Err("varint longer than 10 bytes")
    } else {
        Ok(Varint::Incomplete)
    }
}

/// A cursor over a message body that names the field on every error.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes left in the body.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, field)?[0])
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidValue {
                field,
                detail: format!("boolean byte {other}, expected 0 or 1"),
            }),
        }
    }

    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        match parse_varint(self.buf) {
            Ok(Varint::Complete(value, used)) => {
                self.buf = &self.buf[used..];
                Ok(value)
            }
            Ok(Varint::Incomplete) => Err(DecodeError::Truncated { field }),
            Err(detail) => Err(DecodeError::InvalidValue {
                field,
                detail: detail.to_string(),
            }),
        }
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let v = self.varint(field)?;
        u32::try_from(v).map_err(|_| out_of_range(field, v, "u32"))
    }

    /// A little-endian `f32` that must be finite: NaN or infinity in a load figure would poison
    /// the gateway's routing scores, so it is rejected at the edge.
    pub(crate) fn f32(&mut self, field: &'static str) -> Result<f32, DecodeError> {
        let raw = self.bytes(4, field)?;
        let value = f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if value.is_finite() {
            Ok(value)
        } else {
            Err(DecodeError::InvalidValue {
                field,
                detail: format!("non-finite float {value}"),
            })
        }
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.varint(field)?;
        // Compare before converting so that a hostile 2^62 length neither truncates on 32-bit
        // targets nor reaches an allocation.
        if len > self.buf.len() as u64 {
            return Err(DecodeError::Truncated { field });
        }
        let raw = self.bytes(len as usize, field)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(DecodeError::InvalidUtf8 { field }),
        }
    }

    /// A string of at most `max` bytes: for fields whose meaning has a natural bound (a GPU
    /// UUID, a version), so that a peer cannot park kilobytes in state the receiver keeps.
    pub(crate) fn string_max(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<String, DecodeError> {
        let s = self.string(field)?;
        if s.len() > max {
            return Err(DecodeError::InvalidValue {
                field,
                detail: format!("{} bytes, at most {max} allowed", s.len()),
            });
        }
        Ok(s)
    }

    pub(crate) fn option<T>(
        &mut self,
        field: &'static str,
        read: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => read(self).map(Some),
            other => Err(DecodeError::InvalidValue {
                field,
                detail: format!("presence byte {other}, expected 0 or 1"),
            }),
        }
    }

    /// Reads a list count and checks it against what the rest of the body could hold
    /// (`min_item_len` bytes per item) and against a fixed cap, so that the caller can size a
    /// `Vec` from it without trusting the peer.
    pub(crate) fn count(
        &mut self,
        field: &'static str,
        min_item_len: usize,
        cap: usize,
    ) -> Result<usize, DecodeError> {
        let count = self.varint(field)?;
        if count > cap as u64 {
            return Err(DecodeError::InvalidValue {
                field,
                detail: format!("{count} items, at most {cap} allowed"),
            });
        }
        let count = count as usize;
        if count.saturating_mul(min_item_len.max(1)) > self.buf.len() {
            return Err(DecodeError::Truncated { field });
        }
        Ok(count)
    }

    pub(crate) fn list<T>(
        &mut self,
        field: &'static str,
        min_item_len: usize,
        cap: usize,
        mut read: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.count(field, min_item_len, cap)?;
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(read(self)?);
        }
        Ok(items)
    }

    pub(crate) fn finish(self, message: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                message,
                count: self.buf.len(),
            })
        }
    }
}

fn out_of_range(field: &'static str, value: u64, ty: &str) -> DecodeError {
    DecodeError::InvalidValue {
        field,
        detail: format!("{value} does not fit in {ty}"),
    }
}

/// Body writers mirroring [`Reader`].
pub(crate) trait WriteExt: BufMut {
    fn put_bool(&mut self, v: bool) {
        self.put_u8(u8::from(v));
    }
    fn put_var(&mut self, v: u64) {
        put_varint(self, v);
    }
    fn put_str(&mut self, s: &str) {
        put_varint(self, s.len() as u64);
        self.put_slice(s.as_bytes());
    }
    fn put_opt<T>(&mut self, v: &Option<T>, write: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.put_u8(0),
            Some(inner) => {
                self.put_u8(1);
                write(self, inner);
            }
        }
    }
    fn put_list<T>(&mut self, items: &[T], mut write: impl FnMut(&mut Self, &T)) {
        put_varint(self, items.len() as u64);
        for item in items {
            write(self, item);
        }
    }
}

impl<B: BufMut> WriteExt for B {}

/// Appends one frame (`varint length | type | body`) carrying `msg` to `buf`.
///
/// Returns the frame length as the prefix counts it (type byte plus body). Encoding never fails:
/// every value a [`Message`] can hold has an encoding. Whether the frame fits the receiver's
/// limit is the sender's check ([`Message::max_frame`]).
pub fn encode(msg: &Message, buf: &mut BytesMut) -> usize {
    let start = buf.len();
    buf.put_u8(msg.type_byte());
    msg.encode_body(buf);
    let frame_len = (buf.len() - start) as u64;
    // The length is only known after the body is written; make room for the prefix by shifting
    // the (small) frame rather than encoding twice.
    let prefix_len = varint_len(frame_len);
    let end = buf.len();
    buf.resize(end + prefix_len, 0);
    buf.copy_within(start..end, start + prefix_len);
    let mut prefix = &mut buf[start..start + prefix_len];
    put_varint(&mut prefix, frame_len);
    frame_len as usize
}

/// Encodes `msg` into a fresh buffer.
pub fn encode_to_vec(msg: &Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(msg, &mut buf);
    buf.to_vec()
}

/// Decodes one message from a frame's contents (the type byte and the body, without the length
/// prefix).
pub fn decode_message(frame: &[u8]) -> Result<Message, DecodeError> {
    let (&ty, body) = frame.split_first().ok_or(DecodeError::EmptyFrame)?;
    Message::decode_body(ty, body)
}

/// Incremental, sans-IO frame decoder.
///
/// Feed bytes with [`Decoder::push`] as they arrive and call [`Decoder::poll`] until it returns
/// `Ok(None)`. The decoder never panics and never reserves more than `max_frame` plus a length
/// prefix for a frame: the announced length is checked against the limit before any allocation.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max_frame: usize,
    poisoned: Option<DecodeError>,
}

impl Decoder {
    /// A decoder that rejects frames longer than `max_frame` bytes (type byte plus body).
    pub fn new(max_frame: usize) -> Self {
        Decoder {
            buf: BytesMut::new(),
            max_frame,
            poisoned: None,
        }
    }

    /// The frame limit this decoder enforces.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Appends received bytes.
    ///
    /// The buffer grows by whatever is pushed; callers reading from a socket should poll until
    /// `Ok(None)` before pushing more, which bounds it by one frame plus one read.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete message, `Ok(None)` when more bytes are needed, or an error.
    ///
    /// After a fatal error ([`DecodeError::is_fatal`]) every later call returns the same error.
    pub fn poll(&mut self) -> Result<Option<Message>, DecodeError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        let (len, prefix_len) = match parse_varint(&self.buf) {
            Ok(Varint::Complete(len, used)) => (len, used),
            Ok(Varint::Incomplete) => return Ok(None),
            Err(detail) => return Err(self.poison(DecodeError::BadLength { detail })),
        };
        if len > self.max_frame as u64 {
            return Err(self.poison(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame,
            }));
        }
        // `len <= max_frame`, so the conversion and the reservation below are bounded.
        let total = prefix_len + len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let frame = self.buf.split_to(total);
        decode_message(&frame[prefix_len..]).map(Some)
    }

    /// Drops buffered bytes that belong to no complete frame yet; returns how many.
    pub fn clear(&mut self) -> usize {
        let n = self.buf.remaining();
        self.buf.clear();
        n
    }

    fn poison(&mut self, err: DecodeError) -> DecodeError {
        self.poisoned = Some(err.clone());
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths_match_encoding() {
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u32::MAX as u64,
            1 << 62,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "value {v}");
            match parse_varint(&buf) {
                Ok(Varint::Complete(got, used)) => {
                    assert_eq!((got, used), (v, buf.len()));
                }
                _ => panic!("{v} did not round-trip"),
            }
        }
    }

    #[test]
    fn varint_rejects_non_canonical_and_overflow() {
        // 0 encoded in two bytes.
        assert!(parse_varint(&[0x80, 0x00]).is_err());
        // Ten bytes whose last carries more than bit 63.
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert!(parse_varint(&over).is_err());
        // Eleven continuation bytes never terminate.
        assert!(parse_varint(&[0xff; 11]).is_err());
        // A prefix of a valid varint just needs more bytes.
        assert!(matches!(parse_varint(&[0x80]), Ok(Varint::Incomplete)));
    }
}
