use super::*;
use serde_json::json;

fn ctx(endpoint: Endpoint, n: u32) -> RewriteContext<'static> {
    RewriteContext {
        endpoint,
        id: "chatcmpl-gw",
        created: 7,
        model: "public",
        n,
        usage: Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
        },
    }
}

fn rewrite(endpoint: Endpoint, n: u32, v: Value) -> Result<(Value, ChunkInfo), RelayError> {
    let (s, info) = rewrite_chunk(&v.to_string(), &ctx(endpoint, n))?;
    Ok((serde_json::from_str(&s).expect("json"), info))
}

#[test]
fn rewriting_sets_the_relays_identity_drops_usage_and_keeps_every_other_field_in_order() {
    let chunk = json!({
        "id": "forged", "object": "x", "created": 1, "model": "forged-model",
        "system_fingerprint": "fp", "vendor_x": {"a": [1, 2]},
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": null,
            "reasoning_content": "hm", "refusal": null,
            "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": "{\"a\""}}]},
            "logprobs": {"content": [{"token": "a", "logprob": -0.1, "top_logprobs": []}]},
            "finish_reason": null, "annotations": []}],
        "usage": {"prompt_tokens": 999999, "completion_tokens": 999999}
    });
    let (out, info) = rewrite(Endpoint::Chat, 1, chunk.clone()).expect("valid");
    assert_eq!(out["id"], "chatcmpl-gw");
    assert_eq!(out["object"], "chat.completion.chunk");
    assert_eq!(out["created"], 7);
    assert_eq!(out["model"], "public");
    assert!(out.get("usage").is_none());
    assert_eq!(out["choices"], chunk["choices"]);
    assert_eq!(out["vendor_x"], chunk["vendor_x"]);
    assert_eq!(out["system_fingerprint"], "fp");
    let keys: Vec<&String> = out.as_object().expect("object").keys().collect();
    assert_eq!(
        keys,
        [
            "id",
            "object",
            "created",
            "model",
            "system_fingerprint",
            "vendor_x",
            "choices"
        ]
    );
    assert_eq!(info.generated, 1);
    assert!(info.has_role);
    assert!(info.finished.is_empty());
}

#[test]
fn a_hostile_nodes_garbage_is_a_typed_error() {
    let c = ctx(Endpoint::Chat, 1);
    assert!(matches!(
        rewrite_chunk("not json", &c),
        Err(RelayError::NotJson(_))
    ));
    assert_eq!(
        rewrite_chunk("[1,2]", &c).err(),
        Some(RelayError::NotObject)
    );
    assert_eq!(rewrite_chunk("{}", &c).err(), Some(RelayError::NoChoices));
    assert_eq!(
        rewrite_chunk(r#"{"choices":{}}"#, &c).err(),
        Some(RelayError::NoChoices)
    );
    assert_eq!(
        rewrite_chunk(r#"{"choices":[1]}"#, &c).err(),
        Some(RelayError::ChoiceNotObject(0))
    );
    // 1 MiB of nested arrays: the parser's depth limit, not the stack, stops it.
    let nested = format!(
        "{{\"choices\":{}{}}}",
        "[".repeat(512 * 1024),
        "]".repeat(512 * 1024)
    );
    assert!(matches!(
        rewrite_chunk(&nested, &c),
        Err(RelayError::NotJson(_))
    ));
}

#[test]
fn choices_beyond_n_are_refused() {
    let many: Vec<Value> = (0..10_000)
        .map(|i| json!({"index": i, "delta": {"content": "x"}, "finish_reason": null}))
        .collect();
    let err = rewrite(Endpoint::Chat, 2, json!({"choices": many})).expect_err("bounded by n");
    assert!(
        matches!(err, RelayError::ChoiceIndex { at: 2, n: 2, .. }),
        "{err:?}"
    );
    for index in [json!(4294967296u64), json!(-1), json!("0"), json!(1.5)] {
        let err = rewrite(
            Endpoint::Chat,
            1,
            json!({"choices": [{"index": index, "delta": {}}]}),
        )
        .expect_err("bad index");
        assert!(matches!(err, RelayError::ChoiceIndex { .. }));
    }
    let (_, info) = rewrite(
        Endpoint::Chat,
        2,
        json!({"choices": [
            {"index": 1, "delta": {"content": "a"}, "finish_reason": "stop"},
            {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}, "finish_reason": null}
        ]}),
    )
    .expect("two choices");
    assert_eq!(info.generated, 2);
    assert_eq!(info.finished, vec![(1, "stop".to_string())]);
}

#[test]
fn a_chunk_without_generated_content_is_not_metered() {
    for delta in [
        json!({}),
        json!({"role": "assistant", "content": ""}),
        json!({"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"arguments": ""}}]}),
    ] {
        let (_, info) = rewrite(
            Endpoint::Chat,
            1,
            json!({"choices": [{"index": 0, "delta": delta}]}),
        )
        .expect("valid");
        assert_eq!(info.generated, 0, "{delta}");
    }
    let (_, info) = rewrite(
        Endpoint::Completion,
        1,
        json!({"choices": [{"index": 0, "text": "hi", "logprobs": {"tokens": ["hi"]}, "finish_reason": "length"}]}),
    )
    .expect("valid");
    assert_eq!(info.generated, 1);
    assert_eq!(info.finished, vec![(0, "length".to_string())]);
}

#[test]
fn tool_call_deltas_that_repeat_their_identifiers_assemble_into_one_call() {
    // llama-cpp-python repeats id, type and function.name in every delta (DESIGN.md 7).
    let mut a = Assembler::new(Endpoint::Chat);
    for args in ["{\"city\"", ":\"Paris\"}"] {
        a.push_value(
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null,
            "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": args}}]},
            "logprobs": null, "finish_reason": null}]}),
        )
        .expect("valid");
    }
    a.push_value(json!({"system_fingerprint": "fp", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
        .expect("valid");
    let body: Value = serde_json::from_str(
        &a.finish(
            "id1",
            9,
            "m",
            "stop",
            Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
            },
        )
        .expect("body"),
    )
    .expect("json");
    assert_eq!(
        body,
        json!({"id": "id1", "object": "chat.completion", "created": 9, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                "logprobs": null, "finish_reason": "tool_calls"}],
            "system_fingerprint": "fp",
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
    );
}

#[test]
fn openai_style_tool_call_deltas_merge_by_index() {
    let mut a = Assembler::new(Endpoint::Chat);
    let pieces = [
        json!({"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
        json!({"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": ""}}]}),
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        json!({"tool_calls": [{"index": 1, "function": {"arguments": "[1"}}]}),
        json!({"tool_calls": [{"index": 1, "function": {"arguments": "]"}}]}),
        // A hostile index does not allocate: it is one more entry.
        json!({"tool_calls": [{"index": 4294967296u64, "function": {"arguments": "x"}}]}),
    ];
    for d in pieces {
        a.push_value(json!({"choices": [{"index": 0, "delta": d}]}))
            .expect("valid");
    }
    let body: Value = serde_json::from_str(
        &a.finish("i", 1, "m", "stop", Usage::default())
            .expect("body"),
    )
    .expect("json");
    let calls = &body["choices"][0]["message"]["tool_calls"];
    assert_eq!(
        calls[0]["function"],
        json!({"name": "f", "arguments": "{}"})
    );
    assert_eq!(
        calls[1]["function"],
        json!({"name": "g", "arguments": "[1]"})
    );
    assert_eq!(calls.as_array().map(Vec::len), Some(3));
}

#[test]
fn tokens_chunks_logprobs_and_several_choices_assemble() {
    let mut a = Assembler::new(Endpoint::Chat);
    a.push_text("Hel");
    a.push_value(json!({"choices": [
        {"index": 0, "delta": {"content": "lo", "reasoning_content": "r"},
         "logprobs": {"content": [{"token": "lo", "logprob": -1.0}], "refusal": null}},
        {"index": 1, "delta": {"role": "assistant", "content": "B"}, "logprobs": {"content": [{"token": "B", "logprob": -2.0}]}, "finish_reason": "length"}
    ]})).expect("valid");
    a.push_value(
        json!({"choices": [{"index": 0, "delta": {"reasoning_content": "s"},
        "logprobs": {"content": [{"token": "!", "logprob": -3.0}]}}]}),
    )
    .expect("valid");
    let body: Value = serde_json::from_str(
        &a.finish("i", 1, "m", "stop", Usage::default())
            .expect("body"),
    )
    .expect("json");
    let c0 = &body["choices"][0];
    assert_eq!(c0["message"]["content"], "Hello");
    assert_eq!(c0["message"]["reasoning_content"], "rs");
    assert_eq!(c0["logprobs"]["content"].as_array().map(Vec::len), Some(2));
    assert_eq!(c0["finish_reason"], "stop");
    let c1 = &body["choices"][1];
    assert_eq!(c1["index"], 1);
    assert_eq!(c1["message"]["content"], "B");
    assert_eq!(c1["finish_reason"], "length");
}

#[test]
fn a_text_only_stream_assembles_to_the_renderers_body() {
    let usage = Usage {
        prompt_tokens: 4,
        completion_tokens: 2,
    };
    for endpoint in [Endpoint::Chat, Endpoint::Completion] {
        let mut a = Assembler::new(endpoint);
        a.push_text(" a");
        a.push_text(" b");
        assert_eq!(
            a.finish("x", 9, "m", "length", usage).expect("body"),
            super::super::render::completion_response(
                endpoint, "x", 9, "m", " a b", "length", usage
            )
        );
    }
}

#[test]
fn the_text_only_fast_path_renders_what_the_general_path_would() {
    // `finish` renders Token-only answers without building a JSON value; the body must be the
    // one the general path gives for the same text arriving as a chunk.
    let usage = Usage {
        prompt_tokens: 3,
        completion_tokens: 5,
    };
    for (endpoint, piece) in [
        (
            Endpoint::Chat,
            json!({"choices": [{"index": 0, "delta": {"content": "Hi \"there\"\n"}}]}),
        ),
        (
            Endpoint::Completion,
            json!({"choices": [{"index": 0, "text": "Hi \"there\"\n"}]}),
        ),
    ] {
        let mut fast = Assembler::new(endpoint);
        fast.push_text("Hi \"the");
        fast.push_text("re\"\n");
        let mut general = Assembler::new(endpoint);
        general.push_value(piece).expect("valid");
        assert_eq!(
            fast.finish("x", 9, "m", "stop", usage).expect("body"),
            general.finish("x", 9, "m", "stop", usage).expect("body"),
            "{endpoint:?}"
        );
    }
}

#[test]
fn tokens_before_and_after_a_chunk_join_choice_0_in_order() {
    let mut a = Assembler::new(Endpoint::Chat);
    a.push_text("a");
    a.push_value(json!({"choices": [{"index": 0, "delta": {"content": "b"}}]}))
        .expect("valid");
    a.push_text("c");
    let body: Value = serde_json::from_str(
        &a.finish("i", 1, "m", "stop", Usage::default())
            .expect("body"),
    )
    .expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], "abc");
    assert_eq!(body["choices"].as_array().map(Vec::len), Some(1));
}

#[test]
fn embeddings_assemble_in_index_order_and_refuse_duplicates_and_strays() {
    let mut e = EmbeddingsAssembler::new(2);
    e.push_chunk(r#"{"object":"embedding","index":1,"embedding":[0.5,1]}"#)
        .expect("ok");
    e.push_chunk(r#"{"object":"embedding","index":0,"embedding":"AAAA"}"#)
        .expect("ok");
    assert!(
        e.push_chunk(r#"{"index":0,"embedding":[1]}"#).is_err(),
        "duplicate"
    );
    for bad in [
        r#"{"index":2,"embedding":[1]}"#,
        r#"{"index":-1,"embedding":[1]}"#,
        r#"{"index":0,"embedding":["x"]}"#,
        r#"{"index":0}"#,
        r#"[]"#,
    ] {
        assert!(
            EmbeddingsAssembler::new(2).push_chunk(bad).is_err(),
            "{bad}"
        );
    }
    let body: Value = serde_json::from_str(&e.finish("m", 5).expect("body")).expect("json");
    assert_eq!(
        body,
        json!({"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": "AAAA"},
            {"object": "embedding", "index": 1, "embedding": [0.5, 1]}],
            "model": "m", "usage": {"prompt_tokens": 5, "total_tokens": 5}})
    );
    assert!(
        EmbeddingsAssembler::new(1).finish("m", 1).is_err(),
        "missing input"
    );
}

#[test]
fn responses_events_get_the_public_model_and_the_measured_usage() {
    let (out, info) = rewrite(
        Endpoint::Responses,
        1,
        json!({"type": "response.output_text.delta", "item_id": "i", "delta": "hi"}),
    )
    .expect("valid");
    assert_eq!(out["delta"], "hi");
    assert_eq!(info.generated, 1);
    assert_eq!(
        info.event_type.as_deref(),
        Some("response.output_text.delta")
    );
    let (out, info) = rewrite(
        Endpoint::Responses,
        1,
        json!({"type": "response.completed", "response": {"id": "r", "model": "private",
            "output": [], "usage": {"input_tokens": 1000, "output_tokens": 1000, "total_tokens": 2000}}}),
    )
    .expect("valid");
    assert_eq!(out["response"]["model"], "public");
    assert_eq!(
        out["response"]["usage"],
        json!({"input_tokens": 3, "output_tokens": 2, "total_tokens": 5})
    );
    assert_eq!(info.generated, 0);
    assert_eq!(info.finished, vec![(0, "completed".to_string())]);
    for bad in [
        json!({"type": "a\nb"}),
        json!({"type": 1}),
        json!({}),
        json!({"type": "x".repeat(200)}),
    ] {
        assert_eq!(
            rewrite(Endpoint::Responses, 1, bad).err(),
            Some(RelayError::NoEventType)
        );
    }
    let mut a = Assembler::new(Endpoint::Responses);
    a.push_value(out).expect("valid");
    let body: Value = serde_json::from_str(
        &a.finish("i", 1, "m", "stop", Usage::default())
            .expect("final"),
    )
    .expect("json");
    assert_eq!(body["id"], "r");
    assert_eq!(
        responses_sse_event("response.completed", "{}"),
        bytes::Bytes::from_static(b"event: response.completed\ndata: {}\n\n")
    );
    assert_eq!(
        Assembler::new(Endpoint::Responses)
            .finish("i", 1, "m", "stop", Usage::default())
            .err(),
        Some(RelayError::NoFinalResponse)
    );
}
