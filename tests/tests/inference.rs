//! Inference end to end: HTTP (OpenAI shapes, SSE) and QUIC clients through the gateway to edge
//! nodes; failover, in-band errors, cancellation, trusted-proxy handling, limits, metering.

mod common;

use common::*;
use http_body_util::BodyExt;
use nearpath_config::BackendConfig;
use nearpath_protocol::message::{Accepted, Message, Token};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::MAX_REQUEST_FRAME;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn chat(model: &str, stream: bool, max_tokens: u32) -> String {
    json!({"model": model, "stream": stream, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Say something"}]})
    .to_string()
}

/// Collects an SSE body into its `data:` payloads.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|s| s.to_string())
        .collect()
}

fn sse_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// A raw node that answers its next session with `script` and then dies or keeps listening.
async fn next_session(raw: &RawNode) -> (quinn::SendStream, FramedRecv) {
    let (tx, rx) = raw.conn.accept_bi().await.unwrap();
    let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
    match framed.next().await.unwrap().unwrap() {
        Message::Open(_) => {}
        other => panic!("expected Open, got {other:?}"),
    }
    (tx, framed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_and_plain_chat_and_completions_have_openai_shapes() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let url = gw.api_url("/v1/chat/completions");

    let (status, headers, body) = gw
        .http
        .request("POST", &url, Some(API_KEY), Some(&chat("m", false, 5)), &[])
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.contains_key("x-request-id"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let plain_text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    let body_s = json!({"model": "m", "stream": true, "max_tokens": 5, "stream_options": {"include_usage": true},
                        "messages": [{"role": "user", "content": "Say something"}]})
    .to_string();
    let (status, headers, body) = gw
        .http
        .request("POST", &url, Some(API_KEY), Some(&body_s), &[])
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    // The simulator is deterministic: streaming and non-streaming produce the same text.
    assert_eq!(sse_text(&events), plain_text);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    let (status, _, body) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/completions"),
            Some(API_KEY),
            Some(&json!({"model": "m", "prompt": "once", "max_tokens": 3}).to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");

    let (status, body) = gw.http.get(&gw.api_url("/v1/models"), Some(API_KEY)).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["id"], "m");

    // Usage is metered by tenant and node. Records are written after the response (nobody waits
    // for the fsync), so poll the ledger briefly.
    let mut usage = Value::Null;
    for _ in 0..300 {
        usage = gw.admin_get("/admin/usage").await;
        let n = usage["by_tenant"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == "tenant-a")
            .map(|t| t["requests"].clone());
        if n == Some(json!(3)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tenant = usage["by_tenant"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == "tenant-a")
        .unwrap()
        .clone();
    assert_eq!(tenant["requests"], 3, "{usage}");
    assert_eq!(tenant["completion_tokens"], 13, "{usage}");
    let by_node = usage["by_node"].as_array().unwrap();
    assert_eq!(by_node[0]["key"], "de-1", "{usage}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_have_the_right_status_and_body() {
    let gw = TestGateway::start(|c| c.http.max_body_bytes = 2048).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let url = gw.api_url("/v1/chat/completions");
    let (s, _, b) = gw
        .http
        .request("POST", &url, Some("wrong"), Some(&chat("m", false, 2)), &[])
        .await;
    assert_eq!(s, 401, "{b}");
    let (s, _, b) = gw
        .http
        .request("POST", &url, None, Some(&chat("m", false, 2)), &[])
        .await;
    assert_eq!(s, 401, "{b}");
    let (s, _, b) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&chat("nope", false, 2)),
            &[],
        )
        .await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["code"],
        "model_not_found"
    );
    let (s, _, b) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some("{\"model\": \"m\", "),
            &[],
        )
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, _, b) = gw
        .http
        .request("POST", &url, Some(API_KEY), Some(&json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 7}).to_string()), &[])
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["param"],
        "temperature"
    );
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(4096)}]})
        .to_string();
    let (s, _, b) = gw
        .http
        .request("POST", &url, Some(API_KEY), Some(&big), &[])
        .await;
    assert_eq!(s, 413, "{b}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_rate_limit_is_429_with_retry_after() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let (s, key) = gw
        .admin_post(
            "/admin/api-keys",
            json!({"tenant": "slow", "requests_per_minute": 2}),
        )
        .await;
    assert_eq!(s, 201);
    let secret = key["key"].as_str().unwrap();
    let url = gw.api_url("/v1/chat/completions");
    for _ in 0..2 {
        let (s, _, b) = gw
            .http
            .request("POST", &url, Some(secret), Some(&chat("m", false, 1)), &[])
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, h, b) = gw
        .http
        .request("POST", &url, Some(secret), Some(&chat("m", false, 1)), &[])
        .await;
    assert_eq!(s, 429, "{b}");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geofence_uses_forwarded_headers_only_from_trusted_proxies() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let url = gw.api_url("/v1/chat/completions");
    // From the trusted proxy (127.0.0.1), the header places the client in KP: sanctions deny.
    let (s, h, b) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&chat("m", false, 1)),
            &[("x-forwarded-for", KP_CLIENT.0)],
        )
        .await;
    assert_eq!(s, 403, "{b}");
    assert_eq!(h["x-should-retry"], "false");
    let err: Value = serde_json::from_str(&b).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sanctions"),
        "{b}"
    );
    // The same header from an untrusted peer is ignored: the peer (FR) is served.
    let untrusted = Http::from(ip(FR_CLIENT));
    let (s, _, b) = untrusted
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&chat("m", false, 1)),
            &[("x-forwarded-for", KP_CLIENT.0)],
        )
        .await;
    assert_eq!(s, 200, "spoofed X-Forwarded-For must be ignored: {b}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dying_before_its_first_token_fails_over_invisibly() {
    let gw = TestGateway::start(|_| {}).await;
    // The raw node is nearest to the FR client, so it is tried first.
    let raw = RawNode::connect(&gw, "dies-first", ip(DE), "cpu").await;
    let mut good = TestNode::start(gw.node_config("us-1", &gw.token), ip(US_EAST));
    good.registered().await;
    let killer = tokio::spawn(async move {
        let (mut tx, _rx) = next_session(&raw).await;
        send(&mut tx, &Message::Accepted(Accepted { session_id: 0 }))
            .await
            .unwrap();
        // Dies after accepting, before any token.
        raw.conn.close(9u32.into(), b"crash");
        raw
    });
    let client = Http::from(ip(FR_CLIENT));
    let (s, _, b) = client
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&chat("m", true, 4)),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let events = sse_events(&b);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(!b.contains("\"error\""), "{b}");
    assert_eq!(sse_text(&events).split_whitespace().count(), 4);
    killer.await.unwrap();
    let (_, metrics) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    assert_eq!(
        metric(&metrics, "nearpath_inference_failovers_total"),
        Some(1.0)
    );
    good.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_failing_after_the_first_token_becomes_an_in_band_error() {
    let gw = TestGateway::start(|_| {}).await;
    let raw = RawNode::connect(&gw, "dies-later", ip(DE), "cpu").await;
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let script = tokio::spawn(async move {
        let (mut tx, _rx) = next_session(&raw).await;
        send(&mut tx, &Message::Accepted(Accepted { session_id: 0 }))
            .await
            .unwrap();
        send(
            &mut tx,
            &Message::Token(Token {
                index: 0,
                text: " hello".into(),
                node_elapsed_us: 1,
            }),
        )
        .await
        .unwrap();
        // Die once the client has seen the token (so the failure is after the first token).
        let _ = kill_rx.await;
        raw.conn.close(9u32.into(), b"crash");
        raw
    });
    let resp = gw
        .http
        .stream(
            &gw.api_url("/v1/chat/completions"),
            API_KEY,
            &chat("m", true, 4),
            &[],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut kill = Some(kill_tx);
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            text.push_str(&String::from_utf8_lossy(d));
        }
        if text.contains(" hello") {
            if let Some(k) = kill.take() {
                let _ = k.send(());
            }
        }
    }
    let events = sse_events(&text);
    assert_eq!(sse_text(&events), " hello");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"]["message"].is_string(), "{text}");
    script.await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_the_work_on_the_node_within_100ms() {
    let gw = TestGateway::start(|_| {}).await;
    let raw = RawNode::connect(&gw, "slow", ip(DE), "cpu").await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let (mut tx, mut rx) = next_session(&raw).await;
        send(&mut tx, &Message::Accepted(Accepted { session_id: 0 }))
            .await
            .unwrap();
        send(
            &mut tx,
            &Message::Token(Token {
                index: 0,
                text: " one".into(),
                node_elapsed_us: 1,
            }),
        )
        .await
        .unwrap();
        let _ = started_tx.send(());
        // Now the node "generates" slowly; the gateway must reset the stream when the client goes.
        let r = rx.next().await;
        let seen = Instant::now();
        (
            r.is_err() || matches!(r, Ok(None) | Ok(Some(Message::Close(_)))),
            seen,
            raw,
        )
    });
    let resp = gw
        .http
        .stream(
            &gw.api_url("/v1/chat/completions"),
            API_KEY,
            &chat("m", true, 100),
            &[],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    started_rx.await.unwrap();
    let dropped = Instant::now();
    drop(body);
    let (cancelled, seen, _raw) = tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .unwrap()
        .unwrap();
    assert!(cancelled, "the node's stream must be reset");
    let took = seen.saturating_duration_since(dropped);
    println!("cancellation reached the node after {took:?}");
    assert!(took < Duration::from_millis(100), "took {took:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_backend_streams_from_an_openai_server_on_the_node() {
    let gw = TestGateway::start(|_| {}).await;
    // A second "node process": the project's simulator behind its OpenAI HTTP listener.
    let mut upstream_cfg = gw.node_config("upstream-server", &gw.token);
    upstream_cfg.models[0].name = "sim-upstream".into();
    let registry =
        nearpath_edge_node::inference::ModelRegistry::from_config(&upstream_cfg.models, None)
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(nearpath_edge_node::inference::serve_openai(
        listener,
        std::sync::Arc::new(registry),
        stop.clone(),
    ));

    let mut cfg = gw.node_config("de-up", &gw.token);
    cfg.models[0].backend = BackendConfig::Upstream {
        base_url: format!("http://{upstream_addr}/v1"),
        api_key: None,
        upstream_model: Some("sim-upstream".into()),
        timeout_ms: 10_000,
    };
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let (s, _, b) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&chat("m", true, 6)),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let through_gateway = sse_text(&sse_events(&b));
    // Straight to the upstream server: the same deterministic text.
    let body = json!({"model": "sim-upstream", "stream": false, "max_tokens": 6,
                      "messages": [{"role": "user", "content": "Say something"}]})
    .to_string();
    let (s, direct) = gw
        .http
        .post(
            &format!("http://{upstream_addr}/v1/chat/completions"),
            None,
            &body,
            &[],
        )
        .await;
    assert_eq!(s, 200, "{direct}");
    let direct: Value = serde_json::from_str(&direct).unwrap();
    assert_eq!(
        through_gateway,
        direct["choices"][0]["message"]["content"].as_str().unwrap()
    );
    node.stop().await.unwrap();
    stop.cancel();
    let _ = server.await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_quic_clients_stream_tokens() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let client = nearpath_protocol::Client::connect(
        gw.addrs.quic,
        "localhost",
        nearpath_protocol::ServerVerify::PinnedSha256(gw.sha),
    )
    .await
    .unwrap();
    let mut stream = client.infer(API_KEY, &chat("m", true, 5)).await.unwrap();
    let mut text = String::new();
    let mut done = false;
    while let Some(ev) = stream.next().await.unwrap() {
        match ev {
            nearpath_protocol::InferEvent::Token(t) => text.push_str(&t.text),
            nearpath_protocol::InferEvent::Done(_) => {
                done = true;
                break;
            }
            _ => {}
        }
    }
    assert!(done);
    assert_eq!(text.split_whitespace().count(), 5, "{text:?}");
    // Bad key: an error event, not a hang.
    let mut bad = client.infer("wrong", &chat("m", true, 5)).await.unwrap();
    let mut saw_error = false;
    while let Ok(Some(ev)) = bad.next().await {
        if let nearpath_protocol::InferEvent::Error(e) = ev {
            assert_eq!(e.code, "unauthorized");
            saw_error = true;
        }
    }
    assert!(saw_error);
    node.stop().await.unwrap();
    gw.stop().await;
}

/// A real edge node with `slots` inference slots (the gateway's and the node's own limit) whose
/// simulator takes a little while per request, so that concurrent requests overlap.
fn node_with_slots(gw: &TestGateway, id: &str, slots: u32) -> nearpath_config::NodeConfig {
    let mut cfg = gw.node_config(id, &gw.token);
    cfg.capacity.inference_concurrency = slots;
    cfg.models[0].max_concurrency = slots;
    cfg.models[0].backend = BackendConfig::Sim {
        ttft_ms: 20,
        tokens_per_s: 200.0,
        seed: 1,
    };
    cfg
}

/// A raw node serving `models` with one inference slot, kept alive; its connection serves
/// sessions by hand through the returned clone.
async fn one_slot_node(
    gw: &TestGateway,
    id: &str,
    models: &[&str],
) -> (quinn::Connection, tokio::task::JoinHandle<RawNode>) {
    let reg = Registration::new(id, &gw.token)
        .gpu("cpu", "cpu", 1)
        .models(models, 1);
    let raw = RawNode::register(gw, ip(DE), reg.message()).await;
    let conn = raw.conn.clone();
    (conn, raw.keep_alive())
}

/// Accepts the next session on `conn` and holds it without a token; returns when accepted.
async fn accept_and_hold(conn: &quinn::Connection) -> (quinn::SendStream, FramedRecv) {
    let (mut tx, rx) = conn.accept_bi().await.unwrap();
    let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
    assert!(matches!(framed.next().await, Ok(Some(Message::Open(_)))));
    send(&mut tx, &Message::Accepted(Accepted { session_id: 0 }))
        .await
        .unwrap();
    (tx, framed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_free_slots_are_queued_and_all_complete() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(node_with_slots(&gw, "de-1", 2), ip(DE));
    node.registered().await;
    let url = gw.api_url("/v1/chat/completions");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                Http::new()
                    .request("POST", &url, Some(API_KEY), Some(&chat("m", true, 3)), &[])
                    .await
            })
        })
        .collect();
    for t in tasks {
        let (s, _, b) = t.await.unwrap();
        assert_eq!(s, 200, "{b}");
        let events = sse_events(&b);
        assert_eq!(events.last().unwrap(), "[DONE]", "{b}");
        assert!(!b.contains("\"error\""), "{b}");
        assert_eq!(sse_text(&events).split_whitespace().count(), 3);
    }
    // Twenty requests on two slots: most of them waited in the queue.
    let (_, metrics) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    let queued = metric(&metrics, "nearpath_inference_queue_wait_seconds_count").unwrap_or(0.0);
    assert!(queued >= 1.0, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "nearpath_inference_requests_total{api=\"http\",outcome=\"rate_limited\"}"
        ),
        // Listed from start, and still 0: no request was refused.
        Some(0.0)
    );
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_past_queue_max_wait_ms_is_429_with_retry_after() {
    let gw = TestGateway::start(|c| c.inference.queue_max_wait_ms = 1_500).await;
    let (conn, alive) = one_slot_node(&gw, "one-slot", &["m"]).await;
    let url = gw.api_url("/v1/chat/completions");
    // The node's one slot is taken by a request it accepted and stalls on.
    let holder = {
        let url = url.clone();
        tokio::spawn(async move {
            Http::new()
                .request("POST", &url, Some(API_KEY), Some(&chat("m", true, 3)), &[])
                .await
        })
    };
    let held = accept_and_hold(&conn).await;
    // A second request waits in the queue, visible in the admin node listing.
    let waiting = {
        let url = url.clone();
        tokio::spawn(async move {
            Http::new()
                .request("POST", &url, Some(API_KEY), Some(&chat("m", true, 3)), &[])
                .await
        })
    };
    eventually(
        "the request to be queued",
        Duration::from_secs(5),
        || async { (gw.admin_get("/admin/nodes").await["queue_depth"]["m"] == 1).then_some(()) },
    )
    .await;
    let (_, metrics) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    assert_eq!(
        metric(&metrics, "nearpath_inference_queue_depth{model=\"m\"}"),
        Some(1.0),
        "{metrics}"
    );
    let (s, h, b) = waiting.await.unwrap();
    assert_eq!(s, 429, "{b}");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "retry-after {retry}");
    assert!(b.contains("queued for"), "{b}");
    assert!(b.contains("at capacity"), "{b}");
    // It left the queue.
    assert_eq!(gw.admin_get("/admin/nodes").await["queue_depth"], json!({}));
    holder.abort();
    drop(held);
    alive.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_while_queued_leaves_the_queue_at_once() {
    let gw = TestGateway::start(|_| {}).await;
    let (conn, alive) = one_slot_node(&gw, "one-slot", &["m"]).await;
    let url = gw.api_url("/v1/chat/completions");
    let holder = {
        let url = url.clone();
        tokio::spawn(async move {
            Http::new()
                .request("POST", &url, Some(API_KEY), Some(&chat("m", true, 3)), &[])
                .await
        })
    };
    let held = accept_and_hold(&conn).await;
    let waiting = {
        let url = url.clone();
        tokio::spawn(async move {
            Http::new()
                .request("POST", &url, Some(API_KEY), Some(&chat("m", true, 3)), &[])
                .await
        })
    };
    eventually(
        "the request to be queued",
        Duration::from_secs(5),
        || async { (gw.admin_get("/admin/nodes").await["queue_depth"]["m"] == 1).then_some(()) },
    )
    .await;
    // The client disconnects: its request leaves the queue (well before the 10 s wait ends).
    waiting.abort();
    eventually("the queue to empty", Duration::from_secs(5), || async {
        (gw.admin_get("/admin/nodes").await["queue_depth"] == json!({})).then_some(())
    })
    .await;
    holder.abort();
    drop(held);
    alive.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_failing_every_request_is_ejected_and_skipped() {
    let gw = TestGateway::start(|_| {}).await;
    // The failing node is nearest to the FR client, so it is tried first until ejected.
    let reg = Registration::new("bad", &gw.token)
        .gpu("cpu", "cpu", 1)
        .models(&["m"], 4);
    let bad = RawNode::register(&gw, ip(DE), reg.message()).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (opened, _opened_rx) = tokio::sync::mpsc::unbounded_channel();
    let serving = nearpath_tests::fake_node::Serving {
        games: nearpath_tests::fake_node::OnOpen::Accept,
        inference: nearpath_tests::fake_node::OnOpen::Refuse(
            nearpath_protocol::message::RefuseCode::Internal,
        ),
        answer: nearpath_tests::fake_node::Answer {
            tokens: 0,
            usage: (0, 0),
        },
    };
    tokio::spawn(nearpath_tests::fake_node::serve_sessions(
        bad.conn.clone(),
        serving,
        opened,
        stop.clone(),
    ));
    let alive = bad.keep_alive();
    let mut good = TestNode::start(gw.node_config("us-1", &gw.token), ip(US_EAST));
    good.registered().await;
    let client = Http::from(ip(FR_CLIENT));
    let url = gw.api_url("/v1/chat/completions");
    let failovers = || async {
        let (_, m) = gw.http.get(&gw.admin_url("/metrics"), None).await;
        metric(&m, "nearpath_inference_failovers_total").unwrap_or(0.0)
    };
    // Five consecutive failures (the default) eject it; every request is still served.
    for _ in 0..5 {
        let (s, _, b) = client
            .request("POST", &url, Some(API_KEY), Some(&chat("m", false, 2)), &[])
            .await;
        assert_eq!(s, 200, "{b}");
    }
    assert_eq!(failovers().await, 5.0);
    // Later requests go to the healthy node directly.
    for _ in 0..5 {
        let (s, _, b) = client
            .request("POST", &url, Some(API_KEY), Some(&chat("m", false, 2)), &[])
            .await;
        assert_eq!(s, 200, "{b}");
    }
    assert_eq!(failovers().await, 5.0);
    let view = gw.admin_get("/admin/nodes/bad").await;
    let live = if view["live"].is_object() {
        &view["live"]
    } else {
        &view
    };
    assert_eq!(live["ejections"], 1, "{view}");
    assert!(live["ejected_until_ms"].as_u64().is_some(), "{view}");
    let nodes = gw.admin_get("/admin/nodes").await;
    let us = nodes["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "us-1")
        .unwrap();
    assert_eq!(
        (us["ejections"].clone(), us["ejected_until_ms"].clone()),
        (json!(0), Value::Null)
    );
    let (_, m) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    assert_eq!(
        metric(&m, "nearpath_inference_node_ejections_total"),
        Some(1.0)
    );
    assert_eq!(metric(&m, "nearpath_inference_nodes_ejected"), Some(1.0));
    stop.cancel();
    alive.abort();
    good.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_capacity_is_served_by_its_fallback_with_a_header() {
    let gw = TestGateway::start(|c| {
        c.inference.queue_max_depth = 0;
        c.inference
            .fallbacks
            .insert("absent".into(), vec!["m".into()]);
        c.inference
            .fallbacks
            .insert("big".into(), vec!["ghost".into(), "m".into()]);
        c.inference
            .fallbacks
            .insert("lonely".into(), vec!["ghost".into()]);
    })
    .await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let url = gw.api_url("/v1/chat/completions");
    // No node serves `absent`: `m` does, and says so.
    let (s, h, b) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&chat("absent", false, 2)),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(h["x-nearpath-fallback-model"], "m");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["model"], "m");
    // Streaming too: every chunk names the fallback.
    let (s, h, b) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&chat("absent", true, 2)),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(h["x-nearpath-fallback-model"], "m");
    let first: Value = serde_json::from_str(&sse_events(&b)[0]).unwrap();
    assert_eq!(first["model"], "m");
    // A model served normally has no header.
    let (s, h, _) = gw
        .http
        .request("POST", &url, Some(API_KEY), Some(&chat("m", false, 2)), &[])
        .await;
    assert_eq!(s, 200);
    assert!(!h.contains_key("x-nearpath-fallback-model"));
    // `big` is saturated (its node's one slot is held, and its queue holds nobody): its first
    // fallback does not exist, its second serves.
    let (conn, alive) = one_slot_node(&gw, "big-node", &["big"]).await;
    let holder = {
        let url = url.clone();
        tokio::spawn(async move {
            Http::new()
                .request(
                    "POST",
                    &url,
                    Some(API_KEY),
                    Some(&chat("big", true, 3)),
                    &[],
                )
                .await
        })
    };
    let held = accept_and_hold(&conn).await;
    let (s, h, b) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&chat("big", false, 2)),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(h["x-nearpath-fallback-model"], "m");
    // A fallback that is absent too: the original error.
    let (s, h, b) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&chat("lonely", false, 2)),
            &[],
        )
        .await;
    assert_eq!(s, 404, "{b}");
    assert!(b.contains("lonely"), "{b}");
    assert!(!h.contains_key("x-nearpath-fallback-model"));
    let (_, m) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    assert_eq!(
        metric(
            &m,
            "nearpath_inference_fallbacks_total{from=\"absent\",to=\"m\"}"
        ),
        Some(2.0)
    );
    holder.abort();
    drop(held);
    alive.abort();
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_stream_cap_applies_before_queueing() {
    let gw = TestGateway::start(|_| {}).await;
    let (conn, alive) = one_slot_node(&gw, "one-slot", &["m"]).await;
    let (s, v) = gw
        .admin_post(
            "/admin/api-keys",
            json!({"tenant": "capped", "max_concurrent_streams": 2}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().unwrap().to_string();
    let url = gw.api_url("/v1/chat/completions");
    let spawn = |key: String| {
        let url = url.clone();
        tokio::spawn(async move {
            Http::new()
                .request("POST", &url, Some(&key), Some(&chat("m", true, 3)), &[])
                .await
        })
    };
    // One request holds the node's slot, a second waits in the queue...
    let holder = spawn(key.clone());
    let held = accept_and_hold(&conn).await;
    let waiting = spawn(key.clone());
    eventually(
        "the request to be queued",
        Duration::from_secs(5),
        || async { (gw.admin_get("/admin/nodes").await["queue_depth"]["m"] == 1).then_some(()) },
    )
    .await;
    // ...and a third of the same key is over its cap of 2: refused at once, never queued.
    let started = Instant::now();
    let (s, _, b) = gw
        .http
        .request("POST", &url, Some(&key), Some(&chat("m", true, 3)), &[])
        .await;
    assert_eq!(s, 429, "{b}");
    assert!(b.contains("concurrency_limit_exceeded"), "{b}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(gw.admin_get("/admin/nodes").await["queue_depth"]["m"], 1);
    waiting.abort();
    holder.abort();
    drop(held);
    alive.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_client_is_told_the_fallback_model_in_infer_started() {
    let gw = TestGateway::start(|c| {
        c.inference
            .fallbacks
            .insert("absent".into(), vec!["m".into()]);
    })
    .await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let client = native_client(&gw, FR_CLIENT).await;
    let mut stream = client
        .infer(API_KEY, &chat("absent", true, 3))
        .await
        .unwrap();
    let (mut started, mut done) = (None, false);
    while let Some(ev) = stream.next().await.unwrap() {
        match ev {
            nearpath_protocol::InferEvent::Started(s) => started = Some(s.model),
            nearpath_protocol::InferEvent::Done(_) => {
                done = true;
                break;
            }
            nearpath_protocol::InferEvent::Error(e) => panic!("{e:?}"),
            _ => {}
        }
    }
    assert!(done);
    assert_eq!(started.as_deref(), Some("m"));
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_client_that_closes_while_queued_leaves_the_queue_at_once() {
    let gw = TestGateway::start(|_| {}).await;
    let (conn, alive) = one_slot_node(&gw, "one-slot", &["m"]).await;
    let url = gw.api_url("/v1/chat/completions");
    let holder = tokio::spawn(async move {
        Http::new()
            .request("POST", &url, Some(API_KEY), Some(&chat("m", true, 3)), &[])
            .await
    });
    let held = accept_and_hold(&conn).await;
    let client = native_client(&gw, FR_CLIENT).await;
    let _queued = client.infer(API_KEY, &chat("m", true, 3)).await.unwrap();
    eventually(
        "the request to be queued",
        Duration::from_secs(5),
        || async { (gw.admin_get("/admin/nodes").await["queue_depth"]["m"] == 1).then_some(()) },
    )
    .await;
    client.close().await;
    eventually("the queue to empty", Duration::from_secs(5), || async {
        (gw.admin_get("/admin/nodes").await["queue_depth"] == json!({})).then_some(())
    })
    .await;
    holder.abort();
    drop(held);
    alive.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_the_key_may_not_use_leaves_the_original_error() {
    let gw = TestGateway::start(|c| {
        c.inference
            .fallbacks
            .insert("absent".into(), vec!["m".into()]);
    })
    .await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    // A key allowed `absent` but not its fallback `m`.
    let (s, v) = gw
        .admin_post(
            "/admin/api-keys",
            json!({"tenant": "narrow", "allowed_models": ["absent"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let key = v["key"].as_str().unwrap().to_string();
    let url = gw.api_url("/v1/chat/completions");
    let (s, h, b) = gw
        .http
        .request(
            "POST",
            &url,
            Some(&key),
            Some(&chat("absent", false, 2)),
            &[],
        )
        .await;
    assert_eq!(s, 404, "{b}");
    assert!(b.contains("model_not_found"), "{b}");
    assert!(!h.contains_key("x-nearpath-fallback-model"));
    // The same request with a key allowed both is served by the fallback.
    let (s, h, b) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&chat("absent", false, 2)),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(h["x-nearpath-fallback-model"], "m");
    node.stop().await.unwrap();
    gw.stop().await;
}

/// Answers the next session on a fake node with one token and `Done`; returns its `Open`.
async fn answer_one(node: &RawNode) -> nearpath_protocol::message::Open {
    let (mut tx, _rx, open) = node.accept_session().await;
    send(
        &mut tx,
        &Message::Token(Token {
            index: 0,
            text: " hi".into(),
            node_elapsed_us: 1,
        }),
    )
    .await
    .unwrap();
    let done = nearpath_protocol::message::Done {
        finish_reason: "stop".into(),
        prompt_tokens: 1,
        completion_tokens: 1,
    };
    send(&mut tx, &Message::Done(done)).await.unwrap();
    let _ = tx.finish();
    open
}

/// A fake node serving `m` that declares `caps` for it.
async fn node_with_caps(
    gw: &TestGateway,
    id: &str,
    at: (&str, &str, f64, f64),
    caps: nearpath_protocol::ModelCaps,
) -> RawNode {
    let mut reg = nearpath_tests::fake_node::Registration::new(id, &gw.token)
        .gpu("cpu", "cpu", 1)
        .models(&["m"], 4)
        .message();
    reg.workloads.model_caps = vec![caps];
    RawNode::register(gw, ip(at), reg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_needing_a_capability_no_node_declares_is_a_400_naming_the_param() {
    let gw = TestGateway::start(|_| {}).await;
    // A real node whose simulator model declares nothing: the gateway must not send it tools.
    let mut cfg = gw.node_config("de-1", &gw.token);
    cfg.models[0].capabilities = Some(vec![]);
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let tools = json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "tool_choice": "required"})
    .to_string();
    let (status, _, body) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&tools),
            &[],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "unsupported_parameter");
    assert_eq!(v["error"]["param"], "tools");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model `m` does not support tools"),
        "{body}"
    );
    // Hostile shapes are refused by the parser, naming the parameter.
    let bad = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "bad name!"}}]})
    .to_string();
    let (status, _, body) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&bad),
            &[],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["param"], "tools[0].function.name");
    // The same refusal over QUIC, and a plain request still works.
    let client = nearpath_protocol::Client::connect(
        gw.addrs.quic,
        "localhost",
        nearpath_protocol::ServerVerify::PinnedSha256(gw.sha),
    )
    .await
    .unwrap();
    let mut stream = client.infer(API_KEY, &tools).await.unwrap();
    let mut refused = None;
    while let Ok(Some(ev)) = stream.next().await {
        if let nearpath_protocol::InferEvent::Error(e) = ev {
            refused = Some(e);
        }
    }
    let refused = refused.expect("an error event");
    assert!(refused.message.contains("'tools'"), "{refused:?}");
    assert!(!refused.retryable);
    let (status, _, body) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&chat("m", false, 3)),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // `/v1/models` tells clients what the model can do.
    let (_, body) = gw.http.get(&gw.api_url("/v1/models"), Some(API_KEY)).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["capabilities"], json!([]), "{body}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_needing_a_capability_are_routed_only_to_nodes_declaring_it() {
    use nearpath_protocol::ModelCaps;
    let gw = TestGateway::start(|_| {}).await;
    // The client is in France: the German node is the nearer, the American one declares
    // logprobs.
    let near = node_with_caps(&gw, "near-de", DE, ModelCaps::NONE).await;
    let far = node_with_caps(&gw, "far-us", US_EAST, ModelCaps::LOGPROBS).await;
    let http = Http::from(ip(FR_CLIENT));
    let url = gw.api_url("/v1/chat/completions");
    let logprobs = json!({"model": "m", "stream": true, "logprobs": true, "top_logprobs": 2,
        "messages": [{"role": "user", "content": "x"}]})
    .to_string();
    for (body, node, name) in [
        (chat("m", true, 1), &near, "near-de"),
        (logprobs.clone(), &far, "far-us"),
        (logprobs, &far, "far-us"),
        (chat("m", true, 1), &near, "near-de"),
    ] {
        let (answered, (status, _, text)) = tokio::join!(
            answer_one(node),
            http.request("POST", &url, Some(API_KEY), Some(&body), &[])
        );
        assert_eq!(status, 200, "{name}: {text}");
        let nearpath_protocol::message::SessionKind::Inference { request_json, .. } = answered.kind
        else {
            panic!("not an inference session")
        };
        assert_eq!(request_json, body, "{name} got the request");
    }
    // Both nodes serve `m`; the listing shows the union of what they declare.
    let (_, body) = http.get(&gw.api_url("/v1/models"), Some(API_KEY)).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["capabilities"], json!(["logprobs"]), "{body}");
    // Admins see what each node declares.
    let one = gw.admin_get("/admin/nodes/far-us").await;
    assert_eq!(
        one["live"]["workloads"]["model_capabilities"],
        json!([["logprobs"]]),
        "{one}"
    );
    // Needing more than any node declares: refused before a node is tried.
    let (status, _, text) = http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(
                &json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]})
                    .to_string(),
            ),
            &[],
        )
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"param\":\"n\""), "{text}");
    drop((near, far));
    gw.stop().await;
}
