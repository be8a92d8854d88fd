//! Shared by the message-stream targets: drives [`Decoder`] the way the stream helpers do and
//! checks the properties every framed stream must have, whichever side reads it.

pub mod alloc;

use std::ops::Range;

use nearpath_protocol::codec::{varint_len, MAX_VARINT_LEN};
use nearpath_protocol::{decode_message, encode_to_vec, DecodeError, Decoder, Message};

/// One outcome of [`Decoder::poll`] other than "need more bytes".
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A message.
    Message(Message),
    /// A frame that did not decode; the decoder consumed it and the stream goes on.
    Skipped(DecodeError),
    /// The stream lost synchronisation; the decoder refuses to go on.
    Fatal(DecodeError),
}

/// Pushes `data` in pieces of the sizes `next_piece` yields, polling until `Ok(None)` after each
/// piece as [`nearpath_protocol::FramedRecv`] does. Returns every event with the input bytes it
/// consumed.
///
/// Asserts on the way that each poll's allocations are linear in the input plus at most two
/// frame limits (the decoder's one reservation, while the buffer moves), so that no announced
/// length or count reaches an allocation unchecked.
pub fn feed(
    data: &[u8],
    max_frame: usize,
    mut next_piece: impl FnMut() -> usize,
) -> Vec<(Event, Range<usize>)> {
    let mut dec = Decoder::new(max_frame);
    let mut events = Vec::new();
    let mut pushed = 0;
    let allowed = 2 * (max_frame + MAX_VARINT_LEN) + 64 * data.len() + 64 * 1024;
    while pushed < data.len() {
        let n = next_piece().clamp(1, data.len() - pushed);
        dec.push(&data[pushed..pushed + n]);
        pushed += n;
        loop {
            let start = pushed - dec.buffered();
            let (polled, peak) = alloc::peak_during(|| dec.poll());
            assert!(
                peak <= allowed,
                "one poll allocated {peak} bytes for a {}-byte input",
                data.len()
            );
            let end = pushed - dec.buffered();
            let event = match polled {
                Ok(None) => {
                    assert_eq!(start, end, "Ok(None) consumed bytes");
                    break;
                }
                Ok(Some(msg)) => Event::Message(msg),
                Err(e) if e.is_fatal() => {
                    // Sticky: a stream that lost sync never yields anything again.
                    assert_eq!(dec.poll(), Err(e.clone()), "fatal error not sticky");
                    dec.push(b"\x01\x07");
                    assert_eq!(dec.poll(), Err(e.clone()), "fatal error not sticky");
                    events.push((Event::Fatal(e), start..end));
                    return events;
                }
                Err(e) => {
                    assert!(end > start, "a skipped frame must be consumed: {e}");
                    Event::Skipped(e)
                }
            };
            events.push((event, start..end));
        }
    }
    events
}

/// A deterministic piece-size sequence drawn from the input itself, so that libFuzzer explores
/// how frames straddle reads.
fn pieces(data: &[u8]) -> impl FnMut() -> usize {
    let mut state = data.iter().fold(0x9e37_79b9_7f4a_7c15_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    move || {
        // xorshift64: piece sizes from 1 to 64, weighted towards small ones.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((1 + (state % 64) as usize) >> ((state >> 60) % 4)).max(1)
    }
}

/// Checks a byte stream read with a frame limit of `max_frame`:
///
/// - every decoded message re-encodes to exactly the bytes it came from (canonical encoding),
///   and its frame fits the limit;
/// - errors are confined to one frame unless fatal, and fatal errors are sticky;
/// - the outcome does not depend on how the bytes are split into reads (one piece, pieces of
///   input-chosen sizes, one byte at a time for short inputs);
/// - no poll allocates more than a linear function of the input (see [`feed`]);
/// - a frame body that decodes on its own re-encodes to a frame ending in the same bytes.
pub fn check_stream(data: &[u8], max_frame: usize) {
    let whole = feed(data, max_frame, || usize::MAX);
    for (event, range) in &whole {
        match event {
            Event::Message(msg) => {
                let framed = encode_to_vec(msg);
                if framed != data[range.clone()] {
                    assert_lossy(msg, &framed, range.len(), max_frame, "decode");
                }
                assert!(range.len() <= max_frame + MAX_VARINT_LEN);
            }
            Event::Skipped(e) => assert!(!e.is_fatal()),
            Event::Fatal(e) => assert!(e.is_fatal()),
        }
    }
    let split = feed(data, max_frame, pieces(data));
    assert_eq!(
        split, whole,
        "splitting the input into reads changed the outcome"
    );
    if data.len() <= 512 {
        let bytewise = feed(data, max_frame, || 1);
        assert_eq!(bytewise, whole, "byte-at-a-time reads changed the outcome");
    }

    if let Ok(msg) = decode_message(data) {
        let framed = encode_to_vec(&msg);
        if !framed.ends_with(data) {
            // The original, framed, is `data` after its length prefix.
            let original_len = varint_len(data.len() as u64) + data.len();
            assert_lossy(&msg, &framed, original_len, max_frame, "body");
        }
    }
}

/// A message whose encoding differs from the bytes it was decoded from (`original_len` of them,
/// framed) must be one of the two the protocol documents as lossy: `Register.encoders` and
/// `PlayRequest.codecs` drop entries naming a codec the receiver does not know, so that a newer
/// peer's extra codecs do not stop an older one. What is left must be shorter than the original
/// (entries only go), and canonical itself: it decodes back to the same message.
fn assert_lossy(msg: &Message, framed: &[u8], original_len: usize, max_frame: usize, what: &str) {
    assert!(
        matches!(msg, Message::Register(_) | Message::PlayRequest(_)),
        "non-canonical {what} of {}",
        msg.name()
    );
    assert!(
        framed.len() < original_len,
        "{} re-encoded to {} bytes, from {original_len}: a lossy decode may only drop entries",
        msg.name(),
        framed.len()
    );
    let mut dec = Decoder::new(max_frame);
    dec.push(framed);
    assert_eq!(
        dec.poll().ok().flatten().as_ref(),
        Some(msg),
        "the re-encoded {} does not decode to itself",
        msg.name()
    );
}
