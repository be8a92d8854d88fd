//! Hostile tests: revocation (issue 9, item 5). Revoking an enrolment token, suspending an
//! operator or revoking an API key ends what they hold within 1 s of the admin call returning:
//! nodes are told why (`Shutdown{reason}`) and closed with `CLOSE_REVOKED`; game sessions end with
//! `key_revoked` on both transports; inference streams end in band and the node's stream is
//! reset. Every wait polls a condition under a deadline.

use crate::common::*;
use nearpath_config::GatewayConfig;
use nearpath_protocol::message::{Message, RejectCode, SessionKind, Token};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::{app_code, ControlEvent, InferEvent, PlayParams};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// What every revocation must take at most, from the admin call's answer.
const BOUND: Duration = Duration::from_secs(1);

/// Heartbeats far apart: a raw node that does not send them must not be removed for silence
/// within the time these tests measure, or a missing revocation would pass for one.
fn slow_heartbeats(c: &mut GatewayConfig) {
    c.nodes.heartbeat_ms = 10_000;
}

/// Waits (bounded by the revocation bound plus slack for a failure message) for the node's
/// `Shutdown`, then for its connection to close; returns the reason, the close code and the
/// close reason.
async fn shutdown_and_close(node: &mut RawNode) -> (String, quinn::VarInt, String) {
    let reason = tokio::time::timeout(BOUND * 2, async {
        loop {
            match node.recv.next().await {
                Ok(Some(Message::Shutdown(s))) => return s.reason,
                Ok(Some(_)) => continue,
                other => panic!("control stream ended without Shutdown: {other:?}"),
            }
        }
    })
    .await
    .expect("no Shutdown within the bound");
    let closed = tokio::time::timeout(BOUND * 2, node.conn.closed())
        .await
        .expect("connection not closed within the bound");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => (
            reason,
            c.error_code,
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("connection closed by {other:?}, not by the gateway's application"),
    }
}

/// Polls until the registry no longer holds `id` (bounded).
async fn wait_gone(gw: &TestGateway, id: &str) {
    let start = Instant::now();
    while gw.shared.directory.registry.get(id).is_some() {
        assert!(start.elapsed() < BOUND * 2, "node {id} still registered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The id of the gateway's first enrolment token (the one `gw.token` is the secret of).
fn first_token_id(gw: &TestGateway) -> String {
    let tokens = gw.store.list_enrolment_tokens(&gw.operator_id).unwrap();
    tokens
        .iter()
        .find(|t| gw.token.starts_with(&t.prefix))
        .expect("the test token is listed")
        .id
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_enrolment_token_disconnects_its_nodes_within_1s() {
    let gw = TestGateway::start(slow_heartbeats).await;
    let token_id = first_token_id(&gw);
    let (status, other) = gw
        .admin_post(
            &format!("/admin/operators/{}/tokens", gw.operator_id),
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{other}");
    let other_token = other["token"].as_str().unwrap().to_string();

    let mut revoked = RawNode::connect_with(&gw, "tok-a", ip(DE), &gw.token, &[], &["m"]).await;
    assert!(
        matches!(revoked.first, Message::Registered(_)),
        "{:?}",
        revoked.first
    );
    let mut kept = RawNode::connect_with(&gw, "tok-b", ip(DE), &other_token, &[], &["m"]).await;
    assert!(
        matches!(kept.first, Message::Registered(_)),
        "{:?}",
        kept.first
    );

    let (status, body) = gw
        .admin_post(&format!("/admin/tokens/{token_id}/revoke"), json!({}))
        .await;
    let t0 = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["disconnected_nodes"], json!(["tok-a"]), "{body}");

    let (reason, code, close_reason) = shutdown_and_close(&mut revoked).await;
    wait_gone(&gw, "tok-a").await;
    let took = t0.elapsed();
    println!("token revocation: node gone {took:?} after the admin call");
    assert!(took <= BOUND, "took {took:?}");
    assert!(reason.starts_with("token_revoked"), "{reason}");
    assert_eq!(code, app_code::CLOSE_REVOKED);
    assert_eq!(close_reason, "token_revoked");

    // Only that token's nodes leave.
    assert!(gw.shared.directory.registry.get("tok-b").is_some());
    kept.heartbeat(0).await;
    // And the token admits nobody again.
    let again = RawNode::connect_with(&gw, "tok-a", ip(DE), &gw.token, &[], &["m"]).await;
    match &again.first {
        Message::Rejected(r) => assert_eq!(r.code, RejectCode::BadToken),
        other => panic!("a revoked token was admitted: {other:?}"),
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_an_operator_disconnects_its_nodes_with_the_reason_within_1s() {
    let gw = TestGateway::start(slow_heartbeats).await;
    let mut node = RawNode::connect_with(&gw, "op-node", ip(DE), &gw.token, &[], &["m"]).await;
    assert!(
        matches!(node.first, Message::Registered(_)),
        "{:?}",
        node.first
    );
    node.heartbeat(0).await;

    let (status, body) = gw
        .admin_post(
            &format!("/admin/operators/{}/suspend", gw.operator_id),
            json!({}),
        )
        .await;
    let t0 = Instant::now();
    assert_eq!(status, 200, "{body}");

    let (reason, code, close_reason) = shutdown_and_close(&mut node).await;
    wait_gone(&gw, "op-node").await;
    let took = t0.elapsed();
    println!("operator suspension: node gone {took:?} after the admin call");
    assert!(took <= BOUND, "took {took:?}");
    // The node is told why, and the close says it was a revocation, not a routine shutdown.
    assert!(reason.starts_with("operator_suspended"), "{reason}");
    assert!(reason.contains(&gw.operator_id), "{reason}");
    assert_eq!(code, app_code::CLOSE_REVOKED);
    assert_eq!(close_reason, "operator_suspended");
    gw.stop().await;
}

/// Creates an API key through the admin API; returns (secret, id).
async fn new_key(gw: &TestGateway, tenant: &str) -> (String, String) {
    let (status, body) = gw
        .admin_post("/admin/api-keys", json!({"tenant": tenant}))
        .await;
    assert_eq!(status, 201, "{body}");
    (
        body["key"].as_str().unwrap().to_string(),
        body["info"]["id"].as_str().unwrap().to_string(),
    )
}

async fn token(tx: &mut quinn::SendStream, index: u32) {
    let t = Message::Token(Token {
        index,
        text: format!(" t{index}"),
        node_elapsed_us: 0,
    });
    send(tx, &t).await.unwrap();
}

/// Waits (bounded) until the gateway resets or stops the node's session stream.
async fn node_stream_reset(rx: &mut FramedRecv) {
    let r = tokio::time::timeout(BOUND * 2, rx.next())
        .await
        .expect("the node's session stream was not reset");
    assert!(r.is_err(), "expected a reset, got {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_api_key_ends_its_inference_streams_within_1s() {
    let gw = TestGateway::start(slow_heartbeats).await;
    let node = RawNode::connect_with(&gw, "inf-1", ip(DE), &gw.token, &[], &["m"]).await;
    assert!(
        matches!(node.first, Message::Registered(_)),
        "{:?}",
        node.first
    );
    let (key, key_id) = new_key(&gw, "tenant-revoked").await;
    let body = json!({"model": "m", "stream": true, "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();

    // An SSE stream over HTTP, one token in.
    let url = gw.api_url("/v1/chat/completions");
    let (k, b) = (key.clone(), body.clone());
    let http = tokio::spawn(async move { Http::new().stream(&url, &k, &b, &[]).await });
    let (mut http_tx, mut http_rx, open) = node.accept_session().await;
    assert!(matches!(open.kind, SessionKind::Inference { .. }));
    token(&mut http_tx, 0).await;
    let resp = tokio::time::timeout(Duration::from_secs(10), http)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut sse = resp.into_body();
    let mut seen = String::new();
    use http_body_util::BodyExt;
    while !seen.contains(" t0") {
        let f = sse.frame().await.unwrap().unwrap();
        if let Some(d) = f.data_ref() {
            seen.push_str(&String::from_utf8_lossy(d));
        }
    }

    // The same over QUIC.
    let client = native_client(&gw, FR_CLIENT).await;
    let mut quic = client.infer(&key, &body).await.unwrap();
    let (mut quic_tx, mut quic_rx, _) = node.accept_session().await;
    token(&mut quic_tx, 0).await;
    assert!(matches!(
        quic.next().await.unwrap(),
        Some(InferEvent::Started(_))
    ));
    assert!(matches!(
        quic.next().await.unwrap(),
        Some(InferEvent::Token(_))
    ));

    let (status, b) = gw
        .admin_post(&format!("/admin/api-keys/{key_id}/revoke"), json!({}))
        .await;
    let t0 = Instant::now();
    assert_eq!(status, 200, "{b}");

    // HTTP: an in-band error event with the code, then the stream ends.
    let sse_end = async {
        let mut tail = String::new();
        while let Some(f) = sse.frame().await {
            if let Some(d) = f.unwrap().data_ref() {
                tail.push_str(&String::from_utf8_lossy(d));
            }
        }
        tail
    };
    let tail = tokio::time::timeout(BOUND * 2, sse_end)
        .await
        .expect("the SSE stream did not end");
    // QUIC: `Error{code: "key_revoked"}`.
    let quic_end = tokio::time::timeout(BOUND * 2, quic.next())
        .await
        .expect("the QUIC stream did not end")
        .unwrap();
    // The node's streams are reset (which aborts its backend work).
    node_stream_reset(&mut http_rx).await;
    node_stream_reset(&mut quic_rx).await;
    let took = t0.elapsed();
    println!("key revocation: inference streams ended {took:?} after the admin call");
    assert!(took <= BOUND, "took {took:?}");
    let event: Value = tail
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find_map(|d| {
            serde_json::from_str::<Value>(d)
                .ok()
                .filter(|v| v.get("error").is_some())
        })
        .unwrap_or_else(|| panic!("no error event in {tail:?}"));
    assert_eq!(event["error"]["code"], "key_revoked", "{event}");
    match quic_end {
        Some(InferEvent::Error(e)) => assert_eq!(e.code, "key_revoked"),
        other => panic!("expected Error{{key_revoked}}, got {other:?}"),
    }

    // The key cache does not keep accepting it.
    let (status, _) = gw
        .http
        .post(&gw.api_url("/v1/chat/completions"), Some(&key), &body, &[])
        .await;
    assert_eq!(status, 401);
    gw.stop().await;
}

/// Chromium's offer for the player page (recvonly video, data channel `input`).
const CHROMIUM_OFFER: &str = include_str!("../../browser/chromium-156-offer.sdp");

/// A WHEP offer (the common client forces a JSON content type).
async fn whep_offer(url: String, key: String) -> (u16, String) {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = hyper::Request::builder()
        .method("POST")
        .uri(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/sdp")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            CHROMIUM_OFFER,
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits (bounded) for the gateway's `Close` on a node's game session stream.
async fn node_told_to_close(rx: &mut FramedRecv) -> String {
    tokio::time::timeout(BOUND * 2, async {
        loop {
            match rx.next().await {
                Ok(Some(Message::Close(c))) => return c.reason,
                Ok(Some(_)) => continue,
                other => panic!("session stream ended without Close: {other:?}"),
            }
        }
    })
    .await
    .expect("the node was not told to close the session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_api_key_ends_its_game_sessions_within_1s() {
    let gw = TestGateway::start(slow_heartbeats).await;
    let node = RawNode::connect_with(&gw, "game-1", ip(DE), &gw.token, &["arena"], &[]).await;
    assert!(
        matches!(node.first, Message::Registered(_)),
        "{:?}",
        node.first
    );
    let (key, key_id) = new_key(&gw, "tenant-revoked").await;

    // A native player.
    let client = native_client(&gw, FR_CLIENT).await;
    let params = PlayParams {
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
    };
    let k = key.clone();
    let play = tokio::spawn(async move {
        let s = client.play(&k, params).await;
        (client, s)
    });
    let (_native_tx, mut native_rx, open) = node.accept_session().await;
    assert!(matches!(open.kind, SessionKind::Game(_)));
    let (_client, session) = tokio::time::timeout(Duration::from_secs(10), play)
        .await
        .unwrap()
        .unwrap();
    let mut session = session.unwrap();

    // A browser player (WHEP); its browser never needs to connect for the session to exist.
    let whep = tokio::spawn(whep_offer(
        gw.api_url("/v1/games/arena/whep?width=320&height=180&fps=30"),
        key.clone(),
    ));
    let (_web_tx, mut web_rx, _) = node.accept_session().await;
    let (status, answer) = tokio::time::timeout(Duration::from_secs(20), whep)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        gw.admin_get("/admin/sessions").await["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let (status, b) = gw
        .admin_post(&format!("/admin/api-keys/{key_id}/revoke"), json!({}))
        .await;
    let t0 = Instant::now();
    assert_eq!(status, 200, "{b}");

    // The native player is told, with the reason.
    let ended = tokio::time::timeout(BOUND * 2, async {
        loop {
            match session.next_control().await.unwrap() {
                Some(ControlEvent::Ended(e)) => return e.reason,
                Some(ControlEvent::Error(e)) => return e.code,
                Some(_) => continue,
                None => panic!("control stream ended without Ended"),
            }
        }
    })
    .await
    .expect("the native session did not end");
    // The node is told to stop both sessions.
    let native_close = node_told_to_close(&mut native_rx).await;
    let web_close = node_told_to_close(&mut web_rx).await;
    // And both are gone from the gateway, the browser's peer connection included.
    let start = Instant::now();
    loop {
        let live = gw.admin_get("/admin/sessions").await["data"]
            .as_array()
            .unwrap()
            .len();
        let peers = gw.shared.webrtc.len();
        if live == 0 && peers == 0 {
            break;
        }
        assert!(
            start.elapsed() < BOUND * 2,
            "{live} sessions and {peers} peers still live"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t0.elapsed();
    println!("key revocation: game sessions ended {took:?} after the admin call");
    assert!(took <= BOUND, "took {took:?}");
    assert_eq!(ended, "key_revoked");
    assert_eq!(native_close, "key_revoked");
    assert_eq!(web_close, "key_revoked");
    gw.stop().await;
}
