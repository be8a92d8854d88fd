//! Fetching a gateway list (the `GET /v1/gateways` JSON) over plain HTTP, for the node's
//! `bootstrap_url` and the `nearpath` client's discovery. The list only says where gateways
//! are; trust comes from pins or a CA, so the transport need not be authenticated.

use crate::gateways::{parse_gateway_list, MAX_BOOTSTRAP_BYTES};
use std::time::Duration;

/// Bound on fetching a gateway list.
pub const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches `url` (with `bearer` as the API key when given) and returns its gateways' QUIC
/// addresses; with `pins`, only entries whose `cert_sha256` is pinned (see
/// [`parse_gateway_list`]).
pub async fn fetch_gateway_list(
    url: &str,
    bearer: Option<&str>,
    pins: Option<&[[u8; 32]]>,
) -> Result<Vec<String>, String> {
    let body = fetch_raw(url, bearer).await?;
    parse_gateway_list(&body, pins)
}

/// The raw body of the gateway list at `url`, bounded in size and time.
pub async fn fetch_raw(url: &str, bearer: Option<&str>) -> Result<Vec<u8>, String> {
    tokio::time::timeout(BOOTSTRAP_TIMEOUT, http_get(url, bearer))
        .await
        .map_err(|_| format!("{url}: no answer within {BOOTSTRAP_TIMEOUT:?}"))?
}

/// A plain-HTTP GET of `url` (`http://host[:port]/path`), with a bearer token when given;
/// the body is bounded by [`MAX_BOOTSTRAP_BYTES`].
async fn http_get(url: &str, bearer: Option<&str>) -> Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use hyper_util::rt::TokioExecutor;
    let client: Client<HttpConnector, Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut req = hyper::Request::get(url);
    if let Some(key) = bearer {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let req = req.body(Empty::new()).map_err(|e| format!("{url}: {e}"))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("{url}: HTTP {status}"));
    }
    let body = Limited::new(resp.into_body(), MAX_BOOTSTRAP_BYTES)
        .collect()
        .await
        .map_err(|e| format!("{url}: reading the body: {e}"))?;
    Ok(body.to_bytes().to_vec())
}
