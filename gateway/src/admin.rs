//! The admin HTTP API (Bearer admin token), `/metrics` and `/healthz`, on the admin listener.
//!
//! `/healthz` and `/metrics` need no token: the admin listener belongs on an internal network,
//! where Prometheus scrapes without credentials.

use crate::access;
use crate::clock::SharedClock;
use crate::components::{Auth, Directory, Placement, Sessions};
use crate::federation::directory::FleetView;
use crate::http_util::{
    bearer, ct_eq, error, json, read_body, with_type, BodyError, Handler, Resp,
};
use crate::metrics::labels;
use crate::metrics::Metrics;
use crate::registry::{ControlCmd, Revocation};
use crate::store::{ApiKeyUpdate, KycStatus, Store, StoreError};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn, Instrument};

/// The largest admin request body: room for an API key's longest allow-list (256 entries of
/// 256 bytes, escaped) with the rest of the key.
const ADMIN_BODY_LIMIT: usize = 160 * 1024;

/// The components the admin API uses.
pub struct AdminParts {
    /// Live nodes: listing, drain, revocation.
    pub directory: Arc<Directory>,
    /// GeoIP reloads and the geofence's classes.
    pub placement: Arc<Placement>,
    /// Operators, tokens, keys, GPU models, SLA, penalties, usage.
    pub store: Arc<dyn Store>,
    /// The API key cache, forgotten when keys change.
    pub auth: Arc<Auth>,
    /// The live game sessions, listed.
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
}

/// The settings the admin API reads, from `[admin]`, `[nodes]`, `[inference]`, `[geofence]`.
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// The admin Bearer token; none disables `/admin`.
    pub token: Option<String>,
    pub drain_deadline_ms: u64,
    pub default_requests_per_minute: u32,
    pub default_tokens_per_minute: u32,
    pub controlled_gpu_classes: Vec<String>,
}

impl AdminSettings {
    pub fn from_config(c: &nearpath_config::GatewayConfig) -> Self {
        AdminSettings {
            token: c.admin.token.clone(),
            drain_deadline_ms: c.nodes.drain_deadline_ms,
            default_requests_per_minute: c.inference.default_requests_per_minute,
            default_tokens_per_minute: c.inference.default_tokens_per_minute,
            controlled_gpu_classes: c.geofence.controlled_gpu_classes.clone(),
        }
    }
}

/// What `GET /admin/gateway` says about the answering gateway beyond its id and version.
#[derive(Debug, Clone)]
pub struct GatewayInfo {
    /// SHA-256 of the QUIC certificate (DER), lowercase hex: the value nodes pin.
    pub cert_sha256: String,
    /// The addresses the listeners are bound to.
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub quic: SocketAddr,
}

/// The admin front end.
pub struct AdminApi {
    directory: Arc<Directory>,
    placement: Arc<Placement>,
    store: Arc<dyn Store>,
    auth: Arc<Auth>,
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    settings: AdminSettings,
    /// The other gateways' nodes, listed beside the local ones (none: local nodes only).
    fleet: Option<Arc<FleetView>>,
    /// This gateway's certificate pin and listeners (none: `GET /admin/gateway` shows nulls).
    info: Option<GatewayInfo>,
}

impl AdminApi {
    pub fn new(config: &nearpath_config::GatewayConfig, parts: AdminParts) -> Self {
        Self::with_settings(AdminSettings::from_config(config), parts)
    }

    pub fn with_settings(settings: AdminSettings, parts: AdminParts) -> Self {
        let AdminParts {
            directory,
            placement,
            store,
            auth,
            sessions,
            metrics,
            clock,
        } = parts;
        AdminApi {
            directory,
            placement,
            store,
            auth,
            sessions,
            metrics,
            clock,
            settings,
            fleet: None,
            info: None,
        }
    }

    /// Answers `GET /admin/gateway` with `info` (the certificate pin and listeners).
    pub fn with_gateway_info(mut self, info: GatewayInfo) -> Self {
        self.info = Some(info);
        self
    }

    /// Lists the federation's remote nodes (from `fleet`) beside the local ones.
    pub fn with_fleet(mut self, fleet: Arc<FleetView>) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// This gateway's id in the federation.
    fn self_id(&self) -> String {
        self.fleet
            .as_ref()
            .map(|f| f.self_id().to_string())
            .unwrap_or_else(|| crate::federation::directory::STANDALONE_ID.to_string())
    }

    /// Whether `presented` is the admin token. No token configured means nobody is admin.
    fn authorised(&self, presented: Option<&str>) -> bool {
        let expected = self.settings.token.as_deref().unwrap_or("");
        matches!(presented, Some(t) if !expected.is_empty() && ct_eq(t.as_bytes(), expected.as_bytes()))
    }
}

impl Handler for AdminApi {
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Resp> + Send>> {
        Box::pin(async move {
            let request_id = access::client_request_id(
                req.headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok()),
            )
            .unwrap_or_else(access::new_request_id);
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            let started = self.clock.now();
            let span = tracing::info_span!("admin_request", id = %request_id, method = %method, path = %path);
            let mut resp = self.route(req).instrument(span).await;
            if let Ok(v) = hyper::header::HeaderValue::from_str(&request_id) {
                resp.headers_mut().insert("x-request-id", v);
            }
            let status = resp.status();
            let line = access::AccessLine {
                entry: "admin",
                method: method.as_str(),
                path: &path,
                status: status.as_u16(),
                request_id: &request_id,
                duration_ms: u64::try_from(
                    self.clock
                        .now()
                        .saturating_duration_since(started)
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
                outcome: if status.is_success() { "ok" } else { "error" },
                ..access::AccessLine::default()
            };
            // Scrapes and probes come every few seconds and say nothing: debug, not info.
            if method == Method::GET && (path == "/metrics" || path == "/healthz") {
                line.emit_debug();
            } else {
                line.emit();
            }
            resp
        })
    }
}

fn store_error(e: StoreError) -> Resp {
    match &e {
        StoreError::NotFound { .. } => error(StatusCode::NOT_FOUND, "not_found", &e.to_string()),
        StoreError::Invalid { .. } => error(StatusCode::BAD_REQUEST, "invalid", &e.to_string()),
        _ if e.is_retryable() => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_busy",
            &e.to_string(),
        ),
        _ => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            &e.to_string(),
        ),
    }
}

/// A node of another gateway as `/admin/nodes` lists it: its node directory entry, with `id`,
/// a `state` (`active` while it accepts sessions, else `draining`) and `remote: true`.
fn remote_node_view(n: crate::store::NodeDirEntry) -> Value {
    let state = if n.accepting { "active" } else { "draining" };
    let id = n.node_id.clone();
    let mut v = serde_json::to_value(n).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), Value::from(id));
        o.insert("state".into(), Value::from(state));
        o.insert("remote".into(), Value::Bool(true));
    }
    v
}

/// Runs a store call off the async threads.
async fn blocking<T: Send + 'static>(
    api: &AdminApi,
    f: impl FnOnce(&dyn crate::store::Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Resp> {
    let store = api.store.clone();
    match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_error(e)),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        )),
    }
}

async fn json_body<T: for<'de> Deserialize<'de> + Default>(
    req: Request<Incoming>,
) -> Result<T, Resp> {
    let bytes = read_body(req.into_body(), ADMIN_BODY_LIMIT)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("request body is larger than {limit} bytes"),
            ),
            BodyError::Read(m) => error(StatusCode::BAD_REQUEST, "bad_body", &m),
        })?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            &format!("invalid JSON body: {e}"),
        )
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewOperator {
    name: String,
    #[serde(default)]
    kyc_status: Option<KycStatus>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewApiKey {
    tenant: String,
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u32>,
    /// Per-key caps; absent means the gateway-wide default.
    #[serde(default)]
    max_concurrent_streams: Option<u32>,
    #[serde(default)]
    max_concurrent_sessions: Option<u32>,
    #[serde(default)]
    session_starts_per_minute: Option<u32>,
    /// The key's policy (allow-list, expiry, budgets), checked by [`policy_update`] so that a
    /// wrong type or value is a 400 naming the field; `null` is the same as absent.
    #[serde(default)]
    allowed_models: Option<Value>,
    #[serde(default)]
    expires_at_ms: Option<Value>,
    #[serde(default)]
    budget_tokens_per_day: Option<Value>,
    #[serde(default)]
    budget_tokens_per_month: Option<Value>,
    #[serde(default)]
    budget_usd_per_day: Option<Value>,
    #[serde(default)]
    budget_usd_per_month: Option<Value>,
}

/// `PATCH /admin/api-keys/{id}`: absent fields stay as they are; a cap set to `null` goes back
/// to the gateway-wide default.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApiKeyPatch {
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    max_concurrent_streams: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    max_concurrent_sessions: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    session_starts_per_minute: Option<Option<u32>>,
    /// Policy fields: `null` (or `[]` for the allow-list) removes the restriction.
    #[serde(default, deserialize_with = "present")]
    allowed_models: Option<Option<Value>>,
    #[serde(default, deserialize_with = "present")]
    expires_at_ms: Option<Option<Value>>,
    #[serde(default, deserialize_with = "present")]
    budget_tokens_per_day: Option<Option<Value>>,
    #[serde(default, deserialize_with = "present")]
    budget_tokens_per_month: Option<Option<Value>>,
    #[serde(default, deserialize_with = "present")]
    budget_usd_per_day: Option<Option<Value>>,
    #[serde(default, deserialize_with = "present")]
    budget_usd_per_month: Option<Option<Value>>,
}

/// Tells `null` (`Some(None)`) from an absent field (`None`, through `#[serde(default)]`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The policy fields of a key body as JSON values: absent (`None`), `null` (`Some(None)`) or
/// a value.
#[derive(Default)]
struct PolicyFields {
    allowed_models: Option<Option<Value>>,
    expires_at_ms: Option<Option<Value>>,
    budget_tokens_per_day: Option<Option<Value>>,
    budget_tokens_per_month: Option<Option<Value>>,
    budget_usd_per_day: Option<Option<Value>>,
    budget_usd_per_month: Option<Option<Value>>,
}

fn invalid(field: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        field,
        message: message.into(),
    }
}

/// A whole non-negative number (`1000` or `1e3`), at most `max`.
fn whole_number(field: &'static str, v: &Value, what: &str, max: u64) -> Result<u64, StoreError> {
    let n = match v.as_u64() {
        Some(n) => Some(n),
        None => v
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f <= max as f64)
            .map(|f| f as u64),
    };
    match n {
        Some(n) if n <= max => Ok(n),
        _ => Err(invalid(
            field,
            format!("{v} is not {what} (a whole number from 0 to {max})"),
        )),
    }
}

/// Checks the policy fields of a create or patch body and turns them into the store's update,
/// naming the field of the first problem (wrong type, negative or non-finite budget, an
/// allow-list entry that is empty, over 256 bytes or not a string, over 256 entries).
fn policy_update(f: PolicyFields) -> Result<ApiKeyUpdate, StoreError> {
    use crate::store::{check_allowed_models, MAX_TOKEN_BUDGET};
    let allowed_models = match f.allowed_models {
        None => None,
        Some(None) => Some(Vec::new()),
        Some(Some(Value::Array(items))) => {
            let mut list = Vec::with_capacity(items.len().min(crate::store::MAX_ALLOWED_MODELS));
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => list.push(s.clone()),
                    other => {
                        return Err(invalid(
                            "allowed_models",
                            format!("entry {i} ({other}) is not a string"),
                        ))
                    }
                }
            }
            check_allowed_models(&list)?;
            Some(list)
        }
        Some(Some(other)) => {
            return Err(invalid(
                "allowed_models",
                format!("{other} is not a list of model names"),
            ))
        }
    };
    let tokens = |field: &'static str, v: Option<Option<Value>>| {
        v.map(|v| {
            v.map(|v| whole_number(field, &v, "a number of tokens", MAX_TOKEN_BUDGET))
                .transpose()
        })
        .transpose()
    };
    let usd = |field: &'static str, v: Option<Option<Value>>| {
        v.map(|v| {
            v.map(|v| match v.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 => Ok(x),
                _ => Err(invalid(
                    field,
                    format!("{v} is not an amount of US dollars (a finite number, 0 or more)"),
                )),
            })
            .transpose()
        })
        .transpose()
    };
    Ok(ApiKeyUpdate {
        allowed_models,
        expires_at_ms: f
            .expires_at_ms
            .map(|v| {
                v.map(|v| {
                    whole_number(
                        "expires_at_ms",
                        &v,
                        "a Unix time in milliseconds",
                        i64::MAX as u64,
                    )
                })
                .transpose()
            })
            .transpose()?,
        budget_tokens_per_day: tokens("budget_tokens_per_day", f.budget_tokens_per_day)?,
        budget_tokens_per_month: tokens("budget_tokens_per_month", f.budget_tokens_per_month)?,
        budget_usd_per_day: usd("budget_usd_per_day", f.budget_usd_per_day)?,
        budget_usd_per_month: usd("budget_usd_per_month", f.budget_usd_per_month)?,
        ..Default::default()
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClassifyGpuModel {
    model: String,
    class: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    #[serde(default)]
    deadline_ms: Option<u64>,
}

fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl AdminApi {
    async fn route(&self, req: Request<Incoming>) -> Resp {
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        match (&method, segs.as_slice()) {
            (&Method::GET, ["healthz"]) => {
                return json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ok", "nodes": self.directory.registry.len()}),
                )
            }
            (&Method::GET, ["metrics"]) => return self.metrics(),
            _ => {}
        }
        if segs.first() != Some(&"admin") {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no route for {method} {path}"),
            );
        }
        if !self.authorised(bearer(&req)) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong admin Bearer token",
            );
        }
        let s = self;
        let result: Result<Resp, Resp> = async {
            Ok(match (&method, &segs[1..]) {
                (&Method::GET, ["nodes"]) => {
                    let registry = &s.directory.registry;
                    let self_id = s.self_id();
                    let mut nodes: Vec<_> = registry
                        .list()
                        .iter()
                        .map(|n| {
                            let mut v = registry.node_view(n);
                            if let Some(o) = v.as_object_mut() {
                                o.insert("gateway_id".into(), Value::from(self_id.clone()));
                                o.insert("remote".into(), Value::Bool(false));
                            }
                            v
                        })
                        .collect();
                    // Nodes of the other live gateways, from the node directory (up to one
                    // publish interval old): the whole fleet from any gateway.
                    if let Some(fleet) = &s.fleet {
                        nodes.extend(fleet.remote_nodes(s.clock.unix_ms()).into_iter().map(remote_node_view));
                    }
                    // Requests waiting for a slot, per model (queued admission).
                    let queues: serde_json::Map<_, _> = registry
                        .slot_queue()
                        .depths()
                        .into_iter()
                        .map(|(m, d)| (m, serde_json::Value::from(d)))
                        .collect();
                    json(StatusCode::OK, &serde_json::json!({"object": "list", "data": nodes, "queue_depth": queues}))
                }
                (&Method::GET, ["nodes", id]) => {
                    let id = id.to_string();
                    let live = s.directory.registry.get(&id).map(|n| s.directory.registry.node_view(&n));
                    let id2 = id.clone();
                    // A node id belongs to one operator: its SLA record is that operator's.
                    let (owner, sla, stored, checks, penalties) = blocking(s, move |st| {
                        let owner = st.node_owner(&id2)?;
                        let sla = match &owner {
                            Some(op) => st.sla_get(op, &id2)?,
                            None => None,
                        };
                        let stored = st.load_verification(&id2)?;
                        let checks = st.checks_of(&id2, 20)?;
                        // The events behind `sla.penalty_events` (an impossible claim among
                        // them), newest first.
                        let penalties = st.list_penalties(Some(&id2), 20)?;
                        Ok((owner, sla, stored, checks, penalties))
                    })
                    .await?;
                    // The live verdict when the node is here; else what the store remembers.
                    let verification = live
                        .as_ref()
                        .and_then(|v| v.get("verification").cloned())
                        .or_else(|| {
                            stored.map(|snap| {
                                let reasons: serde_json::Value = serde_json::from_str(&snap.reasons_json).unwrap_or_default();
                                serde_json::json!({"state": snap.state, "reasons": reasons, "checked_at_ms": snap.at_ms, "live": false})
                            })
                        });
                    let checks: Vec<serde_json::Value> = checks
                        .into_iter()
                        .map(|c| {
                            let detail: serde_json::Value = serde_json::from_str(&c.detail_json).unwrap_or_default();
                            serde_json::json!({"gateway_id": c.gateway_id, "kind": c.kind, "state": c.state, "at_ms": c.at_ms, "detail": detail})
                        })
                        .collect();
                    // Attached to another live gateway: its node directory entry.
                    let remote = match (&live, &s.fleet) {
                        (None, Some(fleet)) => fleet.remote_nodes(s.clock.unix_ms()).into_iter().find(|n| n.node_id == id).map(remote_node_view),
                        _ => None,
                    };
                    if live.is_none() && remote.is_none() && sla.is_none() && owner.is_none() {
                        return Err(error(StatusCode::NOT_FOUND, "not_found", &format!("no node {id}")));
                    }
                    json(StatusCode::OK, &serde_json::json!({"id": id, "operator_id": owner, "live": live, "remote": remote, "sla": sla, "penalties": penalties, "verification": verification, "checks": checks}))
                }
                (&Method::GET, ["gpu-models"]) => {
                    let list = blocking(s, |st| st.list_gpu_models()).await?;
                    let data: Vec<_> = list
                        .into_iter()
                        .map(|m| {
                            let controlled = m.class.as_deref().map(|c| s.placement.policy.is_controlled(s.placement.policy.class_id(c)));
                            serde_json::json!({
                                "model_key": m.model_key,
                                "example": m.example,
                                "class": m.class,
                                "status": if m.class.is_some() { "classified" } else { "unclassified" },
                                "controlled": controlled,
                                "first_seen_at_ms": m.first_seen_at_ms,
                                "last_seen_at_ms": m.last_seen_at_ms,
                                "seen": m.seen,
                                "classified_at_ms": m.classified_at_ms,
                            })
                        })
                        .collect();
                    json(StatusCode::OK, &serde_json::json!({"object": "list", "data": data}))
                }
                (&Method::POST, ["gpu-models"]) => {
                    let body: ClassifyGpuModel = json_body(req).await?;
                    let key = crate::gpu_class::normalize_model(&body.model);
                    if key.is_empty() {
                        return Err(error(StatusCode::BAD_REQUEST, "invalid", &format!("model: {:?} names no GPU model once vendor, form-factor and memory words are removed", body.model)));
                    }
                    if key.len() > 128 || body.model.len() > 256 {
                        return Err(error(StatusCode::BAD_REQUEST, "invalid", "model: longer than 256 bytes"));
                    }
                    let class = body.class.trim().to_ascii_lowercase();
                    if !nearpath_config::is_gpu_class_name(&class) || class == crate::gpu_class::UNCLASSIFIED {
                        return Err(error(StatusCode::BAD_REQUEST, "invalid", &format!("class: {:?} is not a GPU class name (lower-case letters, digits and _)", body.class)));
                    }
                    let known = s.settings.controlled_gpu_classes.iter().any(|c| s.placement.policy.class_id(c) == s.placement.policy.class_id(&class))
                        || crate::gpu_class::GPU_MODEL_TABLE.iter().any(|(_, c)| *c == class);
                    let controlled = s.placement.policy.is_controlled(s.placement.policy.class_id(&class));
                    let (model, class2) = (body.model.clone(), class.clone());
                    let now_ms = s.clock.unix_ms();
                    let rec = blocking(s, move |st| st.set_gpu_model_class(&key, &model, &class2, now_ms)).await?;
                    info!(model = %rec.model_key, class = %class, controlled, "GPU model classified by admin");
                    json(StatusCode::OK, &serde_json::json!({
                        "model_key": rec.model_key,
                        "example": rec.example,
                        "class": rec.class,
                        "controlled": controlled,
                        "known_class": known,
                        "note": "applies to registrations from now on; connected nodes keep their classes until they reconnect",
                    }))
                }
                (&Method::POST, ["nodes", id, "drain"]) => {
                    let body: DrainBody = json_body(req).await?;
                    let node = s.directory.registry.get(id).ok_or_else(|| error(StatusCode::NOT_FOUND, "not_found", &format!("no live node {id}")))?;
                    let deadline_ms = body.deadline_ms.unwrap_or(s.settings.drain_deadline_ms);
                    node.commands
                        .send(ControlCmd::Drain { deadline_ms })
                        .await
                        .map_err(|_| error(StatusCode::CONFLICT, "gone", "the node is disconnecting"))?;
                    info!(node = %id, deadline_ms, "drain requested by admin");
                    json(StatusCode::ACCEPTED, &serde_json::json!({"id": id, "state": "draining", "deadline_ms": deadline_ms}))
                }
                (&Method::GET, ["gateway"]) => {
                    let info = s.info.as_ref();
                    json(StatusCode::OK, &serde_json::json!({
                        "id": s.self_id(),
                        "version": env!("CARGO_PKG_VERSION"),
                        "cert_sha256": info.map(|i| i.cert_sha256.clone()),
                        "listen": {
                            "http": info.map(|i| i.http.to_string()),
                            "admin": info.map(|i| i.admin.to_string()),
                            "quic": info.map(|i| i.quic.to_string()),
                        },
                    }))
                }
                (&Method::GET, ["gateways"]) => {
                    let (gateways, nodes) = blocking(s, |st| Ok((st.list_gateways()?, st.list_node_directory()?))).await?;
                    let now_ms = s.clock.unix_ms();
                    let data = crate::federation::directory::statuses(gateways, &nodes, now_ms);
                    json(StatusCode::OK, &serde_json::json!({"object": "list", "self": s.self_id(), "data": data}))
                }
                (&Method::GET, ["sla"]) => {
                    let list = blocking(s, |st| st.sla_list()).await?;
                    json(StatusCode::OK, &serde_json::json!({"object": "list", "data": list}))
                }
                (&Method::GET, ["operators"]) => {
                    let list = blocking(s, |st| st.list_operators()).await?;
                    json(StatusCode::OK, &serde_json::json!({"object": "list", "data": list}))
                }
                (&Method::POST, ["operators"]) => {
                    let body: NewOperator = json_body(req).await?;
                    let kyc = body.kyc_status.unwrap_or(KycStatus::Pending);
                    let op = blocking(s, move |st| st.create_operator(&body.name, kyc)).await?;
                    json(StatusCode::CREATED, &op)
                }
                (&Method::GET, ["operators", id]) => {
                    let id = id.to_string();
                    let id2 = id.clone();
                    let op = blocking(s, move |st| st.get_operator(&id2)).await?
                        .ok_or_else(|| error(StatusCode::NOT_FOUND, "not_found", &format!("no operator {id}")))?;
                    let id3 = id.clone();
                    let tokens = blocking(s, move |st| st.list_enrolment_tokens(&id3)).await?;
                    let nodes: Vec<_> = s.directory.registry.of_operator(&id).iter().map(|n| n.id.clone()).collect();
                    json(StatusCode::OK, &serde_json::json!({"operator": op, "tokens": tokens, "live_nodes": nodes}))
                }
                (&Method::POST, ["operators", id, action @ ("verify" | "suspend" | "reset")]) => {
                    let status = match *action {
                        "verify" => KycStatus::Verified,
                        "suspend" => KycStatus::Suspended,
                        _ => KycStatus::Pending,
                    };
                    let id = id.to_string();
                    let id2 = id.clone();
                    let op = blocking(s, move |st| st.set_operator_kyc(&id2, status)).await?;
                    // A suspended (or unverified) operator's nodes leave now, not at their next
                    // reconnect.
                    if let Some(revocation) = Revocation::of_operator(&id, status) {
                        let nodes = s.directory.registry.of_operator(&id);
                        warn!(operator = %id, status = status.as_str(), nodes = nodes.len(), "disconnecting the operator's nodes");
                        s.directory.registry.revoke(nodes, revocation);
                    }
                    json(StatusCode::OK, &op)
                }
                (&Method::POST, ["operators", id, "tokens"]) => {
                    let id = id.to_string();
                    let (tok, secret) = blocking(s, move |st| st.create_enrolment_token(&id)).await?;
                    json(StatusCode::CREATED, &serde_json::json!({"token": secret, "info": tok, "note": "the token is shown once; store it in the node's config"}))
                }
                (&Method::POST, ["tokens", id, "revoke"]) => {
                    let id = id.to_string();
                    let id2 = id.clone();
                    blocking(s, move |st| st.revoke_enrolment_token(&id2)).await?;
                    // Nodes admitted with the token lose their admission with it.
                    let nodes = s.directory.registry.of_enrolment_token(&id);
                    let disconnected: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
                    warn!(token = %id, nodes = nodes.len(), "enrolment token revoked; disconnecting its nodes");
                    s.directory.registry.revoke(nodes, Revocation::token_revoked(format!("enrolment token {id} was revoked")));
                    json(StatusCode::OK, &serde_json::json!({"revoked": true, "disconnected_nodes": disconnected}))
                }
                (&Method::GET, ["penalties"]) => {
                    let node = query_param(&req, "node").map(|s| s.to_string());
                    let list = blocking(s, move |st| st.list_penalties(node.as_deref(), 1000)).await?;
                    json(StatusCode::OK, &serde_json::json!({"object": "list", "data": list}))
                }
                (&Method::GET, ["api-keys"]) => {
                    let list = blocking(s, |st| st.list_api_keys()).await?;
                    json(StatusCode::OK, &serde_json::json!({"object": "list", "data": list}))
                }
                (&Method::POST, ["api-keys"]) => {
                    let body: NewApiKey = json_body(req).await?;
                    let rpm = body.requests_per_minute.unwrap_or(s.settings.default_requests_per_minute);
                    let tpm = body.tokens_per_minute.unwrap_or(s.settings.default_tokens_per_minute);
                    let now_ms = s.clock.unix_ms();
                    // Everything is checked before the key exists.
                    let update = policy_update(PolicyFields {
                        allowed_models: body.allowed_models.map(Some),
                        expires_at_ms: body.expires_at_ms.map(Some),
                        budget_tokens_per_day: body.budget_tokens_per_day.map(Some),
                        budget_tokens_per_month: body.budget_tokens_per_month.map(Some),
                        budget_usd_per_day: body.budget_usd_per_day.map(Some),
                        budget_usd_per_month: body.budget_usd_per_month.map(Some),
                    })
                    .and_then(|u| match u.expires_at_ms {
                        Some(Some(at)) if at <= now_ms => Err(invalid(
                            "expires_at_ms",
                            format!("{at} ({}) is not in the future (now is {now_ms})", crate::auth::rfc3339_ms(at)),
                        )),
                        _ => Ok(u),
                    })
                    .map_err(store_error)?;
                    let update = ApiKeyUpdate {
                        max_concurrent_streams: body.max_concurrent_streams.map(Some),
                        max_concurrent_sessions: body.max_concurrent_sessions.map(Some),
                        session_starts_per_minute: body.session_starts_per_minute.map(Some),
                        ..update
                    };
                    let (key, secret) = blocking(s, move |st| {
                        // A cap of 0 is refused before the key exists.
                        st.create_api_key(&body.tenant, rpm, tpm).and_then(|(key, secret)| {
                            if update == ApiKeyUpdate::default() {
                                return Ok((key, secret));
                            }
                            match st.update_api_key(&key.id, update) {
                                Ok(key) => Ok((key, secret)),
                                Err(e) => {
                                    let _ = st.revoke_api_key(&key.id);
                                    Err(e)
                                }
                            }
                        })
                    })
                    .await?;
                    json(StatusCode::CREATED, &serde_json::json!({"key": secret, "info": key, "note": "the key is shown once"}))
                }
                (&Method::GET, ["api-keys", id]) => {
                    let key = s.api_key(id).await?;
                    json(StatusCode::OK, &key)
                }
                (&Method::GET, ["api-keys", id, "usage"]) => {
                    let key = s.api_key(id).await?;
                    let range = usage_range(query_param(&req, "from"), query_param(&req, "to"), s.clock.unix_ms())
                        .map_err(|m: String| error(StatusCode::BAD_REQUEST, "invalid", &m))?;
                    s.key_usage(key, range).await?
                }
                (&Method::PATCH, ["api-keys", id]) => {
                    let body: ApiKeyPatch = json_body(req).await?;
                    let update = policy_update(PolicyFields {
                        allowed_models: body.allowed_models,
                        expires_at_ms: body.expires_at_ms,
                        budget_tokens_per_day: body.budget_tokens_per_day,
                        budget_tokens_per_month: body.budget_tokens_per_month,
                        budget_usd_per_day: body.budget_usd_per_day,
                        budget_usd_per_month: body.budget_usd_per_month,
                    })
                    .map_err(store_error)?;
                    let update = ApiKeyUpdate {
                        requests_per_minute: body.requests_per_minute,
                        tokens_per_minute: body.tokens_per_minute,
                        max_concurrent_streams: body.max_concurrent_streams,
                        max_concurrent_sessions: body.max_concurrent_sessions,
                        session_starts_per_minute: body.session_starts_per_minute,
                        ..update
                    };
                    let id = id.to_string();
                    let key = blocking(s, move |st| st.update_api_key(&id, update)).await?;
                    // Cached keys carry their limits: the change applies from the next request.
                    // An expiry set in the past ends new requests at once; running ones go on.
                    s.auth.keys.clear();
                    json(StatusCode::OK, &key)
                }
                (&Method::POST, ["api-keys", id, "revoke"]) => {
                    let id = id.to_string();
                    let id2 = id.clone();
                    blocking(s, move |st| st.revoke_api_key(&id2)).await?;
                    // The cache forgets the key and its running sessions and streams end now.
                    s.auth.keys.revoke(&id);
                    warn!(key = %id, "API key revoked; ending its sessions");
                    json(StatusCode::OK, &serde_json::json!({"revoked": true}))
                }
                (&Method::GET, ["usage"]) => {
                    let since = match query_param(&req, "since_ms") {
                        None => None,
                        Some(v) => Some(v.parse::<u64>().map_err(|_| error(StatusCode::BAD_REQUEST, "invalid", &format!("since_ms: {v:?} is not a number")))?),
                    };
                    let summary = blocking(s, move |st| st.usage_summary(since)).await?;
                    json(StatusCode::OK, &summary)
                }
                (&Method::POST, ["geo", "reload"]) => {
                    let geo = s.placement.geo.clone();
                    let r = tokio::task::spawn_blocking(move || geo.reload()).await;
                    match r {
                        Ok(Ok(report)) => {
                            s.metrics.geo_reloads.get_or_create(&labels([("outcome", "ok")])).inc();
                            json(StatusCode::OK, &serde_json::json!({"reloaded": true, "report": report, "info": s.placement.geo.info()}))
                        }
                        Ok(Err(e)) => {
                            s.metrics.geo_reloads.get_or_create(&labels([("outcome", "error")])).inc();
                            error(StatusCode::UNPROCESSABLE_ENTITY, "geo_reload_failed", &format!("{e}; the previous database stays in use"))
                        }
                        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
                    }
                }
                (&Method::GET, ["geo"]) => json(StatusCode::OK, &s.placement.geo.info()),
                (&Method::GET, ["sessions"]) => {
                    use std::sync::atomic::Ordering::Relaxed;
                    let list: Vec<_> = s
                        .sessions
                        .games
                        .list()
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "id": r.session_id,
                                "game": r.game,
                                "tenant": r.tenant,
                                "transport": r.transport,
                                "client": r.client_addr,
                                "client_stats": *r.client_stats.lock().unwrap_or_else(|p| p.into_inner()),
                                "node": r.node_id(),
                                "age_ms": r.started.elapsed().as_millis() as u64,
                                "frames": r.frames.load(Relaxed),
                                "bytes": r.bytes.load(Relaxed),
                                "dropped_late": r.dropped_late.load(Relaxed),
                                "dropped": {
                                    "late": r.dropped_late.load(Relaxed),
                                    "overload": r.dropped_overload.load(Relaxed),
                                    "shed": r.dropped_shed.load(Relaxed),
                                    "foreign": r.dropped_foreign.load(Relaxed),
                                    "relay": r.dropped_relay.load(Relaxed),
                                },
                                "audio": {
                                    "packets": r.audio_packets.load(Relaxed),
                                    "foreign": r.audio_foreign.load(Relaxed),
                                    "dropped": r.audio_dropped.load(Relaxed),
                                },
                                "in_flight_frames": r.in_flight().frames,
                                "in_flight_bytes": r.in_flight().bytes,
                                "inputs": r.inputs.load(Relaxed),
                            })
                        })
                        .collect();
                    json(StatusCode::OK, &serde_json::json!({"object": "list", "data": list}))
                }
                _ => error(StatusCode::NOT_FOUND, "not_found", &format!("no route for {method} {path}")),
            })
        }
        .await;
        result.unwrap_or_else(|e| e)
    }

    fn metrics(&self) -> Resp {
        let m = &self.metrics;
        self.sync_ledger_metrics();
        m.nodes.clear();
        let policy = &self.placement.policy;
        let mut census: std::collections::HashMap<_, i64> = Default::default();
        for ((state, country, class), n) in self.directory.registry.census() {
            let class = class_label(policy, class);
            *census.entry((state, country, class)).or_default() += n as i64;
        }
        for ((state, country, class), n) in census {
            m.nodes
                .get_or_create(&labels([
                    ("state", state.as_str()),
                    ("country", &country),
                    ("class", &class),
                ]))
                .set(n);
        }
        // Queue depths by model: a model some node registered keeps its name, any other is
        // `other`, so the label set stays bounded.
        m.inference_queue_depth.clear();
        let registry = &self.directory.registry;
        let mut depths: std::collections::HashMap<String, i64> = Default::default();
        for (model, depth) in registry.slot_queue().depths() {
            let label = m.model_label(&model, registry.serves_model(&model));
            *depths.entry(label).or_default() += depth as i64;
        }
        for (model, depth) in depths {
            m.inference_queue_depth
                .get_or_create(&labels([("model", &model)]))
                .set(depth);
        }
        m.inference_nodes_ejected
            .set(registry.ejected_count() as i64);
        with_type(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.render(),
        )
    }
}

/// The days of a usage report's daily breakdown, inclusive (days since 1970-01-01).
type DayRange = Option<(i64, i64)>;

/// `?from=YYYY-MM-DD&to=YYYY-MM-DD`: none, or a range of at most
/// [`crate::budget::MAX_REPORT_DAYS`] days (`to` defaults to today). The message names the
/// parameter at fault.
fn usage_range(from: Option<&str>, to: Option<&str>, now_ms: u64) -> Result<DayRange, String> {
    use crate::budget::{day_of, parse_day, MAX_REPORT_DAYS};
    let parse = |name: &str, v: &str| {
        parse_day(v).ok_or_else(|| {
            format!("{name}: {v:?} is not a date (YYYY-MM-DD, a real UTC calendar day from 1970)")
        })
    };
    let (from, to) = match (from, to) {
        (None, None) => return Ok(None),
        (None, Some(_)) => return Err("from: required with to".into()),
        (Some(f), t) => (
            parse("from", f)?,
            match t {
                Some(t) => parse("to", t)?,
                None => day_of(now_ms),
            },
        ),
    };
    if to < from {
        return Err(format!(
            "to: {} is before from ({})",
            crate::budget::format_day(to),
            crate::budget::format_day(from)
        ));
    }
    if to - from + 1 > MAX_REPORT_DAYS {
        return Err(format!(
            "to: the range has {} days, at most {MAX_REPORT_DAYS} allowed",
            to - from + 1
        ));
    }
    Ok(Some((from, to)))
}

/// Usage totals of a set of ledger rows: overall and by model, costed with `prices`.
fn usage_totals<'a>(
    rows: impl Iterator<Item = &'a crate::store::KeyDayUsage>,
    prices: &crate::budget::Prices,
) -> Value {
    let mut by_model: std::collections::BTreeMap<&str, (u64, u64, u64)> = Default::default();
    for r in rows {
        let e = by_model.entry(r.model.as_str()).or_default();
        e.0 += r.requests;
        e.1 = e.1.saturating_add(r.prompt_tokens);
        e.2 = e.2.saturating_add(r.completion_tokens);
    }
    let (mut requests, mut prompt, mut completion, mut cost) = (0u64, 0u64, 0u64, 0f64);
    let models: Vec<Value> = by_model
        .iter()
        .map(|(model, (n, p, c))| {
            let usd = prices.cost(model, *p, *c);
            requests += n;
            prompt = prompt.saturating_add(*p);
            completion = completion.saturating_add(*c);
            cost += usd;
            serde_json::json!({
                "model": model,
                "requests": n,
                "prompt_tokens": p,
                "completion_tokens": c,
                "total_tokens": p.saturating_add(*c),
                "cost_usd": usd,
            })
        })
        .collect();
    serde_json::json!({
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
        "cost_usd": cost,
        "by_model": models,
    })
}

impl AdminApi {
    /// The key `id`, or a 404.
    async fn api_key(&self, id: &str) -> Result<crate::store::ApiKey, Resp> {
        let list = blocking(self, |st| st.list_api_keys()).await?;
        list.into_iter().find(|k| k.id == id).ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no API key {id}"),
            )
        })
    }

    /// `GET /admin/api-keys/{id}/usage`: today's and this month's inference usage of the key
    /// (UTC), by model, with costs at the current prices, its budgets with what is left, and,
    /// for a `from`/`to` range, a daily breakdown.
    async fn key_usage(&self, key: crate::store::ApiKey, range: DayRange) -> Result<Resp, Resp> {
        use crate::budget::{
            day_of, day_start_ms, first_day_of_month, format_day, month_of, Budget,
        };
        let now_ms = self.clock.unix_ms();
        let today = day_of(now_ms);
        let month_first = first_day_of_month(month_of(now_ms));
        let id = key.id.clone();
        let (month_rows, range_rows) = blocking(self, move |st| {
            let month = st.key_usage_by_day(
                Some(&id),
                day_start_ms(month_first),
                day_start_ms(today + 1),
            )?;
            let range = match range {
                Some((from, to)) => {
                    st.key_usage_by_day(Some(&id), day_start_ms(from), day_start_ms(to + 1))?
                }
                None => Vec::new(),
            };
            Ok((month, range))
        })
        .await?;
        let prices = &self.auth.prices;
        let mut today_v = usage_totals(month_rows.iter().filter(|r| r.day == today), prices);
        today_v["date"] = format_day(today).into();
        let mut month_v = usage_totals(month_rows.iter(), prices);
        month_v["from"] = format_day(month_first).into();
        month_v["to"] = format_day(today).into();
        // The budgets show what admission checks against: the in-memory book, which holds
        // the same committed records as the store (it may lag a commit by microseconds).
        let spent = self.auth.spend.spent(&key.id, now_ms, prices);
        let p = &key.policy;
        let limits = crate::budget::Limits {
            tokens_per_day: p.budget_tokens_per_day,
            tokens_per_month: p.budget_tokens_per_month,
            usd_per_day: p.budget_usd_per_day,
            usd_per_month: p.budget_usd_per_month,
        };
        let budgets: Vec<Value> = Budget::ALL
            .iter()
            .filter_map(|b| {
                let limit = limits.of(*b)?;
                let resets = b.period().resets_at_ms(now_ms);
                let used = spent.of(*b);
                Some(serde_json::json!({
                    "budget": b.as_str(),
                    "limit": limit,
                    "spent": used,
                    "remaining": (limit - used).max(0.0),
                    "exceeded": used >= limit,
                    "resets_at": crate::auth::rfc3339_ms(resets),
                    "resets_at_ms": resets,
                }))
            })
            .collect();
        let mut body = serde_json::json!({
            "object": "api_key.usage",
            "api_key_id": key.id,
            "tenant": key.tenant,
            "now": crate::auth::rfc3339_ms(now_ms),
            "today": today_v,
            "month": month_v,
            "budgets": budgets,
            "note": "tokens are what the gateway billed (its own count); costs use the current inference.prices",
        });
        if let Some((from, to)) = range {
            let days: Vec<Value> = (from..=to)
                .map(|d| {
                    let mut v = usage_totals(range_rows.iter().filter(|r| r.day == d), prices);
                    v["date"] = format_day(d).into();
                    v
                })
                .collect();
            body["days"] = Value::Array(days);
        }
        Ok(json(StatusCode::OK, &body))
    }
}

impl AdminApi {
    /// Copies the usage writer's failure count and health into their metrics. The store counts
    /// (it has no metrics of its own); the counter only ever moves forward by the difference.
    fn sync_ledger_metrics(&self) {
        static SYNC: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = SYNC.lock().unwrap_or_else(|p| p.into_inner());
        let m = &self.metrics;
        let health = self.store.ledger_health();
        let seen = m.ledger_write_failures.get();
        if health.write_failures > seen {
            m.ledger_write_failures.inc_by(health.write_failures - seen);
        }
        m.ledger_healthy.set(i64::from(health.healthy));
    }
}

/// The `class` label of `nearpath_nodes`. The class is the node's word: label with the classes
/// the geofence names or the default GPU table knows (bounded sets), everything else is `other`.
fn class_label(policy: &nearpath_geo::Policy, class: String) -> String {
    let id = policy.class_id(&class);
    if !id.is_other() {
        policy.class_name(id).to_string()
    } else if matches!(class.as_str(), "cpu" | "unknown")
        || nearpath_config::default_gpu_class_table()
            .iter()
            .any(|p| p.class == class)
    {
        class
    } else {
        crate::metrics::OTHER.to_string()
    }
}

/// Reloads the GeoIP database files when they change on disk.
/// `every` is `geo.reload_check_interval_s`; zero turns the check off.
pub async fn geo_reload_loop(placement: Arc<Placement>, metrics: Arc<Metrics>, every: Duration) {
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let geo = placement.geo.clone();
        match tokio::task::spawn_blocking(move || geo.reload_if_changed()).await {
            Ok(Ok(report)) if report.changed() => {
                metrics
                    .geo_reloads
                    .get_or_create(&labels([("outcome", "ok")]))
                    .inc();
                info!("GeoIP database reloaded");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                metrics
                    .geo_reloads
                    .get_or_create(&labels([("outcome", "error")]))
                    .inc();
                warn!(error = %e, "GeoIP reload refused; the previous database stays in use");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(token: Option<&str>) -> AdminApi {
        let config = nearpath_config::GatewayConfig::default();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open_in_memory().unwrap());
        let metrics = Arc::new(Metrics::new());
        let clock = crate::clock::system();
        let policy = nearpath_geo::Policy::compile(&config.geofence).unwrap();
        let geo = Arc::new(nearpath_geo::GeoDb::open(&config.geo).unwrap());
        let settings = AdminSettings {
            token: token.map(str::to_string),
            ..AdminSettings::from_config(&config)
        };
        AdminApi::with_settings(
            settings,
            AdminParts {
                directory: Arc::new(Directory {
                    registry: Arc::new(crate::registry::Registry::new(Default::default()).unwrap()),
                }),
                placement: Arc::new(Placement::new(geo, policy, metrics.clone())),
                store: store.clone(),
                auth: Arc::new(Auth::new(
                    store,
                    metrics.clone(),
                    clock.clone(),
                    crate::auth::CapDefaults::from_config(&config),
                )),
                sessions: Arc::new(Sessions::default()),
                metrics,
                clock,
            },
        )
    }

    #[test]
    fn only_the_configured_admin_token_is_admin() {
        let a = api(Some("s3cret"));
        assert!(a.authorised(Some("s3cret")));
        assert!(!a.authorised(Some("s3cre")));
        assert!(!a.authorised(Some("")));
        assert!(!a.authorised(None));
    }

    #[test]
    fn without_a_configured_token_nobody_is_admin() {
        let a = api(None);
        assert!(!a.authorised(Some("")));
        assert!(!a.authorised(None));
        let a = api(Some(""));
        assert!(!a.authorised(Some("")));
    }

    #[test]
    fn a_patch_tells_null_from_an_absent_cap() {
        let p: ApiKeyPatch = serde_json::from_str(r#"{"max_concurrent_streams": null}"#).unwrap();
        assert_eq!(p.max_concurrent_streams, Some(None));
        assert_eq!(p.max_concurrent_sessions, None);
        let p: ApiKeyPatch = serde_json::from_str(r#"{"max_concurrent_sessions": 3}"#).unwrap();
        assert_eq!(p.max_concurrent_sessions, Some(Some(3)));
        assert!(serde_json::from_str::<ApiKeyPatch>(r#"{"unknown": 1}"#).is_err());
    }

    #[test]
    fn node_class_labels_come_from_a_bounded_set() {
        let config = nearpath_config::GatewayConfig::default();
        let policy = nearpath_geo::Policy::compile(&config.geofence).unwrap();
        assert_eq!(class_label(&policy, "cpu".into()), "cpu");
        let known = nearpath_config::default_gpu_class_table()[0]
            .class
            .to_string();
        assert_eq!(class_label(&policy, known.clone()), known);
        assert_eq!(
            class_label(&policy, "whatever-a-node-says".into()),
            crate::metrics::OTHER
        );
    }
    fn fields(v: Value) -> PolicyFields {
        let p: ApiKeyPatch = serde_json::from_value(v).expect("a patch body");
        PolicyFields {
            allowed_models: p.allowed_models,
            expires_at_ms: p.expires_at_ms,
            budget_tokens_per_day: p.budget_tokens_per_day,
            budget_tokens_per_month: p.budget_tokens_per_month,
            budget_usd_per_day: p.budget_usd_per_day,
            budget_usd_per_month: p.budget_usd_per_month,
        }
    }

    fn refused_field(v: Value) -> &'static str {
        match policy_update(fields(v.clone())) {
            Err(StoreError::Invalid { field, .. }) => field,
            other => panic!("{v}: {other:?}"),
        }
    }

    #[test]
    fn policy_fields_of_the_wrong_type_or_value_are_refused_naming_the_field() {
        use serde_json::json;
        assert_eq!(
            refused_field(json!({"budget_usd_per_day": -0.01})),
            "budget_usd_per_day"
        );
        assert_eq!(
            refused_field(json!({"budget_usd_per_month": "NaN"})),
            "budget_usd_per_month"
        );
        assert_eq!(
            refused_field(json!({"budget_tokens_per_day": -1})),
            "budget_tokens_per_day"
        );
        assert_eq!(
            refused_field(json!({"budget_tokens_per_day": 1.5})),
            "budget_tokens_per_day"
        );
        assert_eq!(
            refused_field(json!({"budget_tokens_per_month": 1e300})),
            "budget_tokens_per_month"
        );
        assert_eq!(refused_field(json!({"expires_at_ms": -5})), "expires_at_ms");
        assert_eq!(
            refused_field(json!({"expires_at_ms": "tomorrow"})),
            "expires_at_ms"
        );
        assert_eq!(
            refused_field(json!({"allowed_models": "m"})),
            "allowed_models"
        );
        assert_eq!(
            refused_field(json!({"allowed_models": [1]})),
            "allowed_models"
        );
        assert_eq!(
            refused_field(json!({"allowed_models": [""]})),
            "allowed_models"
        );
        assert_eq!(
            refused_field(json!({"allowed_models": ["x".repeat(257)]})),
            "allowed_models"
        );
        let many: Vec<String> = (0..257).map(|i| format!("m{i}")).collect();
        assert_eq!(
            refused_field(json!({"allowed_models": many})),
            "allowed_models"
        );
        // Good values, `null` resets, absent leaves alone.
        let u = policy_update(fields(json!({
            "allowed_models": ["org/*"], "budget_tokens_per_day": 1e3,
            "budget_usd_per_month": 0, "expires_at_ms": null
        })))
        .expect("valid");
        assert_eq!(u.allowed_models, Some(vec!["org/*".to_string()]));
        assert_eq!(u.budget_tokens_per_day, Some(Some(1000)));
        assert_eq!(u.budget_usd_per_month, Some(Some(0.0)));
        assert_eq!(u.expires_at_ms, Some(None));
        assert_eq!(u.budget_usd_per_day, None);
        let u = policy_update(fields(json!({"allowed_models": null}))).expect("reset");
        assert_eq!(u.allowed_models, Some(vec![]));
    }

    #[test]
    fn usage_ranges_are_real_dates_in_order_and_bounded() {
        let now = crate::budget::day_start_ms(crate::budget::days_from_civil(2026, 12, 6));
        assert_eq!(usage_range(None, None, now), Ok(None));
        let d = |s| crate::budget::parse_day(s).unwrap();
        assert_eq!(
            usage_range(Some("2026-12-01"), None, now),
            Ok(Some((d("2026-12-01"), d("2026-12-06"))))
        );
        assert_eq!(
            usage_range(Some("2025-12-06"), Some("2026-12-06"), now),
            Ok(Some((d("2025-12-06"), d("2026-12-06"))))
        );
        for (from, to, param) in [
            (None, Some("2026-12-01"), "from"),
            (Some("2026-13-01"), None, "from"),
            (Some("yesterday"), None, "from"),
            (Some("2026-12-01"), Some("2026-02-30"), "to"),
            (Some("2026-12-02"), Some("2026-12-01"), "to"),
            (Some("2025-12-05"), Some("2026-12-06"), "to"),
        ] {
            let e = usage_range(from, to, now).unwrap_err();
            assert!(e.starts_with(param), "{from:?} {to:?}: {e}");
        }
    }
}
