//! Inference across a federation by redirect (`federation.inference_route = "redirect"`): two
//! gateways sharing one store, a node attached only to B, clients at A. A answers `307` to B
//! with a single-use ticket in the URL; B serves the request on the ticket's node and bills it.
//!
//! The directories are an in-memory fake both gateways read (as in federation_trunk.rs);
//! everything else is real: QUIC, a real edge node, the HTTP API, the shared SQLite ledger,
//! and the official `openai` Python client following the redirect.

mod common;

use common::fleet::{federated_gateway, now_ms, Fleet, Member};
use common::*;
use nearpath_config::CrossRoute;
use nearpath_gateway::store::UsageKind;
use nearpath_gateway::ticket::InferClaims;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const HOUR_MS: u64 = 3_600_000;

/// A federated gateway `id` reading `fleet` that sends inference for peers' nodes by `route`.
async fn federated(
    path: PathBuf,
    id: &str,
    fleet: &Arc<Fleet>,
    route: CrossRoute,
) -> (TestGateway, Member) {
    federated_gateway(path, id, fleet, 3_000, |c| {
        c.federation.inference_route = route;
    })
    .await
}

fn chat(stream: bool, max_tokens: u32) -> String {
    serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hello by redirect"}],
        "stream": stream,
        "max_tokens": max_tokens,
    })
    .to_string()
}

/// Two gateways on one ledger, A redirecting, B holding the only node (`b-node-1`), both
/// having read the directories.
struct Setup {
    gw_a: TestGateway,
    gw_b: TestGateway,
    node: TestNode,
    fleet: Arc<Fleet>,
    a: Member,
    b: Member,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, CrossRoute::Trunk).await;
    let (gw_a, a) = federated(path, "gw-a", &fleet, CrossRoute::Redirect).await;
    *fleet.gateways.lock().unwrap() =
        vec![a.record(now_ms() + HOUR_MS), b.record(now_ms() + HOUR_MS)];
    let mut node = TestNode::start(gw_b.node_config("b-node-1", &gw_b.token), ip(DE));
    node.registered().await;
    // B must hold the node the tickets will name before A can send anyone there.
    gw_b.wait_nodes("B's node", Duration::from_secs(10), |ids| {
        ids.iter().any(|i| i == "b-node-1")
    })
    .await;
    *fleet.nodes.lock().unwrap() = vec![b.inference_node("b-node-1")];
    a.read_directory().await;
    Setup {
        gw_a,
        gw_b,
        node,
        fleet,
        a,
        b,
        _dir: dir,
    }
}

impl Setup {
    /// Publishes B's node as in Japan, far from the test's French client, and waits until A
    /// has read it.
    async fn far_b(&self) {
        let mut far = self.b.inference_node("b-node-1");
        (far.country, far.lat, far.lon) = (Some("JP".into()), Some(JP.2), Some(JP.3));
        *self.fleet.nodes.lock().unwrap() = vec![far];
        self.a.read_directory().await;
    }

    async fn stop(self) {
        self.node.stop().await.unwrap();
        self.gw_a.stop().await;
        self.gw_b.stop().await;
    }

    /// Asks A for `body` from the French client; A must redirect: the `Location`.
    async fn redirected(&self, path: &str, body: &str) -> String {
        let (status, headers, text) = self
            .gw_a
            .http
            .request(
                "POST",
                &self.gw_a.api_url(path),
                Some(API_KEY),
                Some(body),
                &[("x-forwarded-for", FR_CLIENT.0)],
            )
            .await;
        assert_eq!(status, 307, "{text}");
        assert_eq!(headers["cache-control"], "no-store");
        let location = headers["location"].to_str().unwrap().to_string();
        let want = format!("{}?nearpath_ticket=", self.gw_b.api_url(path));
        assert!(location.starts_with(&want), "{location}");
        location
    }

    fn inference_records(&self) -> Vec<nearpath_gateway::store::UsageRecord> {
        self.gw_a
            .store
            .list_usage(100)
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == UsageKind::Inference)
            .collect()
    }

    /// The federation's secret, as every gateway reads it from the shared store.
    fn secret(&self) -> Vec<u8> {
        self.gw_a.store.federation_secret(&[0u8; 32]).unwrap()
    }

    /// A ticket for B minted with the real secret, edited by `edit` (an issuer bug, or a
    /// gateway of the federation gone rogue: the MAC verifies).
    fn minted(&self, edit: impl FnOnce(&mut InferClaims)) -> String {
        let mut c = InferClaims {
            issuer: "gw-a".into(),
            target: "gw-b".into(),
            key_id: self.key_id(),
            node_id: "b-node-1".into(),
            client_ip: ip(FR_CLIENT),
            model: "m".into(),
            endpoint: "/v1/chat/completions".into(),
            expires_at_ms: now_ms() + 10_000,
            nonce: rand::random(),
        };
        edit(&mut c);
        c.seal(&self.secret())
    }

    fn key_id(&self) -> String {
        self.gw_a
            .store
            .authenticate_api_key(API_KEY)
            .unwrap()
            .unwrap()
            .id
    }

    /// POSTs `body` to B's `path` with `ticket`, as the client following a redirect does.
    async fn at_b(
        &self,
        path: &str,
        ticket: &str,
        bearer: Option<&str>,
        from: &str,
        body: &str,
    ) -> (u16, String) {
        let url = format!("{}?nearpath_ticket={ticket}", self.gw_b.api_url(path));
        self.gw_b
            .http
            .post(&url, bearer, body, &[("x-forwarded-for", from)])
            .await
    }
}

fn sse_text(body: &str) -> String {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_at_a_is_redirected_to_bs_node_and_billed_once_by_b() {
    let s = setup().await;
    // Streamed: the client follows the 307 without its Authorization (as HTTP clients do
    // across origins); the ticket alone admits it at B.
    let location = s.redirected("/v1/chat/completions", &chat(true, 8)).await;
    let (status, body) = s
        .gw_b
        .http
        .post(
            &location,
            None,
            &chat(true, 8),
            &[("x-forwarded-for", FR_CLIENT.0)],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert!(!sse_text(&body).is_empty(), "no tokens: {body}");
    // Billed once, by B, against its node; A recorded nothing but the outcome.
    let records = eventually("the usage record", Duration::from_secs(10), || async {
        let rows = s.inference_records();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].node_id, "b-node-1");
    assert_eq!(records[0].outcome, "ok");
    let page_a = s.gw_a.admin_get_text("/metrics").await;
    assert_eq!(
        metric(
            &page_a,
            "nearpath_inference_requests_total{api=\"http\",outcome=\"redirected\"}"
        ),
        Some(1.0),
        "{page_a}"
    );
    assert!(
        !page_a.lines().any(|l| l
            .starts_with("nearpath_inference_requests_total{api=\"http\",outcome=\"ok\"}")
            && !l.ends_with(" 0")),
        "A counted the request as its own: {page_a}"
    );
    let page_b = s.gw_b.admin_get_text("/metrics").await;
    assert_eq!(
        metric(
            &page_b,
            "nearpath_inference_requests_total{api=\"http\",outcome=\"ok\"}"
        ),
        Some(1.0),
        "{page_b}"
    );

    // Not streamed, and another endpoint: the same.
    let body = serde_json::json!({"model": "m", "prompt": "hi", "max_tokens": 4}).to_string();
    let location = s.redirected("/v1/completions", &body).await;
    let (status, text) = s
        .gw_b
        .http
        .post(&location, None, &body, &[("x-forwarded-for", FR_CLIENT.0)])
        .await;
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["choices"][0]["text"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    eventually("two usage records", Duration::from_secs(10), || async {
        (s.inference_records().len() == 2).then_some(())
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tickets_are_refused_like_other_auth_failures_and_nothing_is_billed() {
    let s = setup().await;
    let path = "/v1/chat/completions";
    let body = chat(false, 4);
    let location = s.redirected(path, &body).await;
    let ticket = location
        .split("nearpath_ticket=")
        .nth(1)
        .unwrap()
        .to_string();
    let refused = |status: u16, text: &str, code: &str| {
        assert_eq!(status, 403, "{text}");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["error"]["code"], code, "{text}");
        assert!(v["error"]["message"].is_string(), "{text}");
        assert!(v["error"]["type"].is_string(), "{text}");
    };

    // Forged: one hex digit of the MAC changed.
    let mut forged = ticket.clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
    let forged = String::from_utf8(forged).unwrap();
    let (st, text) = s.at_b(path, &forged, None, FR_CLIENT.0, &body).await;
    refused(st, &text, "bad_ticket");
    // Another client's address.
    let (st, text) = s.at_b(path, &ticket, None, KR_CLIENT.0, &body).await;
    refused(st, &text, "bad_ticket");
    // Another model, another endpoint than the ticket names.
    let other_model = body.replace("\"m\"", "\"m2\"");
    let (st, text) = s.at_b(path, &ticket, None, FR_CLIENT.0, &other_model).await;
    refused(st, &text, "bad_ticket");
    let prompt = serde_json::json!({"model": "m", "prompt": "hi", "max_tokens": 4}).to_string();
    let (st, text) = s
        .at_b("/v1/completions", &ticket, None, FR_CLIENT.0, &prompt)
        .await;
    refused(st, &text, "bad_ticket");
    // With an Authorization of another key: refused (a ticket never lends one key's request
    // to another key).
    let (_, other) = s.gw_b.store.create_api_key("other", 100, 100_000).unwrap();
    let (st, text) = s
        .at_b(path, &ticket, Some(&other), FR_CLIENT.0, &body)
        .await;
    refused(st, &text, "bad_ticket");
    // Nothing so far used the ticket up: the genuine follow-up (with its own key, which is the
    // ticket's) is served once, and a replay is refused.
    let (st, text) = s
        .at_b(path, &ticket, Some(API_KEY), FR_CLIENT.0, &body)
        .await;
    assert_eq!(st, 200, "{text}");
    let (st, text) = s.at_b(path, &ticket, None, FR_CLIENT.0, &body).await;
    refused(st, &text, "bad_ticket");
    // Expired, and claiming a life longer than 30 s (minted with the real secret).
    let expired = s.minted(|c| c.expires_at_ms = now_ms() - 1);
    let (st, text) = s.at_b(path, &expired, None, FR_CLIENT.0, &body).await;
    refused(st, &text, "bad_ticket");
    let long = s.minted(|c| c.expires_at_ms = now_ms() + 120_000);
    let (st, text) = s.at_b(path, &long, None, FR_CLIENT.0, &body).await;
    refused(st, &text, "bad_ticket");
    // For another gateway (A's own ticket presented at B).
    let elsewhere = s.minted(|c| c.target = "gw-a".into());
    let (st, text) = s.at_b(path, &elsewhere, None, FR_CLIENT.0, &body).await;
    refused(st, &text, "bad_ticket");
    // Not hex, and over-long: 400 before anything is read.
    let (st, text) = s.at_b(path, "zz", None, FR_CLIENT.0, &body).await;
    refused(st, &text, "bad_ticket");
    let (st, text) = s
        .at_b(path, &"ab".repeat(2_000), None, FR_CLIENT.0, &body)
        .await;
    assert_eq!(st, 400, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["param"], "nearpath_ticket", "{text}");
    // A valid ticket for a node B does not hold: 503, retryable elsewhere.
    let ghost = s.minted(|c| c.node_id = "ghost".into());
    let (st, text) = s.at_b(path, &ghost, None, FR_CLIENT.0, &body).await;
    assert_eq!(st, 503, "{text}");
    assert!(text.contains("ticket_node_unavailable"), "{text}");

    // Only the one genuine request was billed.
    let records = eventually("the usage record", Duration::from_secs(10), || async {
        let rows = s.inference_records();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].outcome, "ok");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_relays_never_redirects() {
    // The default route: A relays over the trunk; no 307 reaches the client.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let fleet = Arc::new(Fleet::default());
    let (gw_b, b) = federated(path.clone(), "gw-b", &fleet, CrossRoute::Trunk).await;
    let (gw_a, a) = federated(path, "gw-a", &fleet, CrossRoute::Trunk).await;
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
            &chat(false, 4),
            &[("x-forwarded-for", FR_CLIENT.0)],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    node.stop().await.unwrap();
    gw_a.stop().await;
    gw_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_follows_the_redirect_to_bs_node() {
    if !python_can("import openai", "python3 -m pip install openai") {
        return;
    }
    let s = setup().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/infer_redirect_check.py"
    );
    run_python_checks(
        "the openai client through a redirect",
        script.to_string(),
        vec![],
        vec![
            ("NEARPATH_BASE_URL".into(), s.gw_a.api_url("/v1")),
            ("NEARPATH_PEER_URL".into(), s.gw_b.api_url("/v1")),
            ("NEARPATH_API_KEY".into(), API_KEY.into()),
            ("NEARPATH_MODEL".into(), "m".into()),
            ("NEARPATH_CLIENT_IP".into(), FR_CLIENT.0.into()),
        ],
    )
    .await;
    // Both requests ran on B's node, billed once each.
    let records = eventually("two usage records", Duration::from_secs(10), || async {
        let rows = s.inference_records();
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(
        records.iter().all(|r| r.node_id == "b-node-1"),
        "{records:?}"
    );
    s.stop().await;
}

/// Reads a native inference stream to its end: the text of its tokens, or the error.
async fn native_text(
    mut s: nearpath_protocol::client::InferStream,
) -> (
    Result<String, String>,
    nearpath_protocol::client::InferStream,
) {
    use nearpath_protocol::client::InferEvent;
    let mut text = String::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .expect("the inference stream stalled");
        match ev {
            Ok(Some(InferEvent::Token(t))) => text.push_str(&t.text),
            Ok(Some(InferEvent::Done(_))) => return (Ok(text), s),
            Ok(Some(InferEvent::Error(e))) => return (Err(e.code), s),
            Ok(Some(_)) => {}
            Ok(None) => return (Ok(text), s),
            Err(e) => return (Err(e.to_string()), s),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_request_at_a_follows_the_redirect_to_bs_node_and_is_billed_once() {
    let s = setup().await;
    let c = native_client(&s.gw_a, FR_CLIENT).await;
    let stream = c.infer(API_KEY, &chat(true, 6)).await.unwrap();
    let (text, stream) = native_text(stream).await;
    let text = text.unwrap();
    assert!(!text.is_empty());
    // The client says it followed a redirect, to B, and the request ran there.
    let followed = stream
        .redirect()
        .expect("the client did not follow a redirect");
    assert_eq!(followed.gateway_id, "gw-b");
    assert_eq!(stream.gateway(), s.gw_b.addrs.quic);
    drop(stream);
    let records = eventually("the usage record", Duration::from_secs(10), || async {
        let rows = s.inference_records();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].node_id, "b-node-1");
    let page_a = s.gw_a.admin_get_text("/metrics").await;
    assert_eq!(
        metric(
            &page_a,
            "nearpath_inference_requests_total{api=\"quic\",outcome=\"redirected\"}"
        ),
        Some(1.0),
        "{page_a}"
    );
    c.close().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_native_tickets_are_refused_and_nothing_is_billed() {
    use nearpath_protocol::message::{InferTicket, Message};
    use nearpath_protocol::openai::Endpoint;
    use nearpath_protocol::stream::{send, FramedRecv};
    let s = setup().await;
    // What a client sends B directly with `ticket`, from `from`, with `key`.
    let at_b = |ticket: String, from, key: &'static str, endpoint, body: String| {
        let gw_b = &s.gw_b;
        async move {
            let c = native_client(gw_b, from).await;
            let (mut tx, rx) = c.connection().open_bi().await.unwrap();
            let msg = Message::InferTicket(InferTicket {
                protocol_version: nearpath_protocol::PROTOCOL_VERSION,
                api_key: key.to_string(),
                ticket,
                endpoint,
                request_json: body,
            });
            send(&mut tx, &msg).await.unwrap();
            tx.finish().unwrap();
            let mut rx = FramedRecv::new(rx, nearpath_protocol::MAX_REQUEST_FRAME);
            let first = tokio::time::timeout(Duration::from_secs(20), rx.next())
                .await
                .unwrap()
                .unwrap();
            c.close().await;
            match first {
                Some(Message::Error(e)) => e.code,
                Some(m) => m.name().to_string(),
                None => "none".into(),
            }
        }
    };
    let body = chat(false, 4);
    let forged = s.minted(|_| {}).replace('a', "b");
    assert_eq!(
        at_b(forged, FR_CLIENT, API_KEY, Endpoint::Chat, body.clone()).await,
        "bad_ticket"
    );
    let t = s.minted(|_| {});
    assert_eq!(
        at_b(t.clone(), KR_CLIENT, API_KEY, Endpoint::Chat, body.clone()).await,
        "bad_ticket",
        "another client's address"
    );
    let other = body.replace("\"m\"", "\"m2\"");
    assert_eq!(
        at_b(t.clone(), FR_CLIENT, API_KEY, Endpoint::Chat, other).await,
        "bad_ticket",
        "another model"
    );
    let expired = s.minted(|c| c.expires_at_ms = now_ms() - 1);
    assert_eq!(
        at_b(expired, FR_CLIENT, API_KEY, Endpoint::Chat, body.clone()).await,
        "bad_ticket"
    );
    assert_eq!(
        at_b(
            "ab".repeat(5_000),
            FR_CLIENT,
            API_KEY,
            Endpoint::Chat,
            body.clone()
        )
        .await,
        "bad_ticket"
    );
    assert_eq!(
        at_b(
            t.clone(),
            FR_CLIENT,
            "not-a-key",
            Endpoint::Chat,
            body.clone()
        )
        .await,
        "unauthorized"
    );
    // The genuine one is served once; its replay is refused.
    assert_eq!(
        at_b(t.clone(), FR_CLIENT, API_KEY, Endpoint::Chat, body.clone()).await,
        "InferStarted"
    );
    assert_eq!(
        at_b(t, FR_CLIENT, API_KEY, Endpoint::Chat, body.clone()).await,
        "bad_ticket"
    );
    let records = eventually("the usage record", Duration::from_secs(10), || async {
        let rows = s.inference_records();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    s.stop().await;
}

/// Guards "the fleet-wide limits count the request once": A checks the key's own rules but
/// takes nothing from its rate buckets; B admits the request as its own. A key allowed 3
/// requests a minute gets exactly 3 redirected requests served, and the 4th is refused by B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_request_counts_once_against_the_keys_fleet_wide_rate_limit() {
    let s = setup().await;
    let (st, v) = s
        .gw_a
        .admin_post(
            "/admin/api-keys",
            serde_json::json!({"tenant": "three", "requests_per_minute": 3}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let key = v["key"].as_str().unwrap().to_string();
    let body = chat(false, 2);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (status, headers, text) = s
            .gw_a
            .http
            .request(
                "POST",
                &s.gw_a.api_url("/v1/chat/completions"),
                Some(&key),
                Some(&body),
                &[("x-forwarded-for", FR_CLIENT.0)],
            )
            .await;
        assert_eq!(status, 307, "{text}");
        let location = headers["location"].to_str().unwrap();
        let (status, text) = s
            .gw_b
            .http
            .post(location, None, &body, &[("x-forwarded-for", FR_CLIENT.0)])
            .await;
        statuses.push(status);
        if status == 429 {
            assert!(text.contains("rate_limit"), "{text}");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    s.stop().await;
}

/// A ticket does not outlive its key: once the key is revoked (through B's admin API), a ticket
/// minted for it before is refused like the key's secret would be, and nothing is billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_of_a_revoked_key_is_refused() {
    let s = setup().await;
    let (st, v) = s
        .gw_a
        .admin_post(
            "/admin/api-keys",
            serde_json::json!({"tenant": "doomed", "requests_per_minute": 100}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let key = v["key"].as_str().unwrap().to_string();
    let id = v["info"]["id"].as_str().unwrap().to_string();
    let body = chat(false, 2);
    let redirect = || async {
        let (status, headers, text) = s
            .gw_a
            .http
            .request(
                "POST",
                &s.gw_a.api_url("/v1/chat/completions"),
                Some(&key),
                Some(&body),
                &[("x-forwarded-for", FR_CLIENT.0)],
            )
            .await;
        assert_eq!(status, 307, "{text}");
        headers["location"].to_str().unwrap().to_string()
    };
    // A first ticket of the key is served (and B caches the key by id).
    let first = redirect().await;
    let (st, text) = s
        .gw_b
        .http
        .post(&first, None, &body, &[("x-forwarded-for", FR_CLIENT.0)])
        .await;
    assert_eq!(st, 200, "{text}");
    let second = redirect().await;
    let (st, v) = s
        .gw_b
        .admin_post(
            &format!("/admin/api-keys/{id}/revoke"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, text) = s
        .gw_b
        .http
        .post(&second, None, &body, &[("x-forwarded-for", FR_CLIENT.0)])
        .await;
    assert_eq!(st, 401, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error", "{text}");
    let records = eventually("the usage record", Duration::from_secs(10), || async {
        let rows = s.inference_records();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    s.stop().await;
}

/// A runs the key's own checks and the geofence before it redirects: an unknown key, a model
/// outside the key's allow-list and a client the geofence denies are refused at A (nothing to
/// follow), as on a lone gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refuses_what_the_key_may_not_do_instead_of_redirecting() {
    let s = setup().await;
    let body = chat(false, 2);
    let (st, text) = s
        .gw_a
        .http
        .post(
            &s.gw_a.api_url("/v1/chat/completions"),
            Some("not-a-key"),
            &body,
            &[("x-forwarded-for", FR_CLIENT.0)],
        )
        .await;
    assert_eq!(st, 401, "{text}");
    let (st, v) = s
        .gw_a
        .admin_post(
            "/admin/api-keys",
            serde_json::json!({"tenant": "narrow", "requests_per_minute": 100}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let key = v["key"].as_str().unwrap().to_string();
    let id = v["info"]["id"].as_str().unwrap().to_string();
    let (st, _, text) = s
        .gw_a
        .http
        .request(
            "PATCH",
            &s.gw_a.admin_url(&format!("/admin/api-keys/{id}")),
            Some(ADMIN),
            Some(&serde_json::json!({"allowed_models": ["other"]}).to_string()),
            &[],
        )
        .await;
    assert_eq!(st, 200, "{text}");
    let (st, text) = s
        .gw_a
        .http
        .post(
            &s.gw_a.api_url("/v1/chat/completions"),
            Some(&key),
            &body,
            &[("x-forwarded-for", FR_CLIENT.0)],
        )
        .await;
    assert_eq!(st, 403, "{text}");
    assert!(text.contains("model_not_allowed"), "{text}");
    // The geofence is A's, with the client's address: a client in a sanctioned country is
    // refused at A, never sent to B with a ticket.
    let (st, text) = s
        .gw_a
        .http
        .post(
            &s.gw_a.api_url("/v1/chat/completions"),
            Some(API_KEY),
            &body,
            &[("x-forwarded-for", KP_CLIENT.0)],
        )
        .await;
    assert_eq!(st, 403, "{text}");
    assert!(text.contains("geofence"), "{text}");
    let page_a = s.gw_a.admin_get_text("/metrics").await;
    assert_eq!(
        metric(
            &page_a,
            "nearpath_inference_requests_total{api=\"http\",outcome=\"redirected\"}"
        ),
        Some(0.0),
        "{page_a}"
    );
    s.stop().await;
}

/// A lone gateway has no federation secret to check a ticket with: a ticket is refused there
/// (403 `bad_ticket`), never taken as a key, even with a well-formed hex value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_refuses_any_ticket() {
    let gw = TestGateway::start(|_| {}).await;
    let url = format!(
        "{}?nearpath_ticket={}",
        gw.api_url("/v1/chat/completions"),
        "00".repeat(64)
    );
    let (st, text) = gw.http.post(&url, None, &chat(false, 2), &[]).await;
    assert_eq!(st, 403, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "bad_ticket", "{text}");
    gw.stop().await;
}

/// A redirecting gateway serves a request itself when its own node is the best one: a node
/// near the client on A beats a far one on B, and no client is sent away for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_gateway_serves_locally_when_its_own_node_is_best() {
    let s = setup().await;
    // B's node is published as in Japan; A gets a node in Germany, near the French client.
    let mut near = TestNode::start(s.gw_a.node_config("a-node-1", &s.gw_a.token), ip(DE));
    near.registered().await;
    s.gw_a
        .wait_nodes("A's node", Duration::from_secs(10), |ids| {
            ids.iter().any(|i| i == "a-node-1")
        })
        .await;
    s.far_b().await;
    let (st, text) = s
        .gw_a
        .http
        .post(
            &s.gw_a.api_url("/v1/chat/completions"),
            Some(API_KEY),
            &chat(false, 2),
            &[("x-forwarded-for", FR_CLIENT.0)],
        )
        .await;
    assert_eq!(st, 200, "{text}");
    let records = eventually("the usage record", Duration::from_secs(10), || async {
        let rows = s.inference_records();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(records[0].node_id, "a-node-1", "{records:?}");
    let page_a = s.gw_a.admin_get_text("/metrics").await;
    assert_eq!(
        metric(
            &page_a,
            "nearpath_inference_requests_total{api=\"http\",outcome=\"redirected\"}"
        ),
        Some(0.0),
        "{page_a}"
    );
    near.stop().await.unwrap();
    s.stop().await;
}
