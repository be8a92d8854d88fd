//! The simulator's OpenAI features beyond plain text: tool calls, JSON mode and structured
//! outputs, logprobs, several choices (`n > 1`) and embeddings. Like the plain text, everything
//! is deterministic per request and seed; it is placeholder output in the right shapes, so that
//! clients (the `openai` library, LangChain's `bind_tools` and `with_structured_output`) can be
//! tested without a model.
//!
//! What plain [`BackendEvent::Token`]s cannot carry goes out as [`BackendEvent::Chunk`]s: one
//! streamed chunk object per choice and step (chat and legacy completions), or one `data[]`
//! element per input (embeddings). A plain request never comes here: it keeps the `Token` fast
//! path (see [`is_plain`]).

use std::collections::VecDeque;

use nearpath_protocol::openai::{
    EmbedInput, Endpoint, InferenceRequest, Input, ResponseFormat, Role, Tool, ToolChoice,
};
use nearpath_protocol::ModelCaps;
use serde_json::{json, Map, Value};

use super::sim::{Fnv64, SimConfig, SimScript, SplitMix64, VOCABULARY};
use super::{approx_prompt_tokens, approx_token_count, BackendError};

/// The simulator's native embedding size; `dimensions` may ask for fewer.
pub const SIM_EMBEDDING_DIMENSIONS: usize = 64;

/// How deeply the schema-instance generator follows a schema (and `$ref`s), so that a cyclic or
/// hostile schema cannot make it loop.
const MAX_INSTANCE_DEPTH: usize = 32;

/// The most items generated for one array (or properties for one object), to keep instances
/// small whatever the schema's `minItems`.
const MAX_GENERATED_ITEMS: u64 = 3;

/// The most values one generated instance may hold: a hostile schema (a `$ref` used twice at
/// every level, arrays of arrays) would otherwise grow exponentially with its depth.
const MAX_GENERATED_VALUES: u32 = 1024;

/// Bytes of JSON text per streamed piece (content of JSON mode, tool-call arguments).
const JSON_PIECE_BYTES: usize = 8;

/// What the simulator declares: everything it fakes (not vision: it cannot look at images).
pub fn sim_caps() -> ModelCaps {
    ModelCaps::TOOLS
        .with(ModelCaps::JSON_MODE)
        .with(ModelCaps::JSON_SCHEMA)
        .with(ModelCaps::LOGPROBS)
        .with(ModelCaps::EMBEDDINGS)
        .with(ModelCaps::MULTIPLE_CHOICES)
}

/// Whether a request is plain text for one choice (the `Token` fast path).
pub(crate) fn is_plain(request: &InferenceRequest) -> bool {
    match request.endpoint {
        Endpoint::Chat | Endpoint::Completion => {
            request.n() == 1
                && request.logprobs().is_none()
                && matches!(request.response_format(), ResponseFormat::Text)
                && tool_to_call(request).is_none()
        }
        Endpoint::Embeddings | Endpoint::Responses => false,
    }
}

/// The tool the simulator calls, if any: the named one, the first for `required`, and for
/// `auto` the first tool whose name the last user message mentions.
pub(crate) fn tool_to_call<'a>(request: &'a InferenceRequest) -> Option<Tool<'a>> {
    let tools = request.tools();
    match request.tool_choice() {
        ToolChoice::None => None,
        ToolChoice::Required => tools.first().copied(),
        ToolChoice::Named(name) => tools.iter().find(|t| t.name == name).copied(),
        ToolChoice::Auto => {
            let last_user = request
                .messages()
                .iter()
                .rev()
                .find(|m| m.role == Role::User)?
                .content
                .to_lowercase();
            tools
                .iter()
                .find(|t| last_user.contains(&t.name.to_lowercase()))
                .copied()
        }
    }
}

/// What one choice produces.
#[derive(Debug)]
enum Body {
    /// Placeholder text (with stop sequences), like the plain path.
    Text(SimScript),
    /// JSON text (JSON mode, structured output) or tool-call arguments, in pieces.
    Pieces(VecDeque<String>),
}

#[derive(Debug)]
struct Choice {
    index: u32,
    body: Body,
    /// `(id, name)` when the choice calls a tool: its pieces are the arguments.
    tool: Option<(String, String)>,
    started: bool,
    finished: bool,
    /// Pieces emitted (the choice's completion tokens).
    steps: u32,
    /// Bytes of text emitted so far (`text_offset` of legacy logprobs).
    text_offset: usize,
    /// Set when a piece budget (`max_tokens`) cut the pieces short.
    truncated: bool,
}

/// A rich generation (several choices, logprobs, JSON, tool calls), step by step, without
/// timing. Each step yields the chunks of every unfinished choice. Pure and deterministic.
#[derive(Debug)]
pub(crate) struct RichScript {
    endpoint: Endpoint,
    model: String,
    logprobs: Option<u32>,
    choices: Vec<Choice>,
    prompt_tokens: u32,
    finish0: &'static str,
    /// Whether the last step generated something (a token's worth of time), rather than only
    /// noticing that choices had finished.
    paced: bool,
}

impl RichScript {
    pub(crate) fn new(config: &SimConfig, request: &InferenceRequest) -> Self {
        let seed = SimScript::seed_of(config, request);
        let tool = tool_to_call(request);
        let format = request.response_format();
        let max_pieces = request.max_tokens.map(|m| m as usize);
        let choices = (0..request.n())
            .map(|index| {
                let mut rng = SplitMix64(seed ^ u64::from(index).wrapping_mul(0x9e37_79b9));
                let (body, tool, truncated) = if let Some(t) = tool {
                    let args = match t.parameters {
                        Some(schema) => instance(schema, schema, &mut rng, 0),
                        None => Value::Object(Map::new()),
                    };
                    let id = format!("call_{:016x}", rng.next_u64());
                    let (pieces, cut) = split_pieces(&args.to_string(), max_pieces);
                    (Body::Pieces(pieces), Some((id, t.name.to_owned())), cut)
                } else {
                    match format {
                        ResponseFormat::JsonObject => {
                            let v = json!({
                                "answer": word(&mut rng),
                                "confidence": f64::from((rng.next_u64() % 100) as u32) / 100.0,
                            });
                            let (p, cut) = split_pieces(&v.to_string(), max_pieces);
                            (Body::Pieces(p), None, cut)
                        }
                        ResponseFormat::JsonSchema { schema } => {
                            let v = instance(schema, schema, &mut rng, 0);
                            let (p, cut) = split_pieces(&v.to_string(), max_pieces);
                            (Body::Pieces(p), None, cut)
                        }
                        ResponseFormat::Text => (
                            Body::Text(SimScript::for_choice(config, request, index)),
                            None,
                            false,
                        ),
                    }
                };
                Choice {
                    index,
                    body,
                    tool,
                    started: false,
                    finished: false,
                    steps: 0,
                    text_offset: 0,
                    truncated,
                }
            })
            .collect();
        Self {
            endpoint: request.endpoint,
            model: request.model.clone(),
            logprobs: request.logprobs(),
            choices,
            prompt_tokens: approx_prompt_tokens(request),
            finish0: "stop",
            paced: false,
        }
    }

    /// Whether the step just taken costs a token's time (see [`RichScript::next_step`]): a
    /// step that only finishes choices is sent with the previous one, as OpenAI sends a
    /// choice's `finish_reason` right after its last token.
    pub(crate) fn step_is_paced(&self) -> bool {
        self.paced
    }

    /// The chunks of the next step, or `None` when every choice has finished. Choice 0's finish
    /// reason is left for `Done`; the others' are sent as chunks.
    pub(crate) fn next_step(&mut self) -> Option<Vec<String>> {
        if self.choices.iter().all(|c| c.finished) {
            return None;
        }
        let mut out = Vec::new();
        let steps_before = self.completion_tokens();
        for i in 0..self.choices.len() {
            if self.choices[i].finished {
                continue;
            }
            if let Some(chunk) = self.advance(i) {
                out.push(chunk);
            }
        }
        self.paced = self.completion_tokens() != steps_before;
        Some(out)
    }

    fn advance(&mut self, i: usize) -> Option<String> {
        let (endpoint, logprobs) = (self.endpoint, self.logprobs);
        let c = &mut self.choices[i];
        if let (false, Some((id, name))) = (c.started, &c.tool) {
            c.started = true;
            c.steps += 1;
            let delta = json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{"index": 0, "id": id, "type": "function",
                                "function": {"name": name, "arguments": ""}}]
            });
            return Some(self.chunk(i, delta, Value::Null, None));
        }
        let piece: Result<Option<String>, &'static str> = match &mut c.body {
            Body::Text(script) => match script.next_piece() {
                Some(p) => Ok(p),
                None => Err(script.finish_reason()),
            },
            Body::Pieces(pieces) => match pieces.pop_front() {
                Some(p) => Ok(Some(p)),
                None if c.truncated => Err("length"),
                None if c.tool.is_some() => Err("tool_calls"),
                None => Err("stop"),
            },
        };
        match piece {
            Err(finish) => {
                c.finished = true;
                if i == 0 {
                    self.finish0 = finish;
                    None
                } else {
                    let empty = match endpoint {
                        Endpoint::Completion => json!(""),
                        _ => json!({}),
                    };
                    Some(self.chunk(i, empty, Value::Null, Some(finish)))
                }
            }
            Ok(None) => None,
            Ok(Some(text)) => {
                c.steps += 1;
                let first = !c.started;
                c.started = true;
                let offset = c.text_offset;
                c.text_offset += text.len();
                let lp = match logprobs {
                    Some(k) if c.tool.is_none() => match endpoint {
                        Endpoint::Completion => legacy_logprobs(&text, k, offset),
                        _ => chat_logprobs(&text, k),
                    },
                    _ => Value::Null,
                };
                let delta = match (endpoint, &c.tool) {
                    (Endpoint::Completion, _) => json!(text),
                    (_, Some(_)) => {
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
                    }
                    (_, None) if first => json!({"role": "assistant", "content": text}),
                    (_, None) => json!({"content": text}),
                };
                Some(self.chunk(i, delta, lp, None))
            }
        }
    }

    /// One streamed chunk for choice `i`. `delta` is the chat delta, or the text of a legacy
    /// completion.
    fn chunk(&self, i: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> String {
        let index = self.choices[i].index;
        let choice = match self.endpoint {
            Endpoint::Completion => json!({
                "text": delta, "index": index, "logprobs": logprobs, "finish_reason": finish
            }),
            _ => json!({
                "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish
            }),
        };
        json!({
            "id": format!("{}sim", self.endpoint.id_prefix()),
            "object": self.endpoint.chunk_object(),
            "created": 0,
            "model": self.model,
            "choices": [choice],
        })
        .to_string()
    }

    /// Choice 0's finish reason (valid once [`RichScript::next_step`] returned `None`).
    pub(crate) fn finish_reason(&self) -> &'static str {
        self.finish0
    }

    pub(crate) fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens
    }

    /// Tokens generated over all choices.
    pub(crate) fn completion_tokens(&self) -> u32 {
        self.choices
            .iter()
            .map(|c| c.steps)
            .fold(0, u32::saturating_add)
    }
}

/// Splits JSON text into pieces of about [`JSON_PIECE_BYTES`], at most `max` of them (then the
/// text is cut short: `true`).
fn split_pieces(text: &str, max: Option<usize>) -> (VecDeque<String>, bool) {
    let mut out = VecDeque::new();
    let mut rest = text;
    while !rest.is_empty() {
        if max.is_some_and(|m| out.len() >= m) {
            return (out, true);
        }
        let mut end = JSON_PIECE_BYTES.min(rest.len());
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        out.push_back(rest[..end].to_owned());
        rest = &rest[end..];
    }
    (out, false)
}

fn word(rng: &mut SplitMix64) -> &'static str {
    VOCABULARY[(rng.next_u64() % VOCABULARY.len() as u64) as usize]
}

/// A deterministic log probability (<= 0) for `token`, and `k` alternatives below it.
fn token_logprobs(token: &str, k: u32) -> (f64, Vec<(String, f64)>) {
    let mut h = Fnv64::new();
    h.write(token.as_bytes());
    let r = h.finish();
    // Between -0.001 and about -2: plausible for sampled tokens.
    let lp = -((r % 2000) as f64 + 1.0) / 1000.0;
    let mut rng = SplitMix64(r);
    let mut alts = vec![(token.to_owned(), lp)];
    let mut below = lp;
    for _ in 1..k.max(1) {
        below -= 0.25 + (rng.next_u64() % 1000) as f64 / 1000.0;
        alts.push((format!(" {}", word(&mut rng)), below));
    }
    alts.truncate(k as usize);
    (lp, alts)
}

/// Chat logprobs of one content piece: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(text: &str, k: u32) -> Value {
    let (lp, alts) = token_logprobs(text, k);
    let top: Vec<Value> = alts
        .iter()
        .map(|(t, l)| json!({"token": t, "logprob": l, "bytes": t.as_bytes()}))
        .collect();
    json!({"content": [{"token": text, "logprob": lp, "bytes": text.as_bytes(), "top_logprobs": top}]})
}

/// Legacy completions logprobs of one piece: `{tokens, token_logprobs, top_logprobs,
/// text_offset}`.
fn legacy_logprobs(text: &str, k: u32, offset: usize) -> Value {
    let (lp, alts) = token_logprobs(text, k);
    let top: Map<String, Value> = alts.into_iter().map(|(t, l)| (t, json!(l))).collect();
    json!({"tokens": [text], "token_logprobs": [lp], "top_logprobs": [top], "text_offset": [offset]})
}

/// Resolves a local `$ref` (`#/$defs/X`, `#/definitions/X`) against the root schema.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer))
            .unwrap_or(schema),
        None => schema,
    }
}

/// A small instance of a JSON Schema: required properties (all of them when none are listed),
/// the first `enum` value, a word for strings, small numbers within bounds, `minItems` items (at
/// most [`MAX_GENERATED_ITEMS`]). Bounded by [`MAX_INSTANCE_DEPTH`].
pub(crate) fn instance(root: &Value, schema: &Value, rng: &mut SplitMix64, depth: usize) -> Value {
    let mut budget = MAX_GENERATED_VALUES;
    generate(root, schema, rng, depth, &mut budget)
}

/// [`instance`], spending one unit of `budget` per value (`null` once it is spent).
fn generate(
    root: &Value,
    schema: &Value,
    rng: &mut SplitMix64,
    depth: usize,
    budget: &mut u32,
) -> Value {
    if depth >= MAX_INSTANCE_DEPTH || *budget == 0 {
        return Value::Null;
    }
    *budget -= 1;
    let schema = resolve(root, schema);
    if let Some(v) = schema.get("const") {
        return v.clone();
    }
    if let Some(Value::Array(values)) = schema.get("enum") {
        if let Some(v) = values.first() {
            return v.clone();
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(alts)) = schema.get(key) {
            // The first alternative that is not `null` (Pydantic writes `Optional[X]` as
            // `anyOf: [X, {"type": "null"}]`).
            let pick = alts
                .iter()
                .find(|a| resolve(root, a).get("type").and_then(Value::as_str) != Some("null"))
                .or(alts.first());
            if let Some(alt) = pick {
                return generate(root, alt, rng, depth + 1, budget);
            }
        }
    }
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ if schema.get("items").is_some() => "array",
        _ => "string",
    };
    match ty {
        "object" => {
            let props = schema.get("properties").and_then(Value::as_object);
            let required: Vec<&str> = match schema.get("required") {
                Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
                _ => props
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default(),
            };
            let mut out = Map::new();
            for name in required {
                let sub = props.and_then(|p| p.get(name)).unwrap_or(&Value::Null);
                out.insert(name.to_owned(), generate(root, sub, rng, depth + 1, budget));
            }
            Value::Object(out)
        }
        "array" => {
            let min = schema.get("minItems").and_then(Value::as_u64).unwrap_or(1);
            let n = min.clamp(1, MAX_GENERATED_ITEMS);
            let items = schema.get("items").unwrap_or(&Value::Null);
            Value::Array(
                (0..n)
                    .map(|_| generate(root, items, rng, depth + 1, budget))
                    .collect(),
            )
        }
        "integer" => {
            let lo = schema.get("minimum").and_then(Value::as_i64).unwrap_or(0);
            let hi = schema
                .get("maximum")
                .and_then(Value::as_i64)
                .unwrap_or(lo.saturating_add(9))
                .max(lo);
            let span = hi.saturating_sub(lo).min(9) as u64 + 1;
            json!(lo.saturating_add((rng.next_u64() % span) as i64))
        }
        "number" => {
            let lo = schema.get("minimum").and_then(Value::as_f64).unwrap_or(0.0);
            let hi = schema
                .get("maximum")
                .and_then(Value::as_f64)
                .unwrap_or(lo + 10.0)
                .max(lo);
            let frac = (rng.next_u64() % 100) as f64 / 100.0;
            json!(lo + (hi - lo) * frac)
        }
        "boolean" => json!(rng.next_u64() & 1 == 0),
        "null" => Value::Null,
        _ => {
            let mut s = word(rng).to_owned();
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
                s.truncate(max as usize);
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
                while (s.len() as u64) < min.min(64) {
                    s.push('x');
                }
            }
            json!(s)
        }
    }
}

/// The embeddings of a request, one `data[]` element per input, and its prompt tokens.
pub(crate) fn embeddings(
    config: &SimConfig,
    request: &InferenceRequest,
) -> Result<(Vec<String>, u32), BackendError> {
    let dims = match request.raw.get("dimensions").and_then(Value::as_u64) {
        None => SIM_EMBEDDING_DIMENSIONS,
        Some(d) if d as usize <= SIM_EMBEDDING_DIMENSIONS && d > 0 => d as usize,
        Some(d) => {
            return Err(BackendError::BadRequest {
                url: "sim".into(),
                status: 400,
                message: format!(
                    "Invalid 'dimensions': {d}. The model `{}` makes embeddings of at most \
                     {SIM_EMBEDDING_DIMENSIONS} dimensions.",
                    request.model
                ),
            })
        }
    };
    let base64 = request.raw.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let Input::Embed(inputs) = &request.input else {
        return Ok((Vec::new(), 0));
    };
    let mut tokens = 0u32;
    let data = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let mut h = Fnv64::new();
            match input {
                EmbedInput::Text(t) => {
                    tokens = tokens.saturating_add(approx_token_count(t));
                    h.write(t.as_bytes());
                }
                EmbedInput::Tokens(ids) => {
                    tokens = tokens.saturating_add(u32::try_from(ids.len()).unwrap_or(u32::MAX));
                    for id in ids {
                        h.write(&id.to_le_bytes());
                    }
                }
            }
            let v = embedding(h.finish() ^ config.seed.rotate_left(17), dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding}).to_string()
        })
        .collect();
    Ok((data, tokens))
}

/// A unit-norm vector of `dims` components: the native vector cut to `dims` and renormalised
/// (shortened embeddings keep their direction's first components, as OpenAI's do).
pub(crate) fn embedding(seed: u64, dims: usize) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    let native: Vec<f64> = (0..SIM_EMBEDDING_DIMENSIONS)
        .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        .collect();
    let cut = &native[..dims.min(SIM_EMBEDDING_DIMENSIONS)];
    let norm = cut
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    cut.iter().map(|x| (x / norm) as f32).collect()
}

/// Standard base64 with padding (what OpenAI's `encoding_format: "base64"` returns).
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if k <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(extra: Value) -> InferenceRequest {
        let mut v = json!({"model": "sim", "messages": [{"role": "user", "content": "What is the weather in Paris?"}]});
        if let (Some(o), Value::Object(extra)) = (v.as_object_mut(), extra) {
            o.extend(extra);
        }
        parse(Endpoint::Chat, v)
    }

    fn parse(endpoint: Endpoint, v: Value) -> InferenceRequest {
        match InferenceRequest::parse(endpoint, v.to_string().as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        }
    }

    fn config() -> SimConfig {
        SimConfig {
            ttft_ms: 0,
            tokens_per_s: 0.0,
            seed: 5,
        }
    }

    /// Every chunk of a rich generation, parsed, and choice 0's finish reason.
    fn run(r: &InferenceRequest) -> (Vec<Value>, &'static str, u32) {
        let mut script = RichScript::new(&config(), r);
        let mut out = Vec::new();
        while let Some(chunks) = script.next_step() {
            for c in chunks {
                match serde_json::from_str(&c) {
                    Ok(v) => out.push(v),
                    Err(e) => panic!("chunk is not JSON ({e}): {c}"),
                }
            }
        }
        (out, script.finish_reason(), script.completion_tokens())
    }

    /// A small JSON Schema checker (types, required, enum, bounds, `$ref`, `anyOf`): enough to
    /// show the generated instances are what a schema-validating client accepts.
    fn check(root: &Value, schema: &Value, v: &Value) -> Result<(), String> {
        let schema = resolve(root, schema);
        if let Some(Value::Array(e)) = schema.get("enum") {
            return if e.contains(v) {
                Ok(())
            } else {
                Err(format!("{v} not in {e:?}"))
            };
        }
        if let Some(Value::Array(alts)) = schema.get("anyOf") {
            return if alts.iter().any(|a| check(root, a, v).is_ok()) {
                Ok(())
            } else {
                Err(format!("{v} matches no anyOf"))
            };
        }
        match schema.get("type").and_then(Value::as_str) {
            Some("object") => {
                let o = v.as_object().ok_or(format!("{v} is not an object"))?;
                for r in schema
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let r = r.as_str().unwrap_or_default();
                    if !o.contains_key(r) {
                        return Err(format!("missing {r}"));
                    }
                }
                for (k, sub) in schema
                    .get("properties")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    if let Some(x) = o.get(k) {
                        check(root, sub, x)?;
                    }
                }
                Ok(())
            }
            Some("array") => {
                let a = v.as_array().ok_or(format!("{v} is not an array"))?;
                if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
                    if (a.len() as u64) < min {
                        return Err(format!("{v} too short"));
                    }
                }
                a.iter()
                    .try_for_each(|x| check(root, schema.get("items").unwrap_or(&Value::Null), x))
            }
            Some("string") => {
                let s = v.as_str().ok_or(format!("{v} is not a string"))?;
                let len = s.len() as u64;
                if schema
                    .get("maxLength")
                    .and_then(Value::as_u64)
                    .is_some_and(|m| len > m)
                    || schema
                        .get("minLength")
                        .and_then(Value::as_u64)
                        .is_some_and(|m| len < m)
                {
                    return Err(format!("{v} has the wrong length"));
                }
                Ok(())
            }
            Some("integer") => {
                let i = v.as_i64().ok_or(format!("{v} is not an integer"))?;
                if schema
                    .get("minimum")
                    .and_then(Value::as_i64)
                    .is_some_and(|m| i < m)
                    || schema
                        .get("maximum")
                        .and_then(Value::as_i64)
                        .is_some_and(|m| i > m)
                {
                    return Err(format!("{v} out of bounds"));
                }
                Ok(())
            }
            Some("number") => v.as_f64().map(|_| ()).ok_or(format!("{v} is not a number")),
            Some("boolean") => v
                .as_bool()
                .map(|_| ())
                .ok_or(format!("{v} is not a boolean")),
            _ => Ok(()),
        }
    }

    /// What Pydantic writes for a model with a nested model, an optional field, a literal and
    /// bounded numbers (as LangChain's `with_structured_output` and `bind_tools` send it).
    fn pydantic_schema() -> Value {
        json!({
            "$defs": {"Place": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 5},
                "country": {"type": "string", "minLength": 2, "maxLength": 2}
            }, "required": ["city", "country"], "title": "Place"}},
            "type": "object",
            "title": "Weather",
            "properties": {
                "place": {"$ref": "#/$defs/Place"},
                "unit": {"enum": ["celsius", "fahrenheit"], "type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 3},
                "temperature": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null},
                "windy": {"type": "boolean"}
            },
            "required": ["place", "unit", "days", "temperature", "tags", "windy"]
        })
    }

    fn weather_tool() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": pydantic_schema()}})
    }

    #[test]
    fn tool_calls_stream_like_openai_with_arguments_valid_for_the_schema() {
        let r = chat(json!({
            "tools": [{"type": "function", "function": {"name": "other"}}, weather_tool()],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
        }));
        assert!(!is_plain(&r));
        let (chunks, finish, tokens) = run(&r);
        assert_eq!(run(&r).0, chunks, "deterministic");
        assert_eq!(finish, "tool_calls");
        assert_eq!(tokens as usize, chunks.len());
        let first = &chunks[0]["choices"][0];
        assert_eq!(first["index"], 0);
        let call = &first["delta"]["tool_calls"][0];
        assert_eq!(call["index"], 0);
        assert!(
            call["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("call_")),
            "{call}"
        );
        assert_eq!(call["type"], "function");
        assert_eq!(
            call["function"],
            json!({"name": "get_weather", "arguments": ""})
        );
        let mut args = String::new();
        for c in &chunks[1..] {
            let delta = &c["choices"][0]["delta"];
            assert!(delta.get("content").is_none() && delta["tool_calls"][0].get("id").is_none());
            assert_eq!(delta["tool_calls"][0]["index"], 0);
            args.push_str(
                delta["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .unwrap_or_default(),
            );
        }
        let args: Value = match serde_json::from_str(&args) {
            Ok(v) => v,
            Err(e) => panic!("arguments are not JSON ({e}): {args}"),
        };
        let schema = pydantic_schema();
        assert_eq!(check(&schema, &schema, &args), Ok(()), "{args}");
        // `required` picks the first tool; `auto` calls only a tool the user names.
        let r = chat(json!({"tools": [weather_tool()], "tool_choice": "required"}));
        assert_eq!(tool_to_call(&r).map(|t| t.name), Some("get_weather"));
        let r = chat(json!({"tools": [weather_tool()]}));
        assert_eq!(
            tool_to_call(&r),
            None,
            "auto, and the user did not name the tool"
        );
        assert!(is_plain(&r));
        let mut v = json!({"model": "sim", "messages": [{"role": "user", "content": "call get_weather please"}], "tools": [weather_tool()]});
        assert_eq!(
            tool_to_call(&parse(Endpoint::Chat, v.take())).map(|t| t.name),
            Some("get_weather")
        );
    }

    #[test]
    fn json_mode_and_json_schema_stream_json_content() {
        for rf in [
            json!({"type": "json_object"}),
            json!({"type": "json_schema", "json_schema": {"name": "Weather", "schema": pydantic_schema()}}),
        ] {
            let r = chat(json!({"response_format": rf}));
            let (chunks, finish, _) = run(&r);
            assert_eq!(finish, "stop");
            assert!(chunks.len() > 2, "streamed in pieces");
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let text: String = chunks
                .iter()
                .map(|c| {
                    c["choices"][0]["delta"]["content"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            let v: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => panic!("content is not JSON ({e}): {text}"),
            };
            assert!(v.is_object(), "{v}");
            if rf["type"] == "json_schema" {
                let schema = pydantic_schema();
                assert_eq!(check(&schema, &schema, &v), Ok(()), "{v}");
            }
        }
        // A `max_tokens` budget cuts the JSON short, as a model's would be.
        let r = chat(json!({"response_format": {"type": "json_object"}, "max_tokens": 2}));
        let (chunks, finish, tokens) = run(&r);
        assert_eq!((chunks.len(), finish, tokens), (2, "length", 2));
    }

    #[test]
    fn hostile_schemas_give_bounded_instances() {
        // A self-referencing definition: generation stops at the depth bound.
        let cyclic = json!({"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}, "required": ["next"]}}, "$ref": "#/$defs/N"});
        let v = instance(&cyclic, &cyclic, &mut SplitMix64(1), 0);
        assert!(v.to_string().len() < 1000, "{v}");
        let huge = json!({"type": "array", "items": {"type": "integer"}, "minItems": u64::MAX});
        let v = instance(&huge, &huge, &mut SplitMix64(1), 0);
        assert_eq!(
            v.as_array().map(Vec::len),
            Some(MAX_GENERATED_ITEMS as usize)
        );
        let odd = json!({"type": "integer", "minimum": i64::MAX, "maximum": i64::MIN});
        assert_eq!(instance(&odd, &odd, &mut SplitMix64(1), 0), json!(i64::MAX));
        // Two references to the same definition at every level: exponential without a budget.
        let doubling = json!({"$defs": {"T": {"type": "object", "required": ["l", "r"], "properties": {
            "l": {"$ref": "#/$defs/T"}, "r": {"$ref": "#/$defs/T"}}}}, "$ref": "#/$defs/T"});
        let v = instance(&doubling, &doubling, &mut SplitMix64(1), 0);
        assert!(
            v.to_string().len() < 64 * MAX_GENERATED_VALUES as usize,
            "bounded"
        );
        let dangling = json!({"$ref": "#/nowhere"});
        assert!(instance(&dangling, &dangling, &mut SplitMix64(1), 0).is_string());
    }

    #[test]
    fn logprobs_have_openai_shapes() {
        let r = chat(json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 6}));
        let (chunks, finish, tokens) = run(&r);
        assert_eq!((chunks.len(), finish, tokens), (6, "length", 6));
        assert_eq!(run(&r).0, chunks, "deterministic");
        for c in &chunks {
            let choice = &c["choices"][0];
            let entry = &choice["logprobs"]["content"][0];
            assert_eq!(entry["token"], choice["delta"]["content"]);
            let token = entry["token"].as_str().unwrap_or_default();
            assert_eq!(entry["bytes"], json!(token.as_bytes()));
            let lp = entry["logprob"].as_f64().unwrap_or(1.0);
            assert!(lp <= 0.0);
            let top = entry["top_logprobs"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert_eq!(top.len(), 3);
            assert_eq!(top[0]["token"], entry["token"]);
            let lps: Vec<f64> = top
                .iter()
                .map(|t| t["logprob"].as_f64().unwrap_or(1.0))
                .collect();
            assert!(
                lps.windows(2).all(|w| w[0] >= w[1]) && lps.iter().all(|l| *l <= 0.0),
                "{lps:?}"
            );
        }
        // The text is the plain path's: logprobs only annotate it.
        let plain = chat(json!({"max_tokens": 6}));
        let mut script = SimScript::new(&config(), &plain);
        let text: String = std::iter::from_fn(|| script.next_piece())
            .flatten()
            .collect();
        let annotated: String = chunks
            .iter()
            .map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(annotated, text);
        // Legacy completions: {tokens, token_logprobs, top_logprobs, text_offset}.
        let r = parse(
            Endpoint::Completion,
            json!({"model": "sim", "prompt": "p", "logprobs": 2, "max_tokens": 3}),
        );
        let (chunks, ..) = run(&r);
        let mut offset = 0;
        for c in &chunks {
            let choice = &c["choices"][0];
            assert_eq!(c["object"], "text_completion");
            let lp = &choice["logprobs"];
            assert_eq!(lp["tokens"][0], choice["text"]);
            assert!(lp["token_logprobs"][0].as_f64().is_some_and(|l| l <= 0.0));
            assert_eq!(lp["top_logprobs"][0].as_object().map(Map::len), Some(2));
            assert_eq!(lp["text_offset"][0], offset);
            offset += choice["text"].as_str().map_or(0, str::len);
        }
    }

    #[test]
    fn several_choices_differ_and_carry_their_index() {
        let r = chat(json!({"n": 3, "max_tokens": 5}));
        let (chunks, finish, tokens) = run(&r);
        assert_eq!(finish, "length");
        assert_eq!(tokens, 15, "usage counts every choice");
        let mut texts = vec![String::new(); 3];
        let mut finishes = vec![None; 3];
        for c in &chunks {
            let choice = &c["choices"][0];
            let i = choice["index"].as_u64().unwrap_or(99) as usize;
            texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or_default());
            if let Some(f) = choice["finish_reason"].as_str() {
                finishes[i] = Some(f.to_owned());
            }
        }
        assert!(texts[0] != texts[1] && texts[1] != texts[2], "{texts:?}");
        // Choice 0 finishes with `Done`; the others with their own chunk.
        assert_eq!(
            finishes,
            [None, Some("length".into()), Some("length".into())]
        );
        let plain = chat(json!({"max_tokens": 5}));
        let mut script = SimScript::new(&config(), &plain);
        let text: String = std::iter::from_fn(|| script.next_piece())
            .flatten()
            .collect();
        assert_eq!(texts[0], text, "choice 0 is the n = 1 text");
        assert_eq!(run(&r).0, chunks, "deterministic");
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let r = parse(
            Endpoint::Embeddings,
            json!({"model": "sim", "input": ["a b", "c", [1, 2]]}),
        );
        let (data, tokens) = match embeddings(&config(), &r) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(tokens, 2 + 1 + 2);
        let vs: Vec<Value> = data
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        assert_eq!(vs.len(), 3);
        for (i, v) in vs.iter().enumerate() {
            assert_eq!(
                (v["object"].as_str(), v["index"].as_u64()),
                (Some("embedding"), Some(i as u64))
            );
            let e: Vec<f64> = v["embedding"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect();
            assert_eq!(e.len(), SIM_EMBEDDING_DIMENSIONS);
            let norm: f64 = e.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        }
        assert_ne!(vs[0]["embedding"], vs[1]["embedding"]);
        assert_eq!(embeddings(&config(), &r).ok().map(|d| d.0), Some(data));
        // `dimensions` shortens; base64 is the little-endian f32 bytes.
        let r = parse(
            Endpoint::Embeddings,
            json!({"model": "sim", "input": "a b", "dimensions": 16, "encoding_format": "base64"}),
        );
        let b64 = embeddings(&config(), &r)
            .ok()
            .and_then(|(d, _)| serde_json::from_str::<Value>(&d[0]).ok());
        let b64 = b64
            .and_then(|v| v["embedding"].as_str().map(str::to_owned))
            .unwrap_or_default();
        assert_eq!(b64.len(), (16 * 4usize).div_ceil(3) * 4);
        let floats = embedding(Fnv64::hash(b"a b") ^ config().seed.rotate_left(17), 16);
        let bytes: Vec<u8> = floats.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(b64, base64_encode(&bytes));
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        let r = parse(
            Endpoint::Embeddings,
            json!({"model": "sim", "input": "x", "dimensions": 65}),
        );
        assert!(matches!(
            embeddings(&config(), &r),
            Err(BackendError::BadRequest { status: 400, .. })
        ));
    }

    proptest::proptest! {
        /// A schema is the client's input: generating from any JSON never panics.
        #[test]
        fn instance_generation_never_panics(schema in json_value()) {
            let _ = instance(&schema, &schema, &mut SplitMix64(7), 0);
        }
    }

    /// Arbitrary JSON, biased towards schema keywords.
    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("type".to_owned()),
            Just("properties".to_owned()),
            Just("required".to_owned()),
            Just("items".to_owned()),
            Just("enum".to_owned()),
            Just("anyOf".to_owned()),
            Just("$ref".to_owned()),
            Just("minItems".to_owned()),
            Just("maxLength".to_owned()),
            Just("minLength".to_owned()),
            Just("minimum".to_owned()),
            Just("maximum".to_owned()),
            "[a-z$/#]{0,6}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            prop_oneof![
                Just("object"),
                Just("array"),
                Just("string"),
                Just("integer"),
                Just("number"),
                Just("boolean"),
                Just("null"),
                Just("#/$defs/a"),
                Just("é")
            ]
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(6, 64, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((key.clone(), inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn plain_requests_keep_the_token_fast_path() {
        assert!(is_plain(&chat(json!({}))));
        assert!(is_plain(&chat(
            json!({"n": 1, "logprobs": false, "response_format": {"type": "text"}})
        )));
        assert!(is_plain(&chat(
            json!({"tools": [weather_tool()], "tool_choice": "none"})
        )));
        for extra in [
            json!({"n": 2}),
            json!({"logprobs": true}),
            json!({"response_format": {"type": "json_object"}}),
            json!({"tools": [weather_tool()], "tool_choice": "required"}),
        ] {
            assert!(!is_plain(&chat(extra.clone())), "{extra}");
        }
    }
}
