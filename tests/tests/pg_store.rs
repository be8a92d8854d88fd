//! The gateway on PostgreSQL end to end: `[store] url` makes `Gateway::load` (what `gateway
//! run` calls) open the PostgreSQL store, and the gateway serves and meters through it.

mod common;

use common::*;
use nearpath_gateway::store::{PgStore, Store, UsageKind};
use nearpath_tests::pg::PgServer;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_loaded_with_a_store_url_serves_inference_metered_into_postgresql() {
    let Some(server) = PgServer::shared() else {
        return;
    };
    let url = server.new_database("gateway_e2e");
    let dir = tempfile::tempdir().unwrap();
    let cert =
        nearpath_protocol::tls::self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, &cert.cert_pem).unwrap();
    std::fs::write(&key_file, &cert.key_pem).unwrap();
    // The SQLite path points at a file that must never appear: the URL wins.
    let sqlite_path = dir.path().join("must-not-exist.db");
    let mut config = test_config(sqlite_path.clone());
    config.store.url = Some(url.clone());
    config.store.pool_size = 4;
    config.quic.cert_file = Some(cert_file);
    config.quic.key_file = Some(key_file);

    // A second store on the same database: what an admin tool or another gateway would see.
    let observer: Arc<dyn Store> = {
        let url = url.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || {
                PgStore::open(&url, 2, Duration::from_secs(20)).unwrap()
            })
            .await
            .unwrap(),
        )
    };
    let gw = TestGateway::start_loaded(config, Arc::clone(&observer), cert.sha256).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;

    let body = json!({"model": "m", "stream": false, "max_tokens": 5,
                      "messages": [{"role": "user", "content": "Say something"}]})
    .to_string();
    let (status, _, reply) = gw
        .http
        .request(
            "POST",
            &gw.api_url("/v1/chat/completions"),
            Some(API_KEY),
            Some(&body),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let v: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);

    // The gateway appends the record as the request ends, which may be just after the reply:
    // wait for it, reading through the other store, which proves it is in PostgreSQL.
    let usage = eventually(
        "the usage record in PostgreSQL",
        Duration::from_secs(10),
        || {
            let observer = Arc::clone(&observer);
            async move {
                let rows = tokio::task::spawn_blocking(move || observer.list_usage(10))
                    .await
                    .unwrap()
                    .unwrap();
                rows.into_iter().find(|r| r.kind == UsageKind::Inference)
            }
        },
    )
    .await;
    assert_eq!(usage.tenant, "tenant-a");
    assert_eq!(usage.node_id, "de-1");
    assert_eq!(usage.completion_tokens, 5);
    assert_eq!(usage.outcome, "ok");
    // The node claimed its id in PostgreSQL too.
    let owner = {
        let observer = Arc::clone(&observer);
        tokio::task::spawn_blocking(move || observer.node_owner("de-1"))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(owner.as_deref(), Some(gw.operator_id.as_str()));
    assert!(!sqlite_path.exists(), "no SQLite file beside a store URL");

    node.stop().await.unwrap();
    gw.stop().await;
}
