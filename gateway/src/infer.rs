//! Inference dispatch shared by the HTTP (OpenAI) and QUIC (`nearpath/1`) front ends:
//! API keys, rate limits, routing with the geofence, failover before the first token, the token
//! stream from the node, cancellation, and metering.

use crate::metrics::labels;
use crate::registry::{ModelAvailability, NodeEntry, SlotGuard, SlotKind};
use crate::router::{Deny, LatLon, NoRoute, NodeId, Workload};
use crate::server::Shared;
use crate::session_id::SessionId;
use crate::store::{ApiKey, UsageKind, UsageRecord};
use nearpath_config::WorkloadKind;
use nearpath_geo::{Decision, Location};
use nearpath_protocol::message::{Message, Open, RefuseCode, SessionKind};
use nearpath_protocol::openai::{ApiError, InferenceRequest, Usage};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::MAX_CONTROL_FRAME;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long an authenticated key is trusted without asking the store again. Revocation through
/// the admin API removes the key from the cache at once and marks it revoked here for good; this
/// bounds staleness for other writers.
const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// API keys recently authenticated, by secret hash, and the revocation signal of every key a
/// running session holds.
#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, (ApiKey, Instant)>>,
    /// One token per key id, cancelled (and never replaced) when the key is revoked. Sessions
    /// and streams select on it so that a revocation ends them at once; a token looked up after
    /// the revocation is already cancelled, so a session that started in the race ends too.
    /// Key ids are never reused, so the map is bounded by the keys in the store.
    revocations: Mutex<HashMap<String, CancellationToken>>,
}

impl KeyCache {
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The signal that key `key_id` was revoked. Sessions of the key end when it is cancelled.
    pub fn revocation(&self, key_id: &str) -> CancellationToken {
        self.revocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key_id.to_string())
            .or_default()
            .clone()
    }

    /// Whether key `key_id` was revoked through this gateway.
    pub fn is_revoked(&self, key_id: &str) -> bool {
        self.revocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key_id)
            .is_some_and(|t| t.is_cancelled())
    }

    /// Marks key `key_id` revoked: the cache forgets it, no later lookup caches it again, and
    /// every session holding it is told to end.
    pub fn revoke(&self, key_id: &str) {
        // The entries lock is held across the mark so that an authentication that read the
        // store before the revocation cannot put the key back into the cache after it (`put`
        // checks the mark under the same lock).
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        self.revocation(key_id).cancel();
        entries.retain(|_, (k, _)| k.id != key_id);
    }

    /// A fresh cached key for `hash` that is not revoked.
    fn get(&self, hash: &str) -> Option<ApiKey> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (key, at) = entries.get(hash)?;
        if at.elapsed() >= KEY_CACHE_TTL || self.is_revoked(&key.id) {
            return None;
        }
        Some(key.clone())
    }

    /// Caches `key` unless it was revoked meanwhile; says whether the key may be used.
    fn put(&self, hash: String, key: &ApiKey) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_revoked(&key.id) {
            return false;
        }
        entries.insert(hash, (key.clone(), Instant::now()));
        true
    }
}

/// Per-key token buckets (requests per minute, tokens per minute, game session starts per
/// minute) and per-key caps on concurrent inference streams and game sessions. In memory, per
/// gateway process: a deployment with several gateways gives each key its limit at each gateway.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Buckets>>,
    /// Session-start buckets: (tokens, last refill).
    starts: Mutex<HashMap<String, (f64, Instant)>>,
    /// What each key holds now; shared with the guards that give it back.
    held: Arc<Mutex<HashMap<String, HeldCounts>>>,
}

/// Concurrent work one key holds.
#[derive(Default, Debug, Clone, Copy)]
struct HeldCounts {
    streams: u32,
    sessions: u32,
}

/// What a [`CapGuard`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapKind {
    /// An inference request in flight.
    Stream,
    /// A live game session.
    Session,
}

/// One unit of a key's concurrency cap, given back when dropped (however the work ends).
pub struct CapGuard {
    held: Arc<Mutex<HashMap<String, HeldCounts>>>,
    key: String,
    kind: CapKind,
}

impl Drop for CapGuard {
    fn drop(&mut self) {
        let mut map = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get_mut(&self.key) {
            match self.kind {
                CapKind::Stream => c.streams = c.streams.saturating_sub(1),
                CapKind::Session => c.sessions = c.sessions.saturating_sub(1),
            }
            if c.streams == 0 && c.sessions == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// Why a per-key cap refused work: a 429 with `code` and `Retry-After`.
#[derive(Debug, Clone)]
pub struct CapRefusal {
    /// `concurrency_limit_exceeded` or `rate_limit_exceeded`.
    pub code: &'static str,
    /// Which cap: `streams`, `sessions` or `session_starts` (a metric label).
    pub cap: &'static str,
    pub message: String,
    pub retry_after_s: u64,
}

impl CapRefusal {
    /// The refusal as an API error (429, `rate_limit_error`).
    pub fn api_error(&self) -> ApiError {
        ApiError::new(
            429,
            "rate_limit_error",
            Some(self.code),
            None,
            self.message.clone(),
        )
    }
}

/// The caps that apply to `key`: its own, else the gateway-wide defaults.
pub struct EffectiveCaps {
    pub max_concurrent_streams: u32,
    pub max_concurrent_sessions: u32,
    pub session_starts_per_minute: u32,
}

pub fn effective_caps(shared: &Shared, key: &ApiKey) -> EffectiveCaps {
    let c = &shared.config;
    EffectiveCaps {
        max_concurrent_streams: key
            .caps
            .max_concurrent_streams
            .unwrap_or(c.inference.default_max_concurrent_streams),
        max_concurrent_sessions: key
            .caps
            .max_concurrent_sessions
            .unwrap_or(c.game.default_max_concurrent_sessions),
        session_starts_per_minute: key
            .caps
            .session_starts_per_minute
            .unwrap_or(c.game.default_session_starts_per_minute),
    }
}

struct Buckets {
    requests: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// Takes one request from `key`'s bucket, or says how many seconds until one is available.
    pub fn admit(&self, key: &ApiKey, now: Instant) -> Result<(), u64> {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let rpm = key.requests_per_minute.max(1) as f64;
        let tpm = key.tokens_per_minute.max(1) as f64;
        let b = map.entry(key.id.clone()).or_insert(Buckets {
            requests: rpm,
            tokens: tpm,
            at: now,
        });
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.at = now;
        b.requests = (b.requests + dt * rpm / 60.0).min(rpm);
        b.tokens = (b.tokens + dt * tpm / 60.0).min(tpm);
        if b.tokens < 1.0 {
            return Err(((1.0 - b.tokens) * 60.0 / tpm).ceil().max(1.0) as u64);
        }
        if b.requests < 1.0 {
            return Err(((1.0 - b.requests) * 60.0 / rpm).ceil().max(1.0) as u64);
        }
        b.requests -= 1.0;
        Ok(())
    }

    /// Charges the tokens a finished request used (the bucket may go negative: the next
    /// requests wait until it refills). The debt is capped at one minute's allowance, so that no
    /// single request, whatever it was billed, locks a key out for more than two minutes.
    pub fn charge_tokens(&self, key: &ApiKey, tokens: u64) {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get_mut(&key.id) {
            let tpm = key.tokens_per_minute.max(1) as f64;
            b.tokens = (b.tokens - tokens as f64).max(-tpm);
        }
    }

    /// Takes one unit of `key`'s concurrency cap of `kind` (at most `limit` held at once).
    pub fn acquire(&self, key: &ApiKey, kind: CapKind, limit: u32) -> Result<CapGuard, CapRefusal> {
        let mut map = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let c = map.entry(key.id.clone()).or_default();
        let (n, what, cap) = match kind {
            CapKind::Stream => (&mut c.streams, "inference requests in flight", "streams"),
            CapKind::Session => (&mut c.sessions, "live game sessions", "sessions"),
        };
        if *n >= limit {
            let held = *n;
            if c.streams == 0 && c.sessions == 0 {
                map.remove(&key.id);
            }
            return Err(CapRefusal {
                code: "concurrency_limit_exceeded",
                cap,
                message: format!(
                    "key {} already has {held} {what} (its limit is {limit}); retry when one ends",
                    key.prefix
                ),
                retry_after_s: 1,
            });
        }
        *n += 1;
        Ok(CapGuard {
            held: self.held.clone(),
            key: key.id.clone(),
            kind,
        })
    }

    /// Takes one game session start from `key`'s bucket of `per_minute`.
    pub fn admit_session_start(
        &self,
        key: &ApiKey,
        per_minute: u32,
        now: Instant,
    ) -> Result<(), CapRefusal> {
        let mut map = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        let rate = per_minute.max(1) as f64;
        let (tokens, at) = map.entry(key.id.clone()).or_insert((rate, now));
        let dt = now.saturating_duration_since(*at).as_secs_f64();
        *at = now;
        *tokens = (*tokens + dt * rate / 60.0).min(rate);
        if *tokens < 1.0 {
            return Err(CapRefusal {
                code: "rate_limit_exceeded",
                cap: "session_starts",
                message: format!(
                    "key {} started {per_minute} game sessions in the last minute (its limit)",
                    key.prefix
                ),
                retry_after_s: ((1.0 - *tokens) * 60.0 / rate).ceil().max(1.0) as u64,
            });
        }
        *tokens -= 1.0;
        Ok(())
    }
}

/// Takes one of `key`'s concurrent inference streams for a request arriving on `entry`
/// (`http` or `quic`), counting a refusal.
pub fn acquire_stream(
    shared: &Shared,
    key: &ApiKey,
    entry: &'static str,
) -> Result<CapGuard, CapRefusal> {
    let limit = effective_caps(shared, key).max_concurrent_streams;
    shared
        .auth
        .limiter
        .acquire(key, CapKind::Stream, limit)
        .inspect_err(|r| count_cap_refusal(shared, entry, r))
}

/// Counts a per-key cap refusal by entry point and cap.
pub fn count_cap_refusal(shared: &Shared, entry: &'static str, r: &CapRefusal) {
    shared
        .metrics
        .key_cap_refusals
        .get_or_create(&labels([("entry", entry), ("cap", r.cap)]))
        .inc();
}

/// Refuses new work while the usage ledger cannot commit: serving it would be serving it free
/// (billing must fail closed). 503 `ledger_unavailable`, retryable; work already running goes on.
pub fn ledger_gate(shared: &Shared, entry: &'static str) -> Result<(), ApiError> {
    if shared.store.ledger_health().healthy {
        return Ok(());
    }
    shared
        .metrics
        .ledger_refusals
        .get_or_create(&labels([("entry", entry)]))
        .inc();
    Err(ApiError::new(
        503,
        "server_error",
        Some(LEDGER_UNAVAILABLE),
        None,
        "the usage ledger cannot record usage right now, so no new work is accepted; retry shortly",
    ))
}

/// The error code of [`ledger_gate`]'s refusal.
pub const LEDGER_UNAVAILABLE: &str = "ledger_unavailable";

/// The prompt tokens a request is billed: one token per 4 bytes of its input text (message
/// contents, or the prompt), rounded up. Four bytes per token is the usual average of BPE
/// tokenisers on English text; the gateway cannot run the node's tokeniser, and must not take
/// the node's word for it. Bounded by the request body limit.
pub fn prompt_token_estimate(request: &InferenceRequest) -> u32 {
    let bytes: usize = request.input_texts().map(str::len).sum();
    u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)
}

/// Checks a Bearer secret against the store (with a short cache).
pub async fn authenticate(shared: &Arc<Shared>, secret: Option<&str>) -> Result<ApiKey, ApiError> {
    let secret = secret.ok_or_else(ApiError::missing_api_key)?;
    let hash = crate::store::hash_secret(secret);
    if let Some(key) = shared.auth.keys.get(&hash) {
        return Ok(key);
    }
    let store = shared.store.clone();
    let owned = secret.to_string();
    let found = tokio::task::spawn_blocking(move || store.authenticate_api_key(&owned))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::unavailable(format!("key store unavailable: {e}")))?;
    match found {
        // The store may have answered before a revocation that has landed since.
        Some(key) if shared.auth.keys.put(hash, &key) => Ok(key),
        _ => Err(ApiError::invalid_api_key()),
    }
}

/// The geofence verdict for serving `client` from `node` (every GPU class of the node must be
/// allowed).
pub fn serve_check(
    shared: &Shared,
    client: &Location,
    node: &NodeEntry,
    workload: WorkloadKind,
) -> Result<(), Deny> {
    // Read once: the location changes when the node's connection migrates.
    let node_location = node.location();
    for (_, class) in &node.classes {
        if let Decision::Deny { rule, reason, .. } =
            shared
                .placement
                .policy
                .check_serve(client, &node_location, *class, workload)
        {
            return Err(Deny {
                rule: rule.to_string(),
                reason: reason.to_string(),
            });
        }
    }
    Ok(())
}

pub fn client_latlon(loc: &Location) -> Option<LatLon> {
    loc.coords.and_then(|c| LatLon::new(c.lat, c.lon).ok())
}

/// One event of a running inference, as the front ends see it.
#[derive(Debug)]
pub enum StreamEvent {
    Token(String),
    Done {
        finish_reason: String,
        usage: Usage,
    },
    /// The node failed after streaming began; the front end reports it in band.
    Failed(ApiError),
}

/// A request admitted and running on a node, its first event already received.
pub struct InferStream {
    pub node: Arc<NodeEntry>,
    pub session_id: u64,
    /// Holds `session_id` among the live ids until the request ends.
    _session: SessionId,
    pub attempts: u32,
    /// Request start to the first event, as the gateway saw it.
    pub ttft: Duration,
    first: Option<StreamEvent>,
    framed: FramedRecv,
    send: quinn::SendStream,
    _slot: SlotGuard,
    idle_timeout: Duration,
    finished: bool,
    /// Non-empty token pieces received from the node (what the gateway relays).
    pieces: u32,
    /// The request's `max_tokens`: no more completion tokens are ever billed.
    max_tokens: Option<u32>,
    /// [`prompt_token_estimate`] of the request.
    prompt_tokens: u32,
    /// The counts of the node's `Done`, once it came.
    reported: Option<Usage>,
    /// Cancelled when the request's API key is revoked: the stream then ends at once.
    revoked: Option<CancellationToken>,
}

impl InferStream {
    /// Ends the stream with `key_revoked` (and resets the node's stream) as soon as `revoked`
    /// is cancelled. The front ends pass their key's [`KeyCache::revocation`] token.
    pub fn end_on_revocation(&mut self, revoked: CancellationToken) {
        self.revoked = Some(revoked);
    }

    /// The next event. After `Done` or `Failed` the stream is over. `Done` carries the billed
    /// usage ([`InferStream::billed`]); the node's own counts are kept in
    /// [`InferStream::reported`].
    pub async fn next(&mut self) -> StreamEvent {
        if self.revoked.as_ref().is_some_and(|t| t.is_cancelled()) {
            return self.end_revoked();
        }
        let ev = match self.first.take() {
            Some(first) => first,
            None => {
                let revoked = self.revoked.clone();
                let read = tokio::select! {
                    biased;
                    _ = async {
                        match &revoked {
                            Some(t) => t.cancelled().await,
                            None => std::future::pending().await,
                        }
                    } => None,
                    r = tokio::time::timeout(self.idle_timeout, self.framed.next()) => Some(r),
                };
                match read {
                    None => return self.end_revoked(),
                    Some(Ok(r)) => to_event(r),
                    Some(Err(_)) => StreamEvent::Failed(ApiError::timeout(format!(
                        "node {} sent no token for {} ms",
                        self.node.id,
                        self.idle_timeout.as_millis()
                    ))),
                }
            }
        };
        self.finished = !matches!(ev, StreamEvent::Token(_));
        match ev {
            StreamEvent::Token(t) => {
                if !t.is_empty() {
                    self.pieces = self.pieces.saturating_add(1);
                }
                StreamEvent::Token(t)
            }
            StreamEvent::Done {
                finish_reason,
                usage,
            } => {
                self.reported = Some(usage);
                StreamEvent::Done {
                    finish_reason,
                    usage: self.billed(),
                }
            }
            failed => failed,
        }
    }

    /// What the tenant is billed so far: the estimated prompt, and the pieces the gateway
    /// relayed up to the request's `max_tokens` (a node cannot bill more by saying so).
    pub fn billed(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.pieces.min(self.max_tokens.unwrap_or(u32::MAX)),
        }
    }

    /// The counts the node's `Done` claimed, if it sent one.
    pub fn reported(&self) -> Option<Usage> {
        self.reported
    }

    /// The key was revoked: the node's stream is reset (which aborts the backend request) and
    /// the client is told in band.
    fn end_revoked(&mut self) -> StreamEvent {
        if !self.finished {
            let _ = self
                .send
                .reset(nearpath_protocol::app_code::STREAM_CANCELLED);
            let _ = self
                .framed
                .get_mut()
                .stop(nearpath_protocol::app_code::STREAM_CANCELLED);
            self.finished = true;
        }
        StreamEvent::Failed(ApiError::key_revoked())
    }

    /// Stops the work on the node: the stream reset reaches it within one round trip.
    pub fn cancel(&mut self) {
        if !self.finished {
            let _ = self.send.reset(0u32.into());
            let _ = self.framed.get_mut().stop(0u32.into());
            self.finished = true;
        }
    }
}

impl Drop for InferStream {
    fn drop(&mut self) {
        self.cancel();
    }
}

fn to_event(r: Result<Option<Message>, nearpath_protocol::StreamError>) -> StreamEvent {
    match r {
        Ok(Some(Message::Token(t))) => StreamEvent::Token(t.text),
        Ok(Some(Message::Done(d))) => StreamEvent::Done {
            finish_reason: d.finish_reason,
            usage: Usage {
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
            },
        },
        Ok(Some(Message::Error(e))) => StreamEvent::Failed(node_error(&e.code, &e.message)),
        Ok(Some(other)) => StreamEvent::Failed(ApiError::bad_gateway(format!(
            "node sent an unexpected {} message",
            other.name()
        ))),
        Ok(None) => StreamEvent::Failed(ApiError::bad_gateway(
            "the node ended the stream without finishing",
        )),
        Err(e) => StreamEvent::Failed(ApiError::bad_gateway(format!(
            "the node failed mid-stream: {e}"
        ))),
    }
}

/// Maps a node-reported error code to the client-facing error.
fn node_error(code: &str, message: &str) -> ApiError {
    match code {
        "bad_request" | "invalid_request" => ApiError::bad_request(message.to_string(), None),
        "model_not_found" | "unknown_model" => {
            ApiError::bad_request(message.to_string(), Some("model"))
        }
        "timeout" | "upstream_timeout" => ApiError::timeout(message.to_string()),
        _ => ApiError::bad_gateway(format!("{code}: {message}")),
    }
}

/// Why one candidate did not work out.
enum Attempt {
    /// The node answered but could not serve (refused, failed): try the next candidate.
    Retry(ApiError),
    /// The node did not answer (no stream or `Accepted` within `inference.connect_timeout_ms`,
    /// or its connection is gone): try the next candidate, and, if none is left, wait for a node
    /// to come back as for a model with no node (a blip may be in progress).
    Unreachable(ApiError),
    /// Give up: another node would fail the same way.
    Fatal(ApiError),
}

/// Routes and starts a request, failing over between candidates until one produces its first
/// event.
///
/// A model that no node serves now but one served within `inference.model_grace_s`, or whose
/// candidates all failed to answer, is a blip, not an unknown model: the request waits (woken by
/// registrations, not polling) for up to `inference.unavailable_wait_ms` from its start for a
/// node to (re)register and is routed again, else it is answered 503 `model_unavailable`
/// (retryable). An answer comes within `unavailable_wait_ms + max_attempts × connect_timeout_ms`
/// unless a node accepted the request (then the first-token timeout applies). A model never
/// served is 404.
pub async fn dispatch(
    shared: &Arc<Shared>,
    request: &InferenceRequest,
    request_json: &str,
    client: &Location,
) -> Result<InferStream, ApiError> {
    let started = Instant::now();
    let model = request.model.as_str();
    let cfg = &shared.config.inference;
    let wait_until = started + Duration::from_millis(cfg.unavailable_wait_ms);
    let max_attempts = cfg.max_attempts.max(1);
    // Subscribed before the first route, so that a node registering in between wakes us.
    let mut joins = shared.directory.registry.joins();
    let mut failed: Vec<NodeId> = Vec::new();
    let mut last: Option<ApiError> = None;
    let mut attempts = 0u32;
    // Whether the request met a blip (no node, or no node answering): it then ends with a
    // retryable 503 `model_unavailable` unless a node serves it.
    let mut blip_seen = false;
    let mut unreachable = false;
    let mut geofence_counted = false;
    loop {
        joins.borrow_and_update();
        let (outcome, nodes) =
            shared
                .directory
                .registry
                .route(client_latlon(client), Workload::Model(model), |n| {
                    serve_check(shared, client, n, WorkloadKind::Inference)
                });
        let mut blip = false;
        match outcome.failure() {
            Some(NoRoute::NotServed) => match shared
                .directory
                .registry
                .model_availability(model, crate::clock::system_unix_ms())
            {
                ModelAvailability::Unknown if last.is_none() => {
                    return Err(ApiError::model_not_found(model))
                }
                _ => blip = true,
            },
            Some(NoRoute::Denied(d)) => {
                shared
                    .metrics
                    .geofence_decisions
                    .get_or_create(&labels([
                        ("side", "client"),
                        ("outcome", "deny"),
                        ("rule", &d.rule),
                    ]))
                    .inc();
                return Err(ApiError::geofence_denied(&d.rule, &d.reason));
            }
            Some(NoRoute::Saturated) => {
                return Err(ApiError::rate_limited(format!(
                    "every node serving {model} is at capacity; retry shortly"
                )))
            }
            Some(NoRoute::Draining) => return Err(ApiError::no_eligible_node(model)),
            None => {
                if !geofence_counted {
                    geofence_counted = true;
                    shared
                        .metrics
                        .geofence_decisions
                        .get_or_create(&labels([
                            ("side", "client"),
                            ("outcome", "allow"),
                            ("rule", "-"),
                        ]))
                        .inc();
                }
            }
        }
        for node in &nodes {
            if failed.contains(&node.key) {
                continue;
            }
            if attempts >= max_attempts {
                break;
            }
            let Some(slot) = shared.directory.registry.acquire(node, SlotKind::Inference) else {
                continue;
            };
            if attempts > 0 {
                shared.metrics.inference_failovers.inc();
            }
            attempts += 1;
            let session = shared.sessions.ids.mint();
            match try_node(shared, node, slot, session, model, request_json, started).await {
                Ok(mut s) => {
                    s.attempts = attempts;
                    s.max_tokens = request.max_tokens;
                    s.prompt_tokens = prompt_token_estimate(request);
                    if attempts > 1 {
                        info!(node = %node.id, attempts, "request served after failover");
                    }
                    if blip_seen {
                        count_blip_wait(shared, "served");
                    }
                    return Ok(s);
                }
                Err(Attempt::Retry(e)) => {
                    warn!(node = %node.id, error = %e.message, "candidate failed before the first token; trying the next");
                    failed.push(node.key);
                    last = Some(e);
                }
                Err(Attempt::Unreachable(e)) => {
                    warn!(node = %node.id, error = %e.message, "candidate did not answer; trying the next");
                    failed.push(node.key);
                    unreachable = true;
                    last = Some(e);
                }
                Err(Attempt::Fatal(e)) => return Err(e),
            }
        }
        // Only a blip is worth waiting for: no node serves a recently served model, or the nodes
        // that serve it do not answer. A node that answered with an error is answered as is.
        let blip = blip || unreachable;
        if !blip {
            break;
        }
        let now = Instant::now();
        blip_seen = true;
        if attempts >= max_attempts || now >= wait_until {
            break;
        }
        debug!(%model, "no node answers for a recently served model; waiting for one to register");
        match tokio::time::timeout_at(tokio::time::Instant::from_std(wait_until), joins.changed())
            .await
        {
            Ok(Ok(())) => continue,
            _ => break,
        }
    }
    if blip_seen {
        count_blip_wait(shared, "unavailable");
        return Err(ApiError::model_unavailable(model));
    }
    Err(last.unwrap_or_else(|| {
        ApiError::rate_limited(format!(
            "every node serving {model} is at capacity; retry shortly"
        ))
    }))
}

/// Counts a request that found no node for a recently served model, by how it ended.
fn count_blip_wait(shared: &Shared, outcome: &'static str) {
    shared
        .metrics
        .inference_blip_waits
        .get_or_create(&labels([("outcome", outcome)]))
        .inc();
}

async fn try_node(
    shared: &Arc<Shared>,
    node: &Arc<NodeEntry>,
    slot: SlotGuard,
    session: SessionId,
    model: &str,
    request_json: &str,
    started: Instant,
) -> Result<InferStream, Attempt> {
    let cfg = &shared.config.inference;
    let session_id = session.get();
    // Opening the stream and the node's `Accepted` (sent before any backend work) share one
    // deadline: a node that is registered but unreachable (a blip the heartbeats have not shown
    // yet) costs a request at most this long before the next candidate is tried.
    let accept_deadline = tokio::time::Instant::now()
        + Duration::from_millis(cfg.connect_timeout_ms)
            .min(Duration::from_millis(cfg.first_token_timeout_ms));
    let (mut tx, rx) = match tokio::time::timeout_at(accept_deadline, node.conn.open_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(Attempt::Unreachable(ApiError::bad_gateway(format!(
                "node {}: {e}",
                node.id
            ))))
        }
        Err(_) => {
            return Err(Attempt::Unreachable(ApiError::timeout(format!(
                "node {} did not accept a stream within {} ms",
                node.id, cfg.connect_timeout_ms
            ))))
        }
    };
    let open = Message::Open(Open {
        session_id,
        kind: SessionKind::Inference {
            model: model.to_string(),
            request_json: request_json.to_string(),
        },
    });
    match tokio::time::timeout_at(accept_deadline, send(&mut tx, &open)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Attempt::Unreachable(ApiError::bad_gateway(format!(
                "node {}: {e}",
                node.id
            ))))
        }
        Err(_) => {
            let _ = tx.reset(0u32.into());
            return Err(Attempt::Unreachable(ApiError::timeout(format!(
                "node {} did not take the request within {} ms",
                node.id, cfg.connect_timeout_ms
            ))));
        }
    }
    let mut framed = FramedRecv::new(rx, MAX_CONTROL_FRAME);
    let first_deadline = started + Duration::from_millis(cfg.first_token_timeout_ms);
    let fail = |tx: &mut quinn::SendStream, framed: &mut FramedRecv, a: Attempt| {
        let _ = tx.reset(0u32.into());
        let _ = framed.get_mut().stop(0u32.into());
        Err(a)
    };
    // Accepted / Refused first, within the accept deadline.
    let answer = tokio::time::timeout_at(accept_deadline, framed.next()).await;
    match answer {
        Ok(Ok(Some(Message::Accepted(_)))) => {}
        Ok(Ok(Some(Message::Refused(r)))) => {
            let a = match r.code {
                RefuseCode::BadRequest => Attempt::Fatal(ApiError::bad_request(r.reason, None)),
                RefuseCode::Busy | RefuseCode::UnknownWorkload | RefuseCode::Internal => {
                    Attempt::Retry(ApiError::unavailable(format!(
                        "node {} refused: {}",
                        node.id, r.reason
                    )))
                }
            };
            return fail(&mut tx, &mut framed, a);
        }
        Ok(Ok(Some(other))) => {
            let e = ApiError::bad_gateway(format!(
                "node {} sent {} before Accepted",
                node.id,
                other.name()
            ));
            return fail(&mut tx, &mut framed, Attempt::Retry(e));
        }
        Ok(Ok(None)) | Ok(Err(_)) => {
            let e = ApiError::bad_gateway(format!("node {} failed before answering", node.id));
            return fail(&mut tx, &mut framed, Attempt::Unreachable(e));
        }
        Err(_) => {
            let e = ApiError::timeout(format!(
                "node {} did not accept the request within {} ms",
                node.id, cfg.connect_timeout_ms
            ));
            return fail(&mut tx, &mut framed, Attempt::Unreachable(e));
        }
    }
    // Then the first token (or an immediate Done). A failure here is still invisible to the
    // client, so it fails over.
    let first = match tokio::time::timeout_at(
        tokio::time::Instant::from_std(first_deadline),
        framed.next(),
    )
    .await
    {
        Ok(r) => to_event(r),
        Err(_) => {
            let e = ApiError::timeout(format!(
                "no first token within {} ms",
                cfg.first_token_timeout_ms
            ));
            return fail(&mut tx, &mut framed, Attempt::Fatal(e));
        }
    };
    if let StreamEvent::Failed(e) = first {
        debug!(node = %node.id, error = %e.message, "node failed before its first token");
        let a = if e.status == 400 {
            Attempt::Fatal(e)
        } else if node.conn.close_reason().is_some() {
            Attempt::Unreachable(e)
        } else {
            Attempt::Retry(e)
        };
        return fail(&mut tx, &mut framed, a);
    }
    Ok(InferStream {
        node: node.clone(),
        session_id,
        _session: session,
        attempts: 1,
        ttft: started.elapsed(),
        first: Some(first),
        framed,
        send: tx,
        _slot: slot,
        idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
        finished: false,
        pieces: 0,
        max_tokens: None,
        prompt_tokens: 0,
        reported: None,
        revoked: None,
    })
}

/// Compares a node's `Done` counts with the gateway's. A disagreement beyond the tolerance
/// (`inference.usage_tolerance_percent` of the gateway's count, at least
/// `inference.usage_tolerance_tokens`) is an SLA penalty for the node (`usage_mismatch`),
/// durable and counted in the node's live routing score; the tenant is billed the gateway's count
/// either way.
fn check_reported_usage(
    shared: &Arc<Shared>,
    node: &NodeEntry,
    request_id: &str,
    billed: Usage,
    reported: Usage,
) {
    let cfg = &shared.config.inference;
    let tolerance = |counted: u32| {
        (u64::from(counted) * u64::from(cfg.usage_tolerance_percent) / 100)
            .max(u64::from(cfg.usage_tolerance_tokens))
    };
    let mut off = Vec::new();
    for (field, counted, claimed) in [
        ("prompt", billed.prompt_tokens, reported.prompt_tokens),
        (
            "completion",
            billed.completion_tokens,
            reported.completion_tokens,
        ),
    ] {
        if u64::from(counted.abs_diff(claimed)) > tolerance(counted) {
            shared
                .metrics
                .usage_mismatches
                .get_or_create(&labels([("field", field)]))
                .inc();
            off.push(format!(
                "{field} tokens: node said {claimed}, gateway counted {counted}"
            ));
        }
    }
    if off.is_empty() {
        return;
    }
    let detail = format!("request {request_id}: {}", off.join("; "));
    warn!(node = %node.id, %detail, "node misreported usage: penalty");
    shared
        .metrics
        .penalties
        .get_or_create(&labels([("kind", USAGE_MISMATCH)]))
        .inc();
    // The live score reacts now; the durable record feeds the score at the next registration.
    {
        let mut d = node.dynamic();
        d.recent_penalties = d.recent_penalties.saturating_add(1);
    }
    shared.directory.registry.refresh(node);
    let store = shared.store.clone();
    let (id, operator) = (node.id.clone(), node.operator_id.clone());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.record_penalty(
            &id,
            &operator,
            crate::clock::system_unix_ms(),
            USAGE_MISMATCH,
            0,
            &detail,
        ) {
            warn!(error = %e, "usage mismatch penalty not recorded");
        }
    });
}

/// The penalty kind of a node whose usage claims disagree with the gateway's count.
pub const USAGE_MISMATCH: &str = "usage_mismatch";

/// What a finished request is metered as.
pub struct Metering<'a> {
    pub key: &'a ApiKey,
    pub request_id: &'a str,
    pub model: &'a str,
    pub api: &'static str,
    pub node: Option<&'a NodeEntry>,
    pub outcome: &'static str,
    /// What the tenant is billed ([`InferStream::billed`]).
    pub usage: Usage,
    /// What the node claimed ([`InferStream::reported`]); checked against `usage`.
    pub reported: Option<Usage>,
    pub ttft: Option<Duration>,
    pub started: Instant,
    pub bytes: u64,
}

/// Records metrics and appends the usage record. The append is durable (it is acknowledged only
/// after its commit) but nobody waits for it: a client's answer must not wait for an fsync.
pub fn meter(shared: &Arc<Shared>, m: Metering<'_>) {
    let duration = m.started.elapsed();
    shared
        .metrics
        .inference_requests
        .get_or_create(&labels([("api", m.api), ("outcome", m.outcome)]))
        .inc();
    // The model name is the client's: label with it only if a node serves it (bounded).
    let served = m
        .node
        .is_some_and(|n| n.workloads.models.iter().any(|x| x == m.model))
        || shared.directory.registry.serves_model(m.model);
    let model = shared.metrics.model_label(m.model, served);
    if let Some(t) = m.ttft {
        shared
            .metrics
            .ttft_ms
            .get_or_create(&labels([("model", &model)]))
            .observe(t.as_secs_f64() * 1000.0);
    }
    shared
        .metrics
        .tokens_out
        .get_or_create(&labels([("model", &model)]))
        .inc_by(m.usage.completion_tokens as u64);
    shared
        .auth
        .limiter
        .charge_tokens(m.key, m.usage.total_tokens());
    if let (Some(node), Some(reported)) = (m.node, m.reported) {
        check_reported_usage(shared, node, m.request_id, m.usage, reported);
    }
    let record = UsageRecord {
        id: None,
        at_ms: crate::clock::system_unix_ms(),
        kind: UsageKind::Inference,
        request_id: m.request_id.to_string(),
        tenant: m.key.tenant.clone(),
        api_key_id: m.key.id.clone(),
        node_id: m.node.map(|n| n.id.clone()).unwrap_or_default(),
        operator_id: m.node.map(|n| n.operator_id.clone()).unwrap_or_default(),
        workload: m.model.to_string(),
        outcome: m.outcome.to_string(),
        prompt_tokens: m.usage.prompt_tokens as u64,
        completion_tokens: m.usage.completion_tokens as u64,
        node_prompt_tokens: m.reported.map(|u| u64::from(u.prompt_tokens)),
        node_completion_tokens: m.reported.map(|u| u64::from(u.completion_tokens)),
        ttft_ms: m.ttft.map(|t| t.as_secs_f64() * 1000.0),
        duration_ms: duration.as_secs_f64() * 1000.0,
        // An inference request holds its GPU slot for its whole duration.
        gpu_seconds: if m.node.is_some() {
            duration.as_secs_f64()
        } else {
            0.0
        },
        frames: 0,
        bytes: m.bytes,
    };
    let store = shared.store.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.append_usage(record) {
            warn!(error = %e, "usage record not written");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearpath_protocol::openai::Endpoint;

    fn key(tpm: u32) -> ApiKey {
        ApiKey {
            id: "key_1".into(),
            tenant: "t".into(),
            requests_per_minute: 600,
            tokens_per_minute: tpm,
            created_at_ms: 0,
            revoked: false,
            prefix: "npk_".into(),
            caps: Default::default(),
        }
    }

    #[test]
    fn a_revoked_key_is_not_accepted_from_the_cache() {
        let cache = KeyCache::default();
        let held = cache.revocation("key_a");
        assert!(cache.put("hash-a".into(), &named("key_a")));
        assert!(cache.put("hash-b".into(), &named("key_b")));
        assert_eq!(cache.get("hash-a").map(|k| k.id), Some("key_a".into()));
        cache.revoke("key_a");
        // Cached entries go, sessions holding the key are told, and an authentication that
        // read the store before the revocation cannot put the key back.
        assert!(cache.get("hash-a").is_none());
        assert!(held.is_cancelled());
        assert!(!cache.put("hash-a".into(), &named("key_a")));
        assert!(cache.get("hash-a").is_none());
        // A session that looks the key up after the revocation ends at once too.
        assert!(cache.revocation("key_a").is_cancelled());
        // Other keys are untouched.
        assert_eq!(cache.get("hash-b").map(|k| k.id), Some("key_b".into()));
        assert!(!cache.revocation("key_b").is_cancelled());
    }

    fn named(id: &str) -> ApiKey {
        let mut k = key(1);
        k.id = id.into();
        k
    }

    #[test]
    fn one_huge_charge_locks_a_key_out_for_at_most_two_minutes() {
        let limiter = RateLimiter::default();
        let k = key(6_000);
        let t0 = Instant::now();
        assert!(limiter.admit(&k, t0).is_ok());
        limiter.charge_tokens(&k, 2 * u64::from(u32::MAX));
        let wait = limiter.admit(&k, t0).expect_err("in debt");
        assert!(wait <= 120, "{wait} s");
        assert!(limiter.admit(&k, t0 + Duration::from_secs(wait)).is_ok());
    }

    #[test]
    fn concurrency_caps_are_per_key_and_given_back_on_drop() {
        let limiter = RateLimiter::default();
        let (a, mut b) = (key(1), key(1));
        b.id = "key_2".into();
        let g1 = limiter.acquire(&a, CapKind::Stream, 2).expect("first");
        let _g2 = limiter.acquire(&a, CapKind::Stream, 2).expect("second");
        let r = limiter
            .acquire(&a, CapKind::Stream, 2)
            .err()
            .expect("third refused");
        assert_eq!((r.code, r.cap), ("concurrency_limit_exceeded", "streams"));
        // Sessions are counted apart from streams, and other keys apart from this one.
        assert!(limiter.acquire(&a, CapKind::Session, 1).is_ok());
        assert!(limiter.acquire(&b, CapKind::Stream, 2).is_ok());
        drop(g1);
        assert!(limiter.acquire(&a, CapKind::Stream, 2).is_ok());
    }

    #[test]
    fn session_starts_refill_over_the_minute() {
        let limiter = RateLimiter::default();
        let k = key(1);
        let t0 = Instant::now();
        assert!(limiter.admit_session_start(&k, 2, t0).is_ok());
        assert!(limiter.admit_session_start(&k, 2, t0).is_ok());
        let r = limiter.admit_session_start(&k, 2, t0).expect_err("third");
        assert_eq!(r.code, "rate_limit_exceeded");
        assert_eq!(r.retry_after_s, 30);
        assert!(limiter
            .admit_session_start(&k, 2, t0 + Duration::from_secs(30))
            .is_ok());
    }

    #[test]
    fn the_prompt_estimate_is_a_quarter_of_the_input_bytes_rounded_up() {
        let r = InferenceRequest::parse(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"system","content":"abcde"},{"role":"user","content":"Say something"}]}"#,
        )
        .expect("valid");
        // 5 + 13 bytes.
        assert_eq!(prompt_token_estimate(&r), 5);
        let r = InferenceRequest::parse(Endpoint::Completion, br#"{"model":"m","prompt":"abcd"}"#)
            .expect("valid");
        assert_eq!(prompt_token_estimate(&r), 1);
    }
}
