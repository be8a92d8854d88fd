//! The official `openai` Python client against a running gateway and node (installed by
//! `.ci/run`; the test fails with instructions when it is missing).

mod common;

use common::*;
use serde_json::json;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_against_the_gateway() {
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => panic!("python3 with the `openai` package is required: run .ci/run, or `python3 -m pip install openai`"),
    }
    let gw = TestGateway::start(|_| {}).await;
    let mut node = TestNode::start(gw.node_config("de-1", &gw.token), ip(DE));
    node.registered().await;
    let (s, slow) = gw
        .admin_post(
            "/admin/api-keys",
            json!({"tenant": "slow", "requests_per_minute": 1}),
        )
        .await;
    assert_eq!(s, 201);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_client_test.py");
    let base = gw.api_url("/v1");
    let slow_key = slow["key"].as_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .env("NEARPATH_BASE_URL", base)
            .env("NEARPATH_API_KEY", API_KEY)
            .env("NEARPATH_SLOW_KEY", slow_key)
            .env("NEARPATH_MODEL", "m")
            .env("NEARPATH_DENIED_IP", KP_CLIENT.0)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "python checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"));
    node.stop().await.unwrap();
    gw.stop().await;
}
