//! The OpenAI Responses API (`POST /v1/responses`) served by translation, without I/O.
//!
//! Most inference servers (llama.cpp, the simulator, Ollama) speak only chat completions, so the
//! node serves the Responses API by translating: [`parse_request`] validates a Responses body
//! (called by [`InferenceRequest::from_value`]), [`chat_request`] turns it into a chat
//! completions body for the model's backend, and [`ResponseStream`] turns the backend's chat
//! stream (plain token texts and chat chunk objects) into Responses streaming events in the
//! official order, ending with `response.completed` (or `response.incomplete`) carrying the whole
//! `response` object, which is also the non-streaming answer.
//!
//! What is refused, with a 400 naming the parameter: `previous_response_id` and `conversation`
//! (the gateway keeps no conversation state: send the whole input each time), `item_reference`
//! input items, and tools other than `function` (hosted tools such as `web_search` run at
//! OpenAI, not on a node). `store: true` is accepted but nothing is stored.
//!
//! Shapes follow what the official `openai` Python client parses (`Response`,
//! `ResponseStreamEvent`, and its `responses.stream()` accumulator, which checks that every
//! content event refers to an output item announced before it).

use std::collections::VecDeque;

use serde_json::{json, Map, Value};

use super::features::{check_schema, is_valid_tool_name, MAX_TOOL_NAME_BYTES};
use super::request::{field, opt_bool};
use super::{ChatMessage, InferenceRequest, RequestError, Role};

/// The most input items one request may carry. Far above what a context window holds; it only
/// bounds the work of validating a hostile body.
pub const MAX_INPUT_ITEMS: usize = 4096;

/// The most tools one request may declare (OpenAI's limit for chat completions).
pub const MAX_TOOLS: usize = 128;

/// The most alternatives per token `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// Responses request fields that chat completions does not accept under the same name; every
/// other field is forwarded to the chat backend as is (sampling and vendor fields).
/// Chat's own names for the conversation and the token limit are dropped too: they are made
/// from `input` and `max_output_tokens`, and a stray copy must not override or contradict them.
const RESPONSES_ONLY_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "response_format",
    "input",
    "instructions",
    "stream",
    "stream_options",
    "max_output_tokens",
    "max_tool_calls",
    "text",
    "tools",
    "tool_choice",
    "previous_response_id",
    "conversation",
    "store",
    "include",
    "logprobs",
    "truncation",
    "reasoning",
    "background",
    "metadata",
    "prompt",
    "prompt_cache_key",
    "safety_identifier",
];

fn type_of<'a>(obj: &'a Map<String, Value>, param: &str) -> Result<Option<&'a str>, RequestError> {
    match obj.get("type") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) => Ok(Some(t.as_str())),
        Some(other) => Err(RequestError::invalid_type(
            &format!("{param}.type"),
            "a string",
            other,
        )),
    }
}

fn required_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    param: &str,
) -> Result<&'a str, RequestError> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(RequestError::missing(&format!("{param}.{key}"))),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(RequestError::invalid_type(
            &format!("{param}.{key}"),
            "a string",
            other,
        )),
    }
}

fn optional_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    param: &str,
) -> Result<Option<&'a str>, RequestError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(RequestError::invalid_type(
            &format!("{param}.{key}"),
            "a string",
            other,
        )),
    }
}

fn optional_object<'a>(
    raw: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, RequestError> {
    match field(raw, key) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(RequestError::invalid_type(key, "an object", other)),
    }
}

/// The text of a message's content, checking each part's type: `input_text`, `output_text`
/// and `refusal` carry text; `input_image`, `input_file` and `input_audio` carry none here (they
/// reach the backend through [`chat_request`]).
fn message_text(content: &Value, param: &str) -> Result<String, RequestError> {
    let Value::Array(parts) = content else {
        return match content {
            Value::String(s) => Ok(s.clone()),
            other => Err(RequestError::invalid_type(
                param,
                "a string or an array of content parts",
                other,
            )),
        };
    };
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let part_param = format!("{param}[{j}]");
        let Value::Object(part) = part else {
            return Err(RequestError::invalid_type(&part_param, "an object", part));
        };
        let piece = match type_of(part, &part_param)? {
            None => return Err(RequestError::missing(&format!("{part_param}.type"))),
            Some("input_text" | "output_text") => required_str(part, "text", &part_param)?,
            Some("refusal") => required_str(part, "refusal", &part_param)?,
            Some("input_image") => {
                if optional_str(part, "image_url", &part_param)?.is_none()
                    && optional_str(part, "file_id", &part_param)?.is_none()
                {
                    return Err(RequestError::missing(&format!("{part_param}.image_url")));
                }
                continue;
            }
            Some("input_file" | "input_audio") => continue,
            Some(other) => {
                return Err(RequestError::invalid_value(
                    &format!("{part_param}.type"),
                    format!(
                        "Invalid value for '{part_param}.type': '{other}'. Supported values are: \
                         'input_text', 'input_image', 'input_file', 'input_audio', 'output_text' \
                         and 'refusal'."
                    ),
                ))
            }
        };
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(piece);
    }
    Ok(text)
}

fn parse_role(msg: &Map<String, Value>, param: &str) -> Result<Role, RequestError> {
    let role = required_str(msg, "role", param)?;
    match role {
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "system" => Ok(Role::System),
        "developer" => Ok(Role::Developer),
        other => Err(RequestError::invalid_value(
            &format!("{param}.role"),
            format!(
                "Invalid value for '{param}.role': '{other}'. Supported values are: 'user', \
                 'assistant', 'system' and 'developer'."
            ),
        )),
    }
}

/// Validates a Responses request body and returns its conversation reduced to text messages
/// (for prompt estimates and the simulator): `instructions` first as a system message, then one
/// message per input item (a function call is an assistant message naming the call, its output
/// a tool message).
pub(crate) fn parse_request(raw: &Map<String, Value>) -> Result<Vec<ChatMessage>, RequestError> {
    if field(raw, "previous_response_id").is_some() {
        return Err(RequestError::unsupported(
            "previous_response_id",
            "Invalid 'previous_response_id': this gateway keeps no conversation state. Send the \
             whole conversation in 'input' instead."
                .into(),
        ));
    }
    if field(raw, "conversation").is_some() {
        return Err(RequestError::unsupported(
            "conversation",
            "Invalid 'conversation': this gateway keeps no conversation state. Send the whole \
             conversation in 'input' instead."
                .into(),
        ));
    }
    if matches!(opt_bool(raw, "background", "background")?, Some(true)) {
        return Err(RequestError::unsupported(
            "background",
            "Invalid 'background': background responses are not supported by this gateway.".into(),
        ));
    }
    opt_bool(raw, "store", "store")?;
    opt_bool(raw, "parallel_tool_calls", "parallel_tool_calls")?;
    optional_object(raw, "metadata")?;
    optional_object(raw, "reasoning")?;
    if let Some(v) = field(raw, "top_p") {
        match v.as_f64() {
            Some(p) if (0.0..=1.0).contains(&p) => {}
            Some(p) => {
                return Err(RequestError::invalid_value(
                    "top_p",
                    format!(
                        "Invalid 'top_p': {p} is out of range. Expected a value between 0 and 1."
                    ),
                ))
            }
            None => return Err(RequestError::invalid_type("top_p", "a number", v)),
        }
    }
    match field(raw, "include") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if !item.is_string() {
                    return Err(RequestError::invalid_type(
                        &format!("include[{i}]"),
                        "a string",
                        item,
                    ));
                }
            }
        }
        Some(other) => return Err(RequestError::invalid_type("include", "an array", other)),
    }
    if let Some(v) = field(raw, "top_logprobs") {
        match v.as_u64() {
            Some(n) if n <= MAX_TOP_LOGPROBS => {}
            _ => {
                return Err(RequestError::invalid_value(
                    "top_logprobs",
                    format!(
                        "Invalid 'top_logprobs': expected an integer between 0 and \
                         {MAX_TOP_LOGPROBS}, but got {v}."
                    ),
                ))
            }
        }
    }
    let tool_names = parse_tools(raw)?;
    parse_tool_choice(raw, &tool_names)?;
    parse_text_format(raw)?;

    let mut out = Vec::new();
    match field(raw, "instructions") {
        None => {}
        Some(Value::String(s)) => out.push(ChatMessage {
            role: Role::System,
            content: s.clone(),
            name: None,
        }),
        Some(other) => {
            return Err(RequestError::invalid_type(
                "instructions",
                "a string",
                other,
            ))
        }
    }
    let items = match field(raw, "input") {
        None => return Err(RequestError::missing("input")),
        Some(Value::String(s)) => {
            out.push(ChatMessage {
                role: Role::User,
                content: s.clone(),
                name: None,
            });
            return Ok(out);
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(RequestError::invalid_type(
                "input",
                "a string or an array of input items",
                other,
            ))
        }
    };
    if items.is_empty() {
        return Err(RequestError::invalid_value(
            "input",
            "Invalid 'input': empty array. Expected an array with minimum length 1.".into(),
        ));
    }
    if items.len() > MAX_INPUT_ITEMS {
        return Err(RequestError::invalid_value(
            "input",
            format!(
                "Invalid 'input': array too long. Expected an array with maximum length \
                 {MAX_INPUT_ITEMS}, but got an array with length {} instead.",
                items.len()
            ),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        let param = format!("input[{i}]");
        let Value::Object(item) = item else {
            return Err(RequestError::invalid_type(&param, "an object", item));
        };
        match type_of(item, &param)? {
            // A message may leave out `type` (the "easy input message" shape).
            None | Some("message") => {
                let role = parse_role(item, &param)?;
                let content_param = format!("{param}.content");
                let content = match item.get("content") {
                    None | Some(Value::Null) => return Err(RequestError::missing(&content_param)),
                    Some(c) => message_text(c, &content_param)?,
                };
                out.push(ChatMessage {
                    role,
                    content,
                    name: None,
                });
            }
            Some("function_call") => {
                required_str(item, "call_id", &param)?;
                let name = required_str(item, "name", &param)?;
                let arguments = required_str(item, "arguments", &param)?;
                out.push(ChatMessage {
                    role: Role::Assistant,
                    content: format!("{name}({arguments})"),
                    name: None,
                });
            }
            Some("function_call_output") => {
                required_str(item, "call_id", &param)?;
                let output_param = format!("{param}.output");
                let output = match item.get("output") {
                    None | Some(Value::Null) => return Err(RequestError::missing(&output_param)),
                    Some(o) => message_text(o, &output_param)?,
                };
                out.push(ChatMessage {
                    role: Role::Tool,
                    content: output,
                    name: None,
                });
            }
            // Reasoning from an earlier turn is the model's own scratch work; chat backends
            // have no place for it, so it is accepted and left out.
            Some("reasoning") => {}
            Some("item_reference") => {
                return Err(RequestError::unsupported(
                    &format!("{param}.type"),
                    format!(
                        "Invalid value for '{param}.type': 'item_reference'. This gateway keeps \
                         no conversation state: send the item itself."
                    ),
                ))
            }
            Some(other) => {
                return Err(RequestError::invalid_value(
                    &format!("{param}.type"),
                    format!(
                        "Invalid value for '{param}.type': '{other}'. Supported values are: \
                         'message', 'function_call', 'function_call_output' and 'reasoning'."
                    ),
                ))
            }
        }
    }
    // Reasoning items are left out, so an input of nothing else (and no `instructions`) leaves
    // no conversation: the chat backend would refuse the empty translation as the node's fault.
    if out.is_empty() {
        return Err(RequestError::invalid_value(
            "input",
            "Invalid 'input': no message to answer. The input holds only reasoning items; send \
             at least one message, function call or function call output."
                .into(),
        ));
    }
    Ok(out)
}

/// Checks `tools` (flat function tools only) and returns their names.
fn parse_tools(raw: &Map<String, Value>) -> Result<Vec<String>, RequestError> {
    let tools = match field(raw, "tools") {
        None => return Ok(Vec::new()),
        Some(Value::Array(t)) => t,
        Some(other) => return Err(RequestError::invalid_type("tools", "an array", other)),
    };
    if tools.len() > MAX_TOOLS {
        return Err(RequestError::invalid_value(
            "tools",
            format!(
                "Invalid 'tools': array too long. Expected an array with maximum length \
                 {MAX_TOOLS}, but got an array with length {} instead.",
                tools.len()
            ),
        ));
    }
    let mut names = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        let Value::Object(tool) = tool else {
            return Err(RequestError::invalid_type(&param, "an object", tool));
        };
        match type_of(tool, &param)? {
            None => return Err(RequestError::missing(&format!("{param}.type"))),
            Some("function") => {}
            Some(other) => {
                return Err(RequestError::unsupported(
                    &format!("{param}.type"),
                    format!(
                        "Invalid value for '{param}.type': '{other}'. Only 'function' tools are \
                         supported: hosted tools run at OpenAI, not on this gateway's nodes."
                    ),
                ))
            }
        }
        let name = required_str(tool, "name", &param)?;
        if name.is_empty() {
            return Err(RequestError::invalid_value(
                &format!("{param}.name"),
                format!("Invalid '{param}.name': empty string."),
            ));
        }
        // The chat backend gets this tool under the same name and schema, so both are held to
        // chat's rules here (a refusal after translation would be the node's fault, a 500).
        if !is_valid_tool_name(name) {
            return Err(RequestError::invalid_value(
                &format!("{param}.name"),
                format!(
                    "Invalid '{param}.name': string does not match pattern. Expected a string \
                     that matches the pattern '^[a-zA-Z0-9_-]{{1,{MAX_TOOL_NAME_BYTES}}}$'."
                ),
            ));
        }
        optional_str(tool, "description", &param)?;
        match tool.get("parameters") {
            None | Some(Value::Null) => {}
            Some(p) => check_schema(&format!("{param}.parameters"), p)?,
        }
        match tool.get("strict") {
            None | Some(Value::Null) | Some(Value::Bool(_)) => {}
            Some(other) => {
                return Err(RequestError::invalid_type(
                    &format!("{param}.strict"),
                    "a boolean",
                    other,
                ))
            }
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

fn parse_tool_choice(raw: &Map<String, Value>, tools: &[String]) -> Result<(), RequestError> {
    match field(raw, "tool_choice") {
        None => Ok(()),
        Some(Value::String(s)) => match s.as_str() {
            "none" | "auto" => Ok(()),
            "required" if tools.is_empty() => Err(RequestError::invalid_value(
                "tool_choice",
                "Invalid 'tool_choice': 'required' needs at least one tool in 'tools'.".into(),
            )),
            "required" => Ok(()),
            other => Err(RequestError::invalid_value(
                "tool_choice",
                format!(
                    "Invalid value for 'tool_choice': '{other}'. Supported values are: 'none', \
                     'auto' and 'required', or {{\"type\": \"function\", \"name\": ...}}."
                ),
            )),
        },
        Some(Value::Object(choice)) => {
            match type_of(choice, "tool_choice")? {
                Some("function") => {}
                None => return Err(RequestError::missing("tool_choice.type")),
                Some(other) => {
                    return Err(RequestError::unsupported(
                        "tool_choice.type",
                        format!(
                            "Invalid value for 'tool_choice.type': '{other}'. Only 'function' \
                             is supported."
                        ),
                    ))
                }
            }
            let name = required_str(choice, "name", "tool_choice")?;
            if !tools.iter().any(|t| t == name) {
                return Err(RequestError::invalid_value(
                    "tool_choice.name",
                    format!("Invalid 'tool_choice.name': no function named '{name}' in 'tools'."),
                ));
            }
            Ok(())
        }
        Some(other) => Err(RequestError::invalid_type(
            "tool_choice",
            "a string or an object",
            other,
        )),
    }
}

fn parse_text_format(raw: &Map<String, Value>) -> Result<(), RequestError> {
    let Some(text) = optional_object(raw, "text")? else {
        return Ok(());
    };
    let format = match text.get("format") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(f)) => f,
        Some(other) => {
            return Err(RequestError::invalid_type(
                "text.format",
                "an object",
                other,
            ))
        }
    };
    match type_of(format, "text.format")? {
        None => Err(RequestError::missing("text.format.type")),
        Some("text" | "json_object") => Ok(()),
        Some("json_schema") => {
            required_str(format, "name", "text.format")?;
            match format.get("schema") {
                None | Some(Value::Null) => {
                    return Err(RequestError::missing("text.format.schema"))
                }
                // Chat's rules: it becomes `response_format.json_schema.schema`.
                Some(schema) => check_schema("text.format.schema", schema)?,
            }
            match format.get("strict") {
                None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(()),
                Some(other) => Err(RequestError::invalid_type(
                    "text.format.strict",
                    "a boolean",
                    other,
                )),
            }
        }
        Some(other) => Err(RequestError::invalid_value(
            "text.format.type",
            format!(
                "Invalid value for 'text.format.type': '{other}'. Supported values are: 'text', \
                 'json_object' and 'json_schema'."
            ),
        )),
    }
}

/// A Responses content part as a chat content part (`None` for parts chat has no place for).
fn chat_part(part: &Map<String, Value>) -> Option<Value> {
    match part.get("type").and_then(Value::as_str)? {
        "input_text" | "output_text" => Some(json!({"type": "text", "text": part.get("text")?})),
        "refusal" => Some(json!({"type": "text", "text": part.get("refusal")?})),
        "input_image" => {
            let url = part
                .get("image_url")
                .and_then(Value::as_str)
                .or_else(|| part.get("file_id").and_then(Value::as_str))?;
            let mut image = Map::new();
            image.insert("url".into(), Value::String(url.to_owned()));
            if let Some(detail) = part.get("detail").filter(|d| d.is_string()) {
                image.insert("detail".into(), detail.clone());
            }
            Some(json!({"type": "image_url", "image_url": image}))
        }
        "input_audio" => {
            Some(json!({"type": "input_audio", "input_audio": part.get("input_audio")?}))
        }
        "input_file" => {
            let mut file = part.clone();
            file.remove("type");
            Some(json!({"type": "file", "file": file}))
        }
        _ => None,
    }
}

/// A Responses message content as chat content: a string stays a string; parts that are all
/// text become one string (what every chat server accepts, assistant turns included); anything
/// else becomes chat content parts.
fn chat_content(content: &Value) -> Value {
    let Value::Array(parts) = content else {
        return content.clone();
    };
    let parts: Vec<Value> = parts
        .iter()
        .filter_map(Value::as_object)
        .filter_map(chat_part)
        .collect();
    if parts.iter().all(|p| p["type"] == "text") {
        let texts: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        Value::String(texts.join("\n"))
    } else {
        Value::Array(parts)
    }
}

/// The chat completions body equivalent to a validated Responses request: `instructions` become
/// a system message, input items become messages (consecutive `function_call` items one
/// assistant message with `tool_calls`, each `function_call_output` a `tool` message), flat
/// function tools become nested ones, `text.format` becomes `response_format`,
/// `max_output_tokens` becomes `max_tokens`, `reasoning.effort` becomes `reasoning_effort`, and
/// every field that is not Responses-only (sampling, vendor fields) is kept. The body always
/// streams, so the backend hands over tokens as they come.
pub fn chat_request(request: &InferenceRequest) -> Map<String, Value> {
    let raw = &request.raw;
    let mut messages: Vec<Value> = Vec::new();
    if let Some(Value::String(s)) = raw.get("instructions") {
        messages.push(json!({"role": "system", "content": s}));
    }
    match raw.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items.iter().filter_map(Value::as_object) {
                match item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message")
                {
                    "message" => {
                        let role = item.get("role").cloned().unwrap_or(Value::Null);
                        let content = item.get("content").map_or(Value::Null, chat_content);
                        messages.push(json!({"role": role, "content": content}));
                    }
                    "function_call" => {
                        let call = json!({
                            "id": item.get("call_id"),
                            "type": "function",
                            "function": {"name": item.get("name"), "arguments": item.get("arguments")},
                        });
                        // Calls made in one turn are one assistant message, as chat has them.
                        let last = messages.last_mut().and_then(Value::as_object_mut);
                        match last {
                            Some(m)
                                if m.get("role").and_then(Value::as_str) == Some("assistant") =>
                            {
                                match m.get_mut("tool_calls") {
                                    Some(Value::Array(calls)) => calls.push(call),
                                    _ => {
                                        m.insert("tool_calls".into(), Value::Array(vec![call]));
                                    }
                                }
                            }
                            _ => messages.push(json!({
                                "role": "assistant",
                                "content": null,
                                "tool_calls": [call],
                            })),
                        }
                    }
                    "function_call_output" => {
                        let output = item.get("output").map_or(Value::Null, chat_content);
                        messages.push(json!({
                            "role": "tool",
                            "tool_call_id": item.get("call_id"),
                            "content": output,
                        }));
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    let mut out = Map::new();
    out.insert("model".into(), Value::String(request.model.clone()));
    out.insert("messages".into(), Value::Array(messages));
    for (key, value) in raw {
        if !RESPONSES_ONLY_FIELDS.contains(&key.as_str()) {
            out.insert(key.clone(), value.clone());
        }
    }
    out.insert("stream".into(), Value::Bool(true));
    if let Some(max) = request.max_tokens {
        out.insert("max_tokens".into(), Value::from(max));
    }
    if let Some(Value::Array(tools)) = raw.get("tools") {
        let nested: Vec<Value> = tools
            .iter()
            .filter_map(Value::as_object)
            .map(|t| {
                let mut function = Map::new();
                for key in ["name", "description", "parameters", "strict"] {
                    if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                        function.insert(key.into(), v.clone());
                    }
                }
                json!({"type": "function", "function": function})
            })
            .collect();
        out.insert("tools".into(), Value::Array(nested));
    }
    match raw.get("tool_choice") {
        Some(Value::Object(choice)) => {
            out.insert(
                "tool_choice".into(),
                json!({"type": "function", "function": {"name": choice.get("name")}}),
            );
        }
        Some(v @ Value::String(_)) => {
            out.insert("tool_choice".into(), v.clone());
        }
        _ => {}
    }
    if let Some(format) = raw
        .get("text")
        .and_then(|t| t.get("format"))
        .and_then(Value::as_object)
    {
        match format.get("type").and_then(Value::as_str) {
            Some("json_object") => {
                out.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some("json_schema") => {
                let mut schema = Map::new();
                for key in ["name", "description", "schema", "strict"] {
                    if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                        schema.insert(key.into(), v.clone());
                    }
                }
                out.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": schema}),
                );
            }
            _ => {}
        }
    }
    // Chat sends log probabilities only when `logprobs` is true; Responses asks for them with
    // `include` (and `top_logprobs` implies them).
    let wants_logprobs = field(raw, "top_logprobs").is_some()
        || matches!(raw.get("include"), Some(Value::Array(inc))
            if inc.iter().any(|i| i == "message.output_text.logprobs"));
    if wants_logprobs {
        out.insert("logprobs".into(), Value::Bool(true));
    }
    if let Some(effort) = raw
        .get("reasoning")
        .and_then(|r| r.get("effort"))
        .filter(|e| e.is_string())
    {
        out.insert("reasoning_effort".into(), effort.clone());
    }
    out
}

/// The model capabilities a validated Responses request needs, each with the parameter a
/// refusal names, in the order the chat endpoint reports them: function `tools` (and a
/// `tool_choice` that requires a call), `text.format` JSON mode or schema, and `input_image`
/// parts (vision, naming the first such part). `tool_choice: "none"` needs no tools.
pub fn required_caps(raw: &Map<String, Value>) -> Vec<(crate::ModelCaps, String)> {
    use crate::ModelCaps;
    let mut out = Vec::new();
    let has_tools = matches!(field(raw, "tools"), Some(Value::Array(t)) if !t.is_empty());
    match field(raw, "tool_choice") {
        Some(Value::String(s)) if s == "none" => {}
        Some(Value::String(s)) if s == "required" => {
            out.push((ModelCaps::TOOLS, "tools".to_owned()));
            out.push((ModelCaps::TOOLS, "tool_choice".to_owned()));
        }
        Some(Value::Object(_)) => {
            out.push((ModelCaps::TOOLS, "tools".to_owned()));
            out.push((ModelCaps::TOOLS, "tool_choice".to_owned()));
        }
        _ if has_tools => out.push((ModelCaps::TOOLS, "tools".to_owned())),
        _ => {}
    }
    let format = raw
        .get("text")
        .and_then(|t| t.get("format"))
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str);
    match format {
        Some("json_object") => out.push((ModelCaps::JSON_MODE, "text.format".to_owned())),
        Some("json_schema") => out.push((ModelCaps::JSON_SCHEMA, "text.format".to_owned())),
        _ => {}
    }
    if let Some(Value::Array(items)) = field(raw, "input") {
        'images: for (i, item) in items.iter().enumerate() {
            if let Some(Value::Array(parts)) = item.get("content") {
                for (j, part) in parts.iter().enumerate() {
                    if part.get("type").and_then(Value::as_str) == Some("input_image") {
                        out.push((ModelCaps::VISION, format!("input[{i}].content[{j}]")));
                        break 'images;
                    }
                }
            }
        }
    }
    out
}

/// One output item being streamed.
#[derive(Debug)]
enum OpenItem {
    Message {
        id: String,
        text: String,
        /// Token log probabilities of `text`, when the backend sent them.
        logprobs: Vec<Value>,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        /// The call's `index` in the chat stream's `tool_calls` deltas.
        chat_index: u64,
    },
}

/// Turns a chat completions stream into Responses API streaming events (sans-IO).
///
/// Feed it with [`ResponseStream::handle_text`] (a plain token text), [`ResponseStream::handle_chunk`]
/// (one chat chunk object) and finally [`ResponseStream::handle_done`]; take the events, in
/// order, with [`ResponseStream::poll`]. Each event is one SSE event's data object, carrying its
/// `type` and a `sequence_number` counting from 0. After `handle_done`,
/// [`ResponseStream::response`] is the non-streaming answer.
///
/// The order is the official one: `response.created`, `response.in_progress`, then per output
/// item `response.output_item.added`, for a message `response.content_part.added`,
/// `response.output_text.delta`..., `response.output_text.done`, `response.content_part.done`,
/// for a function call `response.function_call_arguments.delta`...,
/// `response.function_call_arguments.done`, then `response.output_item.done`; last
/// `response.completed` (or `response.incomplete` when the generation hit its token limit).
/// One item is open at a time: a tool call closes the message before it, as OpenAI streams them.
#[derive(Debug)]
pub struct ResponseStream {
    /// The response object, its `output` filled as items finish.
    response: Map<String, Value>,
    /// The hex part of the response id, from which item ids are made.
    id_suffix: String,
    sequence: u64,
    open: Option<OpenItem>,
    /// The finish reason seen in a chunk, in case `handle_done` gets none.
    finish_reason: Option<String>,
    finished: bool,
    queue: VecDeque<Value>,
}

impl ResponseStream {
    /// A stream for `request` (a validated Responses request), answering as `model`, with the
    /// response id `id` (`resp_...`) created at `created_at` (Unix seconds). Queues
    /// `response.created` and `response.in_progress`.
    pub fn new(request: &InferenceRequest, id: &str, created_at: u64, model: &str) -> Self {
        let raw = &request.raw;
        let get = |key: &str, default: Value| raw.get(key).cloned().unwrap_or(default);
        let text = match raw.get("text") {
            Some(Value::Object(t)) if t.get("format").is_some_and(Value::is_object) => {
                Value::Object(t.clone())
            }
            _ => json!({"format": {"type": "text"}}),
        };
        let reasoning = match raw.get("reasoning") {
            Some(Value::Object(r)) => {
                json!({"effort": r.get("effort"), "summary": r.get("summary")})
            }
            _ => json!({"effort": null, "summary": null}),
        };
        let mut response = Map::new();
        response.insert("id".into(), Value::String(id.to_owned()));
        response.insert("object".into(), Value::String("response".into()));
        response.insert("created_at".into(), Value::from(created_at));
        response.insert("status".into(), Value::String("in_progress".into()));
        response.insert("background".into(), Value::Bool(false));
        response.insert("error".into(), Value::Null);
        response.insert("incomplete_details".into(), Value::Null);
        response.insert("instructions".into(), get("instructions", Value::Null));
        response.insert(
            "max_output_tokens".into(),
            request.max_tokens.map_or(Value::Null, Value::from),
        );
        response.insert("metadata".into(), get("metadata", json!({})));
        response.insert("model".into(), Value::String(model.to_owned()));
        response.insert("output".into(), Value::Array(Vec::new()));
        response.insert(
            "parallel_tool_calls".into(),
            get("parallel_tool_calls", Value::Bool(true)),
        );
        response.insert("previous_response_id".into(), Value::Null);
        response.insert("reasoning".into(), reasoning);
        response.insert("store".into(), get("store", Value::Bool(false)));
        response.insert("temperature".into(), get("temperature", json!(1.0)));
        response.insert("text".into(), text);
        response.insert("tool_choice".into(), get("tool_choice", json!("auto")));
        response.insert("tools".into(), get("tools", json!([])));
        response.insert("top_p".into(), get("top_p", json!(1.0)));
        response.insert("truncation".into(), Value::String("disabled".into()));
        response.insert("usage".into(), Value::Null);
        response.insert("user".into(), get("user", Value::Null));
        let id_suffix = id.strip_prefix("resp_").unwrap_or(id).to_owned();
        let mut stream = Self {
            response,
            id_suffix,
            sequence: 0,
            open: None,
            finish_reason: None,
            finished: false,
            queue: VecDeque::new(),
        };
        let snapshot = stream.response_value();
        stream.emit(json!({"type": "response.created", "response": snapshot}));
        let snapshot = stream.response_value();
        stream.emit(json!({"type": "response.in_progress", "response": snapshot}));
        stream
    }

    /// The next event to send, in order.
    pub fn poll(&mut self) -> Option<Value> {
        self.queue.pop_front()
    }

    /// The response object as it stands (complete after [`ResponseStream::handle_done`]).
    pub fn response(&self) -> &Map<String, Value> {
        &self.response
    }

    /// Whether [`ResponseStream::handle_done`] has run.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn response_value(&self) -> Value {
        Value::Object(self.response.clone())
    }

    fn emit(&mut self, mut event: Value) {
        if let Value::Object(e) = &mut event {
            e.insert("sequence_number".into(), Value::from(self.sequence));
        }
        self.sequence += 1;
        self.queue.push_back(event);
    }

    fn output_index(&self) -> usize {
        self.response
            .get("output")
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
    }

    /// A plain piece of generated text for the assistant message.
    pub fn handle_text(&mut self, text: &str) {
        self.text_delta(text, Vec::new());
    }

    /// A piece of text with its token log probabilities (chat's `logprobs.content` entries,
    /// which have the Responses shape already: `token`, `logprob`, `bytes`, `top_logprobs`).
    fn text_delta(&mut self, text: &str, logprobs: Vec<Value>) {
        if self.finished || text.is_empty() {
            return;
        }
        if !matches!(self.open, Some(OpenItem::Message { .. })) {
            self.close_open();
            let output_index = self.output_index();
            let id = format!("msg_{}{output_index:02}", self.id_suffix);
            self.emit(json!({
                "type": "response.output_item.added",
                "output_index": output_index,
                "item": {"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []},
            }));
            self.emit(json!({
                "type": "response.content_part.added",
                "item_id": id,
                "output_index": output_index,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            }));
            self.open = Some(OpenItem::Message {
                id,
                text: String::new(),
                logprobs: Vec::new(),
            });
        }
        let output_index = self.output_index();
        let Some(OpenItem::Message {
            id,
            text: so_far,
            logprobs: all,
        }) = &mut self.open
        else {
            return;
        };
        so_far.push_str(text);
        all.extend(logprobs.iter().cloned());
        let id = id.clone();
        self.emit(json!({
            "type": "response.output_text.delta",
            "item_id": id,
            "output_index": output_index,
            "content_index": 0,
            "delta": text,
            "logprobs": logprobs,
        }));
    }

    /// One chat completions chunk object from the backend: its choice 0's `delta.content` is
    /// text, its `delta.tool_calls` pieces are function calls, its `finish_reason` is kept for
    /// the end. Fields of the wrong type are ignored: a backend's chunk never panics the node.
    pub fn handle_chunk(&mut self, chunk: &Value) {
        if self.finished {
            return;
        }
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            return;
        };
        let choice = choices
            .iter()
            .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0);
        let Some(choice) = choice else {
            return;
        };
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_owned());
        }
        let Some(delta) = choice.get("delta") else {
            return;
        };
        if let Some(text) = delta.get("content").and_then(Value::as_str) {
            let logprobs = choice
                .get("logprobs")
                .and_then(|l| l.get("content"))
                .and_then(Value::as_array)
                .map(|l| l.iter().filter(|e| e.is_object()).cloned().collect())
                .unwrap_or_default();
            self.text_delta(text, logprobs);
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for call in calls {
                self.handle_tool_call_delta(call);
            }
        }
    }

    fn handle_tool_call_delta(&mut self, call: &Value) {
        let chat_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let function = call.get("function");
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        let arguments = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let same =
            matches!(&self.open, Some(OpenItem::Call { chat_index: i, .. }) if *i == chat_index);
        if !same {
            self.close_open();
            let output_index = self.output_index();
            let id = format!("fc_{}{output_index:02}", self.id_suffix);
            let call_id = match call.get("id").and_then(Value::as_str) {
                Some(c) if !c.is_empty() => c.to_owned(),
                _ => format!("call_{}{output_index:02}", self.id_suffix),
            };
            let name = name.unwrap_or("").to_owned();
            self.emit(json!({
                "type": "response.output_item.added",
                "output_index": output_index,
                "item": {
                    "id": id, "type": "function_call", "status": "in_progress",
                    "call_id": call_id, "name": name, "arguments": "",
                },
            }));
            self.open = Some(OpenItem::Call {
                id,
                call_id,
                name,
                arguments: String::new(),
                chat_index,
            });
        }
        let output_index = self.output_index();
        let Some(OpenItem::Call {
            id,
            name: open_name,
            arguments: so_far,
            ..
        }) = &mut self.open
        else {
            return;
        };
        // Some servers (llama.cpp) repeat the name in every delta; a late name fills a gap only.
        if open_name.is_empty() {
            if let Some(n) = name {
                *open_name = n.to_owned();
            }
        }
        if arguments.is_empty() {
            return;
        }
        so_far.push_str(arguments);
        let id = id.clone();
        self.emit(json!({
            "type": "response.function_call_arguments.delta",
            "item_id": id,
            "output_index": output_index,
            "delta": arguments,
        }));
    }

    /// Finishes the open item: its closing events, and the finished item into `output`.
    fn close_open(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        let output_index = self.output_index();
        let item = match open {
            OpenItem::Message { id, text, logprobs } => {
                let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs});
                self.emit(json!({
                    "type": "response.output_text.done",
                    "item_id": id,
                    "output_index": output_index,
                    "content_index": 0,
                    "text": text,
                    "logprobs": logprobs,
                }));
                self.emit(json!({
                    "type": "response.content_part.done",
                    "item_id": id,
                    "output_index": output_index,
                    "content_index": 0,
                    "part": part,
                }));
                json!({
                    "id": id, "type": "message", "status": "completed", "role": "assistant",
                    "content": [part],
                })
            }
            OpenItem::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => {
                self.emit(json!({
                    "type": "response.function_call_arguments.done",
                    "item_id": id,
                    "output_index": output_index,
                    "name": name,
                    "arguments": arguments,
                }));
                json!({
                    "id": id, "type": "function_call", "status": "completed",
                    "call_id": call_id, "name": name, "arguments": arguments,
                })
            }
        };
        self.emit(json!({
            "type": "response.output_item.done",
            "output_index": output_index,
            "item": item,
        }));
        if let Some(Value::Array(output)) = self.response.get_mut("output") {
            output.push(item);
        }
    }

    /// The generation finished: closes the open item and queues `response.completed`, or
    /// `response.incomplete` when `finish_reason` is `length` (`max_output_tokens`) or
    /// `content_filter`, with the usage counted by the backend. Later calls do nothing.
    pub fn handle_done(&mut self, finish_reason: &str, input_tokens: u32, output_tokens: u32) {
        if self.finished {
            return;
        }
        self.close_open();
        self.finished = true;
        let reason = if finish_reason.is_empty() {
            self.finish_reason.as_deref().unwrap_or("stop")
        } else {
            finish_reason
        };
        let incomplete = match reason {
            "length" => Some("max_output_tokens"),
            "content_filter" => Some("content_filter"),
            _ => None,
        };
        let (status, kind) = match incomplete {
            Some(_) => ("incomplete", "response.incomplete"),
            None => ("completed", "response.completed"),
        };
        self.response
            .insert("status".into(), Value::String(status.into()));
        if let Some(reason) = incomplete {
            self.response
                .insert("incomplete_details".into(), json!({"reason": reason}));
        }
        self.response.insert(
            "usage".into(),
            json!({
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u64::from(input_tokens) + u64::from(output_tokens),
            }),
        );
        let snapshot = self.response_value();
        self.emit(json!({"type": kind, "response": snapshot}));
    }
}

#[cfg(test)]
mod tests;
