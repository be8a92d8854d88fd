//! Native client library for ALPN `nearpath/1`: inference streams and play sessions.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;

use crate::frame::FrameHeader;
use crate::input::{InputDatagram, InputEvent};
use crate::message::{
    Chunk, Close, Done, Ended, ErrorInfo, InferRequest, InferStarted, InferTicket, ListGames,
    Message, Paused, PlayRequest, PlayResume, PlayStarted, PlayTicket, Redirect, Rumble, SetVideo,
    Token, VideoCodec, VIDEO_REFUSED,
};
use crate::net::{self, NetError};
use crate::openai::Endpoint;
use crate::stream::{self, FramedRecv, StreamError};
use crate::tls::{self, ServerVerify, TlsError, TransportOptions};
use crate::{
    app_code, unix_micros, ALPN_CLIENT, MAX_CONTROL_FRAME, MAX_REQUEST_FRAME, MAX_VIDEO_FRAME,
    PROTOCOL_VERSION,
};

/// Frames buffered between the frame reader task and the application.
const FRAME_QUEUE: usize = 16;

/// How long [`Client::close`] waits for the close to reach the gateway: long enough for the
/// `CONNECTION_CLOSE` to be sent (and, on a working path, acknowledged by the gateway's own
/// close), short enough that a player quitting over a dead path is not held up.
pub const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// The transport a client connection uses unless told otherwise: a PING after 1 s of silence
/// and an idle timeout of 3 s. A game session lives on its player's connection, so a player that
/// vanishes without closing (killed process, lost network) must be noticed quickly on both ends:
/// the idle timeout is the smaller of both ends' values, so the gateway drops the connection,
/// and with it the session and its node slot, 3 s after the last packet. The keep-alive keeps a
/// quiet connection (an app between requests) well inside that.
pub fn client_transport() -> TransportOptions {
    TransportOptions {
        keep_alive: Some(Duration::from_secs(1)),
        idle_timeout: Duration::from_secs(3),
        ..TransportOptions::default()
    }
}

/// Client errors. [`ClientError::is_retryable`] says whether trying again may help.
#[derive(Debug, Error)]
pub enum ClientError {
    /// TLS configuration failed (bad CA file, ...).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The local UDP socket could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The connection attempt could not start (bad server name, ...).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The gateway.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The gateway presented a certificate that is not the pinned one. Retrying cannot help:
    /// the pin or the gateway's certificate must change.
    #[error("{0}")]
    PinMismatch(tls::PinMismatch),
    /// Nothing answered the handshake at `addr` before the connection attempt timed out: no
    /// gateway listens there, or a firewall drops UDP on the way.
    #[error("no gateway answering at {addr} (UDP)")]
    NoAnswer {
        /// The address dialled.
        addr: SocketAddr,
    },
    /// The connection failed or was closed.
    #[error("connection to {addr} failed: {source}")]
    Connection {
        /// The gateway.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// A stream to the gateway failed.
    #[error("stream to {addr} failed: {source}")]
    Stream {
        /// The gateway.
        addr: SocketAddr,
        /// Why.
        source: StreamError,
    },
    /// The gateway answered the request with an error.
    #[error("gateway refused the request: {code}: {message}")]
    Refused {
        /// Status-like code ("unauthorized", "no_capacity", ...).
        code: String,
        /// Human-readable detail.
        message: String,
        /// Whether the same request may succeed later.
        retryable: bool,
    },
    /// The gateway sent a message that is not valid at this point.
    #[error("gateway {addr} broke the protocol: expected {expected}, got {got}")]
    Unexpected {
        /// The gateway.
        addr: SocketAddr,
        /// What was valid.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The gateway finished the stream before the exchange was complete.
    #[error("gateway {addr} finished the stream before sending {expected}")]
    EndedEarly {
        /// The gateway.
        addr: SocketAddr,
        /// What was still due.
        expected: &'static str,
    },
    /// A frame arrived for a session this connection is not playing.
    #[error("gateway {addr} sent a frame for session {got}, playing {expected}")]
    WrongSession {
        /// The gateway.
        addr: SocketAddr,
        /// The session being played.
        expected: u64,
        /// The session named in the frame header.
        got: u64,
    },
    /// `play` was called while another play session is active on this connection (frames
    /// carry no stream to tell sessions apart before their header is read).
    #[error("a play session is already active on this connection")]
    PlayActive,
    /// A gateway's `Redirect` could not be followed: a bad address or pin, or the peer it
    /// names redirected again (a ticket is good for one hop only).
    #[error("cannot follow the redirect to gateway {gateway_id}: {detail}")]
    Redirect {
        /// The peer gateway named in the redirect.
        gateway_id: String,
        /// Why.
        detail: String,
    },
    /// An input datagram could not be sent.
    #[error("cannot send input datagram to {addr}: {source}")]
    Datagram {
        /// The gateway.
        addr: SocketAddr,
        /// Why.
        source: quinn::SendDatagramError,
    },
}

impl ClientError {
    /// The error of a handshake with `addr` that failed with `source`: a pin mismatch and a
    /// silent address are told apart from other failures, in words an operator acts on.
    pub fn handshake(addr: SocketAddr, source: quinn::ConnectionError) -> ClientError {
        if let Some(mismatch) = tls::PinMismatch::from_connection_error(&source) {
            return ClientError::PinMismatch(mismatch);
        }
        match source {
            // Nothing at all came back during the handshake for the idle timeout.
            quinn::ConnectionError::TimedOut => ClientError::NoAnswer { addr },
            source => ClientError::Connection { addr, source },
        }
    }

    /// Whether retrying (on a new connection where the connection failed) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Refused { retryable, .. } => *retryable,
            ClientError::Connection { .. } | ClientError::NoAnswer { .. } => true,
            ClientError::Stream { source, .. } => source.blame() == stream::Blame::Network,
            ClientError::Datagram { source, .. } => {
                matches!(source, quinn::SendDatagramError::ConnectionLost(_))
            }
            _ => false,
        }
    }
}

/// A QUIC connection to a gateway speaking `nearpath/1`.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    addr: SocketAddr,
    play_active: Arc<AtomicBool>,
    /// The local address it was bound to and the transport it uses: a redirected play session
    /// dials the peer gateway the same way, so that the peer sees the client address the
    /// ticket was issued for.
    bind: SocketAddr,
    transport: TransportOptions,
}

impl Client {
    /// Connects to the gateway at `addr`, verifying its certificate for `server_name` as
    /// `verify` says. Must run inside a tokio runtime.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        verify: ServerVerify,
    ) -> Result<Client, ClientError> {
        Self::connect_from(net::unspecified_for(addr), addr, server_name, verify).await
    }

    /// [`Client::connect`] from a chosen local address (multi-homed hosts; tests that need the
    /// gateway to see a particular source address).
    pub async fn connect_from(
        bind: SocketAddr,
        addr: SocketAddr,
        server_name: &str,
        verify: ServerVerify,
    ) -> Result<Client, ClientError> {
        Self::connect_with(bind, addr, server_name, verify, &client_transport()).await
    }

    /// [`Client::connect_from`] with explicit transport options instead of
    /// [`client_transport`].
    pub async fn connect_with(
        bind: SocketAddr,
        addr: SocketAddr,
        server_name: &str,
        verify: ServerVerify,
        transport: &TransportOptions,
    ) -> Result<Client, ClientError> {
        let config = tls::client_config_with(verify, &[ALPN_CLIENT], transport)?;
        let (endpoint, _) = net::client_endpoint(bind, config, net::DEFAULT_RECV_BUFFER)?;
        let connecting = endpoint
            .connect(addr, server_name)
            .map_err(|source| ClientError::Connect { addr, source })?;
        let conn = connecting
            .await
            .map_err(|source| ClientError::handshake(addr, source))?;
        Ok(Client {
            endpoint,
            conn,
            addr,
            play_active: Arc::new(AtomicBool::new(false)),
            bind: SocketAddr::new(bind.ip(), 0),
            transport: transport.clone(),
        })
    }

    /// The underlying connection (for RTT and statistics).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The gateway's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts one chat-completions request; read the outcome with [`InferStream::next`].
    pub async fn infer(
        &self,
        api_key: &str,
        request_json: &str,
    ) -> Result<InferStream, ClientError> {
        self.infer_at(api_key, Endpoint::Chat, request_json).await
    }

    /// Starts one inference request on `endpoint` (chat, completions, embeddings, responses);
    /// read the outcome with [`InferStream::next`].
    pub async fn infer_at(
        &self,
        api_key: &str,
        endpoint: Endpoint,
        request_json: &str,
    ) -> Result<InferStream, ClientError> {
        let (mut send, recv) = self.open().await?;
        let request = Message::InferRequest(InferRequest {
            protocol_version: PROTOCOL_VERSION,
            api_key: api_key.to_string(),
            endpoint,
            request_json: request_json.to_string(),
        });
        stream::send(&mut send, &request)
            .await
            .map_err(|e| self.stream_err(e))?;
        // Nothing else goes this way; finishing tells the gateway the request is complete.
        send.finish().map_err(|e| self.stream_err(e.into()))?;
        Ok(InferStream {
            // `Chunk`s (embeddings, tool calls) may be larger than control messages.
            recv: FramedRecv::new(recv, MAX_REQUEST_FRAME),
            addr: self.addr,
            finished: false,
            started: false,
            follow: Some(Box::new(Follow {
                api_key: api_key.to_string(),
                endpoint,
                request_json: request_json.to_string(),
                bind: self.bind,
                transport: self.transport.clone(),
            })),
            redirect: None,
            peer: None,
        })
    }

    /// Lists the titles some node can serve.
    pub async fn list_games(&self, api_key: &str) -> Result<Vec<String>, ClientError> {
        let (mut send, recv) = self.open().await?;
        let request = Message::ListGames(ListGames {
            protocol_version: PROTOCOL_VERSION,
            api_key: api_key.to_string(),
        });
        stream::send(&mut send, &request)
            .await
            .map_err(|e| self.stream_err(e))?;
        send.finish().map_err(|e| self.stream_err(e.into()))?;
        let mut recv = FramedRecv::new(recv, MAX_CONTROL_FRAME);
        match recv.next().await.map_err(|e| self.stream_err(e))? {
            Some(Message::GameList(list)) => Ok(list.titles),
            Some(Message::Error(e)) => Err(refused(e)),
            Some(other) => Err(self.unexpected("GameList or Error", &other)),
            None => Err(ClientError::EndedEarly {
                addr: self.addr,
                expected: "GameList",
            }),
        }
    }

    /// Starts a game session and waits until the gateway confirms it with `PlayStarted`.
    ///
    /// When the gateway answers with a `Redirect` (the node for the session is attached to
    /// another gateway of the federation), the library follows it once, transparently: it dials
    /// the peer on a new connection pinned to the certificate hash the redirect names, and
    /// starts the session there with the redirect's ticket. The session then lives on that
    /// connection (see [`PlaySession::redirect`]); this client's connection stays open.
    ///
    /// One play session at a time per connection; a second call fails with
    /// [`ClientError::PlayActive`] until the first [`PlaySession`] is dropped or closed.
    pub async fn play(
        &self,
        api_key: &str,
        params: PlayParams,
    ) -> Result<PlaySession, ClientError> {
        self.play_with_codecs(api_key, params, &[]).await
    }

    /// [`Client::play`] for a client that decodes more than H.264: `codecs` in preference
    /// order (empty: H.264 only). The gateway picks the first one a node that may serve the
    /// session encodes; `PlayStarted::codec` (in [`PlaySession`]) says which.
    pub async fn play_with_codecs(
        &self,
        api_key: &str,
        params: PlayParams,
        codecs: &[VideoCodec],
    ) -> Result<PlaySession, ClientError> {
        self.play_traced(api_key, params, codecs, None).await
    }

    /// [`Client::play_with_codecs`] inside a caller's trace: `traceparent` (a W3C
    /// `traceparent`, protocol version 4) is sent in the `PlayRequest`, and the gateway's and
    /// the node's session spans join that trace. An invalid one is ignored by the gateway,
    /// which then starts a trace of its own; it never fails the request.
    pub async fn play_traced(
        &self,
        api_key: &str,
        params: PlayParams,
        codecs: &[VideoCodec],
        traceparent: Option<&str>,
    ) -> Result<PlaySession, ClientError> {
        if self.play_active.swap(true, Ordering::AcqRel) {
            return Err(ClientError::PlayActive);
        }
        let guard = ActiveGuard(self.play_active.clone());
        let request = Message::PlayRequest(PlayRequest {
            protocol_version: PROTOCOL_VERSION,
            api_key: api_key.to_string(),
            game: params.game,
            width: params.width,
            height: params.height,
            fps: params.fps,
            bitrate_kbps: params.bitrate_kbps,
            codecs: codecs.to_vec(),
            traceparent: traceparent.map(str::to_string),
        });
        match self.start_play(&request).await? {
            PlayAnswer::Started(send, control, started, token) => {
                Ok(self.session(send, control, started, guard, None, None, token))
            }
            PlayAnswer::Redirect(redirect) => self.follow(api_key, redirect, guard).await,
        }
    }

    /// Starts the session a redirect ticket names on this client's gateway (the one the
    /// ticket was issued for); [`Client::play`] does this itself when it follows a `Redirect`.
    pub async fn play_ticket(
        &self,
        api_key: &str,
        ticket: &str,
    ) -> Result<PlaySession, ClientError> {
        if self.play_active.swap(true, Ordering::AcqRel) {
            return Err(ClientError::PlayActive);
        }
        let guard = ActiveGuard(self.play_active.clone());
        let request = Message::PlayTicket(PlayTicket {
            protocol_version: PROTOCOL_VERSION,
            api_key: api_key.to_string(),
            ticket: ticket.to_string(),
        });
        match self.start_play(&request).await? {
            PlayAnswer::Started(send, control, started, token) => {
                Ok(self.session(send, control, started, guard, None, None, token))
            }
            PlayAnswer::Redirect(r) => Err(ClientError::Redirect {
                gateway_id: r.gateway_id,
                detail: "a ticketed session was redirected again".into(),
            }),
        }
    }

    /// Resumes, through this client's gateway, a session whose gateway was lost: `session_id`
    /// and `token` are the lost session's ([`PlayStarted::session_id`],
    /// [`PlaySession::resume_token`]). The gateway answers once the session's node (or another
    /// node, with a fresh game) serves it; the returned session has the same id and a new token.
    pub async fn resume(
        &self,
        api_key: &str,
        session_id: u64,
        token: &str,
    ) -> Result<PlaySession, ClientError> {
        if self.play_active.swap(true, Ordering::AcqRel) {
            return Err(ClientError::PlayActive);
        }
        let guard = ActiveGuard(self.play_active.clone());
        let request = Message::PlayResume(PlayResume {
            protocol_version: PROTOCOL_VERSION,
            api_key: api_key.to_string(),
            session_id,
            token: token.to_string(),
        });
        match self.start_play(&request).await? {
            PlayAnswer::Started(send, control, started, token) => {
                Ok(self.session(send, control, started, guard, None, None, token))
            }
            PlayAnswer::Redirect(r) => Err(ClientError::Redirect {
                gateway_id: r.gateway_id,
                detail: "a resumed session was redirected".into(),
            }),
        }
    }

    /// Sends a play stream's first message and reads the gateway's answer.
    async fn start_play(&self, request: &Message) -> Result<PlayAnswer, ClientError> {
        let (mut send, recv) = self.open().await?;
        stream::send(&mut send, request)
            .await
            .map_err(|e| self.stream_err(e))?;
        let mut control = FramedRecv::new(recv, MAX_CONTROL_FRAME);
        let mut first = control.next().await.map_err(|e| self.stream_err(e))?;
        // A gateway of a federation sends the session's resume token before `PlayStarted`.
        let mut token = None;
        if let Some(Message::ResumeToken(t)) = first {
            token = Some(t.token);
            first = control.next().await.map_err(|e| self.stream_err(e))?;
        }
        match first {
            Some(Message::PlayStarted(started)) => {
                Ok(PlayAnswer::Started(send, control, started, token))
            }
            Some(Message::Redirect(r)) => Ok(PlayAnswer::Redirect(r)),
            Some(Message::Error(e)) => Err(refused(e)),
            Some(other) => Err(self.unexpected("PlayStarted, Redirect or Error", &other)),
            None => Err(ClientError::EndedEarly {
                addr: self.addr,
                expected: "PlayStarted",
            }),
        }
    }

    /// Follows a `Redirect`: dials the peer it names (pinned to its certificate hash, from the
    /// same local address and with the same transport) and starts the session there with the
    /// ticket. One hop only: a peer that redirects again is an error.
    async fn follow(
        &self,
        api_key: &str,
        redirect: Redirect,
        guard: ActiveGuard,
    ) -> Result<PlaySession, ClientError> {
        let fail = |detail: String| ClientError::Redirect {
            gateway_id: redirect.gateway_id.clone(),
            detail,
        };
        let peer = dial_redirect(self.bind, &self.transport, &redirect).await?;
        let request = Message::PlayTicket(PlayTicket {
            protocol_version: PROTOCOL_VERSION,
            api_key: api_key.to_string(),
            ticket: redirect.ticket.clone(),
        });
        match peer.start_play(&request).await? {
            PlayAnswer::Started(send, control, started, token) => {
                let peer = Arc::new(peer);
                Ok(peer.session(
                    send,
                    control,
                    started,
                    guard,
                    Some(peer.clone()),
                    Some(redirect),
                    token,
                ))
            }
            PlayAnswer::Redirect(_) => Err(fail("the peer redirected again".into())),
        }
    }

    /// A started session on this client's connection. `hold` keeps a redirected session's
    /// own client (and so its connection) alive for as long as a part of the session is.
    #[allow(clippy::too_many_arguments)]
    fn session(
        &self,
        send: quinn::SendStream,
        control: FramedRecv,
        started: PlayStarted,
        guard: ActiveGuard,
        hold: Option<Arc<Client>>,
        redirect: Option<Redirect>,
        resume_token: Option<String>,
    ) -> PlaySession {
        let (tx, frames) = mpsc::channel(FRAME_QUEUE);
        let reader = tokio::spawn(read_frames(
            self.conn.clone(),
            self.addr,
            started.session_id,
            tx,
        ));
        PlaySession {
            started,
            redirect,
            resume_token,
            gateway: self.addr,
            control: PlayControl {
                send,
                recv: control,
                addr: self.addr,
                finished: false,
                closed: false,
                _hold: hold.clone(),
            },
            frames: FrameStream {
                rx: frames,
                reader,
                _guard: guard,
                _hold: hold.clone(),
            },
            input: InputSender {
                conn: self.conn.clone(),
                addr: self.addr,
                session_id: started.session_id,
                seq: Arc::new(AtomicU64::new(0)),
                _hold: hold,
            },
        }
    }

    /// Closes the connection (application close, code 0) and waits, at most [`CLOSE_WAIT`],
    /// for the close to be sent. The gateway ends every session and request on the connection
    /// at once (a game session's outcome is `client_left`). Call it before the process exits:
    /// a close that was never sent leaves the gateway waiting for the idle timeout.
    pub async fn close(self) {
        self.conn.close(app_code::CLOSE_NORMAL, b"client closed");
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }

    async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        self.conn
            .open_bi()
            .await
            .map_err(|source| ClientError::Connection {
                addr: self.addr,
                source,
            })
    }

    fn stream_err(&self, source: StreamError) -> ClientError {
        stream_err(self.addr, source)
    }

    fn unexpected(&self, expected: &'static str, got: &Message) -> ClientError {
        ClientError::Unexpected {
            addr: self.addr,
            expected,
            got: got.name(),
        }
    }
}

impl Drop for Client {
    /// Dropping the client closes its connection, even while a [`PlaySession`] or one of its
    /// parts is still held: the session lives on the connection, and a client that is gone must
    /// not keep a node's slot until the idle timeout. The close is sent by the endpoint's task,
    /// so the runtime must keep running for a moment; [`Client::close`] waits for it.
    fn drop(&mut self) {
        self.conn.close(app_code::CLOSE_NORMAL, b"client dropped");
    }
}

/// Dials the peer a `Redirect` names: pinned to its certificate hash, from the local address
/// `bind` and with `transport` (so that the peer sees the client address the ticket was
/// issued for).
async fn dial_redirect(
    bind: SocketAddr,
    transport: &TransportOptions,
    redirect: &Redirect,
) -> Result<Client, ClientError> {
    let fail = |detail: String| ClientError::Redirect {
        gateway_id: redirect.gateway_id.clone(),
        detail,
    };
    let pin = tls::parse_sha256_hex(&redirect.cert_sha256)
        .map_err(|e| fail(format!("bad certificate pin: {e}")))?;
    let addr = tokio::net::lookup_host(redirect.quic_address.as_str())
        .await
        .map_err(|e| fail(format!("cannot resolve {:?}: {e}", redirect.quic_address)))?
        .find(|a| a.is_ipv4() == bind.is_ipv4())
        .ok_or_else(|| {
            fail(format!(
                "{:?} has no address of this family",
                redirect.quic_address
            ))
        })?;
    let host = redirect
        .quic_address
        .rsplit_once(':')
        .map_or(redirect.quic_address.as_str(), |(h, _)| h)
        .trim_matches(['[', ']']);
    Client::connect_with(bind, addr, host, ServerVerify::PinnedSha256(pin), transport).await
}

/// What a gateway answers a play stream's first message with.
enum PlayAnswer {
    /// The session started; with the resume token the gateway sent first, if any.
    Started(quinn::SendStream, FramedRecv, PlayStarted, Option<String>),
    Redirect(Redirect),
}

fn stream_err(addr: SocketAddr, source: StreamError) -> ClientError {
    ClientError::Stream { addr, source }
}

fn refused(e: ErrorInfo) -> ClientError {
    ClientError::Refused {
        code: e.code,
        message: e.message,
        retryable: e.retryable,
    }
}

/// Clears the connection's "play session active" flag when the session goes away.
#[derive(Debug)]
struct ActiveGuard(Arc<AtomicBool>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One event of an inference request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InferEvent {
    /// The gateway admitted and routed the request.
    Started(InferStarted),
    /// A generated token.
    Token(Token),
    /// A piece of the response as JSON (tool calls, logprobs, embeddings, Responses events).
    Chunk(Chunk),
    /// The completion finished, with usage.
    Done(Done),
    /// The request failed (before or after `Started`).
    Error(ErrorInfo),
}

/// The response stream of one inference request. Dropping it cancels the request.
#[derive(Debug)]
pub struct InferStream {
    recv: FramedRecv,
    addr: SocketAddr,
    finished: bool,
    /// Whether `InferStarted` (or any answer but a `Redirect`) arrived.
    started: bool,
    /// What following a `Redirect` needs; taken when one is followed (one hop only).
    follow: Option<Box<Follow>>,
    /// The `Redirect` followed, if the first gateway sent one.
    redirect: Option<Redirect>,
    /// The connection to the peer a `Redirect` named, held while the request runs there.
    peer: Option<Client>,
}

/// The request again, for the peer a `Redirect` names.
#[derive(Debug)]
struct Follow {
    api_key: String,
    endpoint: Endpoint,
    request_json: String,
    bind: SocketAddr,
    transport: TransportOptions,
}

impl InferStream {
    /// The `Redirect` this request followed: the first gateway sent the client to the peer it
    /// names (`federation.inference_route = "redirect"`), and the request runs there.
    pub fn redirect(&self) -> Option<&Redirect> {
        self.redirect.as_ref()
    }

    /// The gateway the request runs on (the peer, after a redirect).
    pub fn gateway(&self) -> SocketAddr {
        self.addr
    }

    /// Follows a `Redirect` answering the request: a new connection to the peer (pinned to
    /// the certificate hash the redirect names), the request sent again with the ticket.
    async fn follow(&mut self, redirect: Redirect) -> Result<(), ClientError> {
        let Some(f) = self.follow.take() else {
            return Err(ClientError::Redirect {
                gateway_id: redirect.gateway_id,
                detail: "the peer redirected again".into(),
            });
        };
        let peer = dial_redirect(f.bind, &f.transport, &redirect).await?;
        let (mut send, recv) = peer.open().await?;
        let request = Message::InferTicket(InferTicket {
            protocol_version: PROTOCOL_VERSION,
            api_key: f.api_key,
            ticket: redirect.ticket.clone(),
            endpoint: f.endpoint,
            request_json: f.request_json,
        });
        stream::send(&mut send, &request)
            .await
            .map_err(|e| peer.stream_err(e))?;
        send.finish().map_err(|e| peer.stream_err(e.into()))?;
        // The first gateway's stream is done with; the request now runs at the peer.
        let _ = self.recv.get_mut().stop(app_code::STREAM_CANCELLED);
        self.recv = FramedRecv::new(recv, MAX_REQUEST_FRAME);
        self.addr = peer.addr;
        self.peer = Some(peer);
        self.redirect = Some(redirect);
        Ok(())
    }

    /// The next event; `Ok(None)` after `Done` or `Error`. Cancel-safe, except while following
    /// a `Redirect` (dropping the future then abandons the request).
    pub async fn next(&mut self) -> Result<Option<InferEvent>, ClientError> {
        if self.finished {
            return Ok(None);
        }
        let mut msg = self
            .recv
            .next()
            .await
            .map_err(|e| stream_err(self.addr, e))?;
        if !self.started {
            // A second `Redirect` (from the peer) fails in `follow`: one hop only.
            while let Some(Message::Redirect(r)) = msg {
                if let Err(e) = self.follow(r).await {
                    self.finished = true;
                    return Err(e);
                }
                msg = self
                    .recv
                    .next()
                    .await
                    .map_err(|e| stream_err(self.addr, e))?;
            }
            self.started = true;
        }
        let event = match msg {
            Some(Message::InferStarted(m)) => InferEvent::Started(m),
            Some(Message::Token(m)) => InferEvent::Token(m),
            Some(Message::Chunk(m)) => InferEvent::Chunk(m),
            Some(Message::Done(m)) => InferEvent::Done(m),
            Some(Message::Error(m)) => InferEvent::Error(m),
            Some(other) => {
                self.finished = true;
                return Err(ClientError::Unexpected {
                    addr: self.addr,
                    expected: "InferStarted, Token, Chunk, Done or Error",
                    got: other.name(),
                });
            }
            None => {
                self.finished = true;
                return Err(ClientError::EndedEarly {
                    addr: self.addr,
                    expected: "Done or Error",
                });
            }
        };
        self.finished = matches!(event, InferEvent::Done(_) | InferEvent::Error(_));
        Ok(Some(event))
    }
}

impl Drop for InferStream {
    fn drop(&mut self) {
        if !self.finished {
            // Tell the gateway nobody is listening so it can cancel the upstream request.
            let _ = self.recv.get_mut().stop(app_code::STREAM_CANCELLED);
        }
    }
}

/// What to play.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayParams {
    /// Title.
    pub game: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// Bitrate in kbit/s.
    pub bitrate_kbps: u32,
}

impl PlayParams {
    /// 1280x720 at 60 fps and 10 Mbit/s (the Moonlight default for 720p60).
    pub fn hd(game: impl Into<String>) -> Self {
        PlayParams {
            game: game.into(),
            width: 1280,
            height: 720,
            fps: 60,
            bitrate_kbps: 10_000,
        }
    }
}

/// One received video frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoFrame {
    /// The header as the node wrote it.
    pub header: FrameHeader,
    /// H.264 Annex B access unit.
    pub payload: Bytes,
}

/// Control events of a play session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// Frames stop for a while (failover in progress).
    Paused(Paused),
    /// Frames flow again; the frame `seq` restarts if the session moved to another node.
    Resumed,
    /// The session ended.
    Ended(Ended),
    /// The session failed.
    Error(ErrorInfo),
    /// A [`PlayControl::set_video`] took effect: frames at the new size follow, the first of
    /// them an IDR (the frame header carries the size of each frame).
    VideoChanged(SetVideo),
    /// A [`PlayControl::set_video`] was refused (code `video_refused`); the session goes on at
    /// its current size and rate.
    VideoRefused(ErrorInfo),
    /// The game asks for a gamepad vibration.
    Rumble(Rumble),
}

/// Either kind of play event, from [`PlaySession::next_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlayEvent {
    /// A video frame.
    Frame(VideoFrame),
    /// A control event.
    Control(ControlEvent),
}

/// A running game session. Use it directly, or [`PlaySession::split`] it to read frames and
/// control events from different tasks.
#[derive(Debug)]
pub struct PlaySession {
    started: PlayStarted,
    /// The redirect followed to start it, if any.
    redirect: Option<Redirect>,
    /// The token that resumes it through another gateway of the federation, if any.
    resume_token: Option<String>,
    /// The gateway serving it.
    gateway: SocketAddr,
    control: PlayControl,
    frames: FrameStream,
    input: InputSender,
}

impl PlaySession {
    /// The parameters the gateway confirmed.
    pub fn started(&self) -> &PlayStarted {
        &self.started
    }

    /// The `Redirect` the session was started through (the gateway first asked sent the client
    /// to a peer), or `None` when the gateway asked serves it.
    pub fn redirect(&self) -> Option<&Redirect> {
        self.redirect.as_ref()
    }

    /// The secret that resumes the session through another gateway of the federation if this
    /// one dies ([`Client::resume`]); `None` from a gateway outside a federation.
    pub fn resume_token(&self) -> Option<&str> {
        self.resume_token.as_deref()
    }

    /// The QUIC address of the gateway serving the session (the peer's after a redirect).
    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    /// The next video frame, in stream order; `Ok(None)` once the connection has closed.
    pub async fn next_frame(&mut self) -> Result<Option<VideoFrame>, ClientError> {
        self.frames.next().await
    }

    /// The next control event; `Ok(None)` after `Ended` or `Error`.
    pub async fn next_control(&mut self) -> Result<Option<ControlEvent>, ClientError> {
        self.control.next().await
    }

    /// Whichever comes first, a frame or a control event; `Ok(None)` when both are over.
    pub async fn next_event(&mut self) -> Result<Option<PlayEvent>, ClientError> {
        let mut frames_done = false;
        loop {
            if frames_done && self.control.finished {
                return Ok(None);
            }
            // Both branches are cancel-safe, so losing the race loses no data.
            tokio::select! {
                frame = self.frames.next(), if !frames_done => match frame? {
                    Some(f) => return Ok(Some(PlayEvent::Frame(f))),
                    None => frames_done = true,
                },
                control = self.control.next(), if !self.control.finished => {
                    if let Some(c) = control? {
                        return Ok(Some(PlayEvent::Control(c)));
                    }
                }
            }
        }
    }

    /// Sends one input event as a datagram; returns its sequence number.
    pub fn send_input(&self, event: InputEvent) -> Result<u64, ClientError> {
        self.input.send(event)
    }

    /// Asks for a keyframe over the reliable control stream.
    pub async fn request_keyframe(&mut self) -> Result<(), ClientError> {
        self.control.request_keyframe().await
    }

    /// Asks to change the picture size and frame rate; see [`PlayControl::set_video`].
    pub async fn set_video(
        &mut self,
        width: u32,
        height: u32,
        fps: u32,
    ) -> Result<(), ClientError> {
        self.control.set_video(width, height, fps).await
    }

    /// Sends `Close` and finishes the control stream; keep reading [`PlaySession::next_control`]
    /// to see the gateway's `Ended`.
    pub async fn close(&mut self, reason: &str) -> Result<(), ClientError> {
        self.control.close(reason).await
    }

    /// The session's sound: audio datagrams the gateway forwards, read as they arrive. Take it
    /// once per session (datagrams go to whichever reader asks first), before or after
    /// [`PlaySession::split`].
    pub fn audio(&self) -> AudioStream {
        AudioStream {
            conn: self.input.conn.clone(),
            session_id: self.input.session_id,
            malformed: 0,
            foreign: 0,
            _hold: self.input._hold.clone(),
        }
    }

    /// Splits into independently usable parts.
    pub fn split(self) -> (PlayControl, FrameStream, InputSender) {
        (self.control, self.frames, self.input)
    }
}

/// The play session's bidirectional control stream.
///
/// Dropping it (or the [`PlaySession`]) without [`PlayControl::close`] cancels the session: the
/// stream is reset and the gateway ends the session at once (outcome `client_left`), so a
/// session the application lost track of never keeps running on a live connection.
#[derive(Debug)]
pub struct PlayControl {
    send: quinn::SendStream,
    recv: FramedRecv,
    addr: SocketAddr,
    finished: bool,
    /// `Close` was sent.
    closed: bool,
    /// A redirected session's own client (see [`Client::play`]).
    _hold: Option<Arc<Client>>,
}

impl Drop for PlayControl {
    fn drop(&mut self) {
        if !self.closed && !self.finished {
            let _ = self.send.reset(app_code::STREAM_CANCELLED);
        }
    }
}

impl PlayControl {
    /// The next control event; `Ok(None)` after `Ended` or `Error`. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<ControlEvent>, ClientError> {
        if self.finished {
            return Ok(None);
        }
        let msg = self
            .recv
            .next()
            .await
            .map_err(|e| stream_err(self.addr, e))?;
        let event = match msg {
            Some(Message::Paused(p)) => ControlEvent::Paused(p),
            Some(Message::Resumed) => ControlEvent::Resumed,
            Some(Message::Ended(e)) => ControlEvent::Ended(e),
            Some(Message::Error(e)) if e.code == VIDEO_REFUSED => ControlEvent::VideoRefused(e),
            Some(Message::Error(e)) => ControlEvent::Error(e),
            Some(Message::SetVideo(v)) => ControlEvent::VideoChanged(v),
            Some(Message::Rumble(r)) => ControlEvent::Rumble(r),
            Some(other) => {
                self.finished = true;
                return Err(ClientError::Unexpected {
                    addr: self.addr,
                    expected: "Paused, Resumed, Ended, Error, SetVideo or Rumble",
                    got: other.name(),
                });
            }
            None => {
                self.finished = true;
                return Err(ClientError::EndedEarly {
                    addr: self.addr,
                    expected: "Ended",
                });
            }
        };
        self.finished = matches!(event, ControlEvent::Ended(_) | ControlEvent::Error(_));
        Ok(Some(event))
    }

    /// Asks for a keyframe.
    pub async fn request_keyframe(&mut self) -> Result<(), ClientError> {
        stream::send(&mut self.send, &Message::ForceKeyframe)
            .await
            .map_err(|e| stream_err(self.addr, e))
    }

    /// Asks to change the picture size and frame rate mid-session. The answer comes as a
    /// control event: [`ControlEvent::VideoChanged`] with the values in force, or
    /// [`ControlEvent::VideoRefused`] saying why (out of the gateway's limits, too many changes
    /// a second, a frame source of fixed size).
    pub async fn set_video(
        &mut self,
        width: u32,
        height: u32,
        fps: u32,
    ) -> Result<(), ClientError> {
        let msg = Message::SetVideo(SetVideo { width, height, fps });
        stream::send(&mut self.send, &msg)
            .await
            .map_err(|e| stream_err(self.addr, e))
    }

    /// Sends `Close` and finishes the stream; the gateway answers with `Ended`.
    pub async fn close(&mut self, reason: &str) -> Result<(), ClientError> {
        let close = Message::Close(Close {
            reason: reason.to_string(),
        });
        stream::send(&mut self.send, &close)
            .await
            .map_err(|e| stream_err(self.addr, e))?;
        self.closed = true;
        self.send
            .finish()
            .map_err(|e| stream_err(self.addr, e.into()))
    }
}

/// Video frames of a play session, read by a background task in stream order.
#[derive(Debug)]
pub struct FrameStream {
    rx: mpsc::Receiver<Result<VideoFrame, ClientError>>,
    reader: tokio::task::JoinHandle<()>,
    _guard: ActiveGuard,
    _hold: Option<Arc<Client>>,
}

impl FrameStream {
    /// The next frame; `Ok(None)` once the connection has closed. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<VideoFrame>, ClientError> {
        self.rx.recv().await.transpose()
    }
}

impl Drop for FrameStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads frame streams one after another, in the order the gateway opened them (which is frame
/// order), so the decoder gets frames in sequence.
async fn read_frames(
    conn: quinn::Connection,
    addr: SocketAddr,
    session_id: u64,
    tx: mpsc::Sender<Result<VideoFrame, ClientError>>,
) {
    loop {
        let result = match conn.accept_uni().await {
            Ok(recv) => match stream::recv_frame(recv, MAX_VIDEO_FRAME).await {
                Ok((header, _)) if header.session_id != session_id => {
                    Err(ClientError::WrongSession {
                        addr,
                        expected: session_id,
                        got: header.session_id,
                    })
                }
                Ok((header, payload)) => Ok(VideoFrame { header, payload }),
                // The relay gave the frame up at its deadline (dropped, not queued): skip it.
                Err(StreamError::Read(quinn::ReadError::Reset(code)))
                    if code == app_code::FRAME_DROPPED =>
                {
                    continue
                }
                // A bad or aborted frame spoils only itself (the gateway resets a frame whose
                // upstream failed); report it and keep reading.
                Err(e) => Err(stream_err(addr, e)),
            },
            // A closed connection ends the stream of frames: the channel closes and `next`
            // returns `None`.
            Err(_) => return,
        };
        if tx.send(result).await.is_err() {
            return;
        }
    }
}

/// Audio packets of a play session (Opus, 48 kHz stereo, usually 10 ms each), from the QUIC
/// datagrams the gateway forwards. Unreliable and unordered: order by `seq`, conceal gaps.
#[derive(Debug)]
pub struct AudioStream {
    conn: quinn::Connection,
    session_id: u64,
    malformed: u64,
    foreign: u64,
    _hold: Option<Arc<Client>>,
}

impl AudioStream {
    /// The next audio packet of this session; `None` once the connection has closed.
    /// Datagrams that are not valid audio, or name another session, are skipped and counted.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Option<crate::audio::AudioPacket> {
        loop {
            let dgram = self.conn.read_datagram().await.ok()?;
            match crate::audio::AudioPacket::decode(&dgram) {
                Ok(p) if p.session_id == self.session_id => return Some(p),
                Ok(_) => self.foreign += 1,
                Err(_) => self.malformed += 1,
            }
        }
    }

    /// Datagrams skipped so far: (not valid audio, another session's).
    pub fn skipped(&self) -> (u64, u64) {
        (self.malformed, self.foreign)
    }
}

/// Sends input datagrams; cheap to clone, shares the sequence counter.
#[derive(Debug, Clone)]
pub struct InputSender {
    conn: quinn::Connection,
    addr: SocketAddr,
    session_id: u64,
    seq: Arc<AtomicU64>,
    _hold: Option<Arc<Client>>,
}

impl InputSender {
    /// Sends one gamepad's whole state (input layout version 2): `pad` 0..=3, sticks (left x,
    /// left y, right x, right y), analog triggers (left, right; 0..=65535) and the standard
    /// layout's 17 buttons as bits ([`crate::input::STANDARD_BUTTONS`]). A pad out of range or
    /// buttons beyond the 17 are sent as they are and dropped by the gateway; send only state
    /// that changed.
    pub fn send_pad(
        &self,
        pad: u8,
        axes: [i16; 4],
        triggers: [u16; 2],
        buttons: u32,
    ) -> Result<u64, ClientError> {
        self.send(InputEvent::Gamepad {
            pad,
            axes,
            triggers,
            buttons,
        })
    }

    /// Sends `event` stamped with the next sequence number and the current time; returns the
    /// sequence number (compare with `FrameHeader::input_seq` for input-to-photon latency).
    pub fn send(&self, event: InputEvent) -> Result<u64, ClientError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let datagram = InputDatagram {
            session_id: self.session_id,
            seq,
            sent_ts_us: unix_micros(),
            event,
        };
        self.conn
            .send_datagram(Bytes::from(datagram.encode()))
            .map_err(|source| ClientError::Datagram {
                addr: self.addr,
                source,
            })?;
        Ok(seq)
    }
}

/// Counts a play session's frames by their `seq`: received, reordered (arrived after a later
/// frame), duplicated, and missing (never received). Frames travel on their own streams, and the
/// gateway forwards each as soon as its header is in, so a frame may overtake an earlier one on
/// a path that reorders packets; that frame is late, not lost. A sequence number counts as
/// missing once it is more than `window` frames behind the newest one (or at
/// [`FrameSeqStats::finish`]) without having arrived; one that arrives later after all is
/// counted `late` and no longer missing. Memory is bounded by the window whatever seqs a
/// gateway sends.
///
/// The node's `seq` restarts when a session moves to another node: call
/// [`FrameSeqStats::restart`] on [`ControlEvent::Resumed`]. A seq more than `window` below the
/// newest is taken for such a restart too (the `Resumed` notice and the new node's first frames
/// travel on different streams, so either may come first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameSeqStats {
    window: u64,
    /// Newest seq of the current run (since the start or the last restart).
    highest: Option<u64>,
    /// Seqs below `highest` (and within the window) not received yet.
    gaps: BTreeSet<u64>,
    /// Frames received (duplicates excluded).
    pub received: u64,
    /// Frames that arrived after a frame with a higher seq.
    pub reordered: u64,
    /// Of those, frames that arrived after they had been counted missing.
    pub late: u64,
    /// Frames received twice.
    pub duplicates: u64,
    /// Seqs given up as missing so far (see [`FrameSeqStats::missing`]).
    expired: u64,
    /// Seqs counted missing in earlier runs (before a restart) or beyond the window.
    given_up: BTreeSet<u64>,
    /// Times the seq restarted (failovers).
    pub restarts: u64,
}

impl Default for FrameSeqStats {
    fn default() -> Self {
        Self::new(FrameSeqStats::DEFAULT_WINDOW)
    }
}

impl FrameSeqStats {
    /// 2 s of frames at 60 fps: far longer than any frame can be overtaken (the relay gives a
    /// frame up after `game.frame_budget_ms`).
    pub const DEFAULT_WINDOW: u64 = 120;

    /// Counts with a reordering window of `window` frames (at least 1).
    pub fn new(window: u64) -> FrameSeqStats {
        FrameSeqStats {
            window: window.max(1),
            highest: None,
            gaps: BTreeSet::new(),
            received: 0,
            reordered: 0,
            late: 0,
            duplicates: 0,
            expired: 0,
            given_up: BTreeSet::new(),
            restarts: 0,
        }
    }

    /// Records a received frame's `seq`.
    pub fn record(&mut self, seq: u64) {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            self.received += 1;
            return;
        };
        if seq > highest {
            // Everything skipped is a gap for now; only the last `window` seqs are remembered
            // one by one (a bogus jump must not allocate), the rest are missing at once.
            let skipped = seq - highest - 1;
            let kept = skipped.min(self.window);
            self.expired += skipped - kept;
            self.gaps.extend(seq - kept..seq);
            self.highest = Some(seq);
            self.received += 1;
            self.expire(seq);
        } else if seq == highest {
            self.duplicates += 1;
        } else if highest - seq > self.window && !self.given_up.contains(&seq) {
            // Far below anything recent and never a gap: the node's seq restarted.
            self.restart();
            self.record(seq);
        } else if self.gaps.remove(&seq) {
            self.received += 1;
            self.reordered += 1;
        } else if self.given_up.remove(&seq) {
            self.received += 1;
            self.reordered += 1;
            self.late += 1;
            self.expired -= 1;
        } else {
            self.duplicates += 1;
        }
    }

    /// Starts a new run of seqs (the session moved to another node). Gaps of the old run are
    /// missing from now on.
    pub fn restart(&mut self) {
        if self.highest.is_none() {
            return;
        }
        self.expired += self.gaps.len() as u64;
        self.gaps.clear();
        self.given_up.clear();
        self.highest = None;
        self.restarts += 1;
    }

    /// Seqs never received: those given up so far plus, once [`FrameSeqStats::finish`] has run,
    /// the gaps still open at the end.
    pub fn missing(&self) -> u64 {
        self.expired
    }

    /// Gaps not yet decided (within the window of the newest frame).
    pub fn pending(&self) -> u64 {
        self.gaps.len() as u64
    }

    /// Ends the count: every open gap is missing.
    pub fn finish(&mut self) {
        self.expired += self.gaps.len() as u64;
        self.gaps.clear();
    }

    /// Moves gaps that fell out of the window behind `newest` to missing, remembering their
    /// seqs (up to another window) so that a very late arrival is still recognised.
    fn expire(&mut self, newest: u64) {
        let floor = newest.saturating_sub(self.window);
        while let Some(&gap) = self.gaps.first() {
            if gap >= floor {
                break;
            }
            self.gaps.remove(&gap);
            self.expired += 1;
            self.given_up.insert(gap);
        }
        let keep_from = floor.saturating_sub(self.window);
        self.given_up = self.given_up.split_off(&keep_from);
    }
}

#[cfg(test)]
mod seq_tests {
    use super::FrameSeqStats;

    fn count(seqs: &[u64], window: u64) -> FrameSeqStats {
        let mut s = FrameSeqStats::new(window);
        for &q in seqs {
            s.record(q);
        }
        s
    }

    #[test]
    fn reordered_frames_are_not_missing() {
        // 2 overtakes 1, 5 overtakes 4 and 3: nothing is lost.
        let mut s = count(&[0, 2, 1, 5, 3, 4, 6], 120);
        assert_eq!(s.pending(), 0);
        s.finish();
        assert_eq!(
            (s.received, s.reordered, s.missing(), s.duplicates),
            (7, 3, 0, 0)
        );
    }

    #[test]
    fn missing_is_what_never_arrived_by_the_end() {
        let mut s = count(&[0, 1, 3, 4, 7], 120);
        // 2, 5 and 6 may still come.
        assert_eq!((s.missing(), s.pending()), (0, 3));
        s.record(6);
        s.finish();
        assert_eq!((s.received, s.reordered, s.missing()), (6, 1, 2));
    }

    #[test]
    fn gaps_older_than_the_window_are_missing_and_a_late_one_is_taken_back() {
        let mut s = count(&[0, 2], 4);
        // 1 is still pending; 4 frames later it is given up.
        assert_eq!(s.missing(), 0);
        for q in 3..=6 {
            s.record(q);
        }
        assert_eq!((s.missing(), s.pending()), (1, 0));
        // It arrives after all: late and reordered, no longer missing.
        s.record(1);
        assert_eq!((s.missing(), s.late, s.reordered), (0, 1, 1));
        s.finish();
        assert_eq!((s.received, s.missing()), (7, 0));
    }

    #[test]
    fn duplicates_are_counted_apart() {
        let mut s = count(&[0, 1, 1, 2, 0], 120);
        s.finish();
        assert_eq!((s.received, s.duplicates, s.missing()), (3, 2, 0));
    }

    #[test]
    fn a_failover_restarts_the_count_without_inventing_gaps() {
        // Explicit restart on `Resumed`: 3 was lost on the old node.
        let mut s = count(&[0, 1, 2, 4], 120);
        s.restart();
        for q in 0..3 {
            s.record(q);
        }
        s.finish();
        assert_eq!(
            (s.received, s.missing(), s.restarts, s.duplicates),
            (7, 1, 1, 0)
        );
        // Frames of the new node before the `Resumed` notice: a seq far below is a restart.
        let mut s = count(&(0..300).collect::<Vec<_>>(), 120);
        s.record(0);
        s.record(1);
        s.finish();
        assert_eq!((s.received, s.missing(), s.restarts), (302, 0, 1));
    }

    #[test]
    fn a_huge_seq_jump_allocates_nothing_beyond_the_window() {
        let mut s = count(&[0, u64::MAX - 1], 8);
        assert_eq!(s.pending(), 8);
        assert_eq!(s.missing(), u64::MAX - 2 - 8);
        s.record(u64::MAX);
        s.finish();
        assert_eq!(s.missing(), u64::MAX - 2);
    }
}
