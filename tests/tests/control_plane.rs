//! Control plane end to end: real QUIC on loopback, nodes dialling from 127.0.0.x addresses that
//! the gateway's GeoIP overrides place in different countries.

mod common;

use common::*;
use nearpath_edge_node::{NodeError, NodeStatus};
use nearpath_gateway::router::{LatLon, Workload};
use nearpath_protocol::message::{Drain, Message, RejectCode};
use nearpath_protocol::stream::send;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_register_and_are_listed_with_their_geoip_location() {
    let gw = TestGateway::start(|_| {}).await;
    let mut nodes = Vec::new();
    for (id, place) in [("de-1", DE), ("us-1", US_EAST), ("jp-1", JP)] {
        let mut n = TestNode::start(gw.node_config(id, &gw.token), ip(place));
        n.registered().await;
        nodes.push(n);
    }
    let list = gw.admin_get("/admin/nodes").await;
    let mut seen: Vec<(String, String)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_string(),
                n["location"]["country"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("de-1".into(), "DE".into()),
            ("jp-1".into(), "JP".into()),
            ("us-1".into(), "US".into())
        ]
    );
    let one = gw.admin_get("/admin/nodes/de-1").await;
    assert_eq!(one["live"]["state"], "active");
    assert_eq!(one["sla"]["registrations"], 1);
    let (_, metrics) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    assert_eq!(
        metric(&metrics, "nearpath_node_registrations_total"),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "nearpath_nodes{state=\"active\",country=\"DE\",class=\"cpu\"}"
        ),
        Some(1.0)
    );
    for n in nodes {
        n.stop().await.unwrap();
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h100_node_from_a_cn_address_is_rejected_by_the_onboarding_geofence() {
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("cn-h100", &gw.token);
    cfg.gpus = vec![gpu("NVIDIA H100 80GB HBM3")];
    let node = TestNode::start(cfg, ip(CN));
    let result = tokio::time::timeout(Duration::from_secs(10), node.task)
        .await
        .unwrap()
        .unwrap();
    match result {
        Err(NodeError::Rejected { code, reason, .. }) => {
            assert_eq!(code, RejectCode::Geofence);
            assert!(
                reason.contains("export-control") && reason.contains("h100"),
                "{reason}"
            );
        }
        other => panic!("expected a geofence rejection, got {other:?}"),
    }
    assert!(
        gw.node_ids().await.is_empty(),
        "a rejected node must never be listed"
    );
    // An uncontrolled consumer card from the same place onboards.
    let mut cfg = gw.node_config("cn-3080", &gw.token);
    cfg.gpus = vec![gpu("NVIDIA GeForce RTX 3080")];
    let mut ok = TestNode::start(cfg, ip(CN));
    ok.registered().await;
    let (_, metrics) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    assert_eq!(
        metric(
            &metrics,
            "nearpath_node_rejections_total{code=\"geofence\"}"
        ),
        Some(1.0)
    );
    ok.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_unverified_operators_and_unknown_tokens_are_rejected() {
    let gw = TestGateway::start(|_| {}).await;
    let (status, op) = gw
        .admin_post(
            "/admin/operators",
            serde_json::json!({"name": "pending-op"}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(op["kyc_status"], "pending");
    let op_id = op["id"].as_str().unwrap();
    let (status, tok) = gw
        .admin_post(
            &format!("/admin/operators/{op_id}/tokens"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 201);
    let token = tok["token"].as_str().unwrap().to_string();
    let mut node = TestNode::start(gw.node_config("pending-1", &token), ip(DE));
    let s = node
        .wait_status(|s| matches!(s, NodeStatus::Rejected { .. }))
        .await;
    assert!(
        matches!(
            s,
            NodeStatus::Rejected {
                code: RejectCode::OperatorNotVerified,
                ..
            }
        ),
        "{s:?}"
    );
    node.stop().await.unwrap();

    let bad = TestNode::start(gw.node_config("bad-1", "npt_not-a-real-token"), ip(DE));
    let result = tokio::time::timeout(Duration::from_secs(10), bad.task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            result,
            Err(NodeError::Rejected {
                code: RejectCode::BadToken,
                ..
            })
        ),
        "{result:?}"
    );
    assert!(gw.node_ids().await.is_empty());

    // Once verified, the same token onboards.
    let (status, _) = gw
        .admin_post(
            &format!("/admin/operators/{op_id}/verify"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200);
    let mut node = TestNode::start(gw.node_config("pending-1", &token), ip(DE));
    node.registered().await;
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_heartbeats_stop_is_gone_within_three_intervals() {
    let gw = TestGateway::start(|_| {}).await;
    let mut raw = RawNode::connect(&gw, "silent-1", ip(US_EAST), "cpu").await;
    assert!(
        matches!(raw.first, Message::Registered(_)),
        "{:?}",
        raw.first
    );
    raw.heartbeat(0).await;
    // From the last heartbeat on, nothing more is sent (QUIC keep-alives keep the connection up).
    let took = gw
        .wait_nodes(
            "the silent node to be gone",
            Duration::from_secs(3),
            |ids| ids.is_empty(),
        )
        .await;
    // 3 intervals of 100 ms, plus scheduling slack on a loaded 2-core machine.
    assert!(took <= Duration::from_millis(300 + 250), "took {took:?}");
    let (_, metrics) = gw.http.get(&gw.admin_url("/metrics"), None).await;
    assert!(metric(&metrics, "nearpath_node_heartbeat_misses_total").unwrap() >= 1.0);
    assert_eq!(
        metric(
            &metrics,
            "nearpath_node_disconnects_total{cause=\"heartbeat_timeout\"}"
        ),
        Some(1.0)
    );
    // The leave accounting is written after the node leaves the registry (off the control
    // loop, through the store's writer), so poll for it rather than read it once.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sla = gw.admin_get("/admin/nodes/silent-1").await;
        if sla["sla"]["heartbeat_misses"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat misses recorded: {sla}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_before_leaving_earns_no_penalty() {
    let gw = TestGateway::start(|_| {}).await;
    let mut raw = RawNode::connect(&gw, "drainer", ip(DE), "cpu").await;
    raw.heartbeat(1).await;
    send(&mut raw.send, &Message::Drain(Drain { deadline_ms: 1000 }))
        .await
        .unwrap();
    // A clean drain: the session finishes (the node reports none) before it says it drained.
    raw.heartbeat(0).await;
    send(&mut raw.send, &Message::Drained).await.unwrap();
    raw.heartbeat(0).await;
    raw.conn.close(0u32.into(), b"bye");
    gw.wait_nodes("the drained node to leave", Duration::from_secs(3), |ids| {
        ids.is_empty()
    })
    .await;
    let penalties = gw.admin_get("/admin/penalties").await;
    assert_eq!(
        penalties["data"].as_array().unwrap().len(),
        0,
        "{penalties}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_connection_with_an_active_session_earns_one_durable_penalty() {
    let gw = TestGateway::start(|_| {}).await;
    let mut raw = RawNode::connect(&gw, "flaky-1", ip(DE), "cpu").await;
    raw.heartbeat(1).await;
    raw.conn.close(0u32.into(), b"crash");
    gw.wait_nodes("the node to leave", Duration::from_secs(3), |ids| {
        ids.is_empty()
    })
    .await;
    // The penalty is written right after the node leaves; poll the admin API briefly for it.
    let mut penalties = serde_json::Value::Null;
    for _ in 0..200 {
        penalties = gw.admin_get("/admin/penalties").await;
        if !penalties["data"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let list = penalties["data"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{penalties}");
    assert_eq!(list[0]["node_id"], "flaky-1");
    assert_eq!(list[0]["kind"], "disconnect_without_drain");
    assert_eq!(list[0]["active_sessions"], 1);

    // The record survives a gateway restart on the same store.
    let path = gw.store_path.clone();
    let dir = gw.stop().await;
    let gw2 = TestGateway::start_at(path, |_| {}).await;
    let penalties = gw2.admin_get("/admin/penalties?node=flaky-1").await;
    assert_eq!(
        penalties["data"].as_array().unwrap().len(),
        1,
        "{penalties}"
    );
    let sla = gw2.admin_get("/admin/nodes/flaky-1").await;
    assert_eq!(sla["sla"]["penalty_events"], 1, "{sla}");
    // And it counts against the node when it comes back.
    let mut back = RawNode::connect(&gw2, "flaky-1", ip(DE), "cpu").await;
    back.heartbeat(0).await;
    let live = gw2.admin_get("/admin/nodes/flaky-1").await;
    assert_eq!(live["live"]["recent_penalties"], 1, "{live}");
    gw2.stop().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_an_operator_disconnects_its_nodes_within_a_second() {
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("victim", &gw.token), ip(JP));
    node.registered().await;
    let started = std::time::Instant::now();
    let (status, op) = gw
        .admin_post(
            &format!("/admin/operators/{}/suspend", gw.operator_id),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(op["kyc_status"], "suspended");
    gw.wait_nodes(
        "the suspended operator's node to go",
        Duration::from_secs(1),
        |ids| ids.is_empty(),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(1));
    // Its reconnect attempts are refused while suspended.
    let s = node
        .wait_status(|s| {
            matches!(
                s,
                NodeStatus::Rejected {
                    code: RejectCode::OperatorSuspended,
                    ..
                }
            )
        })
        .await;
    assert!(matches!(s, NodeStatus::Rejected { .. }));
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_picks_the_nearest_eligible_node_for_clients_in_several_places() {
    let gw = TestGateway::start(|_| {}).await;
    let mut nodes = Vec::new();
    for (id, place) in [("de-1", DE), ("us-1", US_EAST), ("jp-1", JP)] {
        let mut n = TestNode::start(gw.node_config(id, &gw.token), ip(place));
        n.registered().await;
        nodes.push(n);
    }
    let registry = gw.shared.directory.registry.clone();
    let route = |lat: f64, lon: f64| {
        let (_, picked) = registry.route(
            Some(LatLon::new(lat, lon).unwrap()),
            Workload::Model("m"),
            |_| Ok(()),
        );
        picked.iter().map(|n| n.id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(route(FR_CLIENT.2, FR_CLIENT.3)[0], "de-1");
    assert_eq!(route(US_WEST_CLIENT.2, US_WEST_CLIENT.3)[0], "us-1");
    assert_eq!(route(KR_CLIENT.2, KR_CLIENT.3)[0], "jp-1");
    // The failover order follows distance too: Paris -> Berlin, New York, Tokyo.
    assert_eq!(
        route(FR_CLIENT.2, FR_CLIENT.3),
        vec!["de-1", "us-1", "jp-1"]
    );
    // A draining node is skipped.
    let (status, _) = gw
        .admin_post(
            "/admin/nodes/de-1/drain",
            serde_json::json!({"deadline_ms": 5000}),
        )
        .await;
    assert_eq!(status, 202);
    let mut picked = route(FR_CLIENT.2, FR_CLIENT.3);
    for _ in 0..100 {
        if picked[0] != "de-1" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        picked = route(FR_CLIENT.2, FR_CLIENT.3);
    }
    assert_eq!(picked, vec!["us-1", "jp-1"]);
    for n in nodes {
        n.stop().await.unwrap();
    }
    gw.stop().await;
}
