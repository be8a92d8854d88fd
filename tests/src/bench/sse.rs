//! An incremental scanner for OpenAI server-sent events that classifies each complete event
//! without a JSON parse (the load generator shares a core, so it must stay cheap).

/// What one SSE event was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A chunk carrying generated text (a non-empty `delta.content`).
    Content,
    /// Another chunk: the role-only first chunk, the finish chunk, the usage chunk.
    Other,
    /// `data: [DONE]`.
    Done,
    /// An in-band error (`{"error": ...}`).
    Error,
}

/// Splits a byte stream into events (separated by a blank line) across arbitrary chunk borders.
#[derive(Debug, Default)]
pub struct Scanner {
    buf: Vec<u8>,
}

const CONTENT: &[u8] = b"\"content\":";

fn classify(event: &[u8]) -> Option<Event> {
    let data = event
        .strip_prefix(b"data: ")
        .or_else(|| event.strip_prefix(b"data:"))?;
    let data = data.trim_ascii();
    if data == b"[DONE]" {
        return Some(Event::Done);
    }
    if data.starts_with(b"{\"error\"") {
        return Some(Event::Error);
    }
    let content = data
        .windows(CONTENT.len())
        .position(|w| w == CONTENT)
        .map(|i| i + CONTENT.len());
    // Python servers (json.dumps) put a space after the colon.
    let value = content
        .and_then(|i| data.get(i..))
        .map(|v| v.trim_ascii_start());
    Some(match value {
        // The string is non-empty if the byte after its opening quote is not the closing one.
        Some([b'"', next, ..]) if *next != b'"' => Event::Content,
        _ => Event::Other,
    })
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner::default()
    }

    /// Feeds the next body bytes; calls `on_event` for each event they complete, in order.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(Event)) {
        // SSE lines may end in CRLF (sse-starlette, which Python servers use). JSON strings
        // escape CR, so dropping every CR leaves the same events with LF line ends.
        if chunk.contains(&b'\r') {
            self.buf.extend(chunk.iter().filter(|b| **b != b'\r'));
        } else {
            self.buf.extend_from_slice(chunk);
        }
        let mut start = 0;
        while let Some(end) = self.buf[start..].windows(2).position(|w| w == b"\n\n") {
            if let Some(ev) = classify(&self.buf[start..start + end]) {
                on_event(ev);
            }
            start += end + 2;
        }
        self.buf.drain(..start);
    }

    /// Bytes of an event not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";
    const TOKEN: &str = "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" error\"},\"finish_reason\":null}]}\n\n";
    const FINISH: &str = "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n";
    const ERROR: &str = "data: {\"error\":{\"message\":\"node failed\"}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn scan_in_pieces(text: &str, piece: usize) -> Vec<Event> {
        let mut s = Scanner::new();
        let mut out = Vec::new();
        for c in text.as_bytes().chunks(piece) {
            s.feed(c, |e| out.push(e));
        }
        assert_eq!(s.pending(), 0);
        out
    }

    #[test]
    fn events_are_classified_whatever_the_chunk_borders() {
        let text = [ROLE, TOKEN, TOKEN, FINISH, ERROR, DONE].concat();
        let want = vec![
            Event::Other,
            Event::Content,
            Event::Content,
            Event::Other,
            Event::Error,
            Event::Done,
        ];
        for piece in [1, 2, 7, 64, text.len()] {
            assert_eq!(scan_in_pieces(&text, piece), want, "piece {piece}");
        }
    }

    #[test]
    fn python_servers_crlf_and_spaced_json_are_classified_alike() {
        // What llama-cpp-python sends: json.dumps spacing, sse-starlette's CRLF line ends.
        let text = [
            "data: {\"id\": \"x\", \"choices\": [{\"index\": 0, \"delta\": {\"role\": \"assistant\"}}]}\r\n\r\n",
            "data: {\"id\": \"x\", \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"e\"}}]}\r\n\r\n",
            "data: {\"id\": \"x\", \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"\"}}]}\r\n\r\n",
            "data: {\"error\": {\"message\": \"x\"}}\r\n\r\n",
            "data: [DONE]\r\n\r\n",
        ]
        .concat();
        let want = vec![
            Event::Other,
            Event::Content,
            Event::Other,
            Event::Error,
            Event::Done,
        ];
        for piece in [1, 3, text.len()] {
            assert_eq!(scan_in_pieces(&text, piece), want, "piece {piece}");
        }
    }

    #[test]
    fn an_incomplete_event_waits_for_its_blank_line() {
        let mut s = Scanner::new();
        let mut n = 0;
        s.feed(&TOKEN.as_bytes()[..TOKEN.len() - 1], |_| n += 1);
        assert_eq!(n, 0);
        assert!(s.pending() > 0);
        s.feed(b"\n", |_| n += 1);
        assert_eq!(n, 1);
    }
}
