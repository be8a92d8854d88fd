//! Hostile tests: ledger (see hostile.rs). Usage a node inflates, keys that hoard sessions and
//! streams, a WHEP offer whose browser never comes, and a ledger that cannot commit.

#[allow(unused_imports)]
use crate::common::*;
use nearpath_config::BackendConfig;
use nearpath_protocol::message::{Accepted, Message, SessionKind};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::{ClientError, InferEvent, PlayParams, MAX_REQUEST_FRAME};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Chromium 156's offer for the player page; nothing ever answers its ICE checks.
const CHROMIUM_OFFER: &str = include_str!("../../browser/chromium-156-offer.sdp");

fn chat(max_tokens: u32, stream: bool) -> String {
    json!({"model": "m", "stream": stream, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Say something"}]})
    .to_string()
}

/// Creates an API key through the admin API with `fields` (caps, limits); returns its secret.
async fn new_key(gw: &TestGateway, fields: Value) -> String {
    let mut body = json!({"tenant": "hostile"});
    for (k, v) in fields.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = gw.admin_post("/admin/api-keys", body).await;
    assert_eq!(status, 201, "{v}");
    v["key"].as_str().unwrap().to_string()
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .map(|v| v["error"]["code"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn header<'a>(h: &'a hyper::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn metrics(gw: &TestGateway) -> String {
    gw.http.get(&gw.admin_url("/metrics"), None).await.1
}

/// Serves every inference session the gateway opens on `conn` with three tokens and a `Done`
/// claiming `u32::MAX` prompt and completion tokens (the shared fake node's lying answer).
fn serve_inflated_usage(conn: quinn::Connection) -> tokio::task::JoinHandle<()> {
    use nearpath_tests::fake_node::{serve_sessions, Answer, Serving};
    let serving = Serving::inference_only(Answer {
        tokens: 3,
        usage: (u32::MAX, u32::MAX),
    });
    let (opened, _) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(serve_sessions(conn, serving, opened, stop))
}

/// Accepts every game session the gateway opens on `conn` and holds it until the gateway
/// closes it (no frames: the tests here are about slots and metering, not video).
fn serve_silent_games(conn: quinn::Connection) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut tx, rx)) = conn.accept_bi().await {
            tokio::spawn(async move {
                let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
                let Ok(Some(Message::Open(open))) = framed.next().await else {
                    return;
                };
                assert!(matches!(open.kind, SessionKind::Game(_)));
                let _ = send(
                    &mut tx,
                    &Message::Accepted(Accepted {
                        session_id: open.session_id,
                    }),
                )
                .await;
                // Until `Close` or the stream's end.
                while let Ok(Some(m)) = framed.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
                let _ = tx.finish();
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_inflation_by_a_node_is_not_billed_and_is_an_sla_event() {
    let gw = TestGateway::start(|_| {}).await;
    // A realistic budget: the old gateway charged 2 x u32::MAX tokens and locked the key out
    // for about 30 days on the first request.
    let key = new_key(&gw, json!({"tokens_per_minute": 10_000})).await;
    let liar = RawNode::connect(&gw, "liar-1", ip(DE), "cpu").await;
    let sessions = serve_inflated_usage(liar.conn.clone());
    let alive = liar.keep_alive();

    let url = gw.api_url("/v1/chat/completions");
    // "Say something" is 13 bytes: 4 prompt tokens by the gateway's rule (bytes / 4, rounded up).
    for attempt in 0..2 {
        let (status, _, body) = gw
            .http
            .request("POST", &url, Some(&key), Some(&chat(16, false)), &[])
            .await;
        assert_eq!(status, 200, "request {attempt}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 3, "{body}");
        assert_eq!(v["usage"]["prompt_tokens"], 4, "{body}");
    }
    // The same over QUIC: the client is told (and billed) what was relayed.
    let client = native_client(&gw, FR_CLIENT).await;
    let mut s = client.infer(&key, &chat(16, true)).await.unwrap();
    let done = loop {
        match s.next().await.unwrap() {
            Some(InferEvent::Done(d)) => break d,
            Some(InferEvent::Error(e)) => panic!("{e:?}"),
            Some(_) => continue,
            None => panic!("no Done"),
        }
    };
    assert_eq!((done.prompt_tokens, done.completion_tokens), (4, 3));

    // Three usage records: gateway-counted, the node's claim kept beside it.
    let records = eventually("three usage records", Duration::from_secs(10), || async {
        let r = gw.store.list_usage(10).unwrap();
        (r.len() >= 3).then_some(r)
    })
    .await;
    for r in &records {
        assert_eq!((r.prompt_tokens, r.completion_tokens), (4, 3), "{r:?}");
        assert_eq!(r.node_completion_tokens, Some(u64::from(u32::MAX)), "{r:?}");
        assert_eq!(r.node_prompt_tokens, Some(u64::from(u32::MAX)), "{r:?}");
    }
    let summary = gw.store.usage_summary(None).unwrap();
    let tenant = summary
        .by_tenant
        .iter()
        .find(|t| t.key == "hostile")
        .unwrap();
    assert_eq!(tenant.completion_tokens, 9, "{summary:?}");

    // The disagreement is the node's SLA problem: a durable penalty and a metric.
    let penalties = eventually(
        "usage_mismatch penalties",
        Duration::from_secs(10),
        || async {
            let p = gw.store.list_penalties(Some("liar-1"), 10).unwrap();
            (p.len() >= 3).then_some(p)
        },
    )
    .await;
    assert!(
        penalties.iter().all(|p| p.kind == "usage_mismatch"),
        "{penalties:?}"
    );
    let page = metrics(&gw).await;
    assert_eq!(
        metric(
            &page,
            "nearpath_inference_usage_mismatches_total{field=\"completion\"}"
        ),
        Some(3.0),
        "{page}"
    );

    // And the key is not locked out.
    let (status, _, body) = gw
        .http
        .request("POST", &url, Some(&key), Some(&chat(16, false)), &[])
        .await;
    assert_eq!(status, 200, "{body}");
    alive.abort();
    sessions.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_cap_on_concurrent_inference_streams_over_http() {
    let gw = TestGateway::start(|_| {}).await;
    let key = new_key(&gw, json!({"max_concurrent_streams": 1})).await;
    let mut cfg = gw.node_config("de-1", &gw.token);
    // Slow enough that the first stream is still running while the second request arrives.
    cfg.models[0].backend = BackendConfig::Sim {
        ttft_ms: 0,
        tokens_per_s: 20.0,
        seed: 1,
    };
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let url = gw.api_url("/v1/chat/completions");

    let first = gw.http.stream(&url, &key, &chat(2000, true), &[]).await;
    assert_eq!(first.status(), 200);
    let (status, headers, body) = gw
        .http
        .request("POST", &url, Some(&key), Some(&chat(1, false)), &[])
        .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (429, "concurrency_limit_exceeded"),
        "{body}"
    );
    assert!(!header(&headers, "retry-after").is_empty());
    // Another key is not affected.
    let (status, _, body) = gw
        .http
        .request("POST", &url, Some(API_KEY), Some(&chat(1, false)), &[])
        .await;
    assert_eq!(status, 200, "{body}");

    // The client going away gives the stream back.
    drop(first);
    eventually(
        "the stream cap to be released",
        Duration::from_secs(10),
        || async {
            let (status, _, _) = gw
                .http
                .request("POST", &url, Some(&key), Some(&chat(1, false)), &[])
                .await;
            (status == 200).then_some(())
        },
    )
    .await;
    let page = metrics(&gw).await;
    let refused = metric(
        &page,
        "nearpath_key_cap_refusals_total{entry=\"http\",cap=\"streams\"}",
    );
    assert!(refused >= Some(1.0), "{page}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_caps_on_quic_play_sessions_and_session_starts() {
    let gw = TestGateway::start(|_| {}).await;
    let raw = RawNode::connect_games(&gw, "games-1", ip(DE), "cpu", &["arena"], 8).await;
    let games = serve_silent_games(raw.conn.clone());
    let alive = raw.keep_alive();
    let play = || PlayParams {
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
    };

    // One live session per key: the node has room for eight, the key gets one.
    let key = new_key(&gw, json!({"max_concurrent_sessions": 1})).await;
    let a = native_client(&gw, FR_CLIENT).await;
    let b = native_client(&gw, FR_CLIENT).await;
    let mut first = a.play(&key, play()).await.unwrap();
    match b.play(&key, play()).await {
        Err(ClientError::Refused {
            code, retryable, ..
        }) => {
            assert_eq!(code, "concurrency_limit_exceeded");
            assert!(retryable);
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a second session was started over the key's cap"),
    }
    first.close("done").await.unwrap();
    drop(first);
    let second = eventually(
        "the session cap to be released",
        Duration::from_secs(10),
        || {
            let (b, key) = (&b, &key);
            async move { b.play(key, play()).await.ok() }
        },
    )
    .await;
    drop(second);

    // Session starts per minute: two, then 429 with a wait.
    let key = new_key(
        &gw,
        json!({"max_concurrent_sessions": 10, "session_starts_per_minute": 2}),
    )
    .await;
    for _ in 0..2 {
        let c = native_client(&gw, FR_CLIENT).await;
        let mut s = c.play(&key, play()).await.unwrap();
        s.close("done").await.unwrap();
    }
    let c = native_client(&gw, FR_CLIENT).await;
    match c.play(&key, play()).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "rate_limit_exceeded"),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a third session start within a minute was allowed"),
    }
    alive.abort();
    games.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconnected_whep_offer_releases_its_slot_within_10_s_and_whep_is_capped_per_key() {
    // The defaults: `game.webrtc_connect_timeout_ms` is 10 s.
    let gw = TestGateway::start(|_| {}).await;
    // Room for two sessions on the node: the old gateway let two offers from one key hold both.
    let raw = RawNode::connect_games(&gw, "games-1", ip(DE), "cpu", &["arena"], 2).await;
    let games = serve_silent_games(raw.conn.clone());
    let alive = raw.keep_alive();
    let key = new_key(&gw, json!({"max_concurrent_sessions": 1})).await;
    let whep = gw.api_url("/v1/games/arena/whep?width=320&height=180&fps=30");
    let post_offer = |key: String| {
        let whep = whep.clone();
        async move { post_sdp(&whep, &key, CHROMIUM_OFFER).await }
    };

    let (status, _, body) = post_offer(key.clone()).await;
    assert_eq!(status, 201, "{body}");
    let answered = Instant::now();
    let (status, headers, body) = post_offer(key.clone()).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (429, "concurrency_limit_exceeded"),
        "{body}"
    );
    assert!(!header(&headers, "retry-after").is_empty());

    // Nobody completes ICE: the session ends and gives its node slot back within 10 s.
    eventually(
        "the unconnected session to end",
        Duration::from_secs(14),
        || async {
            let v = gw.admin_get("/admin/sessions").await;
            v["data"].as_array().unwrap().is_empty().then_some(())
        },
    )
    .await;
    let took = answered.elapsed();
    assert!(
        took <= Duration::from_millis(10_500),
        "released after {took:?}"
    );
    let (status, _, body) = post_offer(key.clone()).await;
    assert_eq!(status, 201, "the key's cap is free again: {body}");
    alive.abort();
    games.abort();
    gw.stop().await;
}

/// POSTs an SDP offer to a WHEP endpoint.
async fn post_sdp(url: &str, key: &str, sdp: &str) -> (u16, hyper::HeaderMap, String) {
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
            sdp.to_string(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("WHEP request timed out")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_fails_closed_when_the_ledger_cannot_commit() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let url = gw.api_url("/v1/chat/completions");
    let body = chat(2, false);
    let ask = || {
        gw.http
            .request("POST", &url, Some(API_KEY), Some(&body), &[])
    };
    let (status, _, body) = ask().await;
    assert_eq!(status, 200, "{body}");

    // Another process holds the database's write lock: no usage commit gets through (past the
    // store's busy timeout), as with a full disk.
    let holder = rusqlite::Connection::open(&gw.store_path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    // This one is served; its usage record cannot be committed.
    let (status, _, body) = ask().await;
    assert_eq!(status, 200, "{body}");
    let (headers, body) = eventually(
        "new work to be refused",
        Duration::from_secs(15),
        || async {
            let (status, headers, body) = ask().await;
            (status == 503).then_some((headers, body))
        },
    )
    .await;
    assert_eq!(error_code(&body), "ledger_unavailable", "{body}");
    assert_eq!(header(&headers, "x-should-retry"), "true");
    assert!(!header(&headers, "retry-after").is_empty());
    // Games are refused too.
    let client = native_client(&gw, FR_CLIENT).await;
    match client.play(API_KEY, PlayParams::hd("arena")).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "ledger_unavailable"),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a game session started while the ledger could not commit"),
    }
    let page = metrics(&gw).await;
    assert!(
        metric(&page, "nearpath_ledger_write_failures_total").unwrap_or(0.0) >= 1.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "nearpath_ledger_healthy"),
        Some(0.0),
        "{page}"
    );

    // The lock goes away: the writer's probe notices and work is accepted again.
    holder.execute_batch("ROLLBACK").unwrap();
    drop(holder);
    eventually(
        "work to be accepted again",
        Duration::from_secs(10),
        || async {
            let (status, _, _) = ask().await;
            (status == 200).then_some(())
        },
    )
    .await;
    let page = metrics(&gw).await;
    assert_eq!(
        metric(&page, "nearpath_ledger_healthy"),
        Some(1.0),
        "{page}"
    );
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_game_session_is_checkpointed_in_the_ledger_while_it_runs() {
    let gw = TestGateway::start(|c| c.game.usage_checkpoint_ms = 200).await;
    let raw = RawNode::connect_games(&gw, "games-1", ip(DE), "cpu", &["arena"], 2).await;
    let games = serve_silent_games(raw.conn.clone());
    let alive = raw.keep_alive();
    let client = native_client(&gw, FR_CLIENT).await;
    let mut session = client
        .play(
            API_KEY,
            PlayParams {
                game: "arena".into(),
                width: 320,
                height: 180,
                fps: 30,
                bitrate_kbps: 1000,
            },
        )
        .await
        .unwrap();
    let request_id = format!("game_{}", session.started().session_id);
    let rows = |id: String| {
        let store = gw.store.clone();
        async move {
            store
                .list_usage(100)
                .unwrap()
                .into_iter()
                .filter(|r| r.request_id == id)
                .collect::<Vec<_>>()
        }
    };
    // While the session runs, its row is there and keeps growing, in place.
    let first = eventually("a checkpoint row", Duration::from_secs(5), || async {
        let r = rows(request_id.clone()).await;
        (r.len() == 1 && r[0].outcome == "in_progress").then(|| r[0].clone())
    })
    .await;
    let later = eventually("a later checkpoint", Duration::from_secs(5), || async {
        let r = rows(request_id.clone()).await;
        assert_eq!(r.len(), 1, "one row per session: {r:?}");
        (r[0].gpu_seconds > first.gpu_seconds && r[0].outcome == "in_progress")
            .then(|| r[0].clone())
    })
    .await;
    assert_eq!(later.id, first.id);

    // The end finalises the same row: nothing counted twice.
    session.close("done").await.unwrap();
    let last = eventually("the final row", Duration::from_secs(5), || async {
        let r = rows(request_id.clone()).await;
        assert_eq!(r.len(), 1, "one row per session: {r:?}");
        (r[0].outcome != "in_progress").then(|| r[0].clone())
    })
    .await;
    assert_eq!(last.id, first.id);
    assert!(last.gpu_seconds >= later.gpu_seconds, "{last:?}");
    let summary = gw.store.usage_summary(None).unwrap();
    let tenant = summary
        .by_tenant
        .iter()
        .find(|t| t.key == "tenant-a")
        .unwrap();
    assert_eq!(tenant.requests, 1, "{summary:?}");
    alive.abort();
    games.abort();
    gw.stop().await;
}
