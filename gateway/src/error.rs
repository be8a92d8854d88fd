//! The core's one error type.
//!
//! The session rules (placement, admission, inference attempts, game sessions) fail with a
//! [`CoreError`]: what went wrong ([`Kind`]), who is to blame ([`Blame`]), and whether a retry
//! may help, as data. Front ends map it to what their clients understand: OpenAI JSON and an HTTP
//! status ([`CoreError::to_api`]), a native QUIC `Error` message ([`CoreError::quic_code`]), a
//! WHEP status. Metric outcome labels come from [`Kind::as_str`], a bounded set.

use nearpath_protocol::openai::ApiError;
use std::borrow::Cow;

/// What went wrong, independent of the front end that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The request is malformed or asks for something impossible (HTTP 400).
    InvalidRequest,
    /// No key, or a key we do not know (401).
    Unauthenticated,
    /// The key was revoked while the session ran (401, in band).
    KeyRevoked,
    /// The geofence denied the client or the node (403).
    Geofence,
    /// The key may not do this (a model outside its allow-list): 403, never retried.
    Forbidden,
    /// No such model, game, session or path (404).
    NotFound,
    /// A known path with the wrong method (405).
    MethodNotAllowed,
    /// The body or message is over the limit (413).
    TooLarge,
    /// A body of a content type the resource does not take (415).
    UnsupportedMediaType,
    /// Well-formed but not something this gateway does (422).
    Unprocessable,
    /// A per-key rate or concurrency cap (429).
    RateLimited,
    /// No node can take it right now, the model is between nodes, the ledger cannot commit, or
    /// the gateway is draining (503).
    Unavailable,
    /// The node serving it failed or broke the protocol (502).
    NodeFailed,
    /// Nobody answered in time (504).
    Timeout,
    /// A fault of the gateway's (500).
    Internal,
}

impl Kind {
    /// The HTTP status a front end speaking HTTP sends.
    pub fn http_status(self) -> u16 {
        match self {
            Kind::InvalidRequest => 400,
            Kind::Unauthenticated | Kind::KeyRevoked => 401,
            Kind::Geofence | Kind::Forbidden => 403,
            Kind::NotFound => 404,
            Kind::MethodNotAllowed => 405,
            Kind::TooLarge => 413,
            Kind::UnsupportedMediaType => 415,
            Kind::Unprocessable => 422,
            Kind::RateLimited => 429,
            Kind::Internal => 500,
            Kind::NodeFailed => 502,
            Kind::Unavailable => 503,
            Kind::Timeout => 504,
        }
    }

    /// The kind an HTTP status stands for (used where a status arrives from elsewhere, such as
    /// an upstream server behind a node).
    pub fn from_http_status(status: u16) -> Kind {
        match status {
            400 => Kind::InvalidRequest,
            401 => Kind::Unauthenticated,
            403 => Kind::Geofence,
            404 => Kind::NotFound,
            405 => Kind::MethodNotAllowed,
            413 => Kind::TooLarge,
            415 => Kind::UnsupportedMediaType,
            422 => Kind::Unprocessable,
            429 => Kind::RateLimited,
            502 => Kind::NodeFailed,
            503 => Kind::Unavailable,
            504 => Kind::Timeout,
            s if (400..500).contains(&s) => Kind::InvalidRequest,
            _ => Kind::Internal,
        }
    }

    /// The OpenAI error `type` for this kind.
    pub fn openai_type(self) -> &'static str {
        match self {
            Kind::InvalidRequest
            | Kind::NotFound
            | Kind::MethodNotAllowed
            | Kind::TooLarge
            | Kind::UnsupportedMediaType
            | Kind::Unprocessable => "invalid_request_error",
            Kind::Unauthenticated | Kind::KeyRevoked => "authentication_error",
            Kind::Geofence | Kind::Forbidden => "permission_denied",
            Kind::RateLimited => "rate_limit_error",
            Kind::Unavailable | Kind::NodeFailed | Kind::Timeout | Kind::Internal => "server_error",
        }
    }

    /// A bounded label for metrics (`outcome="..."`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InvalidRequest => "invalid_request",
            Kind::Unauthenticated => "unauthenticated",
            Kind::KeyRevoked => "key_revoked",
            Kind::Geofence => "geofence",
            Kind::Forbidden => "forbidden",
            Kind::NotFound => "not_found",
            Kind::MethodNotAllowed => "method_not_allowed",
            Kind::TooLarge => "too_large",
            Kind::UnsupportedMediaType => "unsupported_media_type",
            Kind::Unprocessable => "unprocessable",
            Kind::RateLimited => "rate_limited",
            Kind::Unavailable => "unavailable",
            Kind::NodeFailed => "node_failed",
            Kind::Timeout => "timeout",
            Kind::Internal => "internal",
        }
    }

    /// Who is to blame when nothing more specific is known.
    pub fn default_blame(self) -> Blame {
        match self {
            Kind::NodeFailed | Kind::Timeout => Blame::Node,
            Kind::Unavailable | Kind::Internal => Blame::Gateway,
            _ => Blame::Client,
        }
    }

    /// Whether retrying the same request may succeed when nothing more specific is known:
    /// transient conditions yes, anything that would repeat identically no.
    pub fn default_retryable(self) -> bool {
        matches!(
            self,
            Kind::RateLimited
                | Kind::Unavailable
                | Kind::NodeFailed
                | Kind::Timeout
                | Kind::Internal
        )
    }
}

/// Who caused an error: decides whose record it goes on and what the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blame {
    /// The client asked for something wrong or not allowed.
    Client,
    /// A node failed, lied, or broke the protocol (an SLA matter for its operator).
    Node,
    /// The gateway itself (overload, a bug, a store that cannot commit).
    Gateway,
}

impl Blame {
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Client => "client",
            Blame::Node => "node",
            Blame::Gateway => "gateway",
        }
    }
}

/// An error of the gateway's core. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CoreError {
    pub kind: Kind,
    pub blame: Blame,
    /// Whether retrying the same request may succeed.
    pub retryable: bool,
    /// A stable machine-readable code, such as `model_not_found` or `no_capacity`.
    pub code: Cow<'static, str>,
    /// What went wrong, for people.
    pub message: String,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// Seconds to wait before a retry, where the gateway knows.
    pub retry_after_s: Option<u32>,
    /// The node (or other peer) at fault, if one is.
    pub peer: Option<String>,
}

impl CoreError {
    /// An error of `kind` with its default blame and retryability.
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> CoreError {
        CoreError {
            kind,
            blame: kind.default_blame(),
            retryable: kind.default_retryable(),
            code: Cow::Borrowed(code),
            message: message.into(),
            param: None,
            retry_after_s: None,
            peer: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
    pub fn with_blame(mut self, blame: Blame) -> Self {
        self.blame = blame;
        self
    }
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }
    pub fn with_retry_after_s(mut self, s: u32) -> Self {
        self.retry_after_s = Some(s);
        self
    }
    pub fn with_peer(mut self, peer: impl Into<String>) -> Self {
        self.peer = Some(peer.into());
        self
    }

    // Constructors for the errors the gateway sends, named like `openai::ApiError`'s.

    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::new(Kind::InvalidRequest, "bad_request", message);
        e.param = param.map(str::to_owned);
        e
    }
    pub fn missing_api_key() -> Self {
        Self::from_api(&ApiError::missing_api_key())
    }
    pub fn invalid_api_key() -> Self {
        Self::from_api(&ApiError::invalid_api_key())
    }
    pub fn key_revoked() -> Self {
        // 401 alone reads as `Unauthenticated`; a revocation is its own kind (native code
        // `key_revoked`).
        CoreError {
            kind: Kind::KeyRevoked,
            ..Self::from_api(&ApiError::key_revoked())
        }
    }
    pub fn geofence_denied(rule: &str, reason: &str) -> Self {
        Self::from_api(&ApiError::geofence_denied(rule, reason))
    }
    pub fn model_not_found(model: &str) -> Self {
        Self::from_api(&ApiError::model_not_found(model))
    }
    /// A model served recently that no node serves now: retryable, with `Retry-After: 1`.
    pub fn model_unavailable(model: &str) -> Self {
        Self::from_api(&ApiError::model_unavailable(model)).with_retry_after_s(1)
    }
    pub fn no_eligible_node(model: &str) -> Self {
        Self::from_api(&ApiError::no_eligible_node(model))
    }
    pub fn no_capacity(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, "no_capacity", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, "unavailable", message)
    }
    pub fn rate_limited(
        code: &'static str,
        message: impl Into<String>,
        retry_after_s: u32,
    ) -> Self {
        Self::new(Kind::RateLimited, code, message).with_retry_after_s(retry_after_s)
    }
    pub fn node_failed(node: &str, message: impl Into<String>) -> Self {
        Self::new(Kind::NodeFailed, "upstream_error", message).with_peer(node)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(Kind::Timeout, "timeout", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, "internal_error", message)
    }
    /// A model outside the key's allow-list: 403 `model_not_allowed`, param `model`.
    pub fn model_not_allowed(key_prefix: &str, model: &str) -> Self {
        Self::new(
            Kind::Forbidden,
            MODEL_NOT_ALLOWED,
            format!("key {key_prefix} may not use the model {model:?} (not in its allowed_models)"),
        )
        .with_param("model")
    }
    /// An expired key: 401 `key_expired`, saying when it expired.
    pub fn key_expired(key_prefix: &str, expired_at: &str) -> Self {
        Self::new(
            Kind::Unauthenticated,
            KEY_EXPIRED,
            format!("API key {key_prefix} expired at {expired_at}"),
        )
    }

    /// The error an OpenAI-shaped error stands for (statuses map to kinds; the code, param and
    /// message are kept).
    pub fn from_api(e: &ApiError) -> Self {
        let kind = Kind::from_http_status(e.status);
        CoreError {
            kind,
            blame: kind.default_blame(),
            retryable: e.should_retry(),
            code: e.code.clone().unwrap_or(Cow::Borrowed(kind.as_str())),
            message: e.message.clone(),
            param: e.param.clone(),
            retry_after_s: None,
            peer: None,
        }
    }

    /// The OpenAI-shaped error for the HTTP API.
    pub fn to_api(&self) -> ApiError {
        ApiError {
            status: self.kind.http_status(),
            error_type: self.kind.openai_type(),
            code: Some(self.code.clone()),
            param: self.param.clone(),
            message: self.message.clone(),
        }
    }

    /// The code of a native QUIC `Error` message (see PROTOCOL.md).
    pub fn quic_code(&self) -> &'static str {
        match self.kind {
            Kind::KeyRevoked => "key_revoked",
            Kind::InvalidRequest | Kind::MethodNotAllowed | Kind::UnsupportedMediaType => {
                "bad_request"
            }
            Kind::Unprocessable => "bad_request",
            Kind::Unauthenticated if self.code == KEY_EXPIRED => KEY_EXPIRED,
            Kind::Unauthenticated => "unauthorized",
            Kind::Geofence => "geofence",
            Kind::Forbidden if self.code == MODEL_NOT_ALLOWED => MODEL_NOT_ALLOWED,
            // A refused redirect ticket, as a refused `PlayTicket` is answered.
            Kind::Forbidden if self.code == "bad_ticket" => "bad_ticket",
            Kind::Forbidden => "forbidden",
            Kind::NotFound => "model_not_found",
            Kind::TooLarge => "too_large",
            // A per-key concurrency cap and a ledger that cannot commit keep their own codes,
            // as over HTTP: a client waits for one of its sessions to end, or simply retries.
            Kind::RateLimited if self.code == CONCURRENCY_LIMIT_EXCEEDED => {
                CONCURRENCY_LIMIT_EXCEEDED
            }
            Kind::RateLimited if self.code == BUDGET_EXCEEDED => BUDGET_EXCEEDED,
            Kind::RateLimited => "rate_limited",
            Kind::Unavailable if self.code == nearpath_protocol::openai::MODEL_UNAVAILABLE => {
                nearpath_protocol::openai::MODEL_UNAVAILABLE
            }
            Kind::Unavailable if self.code == LEDGER_UNAVAILABLE => LEDGER_UNAVAILABLE,
            Kind::Unavailable if self.code == "ticket_node_unavailable" => {
                "ticket_node_unavailable"
            }
            Kind::Unavailable => "no_capacity",
            Kind::Timeout => "timeout",
            Kind::NodeFailed | Kind::Internal => "upstream",
        }
    }
}

/// The code of the refusal of new work while the usage ledger cannot commit.
pub const LEDGER_UNAVAILABLE: &str = "ledger_unavailable";

/// The code of a refusal by a per-key concurrency cap.
pub const CONCURRENCY_LIMIT_EXCEEDED: &str = "concurrency_limit_exceeded";

/// The code of a request for a model outside the key's allow-list (403).
pub const MODEL_NOT_ALLOWED: &str = "model_not_allowed";

/// The code of a request of a key over one of its budgets (429, not retryable).
pub const BUDGET_EXCEEDED: &str = "budget_exceeded";

/// The code of a request with an expired key (401).
pub const KEY_EXPIRED: &str = "key_expired";

impl From<ApiError> for CoreError {
    fn from(e: ApiError) -> Self {
        Self::from_api(&e)
    }
}

impl From<&CoreError> for ApiError {
    fn from(e: &CoreError) -> Self {
        e.to_api()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_http_status() {
        use Kind::*;
        for k in [
            InvalidRequest,
            Geofence,
            NotFound,
            MethodNotAllowed,
            TooLarge,
            UnsupportedMediaType,
            Unprocessable,
            RateLimited,
            Unavailable,
            NodeFailed,
            Timeout,
            Internal,
        ] {
            assert_eq!(Kind::from_http_status(k.http_status()), k, "{k:?}");
        }
    }

    #[test]
    fn an_api_error_keeps_its_code_param_and_retry_hint_through_the_core() {
        let api = ApiError::model_unavailable("m");
        let core = CoreError::from_api(&api);
        assert_eq!(core.kind, Kind::Unavailable);
        assert!(core.retryable);
        assert_eq!(
            core.quic_code(),
            nearpath_protocol::openai::MODEL_UNAVAILABLE
        );
        assert_eq!(core.to_api(), api);
        let nf = CoreError::model_not_found("m");
        assert!(!nf.retryable);
        assert_eq!(nf.blame, Blame::Client);
        assert_eq!(nf.to_api(), ApiError::model_not_found("m"));
    }
}
