//! Browser players over WebTransport (HTTP/3, ALPN `h3`) on the gateway's QUIC endpoint.
//!
//! ```text
//!  browser --QUIC handshake, ALPN h3 (the WebTransport certificate, `wt_cert.rs`)--> gateway
//!          <==HTTP/3 SETTINGS, extended CONNECT https://host:port/v1/play (else 404)==>
//!          --one bidi stream: 0x41 + session id, then the native protocol (PlayRequest,
//!            PlayTicket or PlayResume first, as on a native play stream)-->
//!          <--one uni stream per video frame: 0x54 + session id, FrameHeader, access unit--
//!          <==datagrams (quarter stream id prefix): input in, audio out==>
//! ```
//!
//! `web-transport-quinn` does the HTTP/3 part (SETTINGS and the CONNECT exchange) on the
//! connection the endpoint already accepted; after that the gateway keeps the raw
//! `quinn::Connection` and adds WebTransport's few bytes of framing itself ([`WtSink`]), so that
//! a WebTransport player goes through the same relay path as a native one and costs the same.
//! The crate's `Session` is kept alive only for its control and CONNECT streams (and its task
//! that closes the connection when the browser closes the session); nothing here calls its
//! accept methods, so it never competes for the connection's streams or datagrams.
//!
//! Admission is the native clients': the endpoint's per-source handshake rate and
//! unauthenticated-connection caps (`conn_guard.rs`) hold until the `PlayRequest`'s key
//! authenticates, and a connection that has not authenticated one within
//! `quic.client_auth_timeout_ms` is closed.

use crate::conn_guard::QuicGate;
use crate::game::{FrameSink, GameService, WtSink};
use crate::metrics::{labels, Metrics};
use bytes::Bytes;
use nearpath_config::QuicConfig;
use nearpath_protocol::app_code::{CLOSE_PROTOCOL, CLOSE_SHUTDOWN, STREAM_REFUSED};
use nearpath_protocol::message::{ErrorInfo, Message};
use nearpath_protocol::stream::{send, FramedRecv, UniFraming};
use nearpath_protocol::MAX_REQUEST_FRAME;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};
use web_transport_quinn::proto::{Frame, StreamUni, VarInt};

/// The `transport` label of WebTransport sessions (metrics, access lines).
const TRANSPORT: &str = "webtransport";

/// The one path WebTransport sessions are accepted on.
pub const PLAY_PATH: &str = "/v1/play";

/// HTTP/3 unidirectional streams a browser needs to open: its control stream and QPACK's
/// encoder and decoder streams. The page itself opens none.
pub const H3_UNI_STREAMS: u32 = 3;
/// Bidirectional streams a browser needs: the CONNECT stream and the one play stream.
const WT_BIDI_STREAMS: u32 = 2;
/// How long a wrong-path connection is kept open for its 404 to be delivered.
const REJECT_LINGER: Duration = Duration::from_secs(2);

/// The WebTransport front end.
pub struct WebTransport {
    games: Arc<GameService>,
    gate: Arc<QuicGate>,
    quic: QuicConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

/// The WebTransport error code space inside HTTP/3's, for stream resets the browser sees.
fn wt_code(code: quinn::VarInt) -> quinn::VarInt {
    let app = u32::try_from(code.into_inner()).unwrap_or(u32::MAX);
    quinn::VarInt::from_u64(web_transport_quinn::proto::error_to_http3(app))
        .unwrap_or(quinn::VarInt::MAX)
}

/// The framing of a WebTransport session whose CONNECT stream is `session_id`.
pub fn wt_sink(conn: quinn::Connection, session_id: u64) -> WtSink {
    let id = VarInt::try_from(session_id).unwrap_or_default();
    let mut uni = Vec::new();
    StreamUni::WEBTRANSPORT.encode(&mut uni);
    id.encode(&mut uni);
    // HTTP datagrams name their request stream by its quarter stream id (RFC 9297).
    let mut datagram = Vec::new();
    VarInt::try_from(session_id / 4)
        .unwrap_or_default()
        .encode(&mut datagram);
    WtSink {
        conn,
        uni: UniFraming {
            prefix: Bytes::from(uni),
            map_code: wt_code,
        },
        datagram_prefix: Bytes::from(datagram),
    }
}

/// Reads one QUIC variable-length integer from `rx`.
async fn read_varint(rx: &mut quinn::RecvStream) -> Option<u64> {
    let mut first = [0u8; 1];
    rx.read_exact(&mut first).await.ok()?;
    let len = 1usize << (first[0] >> 6);
    let mut buf = [0u8; 8];
    buf[0] = first[0] & 0x3f;
    if len > 1 {
        rx.read_exact(&mut buf[1..len]).await.ok()?;
    }
    Some(
        buf[..len]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b)),
    )
}

impl WebTransport {
    pub fn new(
        games: Arc<GameService>,
        gate: Arc<QuicGate>,
        quic: QuicConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> WebTransport {
        WebTransport {
            games,
            gate,
            quic,
            metrics,
            shutdown,
        }
    }

    fn refused(&self, reason: &str) {
        self.metrics
            .webtransport_refused
            .get_or_create(&labels([("reason", reason)]))
            .inc();
    }

    /// Serves one `h3` connection until it closes or the gateway shuts down.
    pub async fn handle(self: Arc<Self>, conn: quinn::Connection) {
        let peer = conn.remote_address();
        let span = info_span!("client", %peer, conn = conn.stable_id(), transport = "webtransport");
        self.handle_in(conn).instrument(span).await
    }

    async fn handle_in(self: Arc<Self>, conn: quinn::Connection) {
        conn.set_max_concurrent_uni_streams(H3_UNI_STREAMS.into());
        conn.set_max_concurrent_bi_streams(WT_BIDI_STREAMS.into());
        // A connection that never authenticates a request only costs: it must do so soon,
        // HTTP/3 handshake included.
        let auth_deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.quic.client_auth_timeout_ms);
        let request = tokio::select! {
            r = tokio::time::timeout_at(auth_deadline, web_transport_quinn::Request::accept(conn.clone())) => match r {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    debug!(error = %e, "WebTransport handshake failed");
                    self.refused("handshake");
                    conn.close(CLOSE_PROTOCOL, b"not a WebTransport session");
                    return;
                }
                Err(_) => {
                    debug!("no WebTransport request in time; closing");
                    self.refused("auth_timeout");
                    conn.close(CLOSE_PROTOCOL, b"authentication timeout");
                    return;
                }
            },
            _ = self.shutdown.cancelled() => {
                conn.close(CLOSE_SHUTDOWN, b"gateway shutting down");
                return;
            }
        };
        if request.url.path() != PLAY_PATH {
            debug!(
                path = request.url.path(),
                "WebTransport request for an unknown path"
            );
            self.refused("path");
            let _ = request
                .reject(web_transport_quinn::http::StatusCode::NOT_FOUND)
                .await;
            // The browser closes once it has read the 404; closing first could lose it.
            let _ = tokio::time::timeout(REJECT_LINGER, conn.closed()).await;
            conn.close(CLOSE_PROTOCOL, b"no such path");
            return;
        }
        let session = match request.ok().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "WebTransport CONNECT not answered");
                self.refused("handshake");
                conn.close(CLOSE_PROTOCOL, b"CONNECT failed");
                return;
            }
        };
        // The CONNECT request is the first bidirectional stream the client opened (quinn hands
        // streams over in order), so its id, the session id, is 0.
        let session_id = 0u64;
        let sink = wt_sink(conn.clone(), session_id);
        let inputs = tokio::spawn(self.games.clone().webtransport_input_loop(sink.clone()));
        let mut auth_pending = true;
        let mut play_stream_taken = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(auth_deadline), if auth_pending => {
                    auth_pending = self.gate.is_pending(conn.stable_id());
                    if auth_pending {
                        debug!("no PlayRequest authenticated in time; closing");
                        self.refused("auth_timeout");
                        conn.close(CLOSE_PROTOCOL, b"authentication timeout");
                        break;
                    }
                }
                r = conn.accept_bi() => match r {
                    Ok((mut tx, mut rx)) => {
                        // One play stream per connection: the page opens no other.
                        if play_stream_taken {
                            let _ = rx.stop(wt_code(STREAM_REFUSED));
                            let _ = tx.reset(wt_code(STREAM_REFUSED));
                            continue;
                        }
                        play_stream_taken = true;
                        let this = self.clone();
                        let conn = conn.clone();
                        let sink = sink.clone();
                        tokio::spawn(
                            async move { this.serve_play_stream(conn, sink, tx, rx, session_id).await }
                                .in_current_span(),
                        );
                    }
                    Err(e) => {
                        debug!(error = %e, "WebTransport connection closed");
                        break;
                    }
                },
                _ = self.shutdown.cancelled() => {
                    conn.close(CLOSE_SHUTDOWN, b"gateway shutting down");
                    break;
                }
            }
        }
        inputs.abort();
        drop(session);
    }

    /// The page's play stream: the WebTransport stream header, then a native play stream.
    async fn serve_play_stream(
        &self,
        conn: quinn::Connection,
        sink: WtSink,
        mut tx: quinn::SendStream,
        mut rx: quinn::RecvStream,
        session_id: u64,
    ) {
        let header = async {
            let kind = read_varint(&mut rx).await?;
            let id = read_varint(&mut rx).await?;
            Some((kind, id))
        };
        let first_message_by =
            tokio::time::Instant::now() + Duration::from_millis(self.quic.client_auth_timeout_ms);
        match tokio::time::timeout_at(first_message_by, header).await {
            Ok(Some((kind, id)))
                if kind == Frame::WEBTRANSPORT.0.into_inner() && id == session_id => {}
            _ => {
                let _ = rx.stop(wt_code(STREAM_REFUSED));
                let _ = tx.reset(wt_code(STREAM_REFUSED));
                return;
            }
        }
        let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
        let first = match tokio::time::timeout_at(first_message_by, framed.next()).await {
            Ok(Ok(Some(m))) => m,
            _ => return,
        };
        // The first messages a native play stream accepts: a new session, a session a peer
        // redirected here (`PlayTicket`) or one resumed from a lost gateway (`PlayResume`).
        let api_key = match &first {
            Message::PlayRequest(r) => r.api_key.clone(),
            Message::PlayTicket(t) => t.api_key.clone(),
            Message::PlayResume(r) => r.api_key.clone(),
            other => {
                let msg = Message::Error(ErrorInfo {
                    code: "bad_request".into(),
                    message: format!(
                        "unexpected first message {}: a WebTransport play stream starts with \
                         PlayRequest, PlayTicket or PlayResume",
                        other.name()
                    ),
                    retryable: false,
                });
                let _ = send(&mut tx, &msg).await;
                let _ = tx.finish();
                return;
            }
        };
        // The service authenticates again (a cache hit) and answers a bad key itself.
        if self.games.authenticate(Some(&api_key)).await.is_ok()
            && self.gate.authenticated(conn.stable_id())
        {
            conn.set_receive_window(
                quinn::VarInt::from_u64(self.quic.client_receive_window_bytes)
                    .unwrap_or(quinn::VarInt::MAX),
            );
        }
        let games = self.games.clone();
        let sink = FrameSink::WebTransport(sink);
        match first {
            Message::PlayRequest(r) => {
                games
                    .serve_play_via(conn, sink, TRANSPORT, tx, framed, r)
                    .await
            }
            Message::PlayTicket(t) => {
                games
                    .serve_ticket_via(conn, sink, TRANSPORT, tx, framed, t)
                    .await
            }
            Message::PlayResume(r) => {
                games
                    .serve_resume_via(conn, sink, TRANSPORT, tx, framed, r)
                    .await
            }
            // Any other first message was refused above.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_codes_map_into_the_webtransport_range_of_http3_codes() {
        for code in [0u32, 0x10, 0x11, 0x13, 0x1e, 0x1f, 1000] {
            let mapped = wt_code(quinn::VarInt::from_u32(code)).into_inner();
            assert_eq!(
                web_transport_quinn::proto::error_from_http3(mapped),
                Some(code)
            );
        }
    }
}
