//! The load generator's HTTP side: dedicated HTTP/1.1 keep-alive and HTTP/2 connections
//! (no pool in the way), OpenAI requests, and measuring a response at the client.

use super::sse::{Event, Scanner};
use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One HTTP connection to a server (either protocol).
pub enum Conn {
    H1(SocketAddr, http1::SendRequest<Full<Bytes>>),
    H2(SocketAddr, http2::SendRequest<Full<Bytes>>),
}

async fn tcp(addr: SocketAddr) -> anyhow::Result<TokioIo<tokio::net::TcpStream>> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(TokioIo::new(s))
}

impl Conn {
    /// An HTTP/1.1 keep-alive connection; it serves one request at a time.
    pub async fn h1(addr: SocketAddr) -> anyhow::Result<Conn> {
        let (send, conn) = http1::handshake(tcp(addr).await?).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::H1(addr, send))
    }

    /// An HTTP/2 connection (prior knowledge, cleartext); clones share it for parallel streams.
    pub async fn h2(addr: SocketAddr) -> anyhow::Result<Conn> {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(tcp(addr).await?)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::H2(addr, send))
    }

    /// Another handle on the same HTTP/2 connection (for a parallel stream); HTTP/1.1
    /// connections carry one request at a time and cannot be shared.
    pub fn share(&self) -> Option<Conn> {
        match self {
            Conn::H1(..) => None,
            Conn::H2(a, s) => Some(Conn::H2(*a, s.clone())),
        }
    }

    /// Whether the connection can take another request: false once it has ended (the server
    /// closed it, or it failed), which after a failed request may take the connection's task a
    /// moment to notice (hence the wait, a second at most).
    pub async fn usable(&mut self) -> bool {
        let ready = async {
            match self {
                Conn::H1(_, s) => s.ready().await.is_ok(),
                Conn::H2(_, s) => s.ready().await.is_ok(),
            }
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ready).await,
            Ok(true)
        )
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Conn::H1(a, _) | Conn::H2(a, _) => *a,
        }
    }

    pub async fn send(
        &mut self,
        mut req: Request<Full<Bytes>>,
    ) -> anyhow::Result<Response<hyper::body::Incoming>> {
        let addr = self.addr();
        let r = match self {
            Conn::H1(_, s) => {
                // HTTP/1.1 to an origin server takes the origin form (`/path`), as hyper's
                // pooled client sends it; uvicorn routes the absolute form to a 404.
                if let Some(pq) = req.uri().path_and_query().cloned() {
                    *req.uri_mut() = pq.into();
                }
                s.ready()
                    .await
                    .with_context(|| format!("connection to {addr} closed"))?;
                s.send_request(req).await
            }
            Conn::H2(_, s) => {
                s.ready()
                    .await
                    .with_context(|| format!("connection to {addr} closed"))?;
                s.send_request(req).await
            }
        };
        r.with_context(|| format!("request to {addr}"))
    }
}

/// A chat completion request body.
pub fn chat_body(stream: bool, max_tokens: u32) -> Bytes {
    Bytes::from(
        json!({"model": super::serve::MODEL, "stream": stream, "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": "Benchmark prompt: say something."}]})
        .to_string(),
    )
}

/// `POST /v1/chat/completions` to `addr`, with a bearer key when given.
pub fn chat_request(addr: SocketAddr, key: Option<&str>, body: Bytes) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/chat/completions"))
        // HTTP/1.1 requires Host; hyper's server forgives its absence, uvicorn (Python
        // servers, `bench real-ttft`) answers 400.
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Full::new(body))
        .expect("static request parts are valid")
}

/// What the client saw of one streamed response.
#[derive(Debug, Default, Clone)]
pub struct StreamOutcome {
    pub status: u16,
    /// Request sent to first generated text.
    pub ttft: Option<Duration>,
    /// Arrival times of each text chunk after the first, relative to the previous one.
    pub gaps: Vec<Duration>,
    pub tokens: u32,
    pub done: bool,
    pub error: bool,
    pub total: Duration,
}

impl StreamOutcome {
    pub fn complete(&self, tokens: u32) -> bool {
        self.status == 200 && self.done && !self.error && self.tokens == tokens
    }
}

/// Times the generated text pieces of one response as they arrive, whatever carries them (SSE
/// events or `nearpath/1` `Token`s), so that every transport is measured by the same rule: TTFT
/// from the request being sent to the first piece, then the gap before each later one.
#[derive(Debug, Clone, Copy)]
pub struct TokenClock {
    t0: Instant,
    last: Instant,
    keep_gaps: bool,
}

impl TokenClock {
    /// Starts the clock; call it just before the request is sent.
    pub fn start(keep_gaps: bool) -> TokenClock {
        let t0 = Instant::now();
        TokenClock {
            t0,
            last: t0,
            keep_gaps,
        }
    }

    /// Records one piece of generated text that arrived at `now`; true for the first.
    pub fn token(&mut self, out: &mut StreamOutcome, now: Instant) -> bool {
        let first = out.ttft.is_none();
        if first {
            out.ttft = Some(now - self.t0);
        } else if self.keep_gaps {
            out.gaps.push(now - self.last);
        }
        self.last = now;
        out.tokens += 1;
        first
    }

    /// Time since the request was sent.
    pub fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }
}

/// Sends a streaming request and times each text chunk as its bytes arrive. `on_first` runs once
/// at the first text chunk (the streams benchmark counts open streams with it).
pub async fn stream_once(
    conn: &mut Conn,
    req: Request<Full<Bytes>>,
    keep_gaps: bool,
    on_first: impl FnMut(),
) -> anyhow::Result<StreamOutcome> {
    let clock = TokenClock::start(keep_gaps);
    let resp = conn.send(req).await?;
    read_stream(clock, conn.addr(), resp, on_first).await
}

/// Reads a streamed response whose request `clock` was started for (before any hop that led
/// to it: a redirect is part of what the client waits for), timing each text chunk.
pub async fn read_stream(
    mut clock: TokenClock,
    from: SocketAddr,
    resp: Response<hyper::body::Incoming>,
    mut on_first: impl FnMut(),
) -> anyhow::Result<StreamOutcome> {
    let mut out = StreamOutcome {
        status: resp.status().as_u16(),
        ..Default::default()
    };
    let mut body = resp.into_body();
    let mut scanner = Scanner::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("reading the stream from {from}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        scanner.feed(data, |ev| match ev {
            Event::Content => {
                if clock.token(&mut out, now) {
                    on_first();
                }
            }
            Event::Done => out.done = true,
            Event::Error => out.error = true,
            Event::Other => {}
        });
    }
    // A well-formed stream ends with a complete event; leftover bytes mean it was cut short.
    if scanner.pending() > 0 {
        out.error = true;
    }
    out.total = clock.elapsed();
    Ok(out)
}

/// Sends a non-streaming request, reads the whole body and checks it reports `tokens`
/// completion tokens. Returns the latency, or an error saying what was wrong.
pub async fn plain_once(
    conn: &mut Conn,
    req: Request<Full<Bytes>>,
    tokens: u32,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let resp = conn.send(req).await?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the body")?
        .to_bytes();
    let took = t0.elapsed();
    if status != StatusCode::OK {
        return Err(anyhow!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
    }
    let want = format!("\"completion_tokens\":{tokens}");
    if !body.windows(want.len()).any(|w| w == want.as_bytes()) {
        return Err(anyhow!(
            "the body lacks {want}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(took)
}

/// `GET` a JSON document from the admin API on a fresh connection.
pub async fn admin_get(addr: SocketAddr, path: &str, token: &str) -> anyhow::Result<Value> {
    let mut conn = Conn::h1(addr).await?;
    let req = Request::builder()
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .expect("static request parts are valid");
    let resp = conn.send(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        return Err(anyhow!(
            "GET {path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
}
