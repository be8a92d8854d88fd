//! Request identity and the access log: W3C `traceparent` (validated, continued or started) and
//! the one access-log line each request gets (target `nearpath::access`, at info).
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
             prompt_tokens={} completion_tokens={} duration_ms={} outcome={}",
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
            duration_ms = self.duration_ms,
            outcome = self.outcome,
            "{msg}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

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
