//! Pass-through end to end: what a node produced (tool calls, logprobs, reasoning, embeddings,
//! vendor fields) reaches the client through the gateway, rewritten only where the gateway must
//! (id, model, usage it measured); a hostile node's pieces become a 502 naming it; request ids
//! and trace context reach the node; every request gets one access-log line.

mod common;

use common::*;
use nearpath_protocol::message::{Accepted, Chunk, Done, Message, SessionKind, Token};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::MAX_REQUEST_FRAME;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// What a scripted node sends on a session after `Accepted`.
enum Say {
    Token(&'static str),
    Chunk(String),
    Done(&'static str),
}

/// Serves every session of `raw` with `script`, reporting each `Open` it got.
fn scripted(raw: RawNode, script: Vec<Say>) -> tokio::sync::mpsc::UnboundedReceiver<SessionKind> {
    let (opens, rx) = tokio::sync::mpsc::unbounded_channel();
    let script = Arc::new(script);
    tokio::spawn(async move {
        // The whole node lives here: dropping its control stream would deregister it.
        let raw = raw;
        while let Ok((mut tx, rx)) = raw.conn.accept_bi().await {
            let script = script.clone();
            let opens = opens.clone();
            tokio::spawn(async move {
                let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
                let Ok(Some(Message::Open(open))) = framed.next().await else {
                    return;
                };
                let _ = opens.send(open.kind);
                let _ = send(&mut tx, &Message::Accepted(Accepted { session_id: 0 })).await;
                for (i, say) in script.iter().enumerate() {
                    let msg = match say {
                        Say::Token(t) => Message::Token(Token {
                            index: i as u32,
                            text: (*t).into(),
                            node_elapsed_us: 1,
                        }),
                        Say::Chunk(json) => Message::Chunk(Chunk {
                            index: i as u32,
                            json: json.clone(),
                            node_elapsed_us: 1,
                        }),
                        Say::Done(reason) => Message::Done(Done {
                            finish_reason: (*reason).into(),
                            // A node's claim: never billed.
                            prompt_tokens: 100_000,
                            completion_tokens: 100_000,
                        }),
                    };
                    if send(&mut tx, &msg).await.is_err() {
                        return;
                    }
                }
                let _ = tx.finish();
                // Keep the stream open until the gateway is done with it.
                let _ = framed.next().await;
            });
        }
    });
    rx
}

fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

fn tool_call_script() -> Vec<Say> {
    let piece = |args: &str| {
        // llama-cpp-python style: id, type and name repeated in every delta; forged identity
        // and usage that the gateway must not relay.
        json!({"id": "forged", "object": "chat.completion.chunk", "created": 1, "model": "secret-upstream",
            "system_fingerprint": "fp_node", "x_vendor": {"k": [1, 2]},
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": null, "reasoning_content": "think",
                "tool_calls": [{"index": 0, "id": "call_7", "type": "function",
                    "function": {"name": "get_weather", "arguments": args}}]},
                "logprobs": {"content": [{"token": "x", "logprob": -0.25, "bytes": [120], "top_logprobs": []}]},
                "finish_reason": null}],
            "usage": {"prompt_tokens": 999, "completion_tokens": 999, "total_tokens": 1998}})
        .to_string()
    };
    vec![
        Say::Chunk(piece("{\"city\":")),
        Say::Chunk(piece("\"Paris\"}")),
        Say::Chunk(
            json!({"choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}]})
                .to_string(),
        ),
        Say::Done("tool_calls"),
    ]
}

/// Lines of the access log (target `nearpath::access`), captured for the whole test binary.
fn access_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("nearpath::access=info"))
            .with_ansi(false)
            .with_writer(move || SharedWriter(writer.clone()))
            .finish();
        let _ = tracing_subscriber::util::SubscriberInitExt::try_init(subscriber);
        buf
    })
    .clone()
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn access_line(request_id: &str) -> String {
    let log = access_log();
    eventually(
        "the access-log line",
        std::time::Duration::from_secs(10),
        || {
            let log = log.clone();
            let needle = format!("request_id={request_id} ");
            async move {
                let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
                text.lines()
                    .find(|l| l.contains(&needle))
                    .map(str::to_string)
            }
        },
    )
    .await
}

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_deltas_logprobs_and_vendor_fields_pass_through_with_the_gateways_identity() {
    access_log();
    let gw = TestGateway::start(|_| {}).await;
    let raw = RawNode::connect(&gw, "tools-node", ip(DE), "cpu").await;
    let mut opens = scripted(raw, tool_call_script());
    let url = gw.api_url("/v1/chat/completions");
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    .to_string();
    let (status, headers, text) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&body),
            &[("x-request-id", "req-passthru-1"), ("traceparent", TRACE)],
        )
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["x-request-id"], "req-passthru-1");
    assert!(headers.get("traceparent").is_none(), "not echoed");
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    // No role chunk of the gateway's own (the node's first chunk carries the role), the node's
    // three chunks, then the usage chunk.
    assert_eq!(chunks.len(), 4, "{text}");
    for c in &chunks {
        assert_eq!(c["model"], "m", "{c}");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"), "{c}");
        assert_ne!(c["id"], "forged");
    }
    assert_eq!(chunks[0]["system_fingerprint"], "fp_node");
    assert_eq!(chunks[0]["x_vendor"], json!({"k": [1, 2]}));
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["tool_calls"][0]["function"],
        json!({"name": "get_weather", "arguments": "{\"city\":"})
    );
    assert_eq!(
        chunks[0]["choices"][0]["logprobs"]["content"][0]["logprob"],
        -0.25
    );
    assert!(
        chunks[..3].iter().all(|c| c.get("usage").is_none()),
        "forged usage relayed"
    );
    // The node's finish chunk is the only one.
    let finishes = chunks
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"].is_string())
        .count();
    assert_eq!(finishes, 1, "{text}");
    // Billed: the two pieces with generated content, never the node's claim.
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 2, "{text}");

    // The node got the request id and the client's trace, under the gateway's own span.
    match opens.recv().await.unwrap() {
        SessionKind::Inference {
            request_id,
            traceparent,
            ..
        } => {
            assert_eq!(request_id, "req-passthru-1");
            let tp = traceparent.unwrap();
            assert!(
                tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{tp}"
            );
            assert_ne!(tp, TRACE);
        }
        other => panic!("{other:?}"),
    }
    let line = access_line("req-passthru-1").await;
    for part in [
        "http POST /v1/chat/completions status=200",
        "trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
        "model=\"m\"",
        "node=tools-node",
        "completion_tokens=2",
        "outcome=ok",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }

    // A request refused before admission gets its line too.
    let (status, _, _) = gw
        .http
        .request(
            "POST",
            &url,
            Some("wrong-key"),
            Some(&body),
            &[("x-request-id", "req-passthru-401")],
        )
        .await;
    assert_eq!(status, 401);
    let line = access_line("req-passthru-401").await;
    assert!(
        line.contains("http POST /v1/chat/completions status=401"),
        "{line}"
    );

    // QUIC clients get the same JSON in Chunks.
    let client = native_client(&gw, DE).await;
    let mut stream = client
        .infer_at(API_KEY, nearpath_protocol::openai::Endpoint::Chat, &body)
        .await
        .unwrap();
    let mut quic_chunks = Vec::new();
    let billed = loop {
        match stream.next().await.unwrap() {
            Some(nearpath_protocol::client::InferEvent::Chunk(c)) => {
                quic_chunks.push(serde_json::from_str::<Value>(&c.json).unwrap())
            }
            Some(nearpath_protocol::client::InferEvent::Done(d)) => break d,
            Some(nearpath_protocol::client::InferEvent::Error(e)) => panic!("{e:?}"),
            Some(_) => {}
            None => panic!("no Done"),
        }
    };
    let _ = opens.recv().await;
    assert_eq!(quic_chunks.len(), 3);
    for (quic, http) in quic_chunks.iter().zip(&chunks) {
        assert_eq!(quic["choices"], http["choices"]);
        assert_eq!(quic["model"], "m");
        assert!(quic.get("usage").is_none());
    }
    assert_eq!(billed.completion_tokens, 2);
    assert_eq!(billed.finish_reason, "tool_calls");

    // Not streaming: the same pieces assembled the way the openai client accumulates them.
    let plain =
        json!({"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}]})
            .to_string();
    let (status, _, text) = gw
        .http
        .request(
            "POST",
            &url,
            Some(API_KEY),
            Some(&plain),
            &[(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )],
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "m");
    assert_eq!(v["system_fingerprint"], "fp_node");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(choice["message"]["reasoning_content"], "thinkthink");
    assert_eq!(
        choice["message"]["tool_calls"],
        // The stream-only `index` is gone, as in a non-streaming answer.
        json!([{"id": "call_7", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}])
    );
    assert_eq!(choice["logprobs"]["content"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["completion_tokens"], 2);
    // An all-zero trace id is invalid: the gateway started a new trace instead.
    match opens.recv().await.unwrap() {
        SessionKind::Inference { traceparent, .. } => {
            let tp = traceparent.unwrap();
            assert!(
                !tp.starts_with("00-00000000000000000000000000000000"),
                "{tp}"
            );
        }
        other => panic!("{other:?}"),
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_nodes_chunks_are_a_502_naming_it() {
    let gw = TestGateway::start(|_| {}).await;
    let url = gw.api_url("/v1/chat/completions");
    let nested = format!("{}{}", "[".repeat(512 * 1024), "]".repeat(512 * 1024));
    let ten_thousand: Vec<Value> = (0..10_000)
        .map(|i| json!({"index": i, "delta": {"content": "x"}}))
        .collect();
    let cases = [
        ("not-json", "{\"choices\":[".to_string()),
        ("not-object", "[1,2,3]".to_string()),
        ("nested", nested),
        (
            "too-many-choices",
            json!({"choices": ten_thousand}).to_string(),
        ),
        ("no-choices", json!({"id": "x"}).to_string()),
    ];
    for (i, (name, chunk)) in cases.into_iter().enumerate() {
        let node_id = format!("hostile-{name}");
        let raw = RawNode::connect_serving(&gw, &node_id, ip(DE), "cpu", &[&format!("h{i}")]).await;
        let _opens = scripted(raw, vec![Say::Chunk(chunk), Say::Done("stop")]);
        let body =
            json!({"model": format!("h{i}"), "messages": [{"role": "user", "content": "hi"}]})
                .to_string();
        let (status, _, text) = gw
            .http
            .request("POST", &url, Some(API_KEY), Some(&body), &[])
            .await;
        assert_eq!(status, 502, "{name}: {text}");
        assert!(text.contains(&node_id), "{name}: {text}");
        // Streaming: an in-band error after the headers.
        let body = json!({"model": format!("h{i}"), "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string();
        let (status, _, text) = gw
            .http
            .request("POST", &url, Some(API_KEY), Some(&body), &[])
            .await;
        assert_eq!(status, 200, "{name}: {text}");
        let last: Value = serde_json::from_str(sse_data(&text).last().unwrap()).unwrap();
        assert!(
            last["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&node_id),
            "{name}: {text}"
        );
    }
    // A tool-call index of 2^32 is the client's to judge: relayed, assembled without allocating.
    let raw = RawNode::connect_serving(&gw, "odd-index", ip(DE), "cpu", &["odd"]).await;
    let chunk = json!({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 4294967296u64, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]});
    let _opens = scripted(
        raw,
        vec![Say::Chunk(chunk.to_string()), Say::Done("tool_calls")],
    );
    let body = json!({"model": "odd", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let (status, _, text) = gw
        .http
        .request("POST", &url, Some(API_KEY), Some(&body), &[])
        .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    // One call, whole (its stream-only index dropped as in a non-streaming answer).
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"],
        json!([{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_assembled_in_input_order_and_billed_as_the_prompt_estimate() {
    let gw = TestGateway::start(|_| {}).await;
    let raw = RawNode::connect_serving(&gw, "emb-node", ip(DE), "cpu", &["e"]).await;
    let mut opens = scripted(
        raw,
        vec![
            Say::Chunk(r#"{"object":"embedding","index":1,"embedding":[0.5,-1.0]}"#.into()),
            Say::Chunk(r#"{"object":"embedding","index":0,"embedding":[0.25,0.0]}"#.into()),
            Say::Done("stop"),
        ],
    );
    let url = gw.api_url("/v1/embeddings");
    // 8 bytes of text (2 tokens) and 3 token ids.
    let body = json!({"model": "e", "input": ["abcdefgh"], "encoding_format": "float"});
    let (status, _, text) = gw
        .http
        .request("POST", &url, Some(API_KEY), Some(&body.to_string()), &[])
        .await;
    // One input, but the node answered two: the second index is out of range.
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("emb-node"), "{text}");
    let _ = opens.recv().await;
    let body = json!({"model": "e", "input": [[1, 2, 3], "abcdefgh"], "dimensions": 2});
    let (status, _, text) = gw
        .http
        .request("POST", &url, Some(API_KEY), Some(&body.to_string()), &[])
        .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v,
        json!({"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": [0.25, 0.0]},
            {"object": "embedding", "index": 1, "embedding": [0.5, -1.0]}],
            "model": "e", "usage": {"prompt_tokens": 5, "total_tokens": 5}})
    );
    // The node got the endpoint and the body as sent.
    match opens.recv().await.unwrap() {
        SessionKind::Inference {
            endpoint,
            request_json,
            ..
        } => {
            assert_eq!(endpoint, nearpath_protocol::openai::Endpoint::Embeddings);
            assert_eq!(serde_json::from_str::<Value>(&request_json).unwrap(), body);
        }
        other => panic!("{other:?}"),
    }
    // Method not allowed on the new paths.
    let (status, _) = gw.http.get(&url, Some(API_KEY)).await;
    assert_eq!(status, 405);
    let (status, _) = gw
        .http
        .get(&gw.api_url("/v1/responses"), Some(API_KEY))
        .await;
    assert_eq!(status, 405);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_found_by_id_with_the_lists_availability_and_404_otherwise() {
    let gw = TestGateway::start(|_| {}).await;
    let raw =
        RawNode::connect_serving(&gw, "models-node", ip(DE), "cpu", &["org/model-7b", "m"]).await;
    let _opens = scripted(raw, vec![Say::Token("x"), Say::Done("stop")]);
    let (status, body) = gw
        .http
        .get(&gw.api_url("/v1/models/org/model-7b"), Some(API_KEY))
        .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], "org/model-7b");
    assert_eq!(v["object"], "model");
    assert_eq!(v["owned_by"], "nearpath");
    assert_eq!(v["available"], true);
    assert!(v["created"].is_u64());
    let (status, body) = gw
        .http
        .get(&gw.api_url("/v1/models/nope"), Some(API_KEY))
        .await;
    assert_eq!(status, 404, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "model_not_found", "{body}");
    let (status, _) = gw.http.get(&gw.api_url("/v1/models/m"), None).await;
    assert_eq!(status, 401);
    let (status, _, _) = gw
        .http
        .request(
            "DELETE",
            &gw.api_url("/v1/models/m"),
            Some(API_KEY),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 405);
    gw.stop().await;
}
