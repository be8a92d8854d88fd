//! `gateway demo` as the README runs it: one process, an in-process node, the embedded GeoIP
//! database, development credentials.

use nearpath_gateway::Listeners;
use nearpath_gateway_cli::demo::{Demo, DEMO_ADMIN_TOKEN, DEMO_API_KEY, DEMO_MODEL, DEMO_NODE_ID};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_inference_with_its_development_credentials() {
    let mut demo = Demo::start(Listeners::ephemeral().await.unwrap(), None)
        .await
        .unwrap();
    demo.node_registered().await.unwrap();
    let http = common::Http::new();
    let body = serde_json::json!({"model": DEMO_MODEL, "max_tokens": 3,
                                  "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let (s, b) = http
        .post(
            &format!("http://{}/v1/chat/completions", demo.addrs.http),
            Some(DEMO_API_KEY),
            &body,
            &[],
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let (s, b) = http
        .get(
            &format!("http://{}/admin/nodes", demo.addrs.admin),
            Some(DEMO_ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["data"][0]["id"], DEMO_NODE_ID);
    // Loopback is mapped to US in the demo, with the country centroid as coordinates.
    assert_eq!(v["data"][0]["location"]["country"], "US");
    let (s, _) = http
        .get(&format!("http://{}/healthz", demo.addrs.http), None)
        .await;
    assert_eq!(s, 200);
    demo.stop().await;
}
