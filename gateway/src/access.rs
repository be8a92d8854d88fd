//! Request identity and the access log: W3C `traceparent` (validated, continued or started) and
//! the one access-log line each request and each game session gets (target `nearpath::access`,
//! at info; `/metrics` scrapes at debug).
//!
//! A leaf: no I/O beyond the `tracing` event, no clock (the caller measures durations).

use std::fmt::Write as _;

/// The `tracing` target of access-log lines, so that operators can route them apart.
pub const ACCESS_TARGET: &str = "nearpath::access";

/// The most bytes of a `traceparent` header read (version 00 is exactly 55).
const TRACEPARENT_LEN: usize = 55;

/// A W3C trace context (version 00): the trace, the parent span, the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (lowercase, as the recommendation requires); the
    /// all-zero trace and span ids are invalid. Anything else is `None`: an invalid header is
    /// ignored, never propagated.
    pub fn parse(header: &str) -> Option<Self> {
        let b = header.as_bytes();
        if b.len() != TRACEPARENT_LEN || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if !lower_hex(&b[3..35]) || !lower_hex(&b[36..52]) || !lower_hex(&b[53..55]) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex::decode_to_slice(&b[3..35], &mut trace_id).ok()?;
        hex::decode_to_slice(&b[36..52], &mut span_id).ok()?;
        hex::decode_to_slice(&b[53..55], &mut flags).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags: flags[0],
        })
    }

    /// The context the gateway passes on: the client's trace (or a new one with a random id when
    /// the client sent none or an invalid one) with the gateway's own span as the parent.
    pub fn continue_or_start(client: Option<&str>) -> Self {
        let mut span_id = rand::random::<[u8; 8]>();
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        match client.and_then(Self::parse) {
            Some(parent) => Self { span_id, ..parent },
            None => {
                let mut trace_id = rand::random::<[u8; 16]>();
                if trace_id == [0; 16] {
                    trace_id[15] = 1;
                }
                // Sampled: a trace the gateway starts is worth recording downstream.
                Self {
                    trace_id,
                    span_id,
                    flags: 1,
                }
            }
        }
    }

    /// The context of a request served in `span`: while spans are exported (OTLP), `span` is
    /// joined to the client's trace and its own ids are the ones passed on, so that the node's
    /// span names the gateway's as its parent; otherwise as [`TraceParent::continue_or_start`].
    /// Call it before `span` is first entered.
    pub fn for_span(span: &tracing::Span, client: Option<&str>) -> Self {
        let parent = client
            .and_then(Self::parse)
            .map(|p| nearpath_telemetry::TraceIds {
                trace_id: p.trace_id,
                span_id: p.span_id,
                flags: p.flags,
            });
        match nearpath_telemetry::join(span, parent) {
            Some(own) => Self {
                trace_id: own.trace_id,
                span_id: own.span_id,
                flags: own.flags,
            },
            None => Self::continue_or_start(client),
        }
    }

    pub fn trace_id_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        push_hex(&mut out, &self.trace_id);
        out
    }

    /// The header value. Built once per request: by hand, because `format!` over `hex::encode`
    /// (a char iterator per byte) cost several thousand instructions each time.
    pub fn header(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }
}

/// The request id a client sent in `x-request-id`, when it is usable as one: 1 to 128 visible
/// ASCII characters (it is echoed in a header and written to logs). `None`: make one.
pub fn client_request_id(header: Option<&str>) -> Option<String> {
    header
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
}

/// A new request id: `req_` and 24 random hex digits.
pub fn new_request_id() -> String {
    // By hand rather than `format!("req_{:016x}{:08x}", ..)`: the formatting machinery cost
    // about 1,800 instructions per request.
    let mut out = String::with_capacity(28);
    out.push_str("req_");
    push_hex(&mut out, &rand::random::<u64>().to_be_bytes());
    push_hex(&mut out, &rand::random::<u32>().to_be_bytes());
    out
}

/// Whether access lines are wanted (info on `nearpath::access`): callers check it before
/// gathering what a line needs.
pub fn enabled() -> bool {
    tracing::enabled!(target: "nearpath::access", tracing::Level::INFO)
}

/// Appends `bytes` as lowercase hex.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

/// One access-log line. Fields the request never reached are `None` and logged as `-`.
#[derive(Debug, Clone, Default)]
pub struct AccessLine<'a> {
    /// `http` or `quic`.
    pub entry: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// The HTTP status (for a stream, the status of its headers: 200).
    pub status: u16,
    pub request_id: &'a str,
    pub trace_id: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub model: Option<&'a str>,
    pub node: Option<&'a str>,
    pub ttft_ms: Option<u64>,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    /// The client's country (ISO alpha-2) as GeoIP placed it.
    pub country: Option<&'a str>,
    pub duration_ms: u64,
    /// `ok`, `cancelled`, or the error kind.
    pub outcome: &'a str,
}

impl AccessLine<'_> {
    /// Emits the line at info on [`ACCESS_TARGET`]: structured fields for collectors, and the
    /// same as `key=value` text in the message for people reading plain logs.
    pub fn emit(&self) {
        // The text is built only when someone will read it: at the default `warn` level the
        // line costs one filter check, not a formatted string per request.
        if !enabled() {
            return;
        }
        let dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
        let num = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let mut msg = String::with_capacity(256);
        let _ = write!(
            msg,
            "{} {} {} status={} request_id={} trace_id={} key={} model={:?} node={} ttft_ms={} \
             prompt_tokens={} completion_tokens={} country={} duration_ms={} outcome={}",
            self.entry,
            self.method,
            self.path,
            self.status,
            self.request_id,
            dash(self.trace_id),
            dash(self.key_id),
            self.model.unwrap_or("-"),
            dash(self.node),
            num(self.ttft_ms),
            num(self.prompt_tokens.map(u64::from)),
            num(self.completion_tokens.map(u64::from)),
            dash(self.country),
            self.duration_ms,
            self.outcome,
        );
        tracing::info!(
            target: "nearpath::access",
            entry = self.entry,
            method = self.method,
            path = self.path,
            status = self.status,
            request_id = self.request_id,
            trace_id = self.trace_id,
            key_id = self.key_id,
            model = self.model,
            node = self.node,
            ttft_ms = self.ttft_ms,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            country = self.country,
            duration_ms = self.duration_ms,
            outcome = self.outcome,
            "{msg}"
        );
    }

    /// Emits the line at debug: for requests too frequent and too dull for info (`/metrics`
    /// scrapes, health probes of the admin listener).
    pub fn emit_debug(&self) {
        if !tracing::enabled!(target: "nearpath::access", tracing::Level::DEBUG) {
            return;
        }
        tracing::debug!(
            target: "nearpath::access",
            entry = self.entry,
            method = self.method,
            path = self.path,
            status = self.status,
            request_id = self.request_id,
            duration_ms = self.duration_ms,
            outcome = self.outcome,
            "{} {} {} status={} request_id={} duration_ms={} outcome={}",
            self.entry,
            self.method,
            self.path,
            self.status,
            self.request_id,
            self.duration_ms,
            self.outcome,
        );
    }
}

/// The most characters of a game title an access line carries.
pub const GAME_LOGGED_CHARS: usize = 64;

/// The access-log line of a game session, emitted once when it ends (native QUIC and WebRTC
/// players alike): who played what where, for how long, what was relayed, and how it ended.
#[derive(Debug, Clone, Default)]
pub struct SessionLine<'a> {
    /// `quic` (native player) or `webrtc` (browser).
    pub transport: &'a str,
    /// `None`: refused before a session was made.
    pub session_id: Option<u64>,
    /// `None`: the key did not authenticate.
    pub key_id: Option<&'a str>,
    /// As the player asked for it (a refused request's title is the client's, not a known one:
    /// logged escaped and cut to [`GAME_LOGGED_CHARS`]).
    pub game: &'a str,
    /// The node that served last (after a failover, the one that took over; a session that
    /// ended paused names the node it lost).
    pub node: Option<&'a str>,
    /// The client's country (ISO alpha-2) as GeoIP placed it.
    pub country: Option<&'a str>,
    pub duration_ms: u64,
    /// Frames and bytes relayed to the player.
    pub frames: u64,
    pub bytes: u64,
    /// Nodes that served the session (more than one after a failover).
    pub nodes: u32,
    /// `ended` or why it ended (`client_closed`, `idle`, `key_revoked`, ...).
    pub outcome: &'a str,
}

impl SessionLine<'_> {
    /// Emits the line at info on [`ACCESS_TARGET`], structured and as `key=value` text.
    pub fn emit(&self) {
        if !enabled() {
            return;
        }
        let node = self.node.unwrap_or("-");
        let country = self.country.unwrap_or("-");
        let key = self.key_id.unwrap_or("-");
        let session = self
            .session_id
            .map_or_else(|| "-".to_owned(), |id| id.to_string());
        let game = match self.game.char_indices().nth(GAME_LOGGED_CHARS) {
            Some((cut, _)) => &self.game[..cut],
            None => self.game,
        };
        tracing::info!(
            target: "nearpath::access",
            entry = self.transport,
            kind = "game",
            session_id = self.session_id,
            key_id = self.key_id,
            game,
            node = self.node,
            country = self.country,
            duration_ms = self.duration_ms,
            frames = self.frames,
            bytes = self.bytes,
            nodes = self.nodes,
            outcome = self.outcome,
            "{} GAME session_id={session} key={key} game={game:?} node={node} country={country} \
             duration_ms={} frames={} bytes={} nodes={} outcome={}",
            self.transport,
            self.duration_ms,
            self.frames,
            self.bytes,
            self.nodes,
            self.outcome,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_new_request_id_is_req_and_24_lowercase_hex_digits_and_fresh_each_time() {
        let a = new_request_id();
        let b = new_request_id();
        for id in [&a, &b] {
            assert_eq!(id.len(), 28, "{id}");
            assert!(id.starts_with("req_"), "{id}");
            assert!(
                id[4..]
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "{id}"
            );
        }
        assert_ne!(a, b);
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_the_gateways_own_span() {
        let p = TraceParent::parse(VALID).expect("valid");
        assert_eq!(p.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.header(), VALID);
        let next = TraceParent::continue_or_start(Some(VALID));
        assert_eq!(next.trace_id, p.trace_id);
        assert_eq!(next.flags, 1);
        assert_ne!(next.span_id, p.span_id);
        assert_eq!(TraceParent::parse(&next.header()), Some(next));
    }

    #[test]
    fn a_hostile_traceparent_is_not_propagated() {
        let too_long = format!("{VALID}-00");
        for bad in [
            "",
            too_long.as_str(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
            let started = TraceParent::continue_or_start(Some(bad));
            // A new trace: nothing of the hostile header travels on.
            assert!(!started.header().contains("4bf92f3577b34da6a3ce929d0e0e47"));
            assert_ne!(started.trace_id, [0; 16]);
        }
    }

    #[test]
    fn without_a_traceparent_a_new_trace_starts() {
        let a = TraceParent::continue_or_start(None);
        let b = TraceParent::continue_or_start(None);
        assert_ne!(a.trace_id, b.trace_id);
        assert!(TraceParent::parse(&a.header()).is_some());
    }
}
