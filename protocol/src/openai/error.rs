//! OpenAI-shaped errors ([`ApiError`]) and their constructors: the HTTP status plus
//! `{"error":{"message","type","param","code"}}`.
//!
//! These are HTTP API shapes, not the node protocol: the QUIC front end maps them to its own codes.

use std::borrow::Cow;

use bytes::Bytes;

use super::render::{push_json_str, push_opt_str, sse_event};
use super::request::RequestError;

/// The error code of [`ApiError::model_unavailable`].
pub const MODEL_UNAVAILABLE: &str = "model_unavailable";

/// An OpenAI-shaped error: the HTTP status plus `{"error":{"message","type","param","code"}}`.
/// The constructors below are the errors Nearpath sends; the official client picks its exception
/// class from the status alone, the body is for people and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// `type`, such as `invalid_request_error`.
    pub error_type: &'static str,
    pub code: Option<Cow<'static, str>>,
    pub param: Option<String>,
    pub message: String,
}

impl From<RequestError> for ApiError {
    fn from(err: RequestError) -> Self {
        Self::invalid_request(err)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.error_type, self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(
        status: u16,
        error_type: &'static str,
        code: Option<&'static str>,
        param: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            error_type,
            code: code.map(Cow::Borrowed),
            param,
            message: message.into(),
        }
    }

    /// 400 for a body that failed validation.
    pub fn invalid_request(err: RequestError) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            Some(err.code),
            err.param,
            err.message,
        )
    }

    /// 400 with a free-form reason (unknown path parameters, unsupported content type).
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            None,
            param.map(str::to_owned),
            message,
        )
    }

    /// 401: no `Authorization: Bearer` header was sent.
    pub fn missing_api_key() -> Self {
        Self::new(
            401,
            "authentication_error",
            Some("missing_api_key"),
            None,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
        )
    }

    /// 401: the key is not one we know (never echo the key itself).
    pub fn invalid_api_key() -> Self {
        Self::new(
            401,
            "authentication_error",
            Some("invalid_api_key"),
            None,
            "Incorrect API key provided.",
        )
    }

    /// 401: the key was revoked while the request ran; sent in band on a stream that already
    /// started (code `key_revoked`).
    pub fn key_revoked() -> Self {
        Self::new(
            401,
            "authentication_error",
            Some("key_revoked"),
            None,
            "The API key was revoked; the request was ended.",
        )
    }

    /// 403: the geofence denied the request; the message names the rule and the reason. Send
    /// with `x-should-retry: false` (see [`ApiError::should_retry`]).
    pub fn geofence_denied(rule: &str, reason: &str) -> Self {
        Self::new(
            403,
            "permission_denied",
            Some("geofence"),
            None,
            format!("Request denied by geofence rule '{rule}': {reason}"),
        )
    }

    /// 404: no model of that name is served.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            Some("model".to_owned()),
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
    }

    /// 503: the model was served recently but no node serves it now (a node blip or restart);
    /// retryable, sent with `Retry-After` and `x-should-retry: true` (code `model_unavailable`).
    pub fn model_unavailable(model: &str) -> Self {
        Self::new(
            503,
            "server_error",
            Some(MODEL_UNAVAILABLE),
            Some("model".to_owned()),
            format!(
                "The model `{model}` is temporarily unavailable: no node serves it right now. \
                 Please retry."
            ),
        )
    }

    /// 404 for an unknown path.
    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("not_found"),
            None,
            format!("Unknown request URL: {path}."),
        )
    }

    /// 405 for a known path used with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            Some("method_not_allowed"),
            None,
            format!("Method {method} is not allowed on {path}."),
        )
    }

    /// 413: the body is over the limit.
    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            Some("request_too_large"),
            None,
            format!("The request body is larger than the limit of {limit_bytes} bytes."),
        )
    }

    /// 429: too many requests or all capacity busy; send with `Retry-After`.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(
            429,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
            None,
            message,
        )
    }

    /// 500: a fault of ours.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", Some("internal_error"), None, message)
    }

    /// 502: the inference backend failed.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "server_error", Some("upstream_error"), None, message)
    }

    /// 503: no node can serve this model for this client right now.
    pub fn no_eligible_node(model: &str) -> Self {
        Self::new(
            503,
            "server_error",
            Some("no_eligible_node"),
            None,
            format!("No node is available to serve the model `{model}` right now. Please retry."),
        )
    }

    /// 503 with a free-form reason (draining, shutting down).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "server_error", Some("unavailable"), None, message)
    }

    /// 504: the backend did not answer in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, "server_error", Some("timeout"), None, message)
    }

    /// The value for `x-should-retry`: false for errors that repeat identically (validation,
    /// auth, geofence, unknown model), true for transient ones.
    pub fn should_retry(&self) -> bool {
        matches!(self.status, 408 | 409 | 429) || self.status >= 500
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        let mut out = String::with_capacity(96 + self.message.len());
        out.push_str("{\"error\":{\"message\":");
        push_json_str(&mut out, &self.message);
        out.push_str(",\"type\":");
        push_json_str(&mut out, self.error_type);
        out.push_str(",\"param\":");
        push_opt_str(&mut out, self.param.as_deref());
        out.push_str(",\"code\":");
        push_opt_str(&mut out, self.code.as_deref());
        out.push_str("}}");
        out
    }

    /// The in-band SSE event for an error after the stream started.
    pub fn sse_event(&self) -> Bytes {
        sse_event(&self.body())
    }
}

/// `{"error":{...}}` for `err` (same as [`ApiError::body`]).
pub fn error_body(err: &ApiError) -> String {
    err.body()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_unavailable_error_is_a_retryable_503() {
        let e = ApiError::model_unavailable("m");
        assert_eq!((e.status, e.should_retry()), (503, true));
        assert_eq!(e.code.as_deref(), Some(MODEL_UNAVAILABLE));
        assert!(e
            .body()
            .contains(r#""type":"server_error","param":"model","code":"model_unavailable""#));
    }

    #[test]
    fn error_bodies_exact() {
        let e = ApiError::invalid_request(RequestError::missing("messages"));
        assert_eq!(e.status, 400);
        assert_eq!(
            e.body(),
            r#"{"error":{"message":"Missing required parameter: 'messages'.","type":"invalid_request_error","param":"messages","code":"missing_required_parameter"}}"#
        );
        assert!(!e.should_retry());
        let e = ApiError::geofence_denied("ofac_clients", "client country IR is in @ofac");
        assert_eq!((e.status, e.should_retry()), (403, false));
        assert_eq!(
            e.body(),
            r#"{"error":{"message":"Request denied by geofence rule 'ofac_clients': client country IR is in @ofac","type":"permission_denied","param":null,"code":"geofence"}}"#
        );
        let e = ApiError::model_not_found("gpt-9");
        assert_eq!(
            e.body(),
            r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#
        );
        let statuses: Vec<(u16, bool)> = [
            ApiError::missing_api_key(),
            ApiError::invalid_api_key(),
            ApiError::payload_too_large(10),
            ApiError::rate_limited("slow down"),
            ApiError::internal("bug"),
            ApiError::no_eligible_node("m"),
            ApiError::timeout("late"),
        ]
        .iter()
        .map(|e| (e.status, e.should_retry()))
        .collect();
        assert_eq!(
            statuses,
            [
                (401, false),
                (401, false),
                (413, false),
                (429, true),
                (500, true),
                (503, true),
                (504, true)
            ]
        );
        assert_eq!(
            ApiError::invalid_api_key().body(),
            r#"{"error":{"message":"Incorrect API key provided.","type":"authentication_error","param":null,"code":"invalid_api_key"}}"#
        );
        assert_eq!(
            ApiError::timeout("late").sse_event(),
            Bytes::from(format!("data: {}\n\n", ApiError::timeout("late").body()))
        );
    }
}
