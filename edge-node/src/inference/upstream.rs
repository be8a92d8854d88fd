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
    error_message_of, parse_stream_chunk, Endpoint, InferenceRequest, SseParser, StreamChunk,
    Usage,
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
        let uri: Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| {
            invalid(&e.to_string())
        })?;
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
async fn timeout_at_opt<F: std::future::Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
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
        };
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "text/event-stream");
        if let Some(auth) = &self.auth {
            builder = builder.header(header::AUTHORIZATION, auth.clone());
        }
        let request = builder
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
        let finish_reason = choice["finish_reason"].as_str().unwrap_or("stop").to_owned();
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
    async fn status_error(&self, status: StatusCode, model: String, body: Incoming) -> BackendError {
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
