use super::super::openai_server::tests::TestServer;
use super::super::{ModelRegistry, ServerOptions, SimBackend, SimConfig};
use super::*;
use hyper::StatusCode;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

fn fast() -> SimConfig {
    SimConfig {
        ttft_ms: 0,
        tokens_per_s: 0.0,
        seed: 5,
    }
}

fn responses(body: Value) -> InferenceRequest {
    match InferenceRequest::from_value(Endpoint::Responses, body) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

/// Every chunk as JSON, and the `Done` (or the error) that ended the generation.
async fn collect(mut g: Generation) -> (Vec<Value>, EventResult) {
    let mut chunks = Vec::new();
    while let Some(ev) = g.next().await {
        match ev {
            Ok(BackendEvent::Chunk { json }) => match serde_json::from_str(&json) {
                Ok(v) => chunks.push(v),
                Err(e) => panic!("chunk is not JSON ({e}): {json}"),
            },
            Ok(BackendEvent::Token { text }) => {
                panic!("a Responses stream yielded a token {text:?}")
            }
            end => return (chunks, end),
        }
    }
    panic!("the generation ended without Done");
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["type"].as_str()).collect()
}

fn sim_registry() -> ModelRegistry {
    let mut registry = ModelRegistry::new();
    let sim: Arc<dyn Backend> = Arc::new(SimBackend::new(fast()));
    if let Err(e) = registry.insert("m", 4, sim) {
        panic!("{e}");
    }
    registry
}

#[tokio::test]
async fn translation_over_the_simulator_yields_ordered_events_then_done() {
    let registry = sim_registry();
    let req =
        responses(json!({"model": "m", "input": "Tell me a story.", "instructions": "Be kind."}));
    let g = match registry.start(&req) {
        Ok(g) => g,
        Err(e) => panic!("{e}"),
    };
    let (events, end) = collect(g).await;
    let Ok(BackendEvent::Done {
        finish_reason,
        prompt_tokens,
        completion_tokens,
    }) = end
    else {
        panic!("{end:?}")
    };
    let kinds = types(&events);
    assert_eq!(
        kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        kinds[kinds.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            if finish_reason == "length" {
                "response.incomplete"
            } else {
                "response.completed"
            }
        ]
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i as u64);
    }
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert!(!deltas.is_empty());
    let last = &events[events.len() - 1]["response"];
    assert_eq!(last["output"][0]["content"][0]["text"], deltas.as_str());
    assert_eq!(last["usage"]["input_tokens"], prompt_tokens);
    assert_eq!(last["usage"]["output_tokens"], completion_tokens);
    assert_eq!(last["model"], "m");
    assert_eq!(last["instructions"], "Be kind.");
    assert!(last["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("resp_")));
    // The slot is freed once the generation is consumed.
    assert_eq!(registry.in_flight("m"), Some(0));
}

#[tokio::test]
async fn max_output_tokens_reaches_the_backend_and_ends_incomplete() {
    let registry = sim_registry();
    let req =
        responses(json!({"model": "m", "input": "Tell me a long story.", "max_output_tokens": 2}));
    let (events, end) = collect(registry.start(&req).unwrap_or_else(|e| panic!("{e}"))).await;
    assert!(
        matches!(&end, Ok(BackendEvent::Done { finish_reason, completion_tokens: 2, .. }) if finish_reason == "length"),
        "{end:?}"
    );
    let last = &events[events.len() - 1];
    assert_eq!(last["type"], "response.incomplete");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

/// A chat backend that records the request it got and streams a tool call as chunks.
struct ToolCaller {
    seen: Mutex<Option<InferenceRequest>>,
}

impl Backend for ToolCaller {
    fn start(&self, request: &InferenceRequest) -> Result<Generation, BackendError> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(request.clone());
        }
        let (tx, g) = Generation::channel();
        tokio::spawn(async move {
            let chunk = |delta: Value| {
                Ok(BackendEvent::Chunk {
                    json: json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
                        .to_string(),
                })
            };
            let events = [
                chunk(
                    json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_7", "type": "function", "function": {"name": "weather", "arguments": ""}}]}),
                ),
                chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                ),
                Ok(BackendEvent::Chunk {
                    json: "not json".into(),
                }),
                chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}),
                ),
                Ok(BackendEvent::Done {
                    finish_reason: "tool_calls".into(),
                    prompt_tokens: 9,
                    completion_tokens: 4,
                }),
            ];
            for e in events {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        });
        Ok(g)
    }

    fn kind(&self) -> &'static str {
        "test"
    }
}

#[tokio::test]
async fn a_chat_tool_call_becomes_a_function_call_item() {
    let backend = Arc::new(ToolCaller {
        seen: Mutex::new(None),
    });
    let mut registry = ModelRegistry::new();
    let dyn_backend: Arc<dyn Backend> = backend.clone();
    registry
        .insert_with_caps("m", 1, dyn_backend, nearpath_protocol::ModelCaps::TOOLS)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut req = responses(json!({
        "model": "m", "input": "Weather in Oslo?",
        "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": "required",
    }));
    req.request_id = Some("req_t".into());
    req.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let (events, end) = collect(registry.start(&req).unwrap_or_else(|e| panic!("{e}"))).await;
    assert!(matches!(end, Ok(BackendEvent::Done { .. })), "{end:?}");
    let seen = backend
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(seen) = seen else {
        panic!("the backend got nothing")
    };
    assert_eq!(seen.endpoint, Endpoint::Chat);
    assert_eq!(
        seen.request_id.as_deref(),
        Some("req_t"),
        "the ids reach the chat backend"
    );
    assert_eq!(seen.traceparent, req.traceparent);
    assert_eq!(seen.raw["tools"][0]["function"]["name"], "weather");
    assert_eq!(seen.raw["tool_choice"], "required");
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let item = &events[7]["response"]["output"][0];
    assert_eq!(item["type"], "function_call");
    assert_eq!(item["call_id"], "call_7");
    assert_eq!(item["name"], "weather");
    assert_eq!(item["arguments"], "{\"city\":\"Oslo\"}");
}

async fn http(addr: SocketAddr, body: &Value) -> (StatusCode, String, Vec<u8>) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/v1/responses"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = client.request(req).await.unwrap_or_else(|e| panic!("{e}"));
    let status = resp.status();
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .to_bytes();
    (status, ctype, bytes.to_vec())
}

#[tokio::test]
async fn serve_openai_answers_responses_streaming_and_not() {
    let server = TestServer::start(fast(), ServerOptions::default()).await;
    let (status, ctype, body) = http(
        server.addr,
        &json!({"model": "sim-model", "input": "Hello", "stream": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let text = String::from_utf8(body).unwrap_or_else(|e| panic!("{e}"));
    let mut parser = SseParser::new(1 << 20);
    parser
        .push(text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut events = Vec::new();
    while let Some(e) = parser.next_event() {
        let data: Value =
            serde_json::from_str(&e.data).unwrap_or_else(|err| panic!("{err}: {}", e.data));
        assert_eq!(
            e.event.as_deref(),
            data["type"].as_str(),
            "the event line names the type"
        );
        events.push(data);
    }
    assert!(!text.contains("[DONE]"), "the Responses API has no [DONE]");
    assert_eq!(events[0]["type"], "response.created");
    let last = &events[events.len() - 1];
    // The simulator may stop at its own token limit: then the response is incomplete.
    assert!(
        matches!(
            last["type"].as_str(),
            Some("response.completed" | "response.incomplete")
        ),
        "{last}"
    );

    let (status, ctype, body) = http(
        server.addr,
        &json!({"model": "sim-model", "input": "Hello"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let response: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], last["response"]["status"]);
    assert_eq!(
        response["output"][0]["content"][0]["text"],
        last["response"]["output"][0]["content"][0]["text"],
        "the simulator is deterministic: both answers carry the same text"
    );

    let (status, _, body) = http(
        server.addr,
        &json!({"model": "sim-model", "input": "x", "previous_response_id": "resp_1"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(err["error"]["param"], "previous_response_id");
    server.stop().await;
}

/// A one-shot HTTP server answering `response` (raw bytes) and reporting the request it read.
async fn canned(response: Vec<u8>) -> (SocketAddr, oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Read the head, then the body by its Content-Length.
        loop {
            let Ok(n) = sock.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let len = text[..head_end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= head_end + 4 + len {
                    let _ = tx.send(text);
                    break;
                }
            }
        }
        let _ = sock.write_all(&response).await;
        let _ = sock.shutdown().await;
    });
    (addr, rx)
}

fn sse_answer(events: &[Value]) -> Vec<u8> {
    let mut body = String::new();
    for e in events {
        body.push_str(&format!(
            "event: {}\ndata: {e}\n\n",
            e["type"].as_str().unwrap_or("")
        ));
    }
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn native_registry(addr: SocketAddr) -> ModelRegistry {
    let spec = super::super::ModelSpec {
        name: "m".into(),
        max_concurrency: 2,
        backend: super::super::BackendSpec::Upstream(UpstreamConfig {
            base_url: format!("http://{addr}/v1"),
            api_key: Some("sk-up".into()),
            upstream_model: Some("up-model".into()),
            timeout_ms: 10_000,
        }),
        responses: nearpath_config::ResponsesMode::Native,
        caps: None,
    };
    ModelRegistry::from_specs([spec]).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn native_mode_relays_the_upstream_events_and_its_usage() {
    let upstream_events = [
        json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_u", "output": []}}),
        json!({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_u", "output_index": 0, "content_index": 0, "delta": "Hi"}),
        json!({"type": "response.completed", "sequence_number": 2, "response": {"id": "resp_u", "status": "completed", "output": [], "usage": {"input_tokens": 7, "output_tokens": 1, "total_tokens": 8}}}),
    ];
    let (addr, seen) = canned(sse_answer(&upstream_events)).await;
    let registry = native_registry(addr);
    let mut req =
        responses(json!({"model": "m", "input": "hi", "store": false, "vendor": {"x": 1}}));
    req.request_id = Some("req_native".into());
    req.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let (events, end) = collect(registry.start(&req).unwrap_or_else(|e| panic!("{e}"))).await;
    assert_eq!(events, upstream_events, "relayed as the upstream sent them");
    assert_eq!(
        end,
        Ok(BackendEvent::Done {
            finish_reason: "stop".into(),
            prompt_tokens: 7,
            completion_tokens: 1
        })
    );
    let request = seen.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(request.starts_with("POST /v1/responses "), "{request}");
    assert!(request.contains("authorization: Bearer sk-up"), "{request}");
    assert!(
        request.contains("\r\nx-request-id: req_native\r\n"),
        "{request}"
    );
    assert!(
        request.contains(
            "\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
        ),
        "{request}"
    );
    let body: Value = serde_json::from_str(&request[request.find("\r\n\r\n").unwrap_or(0) + 4..])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(body["model"], "up-model");
    assert_eq!(body["stream"], true);
    assert_eq!(
        body["vendor"],
        json!({"x": 1}),
        "unknown fields pass through"
    );
    assert_eq!(body["input"], "hi");
}

#[tokio::test]
async fn native_mode_maps_upstream_failures() {
    let failing = [
        (
            sse_answer(&[json!({"type": "response.created", "response": {}}), json!({"type": "response.failed", "response": {"error": {"message": "boom"}}})]),
            "upstream_error",
        ),
        (sse_answer(&[json!({"type": "response.created", "response": {}})]), "upstream_protocol"),
        (sse_answer(&[json!({"no_type": 1})]), "upstream_protocol"),
        (
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
            "upstream_error",
        ),
        (
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 29\r\nconnection: close\r\n\r\n{\"error\":{\"message\":\"nope\"}}\n".to_vec(),
            "bad_request",
        ),
    ];
    for (answer, code) in failing {
        let (addr, _seen) = canned(answer).await;
        let registry = native_registry(addr);
        let req = responses(json!({"model": "m", "input": "hi"}));
        let (_, end) = collect(registry.start(&req).unwrap_or_else(|e| panic!("{e}"))).await;
        match end {
            Err(e) => assert_eq!(e.code(), code, "{e}"),
            other => panic!("expected {code}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_responses_request_needing_a_capability_the_model_lacks_is_refused_naming_it() {
    let mut registry = ModelRegistry::new();
    let sim: Arc<dyn Backend> = Arc::new(SimBackend::new(fast()));
    registry
        .insert_with_caps("m", 1, sim, nearpath_protocol::ModelCaps::NONE)
        .unwrap_or_else(|e| panic!("{e}"));
    for (body, param) in [
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}]}),
            "tools",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}),
            "text.format",
        ),
    ] {
        match registry.start(&responses(body)) {
            Err(BackendError::Unsupported { param: p, .. }) => assert_eq!(p, param),
            Err(e) => panic!("{param}: {e}"),
            Ok(_) => panic!("{param}: accepted"),
        }
    }
}
