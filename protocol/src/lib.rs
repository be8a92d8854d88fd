//! Nearpath wire protocol: message types, a sans-IO codec, quinn stream helpers, TLS helpers and
//! the native client library.
//!
//! `protocol/PROTOCOL.md` specifies the bytes; this crate is the reference implementation that
//! the gateway, the edge node and native clients share.
//!
//! - [`codec`] frames messages (`varint length | type | body`) and holds the incremental
//!   [`Decoder`].
//! - [`message`] defines every framed message ([`Message`]).
//! - [`frame`] defines the fixed 48-byte [`FrameHeader`] that starts each video frame stream.
//! - [`input`] defines [`InputDatagram`].
//! - [`audio`] defines [`AudioPacket`], the Opus audio datagram; [`ogg`] writes received
//!   packets as an Ogg Opus file.
//! - [`stream`] runs the codec over quinn: [`FramedRecv`], [`send`], [`send_frame`],
//!   [`recv_frame`], [`relay_frame`].
//! - [`tls`] and [`net`] build rustls/quinn configurations (ring provider) and UDP sockets.
//! - [`client`] is the native client library ([`Client`]) for `nearpath/1`.
//! - [`report`] prints an error and its causes, each cause once (what the binaries print).

pub mod audio;
pub mod caps;
pub mod client;
pub mod codec;
pub mod frame;
pub mod input;
pub mod message;
pub mod net;
pub mod ogg;
pub mod openai;
pub mod report;
pub mod stream;
pub mod tls;

#[cfg(any(test, feature = "proptest"))]
pub mod strategies;
#[cfg(test)]
mod tests;

pub use audio::{AudioError, AudioPacket};
pub use caps::ModelCaps;
pub use client::{
    AudioStream, Client, ClientError, ControlEvent, FrameSeqStats, FrameStream, InferEvent,
    InferStream, InputSender, PlayControl, PlayEvent, PlayParams, PlaySession, VideoFrame,
};
pub use codec::{decode_message, encode, encode_to_vec, DecodeError, Decoder};
pub use frame::{FrameHeader, FrameHeaderError};
pub use input::{InputDatagram, InputError, InputEvent};
pub use message::*;
pub use stream::{
    encode_checked, recv_frame, recv_frame_header, relay_frame, relay_frame_by, send, send_frame,
    Blame, FramedRecv, StreamError,
};
pub use tls::{ServerVerify, TlsError, TransportOptions};

/// ALPN of edge node <-> gateway connections.
pub const ALPN_NODE: &[u8] = b"nearpath-node/1";
/// ALPN of native player and app clients <-> gateway connections.
pub const ALPN_CLIENT: &[u8] = b"nearpath/1";
/// ALPN of the gateway-to-gateway trunk of a federation (both ends present certificates pinned
/// in the shared gateway directory).
pub const ALPN_PEER: &[u8] = b"nearpath-peer/1";

/// Version carried in `Register`, `InferRequest`, `PlayRequest` and `ListGames`.
pub const PROTOCOL_VERSION: u16 = 4;

/// Largest control or request frame (type byte plus body) a receiver accepts by default.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// Largest frame on a stream whose messages may carry a request body (`InferRequest`, `Open`):
/// 1 MiB of JSON plus room for the other fields.
pub const MAX_REQUEST_FRAME: usize = 1024 * 1024 + 4 * 1024;
/// Largest video payload (after the 48-byte header) a receiver accepts.
pub const MAX_VIDEO_FRAME: usize = 8 * 1024 * 1024;

/// QUIC application error codes for connection close, stream reset and stream stop.
pub mod app_code {
    use quinn::VarInt;

    /// Connection closed normally.
    pub const CLOSE_NORMAL: VarInt = VarInt::from_u32(0);
    /// The peer broke the protocol (undecodable or unexpected message).
    pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(1);
    /// Registration was rejected (after `Rejected`).
    pub const CLOSE_REJECTED: VarInt = VarInt::from_u32(2);
    /// The sender is shutting down (after `Shutdown` or a completed drain).
    pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(3);
    /// The node's lease expired without a heartbeat.
    pub const CLOSE_LEASE_EXPIRED: VarInt = VarInt::from_u32(4);
    /// The credentials the node was admitted with no longer hold (after `Shutdown`): its
    /// enrolment token was revoked or its operator suspended. The close reason names which
    /// (`token_revoked`, `operator_suspended`, `operator_unverified`); reconnecting with the same
    /// credentials is refused.
    pub const CLOSE_REVOKED: VarInt = VarInt::from_u32(5);
    /// The node's connection moved (QUIC migration) to an address the onboarding geofence
    /// refuses (after `Shutdown`); the close reason is `path_refused`.
    pub const CLOSE_PATH_REFUSED: VarInt = VarInt::from_u32(6);
    /// A peer gateway's trunk connection is refused: its client certificate is missing or not
    /// pinned by a live gateway of the federation, or it is this gateway itself. The close
    /// reason names which (`peer_no_certificate`, `peer_unknown_pin`, `peer_expired`,
    /// `peer_is_self`).
    pub const CLOSE_PEER_REFUSED: VarInt = VarInt::from_u32(7);

    /// Stream refused (too large, or not acceptable now).
    pub const STREAM_REFUSED: VarInt = VarInt::from_u32(0x10);
    /// Stream abandoned because its source failed (a relayed frame whose upstream broke).
    pub const STREAM_ABORTED: VarInt = VarInt::from_u32(0x11);
    /// The reader no longer wants the stream (client dropped an inference stream).
    pub const STREAM_CANCELLED: VarInt = VarInt::from_u32(0x12);
    /// A relayed video frame given up at its deadline: the relay drops late frames rather than
    /// queue them. Not an error; the player skips the frame.
    pub const FRAME_DROPPED: VarInt = VarInt::from_u32(0x13);

    /// Every code by name, in the order of PROTOCOL.md's table ("Application error codes").
    pub const ALL: [(&str, VarInt); 12] = [
        ("CLOSE_NORMAL", CLOSE_NORMAL),
        ("CLOSE_PROTOCOL", CLOSE_PROTOCOL),
        ("CLOSE_REJECTED", CLOSE_REJECTED),
        ("CLOSE_SHUTDOWN", CLOSE_SHUTDOWN),
        ("CLOSE_LEASE_EXPIRED", CLOSE_LEASE_EXPIRED),
        ("CLOSE_REVOKED", CLOSE_REVOKED),
        ("CLOSE_PATH_REFUSED", CLOSE_PATH_REFUSED),
        ("CLOSE_PEER_REFUSED", CLOSE_PEER_REFUSED),
        ("STREAM_REFUSED", STREAM_REFUSED),
        ("STREAM_ABORTED", STREAM_ABORTED),
        ("STREAM_CANCELLED", STREAM_CANCELLED),
        ("FRAME_DROPPED", FRAME_DROPPED),
    ];

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The numbers are the wire contract: a renumbered constant breaks every deployed peer.
        #[test]
        fn each_code_keeps_its_number() {
            let numbers: Vec<(&str, u64)> = ALL.iter().map(|(n, c)| (*n, c.into_inner())).collect();
            assert_eq!(
                numbers,
                [
                    ("CLOSE_NORMAL", 0),
                    ("CLOSE_PROTOCOL", 1),
                    ("CLOSE_REJECTED", 2),
                    ("CLOSE_SHUTDOWN", 3),
                    ("CLOSE_LEASE_EXPIRED", 4),
                    ("CLOSE_REVOKED", 5),
                    ("CLOSE_PATH_REFUSED", 6),
                    ("CLOSE_PEER_REFUSED", 7),
                    ("STREAM_REFUSED", 0x10),
                    ("STREAM_ABORTED", 0x11),
                    ("STREAM_CANCELLED", 0x12),
                    ("FRAME_DROPPED", 0x13),
                ]
            );
        }

        /// Rows of PROTOCOL.md's "Application error codes" table: (code, name, use).
        fn documented() -> Vec<(u64, String, String)> {
            let doc = include_str!("../PROTOCOL.md");
            let start = doc
                .find("### Application error codes")
                .expect("PROTOCOL.md has the application error code table");
            doc[start..]
                .lines()
                .skip_while(|l| !l.starts_with('|'))
                .take_while(|l| l.starts_with('|'))
                .skip(2)
                .map(|row| {
                    let cells: Vec<&str> =
                        row.trim_matches('|').split('|').map(str::trim).collect();
                    let code = match cells[0].strip_prefix("0x") {
                        Some(hex) => u64::from_str_radix(hex, 16),
                        None => cells[0].parse(),
                    }
                    .unwrap_or_else(|e| panic!("bad code {:?}: {e}", cells[0]));
                    (
                        code,
                        cells[1].trim_matches('`').to_string(),
                        cells[2].to_string(),
                    )
                })
                .collect()
        }

        #[test]
        fn protocol_md_lists_the_same_codes_with_their_meanings() {
            let doc = documented();
            let ours: Vec<(u64, String)> = ALL
                .iter()
                .map(|(n, c)| (c.into_inner(), n.to_string()))
                .collect();
            let theirs: Vec<(u64, String)> = doc.iter().map(|(c, n, _)| (*c, n.clone())).collect();
            assert_eq!(ours, theirs, "PROTOCOL.md's table and app_code disagree");
            // What each code means, by the words its row must use.
            let meaning = [
                ("CLOSE_NORMAL", "normally"),
                ("CLOSE_PROTOCOL", "protocol"),
                ("CLOSE_REJECTED", "Rejected"),
                ("CLOSE_SHUTDOWN", "shutting down"),
                ("CLOSE_LEASE_EXPIRED", "lease"),
                ("CLOSE_REVOKED", "withdrawn"),
                ("CLOSE_PATH_REFUSED", "geofence refuses"),
                ("CLOSE_PEER_REFUSED", "pinned"),
                ("STREAM_REFUSED", "not acceptable"),
                ("STREAM_ABORTED", "upstream failed"),
                ("STREAM_CANCELLED", "cancel upstream"),
                ("FRAME_DROPPED", "deadline"),
            ];
            for (name, words) in meaning {
                let (_, _, use_) = doc.iter().find(|(_, n, _)| n == name).unwrap();
                assert!(
                    use_.contains(words),
                    "{name}: {use_:?} does not say {words:?}"
                );
            }
        }
    }
}

/// Microseconds since the Unix epoch, the clock of `capture_ts_us` and `sent_ts_us`.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
