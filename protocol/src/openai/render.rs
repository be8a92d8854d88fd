//! Rendering of OpenAI response objects: chunks, Server-Sent Events, non-streaming bodies and the
//! model list.
//!
//! These are HTTP API shapes sent to apps, not the node protocol. Rendering is on the hot path (one
//! chunk per token), so chunks are written by hand into one buffer: the per-stream constant part is
//! rendered once ([`StreamRenderer`]) and only the token text is escaped per chunk.
//! [`push_json_str`] produces exactly what `serde_json` produces.

use std::fmt::Write as _;

use bytes::Bytes;
use serde::Deserialize;

use super::request::Endpoint;
use crate::caps::ModelCaps;

/// reading here, older ones read until the connection closes.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// `Content-Type` of a streaming response.
pub const SSE_CONTENT_TYPE: &str = "text/event-stream";

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

pub(crate) fn push_json_str_bytes(out: &mut Vec<u8>, s: &str) {
    // Serialising a `&str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(out, s);
}

pub(crate) fn push_opt_str(out: &mut String, s: Option<&str>) {
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
        // The text fast path exists for chat and legacy completions; the other endpoints carry
        // whole JSON pieces (`Chunk`) and are rendered elsewhere, so they take the chat shape.
        match self.endpoint {
            Endpoint::Chat | Endpoint::Embeddings | Endpoint::Responses => {
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
            Endpoint::Completion | Endpoint::Embeddings | Endpoint::Responses => None,
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
        Endpoint::Chat | Endpoint::Embeddings | Endpoint::Responses => {
            out.push_str(
                ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":",
            );
            push_json_str(&mut out, text);
            out.push_str("},\"logprobs\":null,\"finish_reason\":");
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
            .map(|&(id, created, owned_by)| (id, created, owned_by, None, None)),
    )
}

/// `GET /v1/models` with availability and capabilities: every entry also carries `"available"`,
/// false for a model that was served recently but has no node right now (requests for it are 503
/// `model_unavailable` until a node returns), and `"capabilities"`, the names of what some node
/// serving it declares (`tools`, `json_mode`, `json_schema`, `logprobs`, `embeddings`, `n`,
/// `vision`; see [`ModelCaps`]).
pub fn models_list_with_availability(models: &[(&str, u64, &str, bool, ModelCaps)]) -> String {
    write_models(
        models
            .iter()
            .map(|&(id, created, owned_by, available, caps)| {
                (id, created, owned_by, Some((available, caps)), None)
            }),
    )
}

/// One model of a federation's listing ([`models_list_in_fleet`]).
#[derive(Debug, Clone, Copy)]
pub struct FleetModel<'a> {
    pub id: &'a str,
    pub created: u64,
    pub owned_by: &'a str,
    pub available: bool,
    pub caps: ModelCaps,
    /// The ids of the gateways whose live nodes serve it, sorted; the gateway answering is
    /// among them when one of its own nodes does.
    pub gateways: &'a [String],
}

/// `GET /v1/models` of a gateway in a federation: [`models_list_with_availability`]'s entries,
/// each with `"gateways"`, the ids of the gateways whose nodes serve the model (a model served
/// only by peers' nodes is listed once, and requests for it go through the trunk). OpenAI's
/// clients keep fields they do not know, so the shape stays theirs.
pub fn models_list_in_fleet(models: &[FleetModel<'_>]) -> String {
    write_models(models.iter().map(|m| {
        (
            m.id,
            m.created,
            m.owned_by,
            Some((m.available, m.caps)),
            Some(m.gateways),
        )
    }))
}

/// One model object of [`models_list_in_fleet`], as `GET /v1/models/{id}` returns it.
pub fn fleet_model_object(m: &FleetModel<'_>) -> String {
    let mut out = String::with_capacity(160);
    write_model(
        &mut out,
        m.id,
        m.created,
        m.owned_by,
        Some((m.available, m.caps)),
        Some(m.gateways),
    );
    out
}

/// One model object as `GET /v1/models/{id}` returns it: the same entry as in
/// [`models_list_with_availability`].
pub fn model_object(
    id: &str,
    created: u64,
    owned_by: &str,
    available: bool,
    caps: ModelCaps,
) -> String {
    let mut out = String::with_capacity(128);
    write_model(
        &mut out,
        id,
        created,
        owned_by,
        Some((available, caps)),
        None,
    );
    out
}

fn write_model(
    out: &mut String,
    id: &str,
    created: u64,
    owned_by: &str,
    extra: Option<(bool, ModelCaps)>,
    gateways: Option<&[String]>,
) {
    out.push_str("{\"id\":");
    push_json_str(out, id);
    let _ = write!(
        out,
        ",\"object\":\"model\",\"created\":{created},\"owned_by\":"
    );
    push_json_str(out, owned_by);
    if let Some((available, caps)) = extra {
        let _ = write!(out, ",\"available\":{available},\"capabilities\":[");
        for (i, name) in caps.names().into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_str(out, name);
        }
        out.push(']');
    }
    if let Some(gateways) = gateways {
        out.push_str(",\"gateways\":[");
        for (i, g) in gateways.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_str(out, g);
        }
        out.push(']');
    }
    out.push('}');
}

/// The model list both forms share; availability and capabilities are written only when given.
fn write_models<'a>(
    models: impl ExactSizeIterator<
        Item = (
            &'a str,
            u64,
            &'a str,
            Option<(bool, ModelCaps)>,
            Option<&'a [String]>,
        ),
    >,
) -> String {
    let mut out = String::with_capacity(32 + models.len() * 128);
    out.push_str("{\"object\":\"list\",\"data\":[");
    for (i, (id, created, owned_by, extra, gateways)) in models.enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_model(&mut out, id, created, owned_by, extra, gateways);
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::super::sse::{parse_stream_chunk, StreamChunk};
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

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
            r#"{"id":"chatcmpl-2","object":"chat.completion","created":9,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":" a b"},"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#
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
    fn models_list_in_fleet_exact() {
        let both = ["eu-1".to_string(), "us-1".to_string()];
        let remote = ["us-1\"x".to_string()];
        let m = |id, available, gateways| FleetModel {
            id,
            created: 1,
            owned_by: "nearpath",
            available,
            caps: ModelCaps::NONE,
            gateways,
        };
        assert_eq!(
            models_list_in_fleet(&[m("a", true, &both), m("b", true, &remote)]),
            r#"{"object":"list","data":[{"id":"a","object":"model","created":1,"owned_by":"nearpath","available":true,"capabilities":[],"gateways":["eu-1","us-1"]},{"id":"b","object":"model","created":1,"owned_by":"nearpath","available":true,"capabilities":[],"gateways":["us-1\"x"]}]}"#
        );
        assert_eq!(
            fleet_model_object(&m("c", false, &[])),
            r#"{"id":"c","object":"model","created":1,"owned_by":"nearpath","available":false,"capabilities":[],"gateways":[]}"#
        );
    }

    #[test]
    fn models_list_with_availability_exact() {
        assert_eq!(
            models_list_with_availability(&[
                ("a", 1, "nearpath", true, ModelCaps::NONE),
                (
                    "b",
                    2,
                    "nearpath",
                    false,
                    ModelCaps::TOOLS.with(ModelCaps::MULTIPLE_CHOICES)
                )
            ]),
            r#"{"object":"list","data":[{"id":"a","object":"model","created":1,"owned_by":"nearpath","available":true,"capabilities":[]},{"id":"b","object":"model","created":2,"owned_by":"nearpath","available":false,"capabilities":["tools","n"]}]}"#
        );
        assert_eq!(
            model_object("a", 1, "nearpath", true, ModelCaps::LOGPROBS),
            r#"{"id":"a","object":"model","created":1,"owned_by":"nearpath","available":true,"capabilities":["logprobs"]}"#
        );
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
    }
}
