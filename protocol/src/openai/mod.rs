//! OpenAI-compatible request and response shapes, without I/O.
//!
//! These are the HTTP API shapes apps use (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`), not the node protocol (see `PROTOCOL.md` and the sibling modules for that).
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
//!
//! The module is split along its seams: [`request`] (parsing and validation), [`features`]
//! (tools, structured output, logprobs, `n`: validation and the capabilities they need), [`relay`]
//! (pass-through of backend pieces: rewriting, assembling non-streaming bodies), [`render`]
//! (responses, chunks, SSE framing), [`error`] ([`ApiError`]) and [`sse`] (reading streams). Every
//! item is re-exported here, so `nearpath_protocol::openai::X` names stay stable.

pub mod error;
pub mod features;
pub mod relay;
pub mod render;
pub mod request;
pub mod responses;
pub mod sse;

pub use error::*;
pub use features::*;
pub use relay::*;
pub use render::*;
pub use request::*;
pub use sse::*;
