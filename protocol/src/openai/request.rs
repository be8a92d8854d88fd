//! Parsing and validation of OpenAI chat and completions request bodies.
//!
//! These are HTTP API shapes that apps send to the gateway (and that the edge node accepts on its
//! own OpenAI-compatible endpoint), not the node protocol: nothing here goes over QUIC as is.

use serde_json::{Map, Value};

use super::render::push_json_str_bytes;

/// The most stop sequences a request may carry (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;

/// The longest model name a request may carry, in bytes. Real names (`org/model-size-variant`)
/// are far shorter; a longer one is a 400 naming `model`, so that it never reaches logs,
/// routing or metrics.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// Which OpenAI endpoint a request was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    #[default]
    Chat,
    /// `POST /v1/completions` (legacy text completions).
    Completion,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses` (the Responses API).
    Responses,
}

impl Endpoint {
    /// The full request path, including the `/v1` prefix.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completion => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
        }
    }

    /// The path below an API base URL that already ends in `/v1`.
    pub fn sub_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completion => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
        }
    }

    /// Maps a request path (without query) to an endpoint; a trailing slash is tolerated.
    pub fn from_path(path: &str) -> Option<Self> {
        match path.strip_suffix('/').unwrap_or(path) {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completion),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            "/v1/responses" => Some(Endpoint::Responses),
            _ => None,
        }
    }

    /// The `object` of a streamed chunk on this endpoint (embeddings stream nothing: their
    /// pieces are `embedding` objects; Responses events carry a `type` instead).
    pub fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
            Endpoint::Embeddings => "embedding",
            Endpoint::Responses => "response",
        }
    }

    /// The `object` of a non-streaming response on this endpoint.
    pub fn response_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
            Endpoint::Embeddings => "list",
            Endpoint::Responses => "response",
        }
    }

    /// The prefix OpenAI uses for response ids on this endpoint (`chatcmpl-`, `cmpl-`).
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
            Endpoint::Embeddings => "emb-",
            Endpoint::Responses => "resp_",
        }
    }

    /// The wire byte of the endpoint in `Open` and `InferRequest` (PROTOCOL.md).
    pub fn to_byte(self) -> u8 {
        match self {
            Endpoint::Chat => 0,
            Endpoint::Completion => 1,
            Endpoint::Embeddings => 2,
            Endpoint::Responses => 3,
        }
    }

    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        [
            Endpoint::Chat,
            Endpoint::Completion,
            Endpoint::Embeddings,
            Endpoint::Responses,
        ]
        .into_iter()
        .find(|e| e.to_byte() == b)
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

/// The most inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// One input of an embeddings request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    Text(String),
    /// Token ids of the model's tokeniser.
    Tokens(Vec<u32>),
}

/// What the model is asked to continue (or, for embeddings, to embed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Chat endpoint: the conversation so far (never empty).
    Messages(Vec<ChatMessage>),
    /// Completions endpoint: one prompt string.
    Prompt(String),
    /// Embeddings endpoint: 1..=[`MAX_EMBEDDING_INPUTS`] inputs, none empty.
    Embed(Vec<EmbedInput>),
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
    /// The request's `x-request-id`, passed on to an upstream server as that header (not part
    /// of the body; `None` from parsing, set by whoever knows it).
    pub request_id: Option<String>,
    /// The W3C `traceparent` passed on to an upstream server (not part of the body; `None` from
    /// parsing).
    pub traceparent: Option<String>,
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

    pub(crate) fn missing(param: &str) -> Self {
        Self::new(
            Some(param.to_owned()),
            "missing_required_parameter",
            format!("Missing required parameter: '{param}'."),
        )
    }

    pub(super) fn invalid_type(param: &str, expected: &str, got: &Value) -> Self {
        Self::new(
            Some(param.to_owned()),
            "invalid_type",
            format!(
                "Invalid type for '{param}': expected {expected}, but got {} instead.",
                type_name(got)
            ),
        )
    }

    pub(super) fn invalid_value(param: &str, message: String) -> Self {
        Self::new(Some(param.to_owned()), "invalid_value", message)
    }

    pub(super) fn unsupported(param: &str, message: String) -> Self {
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
pub(super) fn field<'a>(raw: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    get(raw, key).filter(|v| !v.is_null())
}

/// `map.get(key)`, by a scan when the map is small. Request objects have a handful of keys, and
/// comparing a few short strings costs a fraction of hashing the key with the map's SipHash,
/// which the parser would otherwise do some thirty times per request.
pub(super) fn get<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    const SCAN_UP_TO: usize = 8;
    if map.len() <= SCAN_UP_TO {
        map.iter().find(|(k, _)| k.as_str() == key).map(|(_, v)| v)
    } else {
        map.get(key)
    }
}

pub(super) fn opt_bool(
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
                let kind = match get(part, "type") {
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
                    match get(part, "text") {
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
        let role = match get(msg, "role") {
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
        let content = match get(msg, "content") {
            // An assistant turn that only called tools has no content.
            None | Some(Value::Null) if role == Role::Assistant => String::new(),
            None | Some(Value::Null) => return Err(RequestError::missing(&content_param)),
            Some(content) => text_of_content(content, &content_param)?,
        };
        let name = match get(msg, "name") {
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

fn parse_embed_input(raw: &Map<String, Value>) -> Result<Vec<EmbedInput>, RequestError> {
    const EXPECTED: &str =
        "a string, an array of strings, an array of token ids or an array of token-id arrays";
    let tokens = |items: &[Value], param: &str| -> Result<Vec<u32>, RequestError> {
        if items.is_empty() {
            return Err(RequestError::invalid_value(
                param,
                format!("Invalid '{param}': empty token array."),
            ));
        }
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| RequestError::invalid_type(param, "a token id", v))
            })
            .collect()
    };
    let text = |s: &str, param: &str| -> Result<EmbedInput, RequestError> {
        if s.is_empty() {
            return Err(RequestError::invalid_value(
                param,
                format!("Invalid '{param}': empty string."),
            ));
        }
        Ok(EmbedInput::Text(s.to_owned()))
    };
    let inputs = match field(raw, "input") {
        None => return Err(RequestError::missing("input")),
        Some(Value::String(s)) => vec![text(s, "input")?],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(RequestError::invalid_value(
                "input",
                "Invalid 'input': empty array.".into(),
            ))
        }
        Some(Value::Array(items)) if items.len() > MAX_EMBEDDING_INPUTS => {
            return Err(RequestError::invalid_value(
                "input",
                format!(
                    "Invalid 'input': array too long. Expected at most {MAX_EMBEDDING_INPUTS} \
                     inputs, but got {} instead.",
                    items.len()
                ),
            ))
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![EmbedInput::Tokens(tokens(items, "input")?)]
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let param = format!("input[{i}]");
                match v {
                    Value::String(s) => text(s, &param),
                    Value::Array(t) => Ok(EmbedInput::Tokens(tokens(t, &param)?)),
                    other => Err(RequestError::invalid_type(&param, EXPECTED, other)),
                }
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(RequestError::invalid_type("input", EXPECTED, other)),
    };
    match field(raw, "encoding_format") {
        None => {}
        Some(Value::String(f)) if f == "float" || f == "base64" => {}
        Some(other) => {
            return Err(RequestError::invalid_value(
                "encoding_format",
                format!("Invalid 'encoding_format': {other}. Expected 'float' or 'base64'."),
            ))
        }
    }
    if let Some(d) = opt_u32(raw, "dimensions", 1)? {
        // Checked here only for range; whether the model can shorten is its backend's call.
        let _ = d;
    }
    Ok(inputs)
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
            Endpoint::Embeddings => Input::Embed(parse_embed_input(&raw)?),
            Endpoint::Responses => Input::Messages(super::responses::parse_request(&raw)?),
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
            Endpoint::Completion => 0,
            Endpoint::Chat | Endpoint::Embeddings | Endpoint::Responses => 1,
        };
        let max_tokens = match endpoint {
            Endpoint::Chat => match opt_u32(&raw, "max_completion_tokens", min_tokens)? {
                Some(n) => Some(n),
                None => opt_u32(&raw, "max_tokens", min_tokens)?,
            },
            Endpoint::Completion => opt_u32(&raw, "max_tokens", min_tokens)?,
            Endpoint::Responses => opt_u32(&raw, "max_output_tokens", min_tokens)?,
            Endpoint::Embeddings => None,
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
        // `n`, tools, `response_format`, logprobs: shapes checked here, needs in `features`.
        super::features::validate(endpoint, &raw)?;
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
        let request = Self {
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
            request_id: None,
            traceparent: None,
        };
        // A Responses request is served as the chat request it translates to, and fields the
        // gateway does not interpret pass through into it. Whatever the chat rules refuse in that
        // translation is the client's mistake: a 400 here, not a failure on the node.
        if endpoint == Endpoint::Responses {
            let chat = Value::Object(super::responses::chat_request(&request));
            Self::from_value(Endpoint::Chat, chat)?;
        }
        Ok(request)
    }

    /// The chat messages (empty for the completions endpoint).
    pub fn messages(&self) -> &[ChatMessage] {
        match &self.input {
            Input::Messages(m) => m,
            Input::Prompt(_) | Input::Embed(_) => &[],
        }
    }

    /// The prompt (only for the completions endpoint).
    pub fn prompt(&self) -> Option<&str> {
        match &self.input {
            Input::Messages(_) | Input::Embed(_) => None,
            Input::Prompt(p) => Some(p),
        }
    }

    /// Every piece of input text in order: message contents, or the prompt.
    /// Token-id inputs of an embeddings request contribute nothing here; see
    /// [`InferenceRequest::input_token_ids`].
    pub fn input_texts(&self) -> impl Iterator<Item = &str> {
        let (messages, prompt, embed) = match &self.input {
            Input::Messages(m) => (m.as_slice(), None, &[][..]),
            Input::Prompt(p) => (&[][..], Some(p.as_str()), &[][..]),
            Input::Embed(e) => (&[][..], None, e.as_slice()),
        };
        let texts = embed.iter().filter_map(|i| match i {
            EmbedInput::Text(t) => Some(t.as_str()),
            EmbedInput::Tokens(_) => None,
        });
        messages
            .iter()
            .map(|m| m.content.as_str())
            .chain(prompt)
            .chain(texts)
    }

    /// How many token ids the token-id inputs of an embeddings request carry (0 otherwise).
    pub fn input_token_ids(&self) -> usize {
        match &self.input {
            Input::Embed(e) => e
                .iter()
                .map(|i| match i {
                    EmbedInput::Tokens(t) => t.len(),
                    EmbedInput::Text(_) => 0,
                })
                .sum(),
            _ => 0,
        }
    }

    /// The body of an embeddings request to another OpenAI-compatible server: the original
    /// request with `model` replaced (embeddings do not stream, so `stream` fields are dropped).
    pub fn upstream_embeddings_body(&self, model: &str) -> Vec<u8> {
        let mut body = self.raw.clone();
        body.remove("stream");
        body.remove("stream_options");
        body.insert("model".into(), Value::String(model.to_owned()));
        serde_json::to_vec(&body).unwrap_or_default()
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
    fn embeddings_inputs_parse_in_every_shape_and_hostile_ones_are_named() {
        let ok = |v: Value| match parse(Endpoint::Embeddings, v) {
            Ok(r) => r,
            Err(e) => panic!("expected a valid request, got {e:?}"),
        };
        let err = |v: Value| match parse(Endpoint::Embeddings, v) {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e,
        };
        let r = ok(json!({"model": "e", "input": "hello"}));
        assert_eq!(
            r.input,
            Input::Embed(vec![EmbedInput::Text("hello".into())])
        );
        assert_eq!(r.input_texts().collect::<Vec<_>>(), ["hello"]);
        let r = ok(json!({"model": "e", "input": ["a", [1, 2, 3]], "encoding_format": "base64"}));
        assert_eq!(r.input_token_ids(), 3);
        assert_eq!(r.input_texts().collect::<Vec<_>>(), ["a"]);
        let r = ok(json!({"model": "e", "input": [7, 8]}));
        assert_eq!(r.input, Input::Embed(vec![EmbedInput::Tokens(vec![7, 8])]));
        assert_eq!(err(json!({"model": "e"})).param.as_deref(), Some("input"));
        assert_eq!(
            err(json!({"model": "e", "input": ""})).param.as_deref(),
            Some("input")
        );
        assert_eq!(
            err(json!({"model": "e", "input": []})).param.as_deref(),
            Some("input")
        );
        assert_eq!(
            err(json!({"model": "e", "input": ["ok", 5.5]}))
                .param
                .as_deref(),
            Some("input[1]")
        );
        assert_eq!(
            err(json!({"model": "e", "input": [[1, -1]]}))
                .param
                .as_deref(),
            Some("input[0]")
        );
        let many: Vec<Value> = (0..=MAX_EMBEDDING_INPUTS).map(|_| json!("x")).collect();
        assert_eq!(
            err(json!({"model": "e", "input": many})).param.as_deref(),
            Some("input")
        );
        assert_eq!(
            err(json!({"model": "e", "input": "x", "encoding_format": "hex"}))
                .param
                .as_deref(),
            Some("encoding_format")
        );
        assert_eq!(
            err(json!({"model": "e", "input": "x", "dimensions": 0}))
                .param
                .as_deref(),
            Some("dimensions")
        );
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
                json!({"model": "m", "messages": [user], "n": 129}),
                "n",
                "invalid_value",
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
            "stream": false, "top_p": 0.5, "tools": [{"type": "function", "function": {"name": "f"}}]
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
                "tools": [{"type": "function", "function": {"name": "f"}}]
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
        fn request_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = InferenceRequest::parse(Endpoint::Chat, &body);
        }
    }
}
