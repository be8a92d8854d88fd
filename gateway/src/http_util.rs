//! HTTP plumbing shared by the client API and the admin API: body types, JSON helpers, and
//! the accept loop (HTTP/1.1 and HTTP/2 on one listener, optional TLS, graceful shutdown).

use crate::conn_guard::HttpConnLimits;
use crate::metrics::{labels, Labels, Metrics};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;
use nearpath_config::HttpConfig;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
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

tokio::task_local! {
    /// The body read timeout of the listener serving the current request: [`serve`] runs every
    /// handler inside it, so that [`read_body`] applies `http.body_read_timeout_ms` without
    /// every handler passing it along.
    static BODY_READ_TIMEOUT: Duration;
}

/// The body read timeout outside [`serve`] (tools and tests calling handlers directly).
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a whole request body, refusing more than `limit` bytes without buffering them, and
/// giving up (`BodyError::Read`) if it has not all arrived within the listener's body read
/// timeout: a client trickling its body must not hold a handler (and its connection) forever.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let timeout = BODY_READ_TIMEOUT
        .try_with(|t| *t)
        .unwrap_or(DEFAULT_BODY_READ_TIMEOUT);
    if let Some(upper) = body.size_hint().upper() {
        if upper > limit as u64 {
            return Err(BodyError::TooLarge { limit });
        }
    }
    let collected = match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(c) => c,
        Err(_) => {
            return Err(BodyError::Read(format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            )))
        }
    };
    match collected {
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

/// What one listener enforces on its connections (from `[http]`; the admin listener uses the
/// same values with its own counters).
#[derive(Clone)]
pub struct ConnPolicy {
    /// A connection's first request head must arrive this soon after it is accepted (and, on
    /// HTTP/1.1, every later one this soon after the previous response).
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// A request body must arrive within this long of the handler reading it.
    pub body_read_timeout: Duration,
    /// Closed after this long without a request in flight.
    pub idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    pub limits: Arc<HttpConnLimits>,
    /// Peers exempt from the per-source cap (trusted proxies carry many clients).
    pub exempt: Vec<IpNet>,
    refused: Family<Labels, Counter>,
    timed_out: Family<Labels, Counter>,
}

impl ConnPolicy {
    pub fn from_config(http: &HttpConfig, metrics: &Metrics) -> ConnPolicy {
        ConnPolicy {
            header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
            tls_handshake_timeout: Duration::from_millis(http.tls_handshake_timeout_ms),
            body_read_timeout: Duration::from_millis(http.body_read_timeout_ms),
            idle_timeout: Duration::from_millis(http.idle_timeout_ms),
            http2_max_concurrent_streams: http.http2_max_concurrent_streams,
            max_header_list_bytes: http.max_header_list_bytes,
            limits: HttpConnLimits::new(http.max_connections, http.max_connections_per_ip),
            exempt: http.trusted_proxies.clone(),
            refused: metrics.http_connections_refused.clone(),
            timed_out: metrics.http_connections_timed_out.clone(),
        }
    }

    fn count_timeout(&self, listener: &'static str, phase: &'static str) {
        self.timed_out
            .get_or_create(&labels([("listener", listener), ("phase", phase)]))
            .inc();
    }
}

/// Requests in flight on one connection and when it last started or finished one; the idle and
/// first-header watchdog reads it.
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Completes when the connection has been without a request for too long, naming the
    /// phase: `header` (no first request head in time) or `idle`.
    async fn watchdog(&self, header_timeout: Duration, idle_timeout: Duration) -> &'static str {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // Busy: look again later (a request's own timeouts bound it meanwhile).
                tokio::time::sleep(idle_timeout.min(header_timeout)).await;
                continue;
            }
            let (limit, phase) = if self.requests.load(Ordering::Relaxed) == 0 {
                (header_timeout, "header")
            } else {
                (idle_timeout, "idle")
            };
            let deadline =
                self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit;
            if Instant::now() >= deadline {
                return phase;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// One request in flight; held by its response body until the body is done.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it is finished.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves HTTP/1.1 and HTTP/2 (h2c by prior knowledge, or ALPN `h2` over TLS) until `shutdown`,
/// then lets open connections finish their in-flight requests. Connections beyond the caps of
/// `policy` are closed at once; slow handshakes, slow headers and idle connections are closed.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Arc<H>,
    name: &'static str,
    shutdown: CancellationToken,
    policy: ConnPolicy,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conn_id: u64 = 0;
    // hyper applies no timeout at all without a timer (slowloris); the builder is shared.
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(policy.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(policy.http2_max_concurrent_streams)
        .max_header_list_size(policy.max_header_list_bytes);
    let builder = Arc::new(builder);
    let policy = Arc::new(policy);
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
        let exempt = policy.exempt.iter().any(|n| n.contains(&peer.ip()));
        let slot = match policy.limits.admit(peer.ip(), exempt) {
            Ok(s) => s,
            Err(r) => {
                policy
                    .refused
                    .get_or_create(&labels([("listener", name), ("reason", r.as_str())]))
                    .inc();
                debug!(listener = name, %peer, reason = r.as_str(), "connection refused");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        conn_id += 1;
        let handler = handler.clone();
        let activity = Activity::new();
        let body_timeout = policy.body_read_timeout;
        let svc = {
            let activity = activity.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let h = handler.clone();
                let in_flight = activity.begin();
                async move {
                    let resp = BODY_READ_TIMEOUT
                        .scope(body_timeout, h.handle(req, peer))
                        .await;
                    Ok::<_, Infallible>(resp.map(|body| Tracked {
                        body,
                        _in_flight: in_flight,
                    }))
                }
            })
        };
        let span = info_span!("http_conn", listener = name, conn = conn_id, %peer);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let builder = builder.clone();
        let policy = policy.clone();
        tokio::spawn(
            async move {
                let _slot = slot;
                let served = {
                    let activity = activity.clone();
                    let policy = policy.clone();
                    async move {
                        match tls {
                            None => {
                                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                                watcher.watch(conn.into_owned()).await
                            }
                            Some(acceptor) => {
                                match tokio::time::timeout(
                                    policy.tls_handshake_timeout,
                                    acceptor.accept(stream),
                                )
                                .await
                                {
                                    Ok(Ok(s)) => {
                                        // The first request's deadline starts after the handshake.
                                        activity.touch();
                                        let conn = builder.serve_connection(TokioIo::new(s), svc);
                                        watcher.watch(conn.into_owned()).await
                                    }
                                    Ok(Err(e)) => {
                                        debug!(error = %e, "TLS handshake failed");
                                        Ok(())
                                    }
                                    Err(_) => {
                                        debug!("TLS handshake timed out");
                                        policy.count_timeout(name, "tls");
                                        Ok(())
                                    }
                                }
                            }
                        }
                    }
                };
                let res = tokio::select! {
                    r = served => r,
                    phase = activity.watchdog(policy.header_read_timeout, policy.idle_timeout) => {
                        debug!(phase, "closing a slow or idle connection");
                        policy.count_timeout(name, phase);
                        Ok(())
                    }
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
