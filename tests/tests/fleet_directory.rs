//! What the federation's node directory tells routing (issues 13 and 15): two gateways on one
//! PostgreSQL database, each publishing its nodes (with their encoders and models) to the
//! store's node directory and reading the other's.
//!
//! - Codecs: a player at A asking for HEVC or AV1, which only B's node encodes, is redirected
//!   to B and gets that codec there; one asking for H.264 stays at A; a player the geofence
//!   keeps from B's node is not redirected. The game nodes are raw protocol nodes that claim
//!   encoders at registration (as `codecs.rs` does); the test answers their session streams.
//! - Models: A's `GET /v1/models` lists the models only B's nodes serve, once each, naming the
//!   gateways that serve every model; requests for them go through the trunk; the official
//!   `openai` Python client still parses the list.
//!
//! Everything is real: the directory task, the PostgreSQL store, QUIC with pinned certificates,
//! the redirect ticket, the trunk.

mod common;

use common::*;
use nearpath_gateway::store::{PgStore, Store};
use nearpath_protocol::message::{GameParams, SessionKind};
use nearpath_protocol::{ClientError, PlayParams, VideoCodec};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Bounded waits: the directory refreshes every 100 ms here; seconds of margin for a loaded
/// machine.
const WAIT: Duration = Duration::from_secs(15);

fn federate(c: &mut nearpath_config::GatewayConfig, id: &str, lat: f64, lon: f64) {
    c.federation.gateway_id = Some(id.into());
    c.federation.region = format!("region-{id}");
    c.federation.lat = lat;
    c.federation.lon = lon;
    c.federation.heartbeat_ms = 100;
    c.federation.lease_ms = 5_000;
    c.federation.node_directory_interval_ms = 100;
    // Raw nodes send no heartbeats on their own during the test.
    c.nodes.heartbeat_ms = 60_000;
}

async fn pg_store(url: String) -> Arc<dyn Store> {
    tokio::task::spawn_blocking(move || {
        Arc::new(PgStore::open(&url, 4, Duration::from_secs(20)).unwrap()) as Arc<dyn Store>
    })
    .await
    .unwrap()
}

fn small() -> PlayParams {
    PlayParams {
        game: "arena".into(),
        width: 320,
        height: 180,
        fps: 30,
        bitrate_kbps: 1000,
    }
}

/// Registers a raw game node for `arena` at `gw` with `encoders` (none: it lists none, so it
/// encodes H.264 only) and the GPU `gpu`.
async fn node_with(
    gw: &TestGateway,
    id: &str,
    gpu: &str,
    encoders: &[(VideoCodec, &str)],
) -> RawNode {
    let reg = Registration::new(id, &gw.token)
        .gpu(gpu, "datacenter", 80_000)
        .games(&["arena"], 4)
        .encoders(encoders);
    let node = RawNode::register(gw, ip(DE), reg.message()).await;
    assert!(
        matches!(node.first, nearpath_protocol::Message::Registered(_)),
        "{id} not registered: {:?}",
        node.first
    );
    node
}

/// The game parameters of the next session the gateway opens on `node` (accepted), with the
/// session's stream halves (the session ends when they are dropped).
async fn next_game(
    node: &RawNode,
) -> (
    GameParams,
    (quinn::SendStream, nearpath_protocol::stream::FramedRecv),
) {
    let (tx, rx, open) = node.accept_session().await;
    match open.kind {
        SessionKind::Game(p) => (p, (tx, rx)),
        other => panic!("expected a game session, got {other:?}"),
    }
}

/// A's admin view of `node`, once A's fleet view lists it as a remote node.
async fn remote_view(a: &TestGateway, node: &str) -> Value {
    eventually(&format!("{node} in A's node listing"), WAIT, || async {
        let list = a.admin_get("/admin/nodes").await;
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == node && n["remote"] == true)
            .cloned()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hevc_and_av1_players_at_a_are_redirected_to_the_only_node_that_encodes_them_on_b() {
    let Some(server) = nearpath_tests::pg::PgServer::shared() else {
        return;
    };
    let url = server.new_database("federation_codecs");
    let a = TestGateway::start_on(pg_store(url.clone()).await, |c| {
        federate(c, "a", 48.85, 2.35)
    })
    .await;
    let b = TestGateway::start_on(pg_store(url.clone()).await, |c| {
        federate(c, "b", 52.52, 13.40)
    })
    .await;
    // A's node encodes H.264 only (it lists no encoders, as before protocol version 3); B's
    // node, an H100, encodes HEVC, AV1 and H.264.
    let at_a = node_with(&a, "a-h264", "NVIDIA GeForce RTX 4090", &[]).await;
    let at_b = node_with(
        &b,
        "b-hevc-av1",
        "NVIDIA H100 80GB HBM3",
        &[
            (VideoCodec::Hevc, "hevc_nvenc"),
            (VideoCodec::Av1, "av1_nvenc"),
            (VideoCodec::H264, "h264_nvenc"),
        ],
    )
    .await;

    // B published the encoders; A read them back from PostgreSQL.
    let view = remote_view(&a, "b-hevc-av1").await;
    assert_eq!(view["gateway_id"], "b", "{view}");
    assert_eq!(
        view["encoders"],
        serde_json::json!([
            {"codec": "hevc", "implementation": "hevc_nvenc"},
            {"codec": "av1", "implementation": "av1_nvenc"},
            {"codec": "h264", "implementation": "h264_nvenc"},
        ]),
        "{view}"
    );

    // A node listing the most encoders registration admits, all one codec (another title, so
    // that it takes none of the sessions below), is published with one encoder: the directory
    // holds at most one entry per codec whatever a node lists.
    let greedy = Registration::new("b-greedy", &b.token)
        .games(&["chess"], 1)
        .encoders(&vec![
            (VideoCodec::Hevc, "hevc_nvenc");
            nearpath_protocol::message::MAX_ENCODERS
        ]);
    let greedy = RawNode::register(&b, ip(DE), greedy.message()).await;
    assert!(
        matches!(greedy.first, nearpath_protocol::Message::Registered(_)),
        "{:?}",
        greedy.first
    );
    let view = remote_view(&a, "b-greedy").await;
    assert_eq!(
        view["encoders"],
        serde_json::json!([{"codec": "hevc", "implementation": "hevc_nvenc"}]),
        "{view}"
    );

    for codec in [VideoCodec::Hevc, VideoCodec::Av1] {
        let c = native_client(&a, FR_CLIENT).await;
        let wanted = [codec];
        let (s, (params, _streams)) = tokio::join!(
            c.play_with_codecs(API_KEY, small(), &wanted),
            next_game(&at_b)
        );
        let mut s = s.unwrap_or_else(|e| panic!("{codec}: {e}"));
        let r = s.redirect().expect("redirected to B").clone();
        assert_eq!(r.gateway_id, "b", "{codec}");
        assert_eq!(s.gateway(), b.addrs.quic, "{codec}: the session lives on B");
        assert_eq!(
            s.started().codec,
            codec,
            "the player gets what it asked for"
        );
        assert_eq!(params.codec, codec, "B's node is asked to encode {codec}");
        assert!(admin_game_session(&b, s.started().session_id)
            .await
            .is_some());
        s.close("done").await.unwrap();
    }

    // H.264 is served by A's own node: no redirect costs less than a redirect.
    let c = native_client(&a, FR_CLIENT).await;
    let (s, (params, _streams)) = tokio::join!(
        c.play_with_codecs(API_KEY, small(), &[VideoCodec::H264]),
        next_game(&at_a)
    );
    let mut s = s.unwrap();
    assert!(s.redirect().is_none());
    assert_eq!(
        (s.started().codec, params.codec),
        (VideoCodec::H264, VideoCodec::H264)
    );
    s.close("done").await.unwrap();

    // The geofence still applies across gateways: a client in CN may not use an H100 (export
    // control), so A does not send it to B's node; no node of A encodes HEVC either.
    let cn = native_client(&a, CN_CLIENT).await;
    match cn
        .play_with_codecs(API_KEY, small(), &[VideoCodec::Hevc])
        .await
    {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "unsupported_codec"),
        Err(other) => panic!("expected a refusal at A, got {other}"),
        Ok(s) => panic!("CN client placed (redirect: {:?})", s.redirect()),
    }

    // B's node stops accepting HEVC sessions when it leaves: the next HEVC player at A is
    // refused at A rather than redirected to a node that is gone.
    drop((at_b, greedy));
    let _ = b.stop().await;
    eventually("b-hevc-av1 gone from A's view", WAIT, || async {
        let list = a.admin_get("/admin/nodes").await;
        (!list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "b-hevc-av1"))
        .then_some(())
    })
    .await;
    let c = native_client(&a, FR_CLIENT).await;
    match c
        .play_with_codecs(API_KEY, small(), &[VideoCodec::Hevc])
        .await
    {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "unsupported_codec"),
        Err(other) => panic!("expected a refusal at A, got {other}"),
        Ok(s) => panic!("placed (redirect: {:?})", s.redirect()),
    }
    drop(at_a);
    let _ = a.stop().await;
}

fn sim_model(name: &str) -> nearpath_config::ModelConfig {
    nearpath_config::ModelConfig {
        name: name.into(),
        max_concurrency: 8,
        backend: nearpath_config::BackendConfig::Sim {
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

/// `GET /v1/models` at `gw` from a client at `from`: each model's id with its `gateways`.
async fn models_at(gw: &TestGateway, from: (&str, &str, f64, f64)) -> Value {
    let (status, body) = Http::from(ip(from))
        .get(&gw.api_url("/v1/models"), Some(API_KEY))
        .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn gateways_by_model(list: &Value) -> Vec<(String, Vec<String>)> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let gws = m["gateways"]
                .as_array()
                .unwrap_or_else(|| panic!("no gateways in {m}"))
                .iter()
                .map(|g| g.as_str().unwrap().to_string())
                .collect();
            (m["id"].as_str().unwrap().to_string(), gws)
        })
        .collect()
}

fn listing(entries: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    entries
        .iter()
        .map(|(m, gws)| (m.to_string(), gws.iter().map(|g| g.to_string()).collect()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_models_at_a_lists_the_models_only_bs_nodes_serve_once_and_requests_for_them_are_trunked(
) {
    let Some(server) = nearpath_tests::pg::PgServer::shared() else {
        return;
    };
    let url = server.new_database("fleet_models");
    let a = TestGateway::start_on(pg_store(url.clone()).await, |c| {
        federate(c, "a", 48.85, 2.35);
        c.nodes.heartbeat_ms = 100;
    })
    .await;
    let b = TestGateway::start_on(pg_store(url.clone()).await, |c| {
        federate(c, "b", 52.52, 13.40);
        c.nodes.heartbeat_ms = 100;
    })
    .await;
    // A's node serves `shared`; B's node, an H100, serves `shared` and `only-b`.
    let mut cfg = a.node_config("a-1", &a.token);
    cfg.models = vec![sim_model("shared")];
    let mut at_a = TestNode::start(cfg, ip(DE));
    at_a.registered().await;
    let mut cfg = b.node_config("b-1", &b.token);
    cfg.models = vec![sim_model("shared"), sim_model("only-b")];
    cfg.gpus = vec![gpu("NVIDIA H100 80GB HBM3")];
    let mut at_b = TestNode::start(cfg, ip(DE));
    at_b.registered().await;

    let want = listing(&[("only-b", &["b"]), ("shared", &["a", "b"])]);
    let list = eventually("A to list B's models", WAIT, || async {
        let list = models_at(&a, FR_CLIENT).await;
        (gateways_by_model(&list) == want).then_some(list)
    })
    .await;
    // The OpenAI shape, plus `gateways`.
    let only_b = &list["data"][0];
    let mut keys: Vec<&str> = only_b
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "available",
            "capabilities",
            "created",
            "gateways",
            "id",
            "object",
            "owned_by"
        ],
        "{only_b}"
    );
    assert_eq!(
        (only_b["object"].as_str(), only_b["available"].as_bool()),
        (Some("model"), Some(true))
    );
    // B lists the same models, from its side.
    eventually("B to list A's node too", WAIT, || async {
        (gateways_by_model(&models_at(&b, FR_CLIENT).await) == want).then_some(())
    })
    .await;
    // One model on its own, as the list has it.
    let (status, body) = Http::from(ip(FR_CLIENT))
        .get(&a.api_url("/v1/models/only-b"), Some(API_KEY))
        .await;
    assert_eq!(status, 200, "{body}");
    let one: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(&one, only_b);

    // The geofence applies to the listing as to routing: a client in CN may not use B's H100,
    // so A lists neither `only-b` nor B as serving `shared`.
    assert_eq!(
        gateways_by_model(&models_at(&a, CN_CLIENT).await),
        listing(&[("shared", &["a"])])
    );

    // A request for the remote-only model at A is served by B's node through the trunk.
    let body = serde_json::json!({"model": "only-b", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello"}]});
    let (status, text) = Http::from(ip(FR_CLIENT))
        .post(
            &a.api_url("/v1/chat/completions"),
            Some(API_KEY),
            &body.to_string(),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{text}");
    // So is one needing a capability: B published what its node's model declares (the
    // simulator's tools, among others), and A routes on it and lists it.
    assert!(
        only_b["capabilities"]
            .as_array()
            .unwrap()
            .contains(&Value::from("tools")),
        "{only_b}"
    );
    let tools = serde_json::json!({"model": "only-b", "max_tokens": 4,
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]});
    let (status, text) = Http::from(ip(FR_CLIENT))
        .post(
            &a.api_url("/v1/chat/completions"),
            Some(API_KEY),
            &tools.to_string(),
            &[],
        )
        .await;
    assert_eq!(
        status, 200,
        "a tools request for a model only B serves: {text}"
    );

    // The official client parses the list and keeps `gateways`.
    let script = r#"
import json, os, openai
c = openai.OpenAI(base_url=os.environ["BASE"], api_key=os.environ["KEY"], max_retries=0,
                  default_headers={"X-Forwarded-For": os.environ["CLIENT"]})
print(json.dumps([[m.id, getattr(m, "gateways", None)] for m in c.models.list()]))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .env("BASE", a.api_url("/v1"))
        .env("KEY", API_KEY)
        // The gateway trusts 127.0.0.1 as a proxy: the client is placed in FR.
        .env("CLIENT", FR_CLIENT.0)
        .output()
        .expect("python3 with the openai package (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        parsed,
        serde_json::json!([["only-b", ["b"]], ["shared", ["a", "b"]]])
    );

    // B goes: its models leave A's list with it (`only-b` is marked unavailable only where a
    // node of this gateway served it).
    at_b.stop().await.unwrap();
    let _ = b.stop().await;
    eventually("only-b gone from A's list", WAIT, || async {
        (gateways_by_model(&models_at(&a, FR_CLIENT).await) == listing(&[("shared", &["a"])]))
            .then_some(())
    })
    .await;
    at_a.stop().await.unwrap();
    let _ = a.stop().await;
}

const CHROMIUM_OFFER: &str = include_str!("../browser/chromium-156-offer.sdp");

/// One HTTP request with a raw body (an SDP offer).
async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut b = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("request timed out")
        .unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, h, String::from_utf8_lossy(&body).into_owned())
}

/// A browser whose offer lists AV1, at a gateway that sends browsers AV1 only and whose own
/// node encodes H.264 only, gets a 307 to the peer whose node encodes AV1, and that peer answers
/// with AV1 and asks its node for AV1: the ticket carried the codec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_offer_for_av1_at_a_is_redirected_to_bs_av1_node_and_answered_in_av1() {
    let Some(server) = nearpath_tests::pg::PgServer::shared() else {
        return;
    };
    let url = server.new_database("fleet_whep_av1");
    let av1_only =
        |c: &mut nearpath_config::GatewayConfig| c.game.browser_codecs = vec!["av1".into()];
    let a = TestGateway::start_on(pg_store(url.clone()).await, |c| {
        federate(c, "a", 48.85, 2.35);
        av1_only(c);
    })
    .await;
    let b = TestGateway::start_on(pg_store(url.clone()).await, |c| {
        federate(c, "b", 52.52, 13.40);
        av1_only(c);
    })
    .await;
    let _at_a = node_with(&a, "a-h264", "NVIDIA GeForce RTX 4090", &[]).await;
    let at_b = node_with(
        &b,
        "b-av1",
        "NVIDIA GeForce RTX 4090",
        &[(VideoCodec::Av1, "libaom-av1")],
    )
    .await;
    remote_view(&a, "b-av1").await;

    let auth = format!("Bearer {API_KEY}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/sdp"),
        ("x-forwarded-for", FR_CLIENT.0),
    ];
    let whep_a = a.api_url("/v1/games/arena/whep?width=320&height=180&fps=30");
    let (status, h, body) = request("POST", &whep_a, &headers, CHROMIUM_OFFER).await;
    assert_eq!(status, 307, "{body}");
    let location = h["location"].to_str().unwrap().to_string();
    let prefix = format!("http://{}/v1/games/arena/whep?ticket=", b.addrs.http);
    assert!(location.starts_with(&prefix), "{location}");

    let ((status, _, answer), (params, _streams)) = tokio::join!(
        request("POST", &location, &headers, CHROMIUM_OFFER),
        next_game(&at_b)
    );
    assert_eq!(status, 201, "{answer}");
    assert_eq!(params.codec, VideoCodec::Av1);
    assert!(
        answer.contains("AV1/90000"),
        "the answer sends AV1: {answer}"
    );
    assert!(!answer.contains("H264/90000"), "and nothing else: {answer}");
    drop(at_b);
    a.stop().await;
    b.stop().await;
}
