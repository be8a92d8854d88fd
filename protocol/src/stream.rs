//! Thin async helpers that run the codec over quinn streams.

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::codec::{encode, DecodeError, Decoder};
use crate::frame::{FrameHeader, FrameHeaderError};
use crate::message::Message;
use crate::{app_code, MAX_VIDEO_FRAME};

/// quinn send-stream priorities (higher goes first when several streams have bytes waiting):
/// a node's control stream (heartbeats) outranks session streams, which outrank video frames,
/// so a congested video stream never delays a heartbeat or a control message.
pub mod priority {
    /// The node's control stream: registration, heartbeats, drain.
    pub const CONTROL: i32 = 2;
    /// A session's own stream: game control messages, inference tokens.
    pub const SESSION: i32 = 1;
    /// One video frame's unidirectional stream.
    pub const VIDEO_FRAME: i32 = -1;
}

/// Most bytes taken from quinn per read; bounds the decoder's buffer to one frame plus this.
const READ_CHUNK: usize = 64 * 1024;

/// Who is at fault for a [`StreamError`], which decides what the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The peer broke the protocol or aborted: log it against the peer, do not retry as is.
    Peer,
    /// This side tried something invalid (a bug or an oversized message).
    Local,
    /// The connection or path failed; a retry on a new connection may succeed.
    Network,
}

/// Errors of the stream helpers.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The peer sent bytes that do not decode.
    #[error("peer sent an undecodable message: {0}")]
    Decode(#[from] DecodeError),
    /// The peer sent a bad video frame header.
    #[error("peer sent a bad video frame header: {0}")]
    FrameHeader(#[from] FrameHeaderError),
    /// Reading failed (reset by the peer, or the connection was lost).
    #[error("reading the stream failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed (stopped by the peer, or the connection was lost).
    #[error("writing the stream failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// Opening a stream failed because the connection is gone.
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// This side already finished or reset the stream.
    #[error("stream already closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// The peer finished the stream in the middle of a frame.
    #[error("peer finished the stream inside a frame ({buffered} bytes of it received)")]
    Truncated {
        /// Bytes of the partial frame.
        buffered: usize,
    },
    /// A message or payload this side was about to send exceeds the receiver's limit.
    #[error("refusing to send {what} of {len} bytes: the limit is {max}")]
    TooLarge {
        /// What was being sent (message name or "video payload").
        what: &'static str,
        /// Its encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A video frame stream ended before its header was complete.
    #[error(
        "video frame stream ended after {got} of {} header bytes",
        FrameHeader::LEN
    )]
    HeaderTruncated {
        /// Header bytes received.
        got: usize,
    },
    /// A received frame header announces a payload over the receiver's limit.
    #[error("video payload of {len} bytes exceeds the {max}-byte limit")]
    PayloadTooLarge {
        /// Announced payload length.
        len: u32,
        /// The limit.
        max: usize,
    },
    /// A video frame stream ended before the announced payload length.
    #[error("video frame stream ended after {got} of {expected} payload bytes")]
    PayloadTruncated {
        /// Announced payload length.
        expected: u32,
        /// Bytes received.
        got: usize,
    },
    /// A video frame stream carried more bytes than its header announced.
    #[error("video frame stream carries more than the {expected} payload bytes announced")]
    PayloadOverrun {
        /// Announced payload length.
        expected: u32,
    },
}

impl StreamError {
    /// Who is at fault; see [`Blame`].
    pub fn blame(&self) -> Blame {
        match self {
            StreamError::Decode(_)
            | StreamError::FrameHeader(_)
            | StreamError::Truncated { .. }
            | StreamError::HeaderTruncated { .. }
            | StreamError::PayloadTooLarge { .. }
            | StreamError::PayloadTruncated { .. }
            | StreamError::PayloadOverrun { .. }
            | StreamError::Read(quinn::ReadError::Reset(_))
            | StreamError::Write(quinn::WriteError::Stopped(_)) => Blame::Peer,
            StreamError::TooLarge { .. } | StreamError::Closed(_) => Blame::Local,
            StreamError::Read(_) | StreamError::Write(_) | StreamError::Connection(_) => {
                Blame::Network
            }
        }
    }
}

/// A receive stream with a frame decoder: yields one [`Message`] at a time.
#[derive(Debug)]
pub struct FramedRecv {
    recv: quinn::RecvStream,
    decoder: Decoder,
}

impl FramedRecv {
    /// Wraps `recv`, rejecting frames over `max_frame` bytes.
    ///
    /// Use [`crate::MAX_REQUEST_FRAME`] where the stream may carry `InferRequest` or `Open`,
    /// [`crate::MAX_CONTROL_FRAME`] elsewhere.
    pub fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        FramedRecv {
            recv,
            decoder: Decoder::new(max_frame),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream between frames.
    ///
    /// Cancel-safe: bytes already read stay in the decoder if the future is dropped. After an
    /// error that is not fatal ([`DecodeError::is_fatal`]), for example an unknown message type
    /// from a newer peer, calling `next` again continues with the following frame.
    pub async fn next(&mut self) -> Result<Option<Message>, StreamError> {
        loop {
            if let Some(msg) = self.decoder.poll()? {
                return Ok(Some(msg));
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None if self.decoder.buffered() == 0 => return Ok(None),
                None => {
                    return Err(StreamError::Truncated {
                        buffered: self.decoder.buffered(),
                    })
                }
            }
        }
    }

    /// The underlying stream (to `stop` it, or read its id).
    pub fn get_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.recv
    }

    /// Unwraps the stream; bytes buffered in the decoder are lost.
    pub fn into_inner(self) -> quinn::RecvStream {
        self.recv
    }
}

/// Encodes `msg` into a frame, checking it against [`Message::max_frame`].
pub fn encode_checked(msg: &Message) -> Result<Bytes, StreamError> {
    let mut buf = BytesMut::new();
    let frame_len = encode(msg, &mut buf);
    let max = msg.max_frame();
    if frame_len > max {
        return Err(StreamError::TooLarge {
            what: msg.name(),
            len: frame_len,
            max,
        });
    }
    Ok(buf.freeze())
}

/// Writes one framed message to `send`.
pub async fn send(send: &mut quinn::SendStream, msg: &Message) -> Result<(), StreamError> {
    let frame = encode_checked(msg)?;
    send.write_chunk(frame).await?;
    Ok(())
}

/// Sends one video frame on a new unidirectional stream and finishes the stream.
///
/// `header.payload_len` is set from `payload`, so callers need not fill it in.
pub async fn send_frame(
    conn: &quinn::Connection,
    mut header: FrameHeader,
    payload: Bytes,
) -> Result<(), StreamError> {
    if payload.len() > MAX_VIDEO_FRAME {
        return Err(StreamError::TooLarge {
            what: "video payload",
            len: payload.len(),
            max: MAX_VIDEO_FRAME,
        });
    }
    header.payload_len = payload.len() as u32;
    let mut stream = conn.open_uni().await?;
    let mut chunks = [Bytes::copy_from_slice(&header.encode()), payload];
    stream.write_all_chunks(&mut chunks).await?;
    stream.finish()?;
    Ok(())
}

/// Reads and validates the fixed header at the start of a video frame stream.
pub async fn recv_frame_header(recv: &mut quinn::RecvStream) -> Result<FrameHeader, StreamError> {
    let mut raw = [0u8; FrameHeader::LEN];
    match recv.read_exact(&mut raw).await {
        Ok(()) => Ok(FrameHeader::decode(&raw)?),
        Err(quinn::ReadExactError::FinishedEarly(got)) => Err(StreamError::HeaderTruncated { got }),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Reads one whole video frame stream: header, then exactly `payload_len` bytes, then the end of
/// the stream. Payloads over `max` bytes are refused before they are read.
///
/// Memory grows with the bytes actually received, not with the announced length, so a peer
/// announcing large frames it never sends costs nothing.
pub async fn recv_frame(
    mut recv: quinn::RecvStream,
    max: usize,
) -> Result<(FrameHeader, Bytes), StreamError> {
    let header = recv_frame_header(&mut recv).await?;
    if header.payload_len as usize > max {
        // Tell the sender to stop instead of draining bytes we will discard.
        let _ = recv.stop(app_code::STREAM_REFUSED);
        return Err(StreamError::PayloadTooLarge {
            len: header.payload_len,
            max,
        });
    }
    let expected = header.payload_len as usize;
    let mut first: Option<Bytes> = None;
    let mut payload = BytesMut::new();
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        let have = first.as_ref().map_or(0, Bytes::len) + payload.len();
        if have + chunk.bytes.len() > expected {
            let _ = recv.stop(app_code::STREAM_REFUSED);
            return Err(StreamError::PayloadOverrun {
                expected: header.payload_len,
            });
        }
        // A payload that arrives as one chunk is handed over without a copy.
        match first.take() {
            None if payload.is_empty() => first = Some(chunk.bytes),
            None => payload.extend_from_slice(&chunk.bytes),
            Some(prev) => {
                payload.reserve(expected);
                payload.extend_from_slice(&prev);
                payload.extend_from_slice(&chunk.bytes);
            }
        }
    }
    let payload = match first {
        Some(only) => only,
        None => payload.freeze(),
    };
    if payload.len() != expected {
        return Err(StreamError::PayloadTruncated {
            expected: header.payload_len,
            got: payload.len(),
        });
    }
    Ok((header, payload))
}

/// Forwards one video frame, whose header has already been read from `recv`, to `out` on a new
/// unidirectional stream, chunk by chunk as it arrives (cut-through, no re-encoding).
///
/// Returns the payload bytes forwarded. If the inbound stream fails or overruns its announced
/// length, the outbound stream is reset so the receiver never mistakes a partial frame for a
/// whole one.
pub async fn relay_frame(
    mut recv: quinn::RecvStream,
    header: &FrameHeader,
    out: &quinn::Connection,
    max: usize,
) -> Result<u64, StreamError> {
    if header.payload_len as usize > max {
        let _ = recv.stop(app_code::STREAM_REFUSED);
        return Err(StreamError::PayloadTooLarge {
            len: header.payload_len,
            max,
        });
    }
    let mut send = out.open_uni().await?;
    let result = relay_body(&mut recv, header, &mut send).await;
    match &result {
        Ok(_) => {
            send.finish()?;
        }
        Err(_) => {
            let _ = send.reset(app_code::STREAM_ABORTED);
            let _ = recv.stop(app_code::STREAM_ABORTED);
        }
    }
    result
}

/// How a frame handed to [`relay_frame_by`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    /// The whole frame was forwarded and the receiver acknowledged every byte in time; carries
    /// the payload bytes.
    Delivered(u64),
    /// A deadline passed first: the outbound stream was reset with `FRAME_DROPPED` (the
    /// receiver never mistakes the partial frame for a whole one, and no retransmission keeps
    /// the late bytes alive) and the inbound one stopped.
    Abandoned,
}

/// [`relay_frame`] with deadlines: the frame's bytes must be handed to `out` by `write_by` and
/// acknowledged by the receiver by `acked_by`, or the frame is abandoned ([`Relayed::Abandoned`]).
///
/// Waiting for the acknowledgement is what bounds the queue: quinn accepts writes until its
/// send window is full (megabytes, seconds of video for a slow receiver), so a write that returned
/// says nothing about when the frame will arrive. A frame that is still unacknowledged at its
/// deadline is reset, which drops its unsent bytes from quinn's buffer.
pub async fn relay_frame_by(
    recv: quinn::RecvStream,
    header: &FrameHeader,
    out: &quinn::Connection,
    max: usize,
    write_by: tokio::time::Instant,
    acked_by: tokio::time::Instant,
) -> Result<Relayed, StreamError> {
    relay_frame_framed(
        recv,
        header,
        out,
        max,
        write_by,
        acked_by,
        &UniFraming::native(),
    )
    .await
}

/// How the player's transport frames a unidirectional stream the gateway opens: bytes written
/// before the frame (WebTransport's stream type and session id) and the mapping of this
/// protocol's reset codes into the transport's code space (WebTransport's application codes
/// live inside HTTP/3's).
#[derive(Debug, Clone)]
pub struct UniFraming {
    pub prefix: Bytes,
    pub map_code: fn(quinn::VarInt) -> quinn::VarInt,
}

impl UniFraming {
    /// A native `nearpath/1` connection: nothing before the frame, codes as they are.
    pub fn native() -> UniFraming {
        UniFraming {
            prefix: Bytes::new(),
            map_code: |c| c,
        }
    }
}

/// [`relay_frame_by`] onto a stream framed as `framing` says.
pub async fn relay_frame_framed(
    mut recv: quinn::RecvStream,
    header: &FrameHeader,
    out: &quinn::Connection,
    max: usize,
    write_by: tokio::time::Instant,
    acked_by: tokio::time::Instant,
    framing: &UniFraming,
) -> Result<Relayed, StreamError> {
    if header.payload_len as usize > max {
        let _ = recv.stop(app_code::STREAM_REFUSED);
        return Err(StreamError::PayloadTooLarge {
            len: header.payload_len,
            max,
        });
    }
    // The receiver's stream limit can keep this waiting (a player that reads nothing never
    // grants more streams): that wait is bounded by the deadline too.
    let mut send = match tokio::time::timeout_at(write_by, out.open_uni()).await {
        Ok(opened) => opened?,
        Err(_) => {
            let _ = recv.stop(app_code::STREAM_ABORTED);
            return Ok(Relayed::Abandoned);
        }
    };
    // The client's session stream (control notices) goes before video on its connection.
    let _ = send.set_priority(priority::VIDEO_FRAME);
    let map = framing.map_code;
    let abandon = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code| {
        let _ = send.reset(map(code));
        let _ = recv.stop(app_code::STREAM_ABORTED);
    };
    let body = async {
        if !framing.prefix.is_empty() {
            send.write_chunk(framing.prefix.clone()).await?;
        }
        relay_body(&mut recv, header, &mut send).await
    };
    let forwarded = match tokio::time::timeout_at(write_by, body).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            abandon(&mut send, &mut recv, app_code::STREAM_ABORTED);
            return Err(e);
        }
        Err(_) => {
            abandon(&mut send, &mut recv, app_code::FRAME_DROPPED);
            return Ok(Relayed::Abandoned);
        }
    };
    send.finish()?;
    match tokio::time::timeout_at(acked_by, send.stopped()).await {
        Ok(Ok(None)) => Ok(Relayed::Delivered(forwarded)),
        Ok(Ok(Some(code))) => Err(StreamError::Write(quinn::WriteError::Stopped(code))),
        Ok(Err(quinn::StoppedError::ConnectionLost(e))) => Err(StreamError::Connection(e)),
        Ok(Err(quinn::StoppedError::ZeroRttRejected)) => {
            Err(StreamError::Write(quinn::WriteError::ZeroRttRejected))
        }
        Err(_) => {
            // Resetting a finished stream is allowed until all of it is acknowledged.
            let _ = send.reset(map(app_code::FRAME_DROPPED));
            Ok(Relayed::Abandoned)
        }
    }
}

async fn relay_body(
    recv: &mut quinn::RecvStream,
    header: &FrameHeader,
    send: &mut quinn::SendStream,
) -> Result<u64, StreamError> {
    send.write_chunk(Bytes::copy_from_slice(&header.encode()))
        .await?;
    let expected = u64::from(header.payload_len);
    let mut forwarded: u64 = 0;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        forwarded += chunk.bytes.len() as u64;
        if forwarded > expected {
            return Err(StreamError::PayloadOverrun {
                expected: header.payload_len,
            });
        }
        send.write_chunk(chunk.bytes).await?;
    }
    if forwarded != expected {
        return Err(StreamError::PayloadTruncated {
            expected: header.payload_len,
            got: forwarded as usize,
        });
    }
    Ok(forwarded)
}
