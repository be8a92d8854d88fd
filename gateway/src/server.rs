//! The gateway process: shared state, listeners (injected, so tests bind port 0), the QUIC
//! endpoint with ALPN dispatch, and orderly shutdown.

use crate::clock::SharedClock;
use crate::components::{Auth, Directory, Meter, Placement, Sessions};
use crate::metrics::{labels, Metrics};
use crate::registry::Registry;
use crate::router::RouteParams;
use crate::store::{SqliteStore, Store};
use crate::tls::CertPair;
use nearpath_config::GatewayConfig;
use nearpath_geo::{GeoDb, Policy};
use nearpath_protocol::{ALPN_CLIENT, ALPN_NODE, ALPN_PEER};
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
    #[error("QUIC certificate: {0}")]
    Cert(#[from] crate::cert::CertError),
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("QUIC endpoint: {0}")]
    Quic(String),
    #[error("WebTransport certificate: {0}")]
    WtCert(#[from] crate::wt_cert::WtCertError),
    /// Another live gateway holds `federation.gateway_id` with a different certificate.
    #[error("federation: {0}")]
    DuplicateGatewayId(#[from] crate::federation::directory::DuplicateGatewayId),
}

/// The components of one gateway, grouped for the tasks that assemble front ends from them.
/// Front ends take the components they use (see `components.rs`), not this.
pub struct Shared {
    pub config: GatewayConfig,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    pub auth: Arc<Auth>,
    pub directory: Arc<Directory>,
    pub placement: Arc<Placement>,
    pub sessions: Arc<Sessions>,
    pub meter: Arc<Meter>,
    /// Game sessions, built from the components above.
    pub games: Arc<crate::game::GameService>,
    /// The WebRTC peers of browser sessions, owned by the WHEP front end.
    pub webrtc: Arc<crate::webrtc::Sessions>,
    pub shutdown: CancellationToken,
    /// Per-source admission of QUIC connections until they authenticate or register.
    pub quic_gate: Arc<crate::conn_guard::QuicGate>,
    /// The API key `/play` prefills (the demo's; `None` on a real gateway).
    pub play_prefill_key: Option<String>,
    /// The other gateways of the federation and their nodes, as last read from the store
    /// (`federation/directory.rs`): what cross-region routing and `GET /v1/gateways` read.
    pub fleet: Arc<crate::federation::directory::FleetView>,
    /// The rotating certificate browsers' WebTransport connections get (`None` when
    /// `[webtransport] enabled = false`).
    pub wt_certs: Option<Arc<crate::wt_cert::WtCerts>>,
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
    /// Where `cert` was read from, for a gateway opened by [`Gateway::load`].
    cert_files: Option<crate::cert::CertFiles>,
    /// Where the trunk reads the federation's directories (the store unless a test says).
    fleet: Option<Arc<dyn crate::trunk::FleetSource>>,
}

/// Problems found with the configuration after it loaded, one per line, each naming its key.
fn config_errors(errors: Vec<nearpath_config::ConfigError>) -> GatewayError {
    GatewayError::Config(
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

impl Gateway {
    /// Opens everything a configured gateway needs: GeoIP, geofence, store, certificate.
    pub fn load(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        config
            .validate_for_run()
            .map_err(|e| GatewayError::Config(e.to_string()))?;
        // The configured files, or the self-signed pair of the state directory (created on the
        // first start, reused afterwards).
        let crate::cert::QuicCert { pair: cert, files } = crate::cert::quic_cert(&config)?;
        info!(
            cert_sha256 = %cert.sha256_hex(),
            cert_file = %files.cert_file.display(),
            key_file = %files.key_file.display(),
            origin = files.origin.as_str(),
            "QUIC certificate (nodes pin its cert_sha256)"
        );
        let store: Arc<dyn Store> = match &config.store.url {
            Some(url) => Arc::new(crate::store::PgStore::open_tls(
                url,
                config.store.pool_size,
                Duration::from_millis(config.store.connect_timeout_ms),
                config.store.ca_file.as_deref(),
            )?),
            None => Arc::new(SqliteStore::open(&config.store.path)?),
        };
        let mut gateway = Self::with_parts(config, cert, store)?;
        gateway.cert_files = Some(files);
        Ok(gateway)
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
        let clock = crate::clock::system();
        let registry = registry
            .with_model_grace(std::time::Duration::from_secs(
                config.inference.model_grace_s,
            ))
            .with_clock(clock.clone())
            .with_outlier_rules(crate::outliers::OutlierRules::from_config(
                &config.inference.outlier,
            ));
        let metrics = Arc::new(Metrics::new());
        metrics.declare_fallbacks(&config.inference.fallbacks);
        let mut auth = Auth::new(
            store.clone(),
            metrics.clone(),
            clock.clone(),
            crate::auth::CapDefaults::from_config(&config),
        )
        .with_prices(crate::budget::Prices::from_config(&config.inference));
        // A gateway in a federation shares its keys' limits with its peers through the store;
        // a standalone one keeps them in memory.
        if let Some(id) = &config.federation.gateway_id {
            auth = auth.with_fleet(crate::fleet_limits::FleetLimits::new(
                id,
                store.clone(),
                clock.clone(),
                metrics.clone(),
                &config,
            ));
        }
        let auth = Arc::new(auth);
        load_spend(store.as_ref(), &auth.spend, clock.unix_ms())?;
        let directory = Arc::new(Directory {
            registry: Arc::new(registry),
        });
        let placement = Arc::new(Placement::new(geo, policy, metrics.clone()));
        let sessions = Arc::new(Sessions::default());
        let meter = Arc::new(Meter {
            store: store.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
            tolerance: crate::meter::UsageTolerance::from_config(&config.inference),
            spend: auth.spend.clone(),
        });
        let games = crate::game::GameService::new(
            auth.clone(),
            directory.clone(),
            placement.clone(),
            sessions.clone(),
            meter.clone(),
            metrics.clone(),
            clock.clone(),
            config.game.clone(),
        );
        // The directory task's cached copy of the federation's directories: the one reader of
        // the store's directory tables, read by the trunk and game redirects too.
        let fleet = Arc::new(crate::federation::directory::FleetView::new(
            crate::federation::directory::gateway_id(&config),
        ));
        // In a federation, game sessions for peers' nodes are redirected with tickets.
        let games = Arc::new(match &config.federation.gateway_id {
            Some(id) => {
                games.with_federation(Arc::new(crate::game::redirect::GameFederation::new(
                    id.clone(),
                    config.federation.game_route,
                    store.clone(),
                    fleet.clone(),
                )))
            }
            None => games,
        });
        let wt_certs = if config.webtransport.enabled {
            Some(Arc::new(crate::wt_cert::WtCerts::new(
                config.webtransport.cert_validity_days,
                clock.clone(),
            )?))
        } else {
            None
        };
        let shared = Arc::new(Shared {
            wt_certs,
            auth,
            directory,
            placement,
            sessions,
            meter,
            games,
            webrtc: Arc::new(crate::webrtc::Sessions::default()),
            store,
            metrics,
            clock,
            shutdown: CancellationToken::new(),
            quic_gate: Arc::new(crate::conn_guard::QuicGate::new((&config.quic).into())),
            play_prefill_key: None,
            fleet,
            config,
        });
        Ok(Gateway {
            shared,
            cert,
            cert_files: None,
            fleet: None,
        })
    }

    /// Makes `/play` prefill its key field with `key` (the demo's key; never a real tenant's).
    pub fn prefill_play_key(mut self, key: Option<String>) -> Gateway {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.play_prefill_key = key;
        }
        self
    }

    /// Reads the federation's gateway and node directories from `fleet` instead of the store
    /// (tests share one in-memory directory between gateways).
    pub fn with_fleet_source(mut self, fleet: Arc<dyn crate::trunk::FleetSource>) -> Gateway {
        self.fleet = Some(fleet);
        self
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn cert(&self) -> &CertPair {
        &self.cert
    }

    /// The certificate's files and whether they were configured, reused or created now (a
    /// gateway opened by [`Gateway::load`]; `None` for one built from parts).
    pub fn cert_files(&self) -> Option<&crate::cert::CertFiles> {
        self.cert_files.as_ref()
    }

    /// The trunk to the federation's other gateways, when `federation.gateway_id` is set.
    fn trunk(&self) -> Result<Option<Arc<crate::trunk::Trunk>>, GatewayError> {
        let shared = &self.shared;
        let Some(id) = shared.config.federation.gateway_id.clone() else {
            return Ok(None);
        };
        // The fleet view the directory task keeps (tests may give another source).
        let fleet = self
            .fleet
            .clone()
            .unwrap_or_else(|| shared.fleet.clone() as Arc<dyn crate::trunk::FleetSource>);
        let placement = shared.placement.clone();
        let restricted = crate::control::admission::restricted_class_ids(
            &shared.config.geofence,
            &placement.policy,
        );
        let classify: crate::trunk::Classify = Arc::new(move |names: &[String]| {
            crate::trunk::classes_of(&placement.policy, &restricted, names)
        });
        let trunk = crate::trunk::Trunk::new(
            id,
            shared.config.federation.clone(),
            RouteParams::from(&shared.config.routing),
            fleet,
            shared.directory.registry.clone(),
            shared.clock.clone(),
            classify,
            self.cert.clone(),
        )
        .map_err(|e| GatewayError::Config(e.to_string()))?;
        Ok(Some(Arc::new(trunk)))
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
        // What a stranger gets at handshake: one bidirectional stream (a client's first request
        // or a node's control stream), no unidirectional ones, and one stream's worth of receive
        // window for the whole connection. quinn's defaults (an unbounded connection window,
        // 1.25 MB per stream) let one unauthenticated connection with 256 streams pin 256 MB.
        // Limits are raised per connection once it authenticates or registers (see
        // `QuicClients::authenticated` and `node_registered`).
        //
        // With WebTransport on, three unidirectional streams: browsers (Chromium) close a
        // connection whose initial limit is below HTTP/3's three (control, QPACK encoder and
        // decoder streams), and the limit is sent before the ALPN is known. Connections of the
        // other ALPNs get no further credit ([`accept_quic`]), and what the three can hold is
        // still bounded by the one connection window.
        let q = &shared.config.quic;
        let transport = nearpath_protocol::tls::TransportOptions {
            idle_timeout: Duration::from_millis(q.idle_timeout_ms),
            max_concurrent_bidi_streams: 1,
            max_concurrent_uni_streams: if shared.wt_certs.is_some() {
                crate::webtransport::H3_UNI_STREAMS
            } else {
                0
            },
            stream_receive_window: Some(q.stream_receive_window_bytes),
            receive_window: Some(q.stream_receive_window_bytes),
            datagram_receive_buffer: Some(DATAGRAM_RECEIVE_BUFFER),
            ..Default::default()
        };
        let trunk = self.trunk()?;
        // Games over the trunk (`game_route = "trunk"`): sessions for peers' nodes are relayed
        // through it, and peers' sessions on our nodes send their frames back over it.
        if let Some(t) = trunk
            .as_ref()
            .filter(|_| shared.config.federation.game_route == nearpath_config::CrossRoute::Trunk)
        {
            shared.games.set_trunk(t.clone());
        }
        // A federated gateway also speaks the trunk, and asks for (optional) client
        // certificates: peers present theirs, nodes and clients none.
        let mut alpn: Vec<&[u8]> = vec![ALPN_NODE, ALPN_CLIENT];
        if trunk.is_some() {
            alpn.push(ALPN_PEER);
        }
        if shared.wt_certs.is_some() {
            alpn.push(crate::wt_cert::ALPN_H3);
        }
        // The main certificate for every ALPN but `h3`, which gets the WebTransport one.
        let resolver = crate::wt_cert::AlpnCertResolver::new(
            self.cert.chain.clone(),
            &self.cert.key,
            shared.wt_certs.clone(),
        )?;
        let server_config = nearpath_protocol::tls::server_config_with_resolver(
            Arc::new(resolver),
            &alpn,
            &transport,
            trunk.is_some(),
        )
        .map_err(|e| GatewayError::Quic(e.to_string()))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            listeners.quic,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| GatewayError::Quic(e.to_string()))?;
        if let Some(t) = &trunk {
            t.set_endpoint(endpoint.clone());
        }

        let http_tls = match crate::tls::http_certificate(&shared.config).map_err(config_errors)? {
            Some(pair) => Some(
                crate::api::tls_acceptor(pair).map_err(|e| GatewayError::Config(e.to_string()))?,
            ),
            None => None,
        };

        // Into the gateway directory before serving: a gateway configured with an id another
        // live gateway holds (with another certificate) must not start.
        let me = crate::federation::directory::SelfInfo::new(
            &shared.config,
            addrs.quic,
            addrs.http,
            self.cert.sha256_hex(),
            shared.clock.unix_ms(),
        );
        // What the store would refuse to write (an oversize public address, ...) is a
        // configuration error, found now rather than on every renewal.
        crate::store::directory::check_gateway_record(&me.record(0, 1))
            .map_err(|e| GatewayError::Config(format!("federation: {e}")))?;
        let timing = crate::federation::directory::DirectoryTiming::from_config(&shared.config);
        crate::federation::directory::join(
            shared.store.as_ref(),
            &timing,
            &me,
            shared.clock.unix_ms(),
        )?;
        shared.fleet.set_self(me.clone());

        let info = crate::admin::GatewayInfo {
            cert_sha256: self.cert.sha256_hex(),
            http: addrs.http,
            admin: addrs.admin,
            quic: addrs.quic,
        };
        let inner_shutdown = shared.shutdown.clone();
        let infer = Arc::new(inference(&shared, trunk.clone()));
        let clients = Arc::new(crate::client::QuicClients::new(
            infer.clone(),
            Arc::new(GamePlay(shared.games.clone())),
            shared.quic_gate.clone(),
            shared.config.quic.clone(),
            shared.shutdown.clone(),
        ));
        let client_api = crate::api::ClientApi::new(
            infer,
            shared.config.http.clone(),
            Some(crate::api::Mounted {
                claims: crate::webrtc::is_webrtc_path,
                handler: Arc::new(
                    crate::webrtc::Whep::new(
                        shared.games.clone(),
                        shared.webrtc.clone(),
                        shared.config.http.clone(),
                        shared.play_prefill_key.clone(),
                        shared.shutdown.clone(),
                    )
                    .with_webtransport(shared.wt_certs.clone().map(|certs| {
                        crate::webrtc::WebTransportInfo {
                            port: addrs.quic.port(),
                            path: crate::webtransport::PLAY_PATH,
                            certs,
                        }
                    })),
                ),
            }),
        )
        .with_fleet(shared.fleet.clone());
        // Before any node can register, so the checker hears of every one.
        let checker_task = crate::checker::driver::start(
            crate::checker::driver::CheckerParts::new(
                &shared.config,
                shared.directory.registry.clone(),
                shared.placement.clone(),
                shared.sessions.clone(),
                shared.store.clone(),
                shared.metrics.clone(),
                shared.clock.clone(),
            ),
            inner_shutdown.clone(),
        );
        let webtransport = shared.wt_certs.as_ref().map(|_| {
            Arc::new(crate::webtransport::WebTransport::new(
                shared.games.clone(),
                shared.quic_gate.clone(),
                shared.config.quic.clone(),
                shared.metrics.clone(),
                shared.shutdown.clone(),
            ))
        });
        let handle = tokio::spawn(async move {
            let nodes = Arc::new(node_front_end(&shared));
            let wt_cert_task = shared
                .wt_certs
                .clone()
                .map(|c| tokio::spawn(c.rotation_loop(inner_shutdown.clone())));
            let trunk_task = trunk
                .clone()
                .map(|t| tokio::spawn(t.refresh_loop(inner_shutdown.clone())));
            let quic_task = tokio::spawn(accept_quic(
                shared.clone(),
                QuicFrontEnds {
                    clients,
                    nodes,
                    trunk,
                    webtransport,
                },
                endpoint.clone(),
            ));
            let http_task = tokio::spawn(crate::http_util::serve(
                listeners.http,
                http_tls,
                Arc::new(client_api),
                "http",
                inner_shutdown.clone(),
                crate::http_util::ConnPolicy::from_config(&shared.config.http, &shared.metrics),
            ));
            let admin_task = tokio::spawn(crate::http_util::serve(
                listeners.admin,
                None,
                Arc::new(admin_api(&shared).with_gateway_info(info)),
                "admin",
                inner_shutdown.clone(),
                // The admin listener inherits [http]'s timeouts and caps, with its own counts.
                crate::http_util::ConnPolicy::from_config(&shared.config.http, &shared.metrics),
            ));
            let directory_task = tokio::spawn(crate::federation::directory::run(
                crate::federation::directory::DirectoryParts {
                    store: shared.store.clone(),
                    registry: shared.directory.registry.clone(),
                    fleet: shared.fleet.clone(),
                    metrics: shared.metrics.clone(),
                    clock: shared.clock.clone(),
                    timing,
                    me,
                },
                inner_shutdown.clone(),
            ));
            let saturation_task =
                tokio::spawn(shared.games.clone().saturation_loop(inner_shutdown.clone()));
            let geo_task = tokio::spawn(crate::admin::geo_reload_loop(
                shared.placement.clone(),
                shared.metrics.clone(),
                Duration::from_secs(shared.config.geo.reload_check_interval_s),
            ));
            let fleet_task = shared
                .auth
                .fleet
                .clone()
                .map(|f| tokio::spawn(f.run(inner_shutdown.clone())));
            shutdown.cancelled().await;
            info!("shutting down");
            inner_shutdown.cancel();
            if let Some(t) = fleet_task {
                // It gives this gateway's concurrency reservations back before it ends.
                let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
            }
            let _ = http_task.await;
            let _ = admin_task.await;
            geo_task.abort();
            saturation_task.abort();
            if let Some(t) = wt_cert_task {
                t.abort();
            }
            if let Some(t) = checker_task {
                t.abort();
            }
            if let Some(t) = trunk_task {
                t.abort();
            }
            // The directory task leaves the directory on `inner_shutdown` (one store write).
            let _ = tokio::time::timeout(Duration::from_secs(2), directory_task).await;
            // Control loops send Shutdown to their nodes on `inner_shutdown`; give them a moment.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while !shared.directory.registry.is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            endpoint.close(
                nearpath_protocol::app_code::CLOSE_SHUTDOWN,
                b"gateway shutting down",
            );
            quic_task.abort();
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        });
        Ok((addrs, handle))
    }
}

/// The inference service both client front ends drive, from the components it uses.
/// Fills the keys' spend book with this UTC month's usage from the ledger, so that budgets hold
/// across restarts; from then on the meter adds each committed record.
fn load_spend(
    store: &dyn Store,
    spend: &crate::budget::SpendBook,
    now_ms: u64,
) -> Result<(), GatewayError> {
    let month_start = crate::budget::day_start_ms(crate::budget::first_day_of_month(
        crate::budget::month_of(now_ms),
    ));
    let rows = store.key_usage_by_day(None, month_start, u64::MAX)?;
    for r in rows {
        let at_ms = crate::budget::day_start_ms(r.day);
        spend.add(
            &r.api_key_id,
            &r.model,
            at_ms,
            r.prompt_tokens,
            r.completion_tokens,
        );
    }
    Ok(())
}

fn inference(
    shared: &Shared,
    trunk: Option<Arc<crate::trunk::Trunk>>,
) -> crate::infer::InferService {
    crate::infer::InferService {
        auth: shared.auth.clone(),
        directory: shared.directory.clone(),
        placement: shared.placement.clone(),
        sessions: shared.sessions.clone(),
        meter: shared.meter.clone(),
        metrics: shared.metrics.clone(),
        clock: shared.clock.clone(),
        config: shared.config.inference.clone(),
        // The trunk's view ranks peers' nodes with ours in both routes; only `trunk` relays.
        trunk,
        // Every member of a federation accepts inference tickets (a peer may redirect even
        // when this gateway relays); only `redirect` mints them.
        redirect: shared.config.federation.gateway_id.as_ref().map(|id| {
            Arc::new(crate::infer::redirect::InferFederation::new(
                id.clone(),
                shared.store.clone(),
            ))
        }),
        redirects: shared.config.federation.inference_route
            == nearpath_config::CrossRoute::Redirect,
    }
}

/// Game sessions for native players, served by the game service.
struct GamePlay(Arc<crate::game::GameService>);

impl crate::client::PlayService for GamePlay {
    fn input_loop(
        &self,
        conn: quinn::Connection,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.0.clone().client_input_loop(conn))
    }

    fn serve_play(
        &self,
        conn: quinn::Connection,
        tx: quinn::SendStream,
        rx: nearpath_protocol::stream::FramedRecv,
        req: nearpath_protocol::message::PlayRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.0.clone().serve_play(conn, tx, rx, req))
    }

    fn serve_ticket(
        &self,
        conn: quinn::Connection,
        tx: quinn::SendStream,
        rx: nearpath_protocol::stream::FramedRecv,
        req: nearpath_protocol::message::PlayTicket,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.0.clone().serve_ticket(conn, tx, rx, req))
    }

    fn serve_resume(
        &self,
        conn: quinn::Connection,
        tx: quinn::SendStream,
        rx: nearpath_protocol::stream::FramedRecv,
        req: nearpath_protocol::message::PlayResume,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.0.clone().serve_resume(conn, tx, rx, req))
    }
}

/// Receive window of a node connection until it is registered: its control stream carries one
/// `Register` (at most `MAX_CONTROL_FRAME`), nothing else may arrive before `Registered`.
const NODE_PREREGISTER_WINDOW: u32 = 2 * nearpath_protocol::MAX_CONTROL_FRAME as u32;
/// Received datagrams buffered per connection until read. Input datagrams are tens of bytes and
/// read as they come; nodes send none, so anything more would only be a stranger's ballast.
const DATAGRAM_RECEIVE_BUFFER: usize = 64 * 1024;

/// The QUIC-node front end, built with the components it uses.
fn node_front_end(shared: &Arc<Shared>) -> crate::control::NodeFrontEnd {
    // The game relay's frame streams, served by the game service.
    let games = shared.games.clone();
    let frames: crate::control::FramesLoop =
        Arc::new(move |conn| Box::pin(games.clone().node_frames_loop(conn)));
    crate::control::NodeFrontEnd::new(
        &shared.config,
        shared.directory.clone(),
        shared.placement.clone(),
        shared.store.clone(),
        shared.metrics.clone(),
        shared.clock.clone(),
        shared.shutdown.clone(),
        shared.quic_gate.clone(),
        frames,
    )
}

/// The admin API, built with the components it uses.
fn admin_api(shared: &Arc<Shared>) -> crate::admin::AdminApi {
    crate::admin::AdminApi::new(
        &shared.config,
        crate::admin::AdminParts {
            directory: shared.directory.clone(),
            placement: shared.placement.clone(),
            store: shared.store.clone(),
            auth: shared.auth.clone(),
            sessions: shared.sessions.clone(),
            metrics: shared.metrics.clone(),
            clock: shared.clock.clone(),
        },
    )
    .with_fleet(shared.fleet.clone())
}

/// What the QUIC endpoint dispatches connections to, by ALPN.
struct QuicFrontEnds {
    clients: Arc<crate::client::QuicClients>,
    nodes: Arc<crate::control::NodeFrontEnd>,
    trunk: Option<Arc<crate::trunk::Trunk>>,
    /// `h3` (`None`: WebTransport is disabled, and `h3` is not offered).
    webtransport: Option<Arc<crate::webtransport::WebTransport>>,
}

async fn accept_quic(shared: Arc<Shared>, front: QuicFrontEnds, endpoint: quinn::Endpoint) {
    let refused = |reason: &str| {
        shared
            .metrics
            .quic_handshakes_refused
            .get_or_create(&labels([("reason", reason)]))
            .inc();
    };
    while let Some(incoming) = endpoint.accept().await {
        let peer = incoming.remote_address();
        // Under load, make a source prove it receives at its address before it costs a
        // handshake or a per-source token: spoofed addresses cannot echo the retry token.
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && shared.quic_gate.handshaking() >= shared.config.quic.retry_above_handshakes
        {
            shared.metrics.quic_retries.inc();
            if let Err(e) = incoming.retry() {
                debug!(%peer, error = %e, "QUIC retry failed");
            }
            continue;
        }
        let mut pre_auth = match shared.quic_gate.admit(peer.ip(), std::time::Instant::now()) {
            Ok(p) => p,
            Err(r) => {
                refused(r.as_str());
                debug!(%peer, reason = r.as_str(), "QUIC connection refused");
                incoming.refuse();
                continue;
            }
        };
        let clients = front.clients.clone();
        let nodes = front.nodes.clone();
        let trunk = front.trunk.clone();
        let webtransport = front.webtransport.clone();
        let gate = shared.quic_gate.clone();
        let shutdown = shared.shutdown.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(%peer, error = %e, "QUIC handshake failed");
                    return;
                }
            };
            pre_auth.bind(conn.stable_id());
            let alpn = nearpath_protocol::tls::negotiated_alpn(&conn);
            if alpn.as_deref() != Some(crate::wt_cert::ALPN_H3) {
                // The unidirectional streams granted at handshake are HTTP/3's; other protocols
                // get theirs when they register (nodes), or never (clients).
                conn.set_max_concurrent_uni_streams(0u32.into());
            }
            match alpn.as_deref() {
                Some(a) if a == ALPN_NODE => {
                    // Only the control stream until `Registered` (see `node_registered`).
                    conn.set_receive_window(NODE_PREREGISTER_WINDOW.into());
                    crate::control::handle_node(nodes, conn).await
                }
                Some(a) if a == ALPN_CLIENT => {
                    // One request stream until a request authenticates (`QuicClients::authenticated`),
                    // and no uni streams ever.
                    clients.handle(conn).await
                }
                Some(a) if a == crate::wt_cert::ALPN_H3 => match webtransport {
                    // Browsers: the HTTP/3 handshake, then one play stream, under the same
                    // admission as native clients until its key authenticates.
                    Some(w) => w.handle(conn).await,
                    // Not offered when disabled; a handshake cannot pick it.
                    None => conn.close(
                        nearpath_protocol::app_code::CLOSE_PROTOCOL,
                        b"no WebTransport",
                    ),
                },
                Some(a) if a == ALPN_PEER => match trunk {
                    Some(t) => t.serve_peer(conn, gate, shutdown).await,
                    // Not offered without a federation; a handshake cannot pick it.
                    None => conn.close(
                        nearpath_protocol::app_code::CLOSE_PROTOCOL,
                        b"not in a federation",
                    ),
                },
                _ => {
                    warn!(%peer, "QUIC connection without a known ALPN");
                    conn.close(nearpath_protocol::app_code::CLOSE_PROTOCOL, b"unknown ALPN");
                }
            }
            drop(pre_auth);
        });
    }
}
