//! The gateway process: shared state, listeners (injected, so tests bind port 0), the QUIC
//! endpoint with ALPN dispatch, and orderly shutdown.

use crate::metrics::{labels, Metrics};
use crate::registry::Registry;
use crate::router::RouteParams;
use crate::store::{SqliteStore, Store};
use crate::tls::CertPair;
use nearpath_config::GatewayConfig;
use nearpath_geo::{Decision, GeoDb, Policy};
use nearpath_protocol::{ALPN_CLIENT, ALPN_NODE};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Why the gateway could not start. Every variant names the file, listener or setting at fault;
/// none of them is fixed by retrying without changing something.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("config: {0}")]
    Config(String),
    #[error("GeoIP: {0}")]
    Geo(#[from] nearpath_geo::GeoError),
    #[error("geofence: {0}")]
    Policy(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] nearpath_protocol::tls::TlsError),
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("QUIC endpoint: {0}")]
    Quic(String),
}

/// State every task of the gateway shares.
pub struct Shared {
    pub config: GatewayConfig,
    pub geo: Arc<GeoDb>,
    pub policy: Policy,
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    pub route_params: RouteParams,
    /// Session ids (game and inference): random, unique among live sessions.
    pub session_ids: crate::session_id::SessionIds,
    pub shutdown: CancellationToken,
    pub cert_sha256: String,
    pub keys: crate::infer::KeyCache,
    pub limiter: crate::infer::RateLimiter,
    pub games: crate::game::GameRelays,
}

impl Shared {
    /// Counts a geofence decision by side, outcome and rule.
    pub fn count_decision(&self, side: &'static str, d: &Decision) {
        let (outcome, rule) = match d {
            Decision::Allow { .. } => ("allow", "-".to_string()),
            Decision::Deny { rule, .. } => ("deny", rule.to_string()),
        };
        self.metrics
            .geofence_decisions
            .get_or_create(&labels([
                ("side", side),
                ("outcome", outcome),
                ("rule", &rule),
            ]))
            .inc();
    }
}

/// The sockets a gateway serves on. Tests bind port 0 and read the addresses back.
pub struct Listeners {
    pub http: TcpListener,
    pub admin: TcpListener,
    pub quic: std::net::UdpSocket,
}

impl Listeners {
    pub async fn bind(
        http: SocketAddr,
        admin: SocketAddr,
        quic: SocketAddr,
    ) -> Result<Self, GatewayError> {
        let bind_err = |what, addr| move |source| GatewayError::Bind { what, addr, source };
        Ok(Listeners {
            http: TcpListener::bind(http)
                .await
                .map_err(bind_err("HTTP", http))?,
            admin: TcpListener::bind(admin)
                .await
                .map_err(bind_err("admin", admin))?,
            quic: std::net::UdpSocket::bind(quic).map_err(bind_err("QUIC", quic))?,
        })
    }

    /// All three on 127.0.0.1 with ephemeral ports.
    pub async fn ephemeral() -> Result<Self, GatewayError> {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        Self::bind(any, any, any).await
    }
}

/// Where a started gateway listens.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub quic: SocketAddr,
}

/// A loaded gateway, ready to serve.
pub struct Gateway {
    shared: Arc<Shared>,
    cert: CertPair,
}

/// Checks what `load` would check beyond the config file itself (databases and the geofence
/// compile), without opening listeners. Used by `gateway check-config`.
pub fn check_runtime(config: &GatewayConfig) -> Result<(), GatewayError> {
    GeoDb::open(&config.geo)?;
    Policy::compile(&config.geofence).map_err(|e| GatewayError::Policy(e.to_string()))?;
    Ok(())
}

impl Gateway {
    /// Opens everything a configured gateway needs: GeoIP, geofence, store, certificate.
    pub fn load(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        config
            .validate_for_run()
            .map_err(|e| GatewayError::Config(e.to_string()))?;
        let (cert_file, key_file) = match (&config.quic.cert_file, &config.quic.key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                return Err(GatewayError::Config(
                    "quic.cert_file and quic.key_file are required".into(),
                ))
            }
        };
        let cert = crate::tls::load_pem(&cert_file, &key_file)?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.store.path)?);
        Self::with_parts(config, cert, store)
    }

    /// Builds a gateway from already-open parts (demo and tests).
    pub fn with_parts(
        config: GatewayConfig,
        cert: CertPair,
        store: Arc<dyn Store>,
    ) -> Result<Gateway, GatewayError> {
        let geo = Arc::new(GeoDb::open(&config.geo)?);
        let policy =
            Policy::compile(&config.geofence).map_err(|e| GatewayError::Policy(e.to_string()))?;
        let route_params = RouteParams::from(&config.routing);
        let registry =
            Registry::new(route_params).map_err(|e| GatewayError::Config(e.to_string()))?;
        let shared = Arc::new(Shared {
            geo,
            policy,
            store,
            registry: Arc::new(registry),
            metrics: Metrics::new(),
            route_params,
            session_ids: Default::default(),
            shutdown: CancellationToken::new(),
            cert_sha256: cert.sha256_hex(),
            keys: Default::default(),
            limiter: Default::default(),
            games: Default::default(),
            config,
        });
        Ok(Gateway { shared, cert })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn cert(&self) -> &CertPair {
        &self.cert
    }

    /// Binds the configured listeners and serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let c = &self.shared.config;
        let listeners = Listeners::bind(c.http.listen, c.admin.listen, c.quic.listen).await?;
        let (addrs, done) = self.start(listeners, shutdown)?;
        info!(http = %addrs.http, admin = %addrs.admin, quic = %addrs.quic, "gateway listening");
        let _ = done.await;
        Ok(())
    }

    /// Starts serving on the given listeners; the returned future completes after shutdown.
    pub fn start(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> Result<(BoundAddrs, tokio::task::JoinHandle<()>), GatewayError> {
        let shared = self.shared.clone();
        let addrs = BoundAddrs {
            http: listeners
                .http
                .local_addr()
                .map_err(|e| GatewayError::Quic(e.to_string()))?,
            admin: listeners
                .admin
                .local_addr()
                .map_err(|e| GatewayError::Quic(e.to_string()))?,
            quic: listeners
                .quic
                .local_addr()
                .map_err(|e| GatewayError::Quic(e.to_string()))?,
        };
        match nearpath_protocol::net::set_recv_buffer(&listeners.quic, shared.config.quic.recv_buffer_bytes) {
            Ok(b) if b.is_capped() => warn!(
                requested = b.requested,
                effective = b.effective,
                "the kernel capped the QUIC socket receive buffer (raise net.core.rmem_max); bursts from many sessions may drop"
            ),
            Ok(b) => debug!(requested = b.requested, effective = b.effective, "QUIC socket receive buffer"),
            Err(e) => warn!(error = %e, "could not size the QUIC socket receive buffer"),
        }
        // quinn sets up per-stream bookkeeping for every stream a peer may open, at handshake:
        // granting 1024+1024 costs ~130 KiB per idle connection. Grant little up front and
        // raise it per connection once the ALPN says what the peer needs (see `accept_quic`).
        let transport = nearpath_protocol::tls::TransportOptions {
            idle_timeout: Duration::from_millis(shared.config.quic.idle_timeout_ms),
            max_concurrent_bidi_streams: INITIAL_STREAMS,
            max_concurrent_uni_streams: INITIAL_STREAMS,
            ..Default::default()
        };
        let server_config = nearpath_protocol::tls::server_config(
            self.cert.chain.clone(),
            self.cert.key.clone_key(),
            &[ALPN_NODE, ALPN_CLIENT],
            &transport,
        )
        .map_err(|e| GatewayError::Quic(e.to_string()))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            listeners.quic,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| GatewayError::Quic(e.to_string()))?;

        let http_tls = match (
            &shared.config.http.tls_cert_file,
            &shared.config.http.tls_key_file,
        ) {
            (Some(c), Some(k)) => {
                let pair = crate::tls::load_pem(c, k)?;
                Some(
                    crate::api::tls_acceptor(pair)
                        .map_err(|e| GatewayError::Config(e.to_string()))?,
                )
            }
            _ => None,
        };

        let inner_shutdown = shared.shutdown.clone();
        let handle = tokio::spawn(async move {
            let quic_task = tokio::spawn(accept_quic(shared.clone(), endpoint.clone()));
            let http_task = tokio::spawn(crate::http_util::serve(
                listeners.http,
                http_tls,
                Arc::new(crate::api::ClientApi::new(shared.clone())),
                "http",
                inner_shutdown.clone(),
            ));
            let admin_task = tokio::spawn(crate::http_util::serve(
                listeners.admin,
                None,
                Arc::new(crate::admin::AdminApi::new(shared.clone())),
                "admin",
                inner_shutdown.clone(),
            ));
            let geo_task = tokio::spawn(crate::admin::geo_reload_loop(shared.clone()));
            shutdown.cancelled().await;
            info!("shutting down");
            inner_shutdown.cancel();
            let _ = http_task.await;
            let _ = admin_task.await;
            geo_task.abort();
            // Control loops send Shutdown to their nodes on `inner_shutdown`; give them a moment.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while !shared.registry.is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            endpoint.close(0u32.into(), b"gateway shutting down");
            quic_task.abort();
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        });
        Ok((addrs, handle))
    }
}

/// Streams a peer may open before its ALPN is known.
const INITIAL_STREAMS: u32 = 8;
/// Concurrent video frame streams a node may have in flight (frames are short-lived streams).
const NODE_UNI_STREAMS: u32 = 256;
/// Concurrent requests one native client connection may have in flight.
const CLIENT_BIDI_STREAMS: u32 = 256;

async fn accept_quic(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(%peer, error = %e, "QUIC handshake failed");
                    return;
                }
            };
            let alpn = nearpath_protocol::tls::negotiated_alpn(&conn);
            match alpn.as_deref() {
                Some(a) if a == ALPN_NODE => {
                    // A node opens one control stream, and one uni stream per video frame.
                    conn.set_max_concurrent_bi_streams(4u32.into());
                    conn.set_max_concurrent_uni_streams(NODE_UNI_STREAMS.into());
                    crate::control::handle_node(shared, conn).await
                }
                Some(a) if a == ALPN_CLIENT => {
                    // A client opens one bidi stream per request and no uni streams.
                    conn.set_max_concurrent_bi_streams(CLIENT_BIDI_STREAMS.into());
                    conn.set_max_concurrent_uni_streams(0u32.into());
                    crate::client::handle_client(shared, conn).await
                }
                _ => {
                    warn!(%peer, "QUIC connection without a known ALPN");
                    conn.close(4u32.into(), b"unknown ALPN");
                }
            }
        });
    }
}
