use super::*;
use crate::openai::{Endpoint, Input};

fn parse(v: Value) -> Result<InferenceRequest, RequestError> {
    InferenceRequest::from_value(Endpoint::Responses, v)
}

fn ok(v: Value) -> InferenceRequest {
    match parse(v.clone()) {
        Ok(r) => r,
        Err(e) => panic!("{v} was refused: {e:?}"),
    }
}

fn err(v: Value) -> RequestError {
    match parse(v.clone()) {
        Ok(_) => panic!("{v} was accepted"),
        Err(e) => e,
    }
}

fn drain(s: &mut ResponseStream) -> Vec<Value> {
    std::iter::from_fn(|| s.poll()).collect()
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[test]
fn a_string_input_is_one_user_message_and_limits_map_to_the_request() {
    let r = ok(json!({
        "model": "m", "input": "hello there", "instructions": "be brief",
        "max_output_tokens": 32, "stream": true, "temperature": 0.5, "store": false,
        "metadata": {"k": "v"}, "user": "u1", "parallel_tool_calls": false,
        "reasoning": {"effort": "low"}, "top_p": 0.9,
    }));
    assert_eq!(r.endpoint, Endpoint::Responses);
    assert_eq!(r.max_tokens, Some(32));
    assert!(r.stream);
    assert_eq!(r.temperature, Some(0.5));
    assert_eq!(r.user.as_deref(), Some("u1"));
    let Input::Messages(m) = &r.input else {
        panic!("{:?}", r.input)
    };
    assert_eq!(m.len(), 2);
    assert_eq!(
        (m[0].role, m[0].content.as_str()),
        (Role::System, "be brief")
    );
    assert_eq!(
        (m[1].role, m[1].content.as_str()),
        (Role::User, "hello there")
    );
}

#[test]
fn input_items_of_every_kind_parse_into_messages() {
    let r = ok(json!({
        "model": "m",
        "input": [
            {"role": "developer", "content": "rules"},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "what is in"},
                {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"},
                {"type": "input_text", "text": "this picture?"},
            ]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a cat", "annotations": []}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "reasoning", "summary": []},
        ],
    }));
    let roles: Vec<Role> = r.messages().iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [
            Role::Developer,
            Role::User,
            Role::Assistant,
            Role::Assistant,
            Role::Tool
        ]
    );
    assert_eq!(r.messages()[1].content, "what is in\nthis picture?");
    assert_eq!(r.messages()[4].content, "sunny");
    assert_eq!(r.max_tokens, None);
    assert!(!r.stream);
}

#[test]
fn hostile_responses_requests_are_refused_naming_the_param() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"model": "m"}), "input"),
        (json!({"model": "m", "input": 7}), "input"),
        (json!({"model": "m", "input": []}), "input"),
        (json!({"model": "m", "input": [1]}), "input[0]"),
        (
            json!({"model": "m", "input": [{"content": "x"}]}),
            "input[0].role",
        ),
        (
            json!({"model": "m", "input": [{"role": "wizard", "content": "x"}]}),
            "input[0].role",
        ),
        (
            json!({"model": "m", "input": [{"role": "user"}]}),
            "input[0].content",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": 5}]}),
            "input[0].content",
        ),
        (
            json!({"model": "m", "input": ["hi", {"role": "user", "content": "x"}]}),
            "input[0]",
        ),
        (
            json!({"model": "m", "input": [
                {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "user", "content": [{"type": "input_text", "text": "ok"}, {"type": "video", "url": "x"}]},
            ]}),
            "input[3].content[1].type",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": 3}]}]}),
            "input[0].content[0].type",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text"}]}]}),
            "input[0].content[0].text",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": ["x"]}]}]}),
            "input[0].content[0].text",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
            "input[0].content[0].image_url",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
            "input[0].call_id",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]}),
            "input[0].arguments",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]}),
            "input[0].output",
        ),
        (
            json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}),
            "input[0].type",
        ),
        (
            json!({"model": "m", "input": [{"type": "computer_call"}]}),
            "input[0].type",
        ),
        (
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (
            json!({"model": "m", "input": "x", "conversation": "conv_1"}),
            "conversation",
        ),
        (
            json!({"model": "m", "input": "x", "background": true}),
            "background",
        ),
        (
            json!({"model": "m", "input": "x", "instructions": 1}),
            "instructions",
        ),
        (
            json!({"model": "m", "input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (
            json!({"model": "m", "input": "x", "max_output_tokens": 1e12}),
            "max_output_tokens",
        ),
        (
            json!({"model": "m", "input": "x", "max_output_tokens": "5"}),
            "max_output_tokens",
        ),
        (
            json!({"model": "m", "input": "x", "temperature": 3}),
            "temperature",
        ),
        (json!({"model": "m", "input": "x", "top_p": 1.5}), "top_p"),
        (json!({"model": "m", "input": "x", "top_p": "0.1"}), "top_p"),
        (json!({"model": "m", "input": "x", "store": "no"}), "store"),
        (
            json!({"model": "m", "input": "x", "metadata": []}),
            "metadata",
        ),
        (
            json!({"model": "m", "input": "x", "reasoning": "high"}),
            "reasoning",
        ),
        (
            json!({"model": "m", "input": "x", "parallel_tool_calls": 1}),
            "parallel_tool_calls",
        ),
        (json!({"model": "m", "input": "x", "tools": {}}), "tools"),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"name": "f"}]}),
            "tools[0].type",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function"}]}),
            "tools[0].name",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": ""}]}),
            "tools[0].name",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": "{}"}]}),
            "tools[0].parameters",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f", "strict": "yes"}]}),
            "tools[0].strict",
        ),
        (
            json!({"model": "m", "input": "x", "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"model": "m", "input": "x", "tool_choice": "maybe"}),
            "tool_choice",
        ),
        (
            json!({"model": "m", "input": "x", "tool_choice": 1}),
            "tool_choice",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}}),
            "tool_choice.name",
        ),
        (
            json!({"model": "m", "input": "x", "tool_choice": {"type": "file_search"}}),
            "tool_choice.type",
        ),
        (json!({"model": "m", "input": "x", "text": "json"}), "text"),
        (
            json!({"model": "m", "input": "x", "text": {"format": "json"}}),
            "text.format",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {}}}),
            "text.format.type",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}),
            "text.format.type",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}),
            "text.format.name",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}}),
            "text.format.schema",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": []}}}),
            "text.format.schema",
        ),
    ];
    for (body, param) in cases {
        let e = err(body.clone());
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        assert!(e.message.contains(param), "{body}: {}", e.message);
    }
    let huge: Vec<Value> = (0..=MAX_INPUT_ITEMS)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    assert_eq!(
        err(json!({"model": "m", "input": huge})).param.as_deref(),
        Some("input")
    );
    let tools: Vec<Value> = (0..=MAX_TOOLS)
        .map(|i| json!({"type": "function", "name": format!("f{i}")}))
        .collect();
    assert_eq!(
        err(json!({"model": "m", "input": "x", "tools": tools}))
            .param
            .as_deref(),
        Some("tools")
    );
}

#[test]
fn store_true_and_nulls_are_accepted() {
    ok(
        json!({"model": "m", "input": "x", "store": true, "previous_response_id": null,
        "tools": null, "text": {"format": {"type": "text"}}, "metadata": null}),
    );
}

#[test]
fn chat_request_translates_every_part() {
    let r = ok(json!({
        "model": "m",
        "instructions": "be terse",
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
            ]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "calling", "annotations": []}]},
            {"type": "function_call", "call_id": "call_a", "name": "f", "arguments": "{\"x\":1}"},
            {"type": "function_call", "call_id": "call_b", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_a", "output": "one"},
            {"type": "function_call_output", "call_id": "call_b", "output": "two"},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": true},
                  {"type": "function", "name": "g"}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}, "strict": true}},
        "max_output_tokens": 50,
        "temperature": 0.2, "top_p": 0.5, "seed": 7, "user": "u", "parallel_tool_calls": false,
        "store": true, "metadata": {"a": "b"}, "reasoning": {"effort": "low"},
        "vendor_extra": {"k": 1}, "stream": false,
    }));
    let chat = Value::Object(chat_request(&r));
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "system", "content": "be terse"},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]},
            {"role": "assistant", "content": "calling", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_a", "content": "one"},
            {"role": "tool", "tool_call_id": "call_b", "content": "two"},
            {"role": "user", "content": "thanks"},
        ])
    );
    assert_eq!(
        chat["tools"],
        json!([
            {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": true}},
            {"type": "function", "function": {"name": "g"}},
        ])
    );
    assert_eq!(
        chat["tool_choice"],
        json!({"type": "function", "function": {"name": "f"}})
    );
    assert_eq!(
        chat["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": true}})
    );
    assert_eq!(chat["max_tokens"], 50);
    assert_eq!(chat["stream"], true);
    assert_eq!(chat["reasoning_effort"], "low");
    for kept in [
        "temperature",
        "top_p",
        "seed",
        "user",
        "parallel_tool_calls",
        "vendor_extra",
    ] {
        assert_eq!(chat[kept], r.raw[kept], "{kept}");
    }
    for dropped in [
        "input",
        "instructions",
        "max_output_tokens",
        "text",
        "store",
        "metadata",
        "reasoning",
    ] {
        assert!(chat.get(dropped).is_none(), "{dropped} leaked into {chat}");
    }
    // The translation is itself a valid chat request.
    let back = InferenceRequest::from_value(Endpoint::Chat, chat).unwrap();
    assert_eq!(back.max_tokens, Some(50));
    assert_eq!(back.messages().len(), 6);
}

#[test]
fn chat_request_of_a_string_input_and_json_mode() {
    let r = ok(
        json!({"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}},
        "tool_choice": "auto", "tools": []}),
    );
    let chat = chat_request(&r);
    assert_eq!(chat["messages"], json!([{"role": "user", "content": "hi"}]));
    assert_eq!(chat["response_format"], json!({"type": "json_object"}));
    assert_eq!(chat["tool_choice"], "auto");
    assert!(chat.get("max_tokens").is_none());
}

fn stream_for(body: Value) -> ResponseStream {
    ResponseStream::new(&ok(body), "resp_abc", 1_700_000_000, "m")
}

#[test]
fn text_stream_events_come_in_the_official_order_with_sequence_numbers() {
    let mut s = stream_for(json!({"model": "m", "input": "hi", "instructions": "sys"}));
    s.handle_text("Hello");
    s.handle_chunk(&json!({"choices": [{"index": 0, "delta": {"content": ", world"}}]}));
    s.handle_text("");
    s.handle_text("!");
    s.handle_done("stop", 5, 3);
    let events = drain(&mut s);
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i as u64, "{e}");
    }
    assert_eq!(events[0]["response"]["status"], "in_progress");
    assert_eq!(events[0]["response"]["output"], json!([]));
    assert_eq!(events[0]["response"]["instructions"], "sys");
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "Hello, world!");
    assert_eq!(events[7]["text"], deltas);
    let item_id = events[2]["item"]["id"].as_str().unwrap();
    assert!(item_id.starts_with("msg_"), "{item_id}");
    for e in &events[3..10] {
        assert_eq!(e["output_index"], 0);
        if e.get("item_id").is_some() {
            assert_eq!(e["item_id"], item_id);
        }
    }
    let done = &events[10]["response"];
    assert_eq!(done["id"], "resp_abc");
    assert_eq!(done["object"], "response");
    assert_eq!(done["created_at"], 1_700_000_000u64);
    assert_eq!(done["status"], "completed");
    assert_eq!(done["model"], "m");
    assert_eq!(
        done["output"],
        json!([{"id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello, world!", "annotations": [], "logprobs": []}]}])
    );
    assert_eq!(
        done["usage"],
        json!({"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 8})
    );
    assert_eq!(Value::Object(s.response().clone()), *done);
    assert!(s.is_finished());
}

#[test]
fn a_streamed_tool_call_becomes_a_function_call_item_after_the_message() {
    let mut s = stream_for(json!({"model": "m", "input": "weather?",
        "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]}));
    s.handle_text("Let me check.");
    // As llama.cpp streams it: id, type and name repeated in every delta.
    for piece in ["{\"city\":", "\"Paris\"}"] {
        s.handle_chunk(&json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_9", "type": "function", "function": {"name": "weather", "arguments": piece}}
        ]}}]}));
    }
    s.handle_chunk(&json!({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "call_10", "function": {"name": "time", "arguments": "{}"}}
    ]}}]}));
    s.handle_chunk(&json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}));
    s.handle_done("tool_calls", 4, 9);
    let events = drain(&mut s);
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(events[8]["output_index"], 1);
    assert_eq!(events[8]["item"]["type"], "function_call");
    assert_eq!(events[8]["item"]["call_id"], "call_9");
    assert_eq!(events[8]["item"]["name"], "weather");
    assert!(events[8]["item"]["id"].as_str().unwrap().starts_with("fc_"));
    assert_eq!(events[11]["arguments"], "{\"city\":\"Paris\"}");
    let output = &events[17]["response"]["output"];
    assert_eq!(output.as_array().unwrap().len(), 3);
    assert_eq!(output[1]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(output[1]["status"], "completed");
    assert_eq!(output[2]["call_id"], "call_10");
    assert_eq!(output[2]["name"], "time");
    assert_eq!(events[17]["response"]["status"], "completed");
    assert_eq!(events[17]["response"]["tools"][0]["name"], "weather");
    let ids: Vec<&str> = output
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");
}

#[test]
fn length_finish_is_response_incomplete_with_max_output_tokens() {
    let mut s = stream_for(json!({"model": "m", "input": "hi", "max_output_tokens": 2}));
    s.handle_text("a");
    s.handle_text(" b");
    s.handle_done("length", 1, 2);
    let events = drain(&mut s);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.incomplete");
    assert_eq!(last["response"]["status"], "incomplete");
    assert_eq!(
        last["response"]["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(last["response"]["max_output_tokens"], 2);
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], "a b");
}

#[test]
fn the_finish_reason_of_a_chunk_is_used_when_done_has_none() {
    let mut s = stream_for(json!({"model": "m", "input": "hi"}));
    s.handle_chunk(
        &json!({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "length"}]}),
    );
    s.handle_done("", 1, 1);
    assert_eq!(drain(&mut s).last().unwrap()["type"], "response.incomplete");
}

#[test]
fn an_empty_generation_completes_with_no_output_and_later_input_is_ignored() {
    let mut s = stream_for(json!({"model": "m", "input": "hi"}));
    s.handle_done("stop", 1, 0);
    s.handle_text("late");
    s.handle_done("stop", 1, 1);
    let events = drain(&mut s);
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.completed"
        ]
    );
    assert_eq!(events[2]["response"]["output"], json!([]));
}

#[test]
fn hostile_backend_chunks_never_panic_and_are_ignored() {
    let mut s = stream_for(json!({"model": "m", "input": "hi"}));
    for chunk in [
        json!(null),
        json!([]),
        json!({"choices": 3}),
        json!({"choices": [1, "x"]}),
        json!({"choices": [{"index": 1, "delta": {"content": "other choice"}}]}),
        json!({"choices": [{"delta": {"content": 5, "tool_calls": "x"}}]}),
        json!({"choices": [{"delta": {"tool_calls": [null, 3, {"index": "a", "function": 7}]}}]}),
        json!({"choices": [{"delta": {"tool_calls": [{"index": u64::MAX, "function": {"arguments": 1}}]}}]}),
    ] {
        s.handle_chunk(&chunk);
    }
    s.handle_done("stop", 0, 0);
    let events = drain(&mut s);
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    // Only well-formed pieces produced items: none carried text for choice 0.
    for e in &events {
        assert_ne!(e["type"], "response.output_text.delta", "{e}");
    }
}

#[test]
fn request_fields_are_echoed_in_the_response_object() {
    let s = stream_for(
        json!({"model": "m", "input": "hi", "temperature": 0.3, "top_p": 0.8,
        "tool_choice": "none", "store": true, "metadata": {"a": "1"}, "user": "u",
        "text": {"format": {"type": "json_object"}}, "reasoning": {"effort": "high"}}),
    );
    let r = s.response();
    assert_eq!(r["temperature"], 0.3);
    assert_eq!(r["top_p"], 0.8);
    assert_eq!(r["tool_choice"], "none");
    assert_eq!(r["store"], true);
    assert_eq!(r["metadata"], json!({"a": "1"}));
    assert_eq!(r["user"], "u");
    assert_eq!(r["text"], json!({"format": {"type": "json_object"}}));
    assert_eq!(r["reasoning"]["effort"], "high");
    assert_eq!(r["previous_response_id"], Value::Null);
    let d = stream_for(json!({"model": "m", "input": "hi"}));
    assert_eq!(d.response()["tool_choice"], "auto");
    assert_eq!(d.response()["tools"], json!([]));
    assert_eq!(d.response()["text"], json!({"format": {"type": "text"}}));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-3.0f64..3.0).prop_map(Value::from),
            "[a-z_]{0,6}".prop_map(Value::from),
            prop::sample::select(vec![
                "message",
                "input_text",
                "output_text",
                "input_image",
                "refusal",
                "function_call",
                "function_call_output",
                "reasoning",
                "user",
                "assistant",
                "system",
                "developer",
                "function",
                "json_object",
                "json_schema",
                "auto",
                "required",
                "none",
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "type",
                        "role",
                        "content",
                        "text",
                        "name",
                        "call_id",
                        "arguments",
                        "output",
                        "image_url",
                        "refusal",
                        "format",
                        "schema",
                        "parameters",
                        "strict",
                        "index",
                        "delta",
                        "choices",
                        "tool_calls",
                        "function",
                        "finish_reason",
                        "id",
                    ])
                    .prop_map(str::to_owned),
                    inner,
                    0..5,
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn body() -> impl Strategy<Value = Value> {
        let keys = prop::sample::select(vec![
            "input",
            "instructions",
            "tools",
            "tool_choice",
            "text",
            "max_output_tokens",
            "max_tokens",
            "messages",
            "stream",
            "store",
            "metadata",
            "reasoning",
            "top_p",
            "temperature",
            "response_format",
            "parallel_tool_calls",
            "user",
            "stop",
        ])
        .prop_map(str::to_owned);
        prop::collection::btree_map(keys, json_value(), 0..6).prop_map(|m| {
            let mut obj: Map<String, Value> = m.into_iter().collect();
            obj.insert("model".into(), Value::from("m"));
            Value::Object(obj)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a client sends never panics, and every accepted Responses request
        /// translates to a chat request that the chat parser accepts too (the node relies on it).
        #[test]
        fn every_accepted_request_translates_to_a_valid_chat_request(body in body()) {
            if let Ok(r) = parse(body) {
                let chat = Value::Object(chat_request(&r));
                let back = InferenceRequest::from_value(Endpoint::Chat, chat.clone());
                prop_assert!(back.is_ok(), "{chat}: {back:?}");
                prop_assert_eq!(back.map(|b| b.max_tokens).ok().flatten(), r.max_tokens);
            }
        }

        /// Whatever a backend streams never panics the event machine, sequence numbers stay
        /// dense, and the stream always ends with one terminal event.
        #[test]
        fn arbitrary_backend_chunks_keep_the_event_stream_well_formed(
            chunks in prop::collection::vec(json_value(), 0..12),
        ) {
            let mut s = stream_for(json!({"model": "m", "input": "hi"}));
            for c in &chunks {
                s.handle_chunk(c);
                s.handle_chunk(&json!({"choices": [c]}));
                s.handle_chunk(&json!({"choices": [{"delta": c}]}));
            }
            s.handle_done("stop", 1, 1);
            let events = drain(&mut s);
            for (i, e) in events.iter().enumerate() {
                prop_assert_eq!(e["sequence_number"].as_u64(), Some(i as u64));
            }
            let terminal = events.iter().filter(|e| e["type"] == "response.completed").count();
            prop_assert_eq!(terminal, 1);
            prop_assert_eq!(events.last().map(|e| e["type"].clone()), Some(json!("response.completed")));
            let added = events.iter().filter(|e| e["type"] == "response.output_item.added").count();
            let done = events.iter().filter(|e| e["type"] == "response.output_item.done").count();
            prop_assert_eq!(added, done);
        }
    }
}

#[test]
fn required_caps_name_the_responses_parameters() {
    use crate::ModelCaps;
    let caps = |v: Value| required_caps(&ok(v).raw);
    assert!(caps(json!({"model": "m", "input": "hi"})).is_empty());
    let tool = json!([{"type": "function", "name": "f"}]);
    assert_eq!(
        caps(json!({"model": "m", "input": "hi", "tools": tool})),
        [(ModelCaps::TOOLS, "tools".to_owned())]
    );
    assert!(
        caps(json!({"model": "m", "input": "hi", "tools": tool, "tool_choice": "none"})).is_empty()
    );
    assert_eq!(
        caps(
            json!({"model": "m", "input": "hi", "tools": tool, "tool_choice": {"type": "function", "name": "f"}})
        ),
        [
            (ModelCaps::TOOLS, "tools".to_owned()),
            (ModelCaps::TOOLS, "tool_choice".to_owned())
        ]
    );
    assert_eq!(
        caps(json!({"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}}})),
        [(ModelCaps::JSON_MODE, "text.format".to_owned())]
    );
    assert_eq!(
        caps(
            json!({"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "s", "schema": {}}}})
        ),
        [(ModelCaps::JSON_SCHEMA, "text.format".to_owned())]
    );
    assert_eq!(
        caps(json!({"model": "m", "input": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "input_text", "text": "b"}, {"type": "input_image", "image_url": "https://x/y.png"}]},
        ]})),
        [(ModelCaps::VISION, "input[1].content[1]".to_owned())]
    );
}

#[test]
fn logprobs_are_asked_for_and_relayed_into_the_text_events() {
    let r = ok(
        json!({"model": "m", "input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 2}),
    );
    let chat = chat_request(&r);
    assert_eq!(chat["logprobs"], true);
    assert_eq!(chat["top_logprobs"], 2);
    assert!(chat.get("include").is_none());
    assert!(chat_request(&ok(json!({"model": "m", "input": "hi"})))
        .get("logprobs")
        .is_none());
    for (body, param) in [
        (
            json!({"model": "m", "input": "x", "include": "all"}),
            "include",
        ),
        (
            json!({"model": "m", "input": "x", "include": [1]}),
            "include[0]",
        ),
        (
            json!({"model": "m", "input": "x", "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            json!({"model": "m", "input": "x", "top_logprobs": -1}),
            "top_logprobs",
        ),
    ] {
        assert_eq!(err(body.clone()).param.as_deref(), Some(param), "{body}");
    }
    let mut s = stream_for(json!({"model": "m", "input": "hi"}));
    let lp = |t: &str| json!({"token": t, "logprob": -0.5, "bytes": [104], "top_logprobs": [{"token": t, "logprob": -0.5, "bytes": [104]}]});
    s.handle_chunk(&json!({"choices": [{"index": 0, "delta": {"content": "h"}, "logprobs": {"content": [lp("h")]}}]}));
    s.handle_chunk(&json!({"choices": [{"index": 0, "delta": {"content": "i"}, "logprobs": {"content": [lp("i"), 7]}}]}));
    s.handle_done("stop", 1, 2);
    let events = drain(&mut s);
    let deltas: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .collect();
    assert_eq!(deltas[0]["logprobs"], json!([lp("h")]));
    assert_eq!(
        deltas[1]["logprobs"],
        json!([lp("i")]),
        "a malformed entry is dropped"
    );
    let done = events
        .iter()
        .find(|e| e["type"] == "response.output_text.done")
        .unwrap();
    assert_eq!(done["logprobs"], json!([lp("h"), lp("i")]));
    let last = events.last().unwrap();
    assert_eq!(
        last["response"]["output"][0]["content"][0]["logprobs"],
        json!([lp("h"), lp("i")])
    );
}

/// Found by the `openai_request` fuzz target: an input of reasoning items only was accepted,
/// then translated to a chat request with no messages, which the node's chat parser refused as
/// an internal fault (a 500 for a client's mistake). It is a 400 naming `input`; with
/// `instructions` there is a conversation (the system message), and it translates.
#[test]
fn reasoning_only_input_is_refused_not_translated_to_an_empty_chat() {
    for input in [
        json!([{"type": "reasoning", "summary": []}]),
        json!([{"type": "reasoning"}, {"type": "reasoning", "summary": []}]),
    ] {
        let e = err(json!({"model": "m", "input": input}));
        assert_eq!(e.param.as_deref(), Some("input"));
        assert_eq!(e.code, "invalid_value");
    }
    let r = ok(json!({"model": "m", "instructions": "be brief", "input": [{"type": "reasoning"}]}));
    let chat = InferenceRequest::from_value(Endpoint::Chat, Value::Object(chat_request(&r)));
    assert!(chat.is_ok(), "{chat:?}");
}

/// Found by the `openai_request` fuzz target: a Responses tool named `inpp`f` (not chat's
/// `^[a-zA-Z0-9_-]{1,64}$`) was accepted, then refused by the chat parser after translation, as
/// the node's fault. Tool names, tool parameter schemas and `text.format.schema` are held to
/// the chat rules they translate to, and refused with a 400 naming the Responses parameter.
#[test]
fn responses_tools_and_schemas_are_held_to_the_chat_rules_they_translate_to() {
    let mut deep = json!({"type": "object"});
    for _ in 0..40 {
        deep = json!({"type": "object", "properties": {"a": deep}});
    }
    for (body, param) in [
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "inpp`f"}]}),
            "tools[0].name",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "a".repeat(65)}]}),
            "tools[0].name",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": deep.clone()}]}),
            "tools[0].parameters",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": deep}}}),
            "text.format.schema",
        ),
    ] {
        let e = err(body);
        assert_eq!(e.param.as_deref(), Some(param), "{e:?}");
        assert_eq!(e.code, "invalid_value", "{e:?}");
    }
    // What passes translates to a chat request the chat parser accepts.
    let r = ok(json!({
        "model": "m", "input": "x",
        "tools": [{"type": "function", "name": "get_weather-2", "parameters": {"type": "object"}}],
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
    }));
    let chat = InferenceRequest::from_value(Endpoint::Chat, Value::Object(chat_request(&r)));
    assert!(chat.is_ok(), "{chat:?}");
}

/// Found by the `openai_request` fuzz target's 30-minute campaign: a Responses request with a
/// field the Responses parser does not interpret but chat does (`"n": ["Once upon"]`) was
/// accepted, passed through into its chat translation, and refused there, on the node, as the
/// node's fault. Whatever the chat rules refuse in the translation is now a 400 at parse time.
#[test]
fn a_passed_through_field_the_chat_rules_refuse_is_a_400_not_a_node_failure() {
    for (body, param) in [
        (json!({"model": "m", "input": "x", "n": ["Once upon"]}), "n"),
        (json!({"model": "m", "input": "x", "n": 0}), "n"),
    ] {
        let e = err(body.clone());
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
    }
    // A field chat accepts passes through, and the translation parses.
    let r = ok(json!({"model": "m", "input": "x", "n": 1}));
    let chat = InferenceRequest::from_value(Endpoint::Chat, Value::Object(chat_request(&r)));
    assert!(chat.is_ok(), "{chat:?}");
}
