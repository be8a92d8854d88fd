//! The checker end to end (issue 14): real edge nodes running the built-in inference
//! simulator (a simulator, not a model: its speed is a config value, which is exactly how a
//! lying node is played here) claim GPUs and model sizes; the gateway probes them like a
//! client would, checks what they delivered against physics and their RTT against the speed
//! of light, and the geofence and the router use what it found.

mod common;

use common::*;
use nearpath_config::{BackendConfig, GatewayConfig, GpuSpec, NodeConfig};
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

/// Both nodes are the same operator's: this is also "a rename while the first node is still
/// connected", which must never pass for a move (issue 14, quick rename).
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
    // The view shows the gate the gateway applies, and why it is closed.
    assert_eq!(v["controlled_gate"]["proximity"], "not_proven", "{v}");
    assert!(
        v["controlled_gate"]["blocked_by"]
            .as_str()
            .is_some_and(|b| b.contains("not proven near")),
        "{v}"
    );
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
    let v = wait_verification(&gw, "near-h100", "the near node to prove proximity", |v| {
        v["controlled_eligible"] == true && v["checks"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(v["controlled_gate"]["proximity"], "proven", "{v}");
    assert_eq!(v["controlled_gate"]["verification"], "passed", "{v}");
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

/// Regression (issue 14, review): on a gateway with no position, a verified controlled-class
/// node may serve controlled sessions (proximity cannot be required), and the admin view says
/// so: `controlled_eligible` is the gate the gateway applies, not the core's strict flag
/// (verified *and* proven), which read `false` here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_gateway_without_a_position_the_admin_view_shows_the_open_gate() {
    let gw = TestGateway::start(fast_checker).await;
    let mut cfg = gw.node_config("h100-anywhere", &gw.token);
    claim(
        &mut cfg,
        "NVIDIA H100 80GB HBM3",
        81_559,
        "GPU-h100-anywhere-0001",
    );
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let v = wait_verification(&gw, "h100-anywhere", "the node to be verified", |v| {
        v["state"] == "verified"
    })
    .await;
    assert_eq!(v["controlled_eligible"], true, "{v}");
    let gate = &v["controlled_gate"];
    assert_eq!(gate["eligible"], true, "{v}");
    assert_eq!(gate["applies"], true, "an H100 is a controlled class: {v}");
    assert_eq!(gate["verification"], "passed", "{v}");
    assert_eq!(gate["proximity"], "not_required", "{v}");
    assert!(
        gate["proximity_note"]
            .as_str()
            .is_some_and(|n| n.contains("no position")),
        "{v}"
    );
    assert!(gate["blocked_by"].is_null(), "{v}");
    // What the view says is what the gateway does: the controlled-class session is served.
    let (status, body) = chat(&gw, FR_CLIENT).await;
    assert_eq!(status, 200, "{body}");
    let _ = node.stop().await;
    gw.stop().await;
}

/// Regression (issue 14): an impossible claim that no known GPU class can explain (a model
/// larger than any GPU's memory) quarantines the node AND is an SLA event against its
/// operator, as a reclassification is: in the penalty list, in the node's SLA record (admin
/// node view and `/admin/sla`), once per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_claim_no_class_explains_quarantines_the_node_with_an_sla_event() {
    let gw = TestGateway::start(fast_checker).await;
    // One RTX 3080 serving 2 TB of weights: more than the memory of any class in the table.
    let mut cfg = gw.node_config("beyond-all", &gw.token);
    claim(
        &mut cfg,
        "NVIDIA GeForce RTX 3080",
        10_240,
        "GPU-3080-beyond-0001",
    );
    serve(&mut cfg, 50.0, 2_000_000_000_000);
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let v = wait_verification(&gw, "beyond-all", "the node to be quarantined", |v| {
        v["state"] == "quarantined"
    })
    .await;
    assert!(
        v["reasons"]
            .to_string()
            .contains("beyond any known GPU class"),
        "{v}"
    );
    assert!(v["reclassified_to"].is_null(), "{v}");
    let detail = eventually(
        "the SLA event in the node's view",
        Duration::from_secs(10),
        || async {
            let d = gw.admin_get("/admin/nodes/beyond-all").await;
            (d["sla"]["penalty_events"].as_u64() >= Some(1)).then_some(d)
        },
    )
    .await;
    let kinds: Vec<&str> = detail["penalties"]
        .as_array()
        .expect("penalties listed")
        .iter()
        .filter_map(|p| p["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["impossible_claim"], "{detail}");
    assert!(
        detail["penalties"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("beyond any known GPU class")),
        "{detail}"
    );
    let sla = gw.admin_get("/admin/sla").await;
    let row = sla["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node_id"] == "beyond-all")
        .cloned()
        .unwrap_or_else(|| panic!("the node in the SLA listing: {sla}"));
    assert_eq!(row["penalty_events"], 1, "{sla}");
    // More verdicts on the same connection (the registration probe) add no second event.
    wait_verification(&gw, "beyond-all", "the registration probe", |v| {
        v["checks"].as_u64() > Some(0)
    })
    .await;
    let penalties = gw.admin_get("/admin/penalties?node=beyond-all").await;
    assert_eq!(
        penalties["data"].as_array().unwrap().len(),
        1,
        "one SLA event per connection: {penalties}"
    );
    // A quarantined node serves nothing.
    let (status, body) = chat(&gw, FR_CLIENT).await;
    assert_ne!(status, 200, "{body}");
    let _ = node.stop().await;
    gw.stop().await;
}

/// The nodes that hold `uuid` live (renewed within the checker's 90 s window) per the store.
fn live_holders(gw: &TestGateway, uuid: &str) -> Vec<String> {
    let since = now_ms().saturating_sub(90_000);
    gw.store
        .gpu_uuid_holders(&[uuid.to_string()], since)
        .unwrap()
        .into_iter()
        .map(|h| h.node_id)
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Starts `id` claiming one L4 with `uuid`, enrolled with `token`, and waits until it is
/// registered.
async fn l4_node(gw: &TestGateway, id: &str, token: &str, uuid: &str) -> TestNode {
    let mut cfg = gw.node_config(id, token);
    claim(&mut cfg, "NVIDIA L4", 23_034, uuid);
    let mut n = TestNode::start(cfg, ip(DE));
    n.registered().await;
    n
}

async fn wait_gone(gw: &TestGateway, id: &str) {
    eventually("the node to leave", Duration::from_secs(20), || async {
        (!gw.node_ids().await.contains(&id.to_string())).then_some(())
    })
    .await;
}

/// Regression (issue 14, quick rename): a GPU identity counted as live for 90 s after its last
/// renewal, so an operator who renamed a node (stopped it, started it under another id) within
/// that window had the new node quarantined as a clone. A node that leaves releases its GPUs
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_renamed_by_its_operator_keeps_its_gpu_and_is_not_quarantined() {
    let gw = TestGateway::start(fast_checker).await;
    let uuid = "GPU-renamed-0001";
    let old = l4_node(&gw, "old-name", &gw.token, uuid).await;
    wait_verification(&gw, "old-name", "the first node verified", |v| {
        v["state"] == "verified"
    })
    .await;
    assert_eq!(live_holders(&gw, uuid), ["old-name"]);
    let _ = old.stop().await;
    wait_gone(&gw, "old-name").await;
    eventually(
        "the old identity released",
        Duration::from_secs(10),
        || async { live_holders(&gw, uuid).is_empty().then_some(()) },
    )
    .await;
    let new = l4_node(&gw, "new-name", &gw.token, uuid).await;
    let v = wait_verification(&gw, "new-name", "the renamed node checked", |v| {
        v["checks"].as_u64() > Some(0) || v["state"] == "quarantined"
    })
    .await;
    assert_eq!(v["state"], "verified", "a rename is not a clone: {v}");
    assert_eq!(live_holders(&gw, uuid), ["new-name"]);
    let (status, body) = chat(&gw, FR_CLIENT).await;
    assert_eq!(status, 200, "{body}");
    let _ = new.stop().await;
    gw.stop().await;
}

/// The GPU moved from a node of the same operator that no gateway holds any more, but whose
/// identity was never released (its gateway died with it): the newcomer is not a clone, and
/// the old identity is released so that no later sweep flags it. The same GPU left behind by
/// ANOTHER operator's node still quarantines the newcomer, and so does one another gateway
/// recorded a moment ago (its node may be live there, not yet in the directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_left_behind_by_a_dead_gateway_moves_within_an_operator_only() {
    let gw = TestGateway::start(fast_checker).await;
    let (other_op, other_token) = another_operator(&gw, "op-stranger");
    let ten_s_ago = now_ms() - 10_000;
    for (ghost, op, uuid) in [
        ("ghost-own", gw.operator_id.clone(), "GPU-left-behind-own"),
        ("ghost-stranger", other_op.clone(), "GPU-left-behind-other"),
    ] {
        gw.store.claim_node_id(ghost, &op, ten_s_ago).unwrap();
        gw.store
            .record_node_gpus(
                ghost,
                "gw-dead",
                &[nearpath_gateway::store::GpuIdentityRow {
                    uuid: uuid.into(),
                    pci_device_id: 0x27b810de,
                    driver_version: "550.54".into(),
                    model: "NVIDIA L4".into(),
                }],
                ten_s_ago,
            )
            .unwrap();
    }
    // Our operator's node takes over our operator's ghost's GPU: a move.
    let heir = l4_node(&gw, "heir", &gw.token, "GPU-left-behind-own").await;
    let v = wait_verification(&gw, "heir", "the heir checked", |v| {
        v["checks"].as_u64() > Some(0) || v["state"] == "quarantined"
    })
    .await;
    assert_eq!(v["state"], "verified", "{v}");
    assert_eq!(live_holders(&gw, "GPU-left-behind-own"), ["heir"]);
    // Our operator's node claims the stranger's GPU: a clone, whoever left it behind.
    let thief = l4_node(&gw, "thief", &gw.token, "GPU-left-behind-other").await;
    let v = wait_verification(&gw, "thief", "the thief quarantined", |v| {
        v["state"] == "quarantined"
    })
    .await;
    assert!(
        v["reasons"]
            .to_string()
            .to_lowercase()
            .contains("gpu-left-behind-other"),
        "{v}"
    );
    // A GPU another gateway recorded a moment ago may belong to a node live there that is not
    // in the node directory yet: not a move, even within one operator.
    gw.store
        .claim_node_id("ghost-fresh", &gw.operator_id, now_ms())
        .unwrap();
    gw.store
        .record_node_gpus(
            "ghost-fresh",
            "gw-elsewhere",
            &[nearpath_gateway::store::GpuIdentityRow {
                uuid: "GPU-just-seen".into(),
                pci_device_id: 0x27b810de,
                driver_version: "550.54".into(),
                model: "NVIDIA L4".into(),
            }],
            now_ms(),
        )
        .unwrap();
    let hasty = l4_node(&gw, "hasty", &gw.token, "GPU-just-seen").await;
    wait_verification(&gw, "hasty", "the hasty heir quarantined", |v| {
        v["state"] == "quarantined"
    })
    .await;
    assert_eq!(
        live_holders(&gw, "GPU-just-seen"),
        ["ghost-fresh", "hasty"],
        "nothing released"
    );
    let _ = other_token;
    let _ = heir.stop().await;
    let _ = thief.stop().await;
    let _ = hasty.stop().await;
    gw.stop().await;
}

/// A second operator's node claiming a GPU that a live node holds: both are quarantined (the
/// same-operator move never applies to another operator, nor to a live holder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_operator_claiming_a_live_gpu_quarantines_both() {
    let gw = TestGateway::start(fast_checker).await;
    let (_, other_token) = another_operator(&gw, "op-cloner");
    let owner = l4_node(&gw, "owner", &gw.token, "GPU-owned-0001").await;
    let cloner = l4_node(&gw, "cloner", &other_token, "GPU-owned-0001").await;
    for id in ["owner", "cloner"] {
        wait_verification(&gw, id, "both quarantined", |v| v["state"] == "quarantined").await;
    }
    let _ = owner.stop().await;
    let _ = cloner.stop().await;
    gw.stop().await;
}

/// Federation: a node renamed by its operator at another gateway after it left the first one
/// cleanly is not a clone (the first gateway released its GPUs); a "rename" while the first
/// node is still connected to the other gateway is one, found through the node directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_across_gateways_is_a_move_only_once_the_first_node_left() {
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
                // Both gateways where the nodes' GeoIP places them (loopback RTTs).
                c.federation.lat = DE.2;
                c.federation.lon = DE.3;
            })
            .await,
        );
    }
    let (a, b) = (&gws[0], &gws[1]);
    // Still connected: the first node holds the GPU at gw-a. Its identity is aged past the
    // few seconds in which a fresh identity always counts as live (not published yet), so that
    // gw-b has to find the node in gw-a's published directory.
    let uuid = "GPU-federated-rename-0001";
    let first = l4_node(a, "first-name", &a.token, uuid).await;
    let v = wait_verification(a, "first-name", "the first node checked", |v| {
        v["checks"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(v["state"], "verified", "{v}");
    store
        .release_node_gpus("first-name", "gw-a", now_ms() - 10_000)
        .unwrap();
    assert_eq!(live_holders(a, uuid), ["first-name"], "aged, still live");
    eventually(
        "gw-b to see the first node in the directory",
        Duration::from_secs(10),
        || async {
            let nodes = b.admin_get("/admin/nodes").await;
            nodes["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["id"] == "first-name" && n["remote"] == true)
                .then_some(())
        },
    )
    .await;
    let early = l4_node(b, "early-name", &b.token, uuid).await;
    let v = wait_verification(b, "early-name", "the early rename quarantined", |v| {
        v["state"] == "quarantined"
    })
    .await;
    assert!(
        v["reasons"]
            .to_string()
            .to_lowercase()
            .contains(&uuid.to_lowercase()),
        "{v}"
    );
    let _ = early.stop().await;
    wait_gone(b, "early-name").await;
    // The first node leaves gw-a cleanly; then the rename at gw-b is a move.
    let _ = first.stop().await;
    wait_gone(a, "first-name").await;
    eventually(
        "the first identity released",
        Duration::from_secs(10),
        || async { live_holders(a, uuid).is_empty().then_some(()) },
    )
    .await;
    let late = l4_node(b, "late-name", &b.token, uuid).await;
    let v = wait_verification(b, "late-name", "the late rename checked", |v| {
        v["checks"].as_u64() > Some(0) || v["state"] == "quarantined"
    })
    .await;
    assert_eq!(v["state"], "verified", "{v}");
    let _ = late.stop().await;
    for gw in gws {
        gw.stop().await;
    }
}

/// Starts `id` claiming one L4 with `uuid`, enrolled with `token`, through a relay in front of
/// `gw` (so that the test can cut its path: a node killed without a goodbye); returns once it
/// is verified.
async fn l4_node_behind_relay(
    gw: &TestGateway,
    id: &str,
    token: &str,
    uuid: &str,
) -> (TestNode, nearpath_tests::impair::UdpRelay) {
    let relay = relay_from(gw, DE, 5).await;
    let mut cfg = gw.node_config(id, token);
    cfg.gateway.address = relay.addr().to_string();
    claim(&mut cfg, "NVIDIA L4", 23_034, uuid);
    let mut n = TestNode::start(cfg, ip(DE));
    n.registered().await;
    wait_verification(gw, id, "the first node verified", |v| {
        v["state"] == "verified"
    })
    .await;
    (n, relay)
}

/// Cuts the node's path and waits until the gateway has not heard from it for more than two
/// heartbeats (the id takeover window), while its connection is still open.
async fn kill_silently(gw: &TestGateway, id: &str, relay: &nearpath_tests::impair::UdpRelay) {
    relay.set_both(nearpath_tests::impair::Impairment::delay(0.0).with_loss(1.0));
    let path = format!("/admin/nodes/{id}");
    eventually(
        "the node silent for two heartbeats",
        Duration::from_secs(10),
        || async {
            let n = gw.admin_get(&path).await;
            let last = n["live"]["last_heartbeat_ms"].as_u64()?;
            (now_ms().saturating_sub(last) > 2 * 500 + 200).then_some(())
        },
    )
    .await;
    assert!(
        gw.node_ids().await.contains(&id.to_string()),
        "still connected: the gateway has not declared it gone"
    );
}

/// Regression (issue 14, quick rename): a node killed and restarted under a new id before its
/// old connection timed out was quarantined as a clone of its own past (the old connection
/// held the GPU as a live node). A connection of the same operator silent for longer than two
/// heartbeats (the rule by which a restarted node takes its own id over) now gives its GPU up:
/// the restarted node is verified and the silent connection is closed. Another operator's node
/// claiming a silent node's GPU is still a clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_and_restarted_under_a_new_id_takes_its_gpu_over_from_the_silent_connection()
{
    let gw = TestGateway::start(|c| {
        fast_checker(c);
        c.nodes.heartbeat_ms = 500;
        // Not declared gone for 30 s: longer than the test.
        c.nodes.missed_heartbeats_before_gone = 60;
    })
    .await;
    let uuid = "GPU-killed-0001";
    let (old, relay) = l4_node_behind_relay(&gw, "killed", &gw.token, uuid).await;
    // While the old connection is still heard from, the same operator's second node with its
    // GPU is a clone (two live nodes, one GPU), not a restart.
    let early = l4_node(&gw, "too-early", &gw.token, uuid).await;
    wait_verification(&gw, "too-early", "the early second node quarantined", |v| {
        v["state"] == "quarantined"
    })
    .await;
    assert!(gw.node_ids().await.contains(&"killed".to_string()));
    let _ = early.stop().await;
    wait_gone(&gw, "too-early").await;
    kill_silently(&gw, "killed", &relay).await;
    let new = l4_node(&gw, "restarted", &gw.token, uuid).await;
    let v = wait_verification(&gw, "restarted", "the restarted node checked", |v| {
        v["checks"].as_u64() > Some(0) || v["state"] == "quarantined"
    })
    .await;
    assert_eq!(v["state"], "verified", "a restart is not a clone: {v}");
    // The silent connection is closed now, not when it times out.
    wait_gone(&gw, "killed").await;
    eventually(
        "the GPU held by the restarted node alone",
        Duration::from_secs(10),
        || async { (live_holders(&gw, uuid) == ["restarted"]).then_some(()) },
    )
    .await;
    assert_eq!(
        verification(&gw, "restarted").await["state"],
        "verified",
        "still verified once the old node left"
    );
    let (status, body) = chat(&gw, FR_CLIENT).await;
    assert_eq!(status, 200, "{body}");

    // Another operator's node claiming a silent node's GPU: a clone, silent or not.
    let (_, stranger_token) = another_operator(&gw, "op-grabber");
    let uuid2 = "GPU-killed-0002";
    let (old2, relay2) = l4_node_behind_relay(&gw, "killed-2", &gw.token, uuid2).await;
    kill_silently(&gw, "killed-2", &relay2).await;
    let grabber = l4_node(&gw, "grabber", &stranger_token, uuid2).await;
    wait_verification(
        &gw,
        "grabber",
        "the other operator's node quarantined",
        |v| v["state"] == "quarantined",
    )
    .await;
    assert!(
        gw.node_ids().await.contains(&"killed-2".to_string()),
        "another operator's claim closes nothing"
    );
    let _ = grabber.stop().await;
    let _ = old2.stop().await;
    let _ = new.stop().await;
    let _ = old.stop().await;
    gw.stop().await;
}
