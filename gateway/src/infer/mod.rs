//! Inference shared by the HTTP (OpenAI) and QUIC (`nearpath/1`) front ends: admission (ledger
//! gate, rate limit, per-key stream cap), routing with the geofence, failover before the first
//! token ([`attempts`], a sans-IO state machine this module drives), the token stream from the
//! node, cancellation, and metering. Both front ends drive the one pump ([`InferService::pump`])
//! and only render what it hands them.

pub mod attempts;
pub mod redirect;

use crate::access::AccessLine;
use crate::auth::CapGuard;
use crate::clock::SharedClock;
use crate::components::{Auth, Directory, Meter, Placement, Sessions};
use crate::error::{Blame, CoreError};
use crate::meter::Metering;
use crate::metrics::{labels, Metrics};
use crate::registry::{ModelAvailability, NodeEntry, SlotGuard, SlotKind};
use crate::router::{Deny, LatLon, NoRoute, Workload};
use crate::session_id::SessionId;
use crate::slot_queue::QueueEntry;
use crate::store::ApiKey;
use attempts::{Action, Candidate, InferAttempts, NodeEvent, Route, Rules};
use nearpath_config::{InferenceConfig, WorkloadKind};
use nearpath_geo::Location;
use nearpath_protocol::app_code::STREAM_CANCELLED;
use nearpath_protocol::message::{Message, Open, RefuseCode, SessionKind};
use nearpath_protocol::openai::{
    rewrite_chunk, ApiError, ChunkInfo, Endpoint, InferenceRequest, Input, RewriteContext, Usage,
    MODEL_UNAVAILABLE,
};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::{ModelCaps, MAX_REQUEST_FRAME};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, info, warn};

/// The error of an inference ticket this gateway does not honour (forged, expired, used
/// already, for another client, key, model, endpoint or gateway): 403 `bad_ticket`, in the
/// error body every refusal has, never retried with the same ticket.
pub fn bad_ticket(message: impl Into<String>) -> CoreError {
    CoreError::new(crate::error::Kind::Forbidden, BAD_TICKET, message).with_retryable(false)
}

/// The code of [`bad_ticket`] errors (the same as a refused game ticket's).
pub const BAD_TICKET: &str = "bad_ticket";

/// The code of the error for a valid ticket whose node is not attached here (503, retryable:
/// the client asks the first gateway again).
pub const TICKET_NODE_UNAVAILABLE: &str = "ticket_node_unavailable";

/// The rule of the routing denial of a node whose model lacks a capability the request needs
/// (never shown to clients: such a route is reported as saturated).
const CAPS_RULE: &str = "capabilities";

/// The prompt tokens a request is billed: one token per 4 bytes of its input text (message
/// contents, or the prompt), rounded up. Four bytes per token is the usual average of BPE
/// tokenisers on English text; the gateway cannot run the node's tokeniser, and must not take
/// the node's word for it. Bounded by the request body limit. Token-id inputs (embeddings) count
/// one token per id.
pub fn prompt_token_estimate(request: &InferenceRequest) -> u32 {
    let bytes: usize = request.input_texts().map(str::len).sum();
    let tokens = bytes.div_ceil(4).saturating_add(request.input_token_ids());
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// How many choices a request asks for (`n`, 1 when absent), or, for embeddings, how many inputs
/// it has: a node's piece with a choice (or input) index at or beyond it is refused.
pub fn choices_of(request: &InferenceRequest) -> u32 {
    match &request.input {
        Input::Embed(inputs) => u32::try_from(inputs.len()).unwrap_or(u32::MAX),
        _ => request
            .raw
            .get("n")
            .and_then(serde_json::Value::as_u64)
            .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX).max(1)),
    }
}

/// The response id the client sees (`chatcmpl-…`, `cmpl-…`, `resp_…`): the endpoint's prefix and
/// the tail of the request id, so that one can be found from the other.
pub fn completion_id(endpoint: Endpoint, request_id: &str) -> String {
    let mut tail_at = request_id.len().saturating_sub(24);
    while !request_id.is_char_boundary(tail_at) {
        tail_at += 1;
    }
    let (prefix, tail) = (endpoint.id_prefix(), &request_id[tail_at..]);
    let mut id = String::with_capacity(prefix.len() + tail.len());
    id.push_str(prefix);
    id.push_str(tail);
    id
}

/// A fresh request id (`req_` and 24 hex digits).
pub use crate::access::new_request_id;

pub fn client_latlon(loc: &Location) -> Option<LatLon> {
    loc.coords.and_then(|c| LatLon::new(c.lat, c.lon).ok())
}

/// What a tenant is billed: the estimated prompt, and the non-empty pieces the gateway relayed,
/// at most the request's `max_tokens` for each of its `n` choices (a node cannot bill more by
/// saying so).
pub fn billed_usage(prompt_tokens: u32, pieces: u32, max_tokens: Option<u32>, n: u32) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens: pieces.min(max_tokens.map_or(u32::MAX, |m| m.saturating_mul(n.max(1)))),
    }
}

/// Inference for the front ends: built at assembly from the components it uses.
pub struct InferService {
    pub auth: Arc<Auth>,
    pub directory: Arc<Directory>,
    pub placement: Arc<Placement>,
    /// For session ids only.
    pub sessions: Arc<Sessions>,
    pub meter: Arc<Meter>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    pub config: InferenceConfig,
    /// The federation's trunk, when requests may run on nodes other gateways hold: their
    /// nodes are ranked with ours. With `redirect` set it is only read (the ranking, the
    /// holder of a node), never used to relay a request.
    pub trunk: Option<Arc<crate::trunk::Trunk>>,
    /// Set with `federation.inference_route = "redirect"`: a request whose best node a peer
    /// holds is redirected there with a ticket ([`InferService::redirect_for`]). Set in any
    /// federation, for accepting tickets peers mint.
    pub redirect: Option<Arc<redirect::InferFederation>>,
    /// Whether this gateway redirects (`inference_route = "redirect"`), rather than only
    /// accepting redirected requests.
    pub redirects: bool,
}

/// Which nodes a route may pick.
#[derive(Debug, Clone, Copy)]
struct Scope<'a> {
    /// Peers' nodes too (through the trunk's view of the node directory).
    remote: bool,
    /// Only this node, without the geofence: a ticket's node (the issuer applied it).
    pin: Option<&'a str>,
    /// Count the geofence decision (a redirect's look-ahead does not; the dispatch that
    /// follows it does).
    count: bool,
}

/// An admitted request: who it is for, and the key's stream cap it holds until it ends.
pub struct Ticket {
    pub key: ApiKey,
    pub request_id: String,
    pub model: String,
    /// `http` or `quic` (metric label).
    pub entry: &'static str,
    pub started: Instant,
    /// The W3C `traceparent` passed to the node and its upstream (the gateway's span in the
    /// client's trace, or a new trace); set by the front end.
    pub traceparent: Option<String>,
    /// The endpoint, for the access log; set by the front end.
    pub endpoint: Endpoint,
    /// The client's country as GeoIP placed it, for the access log; set by the front end.
    pub country: Option<nearpath_geo::Country>,
    _cap: CapGuard,
}

/// What the pump hands a front end to render.
#[derive(Debug)]
pub enum Output<'a> {
    /// The request runs on a node; nothing of the completion yet.
    Started,
    Token(&'a str),
    /// One JSON piece, already rewritten ([`rewrite_chunk`]): relayed as is.
    Chunk {
        json: &'a str,
        info: &'a ChunkInfo,
    },
    /// The end. `usage` is what the tenant is billed.
    Done {
        finish_reason: &'a str,
        usage: Usage,
    },
    /// The node failed (or the key was revoked) after the request started: reported in band.
    Failed(&'a CoreError),
}

/// The client went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// A front end's side of the pump: it renders outputs for its client and says when the client
/// has gone away.
pub trait Relay: Send {
    /// Renders and sends one output; the bytes sent, or [`Gone`].
    fn send(&mut self, out: Output<'_>) -> impl Future<Output = Result<u64, Gone>> + Send;
    /// Completes when the client has gone away (never, for a client that cannot be watched).
    /// It is raced against the node's next event, so it must keep its progress in `self`.
    fn gone(&mut self) -> impl Future<Output = ()> + Send;
    /// The status the client got, for the access log (a stream's headers said 200).
    fn status(&self) -> u16 {
        200
    }
}

impl InferService {
    /// Admits a request of `key` arriving on `entry`: the ledger must be able to commit, the
    /// model must be on the key's allow-list (403), the key must be within its budgets (429
    /// `budget_exceeded`), its rate buckets must have room, and it must have a stream left
    /// under its cap.
    pub async fn admit(
        &self,
        key: ApiKey,
        entry: &'static str,
        request_id: &str,
        model: &str,
        started: Instant,
    ) -> Result<Ticket, CoreError> {
        self.auth.ledger_gate(entry)?;
        // The key's own rules come before its rate buckets, so that a refused request does
        // not use up the minute's allowance.
        if let Err(e) = self
            .auth
            .check_model(&key, model)
            .and_then(|()| self.auth.check_budget(&key))
        {
            self.count_request(entry, e.kind.as_str());
            return Err(e);
        }
        if let Err(wait_s) = self.auth.admit_request(&key).await {
            self.count_request(entry, crate::error::Kind::RateLimited.as_str());
            return Err(CoreError::from_api(&ApiError::rate_limited(format!(
                "rate limit reached for key {} ({} requests/min, {} tokens/min)",
                key.prefix, key.requests_per_minute, key.tokens_per_minute
            )))
            .with_retry_after_s(u32::try_from(wait_s).unwrap_or(u32::MAX)));
        }
        let cap = self
            .auth
            .acquire_stream(&key, entry)
            .await
            .map_err(|r| r.core_error())?;
        Ok(Ticket {
            key,
            request_id: request_id.to_string(),
            model: model.to_string(),
            entry,
            started,
            traceparent: None,
            endpoint: Endpoint::Chat,
            country: None,
            _cap: cap,
        })
    }

    /// With `inference_route = "redirect"`: when the best eligible node for `request` (the
    /// first candidate of this gateway's nodes and live peers' nodes ranked together, the
    /// geofence applied here with the client's location) is a peer's, the redirect there with
    /// a fresh ticket. The key's own rules (model allow-list, budgets) are checked first, as
    /// admission would; its rate buckets and stream cap are left to the peer, which admits the
    /// request as its own, so that the request counts once fleet-wide. `None`: serve it here
    /// (a local node is best, or nothing routes, and dispatch reports why).
    pub async fn redirect_for(
        &self,
        key: &ApiKey,
        entry: &'static str,
        request: &InferenceRequest,
        client: &Location,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Option<redirect::InferRedirect>, CoreError> {
        // A client whose address is unknown cannot be bound to a ticket: served here.
        let (Some(fed), Some(trunk), Some(client_ip)) =
            (self.redirect.as_ref(), self.trunk.as_ref(), client_ip)
        else {
            return Ok(None);
        };
        if !self.redirects {
            return Ok(None);
        }
        if let Err(e) = self
            .auth
            .check_model(key, &request.model)
            .and_then(|()| self.auth.check_budget(key))
        {
            self.count_request(entry, e.kind.as_str());
            return Err(e);
        }
        let mut nodes = Vec::new();
        let mut counted = false;
        let scope = Scope {
            remote: true,
            pin: None,
            count: false,
        };
        let route = self.route(
            &request.model,
            request.required_caps_set(),
            client,
            &mut nodes,
            &mut counted,
            scope,
        );
        let candidates = match route {
            Route::Candidates(c) => c,
            // The geofence denies every node, ours and peers': refused here, once, as dispatch
            // would (which sees only ours, and would call the model unserved).
            Route::Denied { rule, reason } => {
                self.count_geofence("deny", &rule);
                let e = CoreError::geofence_denied(&rule, &reason);
                self.count_request(entry, e.kind.as_str());
                return Err(e);
            }
            // Nothing free or nothing serving: dispatch here reports it (or queues for ours).
            _ => return Ok(None),
        };
        let Some(best) = candidates
            .first()
            .and_then(|c| nodes.iter().find(|n| n.key == c.key))
        else {
            return Ok(None);
        };
        if !best.conn.is_remote() {
            return Ok(None);
        }
        let Some((gateway, node_id)) = trunk.holder(best.key) else {
            return Ok(None);
        };
        let minted = fed
            .mint(
                gateway,
                &node_id,
                &key.id,
                client_ip,
                &request.model,
                request.endpoint.path(),
                self.clock.unix_ms(),
            )
            .await;
        if minted.is_some() {
            self.count_geofence("allow", "-");
            self.count_request(entry, "redirected");
        }
        Ok(minted)
    }

    /// Opens a redirect ticket presented here and finds the key it was issued to. With a key
    /// secret too (`Authorization`, or the native request's `api_key`), that key must be the
    /// ticket's: a ticket never lends one key's request to another key. Without one, the
    /// ticket's MAC vouches for its key id (HTTP clients drop `Authorization` on a
    /// cross-origin redirect).
    pub async fn open_ticket(
        &self,
        ticket: &str,
        secret: Option<&str>,
    ) -> Result<(ApiKey, crate::ticket::InferClaims), CoreError> {
        let Some(fed) = &self.redirect else {
            return Err(bad_ticket("this gateway is not in a federation"));
        };
        let claims = fed.open(ticket).await.map_err(|e| {
            info!(error = %e, "inference ticket refused");
            bad_ticket(e.to_string())
        })?;
        let key = match secret {
            Some(_) => {
                let key = self.auth.authenticate(secret).await?;
                if key.id != claims.key_id {
                    return Err(bad_ticket("the ticket was issued to another API key"));
                }
                key
            }
            None => self.auth.key_by_id(&claims.key_id).await?,
        };
        Ok((key, claims))
    }

    /// Checks an opened ticket against this request (this gateway, the client's address, the
    /// key, the model and endpoint) and uses it up; the node it names must be attached here.
    pub fn accept_ticket(
        &self,
        claims: &crate::ticket::InferClaims,
        client_ip: Option<std::net::IpAddr>,
        key: &ApiKey,
        model: &str,
        endpoint: Endpoint,
    ) -> Result<(), CoreError> {
        let Some(fed) = &self.redirect else {
            return Err(bad_ticket("this gateway is not in a federation"));
        };
        let client_ip = client_ip.ok_or_else(|| bad_ticket("the client's address is unknown"))?;
        fed.accept(
            claims,
            client_ip,
            &key.id,
            model,
            endpoint.path(),
            self.clock.unix_ms(),
        )
        .map_err(|e| {
            info!(error = %e, "inference ticket refused");
            bad_ticket(e.to_string())
        })?;
        if self.directory.registry.get(&claims.node_id).is_none() {
            return Err(CoreError::new(
                crate::error::Kind::Unavailable,
                TICKET_NODE_UNAVAILABLE,
                "the node the ticket names is not attached to this gateway",
            ));
        }
        Ok(())
    }

    fn count_request(&self, api: &'static str, outcome: &'static str) {
        let m = &self.metrics;
        m.hot
            .inference_requests
            .get(&m.inference_requests, [("api", api), ("outcome", outcome)])
            .inc();
    }

    /// Routes and starts an admitted request (see [`InferService::dispatch`]); a failure is
    /// metered here, and the front end answers it as a plain error. `pin` is the node a
    /// redirect ticket names: the request runs there or nowhere (no geofence, no fallback
    /// model: the issuing gateway decided).
    pub async fn start(
        &self,
        ticket: &Ticket,
        request: &InferenceRequest,
        request_json: &str,
        client: &Location,
        pin: Option<&str>,
    ) -> Result<InferStream, CoreError> {
        let started = match pin {
            None => {
                self.dispatch(
                    &ticket.key,
                    request,
                    request_json,
                    client,
                    &ticket.request_id,
                    ticket.traceparent.as_deref(),
                )
                .await
            }
            Some(node) => self
                .dispatch_model(
                    &ticket.key.id,
                    request,
                    request_json,
                    client,
                    &ticket.request_id,
                    ticket.traceparent.as_deref(),
                    Some(node),
                )
                .await
                .map_err(|(e, _)| e),
        };
        match started {
            Ok(mut s) => {
                // Revoking the key ends the stream in band (`key_revoked`) and resets the
                // node's stream.
                s.end_on_revocation(self.auth.keys.revocation(&ticket.key.id));
                Ok(s)
            }
            Err(e) => {
                self.meter.record_inference(
                    &self.directory.registry,
                    Metering {
                        key: &ticket.key,
                        request_id: &ticket.request_id,
                        model: &ticket.model,
                        api: ticket.entry,
                        node: None,
                        outcome: e.kind.as_str(),
                        usage: Usage::default(),
                        reported: None,
                        ttft: None,
                        started: ticket.started,
                        bytes: 0,
                    },
                );
                self.access_log(ticket, e.to_api().status, e.kind.as_str(), None, None, None);
                Err(e)
            }
        }
    }

    /// The one pump: relays the stream's events to `relay` until the stream ends or the client
    /// goes away (then the node's stream is reset, which aborts the backend request), and meters
    /// the request from what was relayed. Returns the outcome (`ok`, `cancelled`, or the error
    /// kind).
    pub async fn pump<R: Relay>(
        &self,
        ticket: Ticket,
        mut stream: InferStream,
        relay: &mut R,
    ) -> &'static str {
        let mut bytes = 0u64;
        let mut last_token: Option<Instant> = None;
        let mut stream_failure_blames_node = false;
        let outcome: &'static str = 'pump: {
            match relay.send(Output::Started).await {
                Ok(n) => bytes += n,
                Err(Gone) => break 'pump "cancelled",
            }
            loop {
                let ev = tokio::select! {
                    ev = stream.next() => ev,
                    _ = relay.gone() => break 'pump "cancelled",
                };
                match ev {
                    StreamEvent::Chunk { json, info } => {
                        match relay
                            .send(Output::Chunk {
                                json: &json,
                                info: &info,
                            })
                            .await
                        {
                            Ok(n) => bytes += n,
                            Err(Gone) => break 'pump "cancelled",
                        }
                    }
                    StreamEvent::Token(t) => {
                        let now = self.clock.now();
                        if let Some(last) = last_token {
                            self.metrics
                                .inter_token_seconds
                                .observe(now.saturating_duration_since(last).as_secs_f64());
                        }
                        last_token = Some(now);
                        match relay.send(Output::Token(&t)).await {
                            Ok(n) => bytes += n,
                            Err(Gone) => break 'pump "cancelled",
                        }
                    }
                    StreamEvent::Done {
                        finish_reason,
                        usage,
                    } => {
                        match relay
                            .send(Output::Done {
                                finish_reason: &finish_reason,
                                usage,
                            })
                            .await
                        {
                            Ok(n) => bytes += n,
                            Err(Gone) => break 'pump "cancelled",
                        }
                        break 'pump "ok";
                    }
                    StreamEvent::Failed(e) => {
                        stream_failure_blames_node = e.blame == Blame::Node;
                        if let Ok(n) = relay.send(Output::Failed(&e)).await {
                            bytes += n;
                        }
                        break 'pump e.kind.as_str();
                    }
                }
            }
        };
        if outcome == "cancelled" {
            stream.cancel();
            info!("client went away; generation cancelled on the node");
        }
        // Billed from what was relayed, also when the stream ended early.
        let usage = stream.billed();
        self.auth.charge_tokens(&ticket.key, usage.total_tokens());
        let reported = stream.reported();
        let ttft = stream.ttft;
        let node = stream.node.clone();
        // Metered as the model that served it (a fallback's, if one did).
        let served_model = stream.model.clone();
        let choices = stream.n;
        drop(stream);
        // One choice of a chat or text completion: several choices decode as a batch, and other
        // endpoints' pieces are not tokens.
        if outcome == "ok"
            && choices == 1
            && matches!(ticket.endpoint, Endpoint::Chat | Endpoint::Completion)
        {
            self.decode_sample(
                &node,
                &served_model,
                ticket.started,
                ttft,
                usage.completion_tokens,
            );
        }
        // How the node did, for outlier detection: only a failure it is to blame for counts.
        match outcome {
            "ok" => self.record_node_result(&node, true),
            "cancelled" => {}
            _ if stream_failure_blames_node => self.record_node_result(&node, false),
            _ => {}
        }
        self.meter.record_inference(
            &self.directory.registry,
            Metering {
                key: &ticket.key,
                request_id: &ticket.request_id,
                model: &served_model,
                api: ticket.entry,
                node: Some(&node),
                outcome,
                usage,
                reported,
                ttft: Some(ttft),
                started: ticket.started,
                bytes,
            },
        );
        self.access_log(
            &ticket,
            relay.status(),
            outcome,
            Some(&node.id),
            Some(ttft),
            Some(usage),
        );
        outcome
    }

    /// Tells the checker how fast a finished single-choice request decoded on a local node:
    /// the tokens after the first over the time from the first token to the end. Slow
    /// clients only make it slower, so it never overstates what the node can do.
    fn decode_sample(
        &self,
        node: &Arc<NodeEntry>,
        model: &str,
        started: std::time::Instant,
        ttft: Duration,
        completion_tokens: u32,
    ) {
        if node.conn.is_remote() || completion_tokens < 8 {
            return;
        }
        let decode = self
            .clock
            .now()
            .saturating_duration_since(started)
            .saturating_sub(ttft)
            .as_secs_f64();
        if decode <= 0.0 {
            return;
        }
        self.directory
            .registry
            .check_event(crate::registry::CheckEvent::Decode {
                node: node.clone(),
                model: model.to_string(),
                tokens_per_s: f64::from(completion_tokens - 1) / decode,
                ttft_ms: ttft.as_secs_f64() * 1000.0,
            });
    }

    /// The access-log line of an admitted request.
    fn access_log(
        &self,
        ticket: &Ticket,
        status: u16,
        outcome: &str,
        node: Option<&str>,
        ttft: Option<Duration>,
        usage: Option<Usage>,
    ) {
        if !crate::access::enabled() {
            return;
        }
        let trace_id = ticket
            .traceparent
            .as_deref()
            .and_then(crate::access::TraceParent::parse)
            .map(|t| t.trace_id_hex());
        AccessLine {
            entry: ticket.entry,
            method: if ticket.entry == "http" {
                "POST"
            } else {
                "INFER"
            },
            path: ticket.endpoint.path(),
            status,
            request_id: &ticket.request_id,
            trace_id: trace_id.as_deref(),
            key_id: Some(&ticket.key.id),
            model: Some(&ticket.model),
            node,
            ttft_ms: ttft.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            prompt_tokens: usage.map(|u| u.prompt_tokens),
            completion_tokens: usage.map(|u| u.completion_tokens),
            country: ticket.country.as_ref().map(|c| c.as_str()),
            duration_ms: u64::try_from(
                self.clock
                    .now()
                    .saturating_duration_since(ticket.started)
                    .as_millis(),
            )
            .unwrap_or(u64::MAX),
            outcome,
        }
        .emit();
    }

    /// Routes and starts a request of API key `key`, failing over between candidates until one
    /// produces its first event, waiting in the model's queue while every node is at capacity
    /// ([`InferService::dispatch_model`]); then, if the model has no capacity or every attempt
    /// failed before the first token, the same for each of its fallback models
    /// (`inference.fallbacks`) the key may use. A fallback that does not serve either is
    /// answered with the original model's error.
    pub async fn dispatch(
        &self,
        key: &ApiKey,
        request: &InferenceRequest,
        request_json: &str,
        client: &Location,
        request_id: &str,
        traceparent: Option<&str>,
    ) -> Result<InferStream, CoreError> {
        let (error, may_fall_back) = match self
            .dispatch_model(
                &key.id,
                request,
                request_json,
                client,
                request_id,
                traceparent,
                None,
            )
            .await
        {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        let fallbacks = match self.config.fallbacks.get(&request.model) {
            Some(f) if may_fall_back => f,
            _ => return Err(error),
        };
        for to in fallbacks {
            // The key must be allowed to use the fallback like any model it names.
            if !crate::auth::Auth::model_allowed(key, to) {
                debug!(from = %request.model, %to, "fallback model not allowed for the key");
                continue;
            }
            let Some((request_b, json_b)) = with_model(request, request_json, to) else {
                continue;
            };
            match self
                .dispatch_model(
                    &key.id,
                    &request_b,
                    &json_b,
                    client,
                    request_id,
                    traceparent,
                    None,
                )
                .await
            {
                Ok(mut s) => {
                    info!(from = %request.model, %to, "served by a fallback model");
                    self.metrics
                        .inference_fallbacks
                        .get_or_create(&labels([("from", &request.model), ("to", to)]))
                        .inc();
                    s.fallback_from = Some(request.model.clone());
                    return Ok(s);
                }
                Err((e, _)) => {
                    debug!(from = %request.model, %to, error = %e.message, "fallback model could not serve either")
                }
            }
        }
        Err(error)
    }

    /// [`InferService::dispatch`] for one model, without fallbacks. The decisions are
    /// [`InferAttempts`]'; this drives it: it routes, opens streams, reads the nodes' answers,
    /// waits for registrations, for slots in the model's queue, and for deadlines. An error
    /// comes with whether a fallback model may be tried (not for a client fault, nor after the
    /// request already waited out the queue).
    ///
    /// An answer comes within `unavailable_wait_ms + max_attempts × connect_timeout_ms` (plus
    /// up to `queue_max_wait_ms` queued) unless a node accepted the request (then the
    /// first-token timeout applies). `pin`: see [`InferService::start`].
    #[allow(clippy::too_many_arguments)]
    pub async fn dispatch_model(
        &self,
        key_id: &str,
        request: &InferenceRequest,
        request_json: &str,
        client: &Location,
        request_id: &str,
        traceparent: Option<&str>,
        pin: Option<&str>,
    ) -> Result<InferStream, (CoreError, bool)> {
        // Peers' nodes are candidates only when requests are relayed to them over the trunk;
        // a redirecting gateway decided in `redirect_for` already, and a ticket names a node
        // of this gateway.
        let scope = Scope {
            remote: !self.redirects && pin.is_none(),
            pin,
            count: pin.is_none(),
        };
        let started = self.clock.now();
        let model = request.model.as_str();
        let kind = SessionKind::Inference {
            model: model.to_string(),
            endpoint: request.endpoint,
            request_json: request_json.to_string(),
            request_id: request_id.to_string(),
            traceparent: traceparent.map(str::to_string),
        };
        // A request needing a capability (tools, logprobs, n > 1, ...) that no node serving the
        // model declares is refused before any node is tried; routing then skips the nodes that
        // lack it. Plain requests need none and skip both.
        let needs = request.required_caps_set();
        if !needs.is_empty() {
            // What this gateway's nodes and, through the trunk, live peers' nodes declare.
            let local = self.directory.registry.model_caps(model);
            let remote = self.trunk.as_ref().and_then(|t| t.remote_model_caps(model));
            let have = match (local, remote) {
                (Some(a), Some(b)) => Some(a.with(b)),
                (a, b) => a.or(b),
            };
            if let Some(e) = have.and_then(|have| request.unsupported_by(have)) {
                // The client's request: no fallback model is tried for it.
                return Err((CoreError::from_api(&e), false));
            }
        }
        let mut machine = InferAttempts::new(Rules::from_config(&self.config), model, started);
        // Subscribed before the first route, so that a node registering in between wakes us.
        let mut joins = self.directory.registry.joins();
        let queue = self.directory.registry.slot_queue().clone();
        let mut nodes: Vec<Arc<NodeEntry>> = Vec::new();
        let mut trying: Option<Trying> = None;
        let mut geofence_counted = false;
        // The request's place in the model's queue, once it queued.
        let mut waiter: Option<QueueEntry> = None;
        // Read before each route: a slot freed after it is not missed by the queue.
        let mut epoch = queue.epoch();
        let mut last_route_denied = false;
        let mut queue_full = false;
        loop {
            match machine.poll() {
                Action::Route => {
                    joins.borrow_and_update();
                    epoch = queue.epoch();
                    let route = self.route(
                        model,
                        needs,
                        client,
                        &mut nodes,
                        &mut geofence_counted,
                        scope,
                    );
                    last_route_denied = matches!(route, Route::Denied { .. });
                    machine.handle_route(self.clock.now(), route);
                }
                Action::TryNode { node, failover } => {
                    let entry = nodes.iter().find(|n| n.key == node).cloned();
                    let slot = entry
                        .as_ref()
                        .and_then(|n| self.directory.registry.acquire(n, SlotKind::Inference));
                    let (Some(entry), Some(slot)) = (entry, slot) else {
                        machine.handle_node(self.clock.now(), node, NodeEvent::NoSlot);
                        continue;
                    };
                    if failover {
                        self.metrics.inference_failovers.inc();
                    }
                    trying = Some(Trying {
                        node: entry,
                        _slot: Some(slot),
                        session: self.sessions.ids.mint(),
                        io: None,
                        accepted: false,
                        first: None,
                    });
                }
                Action::WaitForNode(deadline) => {
                    let Some(t) = trying.as_mut() else {
                        // Cannot happen: the machine waits only for a node it asked to try.
                        machine.handle_timeout(deadline);
                        continue;
                    };
                    let key = t.node.key;
                    let mut busy = false;
                    let next = t.next_event(&kind);
                    match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), next)
                        .await
                    {
                        Ok(ev) => {
                            if let NodeEvent::Failed(e) | NodeEvent::Unreachable(e) = &ev {
                                warn!(node = %t.node.id, error = %e.message, "candidate failed before the first token");
                            }
                            busy = matches!(
                                ev,
                                NodeEvent::Refused {
                                    code: RefuseCode::Busy,
                                    ..
                                }
                            );
                            if counts_against_node(&ev) {
                                let node = t.node.clone();
                                self.record_node_result(&node, false);
                            }
                            machine.handle_node(self.clock.now(), key, ev)
                        }
                        Err(_) => {
                            // No `Accepted` or no first token in time: the node's failure.
                            let node = t.node.clone();
                            self.record_node_result(&node, false);
                            machine.handle_timeout(self.clock.now().max(deadline))
                        }
                    }
                    if machine.current() != Some(key) {
                        // Given up on: dropping it resets its stream. A node that refused as
                        // busy gets its slot back without waking a queued request for it.
                        if let Some(t) = trying.take() {
                            if busy {
                                t.release_quietly();
                            }
                        }
                    }
                }
                Action::WaitForJoin(until) => {
                    debug!(%model, "no node answers for a recently served model; waiting for one to register");
                    let woke = tokio::time::timeout_at(
                        tokio::time::Instant::from_std(until),
                        joins.changed(),
                    )
                    .await;
                    match woke {
                        Ok(Ok(())) => machine.handle_join(self.clock.now()),
                        // Timed out, or the registry is gone: the wait is over.
                        _ => machine.handle_timeout(self.clock.now().max(until)),
                    }
                }
                Action::WaitForSlot(until) => {
                    let w = match &waiter {
                        Some(w) => {
                            // Woken, but the slot went to another request (back to its place)
                            // or is on a node it may not use (the next waiter gets it).
                            if last_route_denied {
                                w.pass_on();
                            } else {
                                w.requeue(epoch);
                            }
                            w
                        }
                        None => match queue.enqueue(
                            model,
                            key_id,
                            self.config.queue_max_depth as usize,
                            epoch,
                        ) {
                            Ok(w) => {
                                debug!(%model, "every node is at capacity; queued");
                                waiter.insert(w)
                            }
                            Err(full) => {
                                queue_full = true;
                                machine.handle_queue_full(self.clock.now(), full.depth);
                                continue;
                            }
                        },
                    };
                    match tokio::time::timeout_at(tokio::time::Instant::from_std(until), w.woken())
                        .await
                    {
                        Ok(()) => machine.handle_slot(self.clock.now()),
                        Err(_) => machine.handle_timeout(self.clock.now().max(until)),
                    }
                }
                Action::Serve { node, attempts } => {
                    let Some(t) = trying.take().filter(|t| t.node.key == node) else {
                        return Err((
                            CoreError::internal("the served node's stream was lost"),
                            false,
                        ));
                    };
                    if attempts > 1 {
                        info!(node = %t.node.id, attempts, "request served after failover");
                    }
                    if machine.blip_seen() {
                        self.count_blip_wait("served");
                    }
                    self.observe_queue_wait(&machine);
                    if let Some(w) = waiter.take() {
                        w.served();
                    }
                    let mut s = t.into_stream(
                        attempts,
                        self.clock.now().saturating_duration_since(started),
                        request,
                        completion_id(request.endpoint, request_id),
                        self.clock.unix_ms() / 1000,
                        &self.config,
                    );
                    s.queue_wait = machine
                        .queued_since()
                        .map(|q| self.clock.now().saturating_duration_since(q));
                    return Ok(s);
                }
                Action::Fail(e) => {
                    if e.code == MODEL_UNAVAILABLE {
                        self.count_blip_wait("unavailable");
                    }
                    self.observe_queue_wait(&machine);
                    // A request that waited out the queue has waited enough; a client fault
                    // would fail the same way on another model (a model no node serves is
                    // not the client's fault here).
                    let waited_out = machine.queued_since().is_some()
                        && e.kind == crate::error::Kind::RateLimited
                        && !queue_full;
                    // Saturation (429 here is never the key's rate limit: that is admission's)
                    // and a model no node serves are not the client's fault.
                    let may_fall_back = !waited_out
                        && (e.blame != Blame::Client
                            || e.code == "model_not_found"
                            || e.kind == crate::error::Kind::RateLimited);
                    return Err((e, may_fall_back));
                }
            }
        }
    }

    /// Records a queued request's wait (seconds) when it leaves the queue.
    fn observe_queue_wait(&self, machine: &InferAttempts) {
        if let Some(since) = machine.queued_since() {
            self.metrics.inference_queue_wait_seconds.observe(
                self.clock
                    .now()
                    .saturating_duration_since(since)
                    .as_secs_f64(),
            );
        }
    }

    /// Feeds outlier detection; counts and logs an ejection.
    fn record_node_result(&self, node: &NodeEntry, ok: bool) {
        if let Some(until) = self.directory.registry.record_inference_result(node, ok) {
            self.metrics.inference_node_ejections.inc();
            warn!(
                node = %node.id,
                for_s = until.saturating_duration_since(self.clock.now()).as_secs(),
                "node ejected from inference routing: it keeps failing requests"
            );
            // When the ejection ends, requests queued for the node's models may use its free
            // slots (nothing else would wake them if every other node stays full).
            let registry = self.directory.registry.clone();
            let id = node.id.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
                if let Some(n) = registry.get(&id) {
                    registry.wake_queued(&n);
                }
            });
        }
    }

    /// Routes `model` for `client`, keeping the candidates' entries in `nodes`.
    /// Nodes whose declared capabilities for the model lack `needs` are skipped.
    fn route(
        &self,
        model: &str,
        needs: ModelCaps,
        client: &Location,
        nodes: &mut Vec<Arc<NodeEntry>>,
        geofence_counted: &mut bool,
        scope: Scope<'_>,
    ) -> Route {
        // The one check for local and remote nodes alike: the geofence is this gateway's, with
        // the client's address, whoever holds the node.
        let allow = |n: &NodeEntry| {
            if let Some(pin) = scope.pin {
                // The issuing gateway applied its geofence to this node for this client.
                return if n.id == pin {
                    Ok(())
                } else {
                    Err(Deny {
                        rule: "ticket".into(),
                        reason: "not the ticket's node".into(),
                    })
                };
            }
            if !needs.is_empty() && !n.model_caps(model).is_some_and(|c| c.contains(needs)) {
                return Err(Deny {
                    rule: CAPS_RULE.into(),
                    reason: "the node's model lacks a capability the request needs".into(),
                });
            }
            self.placement
                .serve_check(client, n, WorkloadKind::Inference)
        };
        let local =
            self.directory
                .registry
                .route(client_latlon(client), Workload::Model(model), &allow);
        let (outcome, mut found) = match self.trunk.as_ref().filter(|_| scope.remote) {
            Some(trunk) => crate::trunk::merge_routes(
                local,
                trunk.route(client_latlon(client), Workload::Model(model), &allow),
                self.directory.registry.max_candidates(),
            ),
            None => local,
        };
        let route = match outcome.failure() {
            // The nodes that could serve the request are busy, draining or gone (the check in
            // `dispatch` found one that declares what it needs): retry later.
            Some(NoRoute::Denied(d)) if d.rule == CAPS_RULE => Route::Saturated,
            Some(NoRoute::NotServed) => Route::NotServed {
                recently_served: self
                    .directory
                    .registry
                    .model_availability(model, self.clock.unix_ms())
                    != ModelAvailability::Unknown,
            },
            Some(NoRoute::Denied(d)) => {
                if scope.count {
                    self.count_geofence("deny", &d.rule);
                }
                Route::Denied {
                    rule: d.rule.clone(),
                    reason: d.reason.clone(),
                }
            }
            Some(NoRoute::Saturated) => Route::Saturated,
            Some(NoRoute::Draining) => Route::Draining,
            None => {
                if !*geofence_counted && scope.count {
                    *geofence_counted = true;
                    self.count_geofence("allow", "-");
                }
                // Ejected nodes are skipped. If only ejected nodes have room, the request waits
                // for a healthy node that is merely full; with no healthy node serving the
                // model at all, the ejected ones are used: better a flaky node than none.
                let registry = &self.directory.registry;
                if found.iter().any(|n| !registry.is_ejected(&n.id)) {
                    found.retain(|n| !registry.is_ejected(&n.id));
                } else if registry.serves_unejected(model) {
                    found.clear();
                    *nodes = found;
                    return Route::Saturated;
                }
                Route::Candidates(
                    found
                        .iter()
                        .map(|n| Candidate {
                            key: n.key,
                            name: n.id.clone(),
                        })
                        .collect(),
                )
            }
        };
        *nodes = found;
        route
    }

    fn count_geofence(&self, outcome: &'static str, rule: &str) {
        let m = &self.metrics;
        m.hot
            .geofence_decisions
            .get(
                &m.geofence_decisions,
                [("side", "client"), ("outcome", outcome), ("rule", rule)],
            )
            .inc();
    }

    /// Counts a request that found no node for a recently served model, by how it ended.
    fn count_blip_wait(&self, outcome: &'static str) {
        self.metrics
            .inference_blip_waits
            .get_or_create(&labels([("outcome", outcome)]))
            .inc();
    }
}

/// The I/O of the node being tried: its slot, session id and stream. Dropped when the machine
/// gives up on the node, which resets the stream (the node aborts the work).
struct Trying {
    node: Arc<NodeEntry>,
    /// Always `Some` until [`Trying::release_quietly`] takes it.
    _slot: Option<SlotGuard>,
    session: SessionId,
    io: Option<(quinn::SendStream, FramedRecv)>,
    accepted: bool,
    /// The first token or `Done`, kept for the stream.
    first: Option<StreamEvent>,
}

impl Trying {
    /// Gives the node up (its stream is reset) and its slot back without waking a queued
    /// request ([`SlotGuard::release_quietly`]).
    fn release_quietly(mut self) {
        if let Some((mut tx, mut framed)) = self.io.take() {
            let _ = tx.reset(STREAM_CANCELLED);
            let _ = framed.get_mut().stop(STREAM_CANCELLED);
        }
        // Moved out, not dropped with `self` (which would wake a waiter).
        let slot = self._slot.take();
        if let Some(slot) = slot {
            slot.release_quietly();
        }
    }

    /// Opens the stream and sends `Open` if not done yet, then reads the node's next message as
    /// an event for the machine. The machine bounds it with its deadline (the future is dropped
    /// when it passes, and the node is given up on).
    async fn next_event(&mut self, kind: &SessionKind) -> NodeEvent {
        let id = &self.node.id;
        if self.io.is_none() {
            let (mut tx, rx) = match self.node.conn.open_bi().await {
                Ok(s) => s,
                Err(e) => {
                    return NodeEvent::Unreachable(CoreError::node_failed(
                        id,
                        format!("node {id}: {e}"),
                    ))
                }
            };
            let open = Message::Open(Open {
                session_id: self.session.get(),
                kind: kind.clone(),
            });
            if let Err(e) = send(&mut tx, &open).await {
                let _ = tx.reset(STREAM_CANCELLED);
                return NodeEvent::Unreachable(CoreError::node_failed(
                    id,
                    format!("node {id}: {e}"),
                ));
            }
            // `Chunk`s (an embedding, a long tool call) may exceed a control frame.
            self.io = Some((tx, FramedRecv::new(rx, MAX_REQUEST_FRAME)));
        }
        let Some((_, framed)) = self.io.as_mut() else {
            return NodeEvent::Unreachable(CoreError::internal("no stream"));
        };
        let read = framed.next().await;
        if !self.accepted {
            return match read {
                Ok(Some(Message::Accepted(_))) => {
                    self.accepted = true;
                    NodeEvent::Accepted
                }
                Ok(Some(Message::Refused(r))) => NodeEvent::Refused {
                    code: r.code,
                    reason: r.reason,
                },
                Ok(Some(other)) => NodeEvent::Failed(CoreError::node_failed(
                    id,
                    format!("node {id} sent {} before Accepted", other.name()),
                )),
                Ok(None) | Err(_) => NodeEvent::Unreachable(CoreError::node_failed(
                    id,
                    format!("node {id} failed before answering"),
                )),
            };
        }
        match to_event(read) {
            StreamEvent::Failed(e) if self.node.conn.close_reason().is_some() => {
                NodeEvent::Unreachable(e)
            }
            StreamEvent::Failed(e) => NodeEvent::Failed(e),
            first => {
                self.first = Some(first);
                NodeEvent::FirstToken
            }
        }
    }

    fn into_stream(
        mut self,
        attempts: u32,
        ttft: Duration,
        request: &InferenceRequest,
        completion_id: String,
        created: u64,
        cfg: &InferenceConfig,
    ) -> InferStream {
        let first = self.first.take();
        let n = choices_of(request);
        InferStream {
            endpoint: request.endpoint,
            completion_id,
            created,
            n,
            embeddings_seen: match request.endpoint {
                Endpoint::Embeddings => vec![false; n as usize],
                _ => Vec::new(),
            },
            node: self.node.clone(),
            model: request.model.clone(),
            fallback_from: None,
            queue_wait: None,
            session_id: self.session.get(),
            attempts,
            ttft,
            inner: self,
            first,
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
            finished: false,
            pieces: 0,
            max_tokens: request.max_tokens,
            prompt_tokens: prompt_token_estimate(request),
            reported: None,
            revoked: None,
            revoked_wait: None,
        }
    }
}

impl Drop for Trying {
    fn drop(&mut self) {
        if let Some((mut tx, mut framed)) = self.io.take() {
            let _ = tx.reset(STREAM_CANCELLED);
            let _ = framed.get_mut().stop(STREAM_CANCELLED);
        }
    }
}

/// One event of a running inference, as the front ends see it.
#[derive(Debug)]
pub enum StreamEvent {
    Token(String),
    /// One JSON piece: as the node sent it until [`InferStream::next`] rewrote it (then `info`
    /// says what it carried).
    Chunk {
        json: String,
        info: ChunkInfo,
    },
    Done {
        finish_reason: String,
        usage: Usage,
    },
    /// The node failed after streaming began; the front end reports it in band.
    Failed(CoreError),
}

/// A request admitted and running on a node, its first event already received.
pub struct InferStream {
    pub node: Arc<NodeEntry>,
    pub endpoint: Endpoint,
    /// The response id the client sees ([`completion_id`]).
    pub completion_id: String,
    /// The response's `created` (Unix seconds).
    pub created: u64,
    /// [`choices_of`] the request.
    pub n: u32,
    /// Embeddings: which inputs' embeddings came (each may come once).
    embeddings_seen: Vec<bool>,
    /// The model serving the request: the request's, or a fallback of it (pieces are rewritten
    /// to carry it).
    pub model: String,
    /// The request's own model, when a fallback serves it (`inference.fallbacks`).
    pub fallback_from: Option<String>,
    /// How long the request waited in its model's queue, if it queued.
    pub queue_wait: Option<Duration>,
    pub session_id: u64,
    pub attempts: u32,
    /// Request start to the first event, as the gateway saw it.
    pub ttft: Duration,
    /// The node's slot, the session id (held among the live ids until the request ends) and
    /// the stream.
    inner: Trying,
    first: Option<StreamEvent>,
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
    /// The wait for `revoked`, made once: a fresh `cancelled()` per event registered and
    /// removed a waiter on the token for every token relayed.
    revoked_wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl InferStream {
    /// Ends the stream with `key_revoked` (and resets the node's stream) as soon as `revoked`
    /// is cancelled.
    pub fn end_on_revocation(&mut self, revoked: CancellationToken) {
        self.revoked_wait = Some(Box::pin(revoked.clone().cancelled_owned()));
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
                let Some((_, framed)) = self.inner.io.as_mut() else {
                    return StreamEvent::Failed(CoreError::internal("the stream is over"));
                };
                let wait = &mut self.revoked_wait;
                let read = tokio::select! {
                    biased;
                    _ = async {
                        match wait {
                            Some(w) => w.as_mut().await,
                            None => std::future::pending().await,
                        }
                    } => None,
                    r = tokio::time::timeout(self.idle_timeout, framed.next()) => Some(r),
                };
                match read {
                    None => return self.end_revoked(),
                    Some(Ok(r)) => to_event(r),
                    Some(Err(_)) => StreamEvent::Failed(
                        CoreError::timeout(format!(
                            "node {} sent no token for {} ms",
                            self.node.id,
                            self.idle_timeout.as_millis()
                        ))
                        .with_peer(self.node.id.clone()),
                    ),
                }
            }
        };
        self.finished = !matches!(ev, StreamEvent::Token(_) | StreamEvent::Chunk { .. });
        match ev {
            // Embeddings and Responses events have no plain-text form.
            StreamEvent::Token(_)
                if matches!(self.endpoint, Endpoint::Embeddings | Endpoint::Responses) =>
            {
                self.malformed(format!(
                    "a Token on {}, which carries only Chunks",
                    self.endpoint.path()
                ))
            }
            StreamEvent::Token(t) => {
                if !t.is_empty() {
                    self.pieces = self.pieces.saturating_add(1);
                }
                StreamEvent::Token(t)
            }
            StreamEvent::Chunk { json, .. } => {
                let ctx = RewriteContext {
                    endpoint: self.endpoint,
                    id: &self.completion_id,
                    created: self.created,
                    model: &self.model,
                    n: self.n,
                    usage: self.billed(),
                };
                match rewrite_chunk(&json, &ctx) {
                    Ok((json, info)) => {
                        if let Some(i) = info.embedding_index {
                            match self.embeddings_seen.get_mut(i as usize) {
                                Some(seen @ false) => *seen = true,
                                _ => {
                                    return self
                                        .malformed(format!("a second embedding for input {i}"))
                                }
                            }
                        }
                        if info.generated > 0 {
                            self.pieces = self.pieces.saturating_add(1);
                        }
                        StreamEvent::Chunk { json, info }
                    }
                    Err(e) => self.malformed(e.to_string()),
                }
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

    /// What the tenant is billed so far ([`billed_usage`]). Embeddings bill the prompt only.
    pub fn billed(&self) -> Usage {
        let pieces = match self.endpoint {
            Endpoint::Embeddings => 0,
            _ => self.pieces,
        };
        billed_usage(self.prompt_tokens, pieces, self.max_tokens, self.n)
    }

    /// The node sent something that cannot be relayed: the stream ends with a 502 naming it
    /// (in band once streaming started), and the node's stream is reset.
    fn malformed(&mut self, detail: String) -> StreamEvent {
        self.finished = false;
        self.cancel();
        let id = &self.node.id;
        StreamEvent::Failed(
            CoreError::from_api(&ApiError::bad_gateway(format!(
                "node {id} sent a malformed answer: {detail}"
            )))
            .with_peer(id.clone()),
        )
    }

    /// The counts the node's `Done` claimed, if it sent one.
    pub fn reported(&self) -> Option<Usage> {
        self.reported
    }

    /// The key was revoked: the node's stream is reset (which aborts the backend request) and
    /// the client is told in band.
    fn end_revoked(&mut self) -> StreamEvent {
        self.cancel();
        StreamEvent::Failed(CoreError::key_revoked())
    }

    /// Stops the work on the node: the stream reset (`STREAM_CANCELLED`) reaches it within one
    /// round trip.
    pub fn cancel(&mut self) {
        if !self.finished {
            if let Some((mut tx, mut framed)) = self.inner.io.take() {
                let _ = tx.reset(STREAM_CANCELLED);
                let _ = framed.get_mut().stop(STREAM_CANCELLED);
            }
            self.finished = true;
        }
    }
}

impl Drop for InferStream {
    fn drop(&mut self) {
        self.cancel();
        // A finished stream is dropped as is (its send side finishes), not reset.
        drop(self.inner.io.take());
    }
}

fn to_event(r: Result<Option<Message>, nearpath_protocol::StreamError>) -> StreamEvent {
    match r {
        Ok(Some(Message::Token(t))) => StreamEvent::Token(t.text),
        Ok(Some(Message::Chunk(c))) => StreamEvent::Chunk {
            json: c.json,
            info: ChunkInfo::default(),
        },
        Ok(Some(Message::Done(d))) => StreamEvent::Done {
            finish_reason: d.finish_reason,
            usage: Usage {
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
            },
        },
        Ok(Some(Message::Error(e))) => StreamEvent::Failed(node_error(&e.code, &e.message)),
        Ok(Some(other)) => StreamEvent::Failed(CoreError::from_api(&ApiError::bad_gateway(
            format!("node sent an unexpected {} message", other.name()),
        ))),
        Ok(None) => StreamEvent::Failed(CoreError::from_api(&ApiError::bad_gateway(
            "the node ended the stream without finishing",
        ))),
        Err(e) => StreamEvent::Failed(CoreError::from_api(&ApiError::bad_gateway(format!(
            "the node failed mid-stream: {e}"
        )))),
    }
}

/// Whether a node's answer before the first token is its failure, for outlier detection: not a
/// client fault, not a `Busy` refusal (full is not broken), not a missing slot.
fn counts_against_node(ev: &NodeEvent) -> bool {
    match ev {
        NodeEvent::Unreachable(_) => true,
        NodeEvent::Failed(e) => e.blame != Blame::Client,
        NodeEvent::Refused { code, .. } => {
            matches!(code, RefuseCode::Internal | RefuseCode::UnknownWorkload)
        }
        NodeEvent::NoSlot | NodeEvent::Accepted | NodeEvent::FirstToken => false,
    }
}

/// `request` and its JSON body for model `to` (a fallback): the same body with `model`
/// replaced. `None` if the body is not a JSON object (it always is: it was parsed).
fn with_model(
    request: &InferenceRequest,
    request_json: &str,
    to: &str,
) -> Option<(InferenceRequest, String)> {
    let mut body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(request_json).ok()?;
    body.insert("model".into(), serde_json::Value::String(to.to_string()));
    let mut r = request.clone();
    r.model = to.to_string();
    r.raw
        .insert("model".into(), serde_json::Value::String(to.to_string()));
    Some((r, serde_json::Value::Object(body).to_string()))
}

/// Maps a node-reported error code to the core's error: a request the backend found invalid is
/// the client's fault (not failed over); anything else is the node's.
fn node_error(code: &str, message: &str) -> CoreError {
    let api = match code {
        "bad_request" | "invalid_request" => ApiError::bad_request(message.to_string(), None),
        "model_not_found" | "unknown_model" => {
            ApiError::bad_request(message.to_string(), Some("model"))
        }
        "timeout" | "upstream_timeout" => ApiError::timeout(message.to_string()),
        _ => ApiError::bad_gateway(format!("{code}: {message}")),
    };
    CoreError::from_api(&api)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearpath_protocol::openai::Endpoint;

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

    #[test]
    fn usage_above_what_was_relayed_is_not_billed() {
        // The node may say it produced 500 tokens; the tenant pays the 3 pieces relayed.
        assert_eq!(billed_usage(7, 3, None, 1).completion_tokens, 3);
        // Never more than max_tokens, however many pieces came.
        assert_eq!(billed_usage(7, 40, Some(16), 1).completion_tokens, 16);
        assert_eq!(billed_usage(7, 40, Some(16), 1).prompt_tokens, 7);
        // n choices may each produce max_tokens, no more.
        assert_eq!(billed_usage(7, 40, Some(16), 2).completion_tokens, 32);
    }

    #[test]
    fn node_errors_blame_the_client_only_for_invalid_requests() {
        use crate::error::{Blame, Kind};
        for code in [
            "bad_request",
            "invalid_request",
            "model_not_found",
            "unknown_model",
        ] {
            let e = node_error(code, "m");
            assert_eq!(
                (e.kind, e.blame, e.retryable),
                (Kind::InvalidRequest, Blame::Client, false),
                "{code}"
            );
        }
        let e = node_error("upstream_timeout", "slow");
        assert_eq!(
            (e.kind, e.blame, e.retryable),
            (Kind::Timeout, Blame::Node, true)
        );
        let e = node_error("oom", "out of memory");
        assert_eq!(
            (e.kind, e.blame, e.retryable),
            (Kind::NodeFailed, Blame::Node, true)
        );
    }
}
