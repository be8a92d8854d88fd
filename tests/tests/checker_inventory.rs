//! What nodes report for the gateway's checker (issue 14): the `Inventory` an edge node sends
//! after `Registered` reaches the admin node view, and a hostile node's inventory is sanitised
//! or refused as PROTOCOL.md says, without disturbing the other nodes.

mod common;

use common::*;
use nearpath_config::Dtype;
use nearpath_protocol::app_code;
use nearpath_protocol::message::{GpuIdentity, Inventory, Message, ModelWeights, WeightsSource};
use serde_json::{json, Value};
use std::time::Duration;

const UUID: &str = "GPU-5d1a8a2e-0c1f-4b1e-9f0e-2a3b4c5d6e7f";

/// The `hardware` object of a live node's admin view, once its inventory has arrived.
async fn hardware(gw: &TestGateway, id: &str) -> Value {
    let path = &format!("/admin/nodes/{id}");
    eventually(
        "the node's inventory",
        Duration::from_secs(10),
        move || async move {
            let v = gw.admin_get(path).await;
            let h = v["live"]["hardware"].clone();
            (!h.is_null()).then_some(h)
        },
    )
    .await
}

fn registered(raw: &RawNode) {
    assert!(
        matches!(raw.first, Message::Registered(_)),
        "expected Registered, got {:?}",
        raw.first
    );
}

fn identity(index: u32, uuid: &str) -> GpuIdentity {
    GpuIdentity {
        index,
        uuid: uuid.into(),
        pci_device_id: 0x2684_10de,
        driver_version: "550.54.15".into(),
    }
}

fn weights(name: &str, weights_bytes: u64) -> ModelWeights {
    ModelWeights {
        name: name.into(),
        weights_bytes,
        source: WeightsSource::Declared,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_nodes_inventory_appears_in_the_admin_node_view() {
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("inv-1", &gw.token);
    let mut g = gpu("NVIDIA GeForce RTX 4090");
    g.uuid = Some(UUID.into());
    g.pci_device_id = Some(0x2684_10de);
    cfg.gpus = vec![g, gpu("NVIDIA GeForce RTX 4090")];
    // The simulator reports what is configured: here a 70B model in fp8 (the knob to lie with).
    cfg.models[0].params_b = Some(70.0);
    cfg.models[0].dtype = Some(Dtype::Fp8);
    let mut second = cfg.models[0].clone();
    second.name = "small".into();
    second.params_b = None;
    second.dtype = None;
    second.weights_bytes = Some(16_000_000_000);
    cfg.models.push(second);
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;

    let h = hardware(&gw, "inv-1").await;
    assert_eq!(
        h["gpus"],
        json!([{"index": 0, "uuid": UUID, "pci_device_id": 0x2684_10de_u32, "driver_version": ""}])
    );
    assert_eq!(
        h["models"],
        json!([
            {"name": "m", "weights_bytes": 70_000_000_000_u64, "source": "computed"},
            {"name": "small", "weights_bytes": 16_000_000_000_u64, "source": "declared"},
        ])
    );
    // No games configured: the node encodes nothing.
    assert_eq!(h["encoder"], "");
    assert_eq!(h["dropped_count"], 0);
    assert_eq!(h["duplicate_uuids"], json!([]));
    node.stop().await.unwrap();
}

/// Rule: entries that do not match the registration are dropped, the rest kept, and repeated
/// UUIDs flagged; the node stays connected, and a second inventory does not replace the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_entries_not_matching_the_registration_are_dropped_and_the_node_kept() {
    let gw = TestGateway::start(|_| {}).await;
    let mut raw = RawNode::connect_gpus(
        &gw,
        "liar-1",
        ip(DE),
        &gw.token,
        &[
            ("NVIDIA GeForce RTX 4090", "rtx4090"),
            ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ],
    )
    .await;
    registered(&raw);
    raw.send_inventory(Inventory {
        gpus: vec![
            identity(0, "GPU-same"),
            identity(1, "GPU-same"),
            // Past the two registered GPUs, and a forged second identity for GPU 0.
            identity(7, "GPU-ghost"),
            identity(0, "GPU-forged"),
        ],
        models: vec![weights("m", 40_000_000_000), weights("not-served", 1)],
        encoder: "nvenc".into(),
    })
    .await;
    // The heartbeat's ack proves the gateway read everything before it.
    raw.heartbeat(0).await;
    let h = hardware(&gw, "liar-1").await;
    let uuids: Vec<&str> = h["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["uuid"].as_str().unwrap())
        .collect();
    assert_eq!(uuids, ["GPU-same", "GPU-same"]);
    assert_eq!(h["duplicate_uuids"], json!(["GPU-same"]));
    assert_eq!(h["dropped_count"], 3, "{h}");
    assert_eq!(
        h["models"],
        json!([{"name": "m", "weights_bytes": 40_000_000_000_u64, "source": "declared"}])
    );
    assert_eq!(h["encoder"], "nvenc");

    // A second inventory is ignored: the first is what the checker tests.
    raw.send_inventory(Inventory {
        gpus: vec![identity(0, "GPU-other")],
        models: vec![],
        encoder: "openh264".into(),
    })
    .await;
    raw.heartbeat(0).await;
    let again = gw.admin_get("/admin/nodes/liar-1").await;
    assert_eq!(again["live"]["hardware"], h);
    assert_eq!(again["live"]["state"], "active");
}

/// Rule: an inventory that does not decode (a string over its byte cap, a list over its cap, a
/// frame over the control limit) is a protocol error that closes that node's connection only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_inventory_closes_only_that_nodes_connection() {
    let gw = TestGateway::start(|_| {}).await;
    let mut honest = RawNode::connect(&gw, "honest-1", ip(DE), "rtx4090").await;
    registered(&honest);
    let hostile: [(&str, Inventory); 3] = [
        (
            "uuid-97",
            Inventory {
                gpus: vec![identity(0, &"U".repeat(97))],
                ..Default::default()
            },
        ),
        (
            "gpus-65",
            Inventory {
                gpus: (0..65).map(|i| identity(i, "")).collect(),
                ..Default::default()
            },
        ),
        (
            "huge",
            Inventory {
                models: (0..2000)
                    .map(|i| weights(&format!("{i:0>60}"), 1))
                    .collect(),
                ..Default::default()
            },
        ),
    ];
    for (id, inv) in hostile {
        let mut raw = RawNode::connect(&gw, id, ip(DE), "rtx4090").await;
        registered(&raw);
        raw.send_inventory(inv).await;
        let closed = tokio::time::timeout(Duration::from_secs(10), raw.conn.closed())
            .await
            .unwrap_or_else(|_| panic!("{id}: the gateway kept the connection"));
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, app_code::CLOSE_PROTOCOL, "{id}: {c:?}")
            }
            other => panic!("{id}: closed with {other:?}"),
        }
        gw.wait_nodes(
            "the hostile node to leave",
            Duration::from_secs(10),
            |ids| !ids.iter().any(|n| n == id),
        )
        .await;
    }
    // The honest node never noticed.
    honest.heartbeat(0).await;
    assert_eq!(gw.node_ids().await, ["honest-1"]);
}

/// Rule: PROTOCOL.md section 3, unknown types on the node control stream are skipped (a newer
/// node's advisory message must not cost it its registration).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_control_message_types_are_skipped_not_fatal() {
    let gw = TestGateway::start(|_| {}).await;
    let mut raw = RawNode::connect(&gw, "newer-1", ip(DE), "rtx4090").await;
    registered(&raw);
    raw.send_raw_frame(0x0f, b"from the future").await;
    raw.heartbeat(0).await;
    let v = gw.admin_get("/admin/nodes/newer-1").await;
    assert_eq!(v["live"]["state"], "active");
    // No inventory sent: the node is unreported.
    assert!(v["live"]["hardware"].is_null());
}

/// A stand-in for llama.cpp's server (`llama-server`): every request is answered with its
/// `GET /v1/models` listing, one model under its file path, with `meta.size` (the bytes of
/// its tensors, `llama_model_size`). Only the listing matters here: the node reads the size
/// from it before it sends its inventory.
async fn llama_cpp_models_server(size: u64) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = json!({"object": "list", "data": [{
        "id": "/models/big-q8_0.gguf", "object": "model", "owned_by": "llamacpp",
        "meta": {"n_params": 40_000_000_000_u64, "size": size, "n_ctx_train": 8192},
    }]})
    .to_string();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(answer.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

/// Issue 14: a model size the node does not declare is read from its llama.cpp server and
/// reported as `detected`, so the gateway's physics checks apply to it: a claimed RTX 3080 (12
/// GiB at most) whose server holds 40 GB of weights is an impossible claim. A declared size
/// still wins over the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_model_size_is_detected_from_a_llama_cpp_server_and_checked() {
    let gw = TestGateway::start(|c| {
        c.checker.enabled = true;
        c.checker.registration_probe_delay_max_ms = 0;
        c.checker.seed = Some(3);
    })
    .await;
    let upstream = llama_cpp_models_server(40_000_000_000).await;
    let mut cfg = gw.node_config("llama-1", &gw.token);
    cfg.gpus = vec![nearpath_config::GpuSpec {
        vram_mib: 10_240,
        uuid: Some("GPU-3080-detected-0001".into()),
        ..gpu("NVIDIA GeForce RTX 3080")
    }];
    cfg.models[0].backend = nearpath_config::BackendConfig::Upstream {
        base_url: format!("http://{upstream}/v1"),
        api_key: None,
        upstream_model: Some("big".into()),
        timeout_ms: 10_000,
    };
    cfg.models[0].weights_bytes = None;
    cfg.models[0].params_b = None;
    cfg.models[0].dtype = None;
    let mut declared = cfg.models[0].clone();
    declared.name = "declared".into();
    declared.weights_bytes = Some(5_000_000_000);
    cfg.models.push(declared);
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let h = hardware(&gw, "llama-1").await;
    assert_eq!(
        h["models"],
        json!([
            {"name": "m", "weights_bytes": 40_000_000_000_u64, "source": "detected"},
            {"name": "declared", "weights_bytes": 5_000_000_000_u64, "source": "declared"},
        ]),
        "{h}"
    );
    let v = eventually(
        "the checker to find the claim impossible",
        Duration::from_secs(20),
        || async {
            let v = gw.admin_get("/admin/nodes/llama-1").await["verification"].clone();
            (v["state"] == "impossible_claim").then_some(v)
        },
    )
    .await;
    assert!(
        v["reasons"]
            .to_string()
            .contains("model m: weights of 40.0 GB do not fit"),
        "{v}"
    );
    node.stop().await.unwrap();
    gw.stop().await;
}
