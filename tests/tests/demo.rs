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

/// Streams sent at once in the demo capacity test.
const DEMO_LOAD_STREAMS: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_completes_a_thousand_concurrent_streams() {
    use http_body_util::{BodyExt, Full};
    let mut demo = Demo::start(Listeners::ephemeral().await.unwrap(), None)
        .await
        .unwrap();
    demo.node_registered().await.unwrap();
    let addr = demo.addrs.http;
    // Ten HTTP/2 connections, 100 streams each (under the server's 200 per connection).
    let mut conns = Vec::new();
    for _ in 0..10 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        conns.push(send);
    }
    let body = serde_json::json!({"model": DEMO_MODEL, "max_tokens": 2, "stream": true,
                                  "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let tasks: Vec<_> = (0..DEMO_LOAD_STREAMS)
        .map(|i| {
            let mut send = conns[i % conns.len()].clone();
            let req = hyper::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("authorization", format!("Bearer {DEMO_API_KEY}"))
                .header("content-type", "application/json")
                .body(Full::new(bytes::Bytes::from(body.clone())))
                .unwrap();
            tokio::spawn(async move {
                let resp = send.send_request(req).await.unwrap();
                let status = resp.status().as_u16();
                let b = resp.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&b).into_owned())
            })
        })
        .collect();
    let mut complete = 0;
    for t in tasks {
        let (s, b) = t.await.unwrap();
        assert_eq!(s, 200, "{b}");
        assert!(b.trim_end().ends_with("data: [DONE]"), "{b}");
        assert!(!b.contains("\"error\""), "{b}");
        complete += 1;
    }
    assert_eq!(complete, DEMO_LOAD_STREAMS);
    demo.stop().await;
}

/// The container image runs the demo with its listeners on 0.0.0.0: the in-process node must
/// dial loopback, since nothing can connect to the unspecified address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_listening_on_the_unspecified_address_registers_its_node() {
    let listeners = Listeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        "0.0.0.0:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let mut demo = Demo::start(listeners, None).await.unwrap();
    assert!(demo.addrs.quic.ip().is_unspecified(), "{}", demo.addrs.quic);
    // Bounded so that a regression fails instead of hanging: the node retries forever.
    tokio::time::timeout(std::time::Duration::from_secs(60), demo.node_registered())
        .await
        .expect("the demo node never registered")
        .unwrap();
    demo.stop().await;
}
