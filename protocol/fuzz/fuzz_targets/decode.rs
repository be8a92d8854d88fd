//! Feeds arbitrary bytes to every decoder of the wire protocol.
//!
//! Beyond "no panic", it checks two properties that catch codec bugs a crash never shows:
//! whatever decodes re-encodes to exactly the bytes it came from (the encoding is canonical),
//! and decoding the same bytes split into two pushes gives the same messages as one push.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nearpath_protocol::{
    decode_message, encode_to_vec, DecodeError, Decoder, FrameHeader, InputDatagram, Message,
    MAX_CONTROL_FRAME,
};

/// Decodes `data` pushed in one piece; returns each message with the exact frame bytes it was
/// decoded from, and the error that stopped decoding, if any.
fn decode_whole(data: &[u8]) -> (Vec<(Message, Vec<u8>)>, Option<DecodeError>) {
    let mut dec = Decoder::new(MAX_CONTROL_FRAME);
    dec.push(data);
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let before = dec.buffered();
        match dec.poll() {
            Ok(Some(msg)) => {
                let used = before - dec.buffered();
                out.push((msg, data[offset..offset + used].to_vec()));
                offset += used;
            }
            Ok(None) => return (out, None),
            Err(e) if e.is_fatal() => return (out, Some(e)),
            // A non-fatal error consumed one frame; skip it as a tolerant receiver would.
            Err(_) => offset += before - dec.buffered(),
        }
    }
}

/// Decodes `data` pushed in two pieces, split at `cut`.
fn decode_split(data: &[u8], cut: usize) -> Vec<Message> {
    let mut dec = Decoder::new(MAX_CONTROL_FRAME);
    let mut out = Vec::new();
    for piece in [&data[..cut], &data[cut..]] {
        dec.push(piece);
        loop {
            match dec.poll() {
                Ok(Some(msg)) => out.push(msg),
                Ok(None) => break,
                Err(e) if e.is_fatal() => return out,
                Err(_) => {}
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (messages, _) = decode_whole(data);
    for (msg, bytes) in &messages {
        assert_eq!(
            &encode_to_vec(msg),
            bytes,
            "non-canonical decode of {}",
            msg.name()
        );
    }
    if !data.is_empty() {
        let cut = usize::from(data[0]) % (data.len() + 1);
        let split: Vec<Message> = decode_split(data, cut);
        let whole: Vec<Message> = messages.into_iter().map(|(m, _)| m).collect();
        assert_eq!(split, whole, "split at {cut} changed the result");
    }

    // The frame contents without a length prefix.
    if let Ok(msg) = decode_message(data) {
        let framed = encode_to_vec(&msg);
        assert!(
            framed.ends_with(data),
            "non-canonical body of {}",
            msg.name()
        );
    }

    if let Ok(header) = FrameHeader::decode(data) {
        assert_eq!(&header.encode()[..], &data[..FrameHeader::LEN]);
    }
    if let Ok(datagram) = InputDatagram::decode(data) {
        assert_eq!(datagram.encode(), data);
    }
});
