//! WHEP signalling over HTTP: the offer, the session resources (trickle ICE, DELETE, stats), CORS,
//! statuses, and the `/play` page.

use super::negotiate::negotiate;
use super::session::{run_session, SessionDeps};
use super::{
    check_offer, parse_sdpfrag, Counters, SessionHandle, Sessions, MAX_STATS_BYTES,
    SDPFRAG_CONTENT_TYPE, SDP_CONTENT_TYPE,
};
use crate::client_addr::{client_addr, ClientAddr};
use crate::error::{CoreError, Kind};
use crate::game::{ClientEvent, FrameSink, GameService, Placed, Relay};
use crate::http_util::{bearer, read_body, Body, BodyError, Handler, Resp};
use crate::sdp::is_mdns_candidate;
use crate::store::ApiKey;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use nearpath_config::HttpConfig;
use nearpath_protocol::message::{PlayRequest, VideoCodec};
use nearpath_protocol::openai::ApiError;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};
use webrtc::peer_connection::RTCIceCandidateInit;

/// The player page, with `__NEARPATH_DEMO_KEY__` replaced when served.
const PLAY_HTML: &str = include_str!("../../static/play.html");
/// The site icon, also inline in the player page: browsers ask for `/favicon.ico` on any page
/// of the gateway they show (a JSON answer, the admin's `/metrics`), and get it rather than a 404.
const FAVICON_SVG: &str = "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'>\
    <path d='M8 1 14 14 8 11 2 14z' fill='#f5c400'/></svg>";
/// Frames waiting for the session task; a full queue drops the newest frame (see
/// [`FrameSink::Channel`]).
const FRAME_QUEUE: usize = 8;
/// Audio packets buffered between the relay and the session task (160 ms of 10 ms packets);
/// when full, packets are dropped and the browser's decoder conceals them.
const AUDIO_QUEUE: usize = 16;

static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// The WHEP front end: signalling, session resources and the `/play` page. Built with the game
/// service (which holds the Auth, Directory, Placement, Sessions and Meter components and the
/// clock), the gateway's WebRTC sessions, its `[http]` section, the key `/play` prefills and the
/// shutdown signal.
pub struct Whep {
    games: Arc<GameService>,
    sessions: Arc<Sessions>,
    http: HttpConfig,
    play_prefill_key: Option<String>,
    shutdown: CancellationToken,
    /// What `GET /v1/webtransport` answers (`None`: `[webtransport] enabled = false`).
    webtransport: Option<WebTransportInfo>,
}

/// Where browsers reach the gateway's WebTransport server, for `GET /v1/webtransport`.
#[derive(Clone)]
pub struct WebTransportInfo {
    /// The QUIC listener's UDP port.
    pub port: u16,
    /// The path sessions are accepted on.
    pub path: &'static str,
    pub certs: Arc<crate::wt_cert::WtCerts>,
}

impl Whep {
    /// Answers `GET /v1/webtransport` from `info`.
    pub fn with_webtransport(mut self, info: Option<WebTransportInfo>) -> Whep {
        self.webtransport = info;
        self
    }

    pub fn new(
        games: Arc<GameService>,
        sessions: Arc<Sessions>,
        http: HttpConfig,
        play_prefill_key: Option<String>,
        shutdown: CancellationToken,
    ) -> Whep {
        Whep {
            games,
            sessions,
            http,
            play_prefill_key,
            shutdown,
            webtransport: None,
        }
    }

    /// The client's address: the peer's, or the one `http.client_address_header` carries
    /// when the peer is a trusted proxy.
    fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> ClientAddr {
        client_addr(
            peer,
            headers,
            &self.http.trusted_proxies,
            &self.http.client_address_header,
            self.http.trusted_hops,
        )
    }

    /// Serves this module's resources (see the module docs of `webrtc`).
    pub async fn serve(&self, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        handle_with(self, req, peer).await
    }
}

impl Handler for Whep {
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Resp> + Send>> {
        Box::pin(async move { self.serve(req, peer).await })
    }
}

/// Why a WHEP request or a session request failed. Each variant maps to one HTTP status.
#[derive(Debug, Error)]
pub enum WhepError {
    /// The client sent another content type than the resource accepts (415).
    #[error("Content-Type must be {expected}, not {got:?}")]
    UnsupportedMediaType { expected: &'static str, got: String },
    /// The key is missing or unknown (401).
    #[error("{}", .0.message)]
    Unauthorized(ApiError),
    /// The offer cannot be answered: the client's fault, retrying the same offer fails again (400).
    #[error("bad SDP offer: {reason}")]
    BadOffer { reason: String },
    /// Query or body parameters are invalid (400).
    #[error("{reason}")]
    BadRequest {
        reason: String,
        param: Option<&'static str>,
    },
    /// The body is over the limit (413).
    #[error("the request body is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// The geofence denies this client (403, not retryable).
    #[error("{message}")]
    Geofence { message: String },
    /// No node serves the title for anyone (404).
    #[error("no node serves the game {title:?}")]
    UnknownGame { title: String },
    /// Every node that could serve is busy, or none answered (503, retry later).
    #[error("{message}")]
    NoCapacity { message: String },
    /// A per-key cap refused the session: too many live sessions, or too many starts in the
    /// last minute (429 with `Retry-After`).
    #[error("{message}")]
    KeyCap {
        code: &'static str,
        message: String,
        retry_after_s: u32,
    },
    /// The usage ledger cannot commit, so no session may start (503, retry later).
    #[error("{message}")]
    LedgerUnavailable { message: String },
    /// Every UDP port of the configured range is taken (503, retry later).
    #[error("no free UDP port in {min}..={max} for WebRTC")]
    NoUdpPort { min: u16, max: u16 },
    /// No session with that id for this tenant (404).
    #[error("no session {id}")]
    NoSession { id: String },
    /// The PATCH asks for an ICE restart, which this gateway does not do (422).
    #[error("ICE restarts are not supported; start a new session")]
    IceRestartUnsupported,
    /// A redirect ticket this gateway does not honour: forged, expired, used, or issued for
    /// another client, key, gateway or node (403, not retryable with the same ticket).
    #[error("{message}")]
    BadTicket { message: String },
    /// A resume (`Nearpath-Resume`) this gateway does not honour: a forged, spent or
    /// malformed token, another key's session, an unknown one, or a gateway outside a
    /// federation (403, not retryable), the native `bad_resume`.
    #[error("{message}")]
    BadResume { message: String },
    /// The session cannot be had right now (`resume_conflict`: it still runs on this gateway;
    /// `store_unavailable`: the sessions directory cannot be read): 503 with `Retry-After`.
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: String,
        retry_after_s: u32,
    },
    /// The browser's offer lists no video codec that both the gateway sends browsers
    /// (`game.browser_codecs`) and a node that may serve the session encodes (422).
    #[error("{message}")]
    UnsupportedCodec { message: String },
    /// A fault of ours (the WebRTC stack failed), 500.
    #[error("{what}: {reason}")]
    Internal { what: &'static str, reason: String },
}

impl WhepError {
    /// The error as the API's JSON error (status, type, code, message).
    pub fn api_error(&self) -> ApiError {
        match self {
            WhepError::UnsupportedMediaType { .. } => ApiError::new(
                415,
                "invalid_request_error",
                Some("unsupported_media_type"),
                None,
                self.to_string(),
            ),
            WhepError::Unauthorized(e) => e.clone(),
            WhepError::BadOffer { .. } => ApiError::new(
                400,
                "invalid_request_error",
                Some("bad_sdp"),
                None,
                self.to_string(),
            ),
            WhepError::BadRequest { reason, param } => {
                ApiError::bad_request(reason.clone(), *param)
            }
            WhepError::TooLarge { limit } => ApiError::payload_too_large(*limit),
            WhepError::Geofence { message } => ApiError::new(
                403,
                "permission_denied",
                Some("geofence"),
                None,
                message.clone(),
            ),
            WhepError::UnknownGame { .. } => ApiError::new(
                404,
                "invalid_request_error",
                Some("game_not_found"),
                Some("title".into()),
                self.to_string(),
            ),
            WhepError::NoCapacity { .. } => ApiError::new(
                503,
                "server_error",
                Some("no_capacity"),
                None,
                self.to_string(),
            ),
            WhepError::KeyCap { code, .. } => {
                ApiError::new(429, "rate_limit_error", Some(*code), None, self.to_string())
            }
            WhepError::LedgerUnavailable { .. } => ApiError::new(
                503,
                "server_error",
                Some(crate::error::LEDGER_UNAVAILABLE),
                None,
                self.to_string(),
            ),
            WhepError::NoUdpPort { .. } => ApiError::new(
                503,
                "server_error",
                Some("no_capacity"),
                None,
                self.to_string(),
            ),
            WhepError::NoSession { .. } => ApiError::new(
                404,
                "invalid_request_error",
                Some("session_not_found"),
                None,
                self.to_string(),
            ),
            WhepError::IceRestartUnsupported => ApiError::new(
                422,
                "invalid_request_error",
                Some("ice_restart_unsupported"),
                None,
                self.to_string(),
            ),
            WhepError::BadTicket { message } => ApiError::new(
                403,
                "permission_denied",
                Some(crate::game::BAD_TICKET),
                None,
                message.clone(),
            ),
            WhepError::BadResume { message } => ApiError::new(
                403,
                "permission_denied",
                Some(crate::game::BAD_RESUME),
                None,
                message.clone(),
            ),
            WhepError::Unavailable { code, message, .. } => {
                ApiError::new(503, "server_error", Some(*code), None, message.clone())
            }
            WhepError::UnsupportedCodec { message } => ApiError::new(
                422,
                "invalid_request_error",
                Some("unsupported_codec"),
                None,
                message.clone(),
            ),
            WhepError::Internal { .. } => ApiError::internal(self.to_string()),
        }
    }

    /// Seconds a client should wait before retrying, for the errors where retrying helps.
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            WhepError::NoCapacity { .. } | WhepError::NoUdpPort { .. } => Some(2),
            WhepError::KeyCap { retry_after_s, .. }
            | WhepError::Unavailable { retry_after_s, .. } => Some(*retry_after_s),
            WhepError::LedgerUnavailable { .. } => Some(1),
            _ => None,
        }
    }

    /// The WHEP error for a session the core could not start, by the error's kind.
    pub fn from_core(title: &str, e: CoreError) -> WhepError {
        match e.kind {
            Kind::Geofence => WhepError::Geofence { message: e.message },
            Kind::Forbidden if e.code == crate::game::BAD_TICKET => {
                WhepError::BadTicket { message: e.message }
            }
            Kind::Forbidden if e.code == crate::game::BAD_RESUME => {
                WhepError::BadResume { message: e.message }
            }
            Kind::Unavailable
                if e.code == crate::game::RESUME_CONFLICT || e.code == "store_unavailable" =>
            {
                WhepError::Unavailable {
                    code: if e.code == crate::game::RESUME_CONFLICT {
                        crate::game::RESUME_CONFLICT
                    } else {
                        "store_unavailable"
                    },
                    message: e.message,
                    retry_after_s: e.retry_after_s.unwrap_or(1),
                }
            }
            Kind::NotFound => WhepError::UnknownGame {
                title: title.to_string(),
            },
            Kind::InvalidRequest => WhepError::BadRequest {
                reason: e.message,
                param: None,
            },
            Kind::Unauthenticated | Kind::KeyRevoked => {
                WhepError::Unauthorized(ApiError::invalid_api_key())
            }
            Kind::RateLimited => WhepError::KeyCap {
                code: if e.code == "rate_limit_exceeded" {
                    "rate_limit_exceeded"
                } else {
                    "concurrency_limit_exceeded"
                },
                message: e.message,
                retry_after_s: e.retry_after_s.unwrap_or(1),
            },
            Kind::Unprocessable if e.code == "unsupported_codec" => {
                WhepError::UnsupportedCodec { message: e.message }
            }
            Kind::Unavailable if e.code == crate::error::LEDGER_UNAVAILABLE => {
                WhepError::LedgerUnavailable { message: e.message }
            }
            _ => WhepError::NoCapacity { message: e.message },
        }
    }
}

/// Whether `path` is one of this module's resources.
pub fn is_webrtc_path(path: &str) -> bool {
    path == "/play"
        || path == WEBTRANSPORT_INFO_PATH
        || path == "/favicon.ico"
        || path.starts_with("/v1/sessions/")
        || whep_title(path).is_some()
}

fn whep_title(path: &str) -> Option<&str> {
    let title = path.strip_prefix("/v1/games/")?.strip_suffix("/whep")?;
    (!title.is_empty() && !title.contains('/')).then_some(title)
}

/// `/v1/sessions/{id}` and `/v1/sessions/{id}/stats`.
fn session_path(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/v1/sessions/")?;
    match rest.split_once('/') {
        None => Some((rest, false)),
        Some((id, "stats")) => Some((id, true)),
        Some(_) => None,
    }
}

fn error_response(e: &WhepError) -> Resp {
    let api = e.api_error();
    let mut r = Response::new(Body::from_bytes(api.body()));
    *r.status_mut() = StatusCode::from_u16(api.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if !api.should_retry() {
        h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
    }
    if let Some(s) = e.retry_after_s() {
        h.insert(hyper::header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

/// The `Access-Control-Allow-Origin` value for a request's `Origin`, if CORS allows it.
fn cors_origin(w: &Whep, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(hyper::header::ORIGIN)?;
    let allowed = &w.http.cors_allowed_origins;
    if allowed.iter().any(|o| o == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let o = origin.to_str().ok()?;
    allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(o))
        .then(|| origin.clone())
}

fn add_cors(r: &mut Resp, origin: Option<HeaderValue>) {
    let Some(origin) = origin else { return };
    let h = r.headers_mut();
    let specific = origin != "*";
    h.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        hyper::header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "Location, Link, ETag, Retry-After, x-request-id, Nearpath-Resume-Token",
        ),
    );
    if specific {
        h.append(hyper::header::VARY, HeaderValue::from_static("Origin"));
    }
}

fn preflight(w: &Whep, headers: &HeaderMap, methods: &'static str) -> Resp {
    let mut r = empty(StatusCode::NO_CONTENT);
    let origin = cors_origin(w, headers);
    let allowed = origin.is_some();
    add_cors(&mut r, origin);
    let h = r.headers_mut();
    h.insert(hyper::header::ALLOW, HeaderValue::from_static(methods));
    if allowed {
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(
                "authorization, content-type, if-match, traceparent, x-request-id, \
                 nearpath-redirect, nearpath-resume",
            ),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    if methods.starts_with("POST") {
        h.insert(
            HeaderName::from_static("accept-post"),
            HeaderValue::from_static(SDP_CONTENT_TYPE),
        );
    }
    r
}

fn content_type_is(headers: &HeaderMap, expected: &'static str) -> Result<(), WhepError> {
    let got = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = got.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(WhepError::UnsupportedMediaType {
            expected,
            got: got.to_string(),
        })
    }
}

async fn body_text(req: Request<Incoming>, limit: usize) -> Result<String, WhepError> {
    match read_body(req.into_body(), limit).await {
        Ok(b) => String::from_utf8(b.to_vec()).map_err(|_| WhepError::BadRequest {
            reason: "the body is not UTF-8".into(),
            param: None,
        }),
        Err(BodyError::TooLarge { limit }) => Err(WhepError::TooLarge { limit }),
        Err(BodyError::Read(m)) => Err(WhepError::BadRequest {
            reason: m,
            param: None,
        }),
    }
}

async fn authenticate(w: &Whep, req: &Request<Incoming>) -> Result<ApiKey, WhepError> {
    w.games
        .authenticate(bearer(req))
        .await
        .map_err(|e| WhepError::Unauthorized(e.to_api()))
}

/// Serves this module's resources (see the module docs).
async fn handle_with(w: &Whep, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let origin = cors_origin(w, req.headers());
    if path == "/play" {
        return match method {
            Method::GET | Method::HEAD => play_page(w),
            m => method_not_allowed(&m, &path, "GET, HEAD"),
        };
    }
    if path == WEBTRANSPORT_INFO_PATH {
        let mut resp = match method {
            Method::OPTIONS => return preflight(w, req.headers(), "GET, OPTIONS"),
            Method::GET | Method::HEAD => webtransport_info(w),
            m => method_not_allowed(&m, &path, "GET, OPTIONS"),
        };
        // The info is public (any client learns the certificate by connecting) and carries no
        // credentials, and a page served by another gateway of the federation reads it to
        // resume or follow a redirect here: any origin may read it. A configured origin is
        // still echoed as for the other resources.
        let origin = origin.or_else(|| {
            req.headers()
                .contains_key(hyper::header::ORIGIN)
                .then(|| HeaderValue::from_static("*"))
        });
        add_cors(&mut resp, origin);
        return resp;
    }
    if path == "/favicon.ico" {
        return match method {
            Method::GET | Method::HEAD => favicon(),
            m => method_not_allowed(&m, &path, "GET, HEAD"),
        };
    }
    let mut resp = if let Some(title) = whep_title(&path) {
        let title = title.to_string();
        match method {
            Method::OPTIONS => return preflight(w, req.headers(), "POST, OPTIONS"),
            Method::POST => match whep_post(w, req, peer, &title).await {
                Ok(r) => r,
                Err(e) => error_response(&e),
            },
            m => method_not_allowed(&m, &path, "POST, OPTIONS"),
        }
    } else if let Some((id, stats)) = session_path(&path) {
        let id = id.to_string();
        let allowed = if stats {
            "POST, OPTIONS"
        } else {
            "PATCH, DELETE, OPTIONS"
        };
        let r = match (method, stats) {
            (Method::OPTIONS, _) => return preflight(w, req.headers(), allowed),
            (Method::PATCH, false) => session_patch(w, req, &id).await,
            (Method::DELETE, false) => session_delete(w, req, &id).await,
            (Method::POST, true) => session_stats(w, req, &id).await,
            (m, _) => Ok(method_not_allowed(&m, &path, allowed)),
        };
        r.unwrap_or_else(|e| error_response(&e))
    } else {
        error_response(&WhepError::NoSession { id: path.clone() })
    };
    add_cors(&mut resp, origin);
    resp
}

fn method_not_allowed(m: &Method, path: &str, allowed: &'static str) -> Resp {
    let api = ApiError::method_not_allowed(m.as_str(), path);
    let mut r = Response::new(Body::from_bytes(api.body()));
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allowed));
    r
}

fn play_page(w: &Whep) -> Resp {
    // Only the demo prefills a key (see `Gateway::prefill_play_key`).
    let key = w.play_prefill_key.as_deref().unwrap_or("");
    let html = PLAY_HTML.replace("__NEARPATH_DEMO_KEY__", key);
    let mut r = Response::new(Body::from_bytes(html));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn favicon() -> Resp {
    let mut r = Response::new(Body::from_bytes(FAVICON_SVG));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("image/svg+xml"));
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    r
}

/// Reads `width`, `height`, `fps`, `bitrate_kbps` from the query (absent: the defaults).
pub fn play_request(title: &str, query: Option<&str>) -> Result<PlayRequest, WhepError> {
    let mut r = PlayRequest {
        protocol_version: nearpath_protocol::PROTOCOL_VERSION,
        api_key: String::new(),
        game: title.to_string(),
        width: 0,
        height: 0,
        fps: 0,
        bitrate_kbps: 0,
        // Browsers' codecs come from their offers (`offer_codecs`), not the address.
        codecs: vec![],
        // From the offer's `traceparent` header, not the address.
        traceparent: None,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (slot, name): (&mut u32, &'static str) = match k {
            "width" => (&mut r.width, "width"),
            "height" => (&mut r.height, "height"),
            "fps" => (&mut r.fps, "fps"),
            "bitrate_kbps" => (&mut r.bitrate_kbps, "bitrate_kbps"),
            _ => continue,
        };
        *slot = v.parse().map_err(|_| WhepError::BadRequest {
            reason: format!("{name} must be a non-negative integer, not {v:?}"),
            param: Some(name),
        })?;
    }
    Ok(r)
}

/// The codecs a browser may get, most preferred first: those of `configured` (the gateway's
/// `browser_codecs`, in its order) that the offer lists. None: 422 naming both lists.
pub fn offer_codecs(
    configured: &[String],
    offered: &[&'static str],
) -> Result<Vec<VideoCodec>, WhepError> {
    let accepted: Vec<VideoCodec> = configured
        .iter()
        .filter(|c| offered.contains(&c.as_str()))
        .filter_map(|c| VideoCodec::from_name(c))
        .collect();
    if accepted.is_empty() {
        return Err(WhepError::UnsupportedCodec {
            message: format!(
                "the offer lists {} and this gateway sends browsers {} only",
                offered.join(", "),
                configured.join(", ")
            ),
        });
    }
    Ok(accepted)
}

async fn whep_post(
    w: &Whep,
    req: Request<Incoming>,
    peer: SocketAddr,
    title: &str,
) -> Result<Resp, WhepError> {
    let key = authenticate(w, &req).await?;
    content_type_is(req.headers(), SDP_CONTENT_TYPE)?;
    let resume = resume_header(req.headers())?;
    let mut play = play_request(title, req.uri().query())?;
    // The browser's (or its page's) W3C trace context: the session's spans join its trace. An
    // invalid one is ignored, as on the native wire, and the gateway starts a trace.
    play.traceparent = req
        .headers()
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| nearpath_protocol::message::is_valid_traceparent(v.as_bytes()))
        .map(str::to_string);
    let req_query = req.uri().query().map(str::to_owned);
    let manual_redirect = req
        .headers()
        .get(&NEARPATH_REDIRECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"manual"));
    let mut params = w
        .games
        .session_params(&play)
        .map_err(|reason| WhepError::BadRequest {
            reason,
            param: None,
        })?;
    let client = w.client_ip(peer.ip(), req.headers());
    let location = client.locate(w.games.geo());
    // Sockets are bound for the address packets will come from; with an unknown forwarded
    // address that is best guessed by the proxy's own.
    let ip = client.ip().unwrap_or(peer.ip());
    let offer = body_text(req, w.http.max_body_bytes as usize).await?;
    let summary = check_offer(&offer).map_err(|reason| WhepError::BadOffer { reason })?;
    let accepted = offer_codecs(&w.games.config().browser_codecs, &summary.video_codecs)?;
    params.codec = w.games.pick_codec(&location, &params, &accepted);
    // Route first: a refused client (geofence, no capacity) then costs no sockets. Frames that
    // arrive before the browser is connected are dropped, and a keyframe is asked for then.
    let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
    let (audio_tx, audio_rx) = mpsc::channel(AUDIO_QUEUE);
    let sink = FrameSink::Channel {
        frames: frames_tx,
        audio: audio_tx,
    };
    let started = match (resume, query_ticket(req_query.as_deref())) {
        // A player whose gateway was lost resumes its session here, as a native `PlayResume`
        // does: the same checks and errors, the session's id, game, size and codec.
        (Some((session_id, token)), _) => {
            let entry = w
                .games
                .resume_entry(&key, session_id, &token, "webrtc")
                .await
                .map_err(|e| WhepError::from_core(title, e))?;
            if entry.game != title {
                return Err(WhepError::BadRequest {
                    reason: format!("session {session_id} plays {}, not {title}", entry.game),
                    param: Some("title"),
                });
            }
            // The browser decodes what the session was started in; an offer without it
            // cannot take the session over.
            if !accepted.contains(&entry.codec) {
                return Err(WhepError::UnsupportedCodec {
                    message: format!(
                        "the resumed session is {}, which the offer does not list",
                        entry.codec
                    ),
                });
            }
            let started = w
                .games
                .start_resumed(&key, &entry, location, client.to_string(), "webrtc", sink)
                .await
                .map_err(|e| WhepError::from_core(title, e))?;
            params = started.params.clone();
            started
        }
        // A peer redirected this client here: the ticket names the node and the parameters.
        (None, Some(ticket)) => {
            let f = w.games.federation().ok_or_else(|| WhepError::BadTicket {
                message: "this gateway is not in a federation".into(),
            })?;
            let ip = client.ip().ok_or_else(|| WhepError::BadTicket {
                message: "the client's address is unknown".into(),
            })?;
            let claims = f
                .accept(&ticket, ip, &key.id, w.games.clock().unix_ms())
                .await
                .map_err(|e| WhepError::BadTicket {
                    message: e.to_string(),
                })?;
            if claims.game != title {
                return Err(WhepError::BadTicket {
                    message: format!("the ticket is for {}, not {title}", claims.game),
                });
            }
            params = crate::game::redirect::ticket_params(&claims);
            // The issuer chose the codec from this client's first offer; the offer made here must
            // still list it.
            if !accepted.contains(&params.codec) {
                return Err(WhepError::UnsupportedCodec {
                    message: format!(
                        "the redirected session is {}, which the offer does not list",
                        params.codec
                    ),
                });
            }
            w.games
                .start_ticketed(&key, &claims, location, client.to_string(), "webrtc", sink)
                .await
                .map_err(|e| WhepError::from_core(title, e))?
        }
        (None, None) => match w
            .games
            .place_session(
                &key,
                location,
                client.ip(),
                client.to_string(),
                "webrtc",
                params.clone(),
                sink,
            )
            .await
            .map_err(|e| WhepError::from_core(title, e))?
        {
            Placed::Here(s) => s,
            Placed::Redirect(to) => return Ok(redirect_response(&to, title, manual_redirect)),
        },
    };
    let negotiated = match negotiate(w.games.config(), &w.sessions.ports, &offer, &params, ip).await
    {
        Ok(n) => n,
        Err(e) => {
            let _ = started
                .events
                .send(ClientEvent::Close(format!(
                    "WebRTC negotiation failed: {e}"
                )))
                .await;
            return Err(e);
        }
    };
    let id = started.session_id;
    let resume_token = started.resume_token.clone();
    let counters = Arc::new(Counters::default());
    counters
        .target_kbps
        .store(params.bitrate_kbps, Ordering::Relaxed);
    let handle = Arc::new(SessionHandle {
        id,
        tenant: key.tenant.clone(),
        pc: negotiated.pc.clone(),
        remote_ufrag: summary.ice_ufrag.clone(),
        remote_pwd: summary.ice_pwd.clone(),
        stop: CancellationToken::new(),
        relay: started.relay.clone(),
        counters: counters.clone(),
    });
    let state = w.sessions.clone();
    state.insert(handle.clone());
    let answer = negotiated.answer.clone();
    info!(session = id, game = %params.title, client = %client, data_channel = summary.has_data_channel, "WHEP session answered");
    let span = info_span!("webrtc_session", id, game = %params.title);
    tokio::spawn(
        run_session(
            SessionDeps {
                games: w.games.clone(),
                state,
                shutdown: w.shutdown.clone(),
            },
            handle,
            negotiated,
            started,
            frames_rx,
            audio_rx,
            params,
        )
        .instrument(span),
    );

    let mut r = Response::new(Body::from_bytes(answer));
    *r.status_mut() = StatusCode::CREATED;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(SDP_CONTENT_TYPE));
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/sessions/{id}")) {
        h.insert(hyper::header::LOCATION, v);
    }
    // In a federation: what resumes this session through another gateway if this one is
    // lost (`Nearpath-Resume: {id}:{token}` on an offer there).
    if let Some(v) = resume_token.and_then(|t| HeaderValue::from_str(&t).ok()) {
        h.insert(NEARPATH_RESUME_TOKEN.clone(), v);
    }
    for uri in &w.games.config().ice_servers {
        if let Ok(v) = HeaderValue::from_str(&format!("<{uri}>; rel=\"ice-server\"")) {
            h.append(hyper::header::LINK, v);
        }
    }
    Ok(r)
}

/// The request header with which a page asks for redirects it can follow itself (`/play`):
/// a browser following a cross-origin 307 drops the `Authorization` header, so the page
/// re-sends the offer with it to the `location` it is given.
static NEARPATH_REDIRECT: HeaderName = HeaderName::from_static("nearpath-redirect");

/// The request header of an offer that resumes a session whose gateway was lost:
/// `{session_id}:{resume_token}` (the id from the session's `Location`, the token from its
/// `Nearpath-Resume-Token`).
static NEARPATH_RESUME: HeaderName = HeaderName::from_static("nearpath-resume");

/// The response header of an answered offer in a federation: the session's resume token.
static NEARPATH_RESUME_TOKEN: HeaderName = HeaderName::from_static("nearpath-resume-token");

/// The longest `Nearpath-Resume` value read: a u64 id, a colon and a 64-digit token, with room
/// to spare; anything longer is malformed, not a wrong token.
const MAX_RESUME_HEADER: usize = 128;

/// The session id and token of an offer's `Nearpath-Resume`, if it has one. A value that is
/// over-long, not visible ASCII, or not `{id}:{token}` is a 400; a token of the wrong shape is
/// left to [`GameService::resume_entry`], which refuses it as it refuses any wrong token.
fn resume_header(headers: &HeaderMap) -> Result<Option<(u64, String)>, WhepError> {
    let mut values = headers.get_all(&NEARPATH_RESUME).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    let bad = |reason: &str| WhepError::BadRequest {
        reason: format!("Nearpath-Resume {reason}; it must be {{session_id}}:{{resume_token}}"),
        param: Some("nearpath-resume"),
    };
    if values.next().is_some() {
        return Err(bad("is repeated"));
    }
    if v.len() > MAX_RESUME_HEADER {
        return Err(bad(&format!("is over {MAX_RESUME_HEADER} bytes")));
    }
    let text = v
        .to_str()
        .ok()
        .filter(|t| t.bytes().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| bad("is not visible ASCII"))?;
    let (id, token) = text.split_once(':').ok_or_else(|| bad("has no colon"))?;
    let id: u64 = id
        .parse()
        .map_err(|_| bad("does not start with a session id"))?;
    Ok(Some((id, token.to_string())))
}

/// The W3C trace context header an offer may carry.
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The `ticket` query parameter, if any (hex: nothing to unescape).
fn query_ticket(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == "ticket")
        .map(|(_, v)| v.to_string())
}

/// The answer that sends a WHEP client to the peer gateway holding the node: `307` with the
/// peer's WHEP URL (the ticket in its query) in `Location`, which WHEP clients follow with the
/// same method and body. With `Nearpath-Redirect: manual` the same URL comes as `200` JSON
/// (`{"object":"redirect","location":..,"gateway_id":..}`) for a page to follow itself.
fn redirect_response(to: &crate::game::redirect::RedirectTo, title: &str, manual: bool) -> Resp {
    let url = format!(
        "{}/v1/games/{}/whep?ticket={}",
        to.gateway.http_url.trim_end_matches('/'),
        title,
        to.ticket
    );
    let (status, body) = if manual {
        let json = serde_json::json!({
            "object": "redirect",
            "location": url,
            "gateway_id": to.gateway.id,
        });
        (StatusCode::OK, json.to_string())
    } else {
        (StatusCode::TEMPORARY_REDIRECT, String::new())
    };
    let mut r = Response::new(Body::from_bytes(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if manual {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Ok(v) = HeaderValue::from_str(&url) {
        h.insert(hyper::header::LOCATION, v);
    }
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

/// The session `id` names, if it exists and belongs to the key's tenant.
async fn owned_session(
    w: &Whep,
    req: &Request<Incoming>,
    id: &str,
) -> Result<Arc<SessionHandle>, WhepError> {
    let key = authenticate(w, req).await?;
    let none = || WhepError::NoSession { id: id.to_string() };
    let n: u64 = id.parse().map_err(|_| none())?;
    let h = w.sessions.clone().get(n).ok_or_else(none)?;
    // Another tenant's session is reported as absent, not as forbidden: ids are sequential.
    if h.tenant != key.tenant {
        return Err(none());
    }
    Ok(h)
}

async fn session_patch(w: &Whep, req: Request<Incoming>, id: &str) -> Result<Resp, WhepError> {
    let h = owned_session(w, &req, id).await?;
    content_type_is(req.headers(), SDPFRAG_CONTENT_TYPE)?;
    let restart = req
        .headers()
        .get(hyper::header::IF_MATCH)
        .is_some_and(|v| v.as_bytes() == b"*");
    let body = body_text(req, w.http.max_body_bytes as usize).await?;
    let frag = parse_sdpfrag(&body).map_err(|reason| WhepError::BadRequest {
        reason,
        param: None,
    })?;
    let changed = frag
        .ice_ufrag
        .as_ref()
        .is_some_and(|u| *u != h.remote_ufrag)
        || frag.ice_pwd.as_ref().is_some_and(|p| *p != h.remote_pwd);
    if restart || changed {
        return Err(WhepError::IceRestartUnsupported);
    }
    let mut applied = 0;
    for c in &frag.candidates {
        if is_mdns_candidate(c) {
            continue;
        }
        let init = RTCIceCandidateInit {
            candidate: c.clone(),
            sdp_mid: frag.mid.clone(),
            sdp_mline_index: Some(0),
            username_fragment: Some(h.remote_ufrag.clone()),
            ..Default::default()
        };
        h.pc.add_ice_candidate(init)
            .await
            .map_err(|e| WhepError::BadRequest {
                reason: format!("candidate {c:?}: {e}"),
                param: None,
            })?;
        applied += 1;
    }
    debug!(session = h.id, applied, "trickled candidates applied");
    Ok(empty(StatusCode::NO_CONTENT))
}

/// Where browsers open WebTransport sessions and the certificate hashes they pin (no key
/// needed: it says nothing about any tenant).
pub const WEBTRANSPORT_INFO_PATH: &str = "/v1/webtransport";

fn webtransport_info(w: &Whep) -> Resp {
    let Some(info) = &w.webtransport else {
        let body = serde_json::json!({"error": {
            "message": "WebTransport is disabled on this gateway ([webtransport] enabled = false)",
            "type": "not_found_error",
            "code": "webtransport_disabled",
        }});
        let mut r = Response::new(Body::from_bytes(body.to_string()));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return r;
    };
    let certs = info.certs.info();
    let body = serde_json::json!({
        "port": info.port,
        "path": info.path,
        "cert_hashes": certs.hashes,
        "expires_unix_ms": certs.expires_unix_ms,
    });
    let mut r = Response::new(Body::from_bytes(body.to_string()));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // The hashes change when the certificate is renewed.
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

/// A live WebTransport session of the key's tenant (the same answer as for a WebRTC one: an
/// unknown id and another tenant's are both absent).
async fn owned_webtransport_session(
    w: &Whep,
    req: &Request<Incoming>,
    id: &str,
) -> Result<Arc<Relay>, WhepError> {
    let key = authenticate(w, req).await?;
    let none = || WhepError::NoSession { id: id.to_string() };
    let n: u64 = id.parse().map_err(|_| none())?;
    let relay = w.games.relays().get(n).ok_or_else(none)?;
    if !matches!(relay.sink, FrameSink::WebTransport(_)) || relay.tenant != key.tenant {
        return Err(none());
    }
    Ok(relay)
}

/// Whether `id` is a WebRTC session of this front end's table (whoever owns it).
fn is_webrtc_session(w: &Whep, id: &str) -> bool {
    id.parse::<u64>()
        .ok()
        .and_then(|n| w.sessions.get(n))
        .is_some()
}

async fn session_delete(w: &Whep, req: Request<Incoming>, id: &str) -> Result<Resp, WhepError> {
    if !is_webrtc_session(w, id) {
        let relay = owned_webtransport_session(w, &req, id).await?;
        info!(
            session = relay.session_id,
            transport = "webtransport",
            "session deleted by the client"
        );
        if let Some(events) = relay.events.upgrade() {
            // Bounded: a session driver that is not reading its queue is ending anyway.
            let close = events.send(ClientEvent::Close("deleted by the client".into()));
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
        }
        return Ok(empty(StatusCode::OK));
    }
    let h = owned_session(w, &req, id).await?;
    info!(session = h.id, "WHEP session deleted by the client");
    h.stop.cancel();
    Ok(empty(StatusCode::OK))
}

async fn session_stats(w: &Whep, req: Request<Incoming>, id: &str) -> Result<Resp, WhepError> {
    if !is_webrtc_session(w, id) {
        let relay = owned_webtransport_session(w, &req, id).await?;
        content_type_is(req.headers(), "application/json")?;
        let body = body_text(req, MAX_STATS_BYTES).await?;
        let mut v = stats_object(&body)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("gateway".into(), relay_counters(&relay));
        }
        *relay.client_stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
        return Ok(empty(StatusCode::NO_CONTENT));
    }
    let h = owned_session(w, &req, id).await?;
    content_type_is(req.headers(), "application/json")?;
    let body = body_text(req, MAX_STATS_BYTES).await?;
    let mut v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| WhepError::BadRequest {
            reason: format!("stats must be JSON: {e}"),
            param: None,
        })?;
    let Some(obj) = v.as_object_mut() else {
        return Err(WhepError::BadRequest {
            reason: "stats must be a JSON object".into(),
            param: None,
        });
    };
    obj.insert("gateway".into(), h.counters.json());
    *h.relay
        .client_stats
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(v);
    Ok(empty(StatusCode::NO_CONTENT))
}

/// A stats body: a JSON object.
fn stats_object(body: &str) -> Result<serde_json::Value, WhepError> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| WhepError::BadRequest {
        reason: format!("stats must be JSON: {e}"),
        param: None,
    })?;
    if !v.is_object() {
        return Err(WhepError::BadRequest {
            reason: "stats must be a JSON object".into(),
            param: None,
        });
    }
    Ok(v)
}

/// What the relay counted for a WebTransport session, added to its page's stats.
fn relay_counters(r: &Relay) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    serde_json::json!({
        "frames": r.frames.load(Relaxed),
        "bytes": r.bytes.load(Relaxed),
        "dropped_late": r.dropped_late.load(Relaxed),
        "dropped_overload": r.dropped_overload.load(Relaxed),
        "dropped_shed": r.dropped_shed.load(Relaxed),
        "dropped_relay": r.dropped_relay.load(Relaxed),
        "audio_packets": r.audio_packets.load(Relaxed),
        "audio_dropped": r.audio_dropped.load(Relaxed),
        "inputs": r.inputs.load(Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_the_core_could_not_start_gets_the_whep_status_of_its_kind() {
        let cases: [(CoreError, u16, Option<&str>, Option<u32>); 10] = [
            (
                CoreError::new(Kind::Geofence, "geofence", "geofence: rule r: no"),
                403,
                Some("geofence"),
                None,
            ),
            (
                CoreError::new(Kind::NotFound, "unknown_game", "no node serves arena"),
                404,
                Some("game_not_found"),
                None,
            ),
            (
                CoreError::no_capacity("busy").with_retry_after_s(2),
                503,
                Some("no_capacity"),
                Some(2),
            ),
            (
                CoreError::rate_limited("concurrency_limit_exceeded", "4 live", 1),
                429,
                Some("concurrency_limit_exceeded"),
                Some(1),
            ),
            (
                CoreError::rate_limited("rate_limit_exceeded", "30 a minute", 7),
                429,
                Some("rate_limit_exceeded"),
                Some(7),
            ),
            (
                CoreError::new(
                    Kind::Unavailable,
                    crate::error::LEDGER_UNAVAILABLE,
                    "ledger down",
                ),
                503,
                Some(crate::error::LEDGER_UNAVAILABLE),
                Some(1),
            ),
            (CoreError::bad_request("odd size", None), 400, None, None),
            // A refused resume: the native codes, with the native retry advice.
            (
                CoreError::new(Kind::Forbidden, crate::game::BAD_RESUME, "no session")
                    .with_retryable(false),
                403,
                Some(crate::game::BAD_RESUME),
                None,
            ),
            (
                CoreError::new(
                    Kind::Unavailable,
                    crate::game::RESUME_CONFLICT,
                    "still here",
                )
                .with_retry_after_s(3),
                503,
                Some(crate::game::RESUME_CONFLICT),
                Some(3),
            ),
            (
                CoreError::new(Kind::Unavailable, "store_unavailable", "store down")
                    .with_retry_after_s(1),
                503,
                Some("store_unavailable"),
                Some(1),
            ),
        ];
        for (core, status, code, retry_after) in cases {
            let w = WhepError::from_core("arena", core.clone());
            let api = w.api_error();
            assert_eq!(api.status, status, "{core:?}");
            assert_eq!(api.code.as_deref(), code, "{core:?}");
            assert_eq!(w.retry_after_s(), retry_after, "{core:?}");
        }
    }

    /// Hostile `Nearpath-Resume` values are 400s before any lookup; a well-formed one is read
    /// as is (its token's shape is judged with the token, as natively).
    #[test]
    fn resume_headers_are_read_and_malformed_ones_refused() {
        let with = |values: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(&NEARPATH_RESUME, HeaderValue::from_bytes(v).unwrap());
            }
            resume_header(&h)
        };
        assert!(matches!(with(&[]), Ok(None)));
        let token = "ab".repeat(32);
        let good = format!("42:{token}");
        assert_eq!(with(&[good.as_bytes()]).unwrap(), Some((42, token.clone())));
        assert_eq!(
            with(&[b"7:not-hex"]).unwrap(),
            Some((7, "not-hex".to_string()))
        );
        let long = format!("1:{}", "a".repeat(MAX_RESUME_HEADER));
        let bad: [&[&[u8]]; 8] = [
            &[long.as_bytes()],
            &["1:abc\u{e9}".as_bytes()],
            &[b"1:ab cd"],
            &[b""],
            &[token.as_bytes()],
            &[b"x:ab"],
            &[b"18446744073709551616:ab"],
            &[good.as_bytes(), good.as_bytes()],
        ];
        for v in bad {
            match with(v) {
                Err(WhepError::BadRequest {
                    param: Some("nearpath-resume"),
                    ..
                }) => {}
                other => panic!("{v:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn query_parameters_are_read_and_bad_ones_named() {
        let r = play_request("arena", Some("width=1280&height=720&fps=60&x=y")).unwrap();
        assert_eq!(
            (r.width, r.height, r.fps, r.bitrate_kbps),
            (1280, 720, 60, 0)
        );
        match play_request("arena", Some("fps=sixty")) {
            Err(WhepError::BadRequest {
                param: Some("fps"), ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn paths_are_recognised() {
        assert_eq!(whep_title("/v1/games/arena/whep"), Some("arena"));
        assert_eq!(whep_title("/v1/games//whep"), None);
        assert_eq!(whep_title("/v1/games/a/b/whep"), None);
        assert_eq!(session_path("/v1/sessions/12"), Some(("12", false)));
        assert_eq!(session_path("/v1/sessions/12/stats"), Some(("12", true)));
        assert_eq!(session_path("/v1/sessions/12/x"), None);
        assert!(is_webrtc_path("/play"));
        assert!(is_webrtc_path("/favicon.ico"));
        assert!(!is_webrtc_path("/v1/games"));
    }
}
