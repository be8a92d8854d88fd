//! Native clients over QUIC (ALPN `nearpath/1`): each request is a bidirectional stream whose
//! first message carries the API key, so the gateway keeps no per-connection auth state.

use crate::infer::{self, Metering, StreamEvent};
use crate::server::Shared;
use nearpath_config::WorkloadKind;
use nearpath_protocol::message::{
    Done, ErrorInfo, GameList, InferRequest, InferStarted, Message, Token,
};
use nearpath_protocol::openai::{ApiError, Endpoint, InferenceRequest, Usage};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::{MAX_REQUEST_FRAME, PROTOCOL_VERSION};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info_span, Instrument};

pub async fn handle_client(shared: Arc<Shared>, conn: quinn::Connection) {
    let peer = conn.remote_address();
    let span = info_span!("client", %peer, conn = conn.stable_id());
    let inputs = tokio::spawn(crate::game::client_input_loop(shared.clone(), conn.clone()));
    // A connection that never authenticates a request only costs: it must do so soon.
    let auth_deadline = tokio::time::Instant::now()
        + Duration::from_millis(shared.config.quic.client_auth_timeout_ms);
    async move {
        let mut auth_pending = true;
        loop {
            let (tx, rx) = tokio::select! {
                _ = tokio::time::sleep_until(auth_deadline), if auth_pending => {
                    auth_pending = shared.quic_gate.is_pending(conn.stable_id());
                    if auth_pending {
                        debug!("no request authenticated in time; closing");
                        conn.close(nearpath_protocol::app_code::CLOSE_PROTOCOL, b"authentication timeout");
                        inputs.abort();
                        return;
                    }
                    continue;
                }
                r = conn.accept_bi() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(error = %e, "client connection closed");
                        inputs.abort();
                        return;
                    }
                },
                _ = shared.shutdown.cancelled() => {
                    conn.close(nearpath_protocol::app_code::CLOSE_SHUTDOWN, b"gateway shutting down");
                    return;
                }
            };
            let shared = shared.clone();
            let conn = conn.clone();
            tokio::spawn(async move { serve_stream(shared, conn, tx, rx).await }.in_current_span());
        }
    }
    .instrument(span)
    .await
}

fn error_msg(code: &str, message: impl Into<String>, retryable: bool) -> Message {
    Message::Error(ErrorInfo {
        code: code.to_string(),
        message: message.into(),
        retryable,
    })
}

/// The status-like code a native client sees for an API error.
fn code_of(e: &ApiError) -> &'static str {
    if e.code.as_deref() == Some("key_revoked") {
        return "key_revoked";
    }
    if e.code.as_deref() == Some(nearpath_protocol::openai::MODEL_UNAVAILABLE) {
        // A node blip: retryable (`Error.retryable` is true, as for every 503).
        return nearpath_protocol::openai::MODEL_UNAVAILABLE;
    }
    match e.status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "geofence",
        404 => "model_not_found",
        413 => "too_large",
        429 => "rate_limited",
        503 => "no_capacity",
        504 => "timeout",
        _ => "upstream",
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut tx: quinn::SendStream,
    rx: quinn::RecvStream,
) {
    let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
    let first = match tokio::time::timeout(Duration::from_secs(10), framed.next()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Err(e)) => {
            let _ = send(&mut tx, &error_msg("bad_request", e.to_string(), false)).await;
            let _ = tx.finish();
            return;
        }
        _ => return,
    };
    match first {
        Message::InferRequest(r) => serve_infer(shared, conn, tx, framed, r).await,
        Message::ListGames(l) => {
            let reply = match infer::authenticate(&shared, Some(&l.api_key)).await {
                Ok(_) => {
                    crate::server::client_authenticated(&shared, &conn);
                    let loc = shared.placement.geo.lookup(conn.remote_address().ip());
                    let mut titles: Vec<String> = shared
                        .directory
                        .registry
                        .list()
                        .iter()
                        .filter(|n| {
                            infer::serve_check(&shared, &loc, n, WorkloadKind::Game).is_ok()
                        })
                        .flat_map(|n| n.workloads.games.clone())
                        .collect();
                    titles.sort();
                    titles.dedup();
                    Message::GameList(GameList { titles })
                }
                Err(e) => error_msg(code_of(&e), e.message, false),
            };
            let _ = send(&mut tx, &reply).await;
            let _ = tx.finish();
        }
        Message::PlayRequest(r) => {
            // serve_play authenticates again (a cache hit) and answers a bad key itself.
            if infer::authenticate(&shared, Some(&r.api_key)).await.is_ok() {
                crate::server::client_authenticated(&shared, &conn);
            }
            crate::game::serve_play(shared, conn, tx, framed, r).await
        }
        other => {
            let _ = send(
                &mut tx,
                &error_msg(
                    "bad_request",
                    format!("unexpected first message {}", other.name()),
                    false,
                ),
            )
            .await;
            let _ = tx.finish();
        }
    }
}

async fn serve_infer(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut tx: quinn::SendStream,
    mut framed: FramedRecv,
    r: InferRequest,
) {
    let started = Instant::now();
    let request_id = format!(
        "req_{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    );
    let fail = |e: &ApiError| error_msg(code_of(e), e.message.clone(), e.should_retry());
    if r.protocol_version != PROTOCOL_VERSION {
        let _ = send(
            &mut tx,
            &error_msg(
                "version",
                format!("protocol version {} is not supported", r.protocol_version),
                false,
            ),
        )
        .await;
        let _ = tx.finish();
        return;
    }
    let key = match infer::authenticate(&shared, Some(&r.api_key)).await {
        Ok(k) => {
            crate::server::client_authenticated(&shared, &conn);
            k
        }
        Err(e) => {
            let _ = send(&mut tx, &fail(&e)).await;
            let _ = tx.finish();
            return;
        }
    };
    let endpoint = if r.request_json.contains("\"messages\"") {
        Endpoint::Chat
    } else {
        Endpoint::Completion
    };
    let request = match InferenceRequest::parse(endpoint, r.request_json.as_bytes()) {
        Ok(q) => q,
        Err(e) => {
            let _ = send(&mut tx, &fail(&ApiError::invalid_request(e))).await;
            let _ = tx.finish();
            return;
        }
    };
    if let Err(e) = infer::ledger_gate(&shared, "quic") {
        let _ = send(
            &mut tx,
            &error_msg(infer::LEDGER_UNAVAILABLE, e.message, true),
        )
        .await;
        let _ = tx.finish();
        return;
    }
    if shared.auth.limiter.admit(&key, Instant::now()).is_err() {
        let _ = send(
            &mut tx,
            &error_msg("rate_limited", "rate limit reached for this key", true),
        )
        .await;
        let _ = tx.finish();
        return;
    }
    // Held until this request ends, however it ends.
    let _stream_cap = match infer::acquire_stream(&shared, &key, "quic") {
        Ok(g) => g,
        Err(r) => {
            let _ = send(&mut tx, &error_msg(r.code, r.message, true)).await;
            let _ = tx.finish();
            return;
        }
    };
    let client = shared.placement.geo.lookup(conn.remote_address().ip());
    let mut stream = match infer::dispatch(&shared, &request, &r.request_json, &client).await {
        Ok(s) => s,
        Err(e) => {
            let _ = send(&mut tx, &fail(&e)).await;
            let _ = tx.finish();
            infer::meter(
                &shared,
                Metering {
                    key: &key,
                    request_id: &request_id,
                    model: &request.model,
                    api: "quic",
                    node: None,
                    outcome: "error",
                    usage: Usage::default(),
                    reported: None,
                    ttft: None,
                    started,
                    bytes: 0,
                },
            );
            return;
        }
    };
    // Revoking the key ends the stream with `Error{code: "key_revoked"}` and resets the node's.
    stream.end_on_revocation(shared.auth.keys.revocation(&key.id));
    let mut outcome = "ok";
    let mut index = 0u32;
    if send(
        &mut tx,
        &Message::InferStarted(InferStarted {
            request_id: request_id.clone(),
            model: request.model.clone(),
        }),
    )
    .await
    .is_err()
    {
        outcome = "cancelled";
    }
    // A client finishes its send side after the request; only a reset (or `Close`) cancels.
    let mut client_sending = true;
    while outcome == "ok" {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            m = framed.next(), if client_sending => match m {
                Ok(None) => { client_sending = false; continue; }
                Ok(Some(Message::Close(_))) | Err(_) => { outcome = "cancelled"; break; }
                Ok(Some(_)) => continue,
            },
            // A client that vanishes (connection closed) cancels too.
            _ = conn.closed() => { outcome = "cancelled"; break; }
        };
        let msg = match ev {
            StreamEvent::Token(text) => {
                index += 1;
                Message::Token(Token {
                    index: index - 1,
                    text,
                    node_elapsed_us: started.elapsed().as_micros() as u64,
                })
            }
            StreamEvent::Done {
                finish_reason,
                usage: u,
            } => {
                // The client is told what it is billed, not what the node claimed.
                let _ = send(
                    &mut tx,
                    &Message::Done(Done {
                        finish_reason,
                        prompt_tokens: u.prompt_tokens,
                        completion_tokens: u.completion_tokens,
                    }),
                )
                .await;
                let _ = tx.finish();
                break;
            }
            StreamEvent::Failed(e) => {
                outcome = "error";
                let _ = send(&mut tx, &fail(&e)).await;
                let _ = tx.finish();
                break;
            }
        };
        if send(&mut tx, &msg).await.is_err() {
            outcome = "cancelled";
        }
    }
    if outcome == "cancelled" {
        stream.cancel();
    }
    let usage = stream.billed();
    let reported = stream.reported();
    let ttft = stream.ttft;
    let node = stream.node.clone();
    drop(stream);
    infer::meter(
        &shared,
        Metering {
            key: &key,
            request_id: &request_id,
            model: &request.model,
            api: "quic",
            node: Some(&node),
            outcome,
            usage,
            reported,
            ttft: Some(ttft),
            started,
            bytes: 0,
        },
    );
}
