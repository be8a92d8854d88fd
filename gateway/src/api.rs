//! The client-facing HTTP API: OpenAI-compatible inference (`/v1/models`, `/v1/models/{id}`,
//! `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`, SSE streaming),
//! game listing, health.
//!
//! What the backend produced passes through: JSON pieces (tool calls, logprobs, reasoning, vendor
//! fields) are relayed as [`InferService`] rewrote them, and non-streaming bodies are assembled
//! from them ([`openai::Assembler`]). Every request gets one access-log line
//! ([`crate::access`]); a W3C `traceparent` is continued (or a trace started) towards the node.
//!
//! Every response carries `x-request-id`. Errors use OpenAI's body shape; a geofence denial is
//! 403 with `x-should-retry: false`, no eligible node is 503, saturation is 429 with
//! `Retry-After`; a model served recently whose nodes are all gone (a blip) is 503
//! `model_unavailable` with `Retry-After` and `x-should-retry: true`, never 404.
//!
//! The front end only speaks HTTP: admission, routing, failover, the pump and metering are
//! [`InferService`]'s; WHEP and `/play` are served by a handler injected at assembly.

use crate::access::{AccessLine, TraceParent};
use crate::auth::Auth;
use crate::client_addr::{self, ClientAddr};
use crate::error::{CoreError, Kind};
use crate::federation::directory::FleetView;
use crate::http_util::{bearer, read_body, with_type, Body, BodyError, Handler, Resp};
use crate::infer::{new_request_id, Gone, InferService, Output, Relay};
use crate::store::ApiKey;
use crate::tls::CertPair;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use nearpath_config::{HttpConfig, WorkloadKind};
use nearpath_geo::Location;
use nearpath_protocol::openai::{
    self, ApiError, Assembler, EmbeddingsAssembler, Endpoint, InferenceRequest, StreamRenderer,
};
use nearpath_protocol::ModelCaps;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{info_span, Instrument};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Names the model that served a request when it was a fallback of the requested one
/// (`inference.fallbacks`).
static X_FALLBACK_MODEL: HeaderName = HeaderName::from_static("x-nearpath-fallback-model");

/// Another HTTP service mounted on this listener for the paths it claims (WHEP, session
/// resources and `/play`, for browser players over WebRTC).
pub struct Mounted {
    pub claims: fn(&str) -> bool,
    pub handler: Arc<dyn Handler>,
}

/// The OpenAI-compatible HTTP API.
pub struct ClientApi {
    infer: Arc<InferService>,
    http: HttpConfig,
    mounted: Option<Mounted>,
    /// The federation's gateways, for `GET /v1/gateways` (none: this gateway is not listed).
    fleet: Option<Arc<FleetView>>,
}

/// The response for a core error: its OpenAI body and status, `x-should-retry: false` when a
/// retry would fail the same way, `Retry-After` when the gateway knows how long (a second for
/// any 429 otherwise), and `x-should-retry: true` for a retryable 503 with a wait (a node blip,
/// a ledger that cannot commit): OpenAI SDKs retry only when told to, and honour Retry-After.
fn error_response(request_id: &str, e: &CoreError) -> Resp {
    let api = e.to_api();
    let mut r = with_type(
        StatusCode::from_u16(api.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "application/json",
        api.body(),
    );
    let h = r.headers_mut();
    if !e.retryable {
        h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
    }
    let retry_after = e
        .retry_after_s
        .or((e.kind == Kind::RateLimited).then_some(1));
    if let Some(s) = retry_after {
        if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
            h.insert(hyper::header::RETRY_AFTER, v);
        }
    }
    if e.retryable && e.kind == Kind::Unavailable && e.retry_after_s.is_some() {
        h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("true"));
    }
    set_request_id(&mut r, request_id);
    r
}

/// The response for an error of the HTTP layer itself (path, method, body).
fn api_error(request_id: &str, e: &ApiError) -> Resp {
    error_response(request_id, &CoreError::from_api(e))
}

fn set_request_id(r: &mut Resp, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
}

/// SSE rendering for a streaming request.
struct SseRelay {
    tx: mpsc::Sender<Bytes>,
    renderer: StreamRenderer,
    include_usage: bool,
    /// The chat role chunk went out (ours, or the backend's own first chunk carried `role`). It
    /// is sent with the first piece rather than at start, so that it is never sent twice.
    role_sent: bool,
    /// A piece carried a `finish_reason`: no finish chunk of our own follows.
    finish_sent: bool,
}

impl SseRelay {
    async fn push(&self, chunks: impl IntoIterator<Item = Bytes>) -> Result<u64, Gone> {
        let mut n = 0u64;
        for b in chunks {
            n += b.len() as u64;
            self.tx.send(b).await.map_err(|_| Gone)?;
        }
        Ok(n)
    }

    /// Our role chunk, unless it went out already or `backend_has_role`.
    fn role(&mut self, backend_has_role: bool, out: &mut Vec<Bytes>) {
        if !self.role_sent {
            self.role_sent = true;
            if !backend_has_role {
                out.extend(self.renderer.role_event());
            }
        }
    }
}

impl Relay for SseRelay {
    async fn send(&mut self, out: Output<'_>) -> Result<u64, Gone> {
        let responses = self.renderer.endpoint() == Endpoint::Responses;
        let mut chunks: Vec<Bytes> = Vec::with_capacity(2);
        match out {
            Output::Started => {}
            Output::Token(t) => {
                self.role(false, &mut chunks);
                chunks.push(self.renderer.token_event(t));
            }
            Output::Chunk { json, info } if responses => {
                chunks.push(openai::responses_sse_event(
                    info.event_type.as_deref().unwrap_or_default(),
                    json,
                ));
            }
            Output::Chunk { json, info } => {
                self.role(info.has_role, &mut chunks);
                self.finish_sent |= !info.finished.is_empty();
                chunks.push(openai::sse_event(json));
            }
            // A Responses stream ends with its terminal event, which the backend sent.
            Output::Done { .. } if responses => {}
            Output::Done {
                finish_reason,
                usage,
            } => {
                self.role(false, &mut chunks);
                if !self.finish_sent {
                    chunks.push(self.renderer.finish_event(finish_reason));
                }
                if self.include_usage {
                    chunks.push(self.renderer.usage_event(usage));
                }
                chunks.push(Bytes::from_static(openai::SSE_DONE.as_bytes()));
            }
            // A node failure after the headers went out is an in-band error event.
            Output::Failed(e) => chunks.push(e.to_api().sse_event()),
        }
        self.push(chunks).await
    }

    async fn gone(&mut self) {
        self.tx.closed().await
    }
}

/// What a non-streaming response is assembled with.
enum Collect {
    Completion(Assembler),
    Embeddings(EmbeddingsAssembler),
}

/// The whole answer as one JSON body, for a request that did not ask to stream.
struct JsonRelay {
    completion_id: String,
    created: u64,
    model: String,
    /// The node serving it, named when its pieces cannot be assembled.
    node: String,
    collect: Option<Collect>,
    body: Option<String>,
    error: Option<CoreError>,
}

impl JsonRelay {
    fn malformed(&mut self, e: openai::RelayError) {
        self.collect = None;
        self.error = Some(
            CoreError::from_api(&ApiError::bad_gateway(format!(
                "node {} sent a malformed answer: {e}",
                self.node
            )))
            .with_peer(self.node.clone()),
        );
    }
}

impl Relay for JsonRelay {
    async fn send(&mut self, out: Output<'_>) -> Result<u64, Gone> {
        match out {
            Output::Started => Ok(0),
            Output::Token(t) => {
                if let Some(Collect::Completion(a)) = &mut self.collect {
                    a.push_text(t);
                }
                Ok(0)
            }
            Output::Chunk { json, .. } => {
                let pushed = match &mut self.collect {
                    Some(Collect::Completion(a)) => a.push_chunk(json),
                    Some(Collect::Embeddings(e)) => e.push_chunk(json),
                    None => Ok(()),
                };
                if let Err(e) = pushed {
                    self.malformed(e);
                }
                Ok(0)
            }
            Output::Done {
                finish_reason,
                usage,
            } => {
                let body = match self.collect.take() {
                    Some(Collect::Completion(a)) => a.finish(
                        &self.completion_id,
                        self.created,
                        &self.model,
                        finish_reason,
                        usage,
                    ),
                    Some(Collect::Embeddings(e)) => e.finish(&self.model, usage.prompt_tokens),
                    None => return Ok(0),
                };
                match body {
                    Ok(body) => {
                        let n = body.len() as u64;
                        self.body = Some(body);
                        Ok(n)
                    }
                    Err(e) => {
                        self.malformed(e);
                        Ok(0)
                    }
                }
            }
            // Nothing was sent yet: the error becomes the response's status.
            Output::Failed(e) => {
                self.error = Some(e.clone());
                Ok(0)
            }
        }
    }

    async fn gone(&mut self) {
        // A client that goes away drops the whole request future, and the stream with it.
        std::future::pending().await
    }

    fn status(&self) -> u16 {
        self.error.as_ref().map_or(200, |e| e.to_api().status)
    }
}

/// What an inference request showed of itself before it was refused, for its access-log line.
#[derive(Default)]
struct Seen {
    key_id: Option<String>,
    model: Option<String>,
    country: Option<nearpath_geo::Country>,
}

impl ClientApi {
    /// The API over `infer`, with `[http]`; `mounted` serves the paths it claims.
    pub fn new(infer: Arc<InferService>, http: HttpConfig, mounted: Option<Mounted>) -> Self {
        ClientApi {
            infer,
            http,
            mounted,
            fleet: None,
        }
    }

    /// Serves `GET /v1/gateways` from `fleet`.
    pub fn with_fleet(mut self, fleet: Arc<FleetView>) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// `GET /v1/gateways`: the live gateways of the federation, ordered by id, for clients
    /// that pick the nearest (API-key authenticated like `/v1/models`). Read from the fleet
    /// view, so a client polling it costs no store round trip.
    async fn gateways(&self, req: Request<Incoming>, request_id: &str) -> Resp {
        if let Err(e) = self.infer.auth.authenticate(bearer(&req)).await {
            return error_response(request_id, &e);
        }
        let now_ms = self.infer.clock.unix_ms();
        let live = self
            .fleet
            .as_ref()
            .map(|f| f.live_gateways(now_ms))
            .unwrap_or_default();
        let data: Vec<serde_json::Value> = live
            .iter()
            .map(|g| {
                serde_json::json!({
                    "id": g.id,
                    "region": g.region,
                    "lat": g.lat,
                    "lon": g.lon,
                    "quic_address": g.quic_address,
                    "http_url": g.http_url,
                    "cert_sha256": g.cert_sha256,
                    "live": true,
                })
            })
            .collect();
        with_type(
            StatusCode::OK,
            "application/json",
            serde_json::json!({"object": "list", "data": data}).to_string(),
        )
    }

    fn locate(&self, req: &Request<Incoming>, peer: SocketAddr) -> (ClientAddr, Location) {
        let addr = client_addr::client_ip(&self.http, peer.ip(), req.headers());
        (addr, addr.locate(&self.infer.placement.geo))
    }

    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        let request_id = crate::access::client_request_id(
            req.headers()
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok()),
        )
        .unwrap_or_else(new_request_id);
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let started = self.infer.clock.now();
        let span = info_span!("http_request", id = %request_id, method = %method, path = %path, trace_id = tracing::field::Empty);
        // Invalid trace contexts are ignored, and a new trace is started in their place.
        let trace = TraceParent::for_span(
            &span,
            req.headers()
                .get(&TRACEPARENT)
                .and_then(|v| v.to_str().ok()),
        );
        let trace_id = trace.trace_id_hex();
        span.record("trace_id", trace_id.as_str());
        let mut resp = self
            .dispatch(req, peer, &request_id, &trace)
            .instrument(span)
            .await;
        set_request_id(&mut resp, &request_id);
        // Inference requests log their own line (when their stream ends); everything else here.
        if !(method == Method::POST && Endpoint::from_path(&path).is_some()) {
            AccessLine {
                entry: "http",
                method: method.as_str(),
                path: &path,
                status: resp.status().as_u16(),
                request_id: &request_id,
                trace_id: Some(&trace_id),
                duration_ms: elapsed_ms(started, self.infer.clock.now()),
                outcome: if resp.status().is_success() {
                    "ok"
                } else {
                    "error"
                },
                ..AccessLine::default()
            }
            .emit();
        }
        resp
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        request_id: &str,
        trace: &TraceParent,
    ) -> Resp {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/healthz") => with_type(
                StatusCode::OK,
                "application/json",
                serde_json::json!({"status": "ok", "nodes": self.infer.directory.registry.len()})
                    .to_string(),
            ),
            (Method::GET, "/v1/models") => self.models(req, peer, request_id).await,
            (Method::GET, "/v1/games") => self.games(req, peer, request_id).await,
            (Method::GET, "/v1/gateways") => self.gateways(req, request_id).await,
            // Model ids may contain `/` (`org/model`): the id is the rest of the path.
            (Method::GET, p) if p.starts_with("/v1/models/") && p.len() > "/v1/models/".len() => {
                let id = p["/v1/models/".len()..].to_string();
                self.model(req, peer, request_id, &id).await
            }
            (Method::POST, p) if Endpoint::from_path(p).is_some() => match Endpoint::from_path(p) {
                Some(endpoint) => {
                    self.completions(endpoint, req, peer, request_id, trace)
                        .await
                }
                None => api_error(request_id, &ApiError::not_found(&path)),
            },
            // WHEP, session resources and the player page (browser players over WebRTC).
            (_, p) if self.mounted.as_ref().is_some_and(|m| (m.claims)(p)) => match &self.mounted {
                Some(m) => m.handler.clone().handle(req, peer).await,
                None => api_error(request_id, &ApiError::not_found(&path)),
            },
            (m, p)
                if matches!(p, "/v1/models" | "/v1/games" | "/v1/gateways")
                    || Endpoint::from_path(p).is_some()
                    || p.starts_with("/v1/models/") =>
            {
                api_error(request_id, &ApiError::method_not_allowed(m.as_str(), &path))
            }
            _ => api_error(request_id, &ApiError::not_found(&path)),
        }
    }

    /// `GET /v1/models/{id}`: the model as `/v1/models` lists it (same visibility, same
    /// `available`), or 404 `model_not_found`.
    async fn model(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        request_id: &str,
        id: &str,
    ) -> Resp {
        let key = match self.infer.auth.authenticate(bearer(&req)).await {
            Ok(key) => key,
            Err(e) => return error_response(request_id, &e),
        };
        let (_, loc) = self.locate(&req, peer);
        let list = self.model_list(&key, &loc);
        match list.iter().find(|m| m.id == id) {
            Some(m) => with_type(
                StatusCode::OK,
                "application/json",
                match &m.gateways {
                    Some(g) => openai::fleet_model_object(&m.fleet(g)),
                    None => openai::model_object(&m.id, m.created, m.owned_by, m.available, m.caps),
                },
            ),
            None => error_response(request_id, &CoreError::model_not_found(id)),
        }
    }

    async fn models(&self, req: Request<Incoming>, peer: SocketAddr, request_id: &str) -> Resp {
        let key = match self.infer.auth.authenticate(bearer(&req)).await {
            Ok(key) => key,
            Err(e) => return error_response(request_id, &e),
        };
        let (_, loc) = self.locate(&req, peer);
        let list = self.model_list(&key, &loc);
        let body = if self.infer.trunk.is_some() {
            let fleet: Vec<openai::FleetModel<'_>> = list
                .iter()
                .map(|m| m.fleet(m.gateways.as_deref().unwrap_or_default()))
                .collect();
            openai::models_list_in_fleet(&fleet)
        } else {
            let list: Vec<(&str, u64, &str, bool, ModelCaps)> = list
                .iter()
                .map(|m| (m.id.as_str(), m.created, m.owned_by, m.available, m.caps))
                .collect();
            openai::models_list_with_availability(&list)
        };
        with_type(StatusCode::OK, "application/json", body)
    }

    /// The models `key` may use that are visible from `loc`, sorted, with whether a node serves
    /// each now.
    /// Each with the union of what the nodes serving it declare it can do.
    /// In a federation whose inference goes through the trunk, models that only peers' nodes
    /// serve are listed too (once each), and every entry names the gateways serving it.
    fn model_list(&self, key: &ApiKey, loc: &Location) -> Vec<ListedModel> {
        let mut names =
            self.infer
                .directory
                .visible(&self.infer.placement, loc, WorkloadKind::Inference);
        // A key sees only the models it may use.
        names.retain(|n| Auth::model_allowed(key, n));
        // Peers' nodes, through the same geofence check as our own (the client's address,
        // the remote node's published country and classes).
        let mut remote = match &self.infer.trunk {
            Some(trunk) => trunk.remote_models(|n| {
                self.infer
                    .placement
                    .serve_check(loc, n, WorkloadKind::Inference)
                    .is_ok()
            }),
            None => Default::default(),
        };
        remote.retain(|n, _| Auth::model_allowed(key, n));
        let remote_caps = |n: &str| remote.get(n).map(|r| r.caps).unwrap_or_default();
        let self_id = self.infer.trunk.as_ref().map(|t| t.self_id().to_string());
        // Models whose last node left within `inference.model_grace_s` stay listed, marked
        // unavailable, so that a client does not take a blip for the model's removal.
        let now_ms = self.infer.clock.unix_ms();
        let gone = self.infer.directory.registry.recently_served_models(now_ms);
        let created = now_ms / 1000;
        let caps = self.infer.directory.registry.all_model_caps();
        let caps_of = |n: &str| caps.get(n).copied().unwrap_or_default();
        let gateways_of = |n: &str, here: bool| {
            self_id.as_ref().map(|me| {
                let mut g = remote
                    .get(n)
                    .map(|r| r.gateways.clone())
                    .unwrap_or_default();
                if here {
                    g.insert(me.clone());
                }
                g.into_iter().collect::<Vec<_>>()
            })
        };
        let mut list: Vec<ListedModel> = names
            .iter()
            .map(|n| ListedModel {
                id: n.clone(),
                created,
                owned_by: "nearpath",
                available: true,
                caps: caps_of(n).with(remote_caps(n)),
                gateways: gateways_of(n, true),
            })
            .collect();
        // Served only by peers' nodes, with what those nodes declare (published in the node
        // directory).
        list.extend(
            remote
                .keys()
                .filter(|n| !names.contains(*n))
                .map(|n| ListedModel {
                    id: n.clone(),
                    created,
                    owned_by: "nearpath",
                    available: true,
                    caps: remote_caps(n),
                    gateways: gateways_of(n, false),
                }),
        );
        list.extend(
            gone.iter()
                .filter(|n| {
                    !names.contains(*n) && !remote.contains_key(*n) && Auth::model_allowed(key, n)
                })
                .map(|n| ListedModel {
                    id: n.clone(),
                    created,
                    owned_by: "nearpath",
                    available: false,
                    caps: ModelCaps::NONE,
                    gateways: gateways_of(n, false),
                }),
        );
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    async fn games(&self, req: Request<Incoming>, peer: SocketAddr, request_id: &str) -> Resp {
        if let Err(e) = self.infer.auth.authenticate(bearer(&req)).await {
            return error_response(request_id, &e);
        }
        let (_, loc) = self.locate(&req, peer);
        let data: Vec<serde_json::Value> = self
            .infer
            .directory
            .visible(&self.infer.placement, &loc, WorkloadKind::Game)
            .into_iter()
            .map(|t| serde_json::json!({"id": t, "object": "game"}))
            .collect();
        with_type(
            StatusCode::OK,
            "application/json",
            serde_json::json!({"object": "list", "data": data}).to_string(),
        )
    }

    /// An inference request; its access-log line is written here when it is refused before
    /// reaching a node, by the service otherwise (when the answer or the stream ends).
    async fn completions(
        &self,
        endpoint: Endpoint,
        req: Request<Incoming>,
        peer: SocketAddr,
        request_id: &str,
        trace: &TraceParent,
    ) -> Resp {
        let started = self.infer.clock.now();
        let mut seen = Seen::default();
        match self
            .infer_request(endpoint, req, peer, request_id, trace, &mut seen)
            .await
        {
            Ok(resp) => resp,
            Err((resp, outcome)) => {
                let trace_id = trace.trace_id_hex();
                AccessLine {
                    entry: "http",
                    method: "POST",
                    path: endpoint.path(),
                    status: resp.status().as_u16(),
                    request_id,
                    trace_id: Some(&trace_id),
                    key_id: seen.key_id.as_deref(),
                    model: seen.model.as_deref(),
                    country: seen.country.as_ref().map(|c| c.as_str()),
                    duration_ms: elapsed_ms(started, self.infer.clock.now()),
                    outcome,
                    ..AccessLine::default()
                }
                .emit();
                resp
            }
        }
    }

    /// Serves an inference request; `Err` is a refusal before admission (not logged yet).
    async fn infer_request(
        &self,
        endpoint: Endpoint,
        req: Request<Incoming>,
        peer: SocketAddr,
        request_id: &str,
        trace: &TraceParent,
        seen: &mut Seen,
    ) -> Result<Resp, (Resp, &'static str)> {
        let refused = |e: CoreError| (error_response(request_id, &e), e.kind.as_str());
        let infer = &self.infer;
        let started = infer.clock.now();
        // A request a peer gateway redirected here carries its ticket in the query (clients
        // drop `Authorization` on a cross-origin redirect): the ticket stands in for the key.
        let presented = ticket_param(req.uri().query()).map_err(refused)?;
        let (ip, client) = self.locate(&req, peer);
        let ticketed = match presented {
            Some(t) => Some(infer.open_ticket(&t, bearer(&req)).await.map_err(refused)?),
            None => None,
        };
        let key: ApiKey = match &ticketed {
            Some((key, _)) => key.clone(),
            None => infer
                .auth
                .authenticate(bearer(&req))
                .await
                .map_err(refused)?,
        };
        seen.key_id = Some(key.id.clone());
        seen.country = client.country;
        if let Some(ct) = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            if !ct.to_ascii_lowercase().starts_with("application/json") {
                return Err(refused(CoreError::from_api(&ApiError::bad_request(
                    format!("Content-Type must be application/json, not {ct}"),
                    None,
                ))));
            }
        }
        let limit = self.http.max_body_bytes as usize;
        let body = match read_body(req.into_body(), limit).await {
            Ok(b) => b,
            Err(BodyError::TooLarge { limit }) => {
                return Err(refused(CoreError::from_api(&ApiError::payload_too_large(
                    limit,
                ))))
            }
            Err(BodyError::Read(m)) => {
                return Err(refused(CoreError::from_api(&ApiError::bad_request(
                    m, None,
                ))))
            }
        };
        let request = InferenceRequest::parse(endpoint, &body)
            .map_err(|e| refused(CoreError::from_api(&ApiError::invalid_request(e))))?;
        seen.model = Some(request.model.clone());
        let pin = match &ticketed {
            // The ticket must be for exactly this request; it is used up here.
            Some((key, claims)) => {
                infer
                    .accept_ticket(claims, ip.ip(), key, &request.model, endpoint)
                    .map_err(refused)?;
                Some(claims.node_id.as_str())
            }
            None => {
                let to = infer
                    .redirect_for(&key, "http", &request, &client, ip.ip())
                    .await
                    .map_err(refused)?;
                if let Some(to) = to {
                    // Nothing recorded here but the outcome: the peer admits and bills it.
                    let mut r = with_type(
                        StatusCode::TEMPORARY_REDIRECT,
                        "application/json",
                        serde_json::json!({
                            "redirect": {"gateway_id": to.gateway.id, "node_id": to.node_id}
                        })
                        .to_string(),
                    );
                    if let Ok(v) = HeaderValue::from_str(&to.location(endpoint.path())) {
                        r.headers_mut().insert(hyper::header::LOCATION, v);
                    }
                    // The ticket is single-use and bound to this client: never cached.
                    r.headers_mut().insert(
                        hyper::header::CACHE_CONTROL,
                        HeaderValue::from_static("no-store"),
                    );
                    return Err((r, "redirected"));
                }
                None
            }
        };
        // Held until the response (or the stream) ends, however it ends.
        let mut ticket = infer
            .admit(key, "http", request_id, &request.model, started)
            .await
            .map_err(refused)?;
        ticket.endpoint = endpoint;
        ticket.traceparent = Some(trace.header());
        ticket.country = client.country;
        // The node gets the body as the client sent it (it knows the endpoint from its shape).
        let raw = String::from_utf8_lossy(&body).into_owned();
        // From here on the service writes the access-log line.
        let stream = match infer.start(&ticket, &request, &raw, &client, pin).await {
            Ok(s) => s,
            Err(e) => return Ok(error_response(request_id, &e)),
        };
        // A fallback model serves it: the response names that model, and says so in a header.
        let served_model = stream.model.clone();
        let fallback = stream
            .fallback_from
            .is_some()
            .then(|| HeaderValue::from_str(&served_model).ok())
            .flatten();
        // Embeddings have no streaming form.
        if !request.stream || endpoint == Endpoint::Embeddings {
            let collect = match endpoint {
                Endpoint::Embeddings => Collect::Embeddings(EmbeddingsAssembler::new(stream.n)),
                _ => Collect::Completion(Assembler::new(endpoint)),
            };
            let mut relay = JsonRelay {
                completion_id: stream.completion_id.clone(),
                created: stream.created,
                model: served_model.clone(),
                node: stream.node.id.clone(),
                collect: Some(collect),
                body: None,
                error: None,
            };
            infer.pump(ticket, stream, &mut relay).await;
            return Ok(match (relay.error, relay.body) {
                (None, Some(body)) => {
                    let mut r = with_type(StatusCode::OK, "application/json", body);
                    if let Some(v) = fallback {
                        r.headers_mut().insert(X_FALLBACK_MODEL.clone(), v);
                    }
                    r
                }
                (Some(e), _) => error_response(request_id, &e),
                (None, None) => error_response(
                    request_id,
                    &CoreError::internal("the completion ended without a result"),
                ),
            });
        }
        // Streaming: headers go out now; tokens follow as they arrive from the node.
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let mut relay = SseRelay {
            tx,
            renderer: StreamRenderer::new(
                endpoint,
                &stream.completion_id,
                stream.created,
                &served_model,
            ),
            include_usage: request.include_usage,
            role_sent: false,
            finish_sent: false,
        };
        let infer = infer.clone();
        tokio::spawn(
            async move {
                infer.pump(ticket, stream, &mut relay).await;
            }
            .in_current_span(),
        );
        let mut r = Response::new(Body::Channel(rx));
        let h = r.headers_mut();
        if let Some(v) = fallback {
            h.insert(X_FALLBACK_MODEL.clone(), v);
        }
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(openai::SSE_CONTENT_TYPE),
        );
        h.insert(
            hyper::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        // Tells nginx-style proxies in front of us not to buffer the stream.
        h.insert(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        );
        Ok(r)
    }
}

/// The `nearpath_ticket` query parameter, if present (percent-decoding is not needed: a ticket
/// is hex). Longer than any ticket can be → 400 before anything else is read.
fn ticket_param(query: Option<&str>) -> Result<Option<String>, CoreError> {
    let Some(q) = query else {
        return Ok(None);
    };
    let prefix = concat!("nearpath_ticket", "=");
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix(prefix) {
            if v.len() > crate::ticket::MAX_TICKET_LEN {
                return Err(CoreError::from_api(&ApiError::bad_request(
                    format!(
                        "nearpath_ticket is longer than {} characters",
                        crate::ticket::MAX_TICKET_LEN
                    ),
                    Some("nearpath_ticket"),
                )));
            }
            return Ok(Some(v.to_string()));
        }
    }
    Ok(None)
}

fn elapsed_ms(from: std::time::Instant, to: std::time::Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_millis()).unwrap_or(u64::MAX)
}

impl Handler for ClientApi {
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Resp> + Send>> {
        Box::pin(async move { self.route(req, peer).await })
    }
}

/// A TLS acceptor for the client HTTP listener (HTTP/2 and HTTP/1.1 by ALPN).
pub fn tls_acceptor(pair: CertPair) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(pair.chain, pair.key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// One entry of `GET /v1/models`.
struct ListedModel {
    id: String,
    created: u64,
    owned_by: &'static str,
    available: bool,
    caps: ModelCaps,
    /// In a federation that trunks inference: the gateways whose live nodes serve it.
    gateways: Option<Vec<String>>,
}

impl ListedModel {
    fn fleet<'a>(&'a self, gateways: &'a [String]) -> openai::FleetModel<'a> {
        openai::FleetModel {
            id: &self.id,
            created: self.created,
            owned_by: self.owned_by,
            available: self.available,
            caps: self.caps,
            gateways,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(r: &Resp, name: &str) -> Option<String> {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_string())
    }

    #[test]
    fn a_blip_is_a_503_the_sdks_retry_after_a_second() {
        let r = error_response("req_1", &CoreError::model_unavailable("m"));
        assert_eq!(r.status(), 503);
        assert_eq!(header(&r, "x-should-retry").as_deref(), Some("true"));
        assert_eq!(header(&r, "retry-after").as_deref(), Some("1"));
        assert_eq!(header(&r, "x-request-id").as_deref(), Some("req_1"));
    }

    #[test]
    fn a_ledger_that_cannot_commit_is_a_retryable_503() {
        let r = error_response("req_1", &crate::auth::ledger_unavailable());
        assert_eq!(r.status(), 503);
        assert_eq!(header(&r, "x-should-retry").as_deref(), Some("true"));
        assert_eq!(header(&r, "retry-after").as_deref(), Some("1"));
    }

    #[test]
    fn errors_that_would_repeat_say_do_not_retry() {
        for e in [
            CoreError::geofence_denied("r", "no"),
            CoreError::model_not_found("m"),
            CoreError::invalid_api_key(),
            CoreError::bad_request("bad", Some("temperature")),
        ] {
            let r = error_response("req_1", &e);
            assert_eq!(r.status(), e.kind.http_status());
            assert_eq!(
                header(&r, "x-should-retry").as_deref(),
                Some("false"),
                "{e:?}"
            );
            assert_eq!(header(&r, "retry-after"), None, "{e:?}");
        }
    }

    #[test]
    fn a_429_carries_its_wait_or_a_second() {
        let saturated = CoreError::from_api(&ApiError::rate_limited("full"));
        let r = error_response("req_1", &saturated);
        assert_eq!(r.status(), 429);
        assert_eq!(header(&r, "retry-after").as_deref(), Some("1"));
        assert_eq!(header(&r, "x-should-retry"), None);
        let r = error_response("req_1", &saturated.with_retry_after_s(17));
        assert_eq!(header(&r, "retry-after").as_deref(), Some("17"));
    }

    #[test]
    fn a_node_failure_is_a_retryable_502_without_a_promise() {
        let r = error_response("req_1", &CoreError::node_failed("n1", "boom"));
        assert_eq!(r.status(), 502);
        assert_eq!(header(&r, "x-should-retry"), None);
        assert_eq!(header(&r, "retry-after"), None);
    }
}
