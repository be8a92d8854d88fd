//! Inference through node blips (issue 10, item 4: honest statuses) and duplicate node ids
//! (item 7: no flapping). Measured before: ~2,900 × 404 `model_not_found` with
//! `x-should-retry: false` per 3 s blackout of the only node, `/v1/models` empty during it, and
//! two nodes with the same id kicking each other out 167 times in 68 s.

use crate::common::*;
use nearpath_edge_node::NodeStatus;
use nearpath_protocol::message::{Message, RejectCode};
use nearpath_protocol::{Client, InferEvent, ServerVerify};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn chat(model: &str, max_tokens: u32) -> String {
    json!({"model": model, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Say something"}]})
    .to_string()
}

/// Polls (bounded) until the admin node list satisfies `pred`.
async fn wait_ids(gw: &TestGateway, what: &str, pred: impl Fn(&[String]) -> bool) {
    gw.wait_nodes(what, Duration::from_secs(20), pred).await;
}

/// `/v1/models` as (id, available) pairs.
async fn models(gw: &TestGateway) -> Vec<(String, Option<bool>)> {
    let (status, body) = gw.http.get(&gw.api_url("/v1/models"), Some(API_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["available"].as_bool(),
            )
        })
        .collect()
}

/// One chat completion over HTTP: (status, retry-after, x-should-retry, error code).
async fn complete(http: &Http, gw: &TestGateway, model: &str) -> Answer {
    let (status, headers, body) = http
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&chat(model, 3)),
            &[],
        )
        .await;
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let code = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    Answer {
        status,
        retry_after: header("retry-after"),
        should_retry: header("x-should-retry"),
        code,
    }
}

#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    should_retry: Option<String>,
    code: Option<String>,
}

impl Answer {
    /// A retryable 503 as an OpenAI SDK reads it.
    fn is_retryable_503(&self) -> bool {
        self.status == 503
            && self.code.as_deref() == Some("model_unavailable")
            && self.should_retry.as_deref() == Some("true")
            && self
                .retry_after
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|s| s >= 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3s_blackout_of_the_only_inference_node_never_answers_404() {
    let gw = TestGateway::start(|_| {}).await;
    let (node, relay) = node_behind_relay(&gw, "de-1", 10, |_| {}).await;
    assert_eq!(complete(&gw.http, &gw, "m").await.status, 200);
    let gw = Arc::new(gw);
    let blackout = Duration::from_secs(3);
    let t0 = Instant::now();
    relay.blackout(blackout);
    // Four clients in tight loops through the blip, until each has had a 200 after the path
    // came back (bounded: the node may need its QUIC idle timeout to notice the dead path).
    let mut loops = Vec::new();
    for _ in 0..4 {
        let gw = gw.clone();
        loops.push(tokio::spawn(async move {
            let http = Http::new();
            let mut answers: Vec<(Duration, Duration, Answer)> = Vec::new();
            loop {
                let sent = t0.elapsed();
                let a = complete(&http, &gw, "m").await;
                let ok_after = a.status == 200 && sent > blackout;
                answers.push((sent, t0.elapsed(), a));
                if ok_after || t0.elapsed() > Duration::from_secs(30) {
                    return answers;
                }
            }
        }));
    }
    let mut all = Vec::new();
    for l in loops {
        all.extend(l.await.unwrap());
    }
    let wait_ms = gw.shared.config.inference.unavailable_wait_ms;
    let bound = Duration::from_millis(
        wait_ms + gw.shared.config.inference.max_attempts as u64 * 2_000 + 1_000,
    );
    let mut refused = 0;
    for (sent, done, a) in &all {
        assert_ne!(
            a.status, 404,
            "a 404 during the blip: {a:?} (sent at {sent:?})"
        );
        assert!(
            a.status == 200 || a.is_retryable_503(),
            "every answer is 200 or a retryable 503: {a:?} (sent at {sent:?})"
        );
        assert!(*done - *sent <= bound, "answered after {:?}", *done - *sent);
        refused += (a.status == 503) as u32;
    }
    assert!(refused > 0, "the blip was never seen: {all:?}");
    // After the path returned, requests succeed (each loop ended on a 200 sent after it).
    let last_ok = all
        .iter()
        .filter(|(sent, _, a)| a.status == 200 && *sent > blackout)
        .count();
    assert_eq!(last_ok, 4, "{all:?}");
    let back = all
        .iter()
        .filter(|(_, done, a)| a.status == 200 && *done > blackout)
        .map(|(_, done, _)| *done - blackout)
        .min();
    println!(
        "{} requests through a 3 s blackout: {refused} × 503 model_unavailable, 0 × 404; \
         first 200 {back:?} after the path returned",
        all.len()
    );
    drop(relay);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_keeps_a_model_during_a_blip() {
    let gw = TestGateway::start(|_| {}).await;
    let (node, relay) = node_behind_relay(&gw, "de-1", 11, |_| {}).await;
    assert_eq!(models(&gw).await, [("m".to_string(), Some(true))]);
    relay.blackout_forever();
    wait_ids(&gw, "the node to be declared gone", |ids| ids.is_empty()).await;
    // No node serves it, yet it is listed, marked unavailable.
    assert_eq!(models(&gw).await, [("m".to_string(), Some(false))]);
    relay.restore();
    let start = Instant::now();
    loop {
        if models(&gw).await == [("m".to_string(), Some(true))] {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never available again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_never_served_is_still_404() {
    let gw = TestGateway::start(|c| c.inference.unavailable_wait_ms = 0).await;
    let raw = RawNode::connect_serving(&gw, "de-1", ip(DE), "cpu", &["m"]).await;
    assert!(matches!(raw.first, Message::Registered(_)));
    let a = complete(&gw.http, &gw, "never-served").await;
    assert_eq!(
        (a.status, a.code.as_deref(), a.should_retry.as_deref()),
        (404, Some("model_not_found"), Some("false"))
    );
    // The node leaves: its model is a blip (503), a model nobody served is still 404, and
    // neither is listed as available.
    raw.conn.close(0u32.into(), b"bye");
    wait_ids(&gw, "the node to leave", |ids| ids.is_empty()).await;
    let a = complete(&gw.http, &gw, "m").await;
    assert!(a.is_retryable_503(), "{a:?}");
    let a = complete(&gw.http, &gw, "never-served").await;
    assert_eq!(
        (a.status, a.code.as_deref()),
        (404, Some("model_not_found"))
    );
    assert_eq!(models(&gw).await, [("m".to_string(), Some(false))]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_served_longer_ago_than_the_grace_window_is_404_again() {
    let gw = TestGateway::start(|c| {
        c.inference.unavailable_wait_ms = 0;
        c.inference.model_grace_s = 0;
    })
    .await;
    let raw = RawNode::connect_serving(&gw, "de-1", ip(DE), "cpu", &["m"]).await;
    raw.conn.close(0u32.into(), b"bye");
    wait_ids(&gw, "the node to leave", |ids| ids.is_empty()).await;
    let a = complete(&gw.http, &gw, "m").await;
    assert_eq!(
        (a.status, a.code.as_deref()),
        (404, Some("model_not_found"))
    );
    assert!(models(&gw).await.is_empty());
    gw.stop().await;
}

async fn quic_client(gw: &TestGateway) -> Client {
    Client::connect(
        gw.addrs.quic,
        "localhost",
        ServerVerify::PinnedSha256(gw.sha),
    )
    .await
    .unwrap()
}

/// The events of one QUIC inference request until it ends.
async fn quic_infer(client: &Client, model: &str) -> Vec<InferEvent> {
    let mut s = client.infer(API_KEY, &chat(model, 3)).await.unwrap();
    let mut out = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(20), s.next())
        .await
        .expect("the request hung")
        .unwrap()
    {
        out.push(ev);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackout_of_the_only_inference_node_is_a_retryable_error_over_quic() {
    let gw = TestGateway::start(|_| {}).await;
    let (node, relay) = node_behind_relay(&gw, "de-1", 12, |_| {}).await;
    let client = quic_client(&gw).await;
    assert!(matches!(
        quic_infer(&client, "m").await.last(),
        Some(InferEvent::Done(_))
    ));
    relay.blackout_forever();
    wait_ids(&gw, "the node to be declared gone", |ids| ids.is_empty()).await;
    let started = Instant::now();
    let events = quic_infer(&client, "m").await;
    match events.last() {
        Some(InferEvent::Error(e)) => {
            assert_eq!(
                (e.code.as_str(), e.retryable),
                ("model_unavailable", true),
                "{e:?}"
            );
        }
        other => panic!("expected a retryable error, got {other:?}"),
    }
    // It waited for the node (inference.unavailable_wait_ms) before answering, not longer.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(gw.shared.config.inference.unavailable_wait_ms),
        "{waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // A model never served is still `model_not_found`, not retryable.
    match quic_infer(&client, "never-served").await.last() {
        Some(InferEvent::Error(e)) => {
            assert_eq!((e.code.as_str(), e.retryable), ("model_not_found", false))
        }
        other => panic!("expected model_not_found, got {other:?}"),
    }
    relay.restore();
    drop(relay);
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_during_a_short_blip_waits_for_the_node_to_return() {
    let gw = TestGateway::start(|c| c.inference.unavailable_wait_ms = 10_000).await;
    let raw = RawNode::connect_serving(&gw, "de-1", ip(DE), "cpu", &["m"]).await;
    raw.conn.close(0u32.into(), b"blip");
    wait_ids(&gw, "the node to leave", |ids| ids.is_empty()).await;
    let client = quic_client(&gw).await;
    let mut s = client.infer(API_KEY, &chat("m", 3)).await.unwrap();
    // The request is held (no answer yet) while no node serves the model...
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.next())
            .await
            .is_err(),
        "answered before a node returned"
    );
    // ...and routed as soon as the node registers again (woken by the registration).
    let back = RawNode::connect_serving(&gw, "de-1", ip(DE), "cpu", &["m"]).await;
    assert!(matches!(back.first, Message::Registered(_)));
    let (mut tx, _rx, open) = back.accept_session().await;
    let token = Message::Token(nearpath_protocol::message::Token {
        index: 0,
        text: "hi".into(),
        node_elapsed_us: 1,
    });
    nearpath_protocol::stream::send(&mut tx, &token)
        .await
        .unwrap();
    let done = Message::Done(nearpath_protocol::message::Done {
        finish_reason: "stop".into(),
        prompt_tokens: 4,
        completion_tokens: 1,
    });
    nearpath_protocol::stream::send(&mut tx, &done)
        .await
        .unwrap();
    let _ = tx.finish();
    assert!(open.session_id != 0);
    let mut got_done = false;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .unwrap()
        .unwrap()
    {
        if let InferEvent::Error(e) = &ev {
            panic!("{e:?}");
        }
        got_done |= matches!(ev, InferEvent::Done(_));
    }
    assert!(got_done);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 7: duplicate node ids.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_the_same_id_do_not_flap() {
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("twin", &gw.token);
    // Slow tokens: one streaming request spans the whole overlap.
    cfg.models[0].backend = nearpath_config::BackendConfig::Sim {
        ttft_ms: 0,
        tokens_per_s: 10.0,
        seed: 1,
    };
    let mut first = TestNode::start(cfg.clone(), ip(DE));
    first.registered().await;
    let body = json!({"model": "m", "stream": true, "max_tokens": 60,
                      "messages": [{"role": "user", "content": "Say something"}]})
    .to_string();
    let resp = gw
        .http
        .stream(&gw.api_url("/v1/chat/completions"), API_KEY, &body, &[])
        .await;
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    });
    // The same node id, same operator, from elsewhere, for 5 s (time passing is the test).
    let mut second = TestNode::start(cfg, ip(US_EAST));
    let s = second
        .wait_status(|s| matches!(s, NodeStatus::Rejected { .. }))
        .await;
    assert!(
        matches!(
            s,
            NodeStatus::Rejected {
                code: RejectCode::Duplicate,
                ..
            }
        ),
        "{s:?}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The first never left: still registered, from DE, and the only registration.
    assert!(matches!(
        *first.status.borrow(),
        NodeStatus::Registered { .. }
    ));
    assert!(
        !first.status.has_changed().unwrap(),
        "the first node's status changed"
    );
    let nodes = gw.admin_get("/admin/nodes").await;
    assert_eq!(nodes["data"].as_array().unwrap().len(), 1);
    assert!(nodes["data"][0]["address"]
        .as_str()
        .unwrap()
        .starts_with(DE.0));
    let registrations = admin_metric(&gw, "nearpath_node_registrations_total").await;
    let refused = admin_metric(&gw, "nearpath_node_rejections_total{code=\"duplicate\"}").await;
    assert_eq!(registrations, 1.0);
    // The duplicate backs off (exponential, from 250 ms): a handful of tries, not a storm.
    assert!((1.0..=12.0).contains(&refused), "{refused} refusals in 5 s");
    let page = gw.admin_get_text("/metrics").await;
    assert!(
        !page
            .lines()
            .any(|l| l.starts_with("nearpath_node_disconnects_total") && !l.ends_with(" 0")),
        "a node was disconnected"
    );
    // The session on the first node survived the whole overlap.
    let sse = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .unwrap()
        .unwrap();
    assert!(
        sse.contains("[DONE]") && !sse.contains("\"error\""),
        "{sse}"
    );
    println!("duplicate refused {refused} times in 5 s; 1 registration");
    second.stop().await.ok();
    first.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_takes_over_its_stale_id_once() {
    // Slow eviction (10 s), so that the takeover, not the eviction, is what frees the id.
    let gw = TestGateway::start(|c| {
        c.nodes.heartbeat_ms = 500;
        c.nodes.missed_heartbeats_before_gone = 20;
    })
    .await;
    let mut old = RawNode::connect_serving(&gw, "phoenix", ip(DE), "cpu", &["m"]).await;
    assert!(matches!(old.first, Message::Registered(_)));
    let old_conn = old.conn.clone();
    // While the old connection heartbeats, a new one with its id is refused.
    let last_beat = Instant::now();
    old.heartbeat(0).await;
    let early = RawNode::connect_serving(&gw, "phoenix", ip(US_EAST), "cpu", &["m"]).await;
    match &early.first {
        Message::Rejected(r) => assert_eq!(r.code, RejectCode::Duplicate, "{}", r.reason),
        other => panic!("expected Rejected, got {}", other.name()),
    }
    // The old process "dies": its connection stays open (held in `old`) but says nothing more.
    let silent_since = last_beat;
    let new = loop {
        let n = RawNode::connect_serving(&gw, "phoenix", ip(US_EAST), "cpu", &["m"]).await;
        match &n.first {
            Message::Registered(_) => break n,
            Message::Rejected(r) => assert_eq!(r.code, RejectCode::Duplicate),
            other => panic!("unexpected {}", other.name()),
        }
        assert!(
            silent_since.elapsed() < Duration::from_secs(8),
            "never taken over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Taken over after two heartbeat intervals of silence, before the eviction (10 s).
    let took = silent_since.elapsed();
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    // The old connection is closed by the gateway; the id is the new one's.
    tokio::time::timeout(Duration::from_secs(5), old_conn.closed())
        .await
        .expect("the stale connection was not closed");
    let nodes = gw.admin_get("/admin/nodes").await;
    assert_eq!(nodes["data"].as_array().unwrap().len(), 1);
    assert!(nodes["data"][0]["address"]
        .as_str()
        .unwrap()
        .starts_with(US_EAST.0));
    assert_eq!(
        admin_metric(&gw, "nearpath_node_id_takeovers_total").await,
        1.0
    );
    // Once: while the new one is live, the old one coming back is refused, not a second swap.
    let beating = new.keep_alive();
    let again = RawNode::connect_serving(&gw, "phoenix", ip(DE), "cpu", &["m"]).await;
    assert!(matches!(&again.first, Message::Rejected(r) if r.code == RejectCode::Duplicate));
    assert_eq!(
        admin_metric(&gw, "nearpath_node_id_takeovers_total").await,
        1.0
    );
    assert_eq!(
        admin_metric(&gw, "nearpath_node_registrations_total").await,
        2.0
    );
    beating.abort();
    drop(old);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_node_that_does_not_answer_ends_in_failover_or_a_retryable_503() {
    let gw = TestGateway::start(|c| {
        c.inference.connect_timeout_ms = 500;
        c.inference.unavailable_wait_ms = 1_000;
    })
    .await;
    // A node that heartbeats (so it stays registered and live) but never takes a session: what
    // the gateway sees of a node whose path went dark between two heartbeats.
    let mute = RawNode::connect_serving(&gw, "de-mute", ip(DE), "cpu", &["m"]).await;
    let mute = mute.keep_alive();
    let client = Http::from(ip(FR_CLIENT));
    let started = Instant::now();
    let a = complete(&client, &gw, "m").await;
    let took = started.elapsed();
    // Alone: a retryable 503 within connect_timeout + unavailable_wait (+ margin), not a 504
    // after the 30 s first-token timeout.
    assert!(a.is_retryable_503(), "{a:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // With a working node farther away, the request fails over to it.
    let mut far = TestNode::start(gw.node_config("us-1", &gw.token), ip(US_EAST));
    far.registered().await;
    let started = Instant::now();
    let a = complete(&client, &gw, "m").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(admin_metric(&gw, "nearpath_inference_failovers_total").await >= 1.0);
    mute.abort();
    far.stop().await.unwrap();
    gw.stop().await;
}
