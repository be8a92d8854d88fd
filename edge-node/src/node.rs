//! The edge node's connection to its gateway: dial out over QUIC, register, heartbeat, serve the
//! session streams the gateway opens, reconnect with backoff, drain on shutdown.

use crate::backoff::Backoff;
use crate::bootstrap::fetch_gateway_list;
use crate::gateways::{Action, Selector};
use crate::gpu::GpuMonitor;
use crate::sessions::{SessionContext, Sessions};
use nearpath_config::NodeConfig;
use nearpath_protocol::message::{
    Capacity, Drain, Gpu, Heartbeat, Message, NodeEncoder, Register, RejectCode, Workloads,
};
use nearpath_protocol::stream::priority;
use nearpath_protocol::stream::{send, FramedRecv, StreamError};
use nearpath_protocol::tls::{
    client_config_with, parse_sha256_hex, PinMismatch, ServerVerify, TransportOptions,
};
use nearpath_protocol::{app_code, ALPN_NODE, MAX_CONTROL_FRAME, PROTOCOL_VERSION};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

/// Why the node stopped for good. Transient failures (gateway unreachable, connection lost) are
/// retried and never surface here.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("config: {0}")]
    Config(String),
    #[error("TLS: {0}")]
    Tls(#[from] nearpath_protocol::tls::TlsError),
    #[error("QUIC endpoint: {0}")]
    Endpoint(String),
    /// The gateway refused this node for a reason retrying cannot fix.
    #[error("gateway {gateway} rejected the node ({code}): {reason}")]
    Rejected {
        gateway: String,
        code: RejectCode,
        reason: String,
    },
    /// Every gateway the node knows presented a certificate that is not pinned (address and
    /// mismatch of each). Retrying cannot fix it: the pin or the gateway's certificate must
    /// change.
    #[error("{}", untrusted_message(.0))]
    Untrusted(Vec<(String, PinMismatch)>),
}

fn untrusted_message(gateways: &[(String, PinMismatch)]) -> String {
    let each: Vec<String> = gateways
        .iter()
        .map(|(address, mismatch)| format!("gateway {address}: {mismatch}"))
        .collect();
    match each.as_slice() {
        [one] => one.clone(),
        _ => format!(
            "no gateway presented a pinned certificate: {}",
            each.join("; ")
        ),
    }
}

/// Why one connection attempt failed.
#[derive(Debug)]
enum DialError {
    /// The gateway presented a certificate that is not pinned: never retried.
    Untrusted(PinMismatch),
    /// Nothing answered within the bound (`bounded`: the selector's attempt timeout, so the
    /// path may come back any moment) or QUIC's idle timeout.
    NoAnswer { addr: SocketAddr, bounded: bool },
    /// Anything else (resolution, local socket, a refused or broken handshake).
    Other(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Untrusted(m) => write!(f, "{m}"),
            DialError::NoAnswer { addr, .. } => write!(f, "no gateway answering at {addr} (UDP)"),
            DialError::Other(e) => f.write_str(e),
        }
    }
}

impl DialError {
    /// The error of a handshake with `addr` that QUIC ended with `e`.
    fn handshake(addr: SocketAddr, e: quinn::ConnectionError) -> DialError {
        if let Some(m) = PinMismatch::from_connection_error(&e) {
            return DialError::Untrusted(m);
        }
        match e {
            quinn::ConnectionError::TimedOut => DialError::NoAnswer {
                addr,
                bounded: false,
            },
            e => DialError::Other(format!("connecting to {addr}: {e}")),
        }
    }
}

/// What the node is doing now (for the demo's console, tests and logs).
#[derive(Debug, Clone, PartialEq)]
pub enum NodeStatus {
    Connecting {
        attempt: u32,
    },
    /// Registered with the gateway at `gateway` (its configured or listed QUIC address).
    Registered {
        country: Option<String>,
        gateway: String,
    },
    Rejected {
        code: RejectCode,
        reason: String,
    },
    Draining,
    Stopped,
}

/// Knobs that are not config (tests and the demo set them).
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Probe NVML for GPUs. Tests turn it off for determinism.
    pub use_nvml: bool,
    /// Overrides the certificate check from config (the demo pins its in-memory certificate).
    pub verify: Option<ServerVerify>,
    /// Local address to dial from (tests use 127.0.0.x to look like different places).
    pub bind: Option<SocketAddr>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            use_nvml: true,
            verify: None,
            bind: None,
        }
    }
}

pub struct EdgeNode {
    config: NodeConfig,
    verify: ServerVerify,
    gpus: GpuMonitor,
    sessions: Arc<Sessions>,
    bind: Option<SocketAddr>,
    status: watch::Sender<NodeStatus>,
    /// Model sizes read from upstream servers, for the `Inventory`.
    weights: crate::inventory::WeightsDetector,
}

/// How the session with one gateway connection ended.
enum ConnEnd {
    /// Lost or closed by the gateway: reconnect.
    Reconnect(String),
    /// Nothing at all arrived from the gateway for its lease: the path is down (the gateway
    /// has given this connection up too). Reconnect quickly, with this round-trip time.
    Silent(String, Duration),
    /// We drained and said goodbye: stop.
    Drained,
}

impl EdgeNode {
    pub fn new(config: NodeConfig, opts: NodeOptions) -> Result<EdgeNode, NodeError> {
        let verify = match opts.verify {
            Some(v) => v,
            None => {
                let g = &config.gateway;
                match (
                    &g.ca_file,
                    &g.pinned_cert_sha256,
                    g.pinned_cert_sha256s.is_empty(),
                ) {
                    (Some(ca), None, true) => ServerVerify::CaFile(ca.clone()),
                    (None, Some(pin), true) => ServerVerify::PinnedSha256(parse_sha256_hex(pin)?),
                    (None, None, false) => ServerVerify::PinnedAnySha256(
                        g.pinned_cert_sha256s
                            .iter()
                            .map(|pin| parse_sha256_hex(pin))
                            .collect::<Result<_, _>>()?,
                    ),
                    _ => {
                        return Err(NodeError::Config(
                            "exactly one of gateway.ca_file, gateway.pinned_cert_sha256 and \
                         gateway.pinned_cert_sha256s is required"
                                .into(),
                        ))
                    }
                }
            }
        };
        if config.gateway.gateway_addresses().is_empty() && config.gateway.bootstrap_url.is_none() {
            return Err(NodeError::Config(
                "gateway.address: required: set one of gateway.address, gateway.addresses or \
                 gateway.bootstrap_url"
                    .into(),
            ));
        }
        if config
            .node
            .enrolment_token
            .as_deref()
            .unwrap_or("")
            .is_empty()
        {
            return Err(NodeError::Config("node.enrolment_token: required".into()));
        }
        let gpus = GpuMonitor::detect(&config.gpus, &config.gpu_classes, opts.use_nvml);
        let sessions = Arc::new(Sessions::new(&config).map_err(NodeError::Config)?);
        let (status, _) = watch::channel(NodeStatus::Connecting { attempt: 0 });
        let weights = crate::inventory::WeightsDetector::new(&config);
        Ok(EdgeNode {
            weights,
            config,
            verify,
            gpus,
            sessions,
            bind: opts.bind,
            status,
        })
    }

    /// Follow the node's status.
    pub fn status(&self) -> watch::Receiver<NodeStatus> {
        self.status.subscribe()
    }

    pub fn sessions(&self) -> Arc<Sessions> {
        self.sessions.clone()
    }

    fn register_message(&self) -> Register {
        let gpus = self
            .gpus
            .gpus()
            .iter()
            .map(|g| Gpu {
                model: g.model.clone(),
                class: g.class.clone(),
                vram_mib: g.vram_mib,
            })
            .collect();
        Register {
            protocol_version: PROTOCOL_VERSION,
            node_id: self.config.node.id.clone(),
            enrolment_token: self.config.node.enrolment_token.clone().unwrap_or_default(),
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            gpus,
            workloads: Workloads {
                games: self.config.games.iter().map(|g| g.title.clone()).collect(),
                models: self.config.models.iter().map(|m| m.name.clone()).collect(),
                model_caps: self
                    .config
                    .models
                    .iter()
                    .map(crate::inference::configured_caps)
                    .collect(),
            },
            capacity: Capacity {
                game_sessions: self.config.capacity.game_sessions,
                inference_concurrency: self.config.capacity.inference_concurrency,
            },
            encoders: if self.config.games.is_empty() {
                Vec::new()
            } else {
                self.sessions
                    .encoders()
                    .offered()
                    .iter()
                    .map(|e| NodeEncoder {
                        codec: e.codec,
                        implementation: e.implementation.to_string(),
                    })
                    .collect()
            },
        }
    }

    /// Runs until `shutdown` (then drains and returns Ok) or a permanent rejection (Err).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), NodeError> {
        let span = info_span!("edge_node", node_id = %self.config.node.id);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(self, shutdown: CancellationToken) -> Result<(), NodeError> {
        let client_cfg = client_config_with(
            self.verify.clone(),
            &[ALPN_NODE],
            &transport_options(&self.config),
        )?;
        let gw = &self.config.gateway;
        let backoff = Backoff::new(
            Duration::from_millis(gw.reconnect_initial_ms),
            Duration::from_millis(gw.reconnect_max_ms),
        );
        let mut selector = Selector::new(
            gw.gateway_addresses(),
            gw.bootstrap_url.is_some(),
            backoff,
            Duration::from_millis(gw.connect_timeout_ms),
        );
        let mut endpoint: Option<quinn::Endpoint> = None;
        // Connections made by the last probe, kept so the chosen gateway is not dialled twice.
        let mut probed: Vec<Option<quinn::Connection>> = Vec::new();
        // The gateways that presented a certificate that is not pinned, with the mismatch.
        let mut untrusted: Vec<(String, PinMismatch)> = Vec::new();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let now = std::time::Instant::now();
            let index = match selector.poll(now) {
                Action::WaitUntil(until) => {
                    let wait = until.saturating_duration_since(now);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
                Action::Fetch => {
                    let list = tokio::select! {
                        list = self.fetch_gateway_list() => list,
                        _ = shutdown.cancelled() => break,
                    };
                    match &list {
                        Ok(l) => info!(gateways = l.len(), "fetched the gateway list"),
                        Err(e) => warn!(error = %e, "cannot fetch the gateway list"),
                    }
                    selector.handle_fetched(std::time::Instant::now(), list, rand::random());
                    continue;
                }
                Action::Probe => {
                    let _ = self.status.send(NodeStatus::Connecting {
                        attempt: selector.attempts(),
                    });
                    let limit = selector
                        .attempt_timeout(now)
                        .unwrap_or(Duration::from_millis(gw.connect_timeout_ms));
                    // Gateways that presented an untrusted certificate are not probed again.
                    let addresses: Vec<Option<String>> = selector
                        .addresses()
                        .into_iter()
                        .enumerate()
                        .map(|(i, a)| (!selector.is_untrusted(i)).then_some(a))
                        .collect();
                    let mut results = tokio::select! {
                        r = self.probe(&addresses, &client_cfg, &mut endpoint, limit) => r,
                        _ = shutdown.cancelled() => break,
                    };
                    for (i, result) in results.iter_mut().enumerate() {
                        if let Err(DialError::Untrusted(m)) = result {
                            let address = selector.address(i).to_string();
                            error!(gateway = %address, error = %m, "the gateway's certificate is not pinned: not dialling it again");
                            untrusted.push((address, m.clone()));
                            selector.handle_untrusted(std::time::Instant::now(), i, rand::random());
                        }
                    }
                    let addresses: Vec<String> = addresses
                        .into_iter()
                        .map(Option::unwrap_or_default)
                        .collect();
                    let rtts: Vec<Option<Duration>> = results
                        .iter()
                        .map(|r| r.as_ref().ok().map(|(_, rtt)| *rtt))
                        .collect();
                    info!(
                        rtts_ms = ?addresses.iter().zip(&rtts).map(|(a, r)| (a.as_str(), r.map(|d| d.as_millis() as u64))).collect::<Vec<_>>(),
                        "measured the round trip to each gateway"
                    );
                    probed = results
                        .into_iter()
                        .map(|r| r.ok().map(|(c, _)| c))
                        .collect();
                    selector.handle_probed(std::time::Instant::now(), &rtts, rand::random());
                    continue;
                }
                Action::Connect(i) => i,
                Action::GiveUp => {
                    let e = NodeError::Untrusted(std::mem::take(&mut untrusted));
                    error!(error = %e, "giving up: no gateway presents a pinned certificate");
                    for conn in probed.drain(..).flatten() {
                        conn.close(app_code::CLOSE_SHUTDOWN, b"probe");
                    }
                    let _ = self.status.send(NodeStatus::Stopped);
                    return Err(e);
                }
            };
            // Connections from the probe to the gateways not chosen are closed now.
            let reused = probed.get_mut(index).and_then(Option::take);
            for conn in probed.drain(..).flatten() {
                conn.close(app_code::CLOSE_SHUTDOWN, b"probe");
            }
            let address = selector.address(index).to_string();
            let _ = self.status.send(NodeStatus::Connecting {
                attempt: selector.attempts(),
            });
            let limit = selector.attempt_timeout(now);
            let outcome = match reused {
                Some(conn) => Ok(conn),
                None => self.dial(&address, &client_cfg, &mut endpoint, limit).await,
            };
            let conn = match outcome {
                Ok(c) => c,
                Err(DialError::Untrusted(m)) => {
                    error!(gateway = %address, error = %m, "the gateway's certificate is not pinned: not dialling it again");
                    untrusted.push((address, m));
                    selector.handle_untrusted(std::time::Instant::now(), index, rand::random());
                    continue;
                }
                Err(e) => {
                    let timed_out = matches!(e, DialError::NoAnswer { bounded: true, .. });
                    if timed_out {
                        info!(gateway = %address, error = %e, "gateway unreachable; trying again");
                    } else {
                        warn!(gateway = %address, error = %e, "gateway unreachable");
                    }
                    selector.handle_connect_failed(
                        std::time::Instant::now(),
                        index,
                        timed_out,
                        rand::random(),
                    );
                    continue;
                }
            };
            match self
                .serve_connection(conn, &address, &shutdown, &mut selector, index)
                .await
            {
                Ok(ConnEnd::Drained) => break,
                Ok(ConnEnd::Silent(why, rtt)) => {
                    warn!(gateway = %address, reason = %why, "the gateway went silent; reconnecting");
                    selector.handle_lost(
                        std::time::Instant::now(),
                        index,
                        Some(rtt),
                        rand::random(),
                    );
                }
                Ok(ConnEnd::Reconnect(why)) => {
                    warn!(gateway = %address, reason = %why, "disconnected from the gateway");
                    if selector.current() == Some(index) {
                        selector.handle_lost(
                            std::time::Instant::now(),
                            index,
                            None,
                            rand::random(),
                        );
                    } else {
                        selector.handle_connect_failed(
                            std::time::Instant::now(),
                            index,
                            false,
                            rand::random(),
                        );
                    }
                }
                Err(e) => {
                    error!(error = %e, "giving up");
                    let _ = self.status.send(NodeStatus::Stopped);
                    return Err(e);
                }
            }
        }
        for conn in probed.drain(..).flatten() {
            conn.close(app_code::CLOSE_SHUTDOWN, b"probe");
        }
        // Sessions still running (we lost the gateway while shutting down) get the deadline too.
        self.sessions
            .wait_idle(Duration::from_millis(self.config.drain.deadline_ms))
            .await;
        if let Some(ep) = endpoint {
            ep.close(app_code::CLOSE_SHUTDOWN, b"node stopped");
            let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
        }
        let _ = self.status.send(NodeStatus::Stopped);
        info!("node stopped");
        Ok(())
    }

    /// One QUIC handshake with the gateway at `address`, bounded by `limit` when given (errors
    /// from a bounded attempt that ran out start with [`FAST_TIMEOUT`]).
    async fn dial(
        &self,
        address: &str,
        client_cfg: &quinn::ClientConfig,
        endpoint: &mut Option<quinn::Endpoint>,
        limit: Option<Duration>,
    ) -> Result<quinn::Connection, DialError> {
        let addr = resolve(address).await.map_err(DialError::Other)?;
        let ep = match endpoint {
            Some(ep) => ep.clone(),
            None => {
                let bind = self
                    .bind
                    .unwrap_or_else(|| nearpath_protocol::net::unspecified_for(addr));
                let (ep, _) =
                    nearpath_protocol::net::client_endpoint(bind, client_cfg.clone(), 1 << 21)
                        .map_err(|e| DialError::Other(format!("binding {bind}: {e}")))?;
                *endpoint = Some(ep.clone());
                ep
            }
        };
        let server_name = self
            .config
            .gateway
            .server_name
            .clone()
            .unwrap_or_else(|| host_part(address).to_string());
        let connecting = ep
            .connect(addr, &server_name)
            .map_err(|e| DialError::Other(format!("connecting to {addr}: {e}")))?;
        // A bounded attempt that gets no answer is abandoned and a new one started: QUIC backs
        // off its handshake retransmissions exponentially, so one attempt begun during an
        // outage might not speak again until seconds after the path returns, while a fresh one
        // speaks at once; and with several gateways, a dead one must not hold up the others.
        match limit {
            Some(limit) => {
                tokio::time::timeout(limit, connecting)
                    .await
                    .map_err(|_| DialError::NoAnswer {
                        addr,
                        bounded: true,
                    })?
            }
            None => connecting.await,
        }
        .map_err(|e| DialError::handshake(addr, e))
    }

    /// Handshakes with every gateway at once (`None`: skipped); each result is the connection
    /// and its handshake time (about one round trip plus the gateway's TLS work), or why it
    /// failed or took longer than `limit`.
    async fn probe(
        &self,
        addresses: &[Option<String>],
        client_cfg: &quinn::ClientConfig,
        endpoint: &mut Option<quinn::Endpoint>,
        limit: Duration,
    ) -> Vec<Result<(quinn::Connection, Duration), DialError>> {
        // The endpoint is created once, before the concurrent handshakes share it.
        if endpoint.is_none() {
            if let Some(first) = addresses.iter().flatten().next() {
                let _ = self.dial_endpoint(first, client_cfg, endpoint).await;
            }
        }
        let ep = endpoint.clone();
        let attempts = addresses.iter().map(|address| {
            let ep = ep.clone();
            async move {
                let address = address
                    .as_deref()
                    .ok_or_else(|| DialError::Other("skipped".into()))?;
                let ep = ep.ok_or_else(|| DialError::Other("no QUIC endpoint".into()))?;
                let addr = resolve(address).await.map_err(DialError::Other)?;
                let server_name = self
                    .config
                    .gateway
                    .server_name
                    .clone()
                    .unwrap_or_else(|| host_part(address).to_string());
                let started = tokio::time::Instant::now();
                let connecting = ep
                    .connect(addr, &server_name)
                    .map_err(|e| DialError::Other(format!("connecting to {addr}: {e}")))?;
                let conn = tokio::time::timeout(limit, connecting)
                    .await
                    .map_err(|_| DialError::NoAnswer {
                        addr,
                        bounded: true,
                    })?
                    .map_err(|e| DialError::handshake(addr, e))?;
                Ok((conn, started.elapsed()))
            }
        });
        futures_join_all(attempts).await
    }

    /// Creates the QUIC endpoint (bound like [`EdgeNode::dial`] would) without dialling.
    async fn dial_endpoint(
        &self,
        address: &str,
        client_cfg: &quinn::ClientConfig,
        endpoint: &mut Option<quinn::Endpoint>,
    ) -> Result<(), String> {
        let addr = resolve(address).await?;
        let bind = self
            .bind
            .unwrap_or_else(|| nearpath_protocol::net::unspecified_for(addr));
        let (ep, _) = nearpath_protocol::net::client_endpoint(bind, client_cfg.clone(), 1 << 21)
            .map_err(|e| format!("binding {bind}: {e}"))?;
        *endpoint = Some(ep);
        Ok(())
    }

    /// Fetches the bootstrap URL's gateway list; with pins, only pinned gateways are kept.
    async fn fetch_gateway_list(&self) -> Result<Vec<String>, String> {
        let gw = &self.config.gateway;
        let url = gw.bootstrap_url.as_deref().unwrap_or_default();
        let pins = gw.pins();
        let pins = gw.ca_file.is_none().then_some(pins.as_slice());
        fetch_gateway_list(url, gw.bootstrap_api_key.as_deref(), pins).await
    }

    async fn serve_connection(
        &self,
        conn: quinn::Connection,
        address: &str,
        shutdown: &CancellationToken,
        selector: &mut Selector,
        index: usize,
    ) -> Result<ConnEnd, NodeError> {
        let (mut ctl_send, ctl_recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                return Ok(ConnEnd::Reconnect(format!(
                    "opening the control stream: {e}"
                )))
            }
        };
        // Heartbeats and control messages go before anything else the node sends, so a
        // congested video stream never makes the node look gone.
        let _ = ctl_send.set_priority(priority::CONTROL);
        let mut ctl = FramedRecv::new(ctl_recv, MAX_CONTROL_FRAME);
        if let Err(e) = send(&mut ctl_send, &Message::Register(self.register_message())).await {
            return Ok(ConnEnd::Reconnect(format!("sending Register: {e}")));
        }
        let registered = match tokio::time::timeout(Duration::from_secs(10), ctl.next()).await {
            Ok(Ok(Some(Message::Registered(r)))) => r,
            Ok(Ok(Some(Message::Rejected(r)))) => {
                let _ = self.status.send(NodeStatus::Rejected {
                    code: r.code,
                    reason: r.reason.clone(),
                });
                conn.close(app_code::CLOSE_REJECTED, b"rejected");
                // KYC can be approved (or a suspension lifted) while the node waits, so those
                // keep retrying at the backoff ceiling; a bad token, the geofence or a version
                // mismatch need the operator to change something, so the node stops.
                let keep_trying = r.code.is_retryable()
                    || matches!(
                        r.code,
                        RejectCode::OperatorNotVerified | RejectCode::OperatorSuspended
                    );
                return if keep_trying {
                    if r.code == RejectCode::Duplicate {
                        // Either a second instance runs with this node id (it must not displace the
                        // live one, so it backs off for good measure), or this node restarted
                        // before the gateway noticed its old connection die (it takes over once
                        // that connection has been silent for two heartbeat intervals).
                        error!(reason = %r.reason, "the gateway has a live connection with this node id: is another instance running with the same node.id? backing off and retrying");
                    } else {
                        warn!(code = %r.code, reason = %r.reason, "registration refused; will retry");
                    }
                    Ok(ConnEnd::Reconnect(format!("rejected: {}", r.reason)))
                } else {
                    Err(NodeError::Rejected {
                        gateway: address.to_string(),
                        code: r.code,
                        reason: r.reason,
                    })
                };
            }
            Ok(Ok(Some(other))) => {
                return Ok(ConnEnd::Reconnect(format!(
                    "expected Registered, got {}",
                    other.name()
                )))
            }
            Ok(Ok(None)) => {
                return Ok(ConnEnd::Reconnect(
                    "gateway closed the control stream".into(),
                ))
            }
            Ok(Err(e)) => {
                return Ok(ConnEnd::Reconnect(format!(
                    "reading the registration answer: {e}"
                )))
            }
            Err(_) => {
                return Ok(ConnEnd::Reconnect(
                    "no registration answer within 10 s".into(),
                ))
            }
        };
        selector.handle_registered(std::time::Instant::now(), index);
        info!(gateway = %address, country = ?registered.node_country, heartbeat_ms = registered.heartbeat_ms, "registered with the gateway");
        // Once per connection, after `Registered`: only a gateway that admitted the node learns
        // its hardware identities. It goes before the status says registered, so whoever
        // watches the status finds it already on the wire.
        // Sizes the configuration does not give are read from the upstream servers (once;
        // at most `DETECT_TIMEOUT` here, and the gateway's checker waits for the inventory).
        let detected = self.weights.detect(crate::inventory::DETECT_TIMEOUT).await;
        let inventory = crate::inventory::inventory(
            &self.config,
            self.gpus.gpus(),
            self.sessions.encoders().h264_name(),
            &detected,
        );
        match send(&mut ctl_send, &Message::Inventory(inventory)).await {
            Ok(()) => {}
            Err(e @ StreamError::TooLarge { .. }) => {
                // Advisory: the gateway's checker treats the node as unreported, which is
                // better than not serving at all.
                warn!(error = %e, "the inventory does not fit in a control frame; not sent");
            }
            Err(e) => return Ok(ConnEnd::Reconnect(format!("sending Inventory: {e}"))),
        }
        let _ = self.status.send(NodeStatus::Registered {
            country: registered.node_country.clone(),
            gateway: address.to_string(),
        });
        let ctx = SessionContext { conn: conn.clone() };
        let conn_done = CancellationToken::new();
        let acceptor = tokio::spawn(self.sessions.clone().accept_loop(ctx, conn_done.clone()));
        let result = self
            .control_loop(
                &conn,
                &mut ctl_send,
                &mut ctl,
                registered.heartbeat_ms,
                registered.lease_ms,
                shutdown,
            )
            .await;
        conn_done.cancel();
        let _ = acceptor.await;
        Ok(result)
    }

    async fn control_loop(
        &self,
        conn: &quinn::Connection,
        ctl_send: &mut quinn::SendStream,
        ctl: &mut FramedRecv,
        heartbeat_ms: u64,
        lease_ms: u64,
        shutdown: &CancellationToken,
    ) -> ConnEnd {
        let mut tick = tokio::time::interval(Duration::from_millis(heartbeat_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // The gateway acknowledges every heartbeat (QUIC ACKs and `HeartbeatAck`), so a
        // connection that received nothing at all for the lease has lost its path, and the
        // gateway, which heard nothing either, has given it up. Its close is lost with the path
        // and QUIC's own probes back off for seconds: the node notices by itself and redials.
        let lease = Duration::from_millis(lease_ms.max(heartbeat_ms.saturating_mul(2)).max(10));
        let mut rx_seen = (conn.stats().udp_rx.datagrams, tokio::time::Instant::now());
        // Set when we are draining: the deadline by which sessions must be done.
        let mut drain_until: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let rx = conn.stats().udp_rx.datagrams;
                    let now = tokio::time::Instant::now();
                    if rx != rx_seen.0 {
                        rx_seen = (rx, now);
                    } else if now - rx_seen.1 >= lease && drain_until.is_none() {
                        let rtt = conn.rtt();
                        conn.close(app_code::CLOSE_LEASE_EXPIRED, b"gateway silent");
                        return ConnEnd::Silent(format!("nothing received from the gateway for {} ms", (now - rx_seen.1).as_millis()), rtt);
                    }
                    seq += 1;
                    let hb = Heartbeat {
                        seq,
                        active_sessions: self.sessions.active(),
                        queue_depth: 0,
                        load: self.sessions.load(),
                        gpu_util: self.gpus.utilisation(),
                        encoder_ms_p50: self.sessions.encoder_ms_p50(),
                    };
                    if let Err(e) = send(ctl_send, &Message::Heartbeat(hb)).await {
                        return ConnEnd::Reconnect(format!("sending a heartbeat: {e}"));
                    }
                    if let Some(until) = drain_until {
                        if self.sessions.active() == 0 || tokio::time::Instant::now() >= until {
                            if self.sessions.active() > 0 {
                                warn!(left = self.sessions.active(), "drain deadline passed; ending remaining sessions");
                                self.sessions.cancel_all();
                            }
                            let _ = send(ctl_send, &Message::Drained).await;
                            let _ = ctl_send.finish();
                            // Wait for the gateway to close, bounded, so Drained is delivered.
                            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                            conn.close(app_code::CLOSE_SHUTDOWN, b"drained");
                            return ConnEnd::Drained;
                        }
                    }
                }
                msg = ctl.next() => match msg {
                    Ok(Some(Message::HeartbeatAck(_))) => {}
                    Ok(Some(Message::Drain(Drain { deadline_ms }))) => {
                        // Asked by the gateway operator: stop taking sessions, finish, stay connected.
                        info!(deadline_ms, "gateway asked this node to drain");
                        self.sessions.set_draining(true);
                    }
                    Ok(Some(Message::Shutdown(s))) => {
                        return ConnEnd::Reconnect(format!("gateway shut the connection: {}", s.reason));
                    }
                    Ok(Some(other)) => warn!(message = other.name(), "unexpected control message; ignoring"),
                    Ok(None) => return ConnEnd::Reconnect("gateway closed the control stream".into()),
                    Err(e) => return ConnEnd::Reconnect(format!("control stream: {e}")),
                },
                _ = shutdown.cancelled(), if drain_until.is_none() => {
                    let deadline_ms = self.config.drain.deadline_ms;
                    info!(deadline_ms, active = self.sessions.active(), "shutting down: draining");
                    let _ = self.status.send(NodeStatus::Draining);
                    self.sessions.set_draining(true);
                    if send(ctl_send, &Message::Drain(Drain { deadline_ms })).await.is_err() {
                        return ConnEnd::Drained;
                    }
                    drain_until = Some(tokio::time::Instant::now() + Duration::from_millis(deadline_ms));
                    // Check at a finer grain than the heartbeat while draining.
                    tick = tokio::time::interval(Duration::from_millis(heartbeat_ms.clamp(10, 100)));
                }
                _ = conn.closed() => {
                    return ConnEnd::Reconnect(conn.close_reason().map(|r| r.to_string()).unwrap_or_default());
                }
            }
        }
    }
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in set.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

async fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Ok(a);
    }
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("resolving {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolving {address}: no addresses"))
}

fn host_part(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address)
}

/// The node's QUIC transport: quinn's defaults plus the configured congestion controller and
/// reordering tolerance (`[quic]`).
pub fn transport_options(config: &NodeConfig) -> TransportOptions {
    use nearpath_config::CongestionController as C;
    use nearpath_protocol::tls::Congestion;
    TransportOptions {
        congestion: match config.quic.congestion {
            C::Bbr => Congestion::Bbr,
            C::Cubic => Congestion::Cubic,
            C::NewReno => Congestion::NewReno,
        },
        packet_threshold: Some(config.quic.reorder_packet_threshold),
        ..TransportOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::{host_part, DialError, NodeError, PinMismatch};

    #[test]
    fn a_gateway_that_never_answers_is_no_gateway_answering_at_addr_udp() {
        let addr = "192.0.2.7:4433".parse().unwrap();
        let e = DialError::handshake(addr, quinn::ConnectionError::TimedOut);
        assert!(matches!(e, DialError::NoAnswer { bounded: false, .. }));
        assert_eq!(
            e.to_string(),
            "no gateway answering at 192.0.2.7:4433 (UDP)"
        );
        let bounded = DialError::NoAnswer {
            addr,
            bounded: true,
        };
        assert_eq!(bounded.to_string(), e.to_string());
    }

    #[test]
    fn untrusted_gateways_are_each_named_with_their_mismatch() {
        let m = |b: u8| PinMismatch {
            expected: vec![[1; 32]],
            presented: [b; 32],
        };
        let one = NodeError::Untrusted(vec![("a:1".into(), m(2))]);
        assert_eq!(one.to_string(), format!("gateway a:1: {}", m(2)));
        let two = NodeError::Untrusted(vec![("a:1".into(), m(2)), ("b:1".into(), m(3))]);
        assert_eq!(
            two.to_string(),
            format!(
                "no gateway presented a pinned certificate: gateway a:1: {}; gateway b:1: {}",
                m(2),
                m(3)
            )
        );
    }

    #[test]
    fn host_part_handles_names_ipv4_and_ipv6() {
        assert_eq!(host_part("gw.example.com:4433"), "gw.example.com");
        assert_eq!(host_part("127.0.0.1:4433"), "127.0.0.1");
        assert_eq!(host_part("[::1]:4433"), "::1");
    }
}
