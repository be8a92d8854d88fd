//! Reading OpenAI-compatible Server-Sent Event streams (the client side): a bounded SSE parser and
//! the chunk decoder used when the edge node relays from an OpenAI-compatible server and by tests.
//!
//! These are HTTP API shapes, not the node protocol.

use std::collections::VecDeque;

use serde::Deserialize;
use serde_json::Value;

use super::render::Usage;

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
    use crate::openai::render::{chat_chunk, completion_chunk};

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
}
