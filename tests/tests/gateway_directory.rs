//! The federation's gateway and node directories end to end (issue 13): gateways in this
//! process sharing one SQLite store, real listeners on port 0, real edge nodes.

mod common;

use common::*;
use nearpath_gateway::store::{PgStore, Store};
use nearpath_gateway::{Gateway, GatewayError, Listeners};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Bounded waits: the directory refreshes every 100 ms here; seconds of margin for a loaded
/// machine.
const WAIT: Duration = Duration::from_secs(10);

/// Joins the federation as `id` with fast renewals and publications (and a lease long enough
/// that a loaded machine never lets it lapse).
fn federate(c: &mut nearpath_config::GatewayConfig, id: &str, region: &str, lat: f64, lon: f64) {
    c.federation.gateway_id = Some(id.into());
    c.federation.region = region.into();
    c.federation.lat = lat;
    c.federation.lon = lon;
    c.federation.heartbeat_ms = 100;
    c.federation.lease_ms = 5_000;
    c.federation.node_directory_interval_ms = 100;
}

async fn two_gateways() -> (tempfile::TempDir, PathBuf, TestGateway, TestGateway) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = TestGateway::start_at(path.clone(), |c| {
        federate(c, "eu-1", "eu-central", 50.1, 8.7)
    })
    .await;
    let b = TestGateway::start_at(path.clone(), |c| {
        federate(c, "us-1", "us-east", 40.7, -74.0)
    })
    .await;
    (dir, path, a, b)
}

fn ids_of(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect()
}

async fn client_gateways(gw: &TestGateway) -> Value {
    let (status, body) = gw
        .http
        .get(&gw.api_url("/v1/gateways"), Some(API_KEY))
        .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_a_store_see_each_other_in_admin_and_client_listings() {
    let (_dir, _path, a, b) = two_gateways().await;
    for gw in [&a, &b] {
        eventually("both gateways in /v1/gateways", WAIT, || async {
            (ids_of(&client_gateways(gw).await) == ["eu-1", "us-1"]).then_some(())
        })
        .await;
        let admin = gw.admin_get("/admin/gateways").await;
        assert_eq!(ids_of(&admin), ["eu-1", "us-1"], "{admin}");
        for g in admin["data"].as_array().unwrap() {
            assert_eq!(g["live"], true, "{g}");
            assert!(g["expires_in_ms"].as_i64().unwrap() > 0, "{g}");
            assert!(g["heartbeat_age_ms"].as_u64().unwrap() < 5_000, "{g}");
        }
    }
    assert_eq!(a.admin_get("/admin/gateways").await["self"], "eu-1");

    // The client listing has exactly the fixed shape, with each gateway's real addresses and pin.
    let list = client_gateways(&b).await;
    assert_eq!(list["object"], "list");
    let eu = &list["data"][0];
    let keys: Vec<&str> = eu.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = vec![
        "id",
        "region",
        "lat",
        "lon",
        "quic_address",
        "http_url",
        "cert_sha256",
        "live",
    ];
    want.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, want, "{eu}");
    assert_eq!(eu["region"], "eu-central");
    assert_eq!(eu["lat"], 50.1);
    assert_eq!(eu["lon"], 8.7);
    assert_eq!(eu["quic_address"], a.addrs.quic.to_string());
    assert_eq!(eu["http_url"], format!("http://{}", a.addrs.http));
    assert_eq!(
        eu["cert_sha256"],
        nearpath_protocol::tls::sha256_hex(&a.sha)
    );
    assert_eq!(eu["live"], true);
    assert_eq!(
        list["data"][1]["cert_sha256"],
        nearpath_protocol::tls::sha256_hex(&b.sha)
    );

    // The gauge counts both.
    assert_eq!(
        admin_metric(&a, "nearpath_federation_gateways_live").await,
        2.0
    );

    // An orderly shutdown leaves the directory at once (no wait for the lease).
    let _ = b.stop().await;
    assert_eq!(ids_of(&a.admin_get("/admin/gateways").await), ["eu-1"]);
    eventually("us-1 gone from /v1/gateways", WAIT, || async {
        (ids_of(&client_gateways(&a).await) == ["eu-1"]).then_some(())
    })
    .await;
    let _ = a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_gateway_listing_needs_an_api_key() {
    let gw = TestGateway::start(|_| {}).await;
    for key in [None, Some("npk_forged")] {
        let (status, body) = gw.http.get(&gw.api_url("/v1/gateways"), key).await;
        assert_eq!(status, 401, "{key:?}: {body}");
    }
    let (status, _) = gw
        .http
        .post(&gw.api_url("/v1/gateways"), Some(API_KEY), "{}", &[])
        .await;
    assert_eq!(status, 405);
    let _ = gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_lists_itself_as_standalone() {
    let gw = TestGateway::start(|_| {}).await;
    let list = client_gateways(&gw).await;
    assert_eq!(ids_of(&list), ["standalone"], "{list}");
    assert_eq!(list["data"][0]["live"], true);
    assert_eq!(list["data"][0]["quic_address"], gw.addrs.quic.to_string());
    let admin = gw.admin_get("/admin/gateways").await;
    assert_eq!(ids_of(&admin), ["standalone"], "{admin}");
    let _ = gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_gateway_id_with_another_certificate_is_refused() {
    let (_dir, path, a, b) = two_gateways().await;
    let mut config = test_config(path.clone());
    federate(&mut config, "eu-1", "eu-central", 50.1, 8.7);
    let cert = nearpath_gateway::tls::self_signed(&["localhost"]).unwrap();
    let gw = Gateway::with_parts(config, cert, a.store.clone()).unwrap();
    let err = match gw.start(Listeners::ephemeral().await.unwrap(), Default::default()) {
        Err(e) => e,
        Ok(_) => panic!("a second gateway with the id eu-1 and another certificate started"),
    };
    assert!(matches!(err, GatewayError::DuplicateGatewayId(_)), "{err}");
    assert!(
        err.to_string().contains("\"eu-1\""),
        "the error names the id: {err}"
    );
    // The holder is untouched.
    let list = b.admin_get("/admin/gateways").await;
    assert_eq!(
        list["data"][0]["cert_sha256"],
        nearpath_protocol::tls::sha256_hex(&a.sha)
    );
    let _ = b.stop().await;
    let _ = a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_attached_to_one_gateway_is_listed_by_every_gateway() {
    let (_dir, _path, a, b) = two_gateways().await;
    let mut node = TestNode::start(a.node_config("de-1", &a.token), ip(DE));
    node.registered().await;

    let at_b = eventually("de-1 in us-1's node listing", WAIT, || async {
        let list = b.admin_get("/admin/nodes").await;
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == "de-1")
            .cloned()
    })
    .await;
    assert_eq!(at_b["remote"], true, "{at_b}");
    assert_eq!(at_b["gateway_id"], "eu-1");
    assert_eq!(at_b["state"], "active");
    assert_eq!(at_b["country"], "DE");
    assert_eq!(at_b["models"], serde_json::json!(["m"]));
    assert_eq!(at_b["inference_slots"], 8);
    assert_eq!(at_b["inference_free"], 8);
    assert_eq!(at_b["accepting"], true);
    assert_eq!(at_b["verification"], "unverified");
    let at_a = a.admin_get("/admin/nodes").await;
    assert_eq!(ids_of(&at_a), ["de-1"], "listed once, as local: {at_a}");
    assert_eq!(at_a["data"][0]["remote"], false);
    assert_eq!(at_a["data"][0]["gateway_id"], "eu-1");
    assert_eq!(
        b.shared
            .fleet
            .remote_nodes(nearpath_gateway::clock::system_unix_ms())
            .len(),
        1
    );
    let one = b.admin_get("/admin/nodes/de-1").await;
    assert_eq!(one["remote"]["gateway_id"], "eu-1", "{one}");
    assert_eq!(one["live"], Value::Null, "not attached to us-1");

    // The node leaves: it drops out of the directory within the bounded publish rate.
    node.stop().await.unwrap();
    eventually("de-1 gone from us-1's listing", WAIT, || async {
        ids_of(&b.admin_get("/admin/nodes").await)
            .is_empty()
            .then_some(())
    })
    .await;
    let _ = b.stop().await;
    let _ = a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_penalty_recorded_by_one_gateway_is_listed_by_another() {
    let (_dir, _path, a, b) = two_gateways().await;
    let store = a.shared.store.clone();
    let operator = a.operator_id.clone();
    tokio::task::spawn_blocking(move || {
        store
            .record_penalty(
                "de-1",
                &operator,
                1_700_000_000_000,
                "disconnect_without_drain",
                2,
                "at eu-1",
            )
            .unwrap()
    })
    .await
    .unwrap();
    let list = b.admin_get("/admin/penalties").await;
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{list}");
    assert_eq!(data[0]["node_id"], "de-1");
    assert_eq!(data[0]["detail"], "at eu-1");
    let sla = b.admin_get("/admin/sla").await;
    assert_eq!(sla["data"][0]["penalty_events"], 1, "{sla}");
    let _ = b.stop().await;
    let _ = a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_address_the_directory_would_refuse_stops_the_gateway_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.db");
    for (field, edit) in [
        (
            "quic_address",
            (|c: &mut nearpath_config::GatewayConfig| {
                c.federation.public_quic_address = Some("host name:443".into())
            }) as fn(&mut nearpath_config::GatewayConfig),
        ),
        ("quic_address", |c| {
            c.federation.public_quic_address = Some(format!("{}:443", "h".repeat(2000)))
        }),
        ("region", |c| c.federation.region = "r".repeat(200)),
    ] {
        let mut config = test_config(path.clone());
        federate(&mut config, "eu-1", "eu-central", 50.1, 8.7);
        edit(&mut config);
        let store = std::sync::Arc::new(nearpath_gateway::store::SqliteStore::open(&path).unwrap());
        let cert = nearpath_gateway::tls::self_signed(&["localhost"]).unwrap();
        let gw = Gateway::with_parts(config, cert, store).unwrap();
        let err = match gw.start(Listeners::ephemeral().await.unwrap(), Default::default()) {
            Err(e) => e,
            Ok(_) => panic!("started with a bad {field}"),
        };
        assert!(matches!(err, GatewayError::Config(_)), "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
}

/// Two gateways each with its own connection pool to one PostgreSQL database, as regional
/// gateways run: each sees the other, the other's node and the other's penalty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_postgresql_see_each_other_their_nodes_and_penalties() {
    let Some(server) = nearpath_tests::pg::PgServer::shared() else {
        return;
    };
    let url = server.new_database("gateway_directory");
    let open = |url: String| async move {
        tokio::task::spawn_blocking(move || {
            Arc::new(PgStore::open(&url, 4, Duration::from_secs(20)).unwrap()) as Arc<dyn Store>
        })
        .await
        .unwrap()
    };
    let a = TestGateway::start_on(open(url.clone()).await, |c| {
        federate(c, "eu-1", "eu-central", 50.1, 8.7)
    })
    .await;
    let b = TestGateway::start_on(open(url.clone()).await, |c| {
        federate(c, "us-1", "us-east", 40.7, -74.0)
    })
    .await;
    for gw in [&a, &b] {
        eventually("both gateways in /v1/gateways", WAIT, || async {
            (ids_of(&client_gateways(gw).await) == ["eu-1", "us-1"]).then_some(())
        })
        .await;
    }
    let mut node = TestNode::start(a.node_config("de-1", &a.token), ip(DE));
    node.registered().await;
    let at_b = eventually("de-1 in us-1's node listing", WAIT, || async {
        let list = b.admin_get("/admin/nodes").await;
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == "de-1")
            .cloned()
    })
    .await;
    assert_eq!(
        (at_b["gateway_id"].as_str(), at_b["remote"].as_bool()),
        (Some("eu-1"), Some(true)),
        "{at_b}"
    );

    let store = a.store.clone();
    let operator = a.operator_id.clone();
    tokio::task::spawn_blocking(move || {
        store
            .record_penalty(
                "de-1",
                &operator,
                1_700_000_000_000,
                "disconnect_without_drain",
                1,
                "at eu-1",
            )
            .unwrap()
    })
    .await
    .unwrap();
    let list = b.admin_get("/admin/penalties").await;
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["detail"] == "at eu-1"),
        "{list}"
    );

    node.stop().await.unwrap();
    let _ = b.stop().await;
    assert_eq!(
        ids_of(&a.admin_get("/admin/gateways").await),
        ["eu-1"],
        "us-1 left"
    );
    let _ = a.stop().await;
}
