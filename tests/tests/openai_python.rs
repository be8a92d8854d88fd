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

const CLIENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/python/client_libraries_test.py"
);

/// A model on the simulator declared without tool support. The declaration is written as
/// configuration text on purpose: it is parsed like an operator's file, so the test follows
/// the documented keys rather than a Rust struct's field names.
fn model_without_tools(name: &str) -> nearpath_config::ModelConfig {
    let table = json!({"name": name, "max_concurrency": 8,
                       "backend": {"type": "sim", "ttft_ms": 0, "tokens_per_s": 0.0, "seed": 1},
                       "capabilities": {"tools": false}});
    let list = json!({"name": name, "max_concurrency": 8,
                      "backend": {"type": "sim", "ttft_ms": 0, "tokens_per_s": 0.0, "seed": 1},
                      "capabilities": ["json_mode", "json_schema", "logprobs"]});
    serde_json::from_value(table.clone())
        .or_else(|a| serde_json::from_value(list.clone()).map_err(|b| (a, b)))
        .unwrap_or_else(|(a, b)| {
            panic!("a model config declaring no tools: {table} gives `{a}`, {list} gives `{b}`")
        })
}

/// Runs one section of client_libraries_test.py against a gateway with a simulator node
/// serving `m` (every simulator capability) plus the models `extra_models` adds.
async fn run_clients(
    section: &'static str,
    extra_models: impl FnOnce(&mut Vec<nearpath_config::ModelConfig>),
    env: Vec<(&'static str, String)>,
) {
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("de-1", &gw.token);
    extra_models(&mut cfg.models);
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    let base = gw.api_url("/v1");
    let mut all_env: Vec<(String, String)> = vec![
        ("NEARPATH_BASE_URL".into(), base),
        ("NEARPATH_API_KEY".into(), API_KEY.into()),
        ("NEARPATH_MODEL".into(), "m".into()),
        // LiteLLM and LangChain must never reach the network: the bundled cost map, no
        // telemetry, no tracing.
        ("LITELLM_LOCAL_MODEL_COST_MAP".into(), "True".into()),
        ("LITELLM_TELEMETRY".into(), "False".into()),
        ("LANGCHAIN_TRACING_V2".into(), "false".into()),
        ("LANGSMITH_TRACING".into(), "false".into()),
    ];
    all_env.extend(env.into_iter().map(|(k, v)| (k.to_owned(), v)));
    run_python_checks(
        &format!("client_libraries_test.py {section}"),
        CLIENTS.to_owned(),
        vec![section.to_owned()],
        all_env,
    )
    .await;
    node.stop().await.unwrap();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_sync_async_raw_tools_json_and_logprobs_work_on_the_simulator() {
    if !python_can("import openai", "python3 -m pip install openai") {
        return;
    }
    run_clients("openai", |_| {}, vec![]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_completes_streams_and_calls_tools_through_the_gateway() {
    if !python_can("import litellm", "python3 -m pip install litellm") {
        return;
    }
    run_clients("litellm", |_| {}, vec![]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn langchain_invokes_streams_binds_tools_and_structures_output_through_the_gateway() {
    if !python_can(
        "import langchain_openai",
        "python3 -m pip install langchain-openai",
    ) {
        return;
    }
    run_clients("langchain", |_| {}, vec![]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capability_the_model_lacks_is_a_400_naming_the_parameter() {
    if !python_can("import openai", "python3 -m pip install openai") {
        return;
    }
    run_clients(
        "capabilities",
        |models| models.push(model_without_tools("m-plain")),
        vec![("NEARPATH_PLAIN_MODEL", "m-plain".to_string())],
    )
    .await;
}

/// Runs tests/python/responses_test.py (one Python process) against `base`.
async fn run_responses_script(base: String, key: &str, model: &str, tool_model: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/responses_test.py");
    run_python_checks(
        "python checks",
        script.to_owned(),
        vec![],
        vec![
            ("NEARPATH_BASE_URL".into(), base),
            ("NEARPATH_API_KEY".into(), key.to_owned()),
            ("NEARPATH_MODEL".into(), model.to_owned()),
            ("NEARPATH_TOOL_MODEL".into(), tool_model.to_owned()),
        ],
    )
    .await;
}

fn require_python_openai() {
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => panic!("python3 with the `openai` package is required: run .ci/run, or `python3 -m pip install openai`"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_uses_the_responses_api_through_the_gateway() {
    use nearpath_edge_node::inference::{serve_openai_with, ModelRegistry, ServerOptions};
    use std::sync::Arc;
    require_python_openai();
    // The tool-calling model is an OpenAI-compatible server that the node relays to (a scripted
    // chat backend behind an OpenAI server), so a call travels as upstream chat chunks, through
    // the node's translation, to the gateway as Responses events.
    let mut registry = ModelRegistry::new();
    registry
        .insert("weather", 8, Arc::new(WeatherCaller))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let upstream = tokio::spawn(serve_openai_with(
        listener,
        Arc::new(registry),
        ServerOptions::default(),
        shutdown.clone(),
    ));
    let gw = TestGateway::start(|_| {}).await;
    let mut cfg = gw.node_config("de-1", &gw.token);
    // Written as configuration, so the test follows the documented keys.
    let weather: nearpath_config::ModelConfig = serde_json::from_value(json!({
        "name": "weather", "max_concurrency": 8,
        "backend": {"type": "upstream", "base_url": format!("http://{addr}/v1")},
        "capabilities": ["tools"],
    }))
    .unwrap();
    cfg.models.push(weather);
    let mut node = TestNode::start(cfg, ip(DE));
    node.registered().await;
    run_responses_script(gw.api_url("/v1"), API_KEY, "m", "weather").await;
    node.stop().await.unwrap();
    gw.stop().await;
    shutdown.cancel();
    upstream.await.unwrap();
}

/// A chat backend that always calls `get_weather` for Paris, streamed as chat chunks the way
/// OpenAI streams a tool call (the id and name once, then argument pieces).
struct WeatherCaller;

impl nearpath_edge_node::inference::Backend for WeatherCaller {
    fn start(
        &self,
        _request: &nearpath_protocol::openai::InferenceRequest,
    ) -> Result<
        nearpath_edge_node::inference::Generation,
        nearpath_edge_node::inference::BackendError,
    > {
        use nearpath_edge_node::inference::{BackendEvent, Generation};
        let (tx, generation) = Generation::channel();
        tokio::spawn(async move {
            let chunk = |delta: serde_json::Value| {
                Ok(BackendEvent::Chunk {
                    json: json!({"choices": [{"index": 0, "delta": delta}]}).to_string(),
                })
            };
            for event in [
                chunk(
                    json!({"tool_calls": [{"index": 0, "id": "call_w1", "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}]}),
                ),
                chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}),
                ),
                chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                ),
                Ok(BackendEvent::Done {
                    finish_reason: "tool_calls".into(),
                    prompt_tokens: 12,
                    completion_tokens: 8,
                }),
            ] {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        Ok(generation)
    }

    fn kind(&self) -> &'static str {
        "weather"
    }

    fn default_caps(&self) -> nearpath_protocol::ModelCaps {
        nearpath_protocol::ModelCaps::TOOLS
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_uses_the_responses_api_on_a_node() {
    use nearpath_edge_node::inference::{
        serve_openai_with, Backend, ModelRegistry, ServerOptions, SimBackend, SimConfig,
    };
    use std::sync::Arc;
    require_python_openai();
    let mut registry = ModelRegistry::new();
    let sim: Arc<dyn Backend> = Arc::new(SimBackend::new(SimConfig {
        ttft_ms: 0,
        tokens_per_s: 0.0,
        seed: 3,
    }));
    registry.insert("m", 8, sim).unwrap();
    registry
        .insert("weather", 8, Arc::new(WeatherCaller))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(serve_openai_with(
        listener,
        Arc::new(registry),
        ServerOptions::default(),
        shutdown.clone(),
    ));
    run_responses_script(format!("http://{addr}/v1"), "sk-none", "m", "weather").await;
    shutdown.cancel();
    server.await.unwrap();
}
