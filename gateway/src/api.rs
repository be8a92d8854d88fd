//! The client-facing HTTP API: OpenAI-compatible inference (`/v1/models`,
//! `/v1/chat/completions`, `/v1/completions`, SSE streaming), game listing, health.
//!
//! Every response carries `x-request-id`. Errors use OpenAI's body shape; a geofence denial is
//! 403 with `x-should-retry: false`, no eligible node is 503, saturation is 429 with
//! `Retry-After`; a model served recently whose nodes are all gone (a blip) is 503
//! `model_unavailable` with `Retry-After` and `x-should-retry: true`, never 404.

use crate::client_addr::{client_addr, ClientAddr};
use crate::http_util::{bearer, read_body, with_type, Body, BodyError, Handler, Resp};
use crate::infer::{self, Metering, StreamEvent};
use crate::server::Shared;
use crate::tls::CertPair;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use nearpath_config::WorkloadKind;
use nearpath_geo::Location;
use nearpath_protocol::openai::{
    self, ApiError, Endpoint, InferenceRequest, StreamRenderer, Usage,
};
use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{info_span, Instrument};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

pub struct ClientApi {
    shared: Arc<Shared>,
}

fn new_request_id() -> String {
    format!(
        "req_{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// The client's address for a request from `peer`: the TCP peer, or, only when the peer is a
/// trusted proxy, what the configured header says (see [`crate::client_addr`] for the rules).
/// The one function every HTTP entry point (this API, WHEP, `/play`) locates clients with.
pub fn client_ip(shared: &Shared, peer: IpAddr, headers: &HeaderMap) -> ClientAddr {
    let http = &shared.config.http;
    client_addr(
        peer,
        headers,
        &http.trusted_proxies,
        &http.client_address_header,
        http.trusted_hops,
    )
}

fn api_error(request_id: &str, err: &ApiError) -> Resp {
    let mut r = with_type(
        StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "application/json",
        err.body(),
    );
    let h = r.headers_mut();
    if !err.should_retry() {
        h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
    }
    if err.status == 429 {
        h.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if err.code.as_deref() == Some(openai::MODEL_UNAVAILABLE) {
        // A node blip: the request already waited `inference.unavailable_wait_ms` for a node to
        // come back, so an SDK's retry a second later is likely to be served (OpenAI SDKs retry
        // only when told to, and honour Retry-After).
        h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("true"));
        h.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if err.code.as_deref() == Some(infer::LEDGER_UNAVAILABLE) {
        // The ledger's writer probes every half second; a retry soon is likely to be served.
        h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("true"));
        h.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    set_request_id(&mut r, request_id);
    r
}

fn set_request_id(r: &mut Resp, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
}

impl ClientApi {
    pub fn new(shared: Arc<Shared>) -> Self {
        ClientApi { shared }
    }

    fn locate(&self, req: &Request<Incoming>, peer: SocketAddr) -> (ClientAddr, Location) {
        let addr = client_ip(&self.shared, peer.ip(), req.headers());
        (addr, addr.locate(&self.shared.placement.geo))
    }

    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        let request_id = req
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_string)
            .unwrap_or_else(new_request_id);
        let span = info_span!("http_request", id = %request_id, method = %req.method(), path = %req.uri().path());
        let mut resp = self.dispatch(req, peer, &request_id).instrument(span).await;
        set_request_id(&mut resp, &request_id);
        resp
    }

    async fn dispatch(&self, req: Request<Incoming>, peer: SocketAddr, request_id: &str) -> Resp {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/healthz") => with_type(
                StatusCode::OK,
                "application/json",
                serde_json::json!({"status": "ok", "nodes": self.shared.directory.registry.len()})
                    .to_string(),
            ),
            (Method::GET, "/v1/models") => self.models(req, peer, request_id).await,
            (Method::GET, "/v1/games") => self.games(req, peer, request_id).await,
            (Method::POST, "/v1/chat/completions") => {
                self.completions(Endpoint::Chat, req, peer, request_id)
                    .await
            }
            (Method::POST, "/v1/completions") => {
                self.completions(Endpoint::Completion, req, peer, request_id)
                    .await
            }
            // WHEP, session resources and the player page (browser players over WebRTC).
            (_, p) if crate::webrtc::is_webrtc_path(p) => {
                crate::webrtc::handle(&self.shared, req, peer).await
            }
            (m, "/v1/models" | "/v1/games" | "/v1/chat/completions" | "/v1/completions") => {
                api_error(request_id, &ApiError::method_not_allowed(m.as_str(), &path))
            }
            _ => api_error(request_id, &ApiError::not_found(&path)),
        }
    }

    /// Titles or models served by live nodes this client may use.
    fn visible(&self, client: &Location, kind: WorkloadKind) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for node in self.shared.directory.registry.list() {
            if node.dynamic().state == crate::registry::NodeState::Gone {
                continue;
            }
            if infer::serve_check(&self.shared, client, &node, kind).is_err() {
                continue;
            }
            let names = match kind {
                WorkloadKind::Inference => &node.workloads.models,
                WorkloadKind::Game => &node.workloads.games,
            };
            out.extend(names.iter().cloned());
        }
        out
    }

    async fn models(&self, req: Request<Incoming>, peer: SocketAddr, request_id: &str) -> Resp {
        if let Err(e) = infer::authenticate(&self.shared, bearer(&req)).await {
            return api_error(request_id, &e);
        }
        let (_, loc) = self.locate(&req, peer);
        let names = self.visible(&loc, WorkloadKind::Inference);
        // Models whose last node left within `inference.model_grace_s` stay listed, marked
        // unavailable, so that a client does not take a blip for the model's removal.
        let gone = self
            .shared
            .directory
            .registry
            .recently_served_models(crate::clock::system_unix_ms());
        let created = crate::clock::system_unix_ms() / 1000;
        let mut list: Vec<(&str, u64, &str, bool)> = names
            .iter()
            .map(|n| (n.as_str(), created, "nearpath", true))
            .collect();
        list.extend(
            gone.iter()
                .filter(|n| !names.contains(*n))
                .map(|n| (n.as_str(), created, "nearpath", false)),
        );
        list.sort_by(|a, b| a.0.cmp(b.0));
        with_type(
            StatusCode::OK,
            "application/json",
            openai::models_list_with_availability(&list),
        )
    }

    async fn games(&self, req: Request<Incoming>, peer: SocketAddr, request_id: &str) -> Resp {
        if let Err(e) = infer::authenticate(&self.shared, bearer(&req)).await {
            return api_error(request_id, &e);
        }
        let (_, loc) = self.locate(&req, peer);
        let data: Vec<serde_json::Value> = self
            .visible(&loc, WorkloadKind::Game)
            .into_iter()
            .map(|t| serde_json::json!({"id": t, "object": "game"}))
            .collect();
        with_type(
            StatusCode::OK,
            "application/json",
            serde_json::json!({"object": "list", "data": data}).to_string(),
        )
    }

    async fn completions(
        &self,
        endpoint: Endpoint,
        req: Request<Incoming>,
        peer: SocketAddr,
        request_id: &str,
    ) -> Resp {
        let started = Instant::now();
        let shared = &self.shared;
        let key = match infer::authenticate(shared, bearer(&req)).await {
            Ok(k) => k,
            Err(e) => return api_error(request_id, &e),
        };
        let (_ip, client) = self.locate(&req, peer);
        if let Some(ct) = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            if !ct.to_ascii_lowercase().starts_with("application/json") {
                return api_error(
                    request_id,
                    &ApiError::bad_request(
                        format!("Content-Type must be application/json, not {ct}"),
                        None,
                    ),
                );
            }
        }
        let limit = shared.config.http.max_body_bytes as usize;
        let body = match read_body(req.into_body(), limit).await {
            Ok(b) => b,
            Err(BodyError::TooLarge { limit }) => {
                return api_error(request_id, &ApiError::payload_too_large(limit))
            }
            Err(BodyError::Read(m)) => {
                return api_error(request_id, &ApiError::bad_request(m, None))
            }
        };
        let request = match InferenceRequest::parse(endpoint, &body) {
            Ok(r) => r,
            Err(e) => return api_error(request_id, &ApiError::invalid_request(e)),
        };
        if let Err(e) = infer::ledger_gate(shared, "http") {
            return api_error(request_id, &e);
        }
        if let Err(wait_s) = shared.auth.limiter.admit(&key, Instant::now()) {
            let mut r = api_error(
                request_id,
                &ApiError::rate_limited(format!(
                    "rate limit reached for key {} ({} requests/min, {} tokens/min)",
                    key.prefix, key.requests_per_minute, key.tokens_per_minute
                )),
            );
            if let Ok(v) = HeaderValue::from_str(&wait_s.to_string()) {
                r.headers_mut().insert(hyper::header::RETRY_AFTER, v);
            }
            shared
                .metrics
                .inference_requests
                .get_or_create(&crate::metrics::labels([
                    ("api", "http"),
                    ("outcome", "rate_limited"),
                ]))
                .inc();
            return r;
        }
        // Held until the response (or the stream) ends, however it ends.
        let stream_cap = match infer::acquire_stream(shared, &key, "http") {
            Ok(g) => g,
            Err(r) => return api_error(request_id, &r.api_error()),
        };
        // The node gets the body as the client sent it (it knows the endpoint from its shape).
        let raw = String::from_utf8_lossy(&body).into_owned();
        let mut stream = match infer::dispatch(shared, &request, &raw, &client).await {
            Ok(s) => s,
            Err(e) => {
                let outcome = match e.status {
                    403 => "geofence",
                    404 => "model_not_found",
                    429 => "saturated",
                    _ if e.code.as_deref() == Some(openai::MODEL_UNAVAILABLE) => {
                        "model_unavailable"
                    }
                    _ => "error",
                };
                infer::meter(
                    shared,
                    Metering {
                        key: &key,
                        request_id,
                        model: &request.model,
                        api: "http",
                        node: None,
                        outcome,
                        usage: Usage::default(),
                        reported: None,
                        ttft: None,
                        started,
                        bytes: 0,
                    },
                );
                return api_error(request_id, &e);
            }
        };
        // Revoking the key ends the stream in band (`key_revoked`) and resets the node's stream.
        stream.end_on_revocation(shared.auth.keys.revocation(&key.id));
        let created = crate::clock::system_unix_ms() / 1000;
        let completion_id = match endpoint {
            Endpoint::Chat => format!(
                "chatcmpl-{}",
                &request_id[request_id.len().saturating_sub(24)..]
            ),
            Endpoint::Completion => format!(
                "cmpl-{}",
                &request_id[request_id.len().saturating_sub(24)..]
            ),
        };
        let model = request.model.clone();
        if !request.stream {
            let mut text = String::new();
            let (outcome, finish, usage, err) = loop {
                match stream.next().await {
                    StreamEvent::Token(t) => text.push_str(&t),
                    StreamEvent::Done {
                        finish_reason,
                        usage,
                    } => break ("ok", finish_reason, usage, None),
                    StreamEvent::Failed(e) => {
                        break ("error", String::new(), Usage::default(), Some(e))
                    }
                }
            };
            let ttft = stream.ttft;
            let node = stream.node.clone();
            let reported = stream.reported();
            drop(stream);
            drop(stream_cap);
            let body = match &err {
                None => openai::completion_response(
                    endpoint,
                    &completion_id,
                    created,
                    &model,
                    &text,
                    &finish,
                    usage,
                ),
                Some(_) => String::new(),
            };
            infer::meter(
                shared,
                Metering {
                    key: &key,
                    request_id,
                    model: &model,
                    api: "http",
                    node: Some(&node),
                    outcome,
                    usage,
                    reported,
                    ttft: Some(ttft),
                    started,
                    bytes: body.len() as u64,
                },
            );
            return match err {
                None => with_type(StatusCode::OK, "application/json", body),
                Some(e) => api_error(request_id, &e),
            };
        }
        // Streaming: headers go out now; tokens follow as they arrive from the node.
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let include_usage = request.include_usage;
        let shared2 = shared.clone();
        let request_id2 = request_id.to_string();
        tokio::spawn(
            async move {
                let renderer = StreamRenderer::new(endpoint, &completion_id, created, &model);
                let mut bytes = 0u64;
                let _stream_cap = stream_cap;
                let mut last = Instant::now();
                let mut first = true;
                let outcome = 'pump: {
                    if let Some(role) = renderer.role_event() {
                        bytes += role.len() as u64;
                        if tx.send(role).await.is_err() {
                            break 'pump "cancelled";
                        }
                    }
                    loop {
                        let ev = tokio::select! {
                            ev = stream.next() => ev,
                            _ = tx.closed() => break 'pump "cancelled",
                        };
                        match ev {
                            StreamEvent::Token(t) => {
                                let now = Instant::now();
                                if !first {
                                    shared2
                                        .metrics
                                        .inter_token_ms
                                        .observe((now - last).as_secs_f64() * 1000.0);
                                }
                                first = false;
                                last = now;
                                let ev = renderer.token_event(&t);
                                bytes += ev.len() as u64;
                                if tx.send(ev).await.is_err() {
                                    break 'pump "cancelled";
                                }
                            }
                            StreamEvent::Done {
                                finish_reason,
                                usage,
                            } => {
                                let mut out = vec![renderer.finish_event(&finish_reason)];
                                if include_usage {
                                    out.push(renderer.usage_event(usage));
                                }
                                out.push(Bytes::from_static(openai::SSE_DONE.as_bytes()));
                                for b in out {
                                    bytes += b.len() as u64;
                                    if tx.send(b).await.is_err() {
                                        break 'pump "cancelled";
                                    }
                                }
                                break 'pump "ok";
                            }
                            StreamEvent::Failed(e) => {
                                let _ = tx.send(e.sse_event()).await;
                                break 'pump "error";
                            }
                        }
                    }
                };
                if outcome == "cancelled" {
                    stream.cancel();
                    tracing::info!("client went away; generation cancelled on the node");
                }
                // Billed from what was relayed, also when the stream ended early.
                let usage = stream.billed();
                let reported = stream.reported();
                let ttft = stream.ttft;
                let node = stream.node.clone();
                drop(stream);
                infer::meter(
                    &shared2,
                    Metering {
                        key: &key,
                        request_id: &request_id2,
                        model: &model,
                        api: "http",
                        node: Some(&node),
                        outcome,
                        usage,
                        reported,
                        ttft: Some(ttft),
                        started,
                        bytes,
                    },
                );
            }
            .in_current_span(),
        );
        let mut r = Response::new(Body::Channel(rx));
        let h = r.headers_mut();
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
        r
    }
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
