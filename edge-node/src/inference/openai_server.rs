//! An OpenAI-compatible HTTP server over a [`ModelRegistry`]: `GET /v1/models`,
//! `POST /v1/chat/completions` and `POST /v1/completions`, streaming (SSE) or not, over HTTP/1.1
//! and HTTP/2 (cleartext).
//!
//! It lets the upstream backend be tested against a real server, serves the simulator to plain
//! OpenAI clients, and is the "client straight to the node's backend" baseline in benchmarks.
//! Streaming responses are produced by the body itself (no task per request): each poll takes
//! the generation's next event and renders it, so a closed connection drops the generation and
//! stops the work.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use nearpath_protocol::openai::{
    models_list_with_availability, responses_sse_event, rewrite_chunk, sse_event, ApiError,
    Assembler, EmbeddingsAssembler, Endpoint, InferenceRequest, Input, RelayError, RewriteContext,
    StreamRenderer, Usage, SSE_CONTENT_TYPE, SSE_DONE,
};
use nearpath_protocol::ModelCaps;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{BackendEvent, EventResult, Generation, ModelRegistry};

/// Server settings.
#[derive(Clone)]
pub struct ServerOptions {
    /// When set, requests must carry `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// `owned_by` in `/v1/models`.
    pub owned_by: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            max_body_bytes: 4 * 1024 * 1024,
            owned_by: "nearpath".to_owned(),
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("owned_by", &self.owned_by)
            .finish()
    }
}

/// Why the server refuses to start with the options it was given.
#[derive(Debug, thiserror::Error)]
pub enum ExposureError {
    /// A keyless server on an address other machines can reach would give anyone there the
    /// node's models (and its GPU time).
    #[error(
        "refusing to serve the OpenAI API on {addr} without an API key: {addr} is not a loopback \
         address, so anyone who can reach it could use this node's models. Set an API key with \
         --api-key-file FILE or the NEARPATH_OPENAI_API_KEY environment variable, or listen on \
         loopback (--listen 127.0.0.1:8000)"
    )]
    KeylessNonLoopback { addr: SocketAddr },
}

/// Checks that serving on `listen` with `options` does not expose the models to the network
/// without a key: any address but loopback needs [`ServerOptions::api_key`] (non-empty).
pub fn check_exposure(listen: SocketAddr, options: &ServerOptions) -> Result<(), ExposureError> {
    let keyed = options.api_key.as_deref().is_some_and(|k| !k.is_empty());
    if keyed || listen.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(ExposureError::KeylessNonLoopback { addr: listen })
    }
}

struct State {
    registry: Arc<ModelRegistry>,
    options: ServerOptions,
    /// `created` of every model in `/v1/models`: when this server started.
    started: u64,
}

/// Serves the OpenAI API on `listener` with default [`ServerOptions`] until `shutdown` is
/// cancelled; see [`serve_openai_with`].
pub async fn serve_openai(
    listener: TcpListener,
    registry: Arc<ModelRegistry>,
    shutdown: CancellationToken,
) {
    serve_openai_with(listener, registry, ServerOptions::default(), shutdown).await;
}

/// Serves the OpenAI API on `listener` until `shutdown` is cancelled. Then it stops accepting,
/// lets each connection finish the response in progress (streams run to their end), and returns
/// when every connection has closed.
pub async fn serve_openai_with(
    listener: TcpListener,
    registry: Arc<ModelRegistry>,
    options: ServerOptions,
    shutdown: CancellationToken,
) {
    let state = Arc::new(State {
        registry,
        options,
        started: unix_now(),
    });
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Usually out of file descriptors: back off briefly instead of spinning.
                tracing::warn!(error = %e, "openai server: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Tokens are small writes that must leave at once.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "openai server: set_nodelay failed");
        }
        let state = Arc::clone(&state);
        let service = hyper::service::service_fn(move |req| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(handle(req, &state).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "openai server: connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

async fn handle(req: Request<Incoming>, state: &State) -> Response<OpenAiBody> {
    // Echo a sane client request id, or make one, so logs on both sides can be joined.
    let request_id = req
        .headers()
        .get("x-request-id")
        .filter(|v| v.len() <= 128)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&new_id("req_")).unwrap_or(HeaderValue::from_static("req"))
        });
    let mut response = match route(req, state).await {
        Ok(response) => response,
        Err(e) => error_response(&e),
    };
    response.headers_mut().insert("x-request-id", request_id);
    response
}

async fn route(req: Request<Incoming>, state: &State) -> Result<Response<OpenAiBody>, ApiError> {
    let path = req.uri().path();
    if path == "/v1/models" || path == "/v1/models/" {
        if req.method() != Method::GET {
            return Err(ApiError::method_not_allowed(req.method().as_str(), path));
        }
        check_auth(&req, state)?;
        // Each entry says what the model can do, as the gateway's listing does.
        let names: Vec<(&str, u64, &str, bool, ModelCaps)> = state
            .registry
            .model_names()
            .map(|name| {
                let caps = state.registry.caps(name).unwrap_or_default();
                (
                    name,
                    state.started,
                    state.options.owned_by.as_str(),
                    true,
                    caps,
                )
            })
            .collect();
        return Ok(json_response(
            StatusCode::OK,
            models_list_with_availability(&names),
        ));
    }
    let Some(endpoint) = Endpoint::from_path(path) else {
        return Err(ApiError::not_found(path));
    };
    if req.method() != Method::POST {
        return Err(ApiError::method_not_allowed(req.method().as_str(), path));
    }
    check_auth(&req, state)?;
    // Passed on to an upstream server as headers, so its logs join the caller's.
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let trace = (header("x-request-id"), header("traceparent"));
    let limit = state.options.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    let body = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::bad_request(format!("Could not read the request body: {e}"), None)
            }
        })?
        .to_bytes();
    let mut request = InferenceRequest::parse(endpoint, &body)?;
    (request.request_id, request.traceparent) = trace;
    let mut generation = state.registry.start(&request).map_err(|e| e.api_error())?;
    let id = new_id(endpoint.id_prefix());
    let created = unix_now();
    if request.stream {
        // Wait for the first event before committing to 200, so a backend that fails at once
        // (upstream 4xx/5xx, unreachable) gets a proper status instead of an in-band error.
        let first = match generation.next().await {
            Some(Ok(event)) => event,
            Some(Err(e)) => return Err(e.api_error()),
            None => return Err(died()),
        };
        let renderer = StreamRenderer::new(endpoint, &id, created, &request.model);
        let body = SseBody {
            generation,
            renderer,
            id,
            created,
            model: request.model.clone(),
            include_usage: request.include_usage,
            queue: VecDeque::with_capacity(4),
            first: Some(Ok(first)),
            role_sent: false,
            finish_sent: false,
            finished: false,
        };
        let mut response = Response::new(OpenAiBody::Sse(Box::new(body)));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(SSE_CONTENT_TYPE),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(response);
    }
    // The same assembly the gateway does: tool calls, logprobs and every other field kept.
    let mut assembler = Assembler::new(endpoint);
    let mut embeddings = EmbeddingsAssembler::new(match &request.input {
        Input::Embed(inputs) => u32::try_from(inputs.len()).unwrap_or(u32::MAX),
        _ => 0,
    });
    let malformed = |e: RelayError| ApiError::internal(format!("the backend's answer: {e}"));
    loop {
        match generation.next().await {
            Some(Ok(BackendEvent::Token { text })) => assembler.push_text(&text),
            Some(Ok(BackendEvent::Chunk { json })) if endpoint == Endpoint::Embeddings => {
                embeddings.push_chunk(&json).map_err(malformed)?
            }
            Some(Ok(BackendEvent::Chunk { json })) => {
                assembler.push_chunk(&json).map_err(malformed)?
            }
            Some(Ok(BackendEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            })) => {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                };
                let body = match endpoint {
                    Endpoint::Embeddings => embeddings.finish(&request.model, prompt_tokens),
                    _ => assembler.finish(&id, created, &request.model, &finish_reason, usage),
                }
                .map_err(malformed)?;
                return Ok(json_response(StatusCode::OK, body));
            }
            Some(Err(e)) => return Err(e.api_error()),
            None => return Err(died()),
        }
    }
}

fn died() -> ApiError {
    ApiError::internal("The inference backend stopped without finishing the generation.")
}

/// Accepts `Authorization: Bearer <key>` when a key is configured.
fn check_auth(req: &Request<Incoming>, state: &State) -> Result<(), ApiError> {
    let Some(expected) = &state.options.api_key else {
        return Ok(());
    };
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::missing_api_key());
    };
    let value = value.as_bytes();
    let presented = match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => value[7..].trim_ascii(),
        _ => return Err(ApiError::missing_api_key()),
    };
    if constant_time_eq(presented, expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::invalid_api_key())
    }
}

/// Compares without an early exit, so response timing does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_response(status: StatusCode, body: String) -> Response<OpenAiBody> {
    let mut response = Response::new(OpenAiBody::Full(Some(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(e: &ApiError) -> Response<OpenAiBody> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, e.body());
    let headers = response.headers_mut();
    headers.insert(
        "x-should-retry",
        HeaderValue::from_static(if e.should_retry() { "true" } else { "false" }),
    );
    if e.status == 429 {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The response body: a whole JSON document, or an SSE stream rendered from a generation.
pub(crate) enum OpenAiBody {
    Full(Option<Bytes>),
    Sse(Box<SseBody>),
}

pub(crate) struct SseBody {
    generation: Generation,
    renderer: StreamRenderer,
    /// The response's identity, written into the backend's chunks.
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// Events rendered but not yet handed to hyper (the role event; the closing events).
    queue: VecDeque<Bytes>,
    /// The first event, taken before the headers were sent.
    first: Option<EventResult>,
    /// The role chunk went out (ours, or the backend's first chunk carried `role`).
    role_sent: bool,
    /// A backend chunk carried a `finish_reason`: no finish chunk of our own follows.
    finish_sent: bool,
    finished: bool,
}

impl SseBody {
    /// Queues our role chunk unless it went out already or `backend_has_role`.
    fn role(&mut self, backend_has_role: bool) {
        if !self.role_sent {
            self.role_sent = true;
            if !backend_has_role {
                self.queue.extend(self.renderer.role_event());
            }
        }
    }

    /// Queues one backend piece: a chat or completions chunk rewritten with this response's
    /// identity ([`rewrite_chunk`]), a Responses event as its own SSE event type.
    fn chunk(&mut self, json: &str) {
        let endpoint = self.renderer.endpoint();
        let ctx = RewriteContext {
            endpoint,
            id: &self.id,
            created: self.created,
            model: &self.model,
            // The node's own backend is trusted with its choices.
            n: u32::MAX,
            usage: Usage::default(),
        };
        match endpoint {
            Endpoint::Responses => {
                let ty = serde_json::from_str::<serde_json::Value>(json)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                    .filter(|t| t.bytes().all(|b| b.is_ascii_graphic()))
                    .unwrap_or_default();
                self.queue.push_back(responses_sse_event(&ty, json));
            }
            Endpoint::Embeddings => self.queue.push_back(sse_event(json)),
            Endpoint::Chat | Endpoint::Completion => match rewrite_chunk(json, &ctx) {
                Ok((json, info)) => {
                    self.role(info.has_role);
                    self.finish_sent |= !info.finished.is_empty();
                    self.queue.push_back(sse_event(&json));
                }
                Err(e) => {
                    let e = ApiError::internal(format!("the backend's answer: {e}"));
                    self.queue.push_back(e.sse_event());
                    self.finished = true;
                }
            },
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if let Some(bytes) = self.queue.pop_front() {
                return Poll::Ready(Some(bytes));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            let event = match self.first.take() {
                Some(event) => Some(event),
                None => ready!(self.generation.poll_next(cx)),
            };
            match event {
                Some(Ok(BackendEvent::Token { text })) => {
                    self.role(false);
                    self.queue.push_back(self.renderer.token_event(&text));
                }
                Some(Ok(BackendEvent::Chunk { json })) => self.chunk(&json),
                Some(Ok(BackendEvent::Done { .. }))
                    if self.renderer.endpoint() == Endpoint::Responses =>
                {
                    // A Responses stream ends with its terminal event, which the backend sent.
                    self.finished = true;
                }
                Some(Ok(BackendEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                })) => {
                    self.role(false);
                    if !self.finish_sent {
                        self.queue
                            .push_back(self.renderer.finish_event(&finish_reason));
                    }
                    if self.include_usage {
                        self.queue.push_back(self.renderer.usage_event(Usage {
                            prompt_tokens,
                            completion_tokens,
                        }));
                    }
                    self.queue
                        .push_back(Bytes::from_static(SSE_DONE.as_bytes()));
                    self.finished = true;
                }
                // After the headers, an error can only be reported in-band; the stream then ends
                // without [DONE] so clients see it as a failure.
                Some(Err(e)) => {
                    self.queue.push_back(e.api_error().sse_event());
                    self.finished = true;
                }
                None => {
                    self.queue.push_back(died().sse_event());
                    self.finished = true;
                }
            }
        }
    }
}

impl Body for OpenAiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            OpenAiBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            OpenAiBody::Sse(sse) => sse
                .poll_event(cx)
                .map(|event| event.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OpenAiBody::Full(bytes) => bytes.is_none(),
            OpenAiBody::Sse(sse) => sse.finished && sse.queue.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OpenAiBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            OpenAiBody::Full(None) => SizeHint::with_exact(0),
            OpenAiBody::Sse(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::inference::{Backend, SimBackend, SimConfig};
    use http_body_util::Full;
    use hyper::HeaderMap;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use serde_json::{json, Value};
    use std::net::SocketAddr;

    #[test]
    fn serve_openai_refuses_a_keyless_non_loopback_address() {
        let keyless = ServerOptions::default();
        let keyed = ServerOptions {
            api_key: Some("sk-node".into()),
            ..ServerOptions::default()
        };
        let empty_key = ServerOptions {
            api_key: Some(String::new()),
            ..ServerOptions::default()
        };
        for open in [
            "0.0.0.0:8000",
            "[::]:8000",
            "192.0.2.7:8000",
            "[2001:db8::1]:80",
        ] {
            let addr: SocketAddr = open.parse().unwrap();
            let err = check_exposure(addr, &keyless).unwrap_err().to_string();
            assert!(err.contains("--api-key-file"), "{err}");
            assert!(err.contains(&addr.to_string()), "{err}");
            assert!(check_exposure(addr, &empty_key).is_err(), "{open}");
            check_exposure(addr, &keyed).unwrap();
        }
        for local in [
            "127.0.0.1:8000",
            "127.3.4.5:1",
            "[::1]:8000",
            "[::ffff:127.0.0.1]:80",
        ] {
            check_exposure(local.parse().unwrap(), &keyless).unwrap();
        }
    }

    pub(crate) struct TestServer {
        pub addr: SocketAddr,
        pub sim: Arc<SimBackend>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl TestServer {
        /// A server with model `sim-model` (limit 2) served by `config`'s simulator.
        pub async fn start(config: SimConfig, options: ServerOptions) -> Self {
            let sim = Arc::new(SimBackend::new(config));
            let mut registry = ModelRegistry::new();
            let backend: Arc<dyn Backend> = sim.clone();
            if let Err(e) = registry.insert("sim-model", 2, backend) {
                panic!("{e}");
            }
            let listener = match TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => panic!("bind: {e}"),
            };
            let addr = match listener.local_addr() {
                Ok(a) => a,
                Err(e) => panic!("{e}"),
            };
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(serve_openai_with(
                listener,
                Arc::new(registry),
                options,
                shutdown.clone(),
            ));
            Self {
                addr,
                sim,
                shutdown,
                task,
            }
        }

        pub async fn stop(self) {
            self.shutdown.cancel();
            let stopped = tokio::time::timeout(Duration::from_secs(5), self.task).await;
            assert!(matches!(stopped, Ok(Ok(()))), "server did not stop");
        }
    }

    async fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match req.body(Full::new(Bytes::from(body.to_owned()))) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(e) => panic!("request failed: {e}"),
        };
        let (parts, body) = resp.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => panic!("body: {e}"),
        };
        (parts.status, parts.headers, body)
    }

    fn json_of(bytes: &[u8]) -> Value {
        match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)),
        }
    }

    fn fast() -> SimConfig {
        SimConfig {
            ttft_ms: 0,
            tokens_per_s: 0.0,
            seed: 11,
        }
    }

    /// The simulator's own output for `body` on `endpoint`.
    async fn expected(sim: &SimBackend, endpoint: Endpoint, body: &Value) -> (String, Value) {
        let req = match InferenceRequest::parse(endpoint, body.to_string().as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let mut g = match sim.start(&req) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let mut text = String::new();
        while let Some(ev) = g.next().await {
            match ev {
                Ok(BackendEvent::Token { text: t }) => text.push_str(&t),
                Ok(BackendEvent::Chunk { json }) => panic!("unexpected chunk {json}"),
                Ok(BackendEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    return (
                        text,
                        json!({"finish": finish_reason, "prompt": prompt_tokens, "completion": completion_tokens}),
                    )
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no Done")
    }

    #[tokio::test]
    async fn lists_models() {
        let server = TestServer::start(fast(), ServerOptions::default()).await;
        let (status, headers, body) = call(server.addr, "GET", "/v1/models", &[], "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        let v = json_of(&body);
        let created = v["data"][0]["created"].as_u64().unwrap_or(0);
        assert!(created > 1_600_000_000);
        assert_eq!(
            v,
            json!({"object": "list", "data": [{"id": "sim-model", "object": "model", "created": created, "owned_by": "nearpath",
                "available": true, "capabilities": ["tools", "json_mode", "json_schema", "logprobs", "embeddings", "n"]}]})
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn streams_chat_in_openai_shape() {
        let server = TestServer::start(fast(), ServerOptions::default()).await;
        let request = json!({
            "model": "sim-model", "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": 12, "messages": [{"role": "user", "content": "Stream, please."}]
        });
        let (status, headers, body) = call(
            server.addr,
            "POST",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-request-id", "abc-1"),
            ],
            &request.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"text/event-stream"[..])
        );
        assert_eq!(
            headers.get("x-request-id").map(|v| v.as_bytes()),
            Some(&b"abc-1"[..])
        );
        let text = String::from_utf8_lossy(&body).into_owned();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let events: Vec<&str> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap_or("<not a data event>"))
            .collect();
        // role, 12 tokens, finish, usage, [DONE]
        assert_eq!(events.len(), 16, "{text}");
        let chunks: Vec<Value> = events[..15].iter().map(|e| json_of(e.as_bytes())).collect();
        let id = chunks[0]["id"].clone();
        assert!(id.as_str().is_some_and(|s| s.starts_with("chatcmpl-")));
        for c in &chunks {
            assert_eq!(c["id"], id);
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["model"], "sim-model");
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let streamed: String = chunks[1..13]
            .iter()
            .map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or("<missing>")
            })
            .collect();
        let (want_text, want) = expected(&server.sim, Endpoint::Chat, &request).await;
        assert_eq!(streamed, want_text);
        assert_eq!(
            chunks[13]["choices"][0],
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"})
        );
        assert_eq!(chunks[14]["choices"], json!([]));
        assert_eq!(
            chunks[14]["usage"],
            json!({"prompt_tokens": want["prompt"], "completion_tokens": 12, "total_tokens": want["prompt"].as_u64().unwrap_or(0) + 12})
        );
        assert_eq!(events[15], "[DONE]");
        server.stop().await;
    }

    #[tokio::test]
    async fn streams_completions_without_usage_unless_asked() {
        let server = TestServer::start(fast(), ServerOptions::default()).await;
        let request =
            json!({"model": "sim-model", "stream": true, "max_tokens": 3, "prompt": "Hi"});
        let (status, _, body) = call(
            server.addr,
            "POST",
            "/v1/completions",
            &[],
            &request.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8_lossy(&body).into_owned();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5, "3 tokens, finish, [DONE]: {text}");
        let first = json_of(events[0].trim_start_matches("data: ").as_bytes());
        assert_eq!(first["object"], "text_completion");
        assert!(first["choices"][0]["text"].is_string());
        assert!(!text.contains("usage"));
        server.stop().await;
    }

    #[tokio::test]
    async fn answers_without_streaming() {
        let server = TestServer::start(fast(), ServerOptions::default()).await;
        let request = json!({"model": "sim-model", "max_tokens": 5, "stop": [], "prompt": "Once"});
        let (status, _, body) = call(
            server.addr,
            "POST",
            "/v1/completions",
            &[],
            &request.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let v = json_of(&body);
        let (want_text, want) = expected(&server.sim, Endpoint::Completion, &request).await;
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], json!(want_text));
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["prompt_tokens"], want["prompt"]);
        assert_eq!(v["usage"]["completion_tokens"], 5);
        let chat = json!({"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]});
        let (status, _, body) = call(
            server.addr,
            "POST",
            "/v1/chat/completions",
            &[],
            &chat.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let v = json_of(&body);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        server.stop().await;
    }

    /// `serve-openai` is honest on its own: a request needing what the model does not declare
    /// (the simulator cannot look at images) is a 400 naming the parameter, before any work.
    #[tokio::test]
    async fn serve_openai_refuses_an_undeclared_capability_naming_the_param() {
        let server = TestServer::start(SimConfig::default(), ServerOptions::default()).await;
        let body = json!({"model": "sim-model", "stream": true, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        ]}]});
        let (status, _, bytes) = call(
            server.addr,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            &body.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        assert_eq!(v["error"]["code"], "unsupported_parameter");
        assert_eq!(v["error"]["param"], "messages[0].content[1]");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(server.sim.active(), 0, "no generation was started");
        server.stop().await;
    }

    /// The simulator's tool call streams through `serve-openai` in OpenAI's shape: LangChain
    /// and the `openai` client rebuild the call from these deltas.
    #[tokio::test]
    async fn serve_openai_streams_the_simulators_tool_call() {
        let fast = SimConfig {
            ttft_ms: 0,
            tokens_per_s: 0.0,
            seed: 0,
        };
        let server = TestServer::start(fast, ServerOptions::default()).await;
        let body = json!({"model": "sim-model", "stream": true,
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
            "tool_choice": "required"});
        let (status, _, bytes) = call(
            server.addr,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            &body.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let events: Vec<Value> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect();
        let calls: Vec<&Value> = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0))
            .collect();
        assert_eq!(calls[0]["function"]["name"], "get_weather", "{text}");
        assert!(calls[0]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")));
        let args: String = calls
            .iter()
            .filter_map(|c| c["function"]["arguments"].as_str())
            .collect();
        let args: Value = serde_json::from_str(&args).unwrap_or_default();
        assert!(args["city"].is_string(), "{args}");
        assert!(
            events
                .iter()
                .any(|e| e["choices"][0]["finish_reason"] == "tool_calls"),
            "{text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        server.stop().await;
    }

    #[tokio::test]
    async fn error_statuses() {
        let options = ServerOptions {
            api_key: Some("sk-test".into()),
            max_body_bytes: 1024,
            ..ServerOptions::default()
        };
        let slow = SimConfig {
            ttft_ms: 60_000,
            tokens_per_s: 1.0,
            seed: 0,
        };
        let server = TestServer::start(slow, options).await;
        let auth = ("authorization", "Bearer sk-test");
        let chat = |model: &str| {
            json!({"model": model, "messages": [{"role": "user", "content": "x"}]}).to_string()
        };
        // (method, path, headers, body, status, error code)
        type Case<'a> = (
            &'a str,
            &'a str,
            Vec<(&'a str, &'a str)>,
            String,
            u16,
            Option<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "GET",
                "/v1/models",
                vec![],
                String::new(),
                401,
                Some("missing_api_key"),
            ),
            (
                "GET",
                "/v1/models",
                vec![("authorization", "Bearer nope")],
                String::new(),
                401,
                Some("invalid_api_key"),
            ),
            (
                "GET",
                "/v1/models",
                vec![("authorization", "Basic c2stdGVzdA==")],
                String::new(),
                401,
                Some("missing_api_key"),
            ),
            (
                "GET",
                "/v1/models",
                vec![("authorization", "bearer sk-test")],
                String::new(),
                200,
                None,
            ),
            (
                "GET",
                "/v1/chat/completions",
                vec![auth],
                String::new(),
                405,
                Some("method_not_allowed"),
            ),
            (
                "POST",
                "/v2/anything",
                vec![auth],
                String::new(),
                404,
                Some("not_found"),
            ),
            (
                "POST",
                "/v1/chat/completions",
                vec![auth],
                "{\"model\":".into(),
                400,
                Some("invalid_json"),
            ),
            (
                "POST",
                "/v1/chat/completions",
                vec![auth],
                chat("other"),
                404,
                Some("model_not_found"),
            ),
            (
                "POST",
                "/v1/chat/completions",
                vec![auth],
                "x".repeat(2000),
                413,
                Some("request_too_large"),
            ),
        ];
        for (method, path, headers, body, status, code) in cases {
            let (got, resp_headers, resp) = call(server.addr, method, path, &headers, &body).await;
            assert_eq!(
                got.as_u16(),
                status,
                "{method} {path}: {}",
                String::from_utf8_lossy(&resp)
            );
            if let Some(code) = code {
                let v = json_of(&resp);
                assert_eq!(v["error"]["code"], code, "{method} {path}");
                assert!(v["error"]["message"].is_string());
                assert_eq!(
                    resp_headers.get("x-should-retry").map(|v| v.as_bytes()),
                    Some(&b"false"[..])
                );
            }
        }
        // Fill the model's two slots with slow streams, then the third is refused with 429.
        let hold = |addr: SocketAddr| async move {
            let body = json!({"model": "sim-model", "stream": true, "messages": [{"role": "user", "content": "x"}]});
            call(
                addr,
                "POST",
                "/v1/chat/completions",
                &[("authorization", "Bearer sk-test")],
                &body.to_string(),
            )
            .await
        };
        let a = tokio::spawn(hold(server.addr));
        let b = tokio::spawn(hold(server.addr));
        let mut active = server.sim.watch_active();
        let filled = tokio::time::timeout(Duration::from_secs(5), active.wait_for(|n| *n == 2))
            .await
            .map(|r| r.map(|n| *n));
        assert!(matches!(filled, Ok(Ok(_))), "two streams did not start");
        let (status, headers, body) = call(
            server.addr,
            "POST",
            "/v1/chat/completions",
            &[auth],
            &chat("sim-model"),
        )
        .await;
        assert_eq!(status.as_u16(), 429);
        assert_eq!(
            headers.get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        assert_eq!(
            headers.get("x-should-retry").map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        assert_eq!(json_of(&body)["error"]["code"], "rate_limit_exceeded");
        // Dropping the waiting clients closes their connections; the server stops both streams.
        a.abort();
        b.abort();
        let drained = tokio::time::timeout(Duration::from_secs(5), active.wait_for(|n| *n == 0))
            .await
            .map(|r| r.map(|n| *n));
        assert!(
            matches!(drained, Ok(Ok(_))),
            "aborted streams kept generating"
        );
        server.stop().await;
    }

    /// A backend that answers every request with the same events.
    struct Scripted(Vec<BackendEvent>);

    impl Backend for Scripted {
        fn start(
            &self,
            _request: &InferenceRequest,
        ) -> Result<Generation, crate::inference::BackendError> {
            let (tx, generation) = Generation::channel();
            let events = self.0.clone();
            tokio::spawn(async move {
                for e in events {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(generation)
        }

        fn kind(&self) -> &'static str {
            "scripted"
        }
    }

    #[tokio::test]
    async fn the_nodes_own_server_passes_tool_calls_through_and_assembles_them() {
        let piece = |args: &str| {
            BackendEvent::Chunk {
            json: json!({"id": "up", "model": "up-model", "choices": [{"index": 0,
                "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                    "function": {"name": "f", "arguments": args}}]}, "finish_reason": null}],
                "usage": {"prompt_tokens": 1}})
            .to_string(),
        }
        };
        let backend: Arc<dyn Backend> = Arc::new(Scripted(vec![
            piece("{\"a\":"),
            piece("1}"),
            BackendEvent::Chunk {
                json:
                    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
                        .to_string(),
            },
            BackendEvent::Done {
                finish_reason: "tool_calls".into(),
                prompt_tokens: 3,
                completion_tokens: 2,
            },
        ]));
        let mut registry = ModelRegistry::new();
        if let Err(e) = registry.insert("tools", 2, backend) {
            panic!("{e}");
        }
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_openai_with(
            listener,
            Arc::new(registry),
            ServerOptions::default(),
            shutdown.clone(),
        ));
        let body = json!({"model": "tools", "messages": [{"role": "user", "content": "x"}]});
        let (status, _, bytes) =
            call(addr, "POST", "/v1/chat/completions", &[], &body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        let v = json_of(&bytes);
        assert_eq!(v["model"], "tools");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        assert_eq!(
            choice["message"]["tool_calls"],
            json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}])
        );
        let body = json!({"model": "tools", "stream": true, "messages": [{"role": "user", "content": "x"}]});
        let (status, _, bytes) =
            call(addr, "POST", "/v1/chat/completions", &[], &body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let events: Vec<&str> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .collect();
        // The backend's three chunks (it sent the role; it sent the finish), then [DONE].
        assert_eq!(events.len(), 4, "{text}");
        assert_eq!(events[3], "[DONE]");
        for e in &events[..3] {
            let c: Value = serde_json::from_str(e).unwrap_or_default();
            assert_eq!(c["model"], "tools", "{e}");
            assert!(c.get("usage").is_none(), "{e}");
        }
        shutdown.cancel();
    }
}
