//! Pass-through of what a backend produced, without I/O: the rules both the gateway and the edge
//! node's own OpenAI server apply to the JSON pieces (`Chunk`) a backend streams.
//!
//! - [`rewrite_chunk`] takes one piece as the backend produced it, checks its shape (a hostile
//!   node's garbage is a typed [`RelayError`], never a panic), sets what the relay owns (`id`,
//!   `object`, `created`, `model`; for Responses events the response's `model` and, in terminal
//!   events, the measured `usage`), removes the backend's `usage`, keeps every other field in its
//!   order, and reports what the piece carried ([`ChunkInfo`]: generated content for metering,
//!   finished choices).
//! - [`Assembler`] turns a stream of token texts and pieces into the non-streaming body
//!   (`chat.completion`, `text_completion`, or the Responses API's final `response`), merging
//!   deltas the way the official `openai` Python client accumulates them.
//! - [`EmbeddingsAssembler`] collects `data[]` elements into the embeddings list.
//!
//! Everything here is bounded by its input: the assembled body never holds more than the bytes
//! the backend sent, plus the relay's own fields.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::render::Usage;
use super::request::Endpoint;

/// Why a piece from a backend cannot be relayed. The gateway answers it as a 502 naming the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("a chunk is not JSON: {0}")]
    NotJson(String),
    #[error("a chunk is not a JSON object")]
    NotObject,
    #[error("a chunk has no `choices` array")]
    NoChoices,
    #[error("choices[{0}] is not an object")]
    ChoiceNotObject(usize),
    #[error("choices[{at}].index is {index}, but the request asked for {n} choice(s)")]
    ChoiceIndex { at: usize, index: String, n: u32 },
    #[error("a Responses event has no printable string `type` of at most 128 bytes")]
    NoEventType,
    #[error("an embedding is malformed: {0}")]
    Embedding(String),
    #[error("the stream ended without a `response.completed` event")]
    NoFinalResponse,
}

/// Where a rewritten piece goes: the relay's own identity of the response, how many choices the
/// request asked for (`n`; the number of inputs for embeddings), and the usage the relay measured
/// so far (written into the terminal Responses events).
#[derive(Debug, Clone, Copy)]
pub struct RewriteContext<'a> {
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub n: u32,
    pub usage: Usage,
}

/// What one piece carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    /// How many of its choices carried generated content (text, tool-call names or arguments,
    /// reasoning, a refusal); 1 for a Responses `*.delta` event.
    pub generated: u32,
    /// The choices that finished in this piece, with their `finish_reason`.
    pub finished: Vec<(u32, String)>,
    /// A chat delta carried `role` (then the relay sends no role chunk of its own).
    pub has_role: bool,
    /// For embeddings: the element's `index`.
    pub embedding_index: Option<u32>,
    /// For Responses: the event's `type` (printable, at most [`MAX_EVENT_TYPE_BYTES`]).
    pub event_type: Option<String>,
}

/// The longest Responses event `type` relayed (the longest OpenAI defines is under 64 bytes).
pub const MAX_EVENT_TYPE_BYTES: usize = 128;

/// Responses events whose `response` object is the final one (its `usage` is the relay's).
const TERMINAL_EVENTS: [&str; 3] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
];

/// Fields of a chat delta whose non-empty string values are generated content.
const GENERATED_DELTA_FIELDS: [&str; 4] = ["content", "reasoning_content", "reasoning", "refusal"];

/// Parses, checks and rewrites one piece (see the module documentation). Returns the JSON to
/// relay and what it carried.
pub fn rewrite_chunk(
    json: &str,
    ctx: &RewriteContext<'_>,
) -> Result<(String, ChunkInfo), RelayError> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| RelayError::NotJson(e.to_string()))?;
    let (value, info) = rewrite_value(value, ctx)?;
    Ok((value.to_string(), info))
}

/// [`rewrite_chunk`] on an already parsed piece.
pub fn rewrite_value(
    value: Value,
    ctx: &RewriteContext<'_>,
) -> Result<(Value, ChunkInfo), RelayError> {
    let Value::Object(mut obj) = value else {
        return Err(RelayError::NotObject);
    };
    let mut info = ChunkInfo::default();
    match ctx.endpoint {
        Endpoint::Chat | Endpoint::Completion => {
            let Some(Value::Array(choices)) = obj.get("choices") else {
                return Err(RelayError::NoChoices);
            };
            for (at, choice) in choices.iter().enumerate() {
                let Value::Object(choice) = choice else {
                    return Err(RelayError::ChoiceNotObject(at));
                };
                let index = choice_index(choice, at, ctx.n)?;
                if choice_generated(ctx.endpoint, choice) {
                    info.generated += 1;
                }
                if let Some(Value::String(reason)) = choice.get("finish_reason") {
                    info.finished.push((index, reason.clone()));
                }
                if choice
                    .get("delta")
                    .and_then(|d| d.get("role"))
                    .is_some_and(|r| !r.is_null())
                {
                    info.has_role = true;
                }
            }
            obj.remove("usage");
            let mut out = Map::with_capacity(obj.len() + 4);
            out.insert("id".into(), Value::String(ctx.id.to_owned()));
            out.insert(
                "object".into(),
                Value::String(ctx.endpoint.chunk_object().to_owned()),
            );
            out.insert("created".into(), Value::from(ctx.created));
            out.insert("model".into(), Value::String(ctx.model.to_owned()));
            for (k, v) in obj {
                if !matches!(k.as_str(), "id" | "object" | "created" | "model") {
                    out.insert(k, v);
                }
            }
            Ok((Value::Object(out), info))
        }
        Endpoint::Embeddings => {
            info.embedding_index = Some(check_embedding(&obj, ctx.n)?);
            Ok((Value::Object(obj), info))
        }
        Endpoint::Responses => {
            // The type becomes an SSE `event:` line, so it must not carry a line break.
            let ty = match obj.get("type") {
                Some(Value::String(ty))
                    if !ty.is_empty()
                        && ty.len() <= MAX_EVENT_TYPE_BYTES
                        && ty.bytes().all(|b| b.is_ascii_graphic()) =>
                {
                    ty.clone()
                }
                _ => return Err(RelayError::NoEventType),
            };
            if ty.ends_with(".delta") {
                info.generated = 1;
            }
            if let Some(Value::Object(response)) = obj.get_mut("response") {
                response.insert("model".into(), Value::String(ctx.model.to_owned()));
                if TERMINAL_EVENTS.contains(&ty.as_str()) {
                    response.insert("usage".into(), responses_usage(ctx.usage));
                    let reason = ty.trim_start_matches("response.").to_owned();
                    info.finished.push((0, reason));
                } else {
                    response.remove("usage");
                }
            }
            info.event_type = Some(ty);
            Ok((Value::Object(obj), info))
        }
    }
}

/// The Responses API's usage object for what the relay measured.
pub fn responses_usage(usage: Usage) -> Value {
    serde_json::json!({
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens(),
    })
}

/// A choice's `index` (its position when absent), which must be below `n`.
fn choice_index(choice: &Map<String, Value>, at: usize, n: u32) -> Result<u32, RelayError> {
    let out_of_range = |index: String| RelayError::ChoiceIndex { at, index, n };
    match choice.get("index") {
        None => u32::try_from(at)
            .ok()
            .filter(|&i| i < n)
            .ok_or_else(|| out_of_range(at.to_string())),
        Some(v) => v
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .filter(|&i| i < n)
            .ok_or_else(|| {
                let mut s = v.to_string();
                s.truncate(32);
                out_of_range(s)
            }),
    }
}

fn non_empty_str(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::String(s)) if !s.is_empty())
}

/// How many choices of a chat or completions chunk carry generated content (see
/// [`ChunkInfo::generated`]); for a backend counting what it produced.
pub fn generated_choices(endpoint: Endpoint, chunk: &Map<String, Value>) -> u32 {
    match chunk.get("choices") {
        Some(Value::Array(choices)) => choices
            .iter()
            .filter_map(Value::as_object)
            .filter(|c| choice_generated(endpoint, c))
            .count() as u32,
        _ => 0,
    }
}

/// Whether a choice carries generated content: text, reasoning, a refusal, or a piece of a tool
/// call (its name or arguments).
fn choice_generated(endpoint: Endpoint, choice: &Map<String, Value>) -> bool {
    if endpoint == Endpoint::Completion {
        return non_empty_str(choice.get("text"));
    }
    let Some(Value::Object(delta)) = choice.get("delta") else {
        return false;
    };
    if GENERATED_DELTA_FIELDS
        .iter()
        .any(|f| non_empty_str(delta.get(*f)))
    {
        return true;
    }
    let tool_call_piece = |call: &Value| {
        let f = call.get("function");
        non_empty_str(f.and_then(|f| f.get("arguments")))
            || non_empty_str(f.and_then(|f| f.get("name")))
    };
    matches!(delta.get("tool_calls"), Some(Value::Array(calls)) if calls.iter().any(tool_call_piece))
        || delta
            .get("function_call")
            .is_some_and(|f| non_empty_str(f.get("arguments")) || non_empty_str(f.get("name")))
}

/// Checks one embeddings `data[]` element: an object whose `embedding` is an array of numbers or a
/// base64 string, and whose `index` is an integer below `inputs`. Returns the index.
pub fn check_embedding(obj: &Map<String, Value>, inputs: u32) -> Result<u32, RelayError> {
    match obj.get("embedding") {
        Some(Value::Array(xs)) if xs.iter().all(Value::is_number) => {}
        Some(Value::String(_)) => {}
        _ => {
            return Err(RelayError::Embedding(
                "`embedding` must be an array of numbers or a base64 string".into(),
            ))
        }
    }
    obj.get("index")
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
        .filter(|&i| i < inputs)
        .ok_or_else(|| {
            RelayError::Embedding(format!(
                "`index` must be an integer below the {inputs} input(s)"
            ))
        })
}

/// Keys that identify rather than accumulate: a backend that repeats them in every delta
/// (llama-cpp-python repeats a tool call's `id`, `type` and `function.name`) must not have them
/// concatenated with themselves.
const IDENTIFIERS: [&str; 3] = ["id", "name", "role"];

/// Merges `delta` into `acc` as openai-python's `accumulate_delta` does: strings concatenate,
/// `index` and `type` replace, objects merge recursively, lists of objects merge by their `index`
/// field, other lists extend; identifiers equal to what is there already are kept, not repeated.
/// Numbers replace (openai-python adds them, but no streamed field is a running sum).
pub fn accumulate_delta(acc: &mut Map<String, Value>, delta: Map<String, Value>) {
    for (key, dv) in delta {
        let Some(av) = acc.get_mut(&key) else {
            acc.insert(key, dv);
            continue;
        };
        if av.is_null() || key == "index" || key == "type" {
            *av = dv;
            continue;
        }
        match (av, dv) {
            (Value::String(a), Value::String(d)) => {
                if !(IDENTIFIERS.contains(&key.as_str()) && *a == d) {
                    a.push_str(&d);
                }
            }
            (Value::Object(a), Value::Object(d)) => accumulate_delta(a, d),
            (Value::Array(a), Value::Array(d)) => merge_lists(a, d),
            (_, Value::Null) => {}
            (av, dv) => *av = dv,
        }
    }
}

/// Lists of objects carrying `index` merge entry by entry (found by that field, so a huge index
/// appends rather than allocates); anything else extends.
fn merge_lists(acc: &mut Vec<Value>, delta: Vec<Value>) {
    for entry in delta {
        let index = entry.get("index").and_then(Value::as_u64);
        let slot = index.and_then(|i| {
            acc.iter_mut()
                .find(|a| a.get("index").and_then(Value::as_u64) == Some(i))
        });
        match (slot, entry) {
            (Some(Value::Object(a)), Value::Object(d)) => accumulate_delta(a, d),
            (_, entry) => acc.push(entry),
        }
    }
}

/// Concatenates logprobs: lists (`content`, `refusal`, the legacy `tokens`, ...) extend, other
/// values replace.
fn merge_logprobs(acc: &mut Value, delta: Value) {
    match (acc, delta) {
        (_, Value::Null) => {}
        (Value::Object(a), Value::Object(d)) => {
            for (k, dv) in d {
                match a.get_mut(&k) {
                    Some(Value::Array(av)) => {
                        if let Value::Array(dv) = dv {
                            av.extend(dv);
                        } else if !dv.is_null() {
                            a.insert(k, dv);
                        }
                    }
                    Some(av @ Value::Object(_)) => merge_logprobs(av, dv),
                    Some(av) => {
                        if !dv.is_null() {
                            *av = dv;
                        }
                    }
                    None => {
                        a.insert(k, dv);
                    }
                }
            }
        }
        (acc, delta) => *acc = delta,
    }
}

#[derive(Debug, Default)]
struct ChoiceAcc {
    /// Chat: the merged deltas. Completions: the merged choice (its `text`).
    message: Map<String, Value>,
    logprobs: Value,
    finish_reason: Option<String>,
    /// Other choice-level fields (vendor extensions such as vLLM's `stop_reason`).
    extra: Map<String, Value>,
}

/// Builds the non-streaming body from the pieces of a stream (see the module documentation).
#[derive(Debug)]
pub struct Assembler {
    endpoint: Endpoint,
    choices: BTreeMap<u32, ChoiceAcc>,
    /// Top-level fields of the chunks other than the relay's own (`system_fingerprint`,
    /// `service_tier`, vendor fields): the last value wins.
    top: Map<String, Value>,
    /// Responses: the `response` of the last terminal event.
    response: Option<Value>,
    /// Text of choice 0 that came as `Token`s before any `Chunk`. Most answers are nothing else,
    /// and for them [`Assembler::finish`] renders the body straight from this string: building
    /// it as a `serde_json::Value` (an ordered map hashed per key, per token) cost about 26,000
    /// instructions per request, a tenth of the gateway's whole cost of one.
    plain: String,
}

impl Assembler {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            choices: BTreeMap::new(),
            top: Map::new(),
            response: None,
            plain: String::new(),
        }
    }

    /// A plain text piece of choice 0 (a `Token`).
    pub fn push_text(&mut self, text: &str) {
        if self.choices.is_empty() {
            self.plain.push_str(text);
            return;
        }
        self.push_text_slow(text);
    }

    /// Moves the plain text gathered so far into choice 0, where the pieces that follow it merge.
    fn flush_plain(&mut self) {
        if !self.plain.is_empty() {
            let text = std::mem::take(&mut self.plain);
            self.push_text_slow(&text);
        }
    }

    fn push_text_slow(&mut self, text: &str) {
        let key = match self.endpoint {
            Endpoint::Completion => "text",
            _ => "content",
        };
        let choice = self.choices.entry(0).or_default();
        match choice.message.get_mut(key) {
            Some(Value::String(s)) => s.push_str(text),
            _ => {
                choice
                    .message
                    .insert(key.into(), Value::String(text.to_owned()));
            }
        }
    }

    /// One piece (already checked by [`rewrite_chunk`] on the gateway; checked again here).
    pub fn push_chunk(&mut self, json: &str) -> Result<(), RelayError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| RelayError::NotJson(e.to_string()))?;
        self.push_value(value)
    }

    /// [`Assembler::push_chunk`] on a parsed piece.
    pub fn push_value(&mut self, value: Value) -> Result<(), RelayError> {
        let Value::Object(mut obj) = value else {
            return Err(RelayError::NotObject);
        };
        self.flush_plain();
        if self.endpoint == Endpoint::Responses {
            let Some(Value::String(ty)) = obj.get("type") else {
                return Err(RelayError::NoEventType);
            };
            if TERMINAL_EVENTS.contains(&ty.as_str()) {
                self.response = obj.remove("response");
            }
            return Ok(());
        }
        let Some(Value::Array(choices)) = obj.remove("choices") else {
            return Err(RelayError::NoChoices);
        };
        for (at, choice) in choices.into_iter().enumerate() {
            let Value::Object(mut choice) = choice else {
                return Err(RelayError::ChoiceNotObject(at));
            };
            let index = choice_index(&choice, at, u32::MAX)?;
            let acc = self.choices.entry(index).or_default();
            choice.remove("index");
            if let Some(Value::String(r)) = choice.remove("finish_reason") {
                acc.finish_reason = Some(r);
            }
            if let Some(lp) = choice.remove("logprobs") {
                if acc.logprobs.is_null() {
                    acc.logprobs = lp;
                } else {
                    merge_logprobs(&mut acc.logprobs, lp);
                }
            }
            match self.endpoint {
                Endpoint::Chat => {
                    if let Some(Value::Object(delta)) = choice.remove("delta") {
                        accumulate_delta(&mut acc.message, delta);
                    }
                    // A non-streaming answer converted to pieces carries `message`.
                    if let Some(Value::Object(message)) = choice.remove("message") {
                        accumulate_delta(&mut acc.message, message);
                    }
                    for (k, v) in choice {
                        if !v.is_null() {
                            acc.extra.insert(k, v);
                        }
                    }
                }
                _ => {
                    let text = choice.remove("text");
                    if let Some(Value::String(t)) = text {
                        let mut d = Map::new();
                        d.insert("text".into(), Value::String(t));
                        accumulate_delta(&mut acc.message, d);
                    }
                    for (k, v) in choice {
                        if !v.is_null() {
                            acc.extra.insert(k, v);
                        }
                    }
                }
            }
        }
        for (k, v) in obj {
            if !matches!(k.as_str(), "id" | "object" | "created" | "model" | "usage")
                && !v.is_null()
            {
                self.top.insert(k, v);
            }
        }
        Ok(())
    }

    /// The body: `chat.completion` or `text_completion` with `id`, `created`, `model` and `usage`
    /// the relay's (choices that did not say why they finished take `finish_reason`), or the final
    /// `response` of a Responses stream.
    pub fn finish(
        self,
        id: &str,
        created: u64,
        model: &str,
        finish_reason: &str,
        usage: Usage,
    ) -> Result<String, RelayError> {
        if self.endpoint == Endpoint::Responses {
            return self
                .response
                .map(|r| r.to_string())
                .ok_or(RelayError::NoFinalResponse);
        }
        if self.choices.is_empty() && self.top.is_empty() {
            // Only `Token`s came (or nothing): the same body, without building it as a value.
            return Ok(super::render::completion_response(
                self.endpoint,
                id,
                created,
                model,
                &self.plain,
                finish_reason,
                usage,
            ));
        }
        let mut out = Map::new();
        out.insert("id".into(), Value::String(id.to_owned()));
        out.insert(
            "object".into(),
            Value::String(self.endpoint.response_object().to_owned()),
        );
        out.insert("created".into(), Value::from(created));
        out.insert("model".into(), Value::String(model.to_owned()));
        let mut choices = self.choices;
        if choices.is_empty() {
            choices.insert(0, ChoiceAcc::default());
        }
        let chat = self.endpoint == Endpoint::Chat;
        let rendered: Vec<Value> = choices
            .into_iter()
            .map(|(index, acc)| {
                let mut c = Map::new();
                let finish = Value::String(
                    acc.finish_reason
                        .unwrap_or_else(|| finish_reason.to_owned()),
                );
                if chat {
                    c.insert("index".into(), Value::from(index));
                    c.insert("message".into(), Value::Object(chat_message(acc.message)));
                } else {
                    let mut m = acc.message;
                    c.insert(
                        "text".into(),
                        m.remove("text")
                            .unwrap_or_else(|| Value::String(String::new())),
                    );
                    c.insert("index".into(), Value::from(index));
                }
                c.insert("logprobs".into(), acc.logprobs);
                c.insert("finish_reason".into(), finish);
                for (k, v) in acc.extra {
                    c.entry(k).or_insert(v);
                }
                Value::Object(c)
            })
            .collect();
        out.insert("choices".into(), Value::Array(rendered));
        for (k, v) in self.top {
            out.entry(k).or_insert(v);
        }
        out.insert(
            "usage".into(),
            serde_json::json!({
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens(),
            }),
        );
        Ok(Value::Object(out).to_string())
    }
}

/// A chat message from merged deltas: `role` (assistant unless said), `content` (null when only
/// tool calls came, `""` when nothing did), then every other field in arrival order. Nothing the
/// backend did not send is invented (no `refusal: null`: llama.cpp's server sends none), and the
/// `index` of each tool call, which exists only to merge deltas, is dropped as in a
/// non-streaming answer.
fn chat_message(mut merged: Map<String, Value>) -> Map<String, Value> {
    let mut m = Map::new();
    let role = merged
        .remove("role")
        .filter(|r| r.is_string())
        .unwrap_or_else(|| Value::String("assistant".into()));
    m.insert("role".into(), role);
    let has_calls = merged
        .get("tool_calls")
        .is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()))
        || merged.get("function_call").is_some_and(|f| !f.is_null());
    let content = match merged.remove("content") {
        Some(Value::Null) | None if has_calls => Value::Null,
        Some(Value::Null) | None => Value::String(String::new()),
        Some(c) => c,
    };
    m.insert("content".into(), content);
    if let Some(Value::Array(calls)) = merged.get_mut("tool_calls") {
        for call in calls.iter_mut().filter_map(Value::as_object_mut) {
            call.remove("index");
        }
    }
    for (k, v) in merged {
        m.insert(k, v);
    }
    m
}

/// Collects the `data[]` elements of an embeddings answer (see [`check_embedding`]).
#[derive(Debug)]
pub struct EmbeddingsAssembler {
    data: Vec<Option<Value>>,
}

impl EmbeddingsAssembler {
    /// For a request of `inputs` inputs (at most `MAX_EMBEDDING_INPUTS`).
    pub fn new(inputs: u32) -> Self {
        Self {
            data: vec![None; inputs as usize],
        }
    }

    /// One element; a duplicate or out-of-range index is an error.
    pub fn push_chunk(&mut self, json: &str) -> Result<(), RelayError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| RelayError::NotJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(RelayError::NotObject);
        };
        let inputs = u32::try_from(self.data.len()).unwrap_or(u32::MAX);
        let index = check_embedding(&obj, inputs)? as usize;
        let slot = &mut self.data[index];
        if slot.is_some() {
            return Err(RelayError::Embedding(format!("index {index} came twice")));
        }
        *slot = Some(Value::Object(obj));
        Ok(())
    }

    /// The body: `{"object":"list","data":[...],"model","usage":{"prompt_tokens","total_tokens"}}`.
    /// Every input must have its embedding.
    pub fn finish(self, model: &str, prompt_tokens: u32) -> Result<String, RelayError> {
        let mut data = Vec::with_capacity(self.data.len());
        for (i, d) in self.data.into_iter().enumerate() {
            let Some(mut d) = d else {
                return Err(RelayError::Embedding(format!("no embedding for input {i}")));
            };
            if let Value::Object(o) = &mut d {
                o.entry("object")
                    .or_insert_with(|| Value::String("embedding".into()));
            }
            data.push(d);
        }
        Ok(serde_json::json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        })
        .to_string())
    }
}

/// Frames one Responses API event for SSE: `event: <type>\ndata: <json>\n\n` (the Responses API
/// ends a stream with its terminal event, not `[DONE]`).
/// `event_type` is [`ChunkInfo::event_type`] (checked to be printable).
pub fn responses_sse_event(event_type: &str, json: &str) -> bytes::Bytes {
    let mut out = String::with_capacity(json.len() + event_type.len() + 16);
    out.push_str("event: ");
    out.push_str(event_type);
    out.push_str("\ndata: ");
    out.push_str(json);
    out.push_str("\n\n");
    bytes::Bytes::from(out)
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
