//! OpenAI-compatible request and response shapes, without I/O.
//!
//! This module is shared by the gateway (which parses and validates what apps send, renders errors
//! and streams tokens back as Server-Sent Events), the edge node (which serves the same API over its
//! inference backend, and relays to an OpenAI-compatible server running on the node), and tests.
//!
//! Shapes follow what the official `openai` Python client reads (`ChatCompletionChunk`,
//! `Completion`, `ChatCompletion`, `Model`), see DESIGN.md section 7:
//! - streaming events are `data: <json>\n\n`, then `data: [DONE]\n\n`, then the body ends;
//! - a usage chunk (`"choices":[]`) is sent only when `stream_options.include_usage` is true;
//! - errors are `{"error":{"message","type","param","code"}}`, in-band (as an SSE event) once the
//!   stream has started.
//!
//! Rendering is on the hot path (one chunk per token), so chunks are written by hand into one
//! buffer: the per-stream constant part is rendered once ([`StreamRenderer`]) and only the token
//! text is escaped per chunk. [`push_json_str`] produces exactly what `serde_json` produces.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt::Write as _;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The most stop sequences a request may carry (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;

/// The longest model name a request may carry, in bytes. Real names (`org/model-size-variant`)
/// are far shorter; a longer one is a 400 naming `model`, so that it never reaches logs,
/// routing or metrics.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// The event that ends a successful stream. The body must end right after it: newer clients stop
/// reading here, older ones read until the connection closes.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// `Content-Type` of a streaming response.
pub const SSE_CONTENT_TYPE: &str = "text/event-stream";

/// Which OpenAI endpoint a request was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions` (legacy text completions).
    Completion,
}

impl Endpoint {
    /// The full request path, including the `/v1` prefix.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completion => "/v1/completions",
        }
    }

    /// The path below an API base URL that already ends in `/v1`.
    pub fn sub_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completion => "/completions",
        }
    }

    /// Maps a request path (without query) to an endpoint; a trailing slash is tolerated.
    pub fn from_path(path: &str) -> Option<Self> {
        match path.strip_suffix('/').unwrap_or(path) {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completion),
            _ => None,
        }
    }

    /// The `object` of a streamed chunk on this endpoint.
    pub fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }

    /// The `object` of a non-streaming response on this endpoint.
    pub fn response_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
        }
    }

    /// The prefix OpenAI uses for response ids on this endpoint (`chatcmpl-`, `cmpl-`).
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
        }
    }
}

/// The author of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    /// OpenAI's newer name for system instructions on reasoning models.
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The wire name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => return None,
        })
    }
}

/// One chat message, reduced to what a text backend needs. The full message (tool calls, images)
/// stays in [`InferenceRequest::raw`] for forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    /// The text of the message: a string content as is, or the `text` parts of an array content
    /// joined with `\n`. Non-text parts (images, audio, files) contribute nothing here. Empty when
    /// an assistant message carries only tool calls.
    pub content: String,
    pub name: Option<String>,
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Chat endpoint: the conversation so far (never empty).
    Messages(Vec<ChatMessage>),
    /// Completions endpoint: one prompt string.
    Prompt(String),
}

/// A validated request for `POST /v1/chat/completions` or `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub input: Input,
    /// `stream`; false when absent.
    pub stream: bool,
    /// `stream_options.include_usage`; false when absent.
    pub include_usage: bool,
    /// `max_completion_tokens` (chat, preferred) or `max_tokens`; `None` lets the backend choose.
    pub max_tokens: Option<u32>,
    /// `stop`: a string or up to [`MAX_STOP_SEQUENCES`] strings; empty strings are dropped.
    pub stop: Vec<String>,
    /// `temperature` in `0..=2`.
    pub temperature: Option<f32>,
    pub user: Option<String>,
    pub seed: Option<i64>,
    /// The request body exactly as received (every field, known or not), so it can be forwarded.
    pub raw: Map<String, Value>,
}

/// Why a request body was rejected. Rendered as a 400 `invalid_request_error` (see
/// [`ApiError::invalid_request`]); `param` names the offending field in OpenAI's path syntax, such
/// as `messages[1].content` or `temperature`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub param: Option<String>,
    pub message: String,
    /// A machine-readable reason: `invalid_json`, `missing_required_parameter`, `invalid_type`,
    /// `invalid_value` or `unsupported_value`.
    pub code: &'static str,
}

impl RequestError {
    fn new(param: Option<String>, code: &'static str, message: String) -> Self {
        Self {
            param,
            message,
            code,
        }
    }

    fn missing(param: &str) -> Self {
        Self::new(
            Some(param.to_owned()),
            "missing_required_parameter",
            format!("Missing required parameter: '{param}'."),
        )
    }

    fn invalid_type(param: &str, expected: &str, got: &Value) -> Self {
        Self::new(
            Some(param.to_owned()),
            "invalid_type",
            format!(
                "Invalid type for '{param}': expected {expected}, but got {} instead.",
                type_name(got)
            ),
        )
    }

    fn invalid_value(param: &str, message: String) -> Self {
        Self::new(Some(param.to_owned()), "invalid_value", message)
    }

    fn unsupported(param: &str, message: String) -> Self {
        Self::new(Some(param.to_owned()), "unsupported_value", message)
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A present, non-null field. OpenAI treats `null` like an absent optional field.
fn field<'a>(raw: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    raw.get(key).filter(|v| !v.is_null())
}

fn opt_bool(
    raw: &Map<String, Value>,
    key: &str,
    param: &str,
) -> Result<Option<bool>, RequestError> {
    match field(raw, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(RequestError::invalid_type(param, "a boolean", other)),
    }
}

fn opt_string(raw: &Map<String, Value>, key: &str) -> Result<Option<String>, RequestError> {
    match field(raw, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(RequestError::invalid_type(key, "a string", other)),
    }
}

/// An integer field. Integral floats such as `16.0` are accepted because some clients (and
/// JavaScript) cannot tell the difference.
fn opt_int(raw: &Map<String, Value>, key: &str) -> Result<Option<i128>, RequestError> {
    match field(raw, key) {
        None => Ok(None),
        Some(v @ Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i128::from(i)))
            } else if let Some(u) = n.as_u64() {
                Ok(Some(i128::from(u)))
            } else {
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 1e30 => Ok(Some(f as i128)),
                    _ => Err(RequestError::invalid_type(key, "an integer", v)),
                }
            }
        }
        Some(other) => Err(RequestError::invalid_type(key, "an integer", other)),
    }
}

fn opt_u32(raw: &Map<String, Value>, key: &str, min: u32) -> Result<Option<u32>, RequestError> {
    match opt_int(raw, key)? {
        None => Ok(None),
        Some(i) if i < i128::from(min) => Err(RequestError::invalid_value(
            key,
            format!("Invalid '{key}': {i} is less than the minimum of {min}."),
        )),
        Some(i) => u32::try_from(i).map(Some).map_err(|_| {
            RequestError::invalid_value(
                key,
                format!(
                    "Invalid '{key}': {i} is greater than the maximum of {}.",
                    u32::MAX
                ),
            )
        }),
    }
}

fn text_of_content(content: &Value, param: &str) -> Result<String, RequestError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let part_param = format!("{param}[{j}]");
                let Value::Object(part) = part else {
                    return Err(RequestError::invalid_type(&part_param, "an object", part));
                };
                let kind = match part.get("type") {
                    Some(Value::String(kind)) => kind.as_str(),
                    None | Some(Value::Null) => {
                        return Err(RequestError::missing(&format!("{part_param}.type")))
                    }
                    Some(other) => {
                        return Err(RequestError::invalid_type(
                            &format!("{part_param}.type"),
                            "a string",
                            other,
                        ))
                    }
                };
                // Other part kinds (image_url, input_audio, file, refusal) are legal; they reach
                // an upstream server through `raw` but carry no text for the simulator.
                if kind == "text" {
                    match part.get("text") {
                        Some(Value::String(t)) => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(t);
                        }
                        None | Some(Value::Null) => {
                            return Err(RequestError::missing(&format!("{part_param}.text")))
                        }
                        Some(other) => {
                            return Err(RequestError::invalid_type(
                                &format!("{part_param}.text"),
                                "a string",
                                other,
                            ))
                        }
                    }
                }
            }
            Ok(text)
        }
        other => Err(RequestError::invalid_type(
            param,
            "a string or an array of content parts",
            other,
        )),
    }
}

fn parse_messages(raw: &Map<String, Value>) -> Result<Vec<ChatMessage>, RequestError> {
    let list = match field(raw, "messages") {
        None => return Err(RequestError::missing("messages")),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(RequestError::invalid_type("messages", "an array", other)),
    };
    if list.is_empty() {
        return Err(RequestError::invalid_value(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1.".into(),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, msg) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Value::Object(msg) = msg else {
            return Err(RequestError::invalid_type(&param, "an object", msg));
        };
        let role = match msg.get("role") {
            None | Some(Value::Null) => {
                return Err(RequestError::missing(&format!("{param}.role")))
            }
            Some(Value::String(r)) => Role::parse(r).ok_or_else(|| {
                RequestError::invalid_value(
                    &format!("{param}.role"),
                    format!(
                        "Invalid value for '{param}.role': '{r}'. Supported values are: \
                         'system', 'developer', 'user', 'assistant' and 'tool'."
                    ),
                )
            })?,
            Some(other) => {
                return Err(RequestError::invalid_type(
                    &format!("{param}.role"),
                    "a string",
                    other,
                ))
            }
        };
        let content_param = format!("{param}.content");
        let content = match msg.get("content") {
            // An assistant turn that only called tools has no content.
            None | Some(Value::Null) if role == Role::Assistant => String::new(),
            None | Some(Value::Null) => return Err(RequestError::missing(&content_param)),
            Some(content) => text_of_content(content, &content_param)?,
        };
        let name = match msg.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(n)) => Some(n.clone()),
            Some(other) => {
                return Err(RequestError::invalid_type(
                    &format!("{param}.name"),
                    "a string",
                    other,
                ))
            }
        };
        out.push(ChatMessage {
            role,
            content,
            name,
        });
    }
    Ok(out)
}

fn parse_prompt(raw: &Map<String, Value>) -> Result<String, RequestError> {
    match field(raw, "prompt") {
        None => Err(RequestError::missing("prompt")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [] => Err(RequestError::invalid_value(
                "prompt",
                "Invalid 'prompt': empty array. Expected a string or an array with one string."
                    .into(),
            )),
            [Value::String(s)] => Ok(s.clone()),
            items if items.iter().all(Value::is_string) => Err(RequestError::unsupported(
                "prompt",
                format!(
                    "Invalid 'prompt': {} prompts in one request are not supported; send one \
                     request per prompt.",
                    items.len()
                ),
            )),
            items if items.iter().all(|v| v.is_number() || v.is_array()) => {
                Err(RequestError::unsupported(
                    "prompt",
                    "Invalid 'prompt': token-id prompts are not supported; send text.".into(),
                ))
            }
            _ => Err(RequestError::invalid_type(
                "prompt",
                "a string or an array of strings",
                &Value::Array(items.to_vec()),
            )),
        },
        Some(other) => Err(RequestError::invalid_type(
            "prompt",
            "a string or an array of strings",
            other,
        )),
    }
}

fn parse_stop(raw: &Map<String, Value>) -> Result<Vec<String>, RequestError> {
    match field(raw, "stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP_SEQUENCES {
                return Err(RequestError::invalid_value(
                    "stop",
                    format!(
                        "Invalid 'stop': array too long. Expected an array with maximum length \
                         {MAX_STOP_SEQUENCES}, but got an array with length {} instead.",
                        items.len()
                    ),
                ));
            }
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) if s.is_empty() => {}
                    Value::String(s) => out.push(s.clone()),
                    other => {
                        return Err(RequestError::invalid_type(
                            &format!("stop[{i}]"),
                            "a string",
                            other,
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(other) => Err(RequestError::invalid_type(
            "stop",
            "a string or an array of strings",
            other,
        )),
    }
}

impl InferenceRequest {
    /// Parses and validates a JSON request body sent to `endpoint`.
    pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Self, RequestError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            RequestError::new(
                None,
                "invalid_json",
                format!(
                    "We could not parse the JSON body of your request: {} at line {} column {}.",
                    json_error_reason(&e),
                    e.line(),
                    e.column()
                ),
            )
        })?;
        Self::from_value(endpoint, value)
    }

    /// Validates an already parsed JSON body.
    pub fn from_value(endpoint: Endpoint, value: Value) -> Result<Self, RequestError> {
        let Value::Object(raw) = value else {
            return Err(RequestError::new(
                None,
                "invalid_type",
                format!(
                    "The request body must be a JSON object, but got {} instead.",
                    type_name(&value)
                ),
            ));
        };
        let model = match field(&raw, "model") {
            None => return Err(RequestError::missing("model")),
            Some(Value::String(m)) if m.is_empty() => {
                return Err(RequestError::invalid_value(
                    "model",
                    "Invalid 'model': empty string.".into(),
                ))
            }
            Some(Value::String(m)) if m.len() > MAX_MODEL_NAME_BYTES => {
                return Err(RequestError::invalid_value(
                    "model",
                    format!(
                        "Invalid 'model': string too long. Expected a string with maximum length \
                         {MAX_MODEL_NAME_BYTES} bytes, but got a string with length {} instead.",
                        m.len()
                    ),
                ))
            }
            Some(Value::String(m)) => m.clone(),
            Some(other) => return Err(RequestError::invalid_type("model", "a string", other)),
        };
        let input = match endpoint {
            Endpoint::Chat => Input::Messages(parse_messages(&raw)?),
            Endpoint::Completion => Input::Prompt(parse_prompt(&raw)?),
        };
        let stream = opt_bool(&raw, "stream", "stream")?.unwrap_or(false);
        let include_usage = match field(&raw, "stream_options") {
            None => false,
            Some(_) if !stream => {
                return Err(RequestError::invalid_value(
                    "stream_options",
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled."
                        .into(),
                ))
            }
            Some(Value::Object(opts)) => {
                opt_bool(opts, "include_usage", "stream_options.include_usage")?.unwrap_or(false)
            }
            Some(other) => {
                return Err(RequestError::invalid_type(
                    "stream_options",
                    "an object",
                    other,
                ))
            }
        };
        // A chat completion of zero tokens is meaningless; a legacy completion of zero tokens is
        // allowed by OpenAI (it was used with `echo`).
        let min_tokens = match endpoint {
            Endpoint::Chat => 1,
            Endpoint::Completion => 0,
        };
        let max_tokens = match endpoint {
            Endpoint::Chat => match opt_u32(&raw, "max_completion_tokens", min_tokens)? {
                Some(n) => Some(n),
                None => opt_u32(&raw, "max_tokens", min_tokens)?,
            },
            Endpoint::Completion => opt_u32(&raw, "max_tokens", min_tokens)?,
        };
        let stop = parse_stop(&raw)?;
        let temperature = match field(&raw, "temperature") {
            None => None,
            Some(v @ Value::Number(n)) => {
                let t = n
                    .as_f64()
                    .ok_or_else(|| RequestError::invalid_type("temperature", "a number", v))?;
                if !(0.0..=2.0).contains(&t) {
                    return Err(RequestError::invalid_value(
                        "temperature",
                        format!(
                            "Invalid 'temperature': {t} is out of range. Expected a value between \
                             0 and 2."
                        ),
                    ));
                }
                Some(t as f32)
            }
            Some(other) => {
                return Err(RequestError::invalid_type("temperature", "a number", other))
            }
        };
        match opt_u32(&raw, "n", 1)? {
            None | Some(1) => {}
            Some(n) => {
                return Err(RequestError::unsupported(
                    "n",
                    format!(
                        "Invalid 'n': {n}. This server generates one choice per request (n=1)."
                    ),
                ))
            }
        }
        let user = opt_string(&raw, "user")?;
        let seed = match opt_int(&raw, "seed")? {
            None => None,
            Some(s) => Some(i64::try_from(s).map_err(|_| {
                RequestError::invalid_value(
                    "seed",
                    format!("Invalid 'seed': {s} does not fit in a 64-bit signed integer."),
                )
            })?),
        };
        Ok(Self {
            endpoint,
            model,
            input,
            stream,
            include_usage,
            max_tokens,
            stop,
            temperature,
            user,
            seed,
            raw,
        })
    }

    /// The chat messages (empty for the completions endpoint).
    pub fn messages(&self) -> &[ChatMessage] {
        match &self.input {
            Input::Messages(m) => m,
            Input::Prompt(_) => &[],
        }
    }

    /// The prompt (only for the completions endpoint).
    pub fn prompt(&self) -> Option<&str> {
        match &self.input {
            Input::Messages(_) => None,
            Input::Prompt(p) => Some(p),
        }
    }

    /// Every piece of input text in order: message contents, or the prompt.
    pub fn input_texts(&self) -> impl Iterator<Item = &str> {
        let (messages, prompt) = match &self.input {
            Input::Messages(m) => (m.as_slice(), None),
            Input::Prompt(p) => (&[][..], Some(p.as_str())),
        };
        messages.iter().map(|m| m.content.as_str()).chain(prompt)
    }

    /// The body to send to another OpenAI-compatible server: the original request with `model`
    /// replaced, `stream` forced on and `stream_options.include_usage` forced on (other
    /// `stream_options` keys are kept), so the relay always gets token events and a usage count.
    pub fn upstream_body(&self, model: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(b'{');
        for (key, value) in &self.raw {
            if matches!(key.as_str(), "model" | "stream" | "stream_options") {
                continue;
            }
            push_json_str_bytes(&mut out, key);
            out.push(b':');
            // Serialising a `Value` into a `Vec` cannot fail: its map keys are strings.
            let _ = serde_json::to_writer(&mut out, value);
            out.push(b',');
        }
        out.extend_from_slice(b"\"model\":");
        push_json_str_bytes(&mut out, model);
        out.extend_from_slice(b",\"stream\":true,\"stream_options\":{");
        if let Some(Value::Object(opts)) = self.raw.get("stream_options") {
            for (key, value) in opts {
                if key == "include_usage" {
                    continue;
                }
                push_json_str_bytes(&mut out, key);
                out.push(b':');
                let _ = serde_json::to_writer(&mut out, value);
                out.push(b',');
            }
        }
        out.extend_from_slice(b"\"include_usage\":true}}");
        out
    }
}

/// serde_json's message without its own " at line L column C" suffix, which we add in our words.
fn json_error_reason(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(reason) => reason.to_owned(),
        None => full,
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// Appends `s` as a JSON string literal (with quotes), escaping exactly as `serde_json` does.
pub fn push_json_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` indexes an ASCII byte, so both slices end on character boundaries.
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn push_json_str_bytes(out: &mut Vec<u8>, s: &str) {
    // Serialising a `&str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(out, s);
}

fn push_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

/// Token counts reported in `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Usage {
    /// `prompt_tokens + completion_tokens`, widened so it cannot overflow.
    pub fn total_tokens(&self) -> u64 {
        u64::from(self.prompt_tokens) + u64::from(self.completion_tokens)
    }

    fn push_json(&self, out: &mut String) {
        let _ = write!(
            out,
            "{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{}}}",
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens()
        );
    }
}

/// Renders the chunks of one streamed response. The part that is the same for every chunk
/// (`id`, `object`, `created`, `model`) is rendered once, so a token chunk costs one allocation
/// plus escaping the token text.
#[derive(Debug, Clone)]
pub struct StreamRenderer {
    endpoint: Endpoint,
    /// `{"id":"…","object":"…","created":N,"model":"…",` (with the trailing comma).
    head: String,
}

impl StreamRenderer {
    pub fn new(endpoint: Endpoint, id: &str, created: u64, model: &str) -> Self {
        let mut head = String::with_capacity(64 + id.len() + model.len());
        head.push_str("{\"id\":");
        push_json_str(&mut head, id);
        head.push_str(",\"object\":\"");
        head.push_str(endpoint.chunk_object());
        let _ = write!(head, "\",\"created\":{created},\"model\":");
        push_json_str(&mut head, model);
        head.push(',');
        Self { endpoint, head }
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Appends one chunk's JSON. On the chat endpoint the delta holds `role` and `content` when
    /// given (`{}` when neither is); on the completions endpoint `role` is ignored and `text` is
    /// `content` or `""`.
    pub fn write_chunk(
        &self,
        out: &mut String,
        role: Option<&str>,
        content: Option<&str>,
        finish_reason: Option<&str>,
    ) {
        out.reserve(self.head.len() + 96 + content.map_or(0, str::len));
        out.push_str(&self.head);
        match self.endpoint {
            Endpoint::Chat => {
                out.push_str("\"choices\":[{\"index\":0,\"delta\":{");
                if let Some(role) = role {
                    out.push_str("\"role\":");
                    push_json_str(out, role);
                    if content.is_some() {
                        out.push(',');
                    }
                }
                if let Some(content) = content {
                    out.push_str("\"content\":");
                    push_json_str(out, content);
                }
                out.push_str("},\"logprobs\":null,\"finish_reason\":");
            }
            Endpoint::Completion => {
                out.push_str("\"choices\":[{\"text\":");
                push_json_str(out, content.unwrap_or(""));
                out.push_str(",\"index\":0,\"logprobs\":null,\"finish_reason\":");
            }
        }
        push_opt_str(out, finish_reason);
        out.push_str("}]}");
    }

    /// One chunk's JSON.
    pub fn chunk(&self, role: Option<&str>, content: Option<&str>, finish: Option<&str>) -> String {
        let mut out = String::new();
        self.write_chunk(&mut out, role, content, finish);
        out
    }

    /// The usage chunk's JSON (`"choices":[]`), sent last when `include_usage` was asked for.
    pub fn usage_chunk(&self, usage: Usage) -> String {
        let mut out = String::with_capacity(self.head.len() + 96);
        out.push_str(&self.head);
        out.push_str("\"choices\":[],\"usage\":");
        usage.push_json(&mut out);
        out.push('}');
        out
    }

    fn event(&self, role: Option<&str>, content: Option<&str>, finish: Option<&str>) -> Bytes {
        let mut out = String::with_capacity(self.head.len() + 104 + content.map_or(0, str::len));
        out.push_str("data: ");
        self.write_chunk(&mut out, role, content, finish);
        out.push_str("\n\n");
        // A boxed slice (length == capacity) becomes `Bytes` without the extra allocation that
        // `Bytes::from(Vec)` makes for a vector with spare capacity; shrinking is usually in place.
        Bytes::from(out.into_boxed_str().into_boxed_bytes())
    }

    /// The first event of a chat stream: `delta: {"role":"assistant","content":""}`, as OpenAI
    /// sends. `None` on the completions endpoint, which has no such event.
    pub fn role_event(&self) -> Option<Bytes> {
        match self.endpoint {
            Endpoint::Chat => Some(self.event(Some("assistant"), Some(""), None)),
            Endpoint::Completion => None,
        }
    }

    /// The SSE event carrying one piece of generated text.
    pub fn token_event(&self, text: &str) -> Bytes {
        self.event(None, Some(text), None)
    }

    /// The SSE event carrying the finish reason (an empty delta on the chat endpoint).
    pub fn finish_event(&self, finish_reason: &str) -> Bytes {
        self.event(None, None, Some(finish_reason))
    }

    /// The SSE event carrying usage.
    pub fn usage_event(&self, usage: Usage) -> Bytes {
        sse_event(&self.usage_chunk(usage))
    }
}

/// One `chat.completion.chunk` (see [`StreamRenderer`] to render many for one stream).
pub fn chat_chunk(
    id: &str,
    created: u64,
    model: &str,
    delta_role: Option<&str>,
    delta_content: Option<&str>,
    finish_reason: Option<&str>,
) -> String {
    StreamRenderer::new(Endpoint::Chat, id, created, model).chunk(
        delta_role,
        delta_content,
        finish_reason,
    )
}

/// One streamed `text_completion` chunk.
pub fn completion_chunk(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish_reason: Option<&str>,
) -> String {
    StreamRenderer::new(Endpoint::Completion, id, created, model).chunk(
        None,
        Some(text),
        finish_reason,
    )
}

/// The usage chunk of a stream on `endpoint`.
pub fn usage_chunk(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    usage: Usage,
) -> String {
    StreamRenderer::new(endpoint, id, created, model).usage_chunk(usage)
}

/// A whole non-streaming response body (`chat.completion` or `text_completion`).
pub fn completion_response(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish_reason: &str,
    usage: Usage,
) -> String {
    let mut out = String::with_capacity(192 + id.len() + model.len() + text.len());
    out.push_str("{\"id\":");
    push_json_str(&mut out, id);
    out.push_str(",\"object\":\"");
    out.push_str(endpoint.response_object());
    let _ = write!(out, "\",\"created\":{created},\"model\":");
    push_json_str(&mut out, model);
    match endpoint {
        Endpoint::Chat => {
            out.push_str(
                ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":",
            );
            push_json_str(&mut out, text);
            out.push_str(",\"refusal\":null},\"logprobs\":null,\"finish_reason\":");
        }
        Endpoint::Completion => {
            out.push_str(",\"choices\":[{\"text\":");
            push_json_str(&mut out, text);
            out.push_str(",\"index\":0,\"logprobs\":null,\"finish_reason\":");
        }
    }
    push_json_str(&mut out, finish_reason);
    out.push_str("}],\"usage\":");
    usage.push_json(&mut out);
    out.push('}');
    out
}

/// A non-streaming `chat.completion` body.
pub fn chat_completion(
    id: &str,
    created: u64,
    model: &str,
    content: &str,
    finish_reason: &str,
    usage: Usage,
) -> String {
    completion_response(
        Endpoint::Chat,
        id,
        created,
        model,
        content,
        finish_reason,
        usage,
    )
}

/// A non-streaming `text_completion` body.
pub fn text_completion(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish_reason: &str,
    usage: Usage,
) -> String {
    completion_response(
        Endpoint::Completion,
        id,
        created,
        model,
        text,
        finish_reason,
        usage,
    )
}

/// Frames one JSON document as an SSE event: `data: <json>\n\n`.
pub fn sse_event(json: &str) -> Bytes {
    let mut out = String::with_capacity(json.len() + 8);
    out.push_str("data: ");
    out.push_str(json);
    out.push_str("\n\n");
    Bytes::from(out)
}

/// `GET /v1/models`: `{"object":"list","data":[{"id","object":"model","created","owned_by"}]}`.
pub fn models_list(models: &[(&str, u64, &str)]) -> String {
    write_models(
        models
            .iter()
            .map(|&(id, created, owned_by)| (id, created, owned_by, None)),
    )
}

/// `GET /v1/models` with availability: every entry also carries `"available"`, false for a model
/// that was served recently but has no node right now (requests for it are 503
/// `model_unavailable` until a node returns).
pub fn models_list_with_availability(models: &[(&str, u64, &str, bool)]) -> String {
    write_models(
        models
            .iter()
            .map(|&(id, created, owned_by, available)| (id, created, owned_by, Some(available))),
    )
}

/// The model list both forms share; `available` is written only when given.
fn write_models<'a>(
    models: impl ExactSizeIterator<Item = (&'a str, u64, &'a str, Option<bool>)>,
) -> String {
    let mut out = String::with_capacity(32 + models.len() * 96);
    out.push_str("{\"object\":\"list\",\"data\":[");
    for (i, (id, created, owned_by, available)) in models.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"id\":");
        push_json_str(&mut out, id);
        let _ = write!(
            out,
            ",\"object\":\"model\",\"created\":{created},\"owned_by\":"
        );
        push_json_str(&mut out, owned_by);
        if let Some(available) = available {
            let _ = write!(out, ",\"available\":{available}");
        }
        out.push('}');
    }
    out.push_str("]}");
    out
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// The error code of [`ApiError::model_unavailable`].
pub const MODEL_UNAVAILABLE: &str = "model_unavailable";

/// An OpenAI-shaped error: the HTTP status plus `{"error":{"message","type","param","code"}}`.
/// The constructors below are the errors Nearpath sends; the official client picks its exception
/// class from the status alone, the body is for people and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// `type`, such as `invalid_request_error`.
    pub error_type: &'static str,
    pub code: Option<Cow<'static, str>>,
    pub param: Option<String>,
    pub message: String,
}

impl From<RequestError> for ApiError {
    fn from(err: RequestError) -> Self {
        Self::invalid_request(err)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.error_type, self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(
        status: u16,
        error_type: &'static str,
        code: Option<&'static str>,
        param: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            error_type,
            code: code.map(Cow::Borrowed),
            param,
            message: message.into(),
        }
    }

    /// 400 for a body that failed validation.
    pub fn invalid_request(err: RequestError) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            Some(err.code),
            err.param,
            err.message,
        )
    }

    /// 400 with a free-form reason (unknown path parameters, unsupported content type).
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            None,
            param.map(str::to_owned),
            message,
        )
    }

    /// 401: no `Authorization: Bearer` header was sent.
    pub fn missing_api_key() -> Self {
        Self::new(
            401,
            "authentication_error",
            Some("missing_api_key"),
            None,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
        )
    }

    /// 401: the key is not one we know (never echo the key itself).
    pub fn invalid_api_key() -> Self {
        Self::new(
            401,
            "authentication_error",
            Some("invalid_api_key"),
            None,
            "Incorrect API key provided.",
        )
    }

    /// 401: the key was revoked while the request ran; sent in band on a stream that already
    /// started (code `key_revoked`).
    pub fn key_revoked() -> Self {
        Self::new(
            401,
            "authentication_error",
            Some("key_revoked"),
            None,
            "The API key was revoked; the request was ended.",
        )
    }

    /// 403: the geofence denied the request; the message names the rule and the reason. Send
    /// with `x-should-retry: false` (see [`ApiError::should_retry`]).
    pub fn geofence_denied(rule: &str, reason: &str) -> Self {
        Self::new(
            403,
            "permission_denied",
            Some("geofence"),
            None,
            format!("Request denied by geofence rule '{rule}': {reason}"),
        )
    }

    /// 404: no model of that name is served.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            Some("model".to_owned()),
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
    }

    /// 503: the model was served recently but no node serves it now (a node blip or restart);
    /// retryable, sent with `Retry-After` and `x-should-retry: true` (code `model_unavailable`).
    pub fn model_unavailable(model: &str) -> Self {
        Self::new(
            503,
            "server_error",
            Some(MODEL_UNAVAILABLE),
            Some("model".to_owned()),
            format!(
                "The model `{model}` is temporarily unavailable: no node serves it right now. \
                 Please retry."
            ),
        )
    }

    /// 404 for an unknown path.
    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("not_found"),
            None,
            format!("Unknown request URL: {path}."),
        )
    }

    /// 405 for a known path used with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            Some("method_not_allowed"),
            None,
            format!("Method {method} is not allowed on {path}."),
        )
    }

    /// 413: the body is over the limit.
    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            Some("request_too_large"),
            None,
            format!("The request body is larger than the limit of {limit_bytes} bytes."),
        )
    }

    /// 429: too many requests or all capacity busy; send with `Retry-After`.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(
            429,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
            None,
            message,
        )
    }

    /// 500: a fault of ours.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", Some("internal_error"), None, message)
    }

    /// 502: the inference backend failed.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "server_error", Some("upstream_error"), None, message)
    }

    /// 503: no node can serve this model for this client right now.
    pub fn no_eligible_node(model: &str) -> Self {
        Self::new(
            503,
            "server_error",
            Some("no_eligible_node"),
            None,
            format!("No node is available to serve the model `{model}` right now. Please retry."),
        )
    }

    /// 503 with a free-form reason (draining, shutting down).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "server_error", Some("unavailable"), None, message)
    }

    /// 504: the backend did not answer in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, "server_error", Some("timeout"), None, message)
    }

    /// The value for `x-should-retry`: false for errors that repeat identically (validation,
    /// auth, geofence, unknown model), true for transient ones.
    pub fn should_retry(&self) -> bool {
        matches!(self.status, 408 | 409 | 429) || self.status >= 500
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        let mut out = String::with_capacity(96 + self.message.len());
        out.push_str("{\"error\":{\"message\":");
        push_json_str(&mut out, &self.message);
        out.push_str(",\"type\":");
        push_json_str(&mut out, self.error_type);
        out.push_str(",\"param\":");
        push_opt_str(&mut out, self.param.as_deref());
        out.push_str(",\"code\":");
        push_opt_str(&mut out, self.code.as_deref());
        out.push_str("}}");
        out
    }

    /// The in-band SSE event for an error after the stream started.
    pub fn sse_event(&self) -> Bytes {
        sse_event(&self.body())
    }
}

/// `{"error":{...}}` for `err` (same as [`ApiError::body`]).
pub fn error_body(err: &ApiError) -> String {
    err.body()
}

// ---------------------------------------------------------------------------------------------
// Reading streams (client side)
// ---------------------------------------------------------------------------------------------

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, when present.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Why an SSE stream could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("SSE event larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("SSE stream is not valid UTF-8")]
    InvalidUtf8,
}

/// An incremental Server-Sent Events parser (the WHATWG algorithm, for `data` and `event`):
/// lines end with LF, CRLF or CR (also when split across pushes); lines starting with `:` are
/// comments (keep-alives); several `data:` lines make one multi-line event; an event is
/// dispatched at a blank line and only if it has data. Memory is bounded by `max_event_bytes`.
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    event: Option<String>,
    /// The previous push ended with CR, so a leading LF belongs to that line ending.
    skip_lf: bool,
    ready: VecDeque<SseEvent>,
    max_event_bytes: usize,
}

impl SseParser {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            event: None,
            skip_lf: false,
            ready: VecDeque::new(),
            max_event_bytes,
        }
    }

    /// Feeds bytes; complete events become available from [`SseParser::next_event`].
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), SseError> {
        if self.skip_lf {
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
            if !chunk.is_empty() {
                self.skip_lf = false;
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (line, rest) = chunk.split_at(end);
            let mut rest = &rest[1..];
            if chunk[end] == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
            if self.line.is_empty() {
                self.process_line(line)?;
            } else {
                self.check_size(line.len())?;
                let mut whole = std::mem::take(&mut self.line);
                whole.extend_from_slice(line);
                self.process_line(&whole)?;
            }
            chunk = rest;
        }
        if !chunk.is_empty() {
            self.check_size(chunk.len())?;
            self.line.extend_from_slice(chunk);
        }
        Ok(())
    }

    fn check_size(&self, extra: usize) -> Result<(), SseError> {
        if self.line.len() + self.data.len() + extra > self.max_event_bytes {
            return Err(SseError::TooLarge {
                limit: self.max_event_bytes,
            });
        }
        Ok(())
    }

    fn process_line(&mut self, line: &[u8]) -> Result<(), SseError> {
        if line.is_empty() {
            if self.has_data {
                self.ready.push_back(SseEvent {
                    event: self.event.take(),
                    data: std::mem::take(&mut self.data),
                });
                self.has_data = false;
            } else {
                self.event = None;
            }
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                self.check_size(value.len() + 1)?;
                let value = std::str::from_utf8(value).map_err(|_| SseError::InvalidUtf8)?;
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            b"event" => {
                let value = std::str::from_utf8(value).map_err(|_| SseError::InvalidUtf8)?;
                self.event = Some(value.to_owned());
            }
            // `id` and `retry` matter only to reconnecting browsers; unknown fields are ignored.
            _ => {}
        }
        Ok(())
    }

    /// The next complete event, if any.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }
}

/// What one streamed `data:` payload said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamChunk {
    /// `[DONE]`.
    Done,
    /// A chunk: text of choice 0 (chat `delta.content` or completions `text`), its finish
    /// reason, and usage when present.
    Chunk {
        text: Option<String>,
        finish_reason: Option<String>,
        usage: Option<Usage>,
    },
    /// An in-band `{"error":{...}}` event.
    Error {
        message: String,
        error_type: Option<String>,
        code: Option<String>,
    },
}

/// Why a streamed payload could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stream chunk: {reason}")]
pub struct ChunkError {
    pub reason: String,
}

#[derive(Deserialize)]
struct RawChunk {
    #[serde(default)]
    choices: Vec<RawChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct RawChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<RawDelta>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct RawDelta {
    #[serde(default)]
    content: Option<String>,
}

/// Reads one `data:` payload of an OpenAI-compatible stream (chat or completions). Servers differ
/// in the details (vLLM puts `code` as a number, some servers omit `logprobs`), so only the fields
/// a relay needs are read and unknown fields are ignored.
pub fn parse_stream_chunk(data: &str) -> Result<StreamChunk, ChunkError> {
    if data.trim() == "[DONE]" {
        return Ok(StreamChunk::Done);
    }
    let raw: RawChunk = serde_json::from_str(data).map_err(|e| ChunkError {
        reason: e.to_string(),
    })?;
    if let Some(error) = raw.error {
        return Ok(error_chunk(&error));
    }
    let mut text = None;
    let mut finish_reason = None;
    if let Some(choice) = raw.choices.into_iter().find(|c| c.index == 0) {
        text = choice.delta.and_then(|d| d.content).or(choice.text);
        finish_reason = choice.finish_reason;
    }
    Ok(StreamChunk::Chunk {
        text,
        finish_reason,
        usage: raw.usage,
    })
}

/// Reads the message of an error body in OpenAI's shape (`{"error":{"message":…}}`), vLLM's
/// older shape (`{"object":"error","message":…}`) or Ollama's (`{"error":"…"}`).
pub fn error_message_of(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    match value.get("error") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(e)) => e.get("message").and_then(Value::as_str).map(str::to_owned),
        _ => value
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}

fn error_chunk(error: &Value) -> StreamChunk {
    let (message, error_type, code) = match error {
        Value::String(s) => (s.clone(), None, None),
        Value::Object(e) => (
            e.get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream reported an error without a message")
                .to_owned(),
            e.get("type").and_then(Value::as_str).map(str::to_owned),
            match e.get("code") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            },
        ),
        other => (other.to_string(), None, None),
    };
    StreamChunk::Error {
        message,
        error_type,
        code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(endpoint: Endpoint, v: Value) -> Result<InferenceRequest, RequestError> {
        InferenceRequest::parse(endpoint, v.to_string().as_bytes())
    }

    fn chat_ok(v: Value) -> InferenceRequest {
        match parse(Endpoint::Chat, v) {
            Ok(r) => r,
            Err(e) => panic!("expected a valid request, got {e:?}"),
        }
    }

    fn chat_err(v: Value) -> RequestError {
        match parse(Endpoint::Chat, v) {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_a_full_chat_request() {
        let req = chat_ok(json!({
            "model": "llama-3-8b",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Hello"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    {"type": "text", "text": "there"}
                ], "name": "ann"},
                {"role": "assistant", "content": null, "tool_calls": []},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "developer", "content": "x"}
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 100,
            "max_completion_tokens": 20,
            "stop": ["\n", "END"],
            "temperature": 0.5,
            "n": 1,
            "user": "u-1",
            "seed": -7,
            "top_p": 0.9
        }));
        assert_eq!(req.endpoint, Endpoint::Chat);
        assert_eq!(req.model, "llama-3-8b");
        assert!(req.stream);
        assert!(req.include_usage);
        assert_eq!(req.max_tokens, Some(20), "max_completion_tokens wins");
        assert_eq!(req.stop, vec!["\n".to_owned(), "END".to_owned()]);
        assert_eq!(req.temperature, Some(0.5));
        assert_eq!(req.user.as_deref(), Some("u-1"));
        assert_eq!(req.seed, Some(-7));
        let m = req.messages();
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].role, Role::System);
        assert_eq!(m[1].content, "Hello\nthere");
        assert_eq!(m[1].name.as_deref(), Some("ann"));
        assert_eq!(m[2].role, Role::Assistant);
        assert_eq!(m[2].content, "");
        assert_eq!(m[3].role, Role::Tool);
        assert_eq!(m[4].role, Role::Developer);
        assert_eq!(
            req.raw.get("top_p"),
            Some(&json!(0.9)),
            "unknown fields are kept"
        );
        let texts: Vec<&str> = req.input_texts().collect();
        assert_eq!(texts, ["Be brief.", "Hello\nthere", "", "42", "x"]);
    }

    #[test]
    fn defaults_and_nulls() {
        let req = chat_ok(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "stream": null, "temperature": null, "stop": null, "n": null, "max_tokens": null
        }));
        assert!(!req.stream);
        assert!(!req.include_usage);
        assert_eq!(req.max_tokens, None);
        assert!(req.stop.is_empty());
        assert_eq!(req.temperature, None);
        let req = chat_ok(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "###",
            "max_tokens": 16.0
        }));
        assert_eq!(req.stop, vec!["###".to_owned()]);
        assert_eq!(req.max_tokens, Some(16));
    }

    #[test]
    fn parses_completions() {
        let req = match parse(
            Endpoint::Completion,
            json!({"model": "m", "prompt": ["Once upon"], "max_tokens": 0}),
        ) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(req.prompt(), Some("Once upon"));
        assert_eq!(req.max_tokens, Some(0));
        assert!(req.messages().is_empty());
        let err = parse(
            Endpoint::Completion,
            json!({"model": "m", "prompt": ["a", "b"]}),
        );
        assert_eq!(
            err.map_err(|e| (e.param, e.code)),
            Err((Some("prompt".into()), "unsupported_value"))
        );
        let err = parse(
            Endpoint::Completion,
            json!({"model": "m", "prompt": [1, 2, 3]}),
        );
        assert_eq!(err.map_err(|e| e.code), Err("unsupported_value"));
        let err = parse(Endpoint::Completion, json!({"model": "m"}));
        assert_eq!(
            err.map_err(|e| (e.param, e.code)),
            Err((Some("prompt".into()), "missing_required_parameter"))
        );
    }

    #[test]
    fn overlong_model_names_are_refused_naming_the_field() {
        let user = json!({"role": "user", "content": "hi"});
        let at_limit = "m".repeat(MAX_MODEL_NAME_BYTES);
        assert!(parse(
            Endpoint::Chat,
            json!({"model": at_limit, "messages": [user]})
        )
        .is_ok());
        let long = "m".repeat(MAX_MODEL_NAME_BYTES + 1);
        let err = parse(Endpoint::Chat, json!({"model": long, "messages": [user]})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("model"));
        assert_eq!(err.code, "invalid_value");
        assert!(err.message.contains("too long"), "{}", err.message);
    }

    #[test]
    fn rejects_with_the_offending_param() {
        let user = json!({"role": "user", "content": "hi"});
        let cases: Vec<(Value, &str, &str)> = vec![
            (
                json!({"messages": [user]}),
                "model",
                "missing_required_parameter",
            ),
            (
                json!({"model": 3, "messages": [user]}),
                "model",
                "invalid_type",
            ),
            (
                json!({"model": "m"}),
                "messages",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": []}),
                "messages",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": "hi"}),
                "messages",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [user, 5]}),
                "messages[1]",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [user, {"content": "x"}]}),
                "messages[1].role",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": [user, {"role": "robot", "content": "x"}]}),
                "messages[1].role",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [user, {"role": "user"}]}),
                "messages[1].content",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": [user, {"role": "user", "content": 7}]}),
                "messages[1].content",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
                "messages[0].content[0].text",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"text": "a"}]}]}),
                "messages[0].content[0].type",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": ["a"]}]}),
                "messages[0].content[0]",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [user], "temperature": 2.5}),
                "temperature",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [user], "temperature": -0.1}),
                "temperature",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [user], "temperature": "hot"}),
                "temperature",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [user], "n": 2}),
                "n",
                "unsupported_value",
            ),
            (
                json!({"model": "m", "messages": [user], "n": 0}),
                "n",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [user], "max_tokens": 0}),
                "max_tokens",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [user], "max_tokens": -5}),
                "max_tokens",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [user], "max_tokens": 1.5}),
                "max_tokens",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [user], "max_tokens": 5_000_000_000u64}),
                "max_tokens",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [user], "stop": ["a","b","c","d","e"]}),
                "stop",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [user], "stop": ["a", 1]}),
                "stop[1]",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [user], "stream": "yes"}),
                "stream",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [user], "stream_options": {"include_usage": true}}),
                "stream_options",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [user], "stream": true, "stream_options": {"include_usage": 1}}),
                "stream_options.include_usage",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [user], "user": 5}),
                "user",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [user], "seed": "x"}),
                "seed",
                "invalid_type",
            ),
        ];
        for (body, param, code) in cases {
            let err = chat_err(body.clone());
            assert_eq!(err.param.as_deref(), Some(param), "param for {body}");
            assert_eq!(err.code, code, "code for {body}: {}", err.message);
            assert!(
                err.message.contains(param),
                "message names {param}: {}",
                err.message
            );
        }
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let err = InferenceRequest::parse(Endpoint::Chat, b"{\n  \"model\": \"m\",\n  oops\n}");
        let err = err.err().map(|e| (e.code, e.param, e.message));
        let Some((code, param, message)) = err else {
            panic!("malformed JSON accepted")
        };
        assert_eq!(code, "invalid_json");
        assert_eq!(param, None);
        assert!(message.contains("line 3 column 3"), "{message}");
        let err = InferenceRequest::parse(Endpoint::Chat, b"[1]").err();
        assert_eq!(err.map(|e| e.code), Some("invalid_type"));
    }

    #[test]
    fn upstream_body_replaces_model_and_forces_streaming_usage() {
        let req = chat_ok(json!({
            "model": "public-name", "messages": [{"role": "user", "content": "hi"}],
            "stream": false, "top_p": 0.5, "tools": [{"type": "function"}]
        }));
        let body: Value = match serde_json::from_slice(&req.upstream_body("org/Model-8B")) {
            Ok(v) => v,
            Err(e) => panic!("upstream body is not JSON: {e}"),
        };
        assert_eq!(
            body,
            json!({
                "model": "org/Model-8B", "messages": [{"role": "user", "content": "hi"}],
                "stream": true, "stream_options": {"include_usage": true}, "top_p": 0.5,
                "tools": [{"type": "function"}]
            })
        );
        let req = chat_ok(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
            "stream_options": {"include_usage": false, "continuous_usage_stats": true}
        }));
        let body: Value = serde_json::from_slice(&req.upstream_body("\"q\"")).unwrap_or_default();
        assert_eq!(body["model"], json!("\"q\""));
        assert_eq!(
            body["stream_options"],
            json!({"continuous_usage_stats": true, "include_usage": true})
        );
    }

    /// Found by the `openai_request` fuzz target (crash-0e080b2d): serde_json's default float
    /// parser is not correctly rounded, so a large number in a client's body was read one ulp
    /// off and forwarded upstream as a different number than the client sent.
    #[test]
    fn forwarded_body_keeps_numbers_exact() {
        let body = br#"{"model":"sim","prompt":["Once upon"],"max_tokens":0,"stop":"\u2028","eetmpraturepera":12222222222222222222222222222222222222222222222222222222222222222}"#;
        let req = match InferenceRequest::parse(Endpoint::Completion, body) {
            Ok(req) => req,
            Err(e) => panic!("{e}"),
        };
        let upstream = req.upstream_body("m");
        let forwarded = match InferenceRequest::parse(Endpoint::Completion, &upstream) {
            Ok(req) => req,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(forwarded.raw["eetmpraturepera"], req.raw["eetmpraturepera"]);
        // The value the client wrote, correctly rounded.
        assert_eq!(
            req.raw["eetmpraturepera"].as_f64(),
            Some(12222222222222222222222222222222222222222222222222222222222222222.0)
        );
    }

    #[test]
    fn chat_chunk_exact() {
        assert_eq!(
            chat_chunk(
                "chatcmpl-1",
                1700000000,
                "m\"x",
                Some("assistant"),
                Some(""),
                None
            ),
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m\"x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#
        );
        assert_eq!(
            chat_chunk("c", 5, "m", None, Some(" hi\n\"there\""), None),
            r#"{"id":"c","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"content":" hi\n\"there\""},"logprobs":null,"finish_reason":null}]}"#
        );
        assert_eq!(
            chat_chunk("c", 5, "m", None, None, Some("stop")),
            r#"{"id":"c","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#
        );
        assert_eq!(
            usage_chunk(
                Endpoint::Chat,
                "c",
                5,
                "m",
                Usage {
                    prompt_tokens: 7,
                    completion_tokens: 3
                }
            ),
            r#"{"id":"c","object":"chat.completion.chunk","created":5,"model":"m","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#
        );
    }

    #[test]
    fn completion_chunk_exact() {
        assert_eq!(
            completion_chunk("cmpl-9", 6, "m", " word", None),
            r#"{"id":"cmpl-9","object":"text_completion","created":6,"model":"m","choices":[{"text":" word","index":0,"logprobs":null,"finish_reason":null}]}"#
        );
        assert_eq!(
            completion_chunk("cmpl-9", 6, "m", "", Some("length")),
            r#"{"id":"cmpl-9","object":"text_completion","created":6,"model":"m","choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}]}"#
        );
        assert_eq!(
            usage_chunk(
                Endpoint::Completion,
                "cmpl-9",
                6,
                "m",
                Usage {
                    prompt_tokens: 1,
                    completion_tokens: 2
                }
            ),
            r#"{"id":"cmpl-9","object":"text_completion","created":6,"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#
        );
    }

    #[test]
    fn renderer_events_are_sse_framed() {
        let r = StreamRenderer::new(Endpoint::Chat, "c", 1, "m");
        assert_eq!(
            r.token_event("a\tb"),
            Bytes::from(r#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"a\tb"},"logprobs":null,"finish_reason":null}]}"#.to_owned() + "\n\n")
        );
        assert_eq!(
            r.role_event(),
            Some(sse_event(&chat_chunk(
                "c",
                1,
                "m",
                Some("assistant"),
                Some(""),
                None
            )))
        );
        assert_eq!(
            r.finish_event("length"),
            sse_event(&chat_chunk("c", 1, "m", None, None, Some("length")))
        );
        let u = Usage {
            prompt_tokens: 2,
            completion_tokens: 2,
        };
        assert_eq!(
            r.usage_event(u),
            sse_event(&usage_chunk(Endpoint::Chat, "c", 1, "m", u))
        );
        let r = StreamRenderer::new(Endpoint::Completion, "c", 1, "m");
        assert_eq!(r.role_event(), None);
        assert_eq!(sse_event("{}"), Bytes::from_static(b"data: {}\n\n"));
        assert_eq!(SSE_DONE, "data: [DONE]\n\n");
    }

    #[test]
    fn non_streaming_bodies_exact() {
        let usage = Usage {
            prompt_tokens: 4,
            completion_tokens: 2,
        };
        assert_eq!(
            chat_completion("chatcmpl-2", 9, "m", " a b", "length", usage),
            r#"{"id":"chatcmpl-2","object":"chat.completion","created":9,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":" a b","refusal":null},"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#
        );
        assert_eq!(
            text_completion("cmpl-2", 9, "m", " a", "stop", usage),
            r#"{"id":"cmpl-2","object":"text_completion","created":9,"model":"m","choices":[{"text":" a","index":0,"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#
        );
    }

    #[test]
    fn models_list_exact() {
        assert_eq!(models_list(&[]), r#"{"object":"list","data":[]}"#);
        assert_eq!(
            models_list(&[("a", 1, "nearpath"), ("b/c", 2, "op")]),
            r#"{"object":"list","data":[{"id":"a","object":"model","created":1,"owned_by":"nearpath"},{"id":"b/c","object":"model","created":2,"owned_by":"op"}]}"#
        );
    }

    #[test]
    fn models_list_with_availability_exact() {
        assert_eq!(
            models_list_with_availability(&[
                ("a", 1, "nearpath", true),
                ("b", 2, "nearpath", false)
            ]),
            r#"{"object":"list","data":[{"id":"a","object":"model","created":1,"owned_by":"nearpath","available":true},{"id":"b","object":"model","created":2,"owned_by":"nearpath","available":false}]}"#
        );
    }

    #[test]
    fn a_model_unavailable_error_is_a_retryable_503() {
        let e = ApiError::model_unavailable("m");
        assert_eq!((e.status, e.should_retry()), (503, true));
        assert_eq!(e.code.as_deref(), Some(MODEL_UNAVAILABLE));
        assert!(e
            .body()
            .contains(r#""type":"server_error","param":"model","code":"model_unavailable""#));
    }

    #[test]
    fn error_bodies_exact() {
        let e = ApiError::invalid_request(RequestError::missing("messages"));
        assert_eq!(e.status, 400);
        assert_eq!(
            e.body(),
            r#"{"error":{"message":"Missing required parameter: 'messages'.","type":"invalid_request_error","param":"messages","code":"missing_required_parameter"}}"#
        );
        assert!(!e.should_retry());
        let e = ApiError::geofence_denied("ofac_clients", "client country IR is in @ofac");
        assert_eq!((e.status, e.should_retry()), (403, false));
        assert_eq!(
            e.body(),
            r#"{"error":{"message":"Request denied by geofence rule 'ofac_clients': client country IR is in @ofac","type":"permission_denied","param":null,"code":"geofence"}}"#
        );
        let e = ApiError::model_not_found("gpt-9");
        assert_eq!(
            e.body(),
            r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#
        );
        let statuses: Vec<(u16, bool)> = [
            ApiError::missing_api_key(),
            ApiError::invalid_api_key(),
            ApiError::payload_too_large(10),
            ApiError::rate_limited("slow down"),
            ApiError::internal("bug"),
            ApiError::no_eligible_node("m"),
            ApiError::timeout("late"),
        ]
        .iter()
        .map(|e| (e.status, e.should_retry()))
        .collect();
        assert_eq!(
            statuses,
            [
                (401, false),
                (401, false),
                (413, false),
                (429, true),
                (500, true),
                (503, true),
                (504, true)
            ]
        );
        assert_eq!(
            ApiError::invalid_api_key().body(),
            r#"{"error":{"message":"Incorrect API key provided.","type":"authentication_error","param":null,"code":"invalid_api_key"}}"#
        );
        assert_eq!(
            ApiError::timeout("late").sse_event(),
            Bytes::from(format!("data: {}\n\n", ApiError::timeout("late").body()))
        );
    }

    fn collect(parser: &mut SseParser) -> Vec<SseEvent> {
        std::iter::from_fn(|| parser.next_event()).collect()
    }

    #[test]
    fn sse_parser_handles_comments_multiline_crlf_and_splits() {
        let stream = b": keep-alive\r\n\r\ndata: {\"a\":1}\r\n\r\nevent: x\ndata: line1\ndata:line2\n\ndata: [DONE]\r\r";
        let expected = vec![
            SseEvent {
                event: None,
                data: "{\"a\":1}".into(),
            },
            SseEvent {
                event: Some("x".into()),
                data: "line1\nline2".into(),
            },
            SseEvent {
                event: None,
                data: "[DONE]".into(),
            },
        ];
        // Every split point, including between CR and LF, gives the same events.
        for split in 0..=stream.len() {
            let mut p = SseParser::new(1024);
            let (a, b) = stream.split_at(split);
            assert_eq!(p.push(a), Ok(()));
            assert_eq!(p.push(b), Ok(()));
            assert_eq!(collect(&mut p), expected, "split at {split}");
        }
        // Byte by byte too.
        let mut p = SseParser::new(1024);
        for b in stream {
            assert_eq!(p.push(std::slice::from_ref(b)), Ok(()));
        }
        assert_eq!(collect(&mut p), expected);
        // An unterminated event is not dispatched.
        let mut p = SseParser::new(1024);
        assert_eq!(p.push(b"data: partial"), Ok(()));
        assert_eq!(p.next_event(), None);
    }

    #[test]
    fn sse_parser_bounds_memory_and_checks_utf8() {
        let mut p = SseParser::new(16);
        assert_eq!(p.push(b"data: 0123456789"), Ok(()));
        assert_eq!(p.push(b"0123456789"), Err(SseError::TooLarge { limit: 16 }));
        let mut p = SseParser::new(16);
        assert_eq!(
            p.push(b"data: 0123\ndata: 456789abcdef\n"),
            Err(SseError::TooLarge { limit: 16 })
        );
        let mut p = SseParser::new(64);
        assert_eq!(p.push(b"data: \xff\n\n"), Err(SseError::InvalidUtf8));
    }

    #[test]
    fn parses_stream_chunks_from_various_servers() {
        assert_eq!(parse_stream_chunk("[DONE]"), Ok(StreamChunk::Done));
        let chat = chat_chunk("c", 1, "m", None, Some(" hi"), None);
        assert_eq!(
            parse_stream_chunk(&chat),
            Ok(StreamChunk::Chunk {
                text: Some(" hi".into()),
                finish_reason: None,
                usage: None
            })
        );
        let comp = completion_chunk("c", 1, "m", " yo", Some("length"));
        assert_eq!(
            parse_stream_chunk(&comp),
            Ok(StreamChunk::Chunk {
                text: Some(" yo".into()),
                finish_reason: Some("length".into()),
                usage: None
            })
        );
        let usage = r#"{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":null}}"#;
        assert_eq!(
            parse_stream_chunk(usage),
            Ok(StreamChunk::Chunk {
                text: None,
                finish_reason: None,
                usage: Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 4
                })
            })
        );
        let vllm_err = r#"{"error":{"object":"error","message":"boom","type":"BadRequestError","param":null,"code":400}}"#;
        assert_eq!(
            parse_stream_chunk(vllm_err),
            Ok(StreamChunk::Error {
                message: "boom".into(),
                error_type: Some("BadRequestError".into()),
                code: Some("400".into())
            })
        );
        assert!(parse_stream_chunk("{not json").is_err());
        assert_eq!(
            error_message_of(br#"{"error":{"message":"no such model"}}"#).as_deref(),
            Some("no such model")
        );
        assert_eq!(
            error_message_of(br#"{"object":"error","message":"old vllm"}"#).as_deref(),
            Some("old vllm")
        );
        assert_eq!(
            error_message_of(br#"{"error":"ollama"}"#).as_deref(),
            Some("ollama")
        );
        assert_eq!(error_message_of(b"<html>"), None);
    }

    #[test]
    fn endpoint_paths() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Some(Endpoint::Chat)
        );
        assert_eq!(
            Endpoint::from_path("/v1/completions/"),
            Some(Endpoint::Completion)
        );
        assert_eq!(Endpoint::from_path("/v1/models"), None);
        assert_eq!(Endpoint::Chat.path(), "/v1/chat/completions");
    }

    proptest! {
        #[test]
        fn json_escaping_matches_serde_json(s in any::<String>()) {
            let mut ours = String::new();
            push_json_str(&mut ours, &s);
            prop_assert_eq!(Some(ours), serde_json::to_string(&s).ok());
        }

        #[test]
        fn rendered_chunks_round_trip(text in any::<String>(), model in any::<String>()) {
            let json = chat_chunk("id", 1, &model, None, Some(&text), None);
            let v: Value = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&v["model"], &json!(model));
            prop_assert_eq!(parse_stream_chunk(&json), Ok(StreamChunk::Chunk { text: Some(text), finish_reason: None, usage: None }));
        }

        #[test]
        fn request_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = InferenceRequest::parse(Endpoint::Chat, &body);
        }
    }
}
