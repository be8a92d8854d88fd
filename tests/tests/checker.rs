//! The checker end to end (issue 14): real edge nodes running the built-in inference
//! simulator (a simulator, not a model: its speed is a config value, which is exactly how a
//! lying node is played here) claim GPUs and model sizes; the gateway probes them like a
//! client would, checks what they delivered against physics and their RTT against the speed
//! of light, and the geofence and the router use what it found.

mod common;

use common::*;
use nearpath_config::{BackendConfig, GatewayConfig, GpuSpec, NodeConfig};
use serde_json::Value;
use std::time::Duration;

/// The checker on, fast: probes start at once and ask for few tokens; a fixed seed.
fn fast_checker(c: &mut GatewayConfig) {
    c.checker.enabled = true;
    c.checker.registration_probe_delay_max_ms = 0;
    c.checker.standby_probe_interval_mean_ms = 200;
    c.checker.probe_max_tokens = 12;
    c.checker.probe_timeout_ms = 10_000;
    c.checker.seed = Some(7);
}

fn claim(cfg: &mut NodeConfig, gpu_model: &str, vram_mib: u64, uuid: &str) {
    cfg.gpus = vec![GpuSpec {
        uuid: Some(uuid.into()),
        ..gpu_spec(gpu_model, vram_mib)
    }];
}

fn gpu_spec(model: &str, vram_mib: u64) -> GpuSpec {
    GpuSpec {
        vram_mib,
        ..gpu(model)
    }
}

/// The node's one model, served by the simulator at `tokens_per_s`, declared as `weights_bytes`.
fn serve(cfg: &mut NodeConfig, tokens_per_s: f64, weights_bytes: u64) {
    cfg.models[0].backend = BackendConfig::Sim {
        ttft_ms: 0,
        tokens_per_s,
        seed: 1,
    };
    cfg.models[0].weights_bytes = Some(weights_bytes);
}

async fn verification(gw: &TestGateway, id: &str) -> Value {
    gw.admin_get(&format!("/admin/nodes/{id}")).await["verification"].clone()
}

/// Waits until the node's verification matches `pred`, and returns it.
async fn wait_verification(
    gw: &TestGateway,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    eventually(what, Duration::from_secs(20), || async {
        let v = verification(gw, id).await;
        pred(&v).then_some(v)
    })
    .await
}

async fn chat(gw: &TestGateway, from: (&str, &str, f64, f64)) -> (u16, String) {
    Http::from(ip(from))
        .post(
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            &serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                .to_string(),
            &[("content-type", "application/json")],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_under_declared_node_is_reclassified_and_refused_from_a_restricted_country() {
    let gw = TestGateway::start(fast_checker).await;
    // Claims one RTX 3080 (10 GiB, 760 GB/s) from CN, where that class may onboard; serves a
    // model whose weights need 40 GB at 50 tokens/s: 2,000 GB/s of weights read per second.
    let mut cfg = gw.node_config("liar-3080", &gw.token);
    claim(
        &mut cfg,
        "NVIDIA GeForce RTX 3080",
        10_240,
        "GPU-3080-liar-0001",
    );
    serve(&mut cfg, 50.0, 40_000_000_000);
    let mut node = TestNode::start(cfg, ip(CN));
    node.registered().await;
    // Reclassified to a class that holds 40 GB and reads ~2 TB/s: a controlled class, which
    // the export-control rule refuses from CN, so the gateway disconnects the node.
    eventually(
        "the node to be disconnected",
        Duration::from_secs(20),
        || async { (!gw.node_ids().await.contains(&"liar-3080".to_string())).then_some(()) },
    )
    .await;
    let detail = gw.admin_get("/admin/nodes/liar-3080").await;
    assert_eq!(
        detail["verification"]["state"], "impossible_claim",
        "{detail}"
    );
    let checks = detail["checks"].as_array().expect("checks listed");
    assert!(
        checks.iter().any(|c| c["state"] == "impossible_claim"),
        "a durable record of the impossible claim: {detail}"
    );
    let penalties = gw.admin_get("/admin/penalties?node=liar-3080").await;
    assert!(
        penalties["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "impossible_claim"),
        "an SLA event against the operator: {penalties}"
    );
    let page = gw.admin_get_text("/metrics").await;
    assert!(metric(&page, "nearpath_checker_reclassifications_total").unwrap_or(0.0) >= 1.0);
    let _ = node.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_declared_node_is_demoted_and_routing_prefers_a_verified_one() {
    let gw = TestGateway::start(fast_checker).await;
    // Claims an H100 (3.35 TB/s) for a 14 GB model, which it could decode at ~240 tokens/s,
    // and delivers 10: far below the claim on every probe.
    let mut slow = gw.node_config("slow-h100", &gw.token);
    claim(
        &mut slow,
        "NVIDIA H100 80GB HBM3",
        81_559,
        "GPU-h100-slow-0001",
    );
    serve(&mut slow, 10.0, 14_000_000_000);
    let mut slow_node = TestNode::start(slow, ip(DE));
    slow_node.registered().await;
    let v = wait_verification(&gw, "slow-h100", "the slow node to be demoted", |v| {
        v["demoted"] == true
    })
    .await;
    assert_ne!(v["state"], "quarantined", "demotion, not quarantine: {v}");
    // An honest node (same claim, 150 tokens/s) is verified and takes the traffic although the
    // demoted one is as near.
    let mut honest = gw.node_config("honest-h100", &gw.token);
    claim(
        &mut honest,
        "NVIDIA H100 80GB HBM3",
        81_559,
        "GPU-h100-honest-0001",
    );
    serve(&mut honest, 150.0, 14_000_000_000);
    let mut honest_node = TestNode::start(honest, ip(DE));
    honest_node.registered().await;
    wait_verification(&gw, "honest-h100", "the honest node to be verified", |v| {
        v["state"] == "verified"
    })
    .await;
    let (status, body) = chat(&gw, FR_CLIENT).await;
    assert_eq!(status, 200, "{body}");
    // The one usage record is the client's, served by the verified node: none of the probes
    // (three on the slow node, at least one on the honest one) was billed to anybody.
    let usage = eventually(
        "the request's usage record",
        Duration::from_secs(10),
        || async {
            let u = gw.store.list_usage(100).unwrap();
            (!u.is_empty()).then_some(u)
        },
    )
    .await;
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(usage[0].node_id, "honest-h100");
    let nodes = gw.admin_get("/admin/nodes").await;
    let honest_view = nodes["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "honest-h100")
        .cloned()
        .unwrap();
    assert_eq!(honest_view["verification"]["state"], "verified");
    let _ = slow_node.stop().await;
    let _ = honest_node.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gpu_uuid_on_two_live_nodes_quarantines_both() {
    let gw = TestGateway::start(fast_checker).await;
    let mut nodes = Vec::new();
    for id in ["twin-a", "twin-b"] {
        let mut cfg = gw.node_config(id, &gw.token);
        claim(&mut cfg, "NVIDIA L4", 23_034, "GPU-cloned-uuid-0001");
        let mut n = TestNode::start(cfg, ip(DE));
        n.registered().await;
        nodes.push(n);
    }
    for id in ["twin-a", "twin-b"] {
        let v = wait_verification(&gw, id, "both twins quarantined", |v| {
            v["state"] == "quarantined"
        })
        .await;
        assert!(
            v["reasons"].to_string().contains("GPU-cloned-uuid-0001"),
            "the reason names the UUID: {v}"
        );
    }
    // A quarantined node serves nothing.
    let (status, body) = chat(&gw, FR_CLIENT).await;
    assert_ne!(status, 200, "{body}");
    for n in nodes {
        let _ = n.stop().await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controlled_node_2000_km_from_its_claim_by_rtt_loses_controlled_eligibility() {
    // The gateway is in Berlin; the node's GeoIP says Berlin, but its path has 10 ms each way
    // (an RTT of at least 20 ms: up to 2,000 km away), as behind a distant VPN exit.
    let gw = TestGateway::start(|c| {
        fast_checker(c);
        c.checker.lat_deg = Some(DE.2);
        c.checker.lon_deg = Some(DE.3);
        c.checker.location_slack_km = 500.0;
    })
    .await;
    let relay = relay_from(&gw, DE, 3).await;
    relay.set_both(nearpath_tests::impair::Impairment::delay(10.0));
    let mut far = gw.node_config("far-h100", &gw.token);
    far.gateway.address = relay.addr().to_string();
    claim(
        &mut far,
        "NVIDIA H100 80GB HBM3",
        81_559,
        "GPU-h100-far-0001",
    );
    let mut far_node = TestNode::start(far, ip(DE));
    far_node.registered().await;
    let v = wait_verification(
        &gw,
        "far-h100",
        "the far node to fail the proximity proof",
        |v| {
            v["proximity"].to_string().contains("not_proven")
                || v["controlled_eligible"] == false && v["checks"].as_u64() > Some(0)
        },
    )
    .await;
    assert_eq!(v["controlled_eligible"], false, "{v}");
    let (status, body) = chat(&gw, FR_CLIENT).await;
    assert_ne!(
        status, 200,
        "a controlled-class session must not go to the far node: {body}"
    );
    // A node that is where it says (loopback: well under a millisecond) proves it and serves.
    let mut near = gw.node_config("near-h100", &gw.token);
    claim(
        &mut near,
        "NVIDIA H100 80GB HBM3",
        81_559,
        "GPU-h100-near-0001",
    );
    let mut near_node = TestNode::start(near, ip(DE));
    near_node.registered().await;
    wait_verification(&gw, "near-h100", "the near node to prove proximity", |v| {
        v["controlled_eligible"] == true
    })
    .await;
    let (status, body) = chat(&gw, FR_CLIENT).await;
    assert_eq!(status, 200, "{body}");
    let _ = far_node.stop().await;
    let _ = near_node.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_uuid_already_live_at_another_gateway_quarantines_the_newcomer() {
    // Two gateways of a federation sharing one store: the GPU identities of gw-a's nodes are
    // there for gw-b to find.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("federation.db");
    let store: std::sync::Arc<dyn nearpath_gateway::store::Store> =
        std::sync::Arc::new(nearpath_gateway::store::SqliteStore::open(&path).unwrap());
    let mut gws = Vec::new();
    for id in ["gw-a", "gw-b"] {
        gws.push(
            TestGateway::start_sharing(store.clone(), path.clone(), |c| {
                fast_checker(c);
                c.federation.gateway_id = Some(id.into());
            })
            .await,
        );
    }
    let mut first = gws[0].node_config("original", &gws[0].token);
    claim(&mut first, "NVIDIA L4", 23_034, "GPU-federated-clone-0001");
    let mut first = TestNode::start(first, ip(DE));
    first.registered().await;
    wait_verification(&gws[0], "original", "the first node checked", |v| {
        v["checks"].as_u64() > Some(0) || v["state"] != "unverified"
    })
    .await;
    // The same UUID, in another case, from another node at the other gateway.
    let mut clone = gws[1].node_config("clone", &gws[1].token);
    claim(&mut clone, "NVIDIA L4", 23_034, "gpu-FEDERATED-clone-0001");
    let mut clone = TestNode::start(clone, ip(DE));
    clone.registered().await;
    let v = wait_verification(&gws[1], "clone", "the clone quarantined", |v| {
        v["state"] == "quarantined"
    })
    .await;
    assert!(
        v["reasons"]
            .to_string()
            .to_lowercase()
            .contains("gpu-federated-clone-0001"),
        "{v}"
    );
    let checks = gws[1].admin_get("/admin/nodes/clone").await["checks"].clone();
    assert!(
        checks
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["gateway_id"] == "gw-b"),
        "the record names the gateway that checked: {checks}"
    );
    let _ = first.stop().await;
    let _ = clone.stop().await;
    for gw in gws {
        gw.stop().await;
    }
}
