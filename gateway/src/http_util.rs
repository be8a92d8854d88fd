//! HTTP plumbing shared by the client API and the admin API: body types, JSON helpers, and
//! the accept loop (HTTP/1.1 and HTTP/2 on one listener, optional TLS, graceful shutdown).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

/// The response body type of every handler: either a complete buffer or a stream fed by a
/// channel (SSE). Dropping a streaming body drops the channel receiver, which is how a handler
/// learns that its client went away.
pub enum Body {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
}

impl Body {
    pub fn empty() -> Self {
        Body::Full(None)
    }
    pub fn from_bytes(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Channel(_) => SizeHint::default(),
        }
    }
}

pub type Resp = Response<Body>;

/// A JSON response with the given status.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(v) => with_type(status, "application/json", v),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    }
}

/// A response with a body and content type.
pub fn with_type(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Body::from_bytes(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The admin API's error shape: `{"error":{"message","code"}}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Resp {
    json(
        status,
        &serde_json::json!({"error": {"message": message, "code": code}}),
    )
}

/// Why reading a request body failed.
#[derive(Debug)]
pub enum BodyError {
    TooLarge { limit: usize },
    Read(String),
}

/// Reads a whole request body, refusing more than `limit` bytes without buffering them.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    if let Some(upper) = body.size_hint().upper() {
        if upper > limit as u64 {
            return Err(BodyError::TooLarge { limit });
        }
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(BodyError::TooLarge { limit })
            } else {
                Err(BodyError::Read(e.to_string()))
            }
        }
    }
}

/// Bearer token from the Authorization header, if any.
pub fn bearer<B>(req: &Request<B>) -> Option<&str> {
    let v = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Constant-time comparison for secrets held in memory (the admin token).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A request handler: the peer address is the TCP peer (proxy headers are the handler's business).
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Resp> + Send>>;
}

/// Serves HTTP/1.1 and HTTP/2 (h2c by prior knowledge, or ALPN `h2` over TLS) until `shutdown`,
/// then lets open connections finish their in-flight requests.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Arc<H>,
    name: &'static str,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conn_id: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        conn_id += 1;
        let handler = handler.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let h = handler.clone();
            async move { Ok::<_, Infallible>(h.handle(req, peer).await) }
        });
        let span = info_span!("http_conn", listener = name, conn = conn_id, %peer);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(
            async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let res = match tls {
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(s) => {
                            let conn = builder.serve_connection(TokioIo::new(s), svc);
                            watcher.watch(conn.into_owned()).await
                        }
                        Err(e) => {
                            debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                    },
                };
                if let Err(e) = res {
                    debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    // Bounded: a client holding a stream open must not keep the process alive forever.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
}

/// A complete body for client requests in tests and tools.
pub fn full(b: impl Into<Bytes>) -> Full<Bytes> {
    Full::new(b.into())
}
