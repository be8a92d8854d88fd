//! Hostile tests: nodes (see hostile.rs). A stranger's node squatting another operator's node id,
//! evading penalties by claiming to drain, migrating its connection to a restricted country, and
//! dressing up an export-controlled GPU as something else.

#[allow(unused_imports)]
use crate::common::*;
use nearpath_protocol::message::{Accepted, Drain, Heartbeat, Message, RejectCode, Rejected};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::MAX_REQUEST_FRAME;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const H100: (&str, &str) = ("NVIDIA H100 80GB HBM3", "h100");

fn rejected(raw: &RawNode) -> &Rejected {
    match &raw.first {
        Message::Rejected(r) => r,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

fn registered(raw: &RawNode) {
    assert!(
        matches!(raw.first, Message::Registered(_)),
        "expected Registered, got {:?}",
        raw.first
    );
}

/// Polls the admin penalty list (bounded) until it has `n` entries.
async fn wait_penalties(gw: &TestGateway, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let v = gw.admin_get("/admin/penalties").await;
        let list = v["data"].as_array().unwrap().clone();
        if list.len() >= n {
            return list;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for {n} penalties: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends a heartbeat without waiting for its acknowledgement (the gateway may close first).
async fn heartbeat_no_ack(raw: &mut RawNode, seq: u64) {
    let hb = Heartbeat {
        seq,
        active_sessions: 0,
        queue_depth: 0,
        load: 0.1,
        gpu_util: None,
        encoder_ms_p50: None,
    };
    let _ = send(&mut raw.send, &Message::Heartbeat(hb)).await;
}

// ---------------------------------------------------------------------------------------------
// Item 3: node id squatting

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_id_squatting_while_the_owner_is_offline_is_refused() {
    let gw = TestGateway::start(|_| {}).await;
    // acme's node registers once, then goes offline.
    let acme = RawNode::connect_gpus(&gw, "acme-gpu-1", ip(DE), &gw.token, &[]).await;
    registered(&acme);
    acme.conn.close(0u32.into(), b"offline");
    gw.wait_nodes("acme's node to leave", Duration::from_secs(3), |ids| {
        ids.is_empty()
    })
    .await;

    // Another operator's node takes the id while acme is away: refused, with a clear reason.
    let (evil_op, evil_token) = another_operator(&gw, "evil");
    let squatter = RawNode::connect_gpus(&gw, "acme-gpu-1", ip(DE), &evil_token, &[]).await;
    let r = rejected(&squatter);
    assert_eq!(r.code, RejectCode::Duplicate, "{r:?}");
    assert!(r.reason.contains("another operator"), "{r:?}");
    assert!(gw.node_ids().await.is_empty());

    // The id stays acme's: the admin view names acme, and acme's node comes back freely.
    let view = gw.admin_get("/admin/nodes/acme-gpu-1").await;
    assert_eq!(view["operator_id"], json!(gw.operator_id), "{view}");
    assert_eq!(view["sla"]["operator_id"], json!(gw.operator_id), "{view}");
    let back = RawNode::connect_gpus(&gw, "acme-gpu-1", ip(DE), &gw.token, &[]).await;
    registered(&back);
    // Another id is no problem for the second operator.
    let own = RawNode::connect_gpus(&gw, "evil-gpu-1", ip(DE), &evil_token, &[]).await;
    registered(&own);
    let view = gw.admin_get("/admin/nodes/evil-gpu-1").await;
    assert_eq!(view["operator_id"], json!(evil_op), "{view}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_id_ownership_survives_a_gateway_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.db");
    let gw = TestGateway::start_at(path.clone(), |_| {}).await;
    let acme = RawNode::connect_gpus(&gw, "acme-gpu-2", ip(DE), &gw.token, &[]).await;
    registered(&acme);
    drop(acme);
    gw.stop().await;

    let gw = TestGateway::start_at(path, |_| {}).await;
    let (_, evil_token) = another_operator(&gw, "evil");
    let squatter = RawNode::connect_gpus(&gw, "acme-gpu-2", ip(DE), &evil_token, &[]).await;
    assert_eq!(rejected(&squatter).code, RejectCode::Duplicate);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_node_ids_are_refused_at_admission() {
    let gw = TestGateway::start(|_| {}).await;
    let long = "n".repeat(65);
    for id in [
        "",
        "acme gpu",
        "acme/gpu-1",
        "ａcme-gpu-1",
        "acme\u{200b}-gpu-1",
        &long,
    ] {
        let raw = RawNode::connect_gpus(&gw, id, ip(DE), &gw.token, &[]).await;
        let r = rejected(&raw);
        assert_eq!(r.code, RejectCode::Other, "{id:?}: {r:?}");
        assert!(r.reason.contains("node id"), "{id:?}: {r:?}");
    }
    // The longest allowed id with every allowed character class passes.
    let ok = format!("A-z_0.{}", "9".repeat(58));
    assert_eq!(ok.len(), 64);
    let raw = RawNode::connect_gpus(&gw, &ok, ip(DE), &gw.token, &[]).await;
    registered(&raw);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 4: penalty evasion

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_just_before_dropping_forty_sessions_still_earns_a_penalty() {
    let gw = TestGateway::start(|_| {}).await;
    let mut raw = RawNode::connect_gpus(&gw, "evader", ip(DE), &gw.token, &[]).await;
    registered(&raw);
    raw.heartbeat(40).await;
    send(&mut raw.send, &Message::Drain(Drain { deadline_ms: 1 }))
        .await
        .unwrap();
    send(&mut raw.send, &Message::Drained).await.unwrap();
    // Wait until the gateway has seen the drain, then drop the connection with the sessions.
    let start = Instant::now();
    loop {
        let v = gw.admin_get("/admin/nodes/evader").await;
        if v["live"]["state"] == json!("draining") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    raw.conn.close(0u32.into(), b"bye");
    let penalties = wait_penalties(&gw, 1).await;
    assert_eq!(penalties.len(), 1, "{penalties:?}");
    assert_eq!(penalties[0]["node_id"], json!("evader"));
    assert_eq!(penalties[0]["active_sessions"], json!(40));
    let sla = gw.admin_get("/admin/nodes/evader").await;
    assert_eq!(sla["sla"]["penalty_events"], json!(1), "{sla}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_with_gateway_sessions_open_earns_a_penalty_even_when_reporting_none() {
    let gw = TestGateway::start(|_| {}).await;
    let mut raw = RawNode::connect_gpus(&gw, "liar", ip(DE), &gw.token, &[]).await;
    registered(&raw);
    let conn = raw.conn.clone();
    let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel::<()>();
    // The node accepts one inference session and then never answers it.
    let holder = tokio::spawn(async move {
        let (mut tx, rx) = conn.accept_bi().await.unwrap();
        let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
        assert!(matches!(
            framed.next().await.unwrap().unwrap(),
            Message::Open(_)
        ));
        send(&mut tx, &Message::Accepted(Accepted { session_id: 0 }))
            .await
            .unwrap();
        let _ = accepted_tx.send(());
        // Hold the streams until the connection dies.
        let _ = conn.closed().await;
        drop((tx, framed));
    });
    let client = tokio::spawn({
        let url = gw.api_url("/v1/chat/completions");
        async move {
            let body = json!({"model": "m", "stream": true, "max_tokens": 4,
                              "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
            let _ = Http::new()
                .request("POST", &url, Some(API_KEY), Some(&body), &[])
                .await;
        }
    });
    tokio::time::timeout(Duration::from_secs(5), accepted_rx)
        .await
        .expect("the session reaches the node")
        .unwrap();
    // The node lies that it runs nothing, says it drained, and drops the connection.
    raw.heartbeat(0).await;
    send(&mut raw.send, &Message::Drained).await.unwrap();
    raw.heartbeat(0).await;
    raw.conn.close(0u32.into(), b"bye");
    let penalties = wait_penalties(&gw, 1).await;
    assert_eq!(penalties[0]["node_id"], json!("liar"));
    assert!(
        penalties[0]["active_sessions"].as_u64().unwrap() >= 1,
        "{penalties:?}"
    );
    holder.await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 6: connection migration

/// Moves the node's QUIC endpoint to a fresh socket on `to` (connection migration) and sends a
/// heartbeat over the new path.
async fn migrate(raw: &mut RawNode, to: std::net::IpAddr) {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(to, 0)).unwrap();
    raw.endpoint.rebind(socket).unwrap();
    heartbeat_no_ack(raw, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_a_node_connection_to_a_restricted_country_disconnects_it() {
    let gw = TestGateway::start(|_| {}).await;
    let mut raw = RawNode::connect_gpus(&gw, "mover", ip(DE), &gw.token, &[H100]).await;
    registered(&raw);
    raw.heartbeat(0).await;
    let start = Instant::now();
    migrate(&mut raw, ip(CN)).await;
    let err = tokio::time::timeout(Duration::from_secs(3), raw.conn.closed())
        .await
        .expect("the gateway must close a node that moved to a restricted country");
    let elapsed = start.elapsed();
    match &err {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                nearpath_protocol::app_code::CLOSE_PATH_REFUSED,
                "{c:?}"
            );
            assert_eq!(&c.reason[..], b"path_refused");
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    gw.wait_nodes("the node to leave", Duration::from_secs(3), |ids| {
        ids.is_empty()
    })
    .await;
    eprintln!("migrated node disconnected after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_a_node_connection_within_allowed_countries_updates_its_location() {
    let gw = TestGateway::start(|_| {}).await;
    let mut raw = RawNode::connect_gpus(&gw, "traveller", ip(DE), &gw.token, &[H100]).await;
    registered(&raw);
    migrate(&mut raw, ip(US_EAST)).await;
    let start = Instant::now();
    loop {
        let v = gw.admin_get("/admin/nodes/traveller").await;
        if v["live"]["location"]["country"] == json!("US") {
            assert!(
                v["live"]["address"]
                    .as_str()
                    .unwrap()
                    .starts_with(US_EAST.0),
                "{v}"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Still connected and heartbeating over the new path.
    raw.heartbeat(0).await;
    assert_eq!(gw.node_ids().await, vec!["traveller".to_string()]);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 7: GPU class

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_class_bypass_strings_from_a_restricted_country_are_refused() {
    let gw = TestGateway::start(|_| {}).await;
    for (i, model) in ["H100 PCIe", "ｈ100", "unknown", "b300"]
        .into_iter()
        .enumerate()
    {
        // The string as both model and class (the reported bypass), and as the model with an
        // innocent class hint: neither registers from China.
        for (j, hint) in [model, "rtx3080"].into_iter().enumerate() {
            let id = format!("cn-{i}-{j}");
            let raw = RawNode::connect_gpus(&gw, &id, ip(CN), &gw.token, &[(model, hint)]).await;
            let r = rejected(&raw);
            assert_eq!(r.code, RejectCode::Geofence, "{model:?}/{hint:?}: {r:?}");
        }
    }
    assert!(gw.node_ids().await.is_empty());
    // An uncontrolled card and a CPU-only node still register there.
    let ok = RawNode::connect_gpus(
        &gw,
        "cn-3080",
        ip(CN),
        &gw.token,
        &[("NVIDIA GeForce RTX 3080", "h100")],
    )
    .await;
    registered(&ok);
    let cpu = RawNode::connect_gpus(&gw, "cn-cpu", ip(CN), &gw.token, &[]).await;
    registered(&cpu);
    // The class shown is the gateway's; the node's string is kept as a hint.
    let v = gw.admin_get("/admin/nodes/cn-3080").await;
    assert_eq!(v["live"]["gpus"][0]["class"], json!("rtx3080"), "{v}");
    assert_eq!(v["live"]["gpus"][0]["class_hint"], json!("h100"), "{v}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclassified_gpu_model_is_controlled_until_an_admin_classifies_it() {
    let gw = TestGateway::start(|_| {}).await;
    let model = ("Acme Turbo 9000 PCIe", "rtx3080");
    let raw = RawNode::connect_gpus(&gw, "acme-turbo", ip(CN), &gw.token, &[model]).await;
    assert_eq!(rejected(&raw).code, RejectCode::Geofence);
    // From an allowed country it registers, but cannot serve a client in China either.
    let de = RawNode::connect_gpus(&gw, "acme-turbo-de", ip(DE), &gw.token, &[model]).await;
    registered(&de);
    let (s, _, b) = Http::from(ip(CN_CLIENT))
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(
                &json!({"model": "m", "max_tokens": 1,
                        "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
            ),
            &[],
        )
        .await;
    assert_eq!(s, 403, "{b}");

    let list = gw.admin_get("/admin/gpu-models").await;
    let entry = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model_key"] == json!("acmeturbo9000"))
        .unwrap_or_else(|| panic!("the unclassified model is listed: {list}"))
        .clone();
    assert_eq!(entry["status"], json!("unclassified"), "{entry}");
    assert!(entry["seen"].as_u64().unwrap() >= 2, "{entry}");

    // Bad classifications are refused.
    for body in [
        json!({"model": "PCIe 80GB", "class": "rtx3080"}),
        json!({"model": "Acme Turbo 9000", "class": "RTX 3080!"}),
        json!({"model": "Acme Turbo 9000", "class": "unclassified"}),
    ] {
        let (s, v) = gw.admin_post("/admin/gpu-models", body.clone()).await;
        assert_eq!(s, 400, "{body}: {v}");
    }
    let (s, v) = gw
        .admin_post(
            "/admin/gpu-models",
            json!({"model": "ACME turbo-9000", "class": "rtx3080"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model_key"], json!("acmeturbo9000"));
    assert_eq!(v["controlled"], json!(false));
    let raw = RawNode::connect_gpus(&gw, "acme-turbo", ip(CN), &gw.token, &[model]).await;
    registered(&raw);
    let list = gw.admin_get("/admin/gpu-models").await;
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["model_key"] == json!("acmeturbo9000") && m["class"] == json!("rtx3080")),
        "{list}"
    );
    gw.stop().await;
}
