//! The OpenAI-compatible request parser (`POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/embeddings`, `POST /v1/responses`): the gateway runs it on every inference body
//! before routing, and nodes again before serving. The first input byte picks the endpoint (its
//! value modulo 4: chat, completion, embeddings, responses); the rest is the body.
//!
//! Asserts, beyond "no panic" (serde_json's recursion limit keeps deep nesting off the stack):
//! - allocation stays linear in the body;
//! - a rejection renders as a well-formed OpenAI error body carrying the same message, `param`
//!   and `code`;
//! - an accepted request satisfies the documented invariants (non-empty model and messages, at
//!   most `MAX_STOP_SEQUENCES` non-empty stop strings, temperature in 0..=2, usage only when
//!   streaming, at least one token for chat and responses; embeddings: 1..=`MAX_EMBEDDING_INPUTS`
//!   inputs, none empty, no token limit);
//! - the body forwarded to an upstream server validates again and means the same request, with
//!   `stream` and `include_usage` forced on (embeddings: with the `stream` fields dropped),
//!   whatever model name (quotes, control characters) it is renamed to;
//! - a responses request translates to a chat request that the chat parser accepts with the
//!   same token limit (the node serves responses through a chat backend and relies on it);
//! - `push_json_str` escapes exactly as serde_json does.

#![no_main]

#[path = "common/alloc.rs"]
mod alloc;

use libfuzzer_sys::fuzz_target;
use nearpath_protocol::openai::{
    push_json_str, responses, ApiError, EmbedInput, Endpoint, InferenceRequest, Input,
    MAX_EMBEDDING_INPUTS, MAX_STOP_SEQUENCES,
};
use serde_json::Value;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// A model name a gateway could rename a request to, with everything JSON must escape.
const NASTY_MODEL: &str = "m\"\\\u{0}\u{1f}\u{7f}\u{2028}/é";

fn check_accepted(endpoint: Endpoint, req: &InferenceRequest) {
    assert_eq!(req.endpoint, endpoint);
    assert!(!req.model.is_empty());
    match endpoint {
        Endpoint::Chat => {
            assert!(!req.messages().is_empty());
            assert!(req.prompt().is_none());
            assert_eq!(req.input_texts().count(), req.messages().len());
            assert!(req.max_tokens.is_none_or(|n| n >= 1));
        }
        Endpoint::Completion => {
            assert!(req.messages().is_empty());
            assert!(req.prompt().is_some());
            assert_eq!(req.input_texts().count(), 1);
        }
        Endpoint::Embeddings => {
            let Input::Embed(inputs) = &req.input else {
                panic!(
                    "an embeddings request without embedding inputs: {:?}",
                    req.input
                );
            };
            assert!((1..=MAX_EMBEDDING_INPUTS).contains(&inputs.len()));
            assert!(inputs.iter().all(|i| match i {
                EmbedInput::Text(t) => !t.is_empty(),
                EmbedInput::Tokens(t) => !t.is_empty(),
            }));
            assert!(req.messages().is_empty());
            assert!(req.prompt().is_none());
            assert!(req.max_tokens.is_none());
            let texts = inputs
                .iter()
                .filter(|i| matches!(i, EmbedInput::Text(_)))
                .count();
            assert_eq!(req.input_texts().count(), texts);
            assert!(req.input_texts().all(|t| !t.is_empty()));
        }
        Endpoint::Responses => {
            assert!(matches!(req.input, Input::Messages(_)));
            assert!(req.prompt().is_none());
            assert!(req.max_tokens.is_none_or(|n| n >= 1));
            let chat = serde_json::Value::Object(responses::chat_request(req));
            let translated = InferenceRequest::from_value(Endpoint::Chat, chat.clone())
                .unwrap_or_else(|e| {
                    panic!("responses request translates to a bad chat request ({e}): {chat}")
                });
            assert_eq!(translated.max_tokens, req.max_tokens);
        }
    }
    assert!(req.stop.len() <= MAX_STOP_SEQUENCES);
    assert!(req.stop.iter().all(|s| !s.is_empty()));
    assert!(req.temperature.is_none_or(|t| (0.0..=2.0).contains(&t)));
    assert!(req.stream || !req.include_usage);

    if endpoint == Endpoint::Embeddings {
        for model in [req.model.as_str(), NASTY_MODEL] {
            let upstream = req.upstream_embeddings_body(model);
            let again = InferenceRequest::parse(endpoint, &upstream).unwrap_or_else(|e| {
                panic!(
                    "forwarded embeddings body does not validate ({e}): {}",
                    String::from_utf8_lossy(&upstream)
                )
            });
            assert_eq!(again.model, model);
            assert!(!again.stream && !again.include_usage);
            assert!(!again.raw.contains_key("stream") && !again.raw.contains_key("stream_options"));
            assert_eq!(again.input, req.input);
            assert_eq!(again.user, req.user);
            for (key, value) in &req.raw {
                if !matches!(key.as_str(), "model" | "stream" | "stream_options") {
                    assert_eq!(again.raw.get(key), Some(value), "field {key:?} changed");
                }
            }
        }
        return;
    }
    for model in [req.model.as_str(), NASTY_MODEL] {
        let upstream = req.upstream_body(model);
        let again = InferenceRequest::parse(endpoint, &upstream).unwrap_or_else(|e| {
            panic!(
                "forwarded body does not validate ({e}): {}",
                String::from_utf8_lossy(&upstream)
            )
        });
        assert_eq!(again.model, model);
        assert!(again.stream && again.include_usage);
        assert_eq!(again.input, req.input);
        assert_eq!(again.max_tokens, req.max_tokens);
        assert_eq!(again.stop, req.stop);
        assert_eq!(again.temperature, req.temperature);
        assert_eq!(again.user, req.user);
        assert_eq!(again.seed, req.seed);
        for (key, value) in &req.raw {
            if !matches!(key.as_str(), "model" | "stream" | "stream_options") {
                assert_eq!(again.raw.get(key), Some(value), "field {key:?} changed");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let endpoint = match selector % 4 {
        0 => Endpoint::Chat,
        1 => Endpoint::Completion,
        2 => Endpoint::Embeddings,
        _ => Endpoint::Responses,
    };
    let (parsed, peak) = alloc::peak_during(|| InferenceRequest::parse(endpoint, body));
    // serde_json's tree costs up to a few hundred bytes per input byte (a one-entry object is a
    // B-tree node); what this bound catches is an allocation sized by a number in the body.
    assert!(
        peak <= 1024 * body.len() + 1024 * 1024,
        "parsing a {}-byte body allocated {peak} bytes",
        body.len()
    );
    match parsed {
        Ok(req) => check_accepted(endpoint, &req),
        Err(err) => {
            assert!(!err.message.is_empty());
            let rendered = ApiError::invalid_request(err.clone()).body();
            let json: Value = serde_json::from_str(&rendered).expect("error body is JSON");
            let e = &json["error"];
            assert_eq!(e["message"].as_str(), Some(err.message.as_str()));
            assert_eq!(e["param"].as_str(), err.param.as_deref());
            assert_eq!(e["code"].as_str(), Some(err.code));
            assert_eq!(e["type"].as_str(), Some("invalid_request_error"));
        }
    }

    if let Ok(text) = std::str::from_utf8(body) {
        let mut ours = String::new();
        push_json_str(&mut ours, text);
        assert_eq!(ours, serde_json::to_string(text).unwrap());
    }
});
