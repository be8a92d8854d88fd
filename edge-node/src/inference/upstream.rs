//! The production backend: relays to an OpenAI-compatible server running on the node (vLLM,
//! SGLang, llama.cpp server, Ollama, TGI) over plain HTTP/1.1 with keep-alive.
//!
//! Every request goes upstream as a stream (`stream: true`, `stream_options.include_usage: true`)
//! whatever the client asked, with `model` replaced by `upstream_model`; the node turns the
//! events into [`BackendEvent`]s and the gateway re-renders them for the client. Only text is
//! relayed (`delta.content` / `text`); tool-call deltas are not.
//!
//! `https` base URLs are refused: the upstream runs on the node itself, and the gateway link is
//! already encrypted. A server that ignores `stream` and answers with one JSON document is
//! accepted too. When the upstream reports no usage, prompt tokens are estimated with
//! [`approx_prompt_tokens`] and completion tokens are the number of text chunks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use nearpath_protocol::openai::{
    error_message_of, parse_stream_chunk, Endpoint, InferenceRequest, SseParser, StreamChunk, Usage,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{approx_prompt_tokens, Backend, BackendError, BackendEvent, EventResult, Generation};

/// The largest single SSE event accepted from upstream.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// The most of an error body read to find its message.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The largest non-streaming JSON answer accepted (from servers that ignore `stream`).
const MAX_JSON_BODY: usize = 16 * 1024 * 1024;
/// Connecting to a server on the same machine either works at once or not at all.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After `[DONE]`, how long to wait for the end of the body so the connection can be reused.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(100);

/// Where and how to reach the upstream server.
#[derive(Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Base URL ending in `/v1`, e.g. `http://127.0.0.1:8000/v1`. Plain `http` only.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// The model name upstream; `None` keeps the name the client asked for.
    pub upstream_model: Option<String>,
    /// Whole-request timeout (connect, headers and the entire stream), in milliseconds.
    pub timeout_ms: u64,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("upstream_model", &self.upstream_model)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Why an upstream configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("upstream base_url {url:?} is not a valid URL: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "upstream base_url {url:?} uses https, which the edge node does not speak to its \
         upstream: the inference server runs on the node itself, so use plain http (for example \
         http://127.0.0.1:8000/v1); the node-to-gateway link is encrypted already"
    )]
    HttpsUnsupported { url: String },
    #[error("upstream base_url {url:?} must start with http://")]
    UnsupportedScheme { url: String },
    #[error("upstream api_key contains characters not allowed in an HTTP header")]
    InvalidApiKey,
    #[error("upstream timeout_ms must be at least 1")]
    ZeroTimeout,
}

/// Relays generations to an OpenAI-compatible server. Cheap to share; connections are pooled.
#[derive(Debug, Clone)]
pub struct UpstreamBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client<HttpConnector, Full<Bytes>>,
    /// The base URL as configured, for error messages (without credentials: it has none).
    url: String,
    chat_uri: Uri,
    completion_uri: Uri,
    auth: Option<HeaderValue>,
    upstream_model: Option<String>,
    timeout: Duration,
}

impl UpstreamBackend {
    /// Validates the configuration and builds the (lazy) connection pool. No connection is made
    /// until the first request, so a server that starts later is fine.
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamConfigError> {
        let url = config.base_url.trim().to_owned();
        let invalid = |reason: &str| UpstreamConfigError::InvalidUrl {
            url: url.clone(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| invalid(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(s) if s.eq_ignore_ascii_case("https") => {
                return Err(UpstreamConfigError::HttpsUnsupported { url })
            }
            Some(_) => return Err(UpstreamConfigError::UnsupportedScheme { url }),
            None => return Err(invalid("missing http://")),
        }
        let Some(authority) = uri.authority() else {
            return Err(invalid("missing host"));
        };
        if authority.as_str().contains('@') {
            return Err(invalid("credentials belong in api_key, not in the URL"));
        }
        if uri.query().is_some() {
            return Err(invalid("a query string is not allowed"));
        }
        let base_path = uri.path().trim_end_matches('/');
        let endpoint_uri = |endpoint: Endpoint| -> Result<Uri, UpstreamConfigError> {
            format!("http://{authority}{base_path}{}", endpoint.sub_path())
                .parse()
                .map_err(|e: hyper::http::uri::InvalidUri| invalid(&e.to_string()))
        };
        let chat_uri = endpoint_uri(Endpoint::Chat)?;
        let completion_uri = endpoint_uri(Endpoint::Completion)?;
        let auth = match &config.api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| UpstreamConfigError::InvalidApiKey)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        if config.timeout_ms == 0 {
            return Err(UpstreamConfigError::ZeroTimeout);
        }
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout.min(MAX_CONNECT_TIMEOUT)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                url: url.trim_end_matches('/').to_owned(),
                chat_uri,
                completion_uri,
                auth,
                upstream_model: config.upstream_model,
                timeout,
            }),
        })
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.inner.url
    }
}

impl Backend for UpstreamBackend {
    fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        let inner = Arc::clone(&self.inner);
        let model = inner
            .upstream_model
            .clone()
            .unwrap_or_else(|| request.model.clone());
        let body = request.upstream_body(&model);
        let endpoint = request.endpoint;
        let estimated_prompt = approx_prompt_tokens(request);
        let (tx, generation) = Generation::channel();
        let deadline = Instant::now().checked_add(inner.timeout);
        tokio::spawn(async move {
            let relay = inner.relay(endpoint, model, body, estimated_prompt, &tx);
            let outcome = tokio::select! {
                biased;
                // The consumer is gone: dropping `relay` drops the response body, which closes
                // the upstream connection (and so stops the generation there).
                _ = tx.closed() => return,
                outcome = timeout_at_opt(deadline, relay) => outcome,
            };
            let result = match outcome {
                Some(Ok(leftover)) => {
                    if let Some(body) = leftover {
                        drain(body).await;
                    }
                    return;
                }
                Some(Err(e)) => e,
                None => BackendError::UpstreamTimeout {
                    url: inner.url.clone(),
                    timeout_ms: u64::try_from(inner.timeout.as_millis()).unwrap_or(u64::MAX),
                },
            };
            let _ = tx.send(Err(result)).await;
        });
        Ok(generation)
    }

    fn kind(&self) -> &'static str {
        "upstream"
    }
}

/// Runs `fut` until `deadline` (`None` when the deadline is beyond representation).
async fn timeout_at_opt<F: std::future::Future>(
    deadline: Option<Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Reads what is left of a finished response so the pooled connection can be reused; gives up
/// (closing the connection) if the server keeps it open.
async fn drain(mut body: Incoming) {
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// The text, finish reason and usage found so far in a stream.
#[derive(Default)]
struct StreamState {
    finish_reason: Option<String>,
    usage: Option<Usage>,
    chunks: u32,
    done: bool,
}

impl Inner {
    fn unavailable(&self, reason: impl std::fmt::Display) -> BackendError {
        BackendError::UpstreamUnavailable {
            url: self.url.clone(),
            reason: reason.to_string(),
        }
    }

    fn protocol(&self, detail: impl Into<String>) -> BackendError {
        BackendError::UpstreamProtocol {
            url: self.url.clone(),
            detail: detail.into(),
        }
    }

    /// Sends the request and relays the answer. Returns the response body when it is worth
    /// draining for connection reuse.
    async fn relay(
        &self,
        endpoint: Endpoint,
        model: String,
        body: Vec<u8>,
        estimated_prompt: u32,
        tx: &mpsc::Sender<EventResult>,
    ) -> Result<Option<Incoming>, BackendError> {
        let uri = match endpoint {
            Endpoint::Chat => self.chat_uri.clone(),
            Endpoint::Completion => self.completion_uri.clone(),
            Endpoint::Embeddings | Endpoint::Responses => {
                return Err(BackendError::BadRequest {
                    url: self.url.clone(),
                    status: 400,
                    message: format!("{} is not relayed by this node", endpoint.path()),
                })
            }
        };
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "text/event-stream");
        if let Some(auth) = &self.auth {
            builder = builder.header(header::AUTHORIZATION, auth.clone());
        }
        let request =
            builder
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| BackendError::Internal {
                    detail: format!("building the upstream request: {e}"),
                })?;
        let response = self.client.request(request).await.map_err(|e| {
            if e.is_connect() {
                self.unavailable(error_chain(&e))
            } else {
                BackendError::UpstreamError {
                    url: self.url.clone(),
                    status: None,
                    message: error_chain(&e),
                }
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.status_error(status, model, response.into_body()).await);
        }
        let is_json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("application/json"));
        let mut body = response.into_body();
        if is_json {
            self.relay_json(body, estimated_prompt, tx).await?;
            return Ok(None);
        }
        let mut parser = SseParser::new(MAX_EVENT_BYTES);
        let mut state = StreamState::default();
        while !state.done {
            let Some(frame) = body.frame().await else {
                break;
            };
            let frame = frame.map_err(|e| BackendError::UpstreamError {
                url: self.url.clone(),
                status: None,
                message: format!("the stream broke: {}", error_chain(&e)),
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers carry nothing we use
            };
            parser
                .push(&data)
                .map_err(|e| self.protocol(e.to_string()))?;
            while let Some(event) = parser.next_event() {
                if !self.on_event(&event.data, &mut state, tx).await? {
                    return Ok(None);
                }
                if state.done {
                    break;
                }
            }
        }
        let Some(finish_reason) = state.finish_reason else {
            return Err(self.protocol(if state.done {
                "[DONE] came without a finish_reason"
            } else {
                "the stream ended before [DONE] or a finish_reason"
            }));
        };
        let usage = state.usage.unwrap_or(Usage {
            prompt_tokens: estimated_prompt,
            completion_tokens: state.chunks,
        });
        let done = BackendEvent::Done {
            finish_reason,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        };
        if tx.send(Ok(done)).await.is_err() {
            return Ok(None);
        }
        // Servers that close right after the finish chunk (no [DONE]) need no draining.
        Ok(state.done.then_some(body))
    }

    /// Handles one SSE payload. Returns false when the consumer is gone.
    async fn on_event(
        &self,
        data: &str,
        state: &mut StreamState,
        tx: &mpsc::Sender<EventResult>,
    ) -> Result<bool, BackendError> {
        let chunk = parse_stream_chunk(data).map_err(|e| {
            let mut excerpt: String = data.chars().take(120).collect();
            if excerpt.len() < data.len() {
                excerpt.push('…');
            }
            self.protocol(format!("{e} in event {excerpt:?}"))
        })?;
        match chunk {
            StreamChunk::Done => state.done = true,
            StreamChunk::Chunk {
                text,
                finish_reason,
                usage,
            } => {
                if let Some(text) = text.filter(|t| !t.is_empty()) {
                    state.chunks = state.chunks.saturating_add(1);
                    if tx.send(Ok(BackendEvent::Token { text })).await.is_err() {
                        return Ok(false);
                    }
                }
                if finish_reason.is_some() {
                    state.finish_reason = finish_reason;
                }
                if usage.is_some() {
                    state.usage = usage;
                }
            }
            StreamChunk::Error {
                message,
                error_type,
                code,
            } => {
                let detail = match (error_type, code) {
                    (Some(t), Some(c)) => format!(" ({t}, {c})"),
                    (Some(x), None) | (None, Some(x)) => format!(" ({x})"),
                    (None, None) => String::new(),
                };
                return Err(BackendError::UpstreamError {
                    url: self.url.clone(),
                    status: None,
                    message: format!("{message}{detail}"),
                });
            }
        }
        Ok(true)
    }

    /// A server that ignored `stream: true` answered with one `chat.completion` or
    /// `text_completion` document: relay it as one token and `Done`.
    async fn relay_json(
        &self,
        body: Incoming,
        estimated_prompt: u32,
        tx: &mpsc::Sender<EventResult>,
    ) -> Result<(), BackendError> {
        let bytes = Limited::new(body, MAX_JSON_BODY)
            .collect()
            .await
            .map_err(|e| self.protocol(format!("reading the JSON answer: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| self.protocol(format!("the JSON answer does not parse: {e}")))?;
        let choice = &value["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str())
            .ok_or_else(|| self.protocol("the JSON answer has no choices[0] text"))?;
        let finish_reason = choice["finish_reason"]
            .as_str()
            .unwrap_or("stop")
            .to_owned();
        let count = |key: &str| {
            value["usage"][key]
                .as_u64()
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        };
        let prompt_tokens = count("prompt_tokens").unwrap_or(estimated_prompt);
        let completion_tokens = count("completion_tokens").unwrap_or(u32::from(!text.is_empty()));
        if !text.is_empty() {
            let token = BackendEvent::Token {
                text: text.to_owned(),
            };
            if tx.send(Ok(token)).await.is_err() {
                return Ok(());
            }
        }
        let _ = tx
            .send(Ok(BackendEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }))
            .await;
        Ok(())
    }

    /// Maps a non-2xx answer to an error carrying the upstream's own message.
    async fn status_error(
        &self,
        status: StatusCode,
        model: String,
        body: Incoming,
    ) -> BackendError {
        let bytes = Limited::new(body, MAX_ERROR_BODY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let message = error_message_of(&bytes).unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("no message").to_owned()
            } else {
                text.chars().take(300).collect()
            }
        });
        let url = self.url.clone();
        match status.as_u16() {
            404 => BackendError::ModelNotFound {
                url,
                model,
                message,
            },
            s @ (401 | 403) => BackendError::UpstreamAuth {
                url,
                status: s,
                message,
            },
            // 429 is the upstream's capacity, not the request's fault: another node may serve it.
            s @ (429 | 500..=599) => BackendError::UpstreamError {
                url,
                status: Some(s),
                message,
            },
            s @ 400..=499 => BackendError::BadRequest {
                url,
                status: s,
                message,
            },
            s => self.protocol(format!("unexpected HTTP status {s}: {message}")),
        }
    }
}

/// An error with its causes, e.g. "client error (Connect): tcp connect error: Connection
/// refused (os error 111)", so logs say what actually happened.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Some errors repeat their source in their own message.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::openai_server::tests::TestServer;
    use super::super::{ServerOptions, SimBackend, SimConfig};
    use super::*;
    use serde_json::json;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    fn chat_request(model: &str, extra: Value) -> InferenceRequest {
        let mut v =
            json!({"model": model, "messages": [{"role": "user", "content": "Relay me, please."}]});
        if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), extra) {
            obj.extend(extra);
        }
        match InferenceRequest::parse(Endpoint::Chat, v.to_string().as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn backend(
        addr: SocketAddr,
        key: Option<&str>,
        upstream_model: Option<&str>,
    ) -> UpstreamBackend {
        match UpstreamBackend::new(UpstreamConfig {
            base_url: format!("http://{addr}/v1/"),
            api_key: key.map(str::to_owned),
            upstream_model: upstream_model.map(str::to_owned),
            timeout_ms: 10_000,
        }) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs a generation to its end: tokens, then the final Done or error.
    async fn run(b: &dyn Backend, r: &InferenceRequest) -> (Vec<String>, EventResult) {
        let mut g = match b.start(r) {
            Ok(g) => g,
            Err(e) => return (Vec::new(), Err(e)),
        };
        let mut tokens = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match g.next().await {
                    Some(Ok(BackendEvent::Token { text })) => tokens.push(text),
                    Some(end) => return end,
                    None => panic!("generation ended without Done or error"),
                }
            }
        })
        .await;
        match end {
            Ok(end) => (tokens, end),
            Err(_) => panic!("generation did not finish in 10 s"),
        }
    }

    fn fast() -> SimConfig {
        SimConfig {
            ttft_ms: 0,
            tokens_per_s: 0.0,
            seed: 5,
        }
    }

    fn with_key(key: &str) -> ServerOptions {
        ServerOptions {
            api_key: Some(key.to_owned()),
            ..ServerOptions::default()
        }
    }

    #[tokio::test]
    async fn relays_the_simulator_token_for_token() {
        let server = TestServer::start(fast(), with_key("sk-up")).await;
        let up = backend(server.addr, Some("sk-up"), Some("sim-model"));
        for (endpoint, body) in [
            (
                Endpoint::Chat,
                json!({"model": "public", "max_tokens": 17, "messages": [{"role": "user", "content": "Relay, please."}]}),
            ),
            (
                Endpoint::Completion,
                json!({"model": "public", "max_tokens": 9, "prompt": "Once upon a time"}),
            ),
            (
                Endpoint::Chat,
                json!({"model": "public", "max_tokens": 30, "stop": ["edge"], "messages": [{"role": "user", "content": "stop early"}]}),
            ),
        ] {
            let client_req = match InferenceRequest::parse(endpoint, body.to_string().as_bytes()) {
                Ok(r) => r,
                Err(e) => panic!("{e}"),
            };
            // What the simulator itself produces for the upstream's view of the request.
            let mut direct_body = body.clone();
            direct_body["model"] = json!("sim-model");
            let direct_req =
                match InferenceRequest::parse(endpoint, direct_body.to_string().as_bytes()) {
                    Ok(r) => r,
                    Err(e) => panic!("{e}"),
                };
            let direct = run(&SimBackend::new(fast()), &direct_req).await;
            let relayed = run(&up, &client_req).await;
            assert!(!direct.0.is_empty());
            assert_eq!(relayed, direct, "{endpoint:?} {body}");
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn cancellation_closes_the_upstream_request() {
        // One token at once, the next 10 s later: only a closed connection can end it sooner.
        let slow = SimConfig {
            ttft_ms: 0,
            tokens_per_s: 0.1,
            seed: 0,
        };
        let server = TestServer::start(slow, ServerOptions::default()).await;
        let up = backend(server.addr, None, Some("sim-model"));
        let mut active = server.sim.watch_active();
        let mut g = match up.start(&chat_request(
            "x",
            json!({"stream": true, "max_tokens": 100}),
        )) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let first = tokio::time::timeout(Duration::from_secs(5), g.next()).await;
        assert!(
            matches!(first, Ok(Some(Ok(BackendEvent::Token { .. })))),
            "{first:?}"
        );
        assert_eq!(server.sim.active(), 1);
        drop(g);
        let stopped = tokio::time::timeout(Duration::from_secs(5), active.wait_for(|n| *n == 0))
            .await
            .map(|r| r.map(|n| *n));
        assert!(
            matches!(stopped, Ok(Ok(0))),
            "the server kept generating after the relay was dropped"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn maps_upstream_failures() {
        let server = TestServer::start(fast(), with_key("sk-up")).await;
        // Unknown upstream model -> 404.
        let (_, end) = run(
            &backend(server.addr, Some("sk-up"), Some("nope")),
            &chat_request("m", json!({})),
        )
        .await;
        match end {
            Err(e @ BackendError::ModelNotFound { .. }) => {
                assert!(e.to_string().contains("`nope` does not exist"), "{e}");
                assert!(e.retryable());
            }
            other => panic!("expected ModelNotFound, got {other:?}"),
        }
        // Wrong key -> 401.
        let (_, end) = run(
            &backend(server.addr, Some("sk-wrong"), Some("sim-model")),
            &chat_request("m", json!({})),
        )
        .await;
        assert!(
            matches!(end, Err(BackendError::UpstreamAuth { status: 401, .. })),
            "{end:?}"
        );
        // The upstream validates something the node let through -> 400 with the upstream's words.
        let mut bad = chat_request("m", json!({}));
        bad.raw.insert("temperature".into(), json!(7));
        let (_, end) = run(
            &backend(server.addr, Some("sk-up"), Some("sim-model")),
            &bad,
        )
        .await;
        match end {
            Err(e @ BackendError::BadRequest { status: 400, .. }) => {
                assert!(e.to_string().contains("temperature"), "{e}");
                assert!(!e.retryable());
                assert_eq!(e.code(), "bad_request");
            }
            other => panic!("expected BadRequest, got {other:?}"),
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn upstream_down_is_retryable_unavailable() {
        let addr = {
            let l = match TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => panic!("{e}"),
            };
            match l.local_addr() {
                Ok(a) => a,
                Err(e) => panic!("{e}"),
            }
        };
        let (tokens, end) = run(&backend(addr, None, None), &chat_request("m", json!({}))).await;
        assert!(tokens.is_empty());
        match end {
            Err(e @ BackendError::UpstreamUnavailable { .. }) => {
                assert!(e.retryable());
                assert_eq!(e.code(), "upstream_unavailable");
                assert!(e.to_string().contains(&addr.to_string()), "{e}");
            }
            other => panic!("expected UpstreamUnavailable, got {other:?}"),
        }
    }

    /// A one-shot HTTP server that captures the request and answers with `response` (or never
    /// answers when it is `None`).
    async fn canned(response: Option<Vec<u8>>) -> (SocketAddr, oneshot::Receiver<String>) {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        let _ = tx.send(text);
                        break;
                    }
                }
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            match response {
                Some(response) => {
                    let _ = sock.write_all(&response).await;
                    let _ = sock.shutdown().await;
                }
                None => std::future::pending::<()>().await,
            }
        });
        (addr, rx)
    }

    fn sse_response(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn sends_a_streaming_request_and_parses_sse_variants() {
        // Comments, CRLF line ends, a JSON chunk split over two data lines, an event type,
        // usage in the last chunk; no [DONE] (the server closes after the finish).
        let body = ": ping\r\n\r\n\
            data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n\r\n\
            event: message\r\ndata: {\"choices\":[{\"index\":0,\r\ndata: \"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n\
            data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}}\r\n\r\n";
        let (addr, request) = canned(Some(sse_response(body))).await;
        let req = chat_request("public", json!({"stream": false, "max_tokens": 3}));
        let (tokens, end) = run(&backend(addr, Some("sk-1"), Some("org/model")), &req).await;
        assert_eq!(tokens, ["Hel", "lo"]);
        assert_eq!(
            end,
            Ok(BackendEvent::Done {
                finish_reason: "stop".into(),
                prompt_tokens: 4,
                completion_tokens: 2
            })
        );
        let sent = match request.await {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert!(
            sent.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{sent}"
        );
        assert!(
            sent.to_ascii_lowercase()
                .contains("\r\nauthorization: bearer sk-1\r\n"),
            "{sent}"
        );
        let json_start = sent.find("\r\n\r\n").map_or(0, |i| i + 4);
        let sent_body: Value = serde_json::from_str(&sent[json_start..]).unwrap_or_default();
        assert_eq!(sent_body["model"], "org/model");
        assert_eq!(sent_body["stream"], true);
        assert_eq!(sent_body["stream_options"], json!({"include_usage": true}));
        assert_eq!(sent_body["max_tokens"], 3);
    }

    #[tokio::test]
    async fn estimates_usage_when_the_upstream_sends_none() {
        let body = "data: {\"choices\":[{\"index\":0,\"text\":\" a\"}]}\n\n\
                    data: {\"choices\":[{\"index\":0,\"text\":\" b\",\"finish_reason\":\"length\"}]}\n\n\
                    data: [DONE]\n\n";
        let (addr, _request) = canned(Some(sse_response(body))).await;
        let req = match InferenceRequest::parse(
            Endpoint::Completion,
            br#"{"model":"m","prompt":"one two, three"}"#,
        ) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let (tokens, end) = run(&backend(addr, None, None), &req).await;
        assert_eq!(tokens, [" a", " b"]);
        assert_eq!(
            end,
            Ok(BackendEvent::Done {
                finish_reason: "length".into(),
                prompt_tokens: 4,
                completion_tokens: 2
            })
        );
    }

    #[tokio::test]
    async fn in_band_errors_and_garbage() {
        let cases = [
            (
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\ndata: {\"error\":{\"message\":\"CUDA out of memory\",\"type\":\"InternalServerError\",\"code\":500}}\n\n",
                1,
                "upstream_error",
                "CUDA out of memory",
            ),
            ("data: {\"choices\": [oops\n\n", 0, "upstream_protocol", "oops"),
            ("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n", 1, "upstream_protocol", "ended before"),
            ("<html>hello</html>", 0, "upstream_protocol", "ended before"),
        ];
        for (body, n_tokens, code, needle) in cases {
            let (addr, _request) = canned(Some(sse_response(body))).await;
            let (tokens, end) =
                run(&backend(addr, None, None), &chat_request("m", json!({}))).await;
            assert_eq!(tokens.len(), n_tokens, "{body}");
            match end {
                Err(e) => {
                    assert_eq!(e.code(), code, "{body}: {e}");
                    assert!(e.to_string().contains(needle), "{e}");
                }
                other => panic!("{body}: expected an error, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn status_errors_and_json_answers() {
        let cases: [(&str, &str, Option<u16>); 3] = [
            ("HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: 35\r\nconnection: close\r\n\r\n{\"error\":{\"message\":\"engine dead\"}}", "upstream_error", Some(500)),
            ("HTTP/1.1 429 Too Many Requests\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy", "upstream_error", Some(429)),
            ("HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 0\r\nconnection: close\r\n\r\n", "bad_request", None),
        ];
        for (response, code, status) in cases {
            let (addr, _request) = canned(Some(response.as_bytes().to_vec())).await;
            let (_, end) = run(&backend(addr, None, None), &chat_request("m", json!({}))).await;
            match end {
                Err(e) => {
                    assert_eq!(e.code(), code, "{e}");
                    if let BackendError::UpstreamError { status: s, .. } = &e {
                        assert_eq!(*s, status);
                        assert!(e.retryable());
                    }
                    if status == Some(500) {
                        assert!(e.to_string().contains("engine dead"), "{e}");
                    }
                    if status.is_none() {
                        assert!(e.to_string().contains("Unprocessable Entity"), "{e}");
                        assert_eq!(e.api_error().status, 422);
                    }
                }
                other => panic!("expected {code}, got {other:?}"),
            }
        }
        let doc = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"whole answer"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{doc}",
            doc.len()
        );
        let (addr, _request) = canned(Some(response.into_bytes())).await;
        let (tokens, end) = run(&backend(addr, None, None), &chat_request("m", json!({}))).await;
        assert_eq!(tokens, ["whole answer"]);
        assert_eq!(
            end,
            Ok(BackendEvent::Done {
                finish_reason: "stop".into(),
                prompt_tokens: 3,
                completion_tokens: 2
            })
        );
    }

    #[tokio::test]
    async fn times_out_a_silent_upstream() {
        let (addr, _request) = canned(None).await;
        let up = match UpstreamBackend::new(UpstreamConfig {
            base_url: format!("http://{addr}/v1"),
            api_key: None,
            upstream_model: None,
            timeout_ms: 150,
        }) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        let started = std::time::Instant::now();
        let (_, end) = run(&up, &chat_request("m", json!({}))).await;
        assert!(
            matches!(
                end,
                Err(BackendError::UpstreamTimeout {
                    timeout_ms: 150,
                    ..
                })
            ),
            "{end:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[test]
    fn validates_the_base_url() {
        let make = |url: &str, key: Option<&str>, timeout_ms: u64| {
            UpstreamBackend::new(UpstreamConfig {
                base_url: url.to_owned(),
                api_key: key.map(str::to_owned),
                upstream_model: None,
                timeout_ms,
            })
            .map(|b| b.base_url().to_owned())
        };
        assert_eq!(
            make("http://127.0.0.1:8000/v1/", None, 1),
            Ok("http://127.0.0.1:8000/v1".into())
        );
        match make("https://127.0.0.1:8000/v1", None, 1) {
            Err(e @ UpstreamConfigError::HttpsUnsupported { .. }) => {
                assert!(e.to_string().contains("use plain http"), "{e}")
            }
            other => panic!("https accepted: {other:?}"),
        }
        assert!(matches!(
            make("ftp://h/v1", None, 1),
            Err(UpstreamConfigError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            make("127.0.0.1:8000/v1", None, 1),
            Err(UpstreamConfigError::InvalidUrl { .. })
        ));
        assert!(matches!(
            make("http://u:p@h/v1", None, 1),
            Err(UpstreamConfigError::InvalidUrl { .. })
        ));
        assert!(matches!(
            make("http://h/v1?x=1", None, 1),
            Err(UpstreamConfigError::InvalidUrl { .. })
        ));
        assert!(matches!(
            make("http://h/v1", Some("bad\nkey"), 1),
            Err(UpstreamConfigError::InvalidApiKey)
        ));
        assert!(matches!(
            make("http://h/v1", None, 0),
            Err(UpstreamConfigError::ZeroTimeout)
        ));
        let debug = format!(
            "{:?}",
            UpstreamConfig {
                base_url: "http://h/v1".into(),
                api_key: Some("sk-secret".into()),
                upstream_model: None,
                timeout_ms: 1,
            }
        );
        assert!(!debug.contains("sk-secret"), "{debug}");
    }
}
