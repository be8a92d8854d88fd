//! Routing across a federation through the gateway-to-gateway trunk (ALPN `nearpath-peer/1`):
//! two gateways sharing one store and one directory, a node attached only to B, clients at A.
//!
//! The gateway and node directories are an in-memory fake both gateways read (the store's
//! directory is another item of the same issue); everything else is real: QUIC with pinned
//! certificates both ways, a real edge node, the HTTP API, the shared SQLite ledger.

mod common;

use common::fleet::{federated_gateway, now_ms, Fleet, Member};
use common::*;
use http_body_util::BodyExt;
use nearpath_gateway::store::UsageKind;
use nearpath_protocol::app_code::{CLOSE_PEER_REFUSED, STREAM_REFUSED};
use nearpath_protocol::message::{Message, Open, PeerOpen, RefuseCode, SessionKind};
use nearpath_protocol::openai::Endpoint;
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::tls::{sha256_hex, TransportOptions};
use nearpath_protocol::{ALPN_PEER, MAX_REQUEST_FRAME, PROTOCOL_VERSION};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A federated gateway `id` reading `fleet`; the trunk notices a silent peer after
/// `lease_ms`.
async fn federated(
    path: PathBuf,
    id: &str,
    fleet: &Arc<Fleet>,
    lease_ms: u64,
) -> (TestGateway, Member) {
    federated_gateway(path, id, fleet, lease_ms, |_| {}).await
}

const HOUR_MS: u64 = 3_600_000;

fn chat(stream: bool, max_tokens: u32) -> String {
    serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hello over the trunk"}],
        "stream": stream,
        "max_tokens": max_tokens,
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_at_a_is_served_by_the_node_attached_to_b_and_billed_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, 3_000).await;
    let (gw_a, a) = federated(path, "gw-a", &fleet, 3_000).await;
    *fleet.gateways.lock().unwrap() =
        vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
    let mut node = TestNode::start(gw_b.node_config("b-node-1", &gw_b.token), ip(DE));
    node.registered().await;
    *fleet.nodes.lock().unwrap() = vec![b.inference_node("b-node-1")];
    a.read_directory().await;

    let (status, body) = gw_a
        .http
        .post(
            &gw_a.api_url("/v1/chat/completions"),
            Some(API_KEY),
            &chat(true, 8),
            &[("x-forwarded-for", FR_CLIENT.0)],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let text: String = events
        .iter()
        .filter(|e| **e != "[DONE]")
        .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(!text.is_empty(), "no tokens relayed: {body}");
    assert!(!body.contains("\"error\""), "{body}");

    // Billed once, by A, against the node on B: the ledger both gateways share holds exactly
    // one record of the request, and B counted no request of its own.
    let records = eventually("the usage record", Duration::from_secs(10), || async {
        let rows: Vec<_> = gw_a
            .store
            .list_usage(100)
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == UsageKind::Inference)
            .collect();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].node_id, "b-node-1");
    assert_eq!(records[0].outcome, "ok");
    assert!(records[0].completion_tokens > 0);
    let page_b = gw_b.admin_get_text("/metrics").await;
    assert!(
        // Every outcome's series exists from start; all must still be 0.
        !page_b
            .lines()
            .any(|l| l.starts_with("nearpath_inference_requests_total{") && !l.ends_with(" 0")),
        "B metered a trunk request: {page_b}"
    );
    // A second request reuses the trunk connection (one per peer pair).
    let (status, body) = gw_a
        .http
        .post(
            &gw_a.api_url("/v1/chat/completions"),
            Some(API_KEY),
            &chat(false, 4),
            &[("x-forwarded-for", FR_CLIENT.0)],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    node.stop().await.unwrap();
    gw_a.stop().await;
    gw_b.stop().await;
}

/// Dials `to` over the trunk ALPN presenting `identity` (or no certificate) and returns the
/// connection once the handshake is done.
async fn dial_peer(
    to: &Member,
    identity: Option<&nearpath_gateway::tls::CertPair>,
) -> quinn::Connection {
    let transport = TransportOptions::default();
    let config = match identity {
        Some(cert) => nearpath_protocol::tls::client_config_with_identity(
            to.sha,
            &[ALPN_PEER],
            &transport,
            cert.chain.clone(),
            cert.key.clone_key(),
        )
        .unwrap(),
        None => nearpath_protocol::tls::client_config(
            nearpath_protocol::tls::ServerVerify::PinnedSha256(to.sha),
            &[ALPN_PEER],
        )
        .unwrap(),
    };
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint
        .connect_with(config, to.quic, "localhost")
        .unwrap()
        .await
        .unwrap()
}

/// The application close a refused peer gets (bounded wait).
async fn refusal(conn: &quinn::Connection) -> (u64, String) {
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the gateway neither refused nor served the peer");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("not an application close: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_live_pinned_certificate_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(dir.path().join("fleet.db"), "gw-b", &fleet, 3_000).await;
    let stranger = nearpath_gateway::tls::self_signed(&["localhost"]).unwrap();
    let expired = nearpath_gateway::tls::self_signed(&["localhost"]).unwrap();
    let mut gone = b.record(now_ms() - 1);
    gone.id = "gw-gone".into();
    gone.cert_sha256 = expired.sha256_hex();
    *fleet.gateways.lock().unwrap() = vec![b.record(now_ms() + HOUR_MS), gone];
    b.read_directory().await;

    let code = CLOSE_PEER_REFUSED.into_inner();
    let conn = dial_peer(&b, Some(&stranger)).await;
    assert_eq!(refusal(&conn).await, (code, "peer_unknown_pin".into()));
    let conn = dial_peer(&b, None).await;
    assert_eq!(refusal(&conn).await, (code, "peer_no_certificate".into()));
    let conn = dial_peer(&b, Some(&expired)).await;
    assert_eq!(refusal(&conn).await, (code, "peer_expired".into()));
    gw_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_certificate_is_not_the_pinned_one_is_never_sent_a_request() {
    // A's directory pins another certificate for B: A's dial fails the TLS pin check, the
    // request fails quickly with a retryable error, and B's node never sees it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, 3_000).await;
    let (gw_a, a) = federated(path, "gw-a", &fleet, 3_000).await;
    let mut forged = b.record(now_ms() + HOUR_MS);
    forged.cert_sha256 = sha256_hex(&[0x5a; 32]);
    *fleet.gateways.lock().unwrap() = vec![a.record(now_ms() + HOUR_MS), forged];
    let mut node = TestNode::start(gw_b.node_config("b-node-1", &gw_b.token), ip(DE));
    node.registered().await;
    *fleet.nodes.lock().unwrap() = vec![b.inference_node("b-node-1")];
    a.read_directory().await;

    let started = Instant::now();
    let (status, headers, body) = gw_a
        .http
        .request(
            "POST",
            &gw_a.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&chat(false, 4)),
            &[("x-forwarded-for", FR_CLIENT.0)],
        )
        .await;
    assert!(status >= 500, "{status} {body}");
    assert_eq!(
        headers.get("x-should-retry").and_then(|v| v.to_str().ok()),
        Some("true"),
        "{status} {body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // Nothing was served: the only usage record is A's failure, against no node.
    let records = eventually("the usage record", Duration::from_secs(10), || async {
        let rows = gw_a.store.list_usage(100).unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert!(records.iter().all(|r| r.outcome != "ok"), "{records:?}");
    node.stop().await.unwrap();
    gw_a.stop().await;
    gw_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_trunk_request_naming_a_node_that_is_not_attached_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(dir.path().join("fleet.db"), "gw-b", &fleet, 3_000).await;
    // A genuine, live peer of the federation: only its requests are at fault.
    let peer_cert = nearpath_gateway::tls::self_signed(&["localhost"]).unwrap();
    let mut peer = b.record(now_ms() + HOUR_MS);
    peer.id = "gw-t".into();
    peer.cert_sha256 = peer_cert.sha256_hex();
    *fleet.gateways.lock().unwrap() = vec![b.record(now_ms() + HOUR_MS), peer];
    b.read_directory().await;
    let conn = dial_peer(&b, Some(&peer_cert)).await;

    let open = Message::Open(Open {
        session_id: 7,
        kind: SessionKind::Inference {
            model: "m".into(),
            endpoint: Endpoint::Chat,
            request_json: chat(true, 4),
            request_id: "req_forged".into(),
            traceparent: None,
        },
    });
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    let peer_open = Message::PeerOpen(PeerOpen {
        protocol_version: PROTOCOL_VERSION,
        node_id: "ghost".into(),
    });
    send(&mut tx, &peer_open).await.unwrap();
    send(&mut tx, &open).await.unwrap();
    let mut rx = FramedRecv::new(rx, MAX_REQUEST_FRAME);
    match tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .unwrap()
    {
        Ok(Some(Message::Refused(r))) => {
            assert_eq!(r.code, RefuseCode::UnknownWorkload);
            assert!(r.reason.contains("not attached"), "{}", r.reason);
        }
        other => panic!("expected Refused, got {other:?}"),
    }

    // A stream that does not start with PeerOpen is reset at once.
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    send(&mut tx, &open).await.unwrap();
    let mut rx = FramedRecv::new(rx, MAX_REQUEST_FRAME);
    match tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .unwrap()
    {
        Err(nearpath_protocol::StreamError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code, STREAM_REFUSED)
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    // The connection itself stays up for the peer's good requests.
    assert!(conn.close_reason().is_none());
    gw_b.stop().await;
}

#[test]
fn b_dying_mid_stream_gives_the_client_a_retryable_error_quickly() {
    // B runs on its own runtime so that the test can kill it the way kill -9 would: its tasks
    // and sockets vanish without a QUIC close, and A must notice through the trunk's idle
    // timeout (the federation lease, 1 s here).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (b_tx, b_rx) = std::sync::mpsc::channel();
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let b_thread = {
        let (path, fleet) = (path.clone(), fleet.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let (gw_b, b) = rt.block_on(federated(path, "gw-b", &fleet, 1_000));
            let mut node_config = gw_b.node_config("b-node-1", &gw_b.token);
            if let nearpath_config::BackendConfig::Sim { tokens_per_s, .. } =
                &mut node_config.models[0].backend
            {
                // Slow enough that the stream is still running when B dies.
                *tokens_per_s = 20.0;
            }
            b_tx.send((b, node_config)).unwrap();
            let _ = kill_rx.recv();
            rt.shutdown_background();
            drop(gw_b);
        })
    };
    let (b, node_config) = b_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (gw_a, a) = federated(path, "gw-a", &fleet, 1_000).await;
        *fleet.gateways.lock().unwrap() =
            vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
        let mut node = TestNode::start(node_config, ip(DE));
        node.registered().await;
        *fleet.nodes.lock().unwrap() = vec![b.inference_node("b-node-1")];
        a.read_directory().await;

        let resp = gw_a
            .http
            .stream(
                &gw_a.api_url("/v1/chat/completions"),
                API_KEY,
                &chat(true, 400),
                &[("x-forwarded-for", FR_CLIENT.0)],
            )
            .await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut seen = String::new();
        // The first tokens arrive through the trunk...
        while !seen.contains("\"content\":\"") {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("no token within 10 s")
                .expect("stream ended early")
                .unwrap();
            if let Some(d) = frame.data_ref() {
                seen.push_str(&String::from_utf8_lossy(d));
            }
        }
        // ... then B dies.
        kill_tx.send(()).unwrap();
        let killed = Instant::now();
        let rest = tokio::time::timeout(Duration::from_secs(10), async {
            let mut rest = String::new();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            rest.push_str(&String::from_utf8_lossy(d));
                        }
                    }
                    Err(_) => break,
                }
            }
            rest
        })
        .await
        .expect("the client's stream hung after B died");
        let took = killed.elapsed();
        // Within the lease (1 s) and a generous margin for a loaded machine, never a hang.
        assert!(took < Duration::from_secs(5), "{took:?}");
        let error = rest
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .find(|v| v.get("error").is_some())
            .unwrap_or_else(|| panic!("no in-band error after B died: {rest}"));
        // A 5xx-class upstream failure: OpenAI clients retry it.
        assert_eq!(error["error"]["type"], "server_error", "{error}");
        node.shutdown.cancel();
        gw_a.stop().await;
    });
    b_thread.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_outside_a_federation_does_not_speak_the_peer_alpn() {
    let gw = TestGateway::start(|_| {}).await;
    let config = nearpath_protocol::tls::client_config(
        nearpath_protocol::tls::ServerVerify::PinnedSha256(gw.sha),
        &[ALPN_PEER],
    )
    .unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        endpoint
            .connect_with(config, gw.addrs.quic, "localhost")
            .unwrap(),
    )
    .await
    .expect("handshake neither failed nor finished");
    assert!(r.is_err(), "a standalone gateway accepted the peer ALPN");
    gw.stop().await;
}
