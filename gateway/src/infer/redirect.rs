//! Inference across the federation by redirect (`federation.inference_route = "redirect"`).
//!
//! When the best eligible node for a request (the first candidate of the merged ranking of
//! this gateway's nodes and live peers' nodes, the geofence applied once here with the
//! client's address) is attached to a peer, this gateway answers with a redirect to the peer
//! instead of relaying over the trunk: HTTP `307` to the peer's `public_http_url` with the
//! ticket in the query (`nearpath_ticket`), or a native `Redirect`. The ticket
//! ([`crate::ticket::InferClaims`]) names the key, node, model, endpoint and client address;
//! the peer accepts it *instead of* the API key (HTTP clients drop `Authorization` on a
//! cross-origin redirect), serves the request on exactly that node without a second geofence,
//! and admits and bills it as its own request. This gateway records only the `redirected`
//! outcome, so the request counts once against the key's fleet-wide limits.

use crate::store::secret::FederationSecret;
use crate::store::{GatewayRecord, Store};
use crate::ticket::{Expect, InferClaims, ReplayGuard, TicketError, TICKET_TTL_MS};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The query parameter an HTTP redirect carries the ticket in.
pub const TICKET_PARAM: &str = "nearpath_ticket";

/// Where a redirected request goes.
#[derive(Debug, Clone)]
pub struct InferRedirect {
    /// The peer gateway.
    pub gateway: GatewayRecord,
    /// The node the ticket names.
    pub node_id: String,
    /// The sealed ticket.
    pub ticket: String,
}

impl InferRedirect {
    /// The URL an HTTP client is sent to: the peer's base URL, the same path, the ticket.
    pub fn location(&self, path: &str) -> String {
        format!(
            "{}{}?{}={}",
            self.gateway.http_url.trim_end_matches('/'),
            path,
            TICKET_PARAM,
            self.ticket
        )
    }
}

/// This gateway as a member of a federation, for inference redirects: mints tickets for peers'
/// nodes and accepts the tickets peers minted for this gateway's nodes.
pub struct InferFederation {
    gateway_id: String,
    secret: FederationSecret,
    replay: Mutex<ReplayGuard>,
}

impl InferFederation {
    pub fn new(gateway_id: String, store: Arc<dyn Store>) -> InferFederation {
        InferFederation {
            gateway_id,
            secret: FederationSecret::new(store),
            replay: Mutex::new(ReplayGuard::default()),
        }
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// The federation's secret (see [`FederationSecret`]).
    async fn secret(&self) -> Result<Arc<[u8]>, String> {
        self.secret.get().await
    }

    /// Mints the ticket that sends `key_id`'s request for `model` at `endpoint` to `node_id`
    /// on `gateway`; `None` when the secret cannot be read (the request is then served as
    /// without a redirect).
    #[allow(clippy::too_many_arguments)]
    pub async fn mint(
        &self,
        gateway: GatewayRecord,
        node_id: &str,
        key_id: &str,
        client_ip: IpAddr,
        model: &str,
        endpoint: &str,
        now_ms: u64,
    ) -> Option<InferRedirect> {
        let secret = match self.secret().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no federation secret: cannot redirect");
                return None;
            }
        };
        let claims = InferClaims {
            issuer: self.gateway_id.clone(),
            target: gateway.id.clone(),
            key_id: key_id.to_string(),
            node_id: node_id.to_string(),
            client_ip,
            model: model.to_string(),
            endpoint: endpoint.to_string(),
            expires_at_ms: now_ms + TICKET_TTL_MS,
            nonce: rand::random(),
        };
        Some(InferRedirect {
            ticket: claims.seal(&secret),
            node_id: node_id.to_string(),
            gateway,
        })
    }

    /// Reads a ticket presented here and checks its MAC: who it claims to be for. Nothing
    /// else is checked yet ([`InferFederation::accept`]).
    pub async fn open(&self, ticket: &str) -> Result<InferClaims, AcceptError> {
        let secret = self.secret().await.map_err(AcceptError::Store)?;
        Ok(InferClaims::open(ticket, &secret)?)
    }

    /// Checks an opened ticket against this gateway, the client's address, the key it is used
    /// with, the model and endpoint of the request, and consumes it: on success the request
    /// must be served on the node it names.
    pub fn accept(
        &self,
        claims: &InferClaims,
        client_ip: IpAddr,
        key_id: &str,
        model: &str,
        endpoint: &str,
        now_ms: u64,
    ) -> Result<(), AcceptError> {
        Expect {
            gateway_id: &self.gateway_id,
            client_ip,
            key_id,
            now_ms,
        }
        .check_infer(claims)?;
        if claims.model != model {
            return Err(AcceptError::WrongModel);
        }
        if claims.endpoint != endpoint {
            return Err(AcceptError::WrongEndpoint);
        }
        self.replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .consume_nonce(now_ms, claims.nonce, claims.expires_at_ms)?;
        Ok(())
    }
}

/// Why an inference ticket was not honoured.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("the ticket was issued for another model")]
    WrongModel,
    #[error("the ticket was issued for another endpoint")]
    WrongEndpoint,
    #[error("the federation secret cannot be read: {0}")]
    Store(String),
}
