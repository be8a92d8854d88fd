//! The checker across a federation (issue 14, items 3 and 5 "with several gateways"): real
//! gateways on one shared SQLite store, real edge nodes (the built-in inference simulator) that
//! move from gateway to gateway, and a userspace UDP relay that adds delay in front of a gateway.
//!
//! - RTT constraints measured by different gateways are intersected: a node proves proximity
//!   through the constraint of a gateway it left, which the gateway it is on now could not.
//! - The majority rule: a node's state counts when most of the gateways that checked it agree.
//! - A GPU UUID duplicated across gateways flags the node that registered first, on its own
//!   gateway, at that gateway's next identity sweep.

mod common;

use common::*;
use nearpath_config::{BackendConfig, GatewayConfig, GpuSpec, NodeConfig};
use nearpath_tests::impair::{Impairment, UdpRelay};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Madrid: about 1,870 km from Berlin (where `DE` places its nodes).
const MADRID: (f64, f64) = (40.42, -3.70);

/// The checker on, fast: probes start at once and ask for few tokens; a fixed seed.
fn fast_checker(c: &mut GatewayConfig) {
    c.checker.enabled = true;
    c.checker.registration_probe_delay_max_ms = 0;
    c.checker.standby_probe_interval_mean_ms = 600_000;
    c.checker.probe_max_tokens = 12;
    c.checker.probe_timeout_ms = 10_000;
    c.checker.seed = Some(7);
}

/// Gateways `ids` of one federation on one SQLite file, each at its position, each changed by
/// `edit` (given its index) after the common settings.
async fn federation(
    dir: &tempfile::TempDir,
    gateways: &[(&str, (f64, f64))],
    edit: impl Fn(usize, &mut GatewayConfig),
) -> (Arc<dyn nearpath_gateway::store::Store>, Vec<TestGateway>) {
    let path = dir.path().join("federation.db");
    let store: Arc<dyn nearpath_gateway::store::Store> =
        Arc::new(nearpath_gateway::store::SqliteStore::open(&path).unwrap());
    let mut gws = Vec::new();
    for (i, (id, (lat, lon))) in gateways.iter().enumerate() {
        gws.push(
            TestGateway::start_sharing(store.clone(), path.clone(), |c| {
                fast_checker(c);
                c.federation.gateway_id = Some((*id).into());
                c.federation.lat = *lat;
                c.federation.lon = *lon;
                edit(i, c);
            })
            .await,
        );
    }
    (store, gws)
}

fn claim(cfg: &mut NodeConfig, gpu_model: &str, vram_mib: u64, uuid: &str) {
    cfg.gpus = vec![GpuSpec {
        uuid: Some(uuid.into()),
        vram_mib,
        ..gpu(gpu_model)
    }];
}

async fn wait_gone(gw: &TestGateway, id: &str) {
    eventually("the node to leave", Duration::from_secs(20), || async {
        (!gw.node_ids().await.contains(&id.to_string())).then_some(())
    })
    .await;
}

/// A relay in front of `gw` that delays each direction by `one_way_ms`, forwarding from
/// `from`'s address (so GeoIP places the node there).
async fn delayed_path(gw: &TestGateway, from: (&str, &str, f64, f64), one_way_ms: f64) -> UdpRelay {
    let relay = relay_from(gw, from, 11).await;
    relay.set_both(Impairment::delay(one_way_ms));
    relay
}

/// Starts node `id` (its config changed by `edit`) at `gw`, through `relay` when given (else
/// directly, from `from`'s address), waits until `gw` checked it and decided with `votes`
/// gateways' votes (0: none read yet), stops it and returns the verification `gw` showed.
async fn visit(
    gw: &TestGateway,
    id: &str,
    edit: impl FnOnce(&mut NodeConfig),
    from: (&str, &str, f64, f64),
    relay: Option<&UdpRelay>,
    votes: usize,
) -> Value {
    let mut cfg = gw.node_config(id, &gw.token);
    edit(&mut cfg);
    if let Some(r) = relay {
        cfg.gateway.address = r.addr().to_string();
    }
    let mut node = TestNode::start(cfg, ip(from));
    node.registered().await;
    let v = wait_verification(gw, id, &format!("{id} checked with {votes} votes"), |v| {
        v["checks"].as_u64() > Some(0) && v["votes"].as_array().map_or(0, Vec::len) == votes
    })
    .await;
    let _ = node.stop().await;
    wait_gone(gw, id).await;
    v
}

fn vote_states(v: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = v["votes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["gateway_id"].as_str().unwrap().to_string(),
                v["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Issue 14, item 3 with a federation: RTT constraints from several gateways are intersected,
/// and the decision lists each. A node whose GeoIP says Berlin proves proximity at gw-berlin
/// (a loopback RTT); it then moves to gw-madrid, 1,870 km away, through a path with 20 ms each
/// way. gw-madrid's own RTT (at least 40 ms: up to 4,000 km) proves nothing near Berlin, but
/// gw-berlin's constraint, read from the shared store, does: the controlled-class node stays
/// eligible, and gw-madrid's view lists both constraints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtt_constraints_of_two_gateways_are_intersected_and_prove_proximity() {
    let dir = tempfile::tempdir().unwrap();
    let (store, gws) = federation(
        &dir,
        &[("gw-berlin", (DE.2, DE.3)), ("gw-madrid", MADRID)],
        |_, c| c.checker.location_slack_km = 500.0,
    )
    .await;
    let h100 = |c: &mut NodeConfig| {
        claim(c, "NVIDIA H100 80GB HBM3", 81_559, "GPU-roamer-h100-0001");
    };
    let v = visit(&gws[0], "roamer", h100, DE, None, 0).await;
    assert_eq!(v["controlled_gate"]["proximity"], "proven", "{v}");
    assert_eq!(v["proximity"]["gateway_id"], "gw-berlin", "{v}");
    // gw-berlin's record carries its constraint for the next gateway.
    let rows = store.checks_of("roamer", 50).unwrap();
    assert!(
        rows.iter().any(|r| r.gateway_id == "gw-berlin"
            && serde_json::from_str::<Value>(&r.detail_json).unwrap()["rtt_constraint"]["rtt_ms"]
                .is_f64()),
        "{rows:?}"
    );

    let relay = delayed_path(&gws[1], DE, 20.0).await;
    let v = visit(&gws[1], "roamer", h100, DE, Some(&relay), 2).await;
    let constraints = v["location"]["constraints"].as_array().unwrap().clone();
    let of = |gw: &str| {
        constraints
            .iter()
            .find(|c| c["gateway_id"] == gw)
            .unwrap_or_else(|| panic!("no constraint of {gw}: {v}"))
            .clone()
    };
    let (berlin, madrid) = (of("gw-berlin"), of("gw-madrid"));
    assert!(berlin["radius_km"].as_f64().unwrap() < 100.0, "{v}");
    assert!(madrid["rtt_ms"].as_f64().unwrap() >= 40.0, "{v}");
    assert!(
        madrid["radius_km"].as_f64().unwrap() > 1_870.0 + 500.0,
        "gw-madrid alone would not prove proximity: {v}"
    );
    assert_eq!(berlin["satisfied"], true, "{v}");
    assert_eq!(madrid["satisfied"], true, "{v}");
    assert_eq!(v["location"]["verdict"]["verdict"], "consistent", "{v}");
    // The proof comes from the other gateway's constraint.
    assert_eq!(v["proximity"]["status"], "proven", "{v}");
    assert_eq!(v["proximity"]["gateway_id"], "gw-berlin", "{v}");
    assert_eq!(v["controlled_gate"]["proximity"], "proven", "{v}");
    assert_eq!(v["controlled_eligible"], true, "{v}");
    assert_eq!(v["state"], "verified", "{v}");
    for gw in gws {
        gw.stop().await;
    }
}

/// An L4 node serving a 10 GB model at 120 tokens/s: the L4's 300 GB/s allow 30 tokens/s,
/// 45 with the default tolerance of 0.5 (impossible), 300 with a tolerance of 9.
fn fast_l4(c: &mut NodeConfig) {
    claim(c, "NVIDIA L4", 23_034, "GPU-voted-l4-0001");
    c.models[0].backend = BackendConfig::Sim {
        ttft_ms: 0,
        tokens_per_s: 120.0,
        seed: 1,
    };
    c.models[0].weights_bytes = Some(10_000_000_000);
}

/// Issue 14, item 5 with a federation: a state counts when a majority of the gateways that
/// checked the node agree. Four gateways judge one claim differently (two strict ones find
/// 120 tokens/s impossible for an L4, two lenient ones accept it). A node checked by both
/// strict gateways and then a lenient one is an impossible claim there (2 of 3), though the
/// lenient gateway's own check passed; a node checked by one strict gateway and then two
/// lenient ones is verified (1 of 3 does not count). Each gateway's stored vote is its own
/// finding, not the majority it adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_counts_only_when_most_gateways_that_checked_agree() {
    let dir = tempfile::tempdir().unwrap();
    let here = (DE.2, DE.3);
    let (store, gws) = federation(
        &dir,
        &[
            ("gw-strict-1", here),
            ("gw-strict-2", here),
            ("gw-lenient-1", here),
            ("gw-lenient-2", here),
        ],
        |i, c| {
            if i >= 2 {
                c.checker.decode_tolerance = 9.0;
            }
        },
    )
    .await;
    let (s1, s2, l1, l2) = (&gws[0], &gws[1], &gws[2], &gws[3]);

    // Two of three found it impossible.
    let v = visit(s1, "outvoted", fast_l4, DE, None, 0).await;
    assert_eq!(v["state"], "impossible_claim", "{v}");
    let v = visit(s2, "outvoted", fast_l4, DE, None, 2).await;
    assert_eq!(v["state"], "impossible_claim", "{v}");
    let v = visit(l1, "outvoted", fast_l4, DE, None, 3).await;
    assert_eq!(
        vote_states(&v),
        [
            ("gw-lenient-1".into(), "verified".into()),
            ("gw-strict-1".into(), "impossible_claim".into()),
            ("gw-strict-2".into(), "impossible_claim".into()),
        ],
        "{v}"
    );
    assert_eq!(v["state"], "impossible_claim", "{v}");
    assert!(
        v["reasons"]
            .to_string()
            .contains("a majority of 3 gateways found it impossible_claim"),
        "{v}"
    );
    // gw-lenient-1 stored its own finding as its vote.
    let votes = store.latest_votes("outvoted").unwrap();
    assert!(
        votes
            .iter()
            .any(|v| v.gateway_id == "gw-lenient-1" && v.state == "verified"),
        "{votes:?}"
    );

    // One of three found it impossible: it does not count.
    let v = visit(s1, "upheld", fast_l4, DE, None, 0).await;
    assert_eq!(v["state"], "impossible_claim", "{v}");
    let v = visit(l1, "upheld", fast_l4, DE, None, 2).await;
    assert_eq!(
        v["state"], "unverified",
        "a tie is disputed, never better than unverified: {v}"
    );
    let v = visit(l2, "upheld", fast_l4, DE, None, 3).await;
    assert_eq!(
        vote_states(&v),
        [
            ("gw-lenient-1".into(), "verified".into()),
            ("gw-lenient-2".into(), "verified".into()),
            ("gw-strict-1".into(), "impossible_claim".into()),
        ],
        "{v}"
    );
    assert_eq!(v["state"], "verified", "{v}");
    for gw in gws {
        gw.stop().await;
    }
}

/// Issue 14, item 4 with a federation: the same GPU UUID at two gateways. The newcomer is
/// quarantined at once (covered in `checker.rs`); the node that registered first, on the
/// other gateway, is flagged by that gateway's next identity sweep
/// (`identity_sweep_interval_ms`), so that both are quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_older_node_of_a_cross_gateway_duplicate_is_flagged_by_its_gateways_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let here = (DE.2, DE.3);
    let (_store, gws) = federation(&dir, &[("gw-a", here), ("gw-b", here)], |_, c| {
        c.checker.identity_sweep_interval_ms = 1_000;
    })
    .await;
    let (a, b) = (&gws[0], &gws[1]);
    let mut cfg = a.node_config("older", &a.token);
    claim(&mut cfg, "NVIDIA L4", 23_034, "GPU-cloned-across-0001");
    let mut older = TestNode::start(cfg, ip(DE));
    older.registered().await;
    let v = wait_verification(a, "older", "the older node verified", |v| {
        v["checks"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(v["state"], "verified", "{v}");
    let mut cfg = b.node_config("newer", &b.token);
    claim(&mut cfg, "NVIDIA L4", 23_034, "gpu-cloned-ACROSS-0001");
    let mut newer = TestNode::start(cfg, ip(DE));
    newer.registered().await;
    wait_verification(b, "newer", "the newcomer quarantined", |v| {
        v["state"] == "quarantined"
    })
    .await;
    let v = wait_verification(a, "older", "the older node flagged by gw-a's sweep", |v| {
        v["state"] == "quarantined"
    })
    .await;
    assert!(
        v["reasons"]
            .to_string()
            .to_lowercase()
            .contains("gpu-cloned-across-0001"),
        "{v}"
    );
    let checks = a.admin_get("/admin/nodes/older").await["checks"].clone();
    assert!(
        checks
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["gateway_id"] == "gw-a" && c["kind"] == "identity"),
        "gw-a recorded the identity check: {checks}"
    );
    let _ = older.stop().await;
    let _ = newer.stop().await;
    for gw in gws {
        gw.stop().await;
    }
}
