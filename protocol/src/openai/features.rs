//! The optional OpenAI features a request asks for (tools, structured output, logprobs, several
//! choices, images, embeddings): their validation, typed views of them, and the model
//! capabilities ([`ModelCaps`]) they need.
//!
//! The raw fields stay in [`InferenceRequest::raw`] and are forwarded unchanged; validation only
//! refuses shapes no backend could honour, so that a hostile or broken client gets a 400 naming
//! the parameter instead of a node-side failure. The typed views read `raw` again when asked:
//! the plain-text fast path never pays for them.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::request::{Endpoint, InferenceRequest, RequestError};
use crate::caps::ModelCaps;

/// The most tools one request may declare.
pub const MAX_TOOLS: usize = 128;
/// The most choices (`n`) one request may ask for.
pub const MAX_CHOICES: u32 = 128;
/// The most alternatives per token `top_logprobs` (chat) or `logprobs` (completions) may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// How deeply a tool's `parameters` or a `json_schema.schema` may nest, so that walking it (to
/// check it, or for the simulator to generate an instance) is bounded.
pub const MAX_SCHEMA_DEPTH: usize = 32;
/// The longest tool (function) name, as OpenAI allows.
pub const MAX_TOOL_NAME_BYTES: usize = 64;

/// One declared function tool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tool<'a> {
    pub name: &'a str,
    /// The JSON Schema of the arguments, when given.
    pub parameters: Option<&'a Value>,
}

/// `tool_choice`, with OpenAI's default (`auto` when tools are given, else `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolChoice<'a> {
    None,
    Auto,
    Required,
    /// `{"type": "function", "function": {"name": ...}}`.
    Named(&'a str),
}

/// `response_format`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResponseFormat<'a> {
    Text,
    JsonObject,
    JsonSchema { schema: &'a Value },
}

// A present, non-null field (OpenAI treats `null` like an absent optional field); one helper
// for the request parser and these checks.
use super::request::field;

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

fn invalid_type(param: &str, expected: &str, got: &Value) -> RequestError {
    RequestError {
        param: Some(param.to_owned()),
        code: "invalid_type",
        message: format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            type_name(got)
        ),
    }
}

fn invalid_value(param: &str, message: String) -> RequestError {
    RequestError {
        param: Some(param.to_owned()),
        code: "invalid_value",
        message,
    }
}

/// Whether `name` matches `^[a-zA-Z0-9_-]{1,64}$`.
pub fn is_valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOOL_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// How deeply `v` nests (a scalar is 0), stopping once past `limit`.
fn depth_exceeds(v: &Value, limit: usize) -> bool {
    // Iterative, so that a hostile schema cannot overflow the stack while being measured.
    let mut stack: Vec<(&Value, usize)> = vec![(v, 0)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        if d + 1 > limit {
            return true;
        }
        stack.extend(children.map(|c| (c, d + 1)));
    }
    false
}

pub(crate) fn check_schema(param: &str, v: &Value) -> Result<(), RequestError> {
    if !v.is_object() {
        return Err(invalid_type(param, "an object (a JSON Schema)", v));
    }
    if depth_exceeds(v, MAX_SCHEMA_DEPTH) {
        return Err(invalid_value(
            param,
            format!("Invalid '{param}': the schema nests deeper than {MAX_SCHEMA_DEPTH} levels."),
        ));
    }
    Ok(())
}

fn opt_uint(
    raw: &Map<String, Value>,
    key: &str,
    min: u32,
    max: u32,
) -> Result<Option<u32>, RequestError> {
    let Some(v) = field(raw, key) else {
        return Ok(None);
    };
    let n = match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 1e30)
                    .map(|f| f as i128)
            }),
        _ => None,
    };
    let Some(n) = n else {
        return Err(invalid_type(key, "an integer", v));
    };
    if n < i128::from(min) || n > i128::from(max) {
        return Err(invalid_value(
            key,
            format!(
                "Invalid '{key}': {n} is out of range. Expected a value between {min} and {max}."
            ),
        ));
    }
    Ok(Some(n as u32))
}

fn validate_tools(raw: &Map<String, Value>) -> Result<Vec<String>, RequestError> {
    let list = match field(raw, "tools") {
        None => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(invalid_type("tools", "an array", other)),
    };
    if list.len() > MAX_TOOLS {
        return Err(invalid_value(
            "tools",
            format!(
                "Invalid 'tools': array too long. Expected at most {MAX_TOOLS} tools, but got {} instead.",
                list.len()
            ),
        ));
    }
    let mut names = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let at = format!("tools[{i}]");
        let Value::Object(tool) = tool else {
            return Err(invalid_type(&at, "an object", tool));
        };
        match tool.get("type") {
            Some(Value::String(t)) if t == "function" => {}
            Some(other) => {
                return Err(invalid_value(
                    &format!("{at}.type"),
                    format!("Invalid '{at}.type': {other}. Supported values are: 'function'."),
                ))
            }
            None => return Err(RequestError::missing(&format!("{at}.type"))),
        }
        let f_at = format!("{at}.function");
        let function = match tool.get("function") {
            Some(Value::Object(f)) => f,
            None | Some(Value::Null) => return Err(RequestError::missing(&f_at)),
            Some(other) => return Err(invalid_type(&f_at, "an object", other)),
        };
        let name_at = format!("{f_at}.name");
        let name = match function.get("name") {
            Some(Value::String(n)) => n,
            None | Some(Value::Null) => return Err(RequestError::missing(&name_at)),
            Some(other) => return Err(invalid_type(&name_at, "a string", other)),
        };
        if !is_valid_tool_name(name) {
            return Err(invalid_value(
                &name_at,
                format!(
                    "Invalid '{name_at}': string does not match pattern. Expected a string that \
                     matches the pattern '^[a-zA-Z0-9_-]{{1,{MAX_TOOL_NAME_BYTES}}}$'."
                ),
            ));
        }
        if let Some(d) = function.get("description").filter(|v| !v.is_null()) {
            if !d.is_string() {
                return Err(invalid_type(&format!("{f_at}.description"), "a string", d));
            }
        }
        if let Some(p) = function.get("parameters").filter(|v| !v.is_null()) {
            check_schema(&format!("{f_at}.parameters"), p)?;
        }
        names.push(name.clone());
    }
    Ok(names)
}

fn validate_tool_choice(raw: &Map<String, Value>, tools: &[String]) -> Result<(), RequestError> {
    const P: &str = "tool_choice";
    match field(raw, P) {
        None => Ok(()),
        Some(Value::String(s)) => match s.as_str() {
            "none" | "auto" => Ok(()),
            "required" if !tools.is_empty() => Ok(()),
            "required" => Err(invalid_value(
                P,
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.".into(),
            )),
            _ => Err(invalid_value(
                P,
                format!("Invalid value for '{P}': '{s}'. Supported values are: 'none', 'auto' and 'required', or an object naming a function."),
            )),
        },
        Some(Value::Object(o)) => {
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(invalid_value(
                    "tool_choice.type",
                    "Invalid 'tool_choice.type': expected 'function'.".into(),
                ));
            }
            let name = match o.get("function") {
                Some(Value::Object(f)) => f.get("name"),
                _ => None,
            };
            let Some(Value::String(name)) = name else {
                return Err(RequestError::missing("tool_choice.function.name"));
            };
            if !tools.iter().any(|t| t == name) {
                return Err(invalid_value(
                    "tool_choice.function.name",
                    format!("Invalid 'tool_choice.function.name': no tool named '{name}' is declared in 'tools'."),
                ));
            }
            Ok(())
        }
        Some(other) => Err(invalid_type(P, "a string or an object", other)),
    }
}

fn validate_response_format(raw: &Map<String, Value>) -> Result<(), RequestError> {
    let rf = match field(raw, "response_format") {
        None => return Ok(()),
        Some(Value::Object(rf)) => rf,
        Some(other) => return Err(invalid_type("response_format", "an object", other)),
    };
    match rf.get("type") {
        Some(Value::String(t)) if t == "text" || t == "json_object" => Ok(()),
        Some(Value::String(t)) if t == "json_schema" => {
            let js = match rf.get("json_schema") {
                Some(Value::Object(js)) => js,
                None | Some(Value::Null) => {
                    return Err(RequestError::missing("response_format.json_schema"))
                }
                Some(other) => {
                    return Err(invalid_type("response_format.json_schema", "an object", other))
                }
            };
            match js.get("schema") {
                None | Some(Value::Null) => {
                    Err(RequestError::missing("response_format.json_schema.schema"))
                }
                Some(s) => check_schema("response_format.json_schema.schema", s),
            }
        }
        None | Some(Value::Null) => Err(RequestError::missing("response_format.type")),
        Some(other) => Err(invalid_value(
            "response_format.type",
            format!("Invalid 'response_format.type': {other}. Supported values are: 'text', 'json_object' and 'json_schema'."),
        )),
    }
}

/// Checks the optional features' shapes (called by [`InferenceRequest::from_value`]).
pub(crate) fn validate(endpoint: Endpoint, raw: &Map<String, Value>) -> Result<(), RequestError> {
    match endpoint {
        Endpoint::Chat => {
            opt_uint(raw, "n", 1, MAX_CHOICES)?;
            let tools = validate_tools(raw)?;
            validate_tool_choice(raw, &tools)?;
            if let Some(v) = field(raw, "parallel_tool_calls") {
                if !v.is_boolean() {
                    return Err(invalid_type("parallel_tool_calls", "a boolean", v));
                }
            }
            validate_response_format(raw)?;
            let logprobs = match field(raw, "logprobs") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => return Err(invalid_type("logprobs", "a boolean", other)),
            };
            if opt_uint(raw, "top_logprobs", 0, MAX_TOP_LOGPROBS)?.is_some() && !logprobs {
                return Err(invalid_value(
                    "top_logprobs",
                    "Invalid 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is given.".into(),
                ));
            }
            Ok(())
        }
        Endpoint::Completion => {
            opt_uint(raw, "n", 1, MAX_CHOICES)?;
            // Legacy completions: `logprobs` is the number of alternatives per token.
            opt_uint(raw, "logprobs", 0, MAX_TOP_LOGPROBS)?;
            Ok(())
        }
        Endpoint::Embeddings | Endpoint::Responses => Ok(()),
    }
}

impl InferenceRequest {
    /// `n`: how many choices to generate (1 when absent).
    pub fn n(&self) -> u32 {
        match self.endpoint {
            Endpoint::Chat | Endpoint::Completion => opt_uint(&self.raw, "n", 1, MAX_CHOICES)
                .ok()
                .flatten()
                .unwrap_or(1),
            Endpoint::Embeddings | Endpoint::Responses => 1,
        }
    }

    /// The declared function tools (chat only), in order.
    pub fn tools(&self) -> Vec<Tool<'_>> {
        if self.endpoint != Endpoint::Chat {
            return Vec::new();
        }
        let Some(Value::Array(list)) = field(&self.raw, "tools") else {
            return Vec::new();
        };
        list.iter()
            .filter_map(|t| {
                let f = t.get("function")?;
                Some(Tool {
                    name: f.get("name")?.as_str()?,
                    parameters: f.get("parameters").filter(|p| p.is_object()),
                })
            })
            .collect()
    }

    /// `tool_choice`, defaulting as OpenAI does.
    pub fn tool_choice(&self) -> ToolChoice<'_> {
        let has_tools = !self.tools().is_empty();
        match field(&self.raw, "tool_choice") {
            Some(Value::String(s)) if s == "none" => ToolChoice::None,
            Some(Value::String(s)) if s == "required" && has_tools => ToolChoice::Required,
            Some(Value::Object(o)) if has_tools => match o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) => ToolChoice::Named(name),
                None => ToolChoice::Auto,
            },
            _ if has_tools => ToolChoice::Auto,
            _ => ToolChoice::None,
        }
    }

    /// `response_format` (chat only; `Text` when absent).
    pub fn response_format(&self) -> ResponseFormat<'_> {
        if self.endpoint != Endpoint::Chat {
            return ResponseFormat::Text;
        }
        let Some(Value::Object(rf)) = field(&self.raw, "response_format") else {
            return ResponseFormat::Text;
        };
        match rf.get("type").and_then(Value::as_str) {
            Some("json_object") => ResponseFormat::JsonObject,
            Some("json_schema") => match rf.get("json_schema").and_then(|j| j.get("schema")) {
                Some(schema) if schema.is_object() => ResponseFormat::JsonSchema { schema },
                _ => ResponseFormat::JsonObject,
            },
            _ => ResponseFormat::Text,
        }
    }

    /// Whether log probabilities are asked for, and how many alternatives per token: chat's
    /// `logprobs: true` with `top_logprobs` (0 when absent), or legacy completions' `logprobs: k`.
    pub fn logprobs(&self) -> Option<u32> {
        match self.endpoint {
            Endpoint::Chat => match field(&self.raw, "logprobs") {
                Some(Value::Bool(true)) => Some(
                    opt_uint(&self.raw, "top_logprobs", 0, MAX_TOP_LOGPROBS)
                        .ok()
                        .flatten()
                        .unwrap_or(0),
                ),
                _ => None,
            },
            Endpoint::Completion => opt_uint(&self.raw, "logprobs", 0, MAX_TOP_LOGPROBS)
                .ok()
                .flatten(),
            Endpoint::Embeddings | Endpoint::Responses => None,
        }
    }

    /// The capabilities this request needs from its model, each with the parameter that needs
    /// it (the one a refusal names), in the order a refusal reports them. Empty for a plain
    /// request (the fast path pays only for looking up a few keys).
    pub fn required_caps(&self) -> Vec<(ModelCaps, String)> {
        let mut out = Vec::new();
        match self.endpoint {
            Endpoint::Embeddings => out.push((ModelCaps::EMBEDDINGS, "model".to_owned())),
            Endpoint::Chat | Endpoint::Completion => {
                if self.endpoint == Endpoint::Chat {
                    match self.tool_choice() {
                        ToolChoice::None => {}
                        ToolChoice::Auto => out.push((ModelCaps::TOOLS, "tools".to_owned())),
                        ToolChoice::Required | ToolChoice::Named(_) => {
                            out.push((ModelCaps::TOOLS, "tools".to_owned()));
                            out.push((ModelCaps::TOOLS, "tool_choice".to_owned()));
                        }
                    }
                    match self.response_format() {
                        ResponseFormat::Text => {}
                        ResponseFormat::JsonObject => {
                            out.push((ModelCaps::JSON_MODE, "response_format".to_owned()))
                        }
                        ResponseFormat::JsonSchema { .. } => {
                            out.push((ModelCaps::JSON_SCHEMA, "response_format".to_owned()))
                        }
                    }
                }
                if self.logprobs().is_some() {
                    out.push((ModelCaps::LOGPROBS, "logprobs".to_owned()));
                    if self.endpoint == Endpoint::Chat && field(&self.raw, "top_logprobs").is_some()
                    {
                        out.push((ModelCaps::LOGPROBS, "top_logprobs".to_owned()));
                    }
                }
                if self.n() > 1 {
                    out.push((ModelCaps::MULTIPLE_CHOICES, "n".to_owned()));
                }
                if let Some(Value::Array(messages)) = field(&self.raw, "messages") {
                    'images: for (i, m) in messages.iter().enumerate() {
                        if let Some(Value::Array(parts)) = m.get("content") {
                            for (j, p) in parts.iter().enumerate() {
                                if p.get("type").and_then(Value::as_str) == Some("image_url") {
                                    out.push((
                                        ModelCaps::VISION,
                                        format!("messages[{i}].content[{j}]"),
                                    ));
                                    break 'images;
                                }
                            }
                        }
                    }
                }
            }
            Endpoint::Responses => out = super::responses::required_caps(&self.raw),
        }
        out
    }

    /// The union of [`InferenceRequest::required_caps`].
    pub fn required_caps_set(&self) -> ModelCaps {
        self.required_caps()
            .iter()
            .fold(ModelCaps::NONE, |acc, (c, _)| acc.with(*c))
    }

    /// The refusal for a model whose capabilities `have` lack something this request needs:
    /// the first such parameter, as a 400 `unsupported_parameter`.
    pub fn unsupported_by(&self, have: ModelCaps) -> Option<ApiError> {
        self.required_caps()
            .into_iter()
            .find(|(need, _)| !have.contains(*need))
            .map(|(need, param)| unsupported_capability(&self.model, need, &param))
    }
}

/// A 400 `invalid_request_error` with code `unsupported_parameter`: "model X does not support
/// tools", naming the parameter that needs the capability.
pub fn unsupported_capability(model: &str, cap: ModelCaps, param: &str) -> ApiError {
    let what = cap.names().first().copied().unwrap_or("this feature");
    let what = match what {
        "n" => "n > 1 (several choices)",
        "json_mode" => "JSON mode",
        "json_schema" => "structured outputs (json_schema)",
        "vision" => "image inputs",
        other => other,
    };
    ApiError::new(
        400,
        "invalid_request_error",
        Some("unsupported_parameter"),
        Some(param.to_owned()),
        format!("The model `{model}` does not support {what} (parameter '{param}')."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(endpoint: Endpoint, v: Value) -> Result<InferenceRequest, RequestError> {
        InferenceRequest::parse(endpoint, v.to_string().as_bytes())
    }

    fn chat(extra: Value) -> Result<InferenceRequest, RequestError> {
        let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        if let (Some(o), Value::Object(extra)) = (v.as_object_mut(), extra) {
            o.extend(extra);
        }
        parse(Endpoint::Chat, v)
    }

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}})
    }

    fn deep(levels: usize) -> Value {
        let mut v = json!({"type": "string"});
        for _ in 0..levels {
            v = json!({"type": "object", "properties": {"x": v}});
        }
        v
    }

    #[test]
    fn hostile_feature_parameters_are_refused_naming_the_param() {
        let many: Vec<Value> = (0..=MAX_TOOLS).map(|i| tool(&format!("t{i}"))).collect();
        let cases: Vec<(Value, &str)> = vec![
            (json!({"tools": "x"}), "tools"),
            (json!({"tools": many}), "tools"),
            (json!({"tools": [5]}), "tools[0]"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (
                json!({"tools": [tool("ok"), {"type": "function", "function": {}}]}),
                "tools[1].function.name",
            ),
            (
                json!({"tools": [tool("has space")]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [tool(&"x".repeat(65))]}),
                "tools[0].function.name",
            ),
            (json!({"tools": [tool("")]}), "tools[0].function.name"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "s"}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": deep(40)}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [tool("f")], "tool_choice": "always"}),
                "tool_choice",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": [tool("f")], "tool_choice": 3}),
                "tool_choice",
            ),
            (
                json!({"tools": [tool("f")], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice.function.name",
            ),
            (
                json!({"tools": [tool("f")], "tool_choice": {"type": "function"}}),
                "tool_choice.function.name",
            ),
            (
                json!({"tools": [tool("f")], "tool_choice": {"type": "x", "function": {"name": "f"}}}),
                "tool_choice.type",
            ),
            (json!({"parallel_tool_calls": "yes"}), "parallel_tool_calls"),
            (json!({"response_format": "json"}), "response_format"),
            (json!({"response_format": {}}), "response_format.type"),
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": deep(40)}}}),
                "response_format.json_schema.schema",
            ),
            (json!({"logprobs": 1}), "logprobs"),
            (json!({"top_logprobs": 3}), "top_logprobs"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (
                json!({"logprobs": true, "top_logprobs": -1}),
                "top_logprobs",
            ),
            (
                json!({"logprobs": true, "top_logprobs": "3"}),
                "top_logprobs",
            ),
            (json!({"n": 129}), "n"),
            (json!({"n": 0}), "n"),
            (json!({"n": 1e300}), "n"),
            (json!({"n": "2"}), "n"),
        ];
        for (extra, param) in cases {
            let err = match chat(extra.clone()) {
                Ok(_) => panic!("accepted {extra}"),
                Err(e) => e,
            };
            assert_eq!(
                err.param.as_deref(),
                Some(param),
                "param for {extra}: {}",
                err.message
            );
            assert!(
                err.message.contains(param),
                "message names {param}: {}",
                err.message
            );
        }
        let err = parse(
            Endpoint::Completion,
            json!({"model": "m", "prompt": "p", "logprobs": 21}),
        );
        assert_eq!(err.err().and_then(|e| e.param).as_deref(), Some("logprobs"));
    }

    #[test]
    fn schema_depth_at_the_limit_is_accepted() {
        // deep(k) nests 2k levels (object -> properties -> ...).
        let r = chat(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": deep(15)}}}),
        );
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn required_caps_name_the_param_that_needs_them() {
        let need = |extra: Value| -> Vec<(ModelCaps, String)> {
            match chat(extra) {
                Ok(r) => r.required_caps(),
                Err(e) => panic!("{e:?}"),
            }
        };
        assert!(need(json!({})).is_empty(), "a plain request needs nothing");
        assert!(need(
            json!({"n": 1, "logprobs": false, "tools": [], "response_format": {"type": "text"}})
        )
        .is_empty());
        assert!(need(json!({"tools": [tool("f")], "tool_choice": "none"})).is_empty());
        assert_eq!(
            need(json!({"tools": [tool("f")]})),
            [(ModelCaps::TOOLS, "tools".to_owned())]
        );
        assert_eq!(
            need(json!({"tools": [tool("f")], "tool_choice": "required"})),
            [
                (ModelCaps::TOOLS, "tools".to_owned()),
                (ModelCaps::TOOLS, "tool_choice".to_owned())
            ]
        );
        assert_eq!(
            need(json!({"response_format": {"type": "json_object"}})),
            [(ModelCaps::JSON_MODE, "response_format".to_owned())]
        );
        assert_eq!(
            need(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}})
            ),
            [(ModelCaps::JSON_SCHEMA, "response_format".to_owned())]
        );
        assert_eq!(
            need(json!({"logprobs": true})),
            [(ModelCaps::LOGPROBS, "logprobs".to_owned())]
        );
        assert_eq!(
            need(json!({"n": 3})),
            [(ModelCaps::MULTIPLE_CHOICES, "n".to_owned())]
        );
        let img = json!({"messages": [
            {"role": "user", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}
        ]});
        assert_eq!(
            need(img),
            [(ModelCaps::VISION, "messages[1].content[1]".to_owned())]
        );
        let emb = parse(Endpoint::Embeddings, json!({"model": "e", "input": "x"}))
            .map(|r| r.required_caps());
        assert_eq!(
            emb.ok(),
            Some(vec![(ModelCaps::EMBEDDINGS, "model".to_owned())])
        );
        let cmpl = parse(
            Endpoint::Completion,
            json!({"model": "m", "prompt": "p", "logprobs": 2, "n": 2}),
        );
        assert_eq!(
            cmpl.map(|r| r.required_caps_set()).ok(),
            Some(ModelCaps::LOGPROBS.with(ModelCaps::MULTIPLE_CHOICES))
        );
    }

    #[test]
    fn unsupported_by_names_the_first_missing_param() {
        let r = match chat(json!({"tools": [tool("f")], "logprobs": true, "top_logprobs": 2})) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(r.logprobs(), Some(2));
        assert!(r
            .unsupported_by(ModelCaps::TOOLS.with(ModelCaps::LOGPROBS))
            .is_none());
        let e = r
            .unsupported_by(ModelCaps::LOGPROBS)
            .map(|e| (e.status, e.code, e.param, e.message));
        let Some((status, code, param, message)) = e else {
            panic!("no refusal")
        };
        assert_eq!(
            (status, code.as_deref(), param.as_deref()),
            (400, Some("unsupported_parameter"), Some("tools"))
        );
        assert!(
            message.contains("model `m` does not support tools"),
            "{message}"
        );
        let e = r.unsupported_by(ModelCaps::TOOLS).and_then(|e| e.param);
        assert_eq!(e.as_deref(), Some("logprobs"));
    }

    #[test]
    fn typed_views_read_the_validated_fields() {
        let r = match chat(json!({
            "tools": [tool("a"), {"type": "function", "function": {"name": "b"}}],
            "tool_choice": {"type": "function", "function": {"name": "b"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
            "n": 4
        })) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        let tools = r.tools();
        assert_eq!(tools.iter().map(|t| t.name).collect::<Vec<_>>(), ["a", "b"]);
        assert!(tools[0].parameters.is_some() && tools[1].parameters.is_none());
        assert_eq!(r.tool_choice(), ToolChoice::Named("b"));
        assert!(matches!(
            r.response_format(),
            ResponseFormat::JsonSchema { .. }
        ));
        assert_eq!(r.n(), 4);
        assert_eq!(r.logprobs(), None);
    }
}
