//! Inference backends of the edge node: what turns an OpenAI request into tokens.
//!
//! - [`SimBackend`]: a built-in inference **simulator** (not a model), for demos, tests and
//!   benchmarks.
//! - [`UpstreamBackend`]: the production path, relaying to an OpenAI-compatible server on the node
//!   (vLLM, SGLang, llama.cpp server, Ollama).
//! - [`Limited`]: a per-model concurrency limit; over it, `start` fails at once with
//!   [`BackendError::Busy`] so the gateway can route elsewhere.
//! - [`ModelRegistry`]: the node's models by name, built from its configuration.
//! - [`serve_openai`]: an OpenAI HTTP server over a registry (tests, and the "straight to the
//!   node's backend" baseline in benchmarks).
//!
//! A generation is a [`Generation`]: zero or more [`BackendEvent::Token`]s followed by exactly one
//! [`BackendEvent::Done`] or one [`BackendError`]. Dropping the `Generation` aborts the work
//! promptly (the simulator stops, the upstream HTTP request is dropped and its connection closed),
//! which is how a client disconnect propagates.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use nearpath_protocol::openai::{unsupported_capability, ApiError, InferenceRequest};
use nearpath_protocol::ModelCaps;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

mod openai_server;
mod responses;
mod sim;
mod sim_features;
mod upstream;

pub use openai_server::{
    check_exposure, serve_openai, serve_openai_with, ExposureError, ServerOptions,
};
pub use sim::{SimBackend, SimConfig, DEFAULT_SIM_MAX_TOKENS};
pub use sim_features::{sim_caps, SIM_EMBEDDING_DIMENSIONS};
pub use upstream::{
    weights_in_listing, DetectError, UpstreamBackend, UpstreamConfig, UpstreamConfigError,
};

/// How many events a backend may run ahead of its consumer before it waits.
pub const EVENT_CHANNEL_CAPACITY: usize = 64;

/// One step of a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEvent {
    /// A piece of generated text (a token or a few; may begin with a space).
    Token { text: String },
    /// A piece of the response that plain text cannot carry, as one JSON object: a streamed
    /// chunk (tool-call deltas, logprobs, several choices), one embedding, or one Responses API
    /// event (see `Message::Chunk` for which, by endpoint). Relayed as a `Chunk` message.
    Chunk { json: String },
    /// The generation finished. `finish_reason` is OpenAI's (`stop`, `length`, ...).
    Done {
        finish_reason: String,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
}

/// Why a generation could not start or did not finish.
///
/// `retryable()` says whether another node might succeed; the gateway retries only while nothing
/// has been streamed to the client yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// This node's limit for the model is reached (our capacity, not a fault).
    #[error("model `{model}` is at its concurrency limit of {limit} on this node")]
    Busy { model: String, limit: usize },
    /// The client asked for a model this node does not serve (the caller's mistake).
    #[error("model `{model}` is not served by this node")]
    UnknownModel { model: String },
    /// The upstream server could not be reached (refused, unreachable, connect timeout).
    #[error("upstream {url} is unavailable: {reason}")]
    UpstreamUnavailable { url: String, reason: String },
    /// The upstream did not finish within the configured whole-request timeout.
    #[error("upstream {url} did not finish within {timeout_ms} ms")]
    UpstreamTimeout { url: String, timeout_ms: u64 },
    /// The upstream rejected the request as invalid (HTTP 4xx): the client's request, most
    /// likely; `message` is the upstream's own.
    #[error("upstream {url} rejected the request with HTTP {status}: {message}")]
    BadRequest {
        url: String,
        status: u16,
        message: String,
    },
    /// The upstream does not know the model name the node sends (a node misconfiguration).
    #[error("upstream {url} does not serve model `{model}`: {message}")]
    ModelNotFound {
        url: String,
        model: String,
        message: String,
    },
    /// The upstream refused the node's credentials (HTTP 401/403: a node misconfiguration).
    #[error("upstream {url} refused the node's credentials with HTTP {status}: {message}")]
    UpstreamAuth {
        url: String,
        status: u16,
        message: String,
    },
    /// The upstream failed: HTTP 5xx or 429 (`status`), a broken connection, or an in-band error
    /// event (`status` is `None`).
    #[error("upstream {url} failed{}: {message}", status.map(|s| format!(" with HTTP {s}")).unwrap_or_default())]
    UpstreamError {
        url: String,
        status: Option<u16>,
        message: String,
    },
    /// The upstream answered something that is not an OpenAI-compatible stream.
    #[error("upstream {url} sent a malformed response: {detail}")]
    UpstreamProtocol { url: String, detail: String },
    /// A fault inside this node (a backend task ended without finishing).
    #[error("internal backend error: {detail}")]
    Internal { detail: String },
    /// The request needs a capability (tools, logprobs, `n > 1`, ...) this node's model does
    /// not declare; `param` is the parameter that needs it (the client's request, not a fault).
    #[error("model `{model}` does not support what '{param}' asks for")]
    Unsupported {
        model: String,
        capability: ModelCaps,
        param: String,
    },
}

impl BackendError {
    /// A stable machine-readable code, used in logs, metrics and `Close` reasons.
    pub fn code(&self) -> &'static str {
        match self {
            BackendError::Busy { .. } => "busy",
            BackendError::UnknownModel { .. } | BackendError::ModelNotFound { .. } => {
                "model_not_found"
            }
            BackendError::UpstreamUnavailable { .. } => "upstream_unavailable",
            BackendError::UpstreamTimeout { .. } => "upstream_timeout",
            BackendError::BadRequest { .. } => "bad_request",
            BackendError::UpstreamAuth { .. } => "upstream_auth",
            BackendError::UpstreamError { .. } => "upstream_error",
            BackendError::UpstreamProtocol { .. } => "upstream_protocol",
            BackendError::Internal { .. } => "internal",
            BackendError::Unsupported { .. } => "unsupported_parameter",
        }
    }

    /// Whether another node (or a later try) may succeed. False when the request itself is at
    /// fault (it would fail anywhere) or the upstream speaks garbage.
    pub fn retryable(&self) -> bool {
        match self {
            BackendError::Busy { .. }
            | BackendError::UpstreamUnavailable { .. }
            | BackendError::UpstreamTimeout { .. }
            | BackendError::UpstreamAuth { .. }
            | BackendError::ModelNotFound { .. }
            | BackendError::UpstreamError { .. } => true,
            BackendError::UnknownModel { .. }
            | BackendError::BadRequest { .. }
            | BackendError::UpstreamProtocol { .. }
            | BackendError::Internal { .. }
            | BackendError::Unsupported { .. } => false,
        }
    }

    /// The OpenAI-shaped error to show a client. Node-side faults are reported without the
    /// upstream URL, which is the node's private detail.
    pub fn api_error(&self) -> ApiError {
        match self {
            BackendError::Busy { model, .. } => ApiError::rate_limited(format!(
                "The model `{model}` is at capacity on this node. Please retry."
            )),
            BackendError::UnknownModel { model } => ApiError::model_not_found(model),
            BackendError::ModelNotFound { .. } | BackendError::UpstreamAuth { .. } => {
                ApiError::bad_gateway(
                    "The inference backend is misconfigured on this node. Please retry.",
                )
            }
            BackendError::UpstreamUnavailable { .. } => {
                ApiError::unavailable("The inference backend is unavailable. Please retry.")
            }
            BackendError::UpstreamTimeout { timeout_ms, .. } => ApiError::timeout(format!(
                "The inference backend did not finish within {timeout_ms} ms."
            )),
            BackendError::BadRequest {
                status, message, ..
            } => {
                let mut e = ApiError::bad_request(message.clone(), None);
                // Keep 4xx statuses the client can act on (413, 422); anything odd becomes 400.
                if (400..500).contains(status) {
                    e.status = *status;
                }
                e
            }
            BackendError::UpstreamError { message, .. } => {
                ApiError::bad_gateway(format!("The inference backend failed: {message}"))
            }
            BackendError::UpstreamProtocol { .. } => {
                ApiError::bad_gateway("The inference backend sent a malformed response.")
            }
            BackendError::Internal { detail } => ApiError::internal(detail.clone()),
            BackendError::Unsupported {
                model,
                capability,
                param,
            } => unsupported_capability(model, *capability, param),
        }
    }
}

/// What a [`Generation`] yields.
pub type EventResult = Result<BackendEvent, BackendError>;

/// A running generation. Yields tokens, then one `Done` or one error, then `None`. A `None`
/// before either means the backend task died, which consumers treat as
/// [`BackendError::Internal`]. Dropping it cancels the work and frees its concurrency slot.
#[derive(Debug)]
pub struct Generation {
    rx: mpsc::Receiver<EventResult>,
    /// Concurrency slots (model, node) held for as long as the consumer holds the generation.
    permits: [Option<OwnedSemaphorePermit>; 2],
}

impl Generation {
    /// Wraps the receiving end of a backend's event channel.
    pub fn new(rx: mpsc::Receiver<EventResult>) -> Self {
        Self {
            rx,
            permits: [None, None],
        }
    }

    /// A channel pair for a backend implementation: the task sends, the consumer holds this.
    pub fn channel() -> (mpsc::Sender<EventResult>, Self) {
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        (tx, Self::new(rx))
    }

    fn hold(mut self, permit: OwnedSemaphorePermit) -> Self {
        if self.permits[0].is_none() {
            self.permits[0] = Some(permit);
        } else {
            self.permits[1] = Some(permit);
        }
        self
    }

    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<EventResult> {
        self.rx.recv().await
    }

    /// Poll form of [`Generation::next`], for hand-written bodies and streams.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<EventResult>> {
        self.rx.poll_recv(cx)
    }
}

/// Something that generates tokens. Object-safe; shared by all requests for its models.
pub trait Backend: Send + Sync + 'static {
    /// Starts a generation and returns at once; the work runs on a spawned Tokio task (so this
    /// must be called inside a Tokio runtime). Errors known before any work (busy) are returned
    /// here; later ones arrive through the generation.
    fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError>;

    /// A short name for logs and metrics (`sim`, `upstream`).
    fn kind(&self) -> &'static str;

    /// What the backend honours when the model's configuration declares nothing: the simulator
    /// knows what it fakes; a relay cannot know what its server honours, so it claims nothing.
    fn default_caps(&self) -> ModelCaps {
        ModelCaps::NONE
    }
}

impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        (**self).start(request)
    }

    fn kind(&self) -> &'static str {
        (**self).kind()
    }

    fn default_caps(&self) -> ModelCaps {
        (**self).default_caps()
    }
}

/// The largest permit count a Tokio semaphore accepts.
const MAX_PERMITS: usize = Semaphore::MAX_PERMITS;

/// A backend with a concurrency limit: at most `limit` generations at once; one more fails at
/// once with [`BackendError::Busy`] rather than queueing (the gateway routes it elsewhere).
pub struct Limited<B> {
    inner: B,
    model: String,
    limit: usize,
    permits: Arc<Semaphore>,
}

impl<B: Backend> Limited<B> {
    /// `limit` is clamped to at least 1 (a model nobody may use should not be registered).
    pub fn new(model: impl Into<String>, limit: usize, inner: B) -> Self {
        let limit = limit.clamp(1, MAX_PERMITS);
        Self {
            inner,
            model: model.into(),
            limit,
            permits: Arc::new(Semaphore::new(limit)),
        }
    }

    /// Generations holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.limit - self.permits.available_permits()
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }
}

impl<B: Backend> Backend for Limited<B> {
    fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        let permit =
            Arc::clone(&self.permits)
                .try_acquire_owned()
                .map_err(|_| BackendError::Busy {
                    model: self.model.clone(),
                    limit: self.limit,
                })?;
        Ok(self.inner.start(request)?.hold(permit))
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

/// How one model is served (the registry's own spec, independent of the config file format).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The name clients ask for.
    pub name: String,
    /// Generations at once for this model.
    pub max_concurrency: usize,
    pub backend: BackendSpec,
    /// How `/v1/responses` is served: translated to chat (any backend) or relayed natively
    /// (upstream backends only; a simulator model ignores `Native`).
    pub responses: nearpath_config::ResponsesMode,
    /// What the model declares it can do; `None` for the backend's default.
    pub caps: Option<ModelCaps>,
}

/// Which backend serves a model.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendSpec {
    Sim(SimConfig),
    Upstream(UpstreamConfig),
}

/// Why a registry could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model name is empty")]
    EmptyName,
    #[error("model `{name}` is configured twice")]
    Duplicate { name: String },
    #[error("model `{name}`: max_concurrency must be at least 1")]
    ZeroConcurrency { name: String },
    #[error("model `{name}`: {source}")]
    Upstream {
        name: String,
        #[source]
        source: UpstreamConfigError,
    },
}

struct ModelEntry {
    name: String,
    backend: Limited<Arc<dyn Backend>>,
    caps: ModelCaps,
}

/// The models this node serves, each behind its concurrency limit, optionally under a node-wide
/// limit as well (`capacity.inference_concurrency`).
pub struct ModelRegistry {
    models: Vec<ModelEntry>,
    index: HashMap<String, usize>,
    node_limit: Option<(usize, Arc<Semaphore>)>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("models", &self.model_names().collect::<Vec<_>>())
            .field("node_limit", &self.node_limit.as_ref().map(|(n, _)| n))
            .finish()
    }
}

impl Default for ModelRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelRegistry {
    /// An empty registry; add models with [`ModelRegistry::insert`].
    pub fn new() -> Self {
        Self {
            models: Vec::new(),
            index: HashMap::new(),
            node_limit: None,
        }
    }

    /// Builds every model's backend. Upstream clients are created here (no connection is made
    /// until the first request).
    pub fn from_specs(specs: impl IntoIterator<Item = ModelSpec>) -> Result<Self, RegistryError> {
        let mut registry = Self::new();
        for spec in specs {
            let upstream_error = |source| RegistryError::Upstream {
                name: spec.name.clone(),
                source,
            };
            let mut native = None;
            let backend: Arc<dyn Backend> = match spec.backend {
                BackendSpec::Sim(config) => Arc::new(SimBackend::new(config)),
                BackendSpec::Upstream(config) => {
                    let backend = UpstreamBackend::new(config.clone()).map_err(upstream_error)?;
                    if spec.responses == nearpath_config::ResponsesMode::Native {
                        native =
                            Some(responses::NativeResponses::new(&config).map_err(upstream_error)?);
                    }
                    Arc::new(backend)
                }
            };
            let caps = spec.caps.unwrap_or_else(|| backend.default_caps());
            registry.insert_full(spec.name, spec.max_concurrency, backend, caps, native)?;
        }
        Ok(registry)
    }

    /// Builds the registry from the node configuration's `[[models]]` entries, with the node-wide
    /// limit `capacity.inference_concurrency`.
    pub fn from_config(
        models: &[nearpath_config::ModelConfig],
        node_limit: Option<usize>,
    ) -> Result<Self, RegistryError> {
        let mut registry = Self::from_specs(models.iter().map(ModelSpec::from))?;
        if let Some(limit) = node_limit {
            registry = registry.with_node_limit(limit);
        }
        Ok(registry)
    }

    /// Serves `name` with `backend`, at most `max_concurrency` at once, with the backend's
    /// default capabilities. `/v1/responses` requests for it are translated to chat completions
    /// for `backend`.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        max_concurrency: usize,
        backend: Arc<dyn Backend>,
    ) -> Result<(), RegistryError> {
        let caps = backend.default_caps();
        self.insert_full(name, max_concurrency, backend, caps, None)
    }

    /// [`ModelRegistry::insert`] declaring `caps`: a request needing more is refused with
    /// [`BackendError::Unsupported`] before the backend sees it.
    pub fn insert_with_caps(
        &mut self,
        name: impl Into<String>,
        max_concurrency: usize,
        backend: Arc<dyn Backend>,
        caps: ModelCaps,
    ) -> Result<(), RegistryError> {
        self.insert_full(name, max_concurrency, backend, caps, None)
    }

    /// [`ModelRegistry::insert_with_caps`], with Responses requests relayed by `native` when
    /// given (else translated to chat for `backend`).
    fn insert_full(
        &mut self,
        name: impl Into<String>,
        max_concurrency: usize,
        backend: Arc<dyn Backend>,
        caps: ModelCaps,
        native: Option<responses::NativeResponses>,
    ) -> Result<(), RegistryError> {
        let backend: Arc<dyn Backend> = Arc::new(responses::ResponsesAware::new(backend, native));
        let name = name.into();
        if name.is_empty() {
            return Err(RegistryError::EmptyName);
        }
        if max_concurrency == 0 {
            return Err(RegistryError::ZeroConcurrency { name });
        }
        if self.index.contains_key(&name) {
            return Err(RegistryError::Duplicate { name });
        }
        self.index.insert(name.clone(), self.models.len());
        self.models.push(ModelEntry {
            backend: Limited::new(name.clone(), max_concurrency, backend),
            name,
            caps,
        });
        Ok(())
    }

    /// Caps generations across all models at `limit` (at least 1).
    pub fn with_node_limit(mut self, limit: usize) -> Self {
        let limit = limit.clamp(1, MAX_PERMITS);
        self.node_limit = Some((limit, Arc::new(Semaphore::new(limit))));
        self
    }

    /// Starts a generation on the backend serving `request.model`.
    pub fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        let Some(&i) = self.index.get(&request.model) else {
            return Err(BackendError::UnknownModel {
                model: request.model.clone(),
            });
        };
        // Defence in depth: the gateway routes by the declared capabilities too, but this
        // node's own OpenAI server (`serve-openai`) has no gateway in front of it.
        let caps = self.models[i].caps;
        if let Some((capability, param)) = request
            .required_caps()
            .into_iter()
            .find(|(need, _)| !caps.contains(*need))
        {
            return Err(BackendError::Unsupported {
                model: request.model.clone(),
                capability,
                param,
            });
        }
        let node_permit = match &self.node_limit {
            None => None,
            Some((limit, sem)) => {
                Some(
                    Arc::clone(sem)
                        .try_acquire_owned()
                        .map_err(|_| BackendError::Busy {
                            model: request.model.clone(),
                            limit: *limit,
                        })?,
                )
            }
        };
        let generation = self.models[i].backend.start(request)?;
        Ok(match node_permit {
            Some(p) => generation.hold(p),
            None => generation,
        })
    }

    pub fn contains(&self, model: &str) -> bool {
        self.index.contains_key(model)
    }

    /// What `model` declares it can do, or `None` for an unknown model.
    pub fn caps(&self, model: &str) -> Option<ModelCaps> {
        self.index.get(model).map(|&i| self.models[i].caps)
    }

    /// Model names in configuration order (for `/v1/models` and registration).
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.iter().map(|m| m.name.as_str())
    }

    /// Generations of `model` in flight now, or `None` for an unknown model.
    pub fn in_flight(&self, model: &str) -> Option<usize> {
        self.index
            .get(model)
            .map(|&i| self.models[i].backend.in_flight())
    }

    /// Generations in flight across all models.
    pub fn total_in_flight(&self) -> usize {
        self.models.iter().map(|m| m.backend.in_flight()).sum()
    }

    /// How many generations the node accepts at once: the node limit, or the sum of per-model
    /// limits when there is none (or it is larger).
    pub fn capacity(&self) -> usize {
        let sum = self
            .models
            .iter()
            .map(|m| m.backend.limit())
            .fold(0usize, usize::saturating_add);
        match &self.node_limit {
            Some((limit, _)) => sum.min(*limit),
            None => sum,
        }
    }
}

impl From<&nearpath_config::ModelConfig> for ModelSpec {
    fn from(m: &nearpath_config::ModelConfig) -> Self {
        use nearpath_config::BackendConfig;
        let backend = match &m.backend {
            BackendConfig::Sim {
                ttft_ms,
                tokens_per_s,
                seed,
            } => BackendSpec::Sim(SimConfig {
                ttft_ms: *ttft_ms,
                tokens_per_s: *tokens_per_s,
                seed: *seed,
            }),
            BackendConfig::Upstream {
                base_url,
                api_key,
                upstream_model,
                timeout_ms,
            } => BackendSpec::Upstream(UpstreamConfig {
                base_url: base_url.clone(),
                api_key: api_key.clone(),
                upstream_model: upstream_model.clone(),
                timeout_ms: *timeout_ms,
            }),
        };
        ModelSpec {
            name: m.name.clone(),
            max_concurrency: usize::try_from(m.max_concurrency).unwrap_or(MAX_PERMITS),
            backend,
            responses: m.responses,
            caps: Some(configured_caps(m)),
        }
    }
}

/// The capabilities a `[[models]]` entry declares, its backend's default when it lists none
/// (names were validated at load; an unknown one could only come from a config built in code,
/// and declares nothing).
pub fn configured_caps(m: &nearpath_config::ModelConfig) -> ModelCaps {
    ModelCaps::from_names(m.capability_names()).unwrap_or_default()
}

/// Approximate token count of `text`: each run of letters/digits counts one, each other
/// non-space character counts one. Real tokenizers give roughly 1.3 tokens per English word, so
/// this undercounts a little; it is deterministic and cheap, which is what the simulator needs.
pub fn approx_token_count(text: &str) -> u32 {
    let mut count: u32 = 0;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if !in_word {
                count = count.saturating_add(1);
                in_word = true;
            }
        } else {
            in_word = false;
            if !c.is_whitespace() {
                count = count.saturating_add(1);
            }
        }
    }
    count
}

/// The approximate prompt size of a request (see [`approx_token_count`]).
pub fn approx_prompt_tokens(request: &InferenceRequest) -> u32 {
    request
        .input_texts()
        .map(approx_token_count)
        .fold(0, u32::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearpath_protocol::openai::Endpoint;

    fn request(model: &str) -> InferenceRequest {
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"Hello, world! 42 times"}}]}}"#
        );
        match InferenceRequest::parse(Endpoint::Chat, body.as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn instant_sim() -> Arc<dyn Backend> {
        Arc::new(SimBackend::new(SimConfig {
            ttft_ms: 0,
            tokens_per_s: 0.0,
            seed: 1,
        }))
    }

    #[test]
    fn approx_counts() {
        assert_eq!(approx_token_count(""), 0);
        assert_eq!(approx_token_count("Hello, world! 42 times"), 6);
        assert_eq!(approx_token_count("  a\nb\t"), 2);
        assert_eq!(approx_prompt_tokens(&request("m")), 6);
    }

    #[tokio::test]
    async fn limited_is_busy_over_the_limit_and_frees_on_drop() {
        let limited = Limited::new("m", 2, instant_sim());
        let req = request("m");
        let a = limited.start(&req);
        let b = limited.start(&req);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(limited.in_flight(), 2);
        match limited.start(&req) {
            Err(e) => {
                assert_eq!(
                    e,
                    BackendError::Busy {
                        model: "m".into(),
                        limit: 2
                    }
                );
                assert_eq!(e.code(), "busy");
                assert!(e.retryable());
                assert_eq!(e.api_error().status, 429);
            }
            Ok(_) => panic!("a third generation was admitted over a limit of 2"),
        }
        drop(a);
        assert_eq!(limited.in_flight(), 1);
        assert!(limited.start(&req).is_ok());
    }

    #[tokio::test]
    async fn registry_routes_by_model_and_applies_node_limit() {
        let mut registry = ModelRegistry::new();
        assert!(registry.insert("a", 4, instant_sim()).is_ok());
        assert!(registry.insert("b", 4, instant_sim()).is_ok());
        assert!(matches!(
            registry.insert("a", 1, instant_sim()),
            Err(RegistryError::Duplicate { .. })
        ));
        assert!(matches!(
            registry.insert("c", 0, instant_sim()),
            Err(RegistryError::ZeroConcurrency { .. })
        ));
        let registry = registry.with_node_limit(3);
        assert_eq!(registry.model_names().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(registry.capacity(), 3);
        match registry.start(&request("zzz")) {
            Err(e) => {
                assert_eq!(e.code(), "model_not_found");
                assert!(!e.retryable());
                assert_eq!(e.api_error().status, 404);
            }
            Ok(_) => panic!("unknown model started"),
        }
        let g1 = registry.start(&request("a"));
        let g2 = registry.start(&request("b"));
        let g3 = registry.start(&request("a"));
        assert!(g1.is_ok() && g2.is_ok() && g3.is_ok());
        assert_eq!(registry.in_flight("a"), Some(2));
        assert_eq!(registry.total_in_flight(), 3);
        assert!(matches!(
            registry.start(&request("b")),
            Err(BackendError::Busy { limit: 3, .. })
        ));
        // A model-level refusal must not leak a node-level slot.
        drop(g2);
        assert!(registry.start(&request("b")).is_ok());
        assert_eq!(registry.in_flight("b"), Some(0));
    }

    #[tokio::test]
    async fn generation_runs_to_done() {
        let mut g = match instant_sim().start(&request("m")) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let mut tokens = 0;
        loop {
            match g.next().await {
                Some(Ok(BackendEvent::Token { .. })) => tokens += 1,
                Some(Ok(BackendEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                })) => {
                    assert_eq!(finish_reason, "length");
                    assert_eq!(prompt_tokens, 6);
                    assert_eq!(completion_tokens, DEFAULT_SIM_MAX_TOKENS);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(tokens, DEFAULT_SIM_MAX_TOKENS);
        assert!(g.next().await.is_none());
    }

    #[test]
    fn error_codes_and_retry() {
        let url = "http://127.0.0.1:1/v1".to_owned();
        let cases = [
            (
                BackendError::UpstreamUnavailable {
                    url: url.clone(),
                    reason: "refused".into(),
                },
                "upstream_unavailable",
                true,
                503,
            ),
            (
                BackendError::UpstreamTimeout {
                    url: url.clone(),
                    timeout_ms: 5,
                },
                "upstream_timeout",
                true,
                504,
            ),
            (
                BackendError::BadRequest {
                    url: url.clone(),
                    status: 422,
                    message: "bad".into(),
                },
                "bad_request",
                false,
                422,
            ),
            (
                BackendError::ModelNotFound {
                    url: url.clone(),
                    model: "x".into(),
                    message: "no".into(),
                },
                "model_not_found",
                true,
                502,
            ),
            (
                BackendError::UpstreamAuth {
                    url: url.clone(),
                    status: 401,
                    message: "no".into(),
                },
                "upstream_auth",
                true,
                502,
            ),
            (
                BackendError::UpstreamError {
                    url: url.clone(),
                    status: Some(500),
                    message: "oops".into(),
                },
                "upstream_error",
                true,
                502,
            ),
            (
                BackendError::UpstreamProtocol {
                    url: url.clone(),
                    detail: "junk".into(),
                },
                "upstream_protocol",
                false,
                502,
            ),
            (
                BackendError::Internal {
                    detail: "bug".into(),
                },
                "internal",
                false,
                500,
            ),
        ];
        for (err, code, retry, status) in cases {
            assert_eq!(err.code(), code, "{err}");
            assert_eq!(err.retryable(), retry, "{err}");
            assert_eq!(err.api_error().status, status, "{err}");
            // The node's private upstream address never reaches a client.
            assert!(!err.api_error().body().contains("127.0.0.1"), "{err}");
        }
    }

    fn chat(extra: serde_json::Value) -> InferenceRequest {
        let mut v =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        if let (Some(o), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            o.extend(extra);
        }
        match InferenceRequest::parse(Endpoint::Chat, v.to_string().as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn registry_refuses_a_request_needing_an_undeclared_capability() {
        let mut registry = ModelRegistry::new();
        let declared = ModelCaps::LOGPROBS;
        assert!(registry
            .insert_with_caps("m", 4, instant_sim(), declared)
            .is_ok());
        assert!(registry.insert("s", 4, instant_sim()).is_ok());
        assert_eq!(registry.caps("m"), Some(declared));
        assert_eq!(
            registry.caps("s"),
            Some(sim_caps()),
            "the simulator's default"
        );
        let tools = chat(serde_json::json!({
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"
        }));
        match registry.start(&tools) {
            Err(e) => {
                assert_eq!(e.code(), "unsupported_parameter");
                assert!(!e.retryable(), "it would fail on any node like this one");
                let api = e.api_error();
                assert_eq!(api.status, 400);
                assert_eq!(api.param.as_deref(), Some("tools"));
                assert!(
                    api.message.contains("does not support tools"),
                    "{}",
                    api.message
                );
            }
            Ok(_) => panic!("a tools request reached a model without tools"),
        }
        assert_eq!(
            registry.total_in_flight(),
            0,
            "refused before taking a slot"
        );
        assert!(registry
            .start(&chat(serde_json::json!({"logprobs": true})))
            .is_ok());
        let mut on_sim = tools.clone();
        on_sim.model = "s".into();
        assert!(registry.start(&on_sim).is_ok());
    }

    #[test]
    fn config_capability_names_are_the_protocol_names() {
        let protocol: Vec<&str> = ModelCaps::NAMED.iter().map(|(_, n)| *n).collect();
        assert_eq!(nearpath_config::CAPABILITY_NAMES.to_vec(), protocol);
        assert_eq!(
            ModelCaps::from_names(nearpath_config::SIM_CAPABILITY_NAMES),
            Ok(sim_caps())
        );
        let upstream = nearpath_config::ModelConfig {
            name: "u".into(),
            max_concurrency: 1,
            backend: nearpath_config::BackendConfig::Upstream {
                base_url: "http://127.0.0.1:1/v1".into(),
                api_key: None,
                upstream_model: None,
                timeout_ms: 1,
            },
            capabilities: None,
            responses: Default::default(),
            weights_bytes: None,
            params_b: None,
            dtype: None,
        };
        assert_eq!(configured_caps(&upstream), ModelCaps::NONE);
        let declared = nearpath_config::ModelConfig {
            capabilities: Some(vec!["tools".into(), "embeddings".into()]),
            ..upstream
        };
        assert_eq!(
            configured_caps(&declared),
            ModelCaps::TOOLS.with(ModelCaps::EMBEDDINGS)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rich_generations_are_paced_chunks_then_done() {
        let sim = SimBackend::new(SimConfig {
            ttft_ms: 100,
            tokens_per_s: 10.0,
            seed: 0,
        });
        let start = tokio::time::Instant::now();
        let mut g = match sim.start(&chat(serde_json::json!({"n": 2, "max_tokens": 3}))) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let mut chunks = 0;
        loop {
            match g.next().await {
                Some(Ok(BackendEvent::Chunk { .. })) => chunks += 1,
                Some(Ok(BackendEvent::Done {
                    finish_reason,
                    completion_tokens,
                    ..
                })) => {
                    assert_eq!((finish_reason.as_str(), completion_tokens), ("length", 6));
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // 3 content chunks per choice plus choice 1's finish chunk.
        assert_eq!(chunks, 7);
        // Steps at 100, 200 and 300 ms; the finishes go out with the last.
        assert_eq!(
            tokio::time::Instant::now() - start,
            std::time::Duration::from_millis(300)
        );
    }
}
