//! Native clients over QUIC (ALPN `nearpath/1`): each request is a bidirectional stream whose
//! first message carries the API key, so the gateway keeps no per-connection auth state.
//!
//! The front end only speaks the native protocol: inference is [`InferService`]'s (this renders
//! its pump's output as `InferStarted`/`Token`/`Chunk`/`Done`/`Error` frames; a `Chunk` carries
//! the same JSON an HTTP client gets), game sessions are served
//! by the [`PlayService`] injected at assembly.

use crate::access::{AccessLine, TraceParent};
use crate::clock::SharedClock;
use crate::conn_guard::QuicGate;
use crate::error::CoreError;
use crate::infer::{new_request_id, Gone, InferService, Output, Relay};
use nearpath_config::{QuicConfig, WorkloadKind};
use nearpath_protocol::app_code::{CLOSE_PROTOCOL, CLOSE_SHUTDOWN};
use nearpath_protocol::message::{
    Chunk, Done, ErrorInfo, GameList, InferRequest, InferStarted, Message, PlayRequest, PlayResume,
    PlayTicket, Redirect, Token,
};
use nearpath_protocol::openai::{ApiError, InferenceRequest};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::{MAX_REQUEST_FRAME, PROTOCOL_VERSION};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

/// Concurrent requests one authenticated native client connection may have in flight.
const CLIENT_BIDI_STREAMS: u32 = 256;

/// How long a request stream may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Game sessions for native players (`PlayRequest` streams and input datagrams).
pub trait PlayService: Send + Sync + 'static {
    /// Reads a connection's input datagrams until it closes.
    fn input_loop(&self, conn: quinn::Connection) -> Pin<Box<dyn Future<Output = ()> + Send>>;
    /// Serves one `PlayRequest` stream (it authenticates the key and answers a bad one itself).
    fn serve_play(
        &self,
        conn: quinn::Connection,
        tx: quinn::SendStream,
        rx: FramedRecv,
        req: PlayRequest,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
    /// Serves one `PlayTicket` stream (a client a peer gateway redirected here).
    fn serve_ticket(
        &self,
        conn: quinn::Connection,
        tx: quinn::SendStream,
        rx: FramedRecv,
        req: PlayTicket,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
    /// Serves one `PlayResume` stream (a player whose gateway died resumes here).
    fn serve_resume(
        &self,
        conn: quinn::Connection,
        tx: quinn::SendStream,
        rx: FramedRecv,
        req: PlayResume,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The native client front end.
pub struct QuicClients {
    infer: Arc<InferService>,
    play: Arc<dyn PlayService>,
    gate: Arc<QuicGate>,
    quic: QuicConfig,
    shutdown: CancellationToken,
}

/// The native `Error` message for a core error.
fn error_msg(e: &CoreError) -> Message {
    Message::Error(ErrorInfo {
        code: e.quic_code().to_string(),
        message: e.message.clone(),
        retryable: e.retryable,
    })
}

/// Sends `msg` as the stream's last message.
async fn answer(tx: &mut quinn::SendStream, msg: &Message) {
    let _ = send(tx, msg).await;
    let _ = tx.finish();
}

impl QuicClients {
    pub fn new(
        infer: Arc<InferService>,
        play: Arc<dyn PlayService>,
        gate: Arc<QuicGate>,
        quic: QuicConfig,
        shutdown: CancellationToken,
    ) -> QuicClients {
        QuicClients {
            infer,
            play,
            gate,
            quic,
            shutdown,
        }
    }

    /// Raises a native client connection's limits after a request on it authenticated (once).
    fn authenticated(&self, conn: &quinn::Connection) {
        if self.gate.authenticated(conn.stable_id()) {
            conn.set_receive_window(
                quinn::VarInt::from_u64(self.quic.client_receive_window_bytes)
                    .unwrap_or(quinn::VarInt::MAX),
            );
            conn.set_max_concurrent_bi_streams(CLIENT_BIDI_STREAMS.into());
        }
    }

    /// Serves one client connection until it closes or the gateway shuts down.
    pub async fn handle(self: Arc<Self>, conn: quinn::Connection) {
        let peer = conn.remote_address();
        let span = info_span!("client", %peer, conn = conn.stable_id());
        let inputs = tokio::spawn(self.play.input_loop(conn.clone()));
        // A connection that never authenticates a request only costs: it must do so soon.
        let auth_deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.quic.client_auth_timeout_ms);
        async move {
            let mut auth_pending = true;
            loop {
                let (tx, rx) = tokio::select! {
                    _ = tokio::time::sleep_until(auth_deadline), if auth_pending => {
                        auth_pending = self.gate.is_pending(conn.stable_id());
                        if auth_pending {
                            debug!("no request authenticated in time; closing");
                            conn.close(CLOSE_PROTOCOL, b"authentication timeout");
                            inputs.abort();
                            return;
                        }
                        continue;
                    }
                    r = conn.accept_bi() => match r {
                        Ok(s) => s,
                        Err(e) => {
                            debug!(error = %e, "client connection closed");
                            inputs.abort();
                            return;
                        }
                    },
                    _ = self.shutdown.cancelled() => {
                        conn.close(CLOSE_SHUTDOWN, b"gateway shutting down");
                        return;
                    }
                };
                let this = self.clone();
                let conn = conn.clone();
                tokio::spawn(
                    async move { this.serve_stream(conn, tx, rx).await }.in_current_span(),
                );
            }
        }
        .instrument(span)
        .await
    }

    async fn serve_stream(
        &self,
        conn: quinn::Connection,
        mut tx: quinn::SendStream,
        rx: quinn::RecvStream,
    ) {
        let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
        let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, framed.next()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Err(e)) => {
                answer(
                    &mut tx,
                    &error_msg(&CoreError::bad_request(e.to_string(), None)),
                )
                .await;
                return;
            }
            _ => return,
        };
        match first {
            Message::InferRequest(r) => self.serve_infer(conn, tx, framed, r, None).await,
            // A request another gateway of the federation redirected here.
            Message::InferTicket(t) => {
                let r = InferRequest {
                    protocol_version: t.protocol_version,
                    api_key: t.api_key,
                    endpoint: t.endpoint,
                    request_json: t.request_json,
                };
                self.serve_infer(conn, tx, framed, r, Some(t.ticket)).await
            }
            Message::ListGames(l) => {
                let reply = match self.infer.auth.authenticate(Some(&l.api_key)).await {
                    Ok(_) => {
                        self.authenticated(&conn);
                        Message::GameList(GameList {
                            titles: self.game_titles(&conn),
                        })
                    }
                    Err(e) => error_msg(&e.with_retryable(false)),
                };
                answer(&mut tx, &reply).await;
            }
            Message::PlayRequest(r) => {
                // serve_play authenticates again (a cache hit) and answers a bad key itself.
                if self.infer.auth.authenticate(Some(&r.api_key)).await.is_ok() {
                    self.authenticated(&conn);
                }
                self.play.serve_play(conn, tx, framed, r).await
            }
            Message::PlayTicket(t) => {
                if self.infer.auth.authenticate(Some(&t.api_key)).await.is_ok() {
                    self.authenticated(&conn);
                }
                self.play.serve_ticket(conn, tx, framed, t).await
            }
            Message::PlayResume(r) => {
                if self.infer.auth.authenticate(Some(&r.api_key)).await.is_ok() {
                    self.authenticated(&conn);
                }
                self.play.serve_resume(conn, tx, framed, r).await
            }
            other => {
                let e = CoreError::bad_request(
                    format!("unexpected first message {}", other.name()),
                    None,
                );
                answer(&mut tx, &error_msg(&e)).await;
            }
        }
    }

    /// The titles this client may play: the same listing as `GET /v1/games`.
    fn game_titles(&self, conn: &quinn::Connection) -> Vec<String> {
        let loc = self.infer.placement.geo.lookup(conn.remote_address().ip());
        self.infer
            .directory
            .visible(&self.infer.placement, &loc, WorkloadKind::Game)
            .into_iter()
            .collect()
    }

    async fn serve_infer(
        &self,
        conn: quinn::Connection,
        tx: quinn::SendStream,
        framed: FramedRecv,
        r: InferRequest,
        ticket: Option<String>,
    ) {
        let infer = &self.infer;
        let started = infer.clock.now();
        let request_id = new_request_id();
        // Native clients send no trace context: each request starts a trace, whose root is this
        // request's span when spans are exported.
        let span = info_span!("quic_request", id = %request_id);
        let trace = TraceParent::for_span(&span, None);
        self.serve_infer_in(conn, tx, framed, r, ticket, request_id, started, trace)
            .instrument(span)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_infer_in(
        &self,
        conn: quinn::Connection,
        mut tx: quinn::SendStream,
        framed: FramedRecv,
        r: InferRequest,
        ticket: Option<String>,
        request_id: String,
        started: std::time::Instant,
        trace: TraceParent,
    ) {
        let infer = &self.infer;
        let refused = |e: &CoreError, key_id: Option<&str>, model: Option<&str>| {
            let trace_id = trace.trace_id_hex();
            AccessLine {
                entry: "quic",
                method: "INFER",
                path: r.endpoint.path(),
                status: e.to_api().status,
                request_id: &request_id,
                trace_id: Some(&trace_id),
                key_id,
                model,
                duration_ms: u64::try_from(
                    infer
                        .clock
                        .now()
                        .saturating_duration_since(started)
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
                outcome: e.kind.as_str(),
                ..AccessLine::default()
            }
            .emit();
        };
        if r.protocol_version != PROTOCOL_VERSION {
            let msg = Message::Error(ErrorInfo {
                code: "version".into(),
                message: format!("protocol version {} is not supported", r.protocol_version),
                retryable: false,
            });
            answer(&mut tx, &msg).await;
            return;
        }
        // A redirected request's ticket is checked with the key it comes with (the native
        // client keeps its key across the hop).
        let opened = match &ticket {
            Some(t) => infer
                .open_ticket(t, Some(&r.api_key))
                .await
                .map(|(k, c)| (k, Some(c))),
            None => infer
                .auth
                .authenticate(Some(&r.api_key))
                .await
                .map(|k| (k, None)),
        };
        let (key, claims) = match opened {
            Ok(k) => {
                self.authenticated(&conn);
                k
            }
            Err(e) => {
                refused(&e, None, None);
                return answer(&mut tx, &error_msg(&e)).await;
            }
        };
        let request = match InferenceRequest::parse(r.endpoint, r.request_json.as_bytes()) {
            Ok(q) => q,
            Err(e) => {
                let e = CoreError::from_api(&ApiError::invalid_request(e));
                refused(&e, Some(&key.id), None);
                return answer(&mut tx, &error_msg(&e)).await;
            }
        };
        let client_ip = conn.remote_address().ip();
        let client = infer.placement.geo.lookup(client_ip);
        let pin = match &claims {
            Some(c) => {
                if let Err(e) =
                    infer.accept_ticket(c, Some(client_ip), &key, &request.model, r.endpoint)
                {
                    refused(&e, Some(&key.id), Some(&request.model));
                    return answer(&mut tx, &error_msg(&e)).await;
                }
                Some(c.node_id.as_str())
            }
            None => match infer
                .redirect_for(&key, "quic", &request, &client, Some(client_ip))
                .await
            {
                Ok(None) => None,
                Ok(Some(to)) => {
                    // Nothing recorded here but the outcome: the peer admits and bills it.
                    let trace_id = trace.trace_id_hex();
                    AccessLine {
                        entry: "quic",
                        method: "INFER",
                        path: r.endpoint.path(),
                        status: 307,
                        request_id: &request_id,
                        trace_id: Some(&trace_id),
                        key_id: Some(&key.id),
                        model: Some(&request.model),
                        outcome: "redirected",
                        ..AccessLine::default()
                    }
                    .emit();
                    let msg = Message::Redirect(Redirect {
                        gateway_id: to.gateway.id.clone(),
                        quic_address: to.gateway.quic_address.clone(),
                        cert_sha256: to.gateway.cert_sha256.clone(),
                        http_url: to.gateway.http_url.clone(),
                        ticket: to.ticket,
                    });
                    return answer(&mut tx, &msg).await;
                }
                Err(e) => {
                    refused(&e, Some(&key.id), Some(&request.model));
                    return answer(&mut tx, &error_msg(&e)).await;
                }
            },
        };
        // Held until this request ends, however it ends.
        let key_id = key.id.clone();
        let mut ticket = match infer
            .admit(key, "quic", &request_id, &request.model, started)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                refused(&e, Some(&key_id), Some(&request.model));
                return answer(&mut tx, &error_msg(&e)).await;
            }
        };
        ticket.endpoint = r.endpoint;
        ticket.traceparent = Some(trace.header());
        ticket.country = client.country;
        // A client that goes away while its request waits (queued for a slot, or for a node)
        // gives its place up at once: dropping the dispatch leaves the queue.
        let started_or_gone = tokio::select! {
            r = infer.start(&ticket, &request, &r.request_json, &client, pin) => Some(r),
            _ = conn.closed() => None,
        };
        let stream = match started_or_gone {
            Some(Ok(s)) => s,
            Some(Err(e)) => return answer(&mut tx, &error_msg(&e)).await,
            None => return,
        };
        let mut relay = QuicRelay {
            tx,
            framed,
            conn,
            client_sending: true,
            clock: infer.clock.clone(),
            started,
            index: 0,
            request_id,
            // A fallback model's name when one serves the request (`InferStarted.model`).
            model: stream.model.clone(),
        };
        infer.pump(ticket, stream, &mut relay).await;
    }
}

/// Native rendering of an inference: `InferStarted`, `Token`s, then `Done` or `Error`.
struct QuicRelay {
    tx: quinn::SendStream,
    framed: FramedRecv,
    conn: quinn::Connection,
    /// A client finishes its send side after the request; only a reset (or `Close`) cancels.
    client_sending: bool,
    clock: SharedClock,
    started: Instant,
    index: u32,
    request_id: String,
    model: String,
}

impl Relay for QuicRelay {
    async fn send(&mut self, out: Output<'_>) -> Result<u64, Gone> {
        let (msg, last) = match out {
            Output::Started => (
                Message::InferStarted(InferStarted {
                    request_id: self.request_id.clone(),
                    model: self.model.clone(),
                }),
                false,
            ),
            Output::Token(text) => {
                self.index += 1;
                (
                    Message::Token(Token {
                        index: self.index - 1,
                        text: text.to_string(),
                        node_elapsed_us: self
                            .clock
                            .now()
                            .saturating_duration_since(self.started)
                            .as_micros() as u64,
                    }),
                    false,
                )
            }
            // The client is told what it is billed, not what the node claimed.
            Output::Done {
                finish_reason,
                usage,
            } => (
                Message::Done(Done {
                    finish_reason: finish_reason.to_string(),
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                }),
                true,
            ),
            // The same JSON an HTTP client gets.
            Output::Chunk { json, .. } => {
                self.index += 1;
                (
                    Message::Chunk(Chunk {
                        index: self.index - 1,
                        json: json.to_string(),
                        node_elapsed_us: self
                            .clock
                            .now()
                            .saturating_duration_since(self.started)
                            .as_micros() as u64,
                    }),
                    false,
                )
            }
            Output::Failed(e) => (error_msg(e), true),
        };
        send(&mut self.tx, &msg).await.map_err(|_| Gone)?;
        if last {
            let _ = self.tx.finish();
        }
        Ok(0)
    }

    async fn gone(&mut self) {
        while self.client_sending {
            tokio::select! {
                m = self.framed.next() => match m {
                    Ok(None) => self.client_sending = false,
                    Ok(Some(Message::Close(_))) | Err(_) => return,
                    Ok(Some(_)) => {}
                },
                // A client that vanishes (connection closed) cancels too.
                _ = self.conn.closed() => return,
            }
        }
        self.conn.closed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(m: Message) -> (String, bool) {
        match m {
            Message::Error(e) => (e.code, e.retryable),
            other => panic!("expected Error, got {}", other.name()),
        }
    }

    #[test]
    fn native_error_codes_come_from_the_error_kind_not_a_status() {
        let cases = [
            (CoreError::model_unavailable("m"), "model_unavailable", true),
            (CoreError::model_not_found("m"), "model_not_found", false),
            (CoreError::geofence_denied("r", "no"), "geofence", false),
            (CoreError::invalid_api_key(), "unauthorized", false),
            (CoreError::key_revoked(), "key_revoked", false),
            (CoreError::bad_request("x", None), "bad_request", false),
            (CoreError::timeout("slow"), "timeout", true),
            (CoreError::node_failed("n", "boom"), "upstream", true),
            (
                crate::auth::ledger_unavailable(),
                "ledger_unavailable",
                true,
            ),
            (
                CoreError::from_api(&ApiError::rate_limited("full")),
                "rate_limited",
                true,
            ),
        ];
        for (e, code, retryable) in cases {
            assert_eq!(info(error_msg(&e)), (code.to_string(), retryable), "{e:?}");
        }
    }

    #[test]
    fn a_per_key_stream_cap_keeps_its_own_code() {
        let limiter = crate::auth::RateLimiter::default();
        let key = crate::store::ApiKey {
            id: "k".into(),
            tenant: "t".into(),
            requests_per_minute: 60,
            tokens_per_minute: 60,
            created_at_ms: 0,
            revoked: false,
            prefix: "npk_".into(),
            caps: Default::default(),
            policy: Default::default(),
        };
        let refusal = limiter
            .acquire(&key, crate::auth::CapKind::Stream, 0)
            .err()
            .expect("a cap of 0 refuses");
        assert_eq!(
            info(error_msg(&refusal.core_error())),
            ("concurrency_limit_exceeded".to_string(), true)
        );
    }
}
