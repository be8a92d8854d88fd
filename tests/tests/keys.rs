//! API keys as a gateway's customers expect them (issue 12): a model allow-list on every entry
//! point, expiry, token and USD budgets per UTC day and month that hold across restarts and bill
//! only what the gateway relayed, the admin API's validation and the key usage report.

mod common;

use common::*;
use nearpath_config::{BackendConfig, ModelConfig, ModelPrice};
use nearpath_protocol::InferEvent;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A chat request for `model`; "Say something" is 13 bytes, so 4 prompt tokens by the
/// gateway's rule (bytes / 4, rounded up).
fn chat(model: &str, max_tokens: u32) -> String {
    json!({"model": model, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Say something"}]})
    .to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

const DAY_MS: u64 = 86_400_000;

/// Creates a key through the admin API with `fields`; returns (id, secret).
async fn new_key(gw: &TestGateway, fields: Value) -> (String, String) {
    let mut body = json!({"tenant": "customer"});
    for (k, v) in fields.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = gw.admin_post("/admin/api-keys", body).await;
    assert_eq!(status, 201, "{v}");
    (
        v["info"]["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

async fn admin_patch(gw: &TestGateway, path: &str, body: Value) -> (u16, Value) {
    let (status, _, text) = gw
        .http
        .request(
            "PATCH",
            &gw.admin_url(path),
            Some(ADMIN),
            Some(&body.to_string()),
            &[],
        )
        .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn post_chat(gw: &TestGateway, key: &str, body: &str) -> (u16, hyper::HeaderMap, Value) {
    let (status, headers, text) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(key),
            Some(body),
            &[],
        )
        .await;
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

fn header<'a>(h: &'a hyper::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The outcome of one native QUIC inference request: the text, or the error's code.
async fn quic_infer(gw: &TestGateway, key: &str, body: &str) -> Result<String, String> {
    let client = native_client(gw, FR_CLIENT).await;
    let mut s = client.infer(key, body).await.unwrap();
    let mut text = String::new();
    loop {
        match s.next().await {
            Ok(Some(InferEvent::Token(t))) => text.push_str(&t.text),
            Ok(Some(InferEvent::Done(_))) => return Ok(text),
            Ok(Some(InferEvent::Error(e))) => return Err(e.code),
            Ok(Some(_)) => {}
            Ok(None) => return Err("ended without Done".into()),
            Err(e) => return Err(format!("client error: {e}")),
        }
    }
}

/// Polls the key usage report until `pred` holds for it.
async fn usage_when(
    gw: &TestGateway,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/admin/api-keys/{id}/usage");
    eventually(what, Duration::from_secs(10), || async {
        let v = gw.admin_get(&path).await;
        pred(&v).then_some(v)
    })
    .await
}

/// A sim model `name` for the test node.
fn sim(name: &str) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        max_concurrency: 8,
        backend: BackendConfig::Sim {
            ttft_ms: 0,
            tokens_per_s: 0.0,
            seed: 1,
        },
        responses: Default::default(),
        capabilities: None,
        weights_bytes: None,
        params_b: None,
        dtype: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_allow_list_holds_on_http_quic_and_the_model_list() {
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("de-1", &gw.token);
    cfg.models.extend([sim("org/a"), sim("org/b")]);
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let (id, key) = new_key(&gw, json!({"allowed_models": ["org/*"]})).await;

    // Inside the list (by its prefix entry): served.
    let (s, _, v) = post_chat(&gw, &key, &chat("org/a", 2)).await;
    assert_eq!(s, 200, "{v}");
    // Outside it: 403 naming the model, on chat and completions, whether or not it exists.
    for model in ["m", "org", "not-served"] {
        let (s, h, v) = post_chat(&gw, &key, &chat(model, 2)).await;
        assert_eq!(s, 403, "{model}: {v}");
        assert_eq!(v["error"]["code"], "model_not_allowed", "{v}");
        assert_eq!(v["error"]["param"], "model", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("{model:?}")),
            "{v}"
        );
        assert_eq!(header(&h, "x-should-retry"), "false");
    }
    let body = json!({"model": "m", "prompt": "hi", "max_tokens": 2}).to_string();
    let (s, _, text) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/completions"),
            Some(&key),
            Some(&body),
            &[],
        )
        .await;
    assert_eq!(s, 403, "{text}");
    // Native QUIC: the same rule, its own code.
    assert_eq!(
        quic_infer(&gw, &key, &chat("m", 2)).await,
        Err("model_not_allowed".to_string())
    );
    assert!(quic_infer(&gw, &key, &chat("org/b", 2)).await.is_ok());
    // The model list shows only what the key may use; another key sees everything.
    let list = |k: String| {
        let gw = &gw;
        async move {
            let (s, body) = gw.http.get(&gw.api_url("/v1/models"), Some(&k)).await;
            assert_eq!(s, 200, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            let mut ids: Vec<String> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(list(key.clone()).await, ["org/a", "org/b"]);
    assert_eq!(list(API_KEY.to_string()).await, ["m", "org/a", "org/b"]);
    // Lifting the list (null) applies from the next request.
    let (s, v) = admin_patch(
        &gw,
        &format!("/admin/api-keys/{id}"),
        json!({"allowed_models": null}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["allowed_models"], json!([]));
    let (s, _, v) = post_chat(&gw, &key, &chat("m", 2)).await;
    assert_eq!(s, 200, "{v}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_401_saying_so_and_an_expiry_in_the_past_is_refused_at_creation() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let (s, v) = gw
        .admin_post(
            "/admin/api-keys",
            json!({"tenant": "t", "expires_at_ms": now_ms() - 1_000}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expires_at_ms"),
        "{v}"
    );
    let expires = now_ms() + 3_600_000;
    let (id, key) = new_key(&gw, json!({"expires_at_ms": expires})).await;
    let shown = gw.admin_get(&format!("/admin/api-keys/{id}")).await;
    assert_eq!(shown["expires_at_ms"], expires, "{shown}");
    let (s, _, v) = post_chat(&gw, &key, &chat("m", 2)).await;
    assert_eq!(s, 200, "{v}");
    // An admin moves the expiry into the past: the key stops at once.
    let past = now_ms() - 1_000;
    let (s, v) = admin_patch(
        &gw,
        &format!("/admin/api-keys/{id}"),
        json!({"expires_at_ms": past}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, h, v) = post_chat(&gw, &key, &chat("m", 2)).await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"]["code"], "key_expired", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("expired at") && msg.contains(&past.to_string()),
        "{msg}"
    );
    assert_eq!(header(&h, "x-should-retry"), "false");
    let (s, _) = gw.http.get(&gw.api_url("/v1/models"), Some(&key)).await;
    assert_eq!(s, 401);
    assert_eq!(
        quic_infer(&gw, &key, &chat("m", 2)).await,
        Err("key_expired".to_string())
    );
    // Lifting the expiry brings it back.
    let (s, _) = admin_patch(
        &gw,
        &format!("/admin/api-keys/{id}"),
        json!({"expires_at_ms": null}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, v) = post_chat(&gw, &key, &chat("m", 2)).await;
    assert_eq!(s, 200, "{v}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_daily_token_budget_gets_429_until_midnight_utc() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let (id, key) = new_key(&gw, json!({"budget_tokens_per_day": 5})).await;
    // 4 prompt + 3 completion tokens: over the budget, but it was under it when admitted.
    let (s, _, v) = post_chat(&gw, &key, &chat("m", 3)).await;
    assert_eq!(s, 200, "{v}");
    let usage = usage_when(&gw, &id, "the spend", |v| {
        v["budgets"][0]["spent"].as_f64() == Some(7.0)
    })
    .await;
    assert_eq!(
        usage["budgets"][0],
        json!({"budget": "tokens_per_day", "limit": 5.0, "spent": 7.0, "remaining": 0.0,
               "exceeded": true, "resets_at": usage["budgets"][0]["resets_at"],
               "resets_at_ms": usage["budgets"][0]["resets_at_ms"]})
    );
    let (s, h, v) = post_chat(&gw, &key, &chat("m", 3)).await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("budget_tokens_per_day: spent 7 of 5 tokens"),
        "{msg}"
    );
    assert_eq!(header(&h, "x-should-retry"), "false");
    let retry: u64 = header(&h, "retry-after").parse().unwrap();
    let now = now_ms();
    let to_midnight = ((now / DAY_MS + 1) * DAY_MS - now).div_ceil(1000);
    assert!(
        retry.abs_diff(to_midnight) <= 30,
        "retry-after {retry}, {to_midnight} s to midnight"
    );
    assert_eq!(
        quic_infer(&gw, &key, &chat("m", 3)).await,
        Err("budget_exceeded".to_string())
    );
    assert!(
        admin_metric(
            &gw,
            "nearpath_key_budget_refusals_total{budget=\"tokens_per_day\"}"
        )
        .await
            >= 2.0
    );
    // Other keys are not affected; raising the budget lets the key in again.
    let (s, _, _) = post_chat(&gw, API_KEY, &chat("m", 3)).await;
    assert_eq!(s, 200);
    let (s, _) = admin_patch(
        &gw,
        &format!("/admin/api-keys/{id}"),
        json!({"budget_tokens_per_day": 1000}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, v) = post_chat(&gw, &key, &chat("m", 3)).await;
    assert_eq!(s, 200, "{v}");
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usd_month_spend_survives_a_gateway_restart_on_the_same_sqlite_file() {
    // 0.1 USD per prompt token and 0.2 per completion token: 4 + 3 tokens cost 1.0 USD.
    let priced = |c: &mut nearpath_config::GatewayConfig| {
        c.inference.prices.insert(
            "m".into(),
            ModelPrice {
                prompt_usd_per_mtok: 100_000.0,
                completion_usd_per_mtok: 200_000.0,
            },
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.db");
    let gw = TestGateway::start_at(path.clone(), priced).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let (id, key) = new_key(&gw, json!({"budget_usd_per_month": 0.99})).await;
    let (s, _, v) = post_chat(&gw, &key, &chat("m", 3)).await;
    assert_eq!(s, 200, "{v}");
    // The spend book is charged at once; the month's cost comes from the ledger, whose row
    // commits a moment later: wait for both (a CI run saw the book ahead of the ledger).
    let usage = usage_when(&gw, &id, "the spend and its ledger row", |v| {
        v["budgets"][0]["spent"].as_f64().unwrap_or(0.0) > 0.0
            && v["month"]["cost_usd"].as_f64().unwrap_or(0.0) > 0.0
    })
    .await;
    assert!(
        (usage["month"]["cost_usd"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{usage}"
    );
    node.stop().await.unwrap();
    gw.stop().await;

    // A new gateway on the same file knows the month's spend before any request.
    let gw = TestGateway::start_at(path, priced).await;
    let usage = gw.admin_get(&format!("/admin/api-keys/{id}/usage")).await;
    let b = &usage["budgets"][0];
    assert_eq!(b["budget"], "usd_per_month", "{usage}");
    assert!((b["spent"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{usage}");
    assert_eq!(b["exceeded"], true, "{usage}");
    let (s, h, v) = post_chat(&gw, &key, &chat("m", 3)).await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budget_usd_per_month"),
        "{v}"
    );
    let retry: u64 = header(&h, "retry-after").parse().unwrap();
    let resets_at_ms = b["resets_at_ms"].as_u64().unwrap();
    let expected = resets_at_ms.saturating_sub(now_ms()).div_ceil(1000);
    assert!(retry.abs_diff(expected) <= 30, "{retry} vs {expected}");
    assert!(retry <= 31 * 86_400, "{retry}");
    gw.stop().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_inflating_its_usage_does_not_consume_the_key_budget() {
    let gw = TestGateway::start(|_| {}).await;
    let liar = RawNode::connect(&gw, "liar-1", ip(DE), "cpu").await;
    let _sessions = {
        use nearpath_tests::fake_node::{serve_sessions, Answer, Serving};
        let serving = Serving::inference_only(Answer {
            tokens: 3,
            usage: (u32::MAX, u32::MAX),
        });
        let (opened, _) = tokio::sync::mpsc::unbounded_channel();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve_sessions(liar.conn.clone(), serving, opened, stop))
    };
    let _alive = liar.keep_alive();
    let (id, key) = new_key(&gw, json!({"budget_tokens_per_day": 100})).await;
    for i in 0..3 {
        let (s, _, v) = post_chat(&gw, &key, &chat("m", 16)).await;
        assert_eq!(s, 200, "request {i}: {v}");
    }
    // Billed: 3 × (4 + 3) tokens, what the gateway relayed; the node's claims count nothing.
    let usage = usage_when(&gw, &id, "three billed requests", |v| {
        v["today"]["requests"] == 3 && v["budgets"][0]["spent"].as_f64() == Some(21.0)
    })
    .await;
    assert_eq!(usage["today"]["total_tokens"], 21, "{usage}");
    assert_eq!(usage["budgets"][0]["remaining"], 79.0, "{usage}");
    let (s, _, v) = post_chat(&gw, &key, &chat("m", 16)).await;
    assert_eq!(s, 200, "{v}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_fields_are_validated_naming_the_field_and_the_usage_report_has_its_shape() {
    let gw = TestGateway::start(|_| {}).await;
    let long = "x".repeat(257);
    let many: Vec<String> = (0..257).map(|i| format!("m{i}")).collect();
    let bad = [
        (json!({"budget_usd_per_day": -1}), "budget_usd_per_day"),
        (
            json!({"budget_usd_per_month": "NaN"}),
            "budget_usd_per_month",
        ),
        (
            json!({"budget_tokens_per_day": -5}),
            "budget_tokens_per_day",
        ),
        (
            json!({"budget_tokens_per_month": 0.5}),
            "budget_tokens_per_month",
        ),
        (json!({"expires_at_ms": now_ms() - 1}), "expires_at_ms"),
        (json!({"expires_at_ms": "soon"}), "expires_at_ms"),
        (json!({"allowed_models": [""]}), "allowed_models"),
        (json!({"allowed_models": [long]}), "allowed_models"),
        (json!({"allowed_models": many}), "allowed_models"),
        (json!({"allowed_models": [7]}), "allowed_models"),
        (json!({"allowed_models": "m"}), "allowed_models"),
    ];
    let keys_before = gw.admin_get("/admin/api-keys").await["data"]
        .as_array()
        .unwrap()
        .len();
    for (fields, field) in &bad {
        let mut body = json!({"tenant": "t"});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (s, v) = gw.admin_post("/admin/api-keys", body).await;
        assert_eq!(s, 400, "{fields}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(field), "{fields}: {msg}");
    }
    // Nothing was created by a refused body.
    let keys = gw.admin_get("/admin/api-keys").await;
    assert_eq!(keys["data"].as_array().unwrap().len(), keys_before);
    let (id, _) = new_key(
        &gw,
        json!({"allowed_models": ["org/*"], "budget_tokens_per_month": 1000,
               "budget_usd_per_day": 2.5}),
    )
    .await;
    for (fields, field) in bad.iter().filter(|(_, f)| *f != "expires_at_ms") {
        let (s, v) = admin_patch(&gw, &format!("/admin/api-keys/{id}"), fields.clone()).await;
        assert_eq!(s, 400, "{fields}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(field), "{fields}: {msg}");
    }
    // The longest allow-list fits (256 entries of 256 bytes), and is stored whole.
    let longest: Vec<String> = (0..256).map(|i| format!("{i:0>256}")).collect();
    let (s, v) = admin_patch(
        &gw,
        &format!("/admin/api-keys/{id}"),
        json!({"allowed_models": longest}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["allowed_models"].as_array().unwrap().len(), 256);
    let (s, _) = admin_patch(
        &gw,
        &format!("/admin/api-keys/{id}"),
        json!({"allowed_models": ["org/*"]}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = admin_patch(&gw, &format!("/admin/api-keys/{id}"), json!({"budget": 1})).await;
    assert_eq!(s, 400);
    let (s, _) = admin_patch(&gw, "/admin/api-keys/key_0000000000000000", json!({})).await;
    assert_eq!(s, 404);
    // The key shows its fields flat, as the admin API takes them, unchanged by the refusals.
    let shown = gw.admin_get(&format!("/admin/api-keys/{id}")).await;
    assert_eq!(shown["allowed_models"], json!(["org/*"]), "{shown}");
    assert_eq!(shown["budget_tokens_per_month"], 1000, "{shown}");
    assert_eq!(shown["budget_usd_per_day"], 2.5, "{shown}");
    assert_eq!(shown["expires_at_ms"], Value::Null, "{shown}");

    // The usage report: today, the month, the budgets set, and a daily breakdown on request.
    let v = gw.admin_get(&format!("/admin/api-keys/{id}/usage")).await;
    assert_eq!(v["object"], "api_key.usage");
    assert_eq!(v["api_key_id"], id.as_str());
    for period in ["today", "month"] {
        for f in [
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost_usd",
        ] {
            assert!(v[period][f].is_number(), "{period}.{f}: {v}");
        }
        assert!(v[period]["by_model"].is_array(), "{v}");
    }
    let budgets: Vec<&str> = v["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["budget"].as_str().unwrap())
        .collect();
    assert_eq!(budgets, ["tokens_per_month", "usd_per_day"]);
    assert!(v.get("days").is_none());
    let today = v["today"]["date"].as_str().unwrap().to_string();
    let month_from = v["month"]["from"].as_str().unwrap().to_string();
    let v = gw
        .admin_get(&format!(
            "/admin/api-keys/{id}/usage?from={month_from}&to={today}"
        ))
        .await;
    let days = v["days"].as_array().unwrap();
    assert_eq!(days.first().unwrap()["date"], month_from.as_str());
    assert_eq!(days.last().unwrap()["date"], today.as_str());
    for q in [
        "from=2026-02-30",
        "from=yesterday",
        "to=2026-01-01",
        "from=2026-01-02&to=2026-01-01",
        "from=2020-01-01&to=2026-01-01",
    ] {
        let (s, body) = gw
            .http
            .get(
                &gw.admin_url(&format!("/admin/api-keys/{id}/usage?{q}")),
                Some(ADMIN),
            )
            .await;
        assert_eq!(s, 400, "{q}: {body}");
    }
    let (s, _) = gw
        .http
        .get(
            &gw.admin_url("/admin/api-keys/key_0000000000000000/usage"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, 404);
    gw.stop().await;
}
