//! The production backend: relays to an OpenAI-compatible server running on the node (vLLM,
//! SGLang, llama.cpp server, Ollama, TGI) over plain HTTP/1.1 with keep-alive.
//!
//! Every chat or completions request goes upstream as a stream (`stream: true`,
//! `stream_options.include_usage: true`) whatever the client asked, with `model` replaced by
//! `upstream_model` and every other field as the client sent it. Each upstream chunk is relayed
//! faithfully: a chunk that is only text for choice 0 becomes a [`BackendEvent::Token`] (the fast
//! path; its `finish_reason`, if any, travels in `Done`), anything else (tool-call deltas,
//! logprobs, reasoning, several choices, vendor fields) a [`BackendEvent::Chunk`] with the
//! upstream's object minus `usage`, which is read for `Done`. Embeddings go to `{base}/embeddings`
//! and each `data[]` element is relayed as a `Chunk`. The request's `x-request-id` and
//! `traceparent` go upstream as headers.
//!
//! `https` base URLs are refused: the upstream runs on the node itself, and the gateway link is
//! already encrypted. A server that ignores `stream` and answers with one JSON document is
//! accepted too (its choices are relayed as `Chunk`s). When the upstream reports no usage, prompt
//! tokens are estimated with [`approx_prompt_tokens`] and completion tokens are the number of
//! chunks with generated content.

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
    error_message_of, generated_choices, parse_stream_chunk, Endpoint, InferenceRequest, SseParser,
    StreamChunk, Usage,
};
use serde_json::{Map, Value};
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
    embeddings_uri: Uri,
    /// `{base}/models`, where llama.cpp's server says how large the loaded weights are.
    models_uri: Uri,
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
        let embeddings_uri = endpoint_uri(Endpoint::Embeddings)?;
        let models_uri: Uri = format!("http://{authority}{base_path}/models")
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| invalid(&e.to_string()))?;
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
                embeddings_uri,
                models_uri,
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

    /// The size in bytes of the weights the upstream server has loaded for `model`, when it
    /// says (`None` when it does not): `GET {base}/models`, the entry whose `id` is `model`
    /// (or the only entry: llama.cpp's server lists its one model under its file path or
    /// alias), its `meta.size`. llama.cpp's server (`llama-server`) fills `meta` with
    /// `llama_model_size` (the bytes of every tensor) and `n_params` (its `/props` lists the
    /// model's path and file type, not its size); vLLM, Ollama and
    /// llama-cpp-python's server (0.3: `id`, `object`, `owned_by`, `permissions` only) list no
    /// size. A parameter count alone is not a size (the bits per weight are unknown), so it is
    /// not used.
    pub async fn detect_weights_bytes(
        &self,
        model: &str,
        timeout: Duration,
    ) -> Result<Option<u64>, DetectError> {
        let inner = &self.inner;
        let url = inner.models_uri.to_string();
        let fetch = async {
            let mut builder = Request::builder()
                .method(Method::GET)
                .uri(inner.models_uri.clone())
                .header(header::ACCEPT, "application/json");
            if let Some(auth) = &inner.auth {
                builder = builder.header(header::AUTHORIZATION, auth.clone());
            }
            let request =
                builder
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| DetectError::Request {
                        url: url.clone(),
                        reason: e.to_string(),
                    })?;
            let response =
                inner
                    .client
                    .request(request)
                    .await
                    .map_err(|e| DetectError::Request {
                        url: url.clone(),
                        reason: error_chain(&e),
                    })?;
            let status = response.status();
            if !status.is_success() {
                return Err(DetectError::Status {
                    url: url.clone(),
                    status: status.as_u16(),
                });
            }
            let bytes = Limited::new(response.into_body(), MAX_MODELS_BODY)
                .collect()
                .await
                .map_err(|e| DetectError::Request {
                    url: url.clone(),
                    reason: format!("reading the answer: {e}"),
                })?
                .to_bytes();
            serde_json::from_slice::<Value>(&bytes).map_err(|e| DetectError::NotJson {
                url: url.clone(),
                reason: e.to_string(),
            })
        };
        let listing =
            tokio::time::timeout(timeout, fetch)
                .await
                .map_err(|_| DetectError::Timeout {
                    url: url.clone(),
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                })??;
        Ok(weights_in_listing(&listing, model))
    }
}

/// The most of a `/models` answer read (a server lists a handful of models).
const MAX_MODELS_BODY: usize = 1024 * 1024;
/// The largest size believed from an upstream (10 TB, as `[[models]] weights_bytes` allows).
const MAX_DETECTED_WEIGHTS_BYTES: u64 = nearpath_config::MAX_WEIGHTS_BYTES;

/// Why the weights of an upstream model could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    #[error("GET {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("GET {url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: the answer is not JSON: {reason}")]
    NotJson { url: String, reason: String },
    #[error("GET {url}: no answer within {timeout_ms} ms")]
    Timeout { url: String, timeout_ms: u64 },
}

/// `meta.size` of `model` in an OpenAI `/models` listing: the entry whose `id` (or one of its
/// `aliases`, as recent llama.cpp servers list them) is `model`, else the only entry. A size
/// that is not a positive integer of at most 10 TB is no size.
pub fn weights_in_listing(listing: &Value, model: &str) -> Option<u64> {
    let data = listing.get("data")?.as_array()?;
    let named = |m: &&Value| {
        m.get("id").and_then(Value::as_str) == Some(model)
            || m.get("aliases")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(model)))
    };
    let entry = data
        .iter()
        .find(named)
        .or_else(|| (data.len() == 1).then(|| &data[0]))?;
    entry
        .get("meta")?
        .get("size")?
        .as_u64()
        .filter(|b| *b > 0 && *b <= MAX_DETECTED_WEIGHTS_BYTES)
}

impl Backend for UpstreamBackend {
    fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        let inner = Arc::clone(&self.inner);
        let model = inner
            .upstream_model
            .clone()
            .unwrap_or_else(|| request.model.clone());
        let body = match request.endpoint {
            Endpoint::Embeddings => request.upstream_embeddings_body(&model),
            _ => request.upstream_body(&model),
        };
        let endpoint = request.endpoint;
        let estimated_prompt = approx_prompt_tokens(request);
        // Invalid header values (they came through the gateway, which checks them) are dropped.
        // The request id always goes as `x-nearpath-request-id`, and as `x-request-id` only when
        // it is a UUID: llama-cpp-python's server (starlette-context) answers any other
        // `x-request-id` with an empty 400, which would fail a request over a log header.
        let request_id = request.request_id.as_deref();
        let trace_headers: Vec<(&'static str, HeaderValue)> = [
            ("x-nearpath-request-id", request_id),
            ("x-request-id", request_id.filter(|id| is_uuid(id))),
            ("traceparent", request.traceparent.as_deref()),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, HeaderValue::from_str(v?).ok()?)))
        .collect();
        let (tx, generation) = Generation::channel();
        let deadline = Instant::now().checked_add(inner.timeout);
        tokio::spawn(async move {
            let relay = inner.relay(endpoint, model, body, trace_headers, estimated_prompt, &tx);
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

/// Whether `s` is a UUID in its text form (8-4-4-4-12 hex digits, any version).
fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
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
    endpoint: Endpoint,
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
        trace_headers: Vec<(&'static str, HeaderValue)>,
        estimated_prompt: u32,
        tx: &mpsc::Sender<EventResult>,
    ) -> Result<Option<Incoming>, BackendError> {
        let uri = match endpoint {
            Endpoint::Chat => self.chat_uri.clone(),
            Endpoint::Completion => self.completion_uri.clone(),
            Endpoint::Embeddings => self.embeddings_uri.clone(),
            Endpoint::Responses => {
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
        for (name, value) in trace_headers {
            builder = builder.header(name, value);
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
        if is_json || endpoint == Endpoint::Embeddings {
            self.relay_json(endpoint, body, estimated_prompt, tx)
                .await?;
            return Ok(None);
        }
        let mut parser = SseParser::new(MAX_EVENT_BYTES);
        let mut state = StreamState {
            endpoint,
            ..StreamState::default()
        };
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
        let malformed = |reason: String| {
            let mut excerpt: String = data.chars().take(120).collect();
            if excerpt.len() < data.len() {
                excerpt.push('…');
            }
            self.protocol(format!("{reason} in event {excerpt:?}"))
        };
        if data.trim() == "[DONE]" {
            state.done = true;
            return Ok(true);
        }
        let value: Value = serde_json::from_str(data)
            .map_err(|e| malformed(format!("malformed stream chunk: {e}")))?;
        let is_error = value.get("error").is_some_and(|e| !e.is_null());
        if !is_error {
            let Value::Object(obj) = value else {
                return Err(malformed("a stream chunk is not a JSON object".into()));
            };
            let piece = split_chunk(state.endpoint, obj).map_err(malformed)?;
            if let Some(usage) = piece.usage {
                state.usage = Some(usage);
            }
            if piece.finish_reason.is_some() {
                state.finish_reason = piece.finish_reason;
            }
            let event = match piece.relay {
                Relay::Nothing => return Ok(true),
                Relay::Text(text) => BackendEvent::Token { text },
                Relay::Json(json) => BackendEvent::Chunk { json },
            };
            if piece.generated {
                state.chunks = state.chunks.saturating_add(1);
            }
            return Ok(tx.send(Ok(event)).await.is_ok());
        }
        let chunk = parse_stream_chunk(data).map_err(|e| malformed(e.to_string()))?;
        match chunk {
            StreamChunk::Done | StreamChunk::Chunk { .. } => {}
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

    /// A JSON answer: an embeddings list (each `data[]` element becomes a `Chunk`), or one
    /// `chat.completion` / `text_completion` document from a server that ignored `stream: true`
    /// (its choices become one `Chunk`, as if streamed at once: tool calls, logprobs and every
    /// other field kept). Then `Done` with the upstream's counts.
    async fn relay_json(
        &self,
        endpoint: Endpoint,
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
        let Value::Object(mut obj) = value else {
            return Err(self.protocol("the JSON answer is not an object"));
        };
        let usage = obj.remove("usage");
        let count = |key: &str| {
            usage
                .as_ref()
                .and_then(|u| u.get(key))
                .and_then(Value::as_u64)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        };
        let prompt_tokens = count("prompt_tokens").unwrap_or(estimated_prompt);
        let (events, finish_reason, generated) = if endpoint == Endpoint::Embeddings {
            let Some(Value::Array(data)) = obj.remove("data") else {
                return Err(self.protocol("the embeddings answer has no data array"));
            };
            let events: Vec<BackendEvent> = data
                .into_iter()
                .map(|d| BackendEvent::Chunk {
                    json: d.to_string(),
                })
                .collect();
            (events, "stop".to_owned(), 0)
        } else {
            let Some(Value::Array(choices)) = obj.remove("choices") else {
                return Err(self.protocol("the JSON answer has no choices array"));
            };
            let mut finish_reason = None;
            let choices: Vec<Value> = choices
                .into_iter()
                .map(|c| {
                    let Value::Object(mut c) = c else {
                        return c;
                    };
                    if let Some(r) = c.get("finish_reason").and_then(Value::as_str) {
                        if finish_reason.is_none()
                            || c.get("index").and_then(Value::as_u64) == Some(0)
                        {
                            finish_reason = Some(r.to_owned());
                        }
                    }
                    // A chat message becomes the delta of one streamed chunk, in its place.
                    match c.remove("message") {
                        Some(message) => {
                            let mut out = Map::with_capacity(c.len() + 1);
                            let mut message = Some(message);
                            for (k, v) in c {
                                if k == "logprobs" || k == "finish_reason" {
                                    if let Some(m) = message.take() {
                                        out.insert("delta".into(), m);
                                    }
                                }
                                out.insert(k, v);
                            }
                            if let Some(m) = message {
                                out.insert("delta".into(), m);
                            }
                            Value::Object(out)
                        }
                        None => Value::Object(c),
                    }
                })
                .collect();
            obj.insert("choices".into(), Value::Array(choices));
            let generated = generated_choices(endpoint, &obj);
            (
                vec![BackendEvent::Chunk {
                    json: Value::Object(obj).to_string(),
                }],
                finish_reason.unwrap_or_else(|| "stop".to_owned()),
                generated,
            )
        };
        for event in events {
            if tx.send(Ok(event)).await.is_err() {
                return Ok(());
            }
        }
        let completion_tokens = count("completion_tokens").unwrap_or(generated);
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
        status_error(&self.url, status, model, body).await
    }
}

/// The error for a non-success answer of the upstream at `url` (any endpoint): its own message
/// (OpenAI's error shape, else the start of the body, else the status's reason) under the kind
/// that says who is to blame and whether another node may succeed.
pub(crate) async fn status_error(
    url: &str,
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
    let url = url.to_owned();
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
        s => BackendError::UpstreamProtocol {
            url,
            detail: format!("unexpected HTTP status {s}: {message}"),
        },
    }
}

/// How one upstream chunk is relayed.
#[derive(Debug, PartialEq)]
enum Relay {
    /// Nothing to relay (a usage-only chunk, an empty delta).
    Nothing,
    /// Only text for choice 0: the `Token` fast path.
    Text(String),
    /// Anything else: the chunk minus `usage`, as JSON.
    Json(String),
}

/// What one upstream chunk carried.
#[derive(Debug, PartialEq)]
struct Piece {
    relay: Relay,
    usage: Option<Usage>,
    /// Choice 0's finish reason (another choice's when choice 0 has none).
    finish_reason: Option<String>,
    /// It carried generated content (for the estimated completion count).
    generated: bool,
}

/// Fields of a chunk the relay owns: a chunk with nothing else can take the fast path.
const OWNED_FIELDS: [&str; 5] = ["id", "object", "created", "model", "usage"];

/// Splits one upstream chunk (see the module documentation): its usage, its finish reason, and
/// whether it is relayed as text, as JSON, or not at all.
fn split_chunk(endpoint: Endpoint, mut obj: Map<String, Value>) -> Result<Piece, String> {
    let usage = obj
        .remove("usage")
        .and_then(|u| serde_json::from_value::<Usage>(u).ok());
    let nothing = |usage| Piece {
        relay: Relay::Nothing,
        usage,
        finish_reason: None,
        generated: false,
    };
    let choices = match obj.get("choices") {
        Some(Value::Array(c)) => c,
        None | Some(Value::Null) => return Ok(nothing(usage)),
        Some(_) => return Err("`choices` is not an array".into()),
    };
    let mut finish_reason = None;
    for c in choices {
        if let Some(r) = c.get("finish_reason").and_then(Value::as_str) {
            if finish_reason.is_none() || c.get("index").and_then(Value::as_u64) == Some(0) {
                finish_reason = Some(r.to_owned());
            }
        }
    }
    let only_owned = obj
        .keys()
        .all(|k| k == "choices" || OWNED_FIELDS.contains(&k.as_str()));
    if choices.is_empty() && only_owned {
        return Ok(nothing(usage));
    }
    let generated = generated_choices(endpoint, &obj) > 0;
    let relay = match only_owned.then(|| text_only(endpoint, choices)).flatten() {
        Some(t) if t.is_empty() => Relay::Nothing,
        Some(t) => Relay::Text(t),
        None => Relay::Json(Value::Object(obj).to_string()),
    };
    Ok(Piece {
        relay,
        usage,
        finish_reason,
        generated,
    })
}

/// The text of `choices` when they are one choice 0 mid-stream carrying only text: exactly
/// `index`, `delta: {"content": <string>}` (`text` on completions), and `logprobs` and
/// `finish_reason` present and null, which is what the gateway renders for a `Token`. Anything
/// else is relayed whole, so the client sees the backend's own chunk: a role chunk (backends
/// differ: `{"role":"assistant"}` from llama.cpp's server, `"content":""` from vLLM and OpenAI,
/// `"content":null` before a tool call), the finish chunk (llama.cpp's lists every delta field
/// as null), or a chunk without `logprobs`.
fn text_only(endpoint: Endpoint, choices: &[Value]) -> Option<String> {
    let [Value::Object(c)] = choices else {
        return None;
    };
    let text_key = if endpoint == Endpoint::Completion {
        "text"
    } else {
        "delta"
    };
    let exact = c.len() == 4
        && c.get("index").and_then(Value::as_u64) == Some(0)
        && c.get("logprobs").is_some_and(Value::is_null)
        && c.get("finish_reason").is_some_and(Value::is_null);
    if !exact {
        return None;
    }
    match (endpoint, c.get(text_key)?) {
        (Endpoint::Completion, Value::String(t)) => Some(t.clone()),
        (Endpoint::Completion, _) => None,
        (_, Value::Object(d)) if d.len() == 1 => d.get("content")?.as_str().map(str::to_owned),
        _ => None,
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

    /// Runs a generation to its end: the text of choice 0 piece by piece (from tokens, and from
    /// chunks that carry any), then the final Done or error.
    async fn run(b: &dyn Backend, r: &InferenceRequest) -> (Vec<String>, EventResult) {
        let (events, end) = run_all(b, r).await;
        let texts = events
            .into_iter()
            .filter_map(|e| match e {
                BackendEvent::Token { text } => Some(text),
                BackendEvent::Chunk { json } => {
                    let v: Value = serde_json::from_str(&json).unwrap_or_default();
                    let c = &v["choices"][0];
                    c["delta"]["content"]
                        .as_str()
                        .or(c["text"].as_str())
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                }
                BackendEvent::Done { .. } => None,
            })
            .collect();
        (texts, end)
    }

    /// Runs a generation to its end: every token and chunk, then the final Done or error.
    async fn run_all(b: &dyn Backend, r: &InferenceRequest) -> (Vec<BackendEvent>, EventResult) {
        let mut g = match b.start(r) {
            Ok(g) => g,
            Err(e) => return (Vec::new(), Err(e)),
        };
        let mut events = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match g.next().await {
                    Some(Ok(e @ (BackendEvent::Token { .. } | BackendEvent::Chunk { .. }))) => {
                        events.push(e)
                    }
                    Some(end) => return end,
                    None => panic!("generation ended without Done or error"),
                }
            }
        })
        .await;
        match end {
            Ok(end) => (events, end),
            Err(_) => panic!("generation did not finish in 10 s"),
        }
    }

    /// The body of a captured HTTP request, as JSON.
    fn sent_json(sent: &str) -> Value {
        let json_start = sent.find("\r\n\r\n").map_or(0, |i| i + 4);
        serde_json::from_str(&sent[json_start..]).unwrap_or_default()
    }

    #[tokio::test]
    async fn the_upstream_receives_every_field_the_client_sent() {
        let (addr, request) = canned(Some(sse_response("data: [DONE]\n\n"))).await;
        let extra = json!({
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}]}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}},
            "logprobs": true, "top_logprobs": 3, "seed": 42, "user": "u-1", "n": 1,
            "stop": ["\n\n", "END"], "temperature": 0.25, "top_p": 0.5,
            "reasoning_effort": "low", "x_vendor_field": {"nested": [1, 2.5, null, "s"]},
        });
        let req = chat_request("public", extra.clone());
        let _ = run(&backend(addr, None, Some("up-model")), &req).await;
        let sent = sent_json(&request.await.unwrap_or_default());
        for (key, value) in extra.as_object().into_iter().flatten() {
            assert_eq!(&sent[key], value, "{key}");
        }
        assert_eq!(sent["model"], "up-model");
    }

    #[tokio::test]
    async fn request_id_and_traceparent_reach_the_upstream_as_headers() {
        let (addr, request) = canned(Some(sse_response("data: [DONE]\n\n"))).await;
        let mut req = chat_request("m", json!({}));
        req.request_id = Some("req_abc".into());
        req.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let _ = run(&backend(addr, None, None), &req).await;
        let sent = request.await.unwrap_or_default().to_ascii_lowercase();
        assert!(
            sent.contains("\r\nx-nearpath-request-id: req_abc\r\n"),
            "{sent}"
        );
        // Regression: llama-cpp-python answers a non-UUID `x-request-id` with an empty 400.
        assert!(!sent.contains("\r\nx-request-id:"), "{sent}");
        assert!(
            sent.contains(
                "\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
            ),
            "{sent}"
        );
    }

    #[tokio::test]
    async fn a_uuid_request_id_also_goes_as_x_request_id() {
        let (addr, request) = canned(Some(sse_response("data: [DONE]\n\n"))).await;
        let mut req = chat_request("m", json!({}));
        let id = "0af76519-16cd-43dd-8448-eb211c80319c";
        req.request_id = Some(id.into());
        let _ = run(&backend(addr, None, None), &req).await;
        let sent = request.await.unwrap_or_default().to_ascii_lowercase();
        assert!(
            sent.contains(&format!("\r\nx-request-id: {id}\r\n")),
            "{sent}"
        );
        assert!(!is_uuid("0af76519-16cd-43dd-8448-eb211c80319"));
        assert!(!is_uuid("0af76519x16cd-43dd-8448-eb211c80319c"));
    }

    #[tokio::test]
    async fn tool_call_logprob_and_reasoning_chunks_pass_through_unchanged() {
        let chunks = [
            json!({"id": "u1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": null,
                    "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"ci"}}]},
                    "logprobs": null, "finish_reason": null}]}),
            json!({"id": "u1", "choices": [{"index": 0, "delta": {"reasoning_content": "hm"},
                "logprobs": {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]},
                "finish_reason": null}], "system_fingerprint": "fp_1", "x_vendor": 1}),
            json!({"id": "u1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}),
        ];
        let body: String = chunks
            .iter()
            .map(|c| format!("data: {c}\n\n"))
            .collect::<String>()
            + "data: [DONE]\n\n";
        let (addr, _request) = canned(Some(sse_response(&body))).await;
        let (events, end) =
            run_all(&backend(addr, None, None), &chat_request("m", json!({}))).await;
        let relayed: Vec<Value> = events
            .iter()
            .map(|e| match e {
                BackendEvent::Chunk { json } => serde_json::from_str(json).unwrap_or_default(),
                other => panic!("expected chunks only, got {other:?}"),
            })
            .collect();
        // Each as sent, the finish chunk too, less its usage (which goes in Done).
        let mut expected = chunks.to_vec();
        if let Some(last) = expected.last_mut().and_then(Value::as_object_mut) {
            last.remove("usage");
        }
        assert_eq!(relayed, expected);
        assert_eq!(
            end,
            Ok(BackendEvent::Done {
                finish_reason: "tool_calls".into(),
                prompt_tokens: 9,
                completion_tokens: 4
            })
        );
    }

    #[test]
    fn only_plain_text_of_choice_zero_takes_the_token_fast_path() {
        let split = |v: Value| match v {
            Value::Object(o) => split_chunk(Endpoint::Chat, o).map(|p| p.relay),
            _ => Err("not an object".into()),
        };
        let text = |t: &str| Ok(Relay::Text(t.into()));
        assert_eq!(
            split(json!({"id": "x", "object": "o", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": null, "finish_reason": null}]})),
            text("hi")
        );
        assert_eq!(
            split(json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})),
            Ok(Relay::Nothing)
        );
        for not_text in [
            // Regression: finish chunks were replaced by the gateway's own `"delta":{}`, where
            // llama.cpp's server lists every delta field as null.
            json!({"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": null, "finish_reason": "stop"}]}),
            json!({"choices": [{"index": 0, "delta": {"role": null, "content": null, "tool_calls": null}, "logprobs": null, "finish_reason": "tool_calls"}]}),
            json!({"choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": null}]}),
            // Without `logprobs` the gateway's rendering would add a field.
            json!({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": null}]}),
            // Regression: a role chunk was dropped for the gateway's own, which says
            // `"content":""` where llama.cpp's server says nothing (and `null` before a tool call).
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
            json!({"choices": [{"index": 0, "delta": {"role": "tool", "content": "x"}}]}),
            json!({"choices": [{"index": 1, "delta": {"content": "b"}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": []}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "a", "refusal": "no"}}]}),
            json!({"system_fingerprint": "fp", "choices": [{"index": 0, "delta": {"content": "a"}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "a"}, "stop_reason": 7}]}),
        ] {
            assert!(
                matches!(split(not_text.clone()), Ok(Relay::Json(_))),
                "{not_text}"
            );
        }
        assert!(split(json!({"choices": {}})).is_err());
    }

    #[tokio::test]
    async fn embeddings_are_posted_without_stream_fields_and_relayed_element_by_element() {
        let doc = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.25,-1.0]},{"object":"embedding","index":1,"embedding":[0.5,0.0]}],"model":"up","usage":{"prompt_tokens":6,"total_tokens":6}}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{doc}",
            doc.len()
        );
        let (addr, request) = canned(Some(response.into_bytes())).await;
        let req = match InferenceRequest::parse(
            Endpoint::Embeddings,
            br#"{"model":"m","input":["a","b"],"encoding_format":"float","dimensions":2}"#,
        ) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let (events, end) = run_all(&backend(addr, None, Some("up")), &req).await;
        let sent = request.await.unwrap_or_default();
        assert!(
            sent.starts_with("POST /v1/embeddings HTTP/1.1\r\n"),
            "{sent}"
        );
        assert_eq!(
            sent_json(&sent),
            json!({"model": "up", "input": ["a", "b"], "encoding_format": "float", "dimensions": 2})
        );
        assert_eq!(
            events,
            vec![
                BackendEvent::Chunk {
                    json: r#"{"object":"embedding","index":0,"embedding":[0.25,-1.0]}"#.into()
                },
                BackendEvent::Chunk {
                    json: r#"{"object":"embedding","index":1,"embedding":[0.5,0.0]}"#.into()
                },
            ]
        );
        assert_eq!(
            end,
            Ok(BackendEvent::Done {
                finish_reason: "stop".into(),
                prompt_tokens: 6,
                completion_tokens: 0
            })
        );
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
        // The role chunk comes whole, then the first token.
        let mut first = tokio::time::timeout(Duration::from_secs(5), g.next()).await;
        if matches!(first, Ok(Some(Ok(BackendEvent::Chunk { .. })))) {
            first = tokio::time::timeout(Duration::from_secs(5), g.next()).await;
        }
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

    /// What llama.cpp's server (`llama-server`) lists in `GET /v1/models`: its one model under
    /// its file path (or `--alias`), with `meta` from `llama_model_size` / `llama_model_n_params`.
    fn llama_cpp_listing(id: &str, size: Value) -> Value {
        json!({"object": "list", "data": [{
            "id": id, "object": "model", "created": 1_733_500_000, "owned_by": "llamacpp",
            "meta": {"vocab_type": 2, "n_vocab": 128_256, "n_ctx_train": 131_072,
                     "n_embd": 4096, "n_params": 8_030_261_248_u64, "size": size},
        }]})
    }

    #[test]
    fn the_weights_size_is_read_from_a_llama_cpp_listing_only() {
        let listing =
            llama_cpp_listing("models/llama-3.1-8b-q4_k_m.gguf", json!(4_920_734_720_u64));
        // llama-server's one model, whatever its id, or the entry named like the model.
        assert_eq!(
            weights_in_listing(&listing, "llama-8b"),
            Some(4_920_734_720)
        );
        let two = json!({"data": [
            {"id": "a", "meta": {"size": 1_000}},
            {"id": "b", "meta": {"size": 2_000}},
        ]});
        assert_eq!(weights_in_listing(&two, "b"), Some(2_000));
        assert_eq!(weights_in_listing(&two, "c"), None, "ambiguous: no size");
        let aliased = json!({"data": [
            {"id": "a", "aliases": ["alpha"], "meta": {"size": 1_000}},
            {"id": "b", "aliases": [7, "beta"], "meta": {"size": 2_000}},
        ]});
        assert_eq!(weights_in_listing(&aliased, "beta"), Some(2_000));
        // llama-cpp-python's server (0.3) and vLLM list no size; a parameter count is no size.
        let python = json!({"object": "list", "data": [
            {"id": "tiny", "object": "model", "owned_by": "me", "permissions": []}]});
        assert_eq!(weights_in_listing(&python, "tiny"), None);
        let params_only = json!({"data": [{"id": "m", "meta": {"n_params": 8_000_000_000_u64}}]});
        assert_eq!(weights_in_listing(&params_only, "m"), None);
        // Nonsense is no size, and never a panic.
        for size in [
            json!(0),
            json!(-5),
            json!(1.5e9),
            json!("4920734720"),
            json!(null),
            json!(10_000_000_000_001_u64),
            json!(u64::MAX),
        ] {
            let l = llama_cpp_listing("m", size.clone());
            assert_eq!(weights_in_listing(&l, "m"), None, "{size}");
        }
        for odd in [
            json!(null),
            json!([]),
            json!({"data": {}}),
            json!({"data": [1, "x"]}),
            json!({"data": []}),
            json!({"data": [{"id": 5, "meta": "x"}]}),
        ] {
            assert_eq!(weights_in_listing(&odd, "m"), None, "{odd}");
        }
    }

    /// A one-route HTTP server that answers every request with `status` and `body`, and tells
    /// what it was asked (the request head).
    async fn models_server(
        status: &'static str,
        body: String,
    ) -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut head = vec![0u8; 8192];
                let n = sock.read(&mut head).await.unwrap_or(0);
                let _ = tx
                    .send(String::from_utf8_lossy(&head[..n]).into_owned())
                    .await;
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(answer.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn the_node_reads_the_model_size_from_a_llama_cpp_server() {
        let listing = llama_cpp_listing("/models/llama-8b.gguf", json!(4_920_734_720_u64));
        let (addr, mut asked) = models_server("200 OK", listing.to_string()).await;
        let b = backend(addr, Some("sk-upstream"), Some("llama-8b"));
        let size = b
            .detect_weights_bytes("llama-8b", Duration::from_secs(5))
            .await;
        assert_eq!(size, Ok(Some(4_920_734_720)));
        let head = asked.recv().await.unwrap_or_default();
        assert!(head.starts_with("GET /v1/models HTTP/1.1"), "{head}");
        assert!(head.contains("authorization: Bearer sk-upstream"), "{head}");
    }

    #[tokio::test]
    async fn a_server_that_lists_no_size_or_fails_or_lies_gives_none_or_an_error() {
        let python = json!({"object": "list", "data": [{"id": "tiny", "object": "model"}]});
        let (addr, _asked) = models_server("200 OK", python.to_string()).await;
        let b = backend(addr, None, None);
        assert_eq!(
            b.detect_weights_bytes("tiny", Duration::from_secs(5)).await,
            Ok(None)
        );
        let (addr, _asked) = models_server("404 Not Found", "{}".into()).await;
        let r = backend(addr, None, None)
            .detect_weights_bytes("tiny", Duration::from_secs(5))
            .await;
        assert!(
            matches!(r, Err(DetectError::Status { status: 404, .. })),
            "{r:?}"
        );
        let (addr, _asked) = models_server("200 OK", "<html>not json</html>".into()).await;
        let r = backend(addr, None, None)
            .detect_weights_bytes("tiny", Duration::from_secs(5))
            .await;
        assert!(matches!(r, Err(DetectError::NotJson { .. })), "{r:?}");
        // Larger than any listing: refused, not buffered without end.
        let (addr, _asked) = models_server("200 OK", "x".repeat(MAX_MODELS_BODY + 1)).await;
        let r = backend(addr, None, None)
            .detect_weights_bytes("tiny", Duration::from_secs(5))
            .await;
        assert!(matches!(r, Err(DetectError::Request { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_costs_the_timeout_only() {
        // Accepts, reads, and says nothing.
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let (keep_tx, _keep_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _hold = keep_tx;
            let mut socks = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                socks.push(s);
            }
        });
        let start = std::time::Instant::now();
        let r = backend(addr, None, None)
            .detect_weights_bytes("tiny", Duration::from_millis(300))
            .await;
        assert!(
            matches!(
                r,
                Err(DetectError::Timeout {
                    timeout_ms: 300,
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }
}
