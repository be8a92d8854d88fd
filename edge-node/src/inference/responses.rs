//! `POST /v1/responses` on the node: by translation over any chat backend, or relayed natively
//! to an upstream that serves the Responses API itself (`[[models]] responses = "native"`).
//!
//! Either way the generation yields one [`BackendEvent::Chunk`] per Responses streaming event
//! (the event's data object, with its `type`), then `Done`. The last chunk is
//! `response.completed` (or `response.incomplete`), carrying the whole `response` object, which
//! is what a non-streaming client gets.
//!
//! Translation: the request becomes a chat completions request
//! ([`nearpath_protocol::openai::responses::chat_request`]) for the model's backend, and the chat
//! stream runs through the sans-IO [`ResponseStream`], which names the events.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use nearpath_protocol::openai::responses::{chat_request, ResponseStream};
use nearpath_protocol::openai::{Endpoint, InferenceRequest, SseParser};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    Backend, BackendError, BackendEvent, EventResult, Generation, UpstreamConfig,
    UpstreamConfigError,
};

/// The largest single SSE event accepted from a native upstream: what one `Chunk` message can
/// carry to the gateway (a `response.completed` event repeats the whole output).
const MAX_EVENT_BYTES: usize = nearpath_protocol::MAX_REQUEST_FRAME - 1024;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A model's backend, made to serve the Responses API too: Responses requests are translated
/// to chat for `chat`, or relayed by `native` when the model is configured so; every other
/// request goes to `chat` unchanged.
pub(super) struct ResponsesAware {
    chat: Arc<dyn Backend>,
    native: Option<NativeResponses>,
}

impl ResponsesAware {
    pub(super) fn new(chat: Arc<dyn Backend>, native: Option<NativeResponses>) -> Self {
        Self { chat, native }
    }
}

impl Backend for ResponsesAware {
    fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        if request.endpoint != Endpoint::Responses {
            return self.chat.start(request);
        }
        match &self.native {
            Some(native) => native.start(request),
            None => translate(&*self.chat, request),
        }
    }

    fn kind(&self) -> &'static str {
        self.chat.kind()
    }

    fn default_caps(&self) -> nearpath_protocol::ModelCaps {
        self.chat.default_caps()
    }
}

/// Serves a Responses request with a chat backend (see the module docs).
pub(super) fn translate(
    chat: &dyn Backend,
    request: &InferenceRequest,
) -> Result<Generation, BackendError> {
    let body = Value::Object(chat_request(request));
    // The Responses request was validated with the same rules, so this fails only if the two
    // parsers disagree: a fault here, not the client's.
    let mut chat_req =
        InferenceRequest::from_value(Endpoint::Chat, body).map_err(|e| BackendError::Internal {
            detail: format!("the Responses request does not translate to chat: {e}"),
        })?;
    // Not part of the body: carried over so an upstream's logs join the caller's.
    chat_req.request_id = request.request_id.clone();
    chat_req.traceparent = request.traceparent.clone();
    let mut inner = chat.start(&chat_req)?;
    let id = format!("resp_{:032x}", rand::random::<u128>());
    let machine = ResponseStream::new(request, &id, unix_now(), &request.model);
    let (tx, generation) = Generation::channel();
    tokio::spawn(async move {
        let mut machine = machine;
        if !flush(&mut machine, &tx).await {
            return;
        }
        loop {
            let event = tokio::select! {
                biased;
                // The consumer is gone: dropping `inner` stops the backend.
                _ = tx.closed() => return,
                event = inner.next() => event,
            };
            match event {
                Some(Ok(BackendEvent::Token { text })) => machine.handle_text(&text),
                Some(Ok(BackendEvent::Chunk { json })) => {
                    // A chunk that is not JSON carries nothing we can place; skip it.
                    if let Ok(chunk) = serde_json::from_str::<Value>(&json) {
                        machine.handle_chunk(&chunk);
                    }
                }
                Some(Ok(BackendEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                })) => {
                    machine.handle_done(&finish_reason, prompt_tokens, completion_tokens);
                    if flush(&mut machine, &tx).await {
                        let _ = tx
                            .send(Ok(BackendEvent::Done {
                                finish_reason,
                                prompt_tokens,
                                completion_tokens,
                            }))
                            .await;
                    }
                    return;
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                // The backend died; the consumer sees the end of the channel as that.
                None => return,
            }
            if !flush(&mut machine, &tx).await {
                return;
            }
        }
    });
    Ok(generation)
}

/// Sends every queued event as a chunk; false when the consumer is gone.
async fn flush(machine: &mut ResponseStream, tx: &mpsc::Sender<EventResult>) -> bool {
    while let Some(event) = machine.poll() {
        let json = event.to_string();
        if tx.send(Ok(BackendEvent::Chunk { json })).await.is_err() {
            return false;
        }
    }
    true
}

/// Relays Responses requests to an upstream server's own `{base_url}/responses`.
pub(super) struct NativeResponses {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    uri: Uri,
    auth: Option<HeaderValue>,
    upstream_model: Option<String>,
    timeout: Duration,
}

impl NativeResponses {
    /// Builds the (lazy) client for `config`'s upstream. `UpstreamBackend::new` validates the
    /// same configuration first, so only the responses URI is derived here.
    pub(super) fn new(config: &UpstreamConfig) -> Result<Self, UpstreamConfigError> {
        let url = config.base_url.trim().trim_end_matches('/').to_owned();
        let uri: Uri = format!("{url}{}", Endpoint::Responses.sub_path())
            .parse()
            .map_err(
                |e: hyper::http::uri::InvalidUri| UpstreamConfigError::InvalidUrl {
                    url: url.clone(),
                    reason: e.to_string(),
                },
            )?;
        let auth = match &config.api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| UpstreamConfigError::InvalidApiKey)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let timeout = Duration::from_millis(config.timeout_ms.max(1));
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout.min(Duration::from_secs(5))));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            url,
            uri,
            auth,
            upstream_model: config.upstream_model.clone(),
            timeout,
        })
    }

    fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        let model = self
            .upstream_model
            .clone()
            .unwrap_or_else(|| request.model.clone());
        let mut body = request.raw.clone();
        body.insert("model".into(), Value::String(model.clone()));
        // Always stream upstream, so events reach the client as they come; the node assembles
        // a non-streaming answer from the last event.
        body.insert("stream".into(), Value::Bool(true));
        let body = Value::Object(body).to_string();
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "text/event-stream");
        if let Some(auth) = &self.auth {
            builder = builder.header(header::AUTHORIZATION, auth.clone());
        }
        // As for chat: the ids go upstream as headers; invalid values (the gateway checks
        // them) are dropped.
        for (name, value) in [
            ("x-request-id", request.request_id.as_deref()),
            ("traceparent", request.traceparent.as_deref()),
        ] {
            if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                builder = builder.header(name, value);
            }
        }
        let http =
            builder
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| BackendError::Internal {
                    detail: format!("building the upstream request: {e}"),
                })?;
        let client = self.client.clone();
        let url = self.url.clone();
        let timeout = self.timeout;
        let (tx, generation) = Generation::channel();
        tokio::spawn(async move {
            let relay = relay_native(client, http, url.clone(), model, &tx);
            let outcome = tokio::select! {
                biased;
                _ = tx.closed() => return,
                outcome = tokio::time::timeout(timeout, relay) => outcome,
            };
            let error = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => BackendError::UpstreamTimeout {
                    url,
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                },
            };
            let _ = tx.send(Err(error)).await;
        });
        Ok(generation)
    }
}

/// Sends the request and relays each SSE event's data object as a chunk until the response's
/// terminal event, then `Done` with the upstream's usage.
async fn relay_native(
    client: Client<HttpConnector, Full<Bytes>>,
    request: Request<Full<Bytes>>,
    url: String,
    model: String,
    tx: &mpsc::Sender<EventResult>,
) -> Result<(), BackendError> {
    let protocol = |detail: String| BackendError::UpstreamProtocol {
        url: url.clone(),
        detail,
    };
    let response =
        client
            .request(request)
            .await
            .map_err(|e| BackendError::UpstreamUnavailable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        return Err(super::upstream::status_error(&url, status, model, body).await);
    }
    let mut parser = SseParser::new(MAX_EVENT_BYTES);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BackendError::UpstreamError {
            url: url.clone(),
            status: None,
            message: format!("the stream broke: {e}"),
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        parser
            .push(data)
            .map_err(|e| protocol(format!("reading the event stream: {e}")))?;
        while let Some(event) = parser.next_event() {
            if event.data.trim() == "[DONE]" {
                continue;
            }
            let value: Value = serde_json::from_str(&event.data)
                .map_err(|e| protocol(format!("an event does not parse: {e}")))?;
            if let Some(done) = native_event(&value, &url)? {
                if tx
                    .send(Ok(BackendEvent::Chunk { json: event.data }))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                let _ = tx.send(Ok(done)).await;
                return Ok(());
            }
            if tx
                .send(Ok(BackendEvent::Chunk { json: event.data }))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }
    Err(protocol(
        "the stream ended before response.completed".into(),
    ))
}

/// Classifies one upstream event: `Some(Done)` for the terminal `response.completed` /
/// `response.incomplete`, an error for `response.failed` / `error`, `None` for the rest.
fn native_event(value: &Value, url: &str) -> Result<Option<BackendEvent>, BackendError> {
    let Some(kind) = value.get("type").and_then(Value::as_str) else {
        return Err(BackendError::UpstreamProtocol {
            url: url.to_owned(),
            detail: "an event has no type".into(),
        });
    };
    match kind {
        "response.completed" | "response.incomplete" => {
            let usage = &value["response"]["usage"];
            let count = |key: &str| {
                usage[key]
                    .as_u64()
                    .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
            };
            let finish_reason = if kind == "response.incomplete" {
                "length"
            } else {
                "stop"
            };
            Ok(Some(BackendEvent::Done {
                finish_reason: finish_reason.into(),
                prompt_tokens: count("input_tokens"),
                completion_tokens: count("output_tokens"),
            }))
        }
        "response.failed" | "error" => {
            let message = value["response"]["error"]["message"]
                .as_str()
                .or_else(|| value["message"].as_str())
                .unwrap_or("the upstream reported a failure")
                .chars()
                .take(300)
                .collect();
            Err(BackendError::UpstreamError {
                url: url.to_owned(),
                status: None,
                message,
            })
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests;
