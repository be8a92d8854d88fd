//! The gateway-to-gateway trunk of a federation (ALPN `nearpath-peer/1`).
//!
//! A gateway (A) whose client is best served by a node another gateway (B) holds reaches that
//! node through a trunk: one QUIC connection per peer pair, dialled by A on demand, reused, and
//! redialled when lost; each session is one bidirectional stream on it, which B splices onto a
//! stream of its own connection to the node. Both ends authenticate with the certificates the
//! gateway directory pins: A presents its QUIC certificate as a client certificate, and each
//! side checks the other's SHA-256 against a *live* entry of the directory.
//!
//! A side: [`Trunk::route`] ranks the nodes of the node directory that other live gateways hold
//! with the router's own score (a [`RouterIndex`] over them, rebuilt at every directory read),
//! and hands out [`NodeEntry`]s whose link opens trunk streams ([`NodeLink::remote`]): the
//! inference driver runs a remote node exactly like a local one, so rendering, failover,
//! timeouts and metering are the same code. The geofence is A's, evaluated once with the
//! client's address against the remote node's published country and classes; A bills the
//! request (B records nothing for trunk streams), so a request is billed exactly once.
//!
//! B side: [`Trunk::serve_peer`] admits a peer connection by its pin ([`check_peer`]) and serves
//! its streams: `PeerOpen{node_id}`, then the session's `Open`, checked by [`check_open`] (the
//! node attached here and accepting, the workload one the trunk carries), then relayed
//! byte-for-byte from the node and message by message to it. No second geofence, no API key:
//! A authenticated and admitted the request.

use crate::clock::SharedClock;
use crate::node_link::{NodeLink, RemoteLink, RemoteOpen};
use crate::registry::{NodeDynamic, NodeEntry, NodeState, Registry, SlotKind};
use crate::router::{
    Deny, LatLon, NodeId, NodeRouteInfo, NodeState as RouteState, RouteOutcome, RouteParams,
    RouterIndex, Workload,
};
use crate::store::directory::{live_remote_nodes, remote_location};
use crate::store::{GatewayRecord, NodeDirEntry, StoreError};
use crate::tls::CertPair;
use nearpath_config::FederationConfig;
use nearpath_geo::ClassId;
use nearpath_protocol::app_code::{CLOSE_PEER_REFUSED, STREAM_CANCELLED, STREAM_REFUSED};
use nearpath_protocol::message::{
    Capacity, Message, PeerOpen, RefuseCode, Refused, SessionKind, Workloads,
};
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::tls::{parse_sha256_hex, peer_cert_sha256, TransportOptions};
use nearpath_protocol::{ModelCaps, ALPN_PEER, MAX_REQUEST_FRAME, PROTOCOL_VERSION};
use quinn::{ConnectionError, RecvStream, SendStream};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Node keys of remote nodes: the top bit set, so they never meet the registry's keys (counted
/// up from 1).
const REMOTE_KEY_BIT: u64 = 1 << 63;
/// Concurrent trunk streams a peer may open once admitted (sessions it relays to our nodes).
const PEER_BIDI_STREAMS: u32 = 4096;
/// Receive window of an admitted peer connection: requests (at most `MAX_REQUEST_FRAME` each)
/// are all that travels towards us.
const PEER_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;
/// How long a peer has to send `PeerOpen` and `Open` on a new stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the trunk reads the federation's directories: the directory task's cached copy in
/// production (the gateway's `FleetView`, so that the store is read once per interval for
/// every reader), a fake in tests. Blocking (called from `spawn_blocking`).
pub use crate::store::directory::DirectorySource as FleetSource;

/// The store's gateway and node directories, read afresh.
pub use crate::store::directory::StoreDirectory as StoreFleet;

/// Why a peer's trunk connection is refused (the connection close reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRefusal {
    /// It presented no client certificate.
    NoCertificate,
    /// No gateway of the directory pins its certificate.
    UnknownPin,
    /// The gateway pinning it has let its lease expire.
    Expired,
    /// It is this gateway.
    IsSelf,
}

impl PeerRefusal {
    /// The close reason (PROTOCOL.md, `CLOSE_PEER_REFUSED`).
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRefusal::NoCertificate => "peer_no_certificate",
            PeerRefusal::UnknownPin => "peer_unknown_pin",
            PeerRefusal::Expired => "peer_expired",
            PeerRefusal::IsSelf => "peer_is_self",
        }
    }
}

/// Whom a trunk connection presenting certificate hash `pin` comes from: a live gateway of the
/// directory, other than `self_id`, that pins it. A live entry wins over an expired one with
/// the same pin (a gateway restarted under another id).
pub fn check_peer<'a>(
    pin: Option<[u8; 32]>,
    gateways: &'a [GatewayRecord],
    self_id: &str,
    now_ms: u64,
) -> Result<&'a GatewayRecord, PeerRefusal> {
    let pin = pin.ok_or(PeerRefusal::NoCertificate)?;
    let mut pinned = gateways
        .iter()
        .filter(|g| parse_sha256_hex(&g.cert_sha256).ok() == Some(pin));
    let first = pinned.clone().next().ok_or(PeerRefusal::UnknownPin)?;
    let Some(live) = pinned.find(|g| g.is_live(now_ms)) else {
        return Err(if first.id == self_id {
            PeerRefusal::IsSelf
        } else {
            PeerRefusal::Expired
        });
    };
    if live.id == self_id {
        return Err(PeerRefusal::IsSelf);
    }
    Ok(live)
}

/// What a trunk stream asks of a node this gateway holds, and why it cannot have it: the code
/// and reason of the `Refused` the peer gets.
pub fn check_open(
    node_id: &str,
    node: Option<&NodeEntry>,
    kind: &SessionKind,
) -> Result<(), (RefuseCode, String)> {
    let Some(node) = node else {
        return Err((
            RefuseCode::UnknownWorkload,
            format!("node {node_id} is not attached to this gateway"),
        ));
    };
    match kind {
        SessionKind::Inference { model, .. } => {
            if !node.workloads.models.iter().any(|m| m == model) {
                return Err((
                    RefuseCode::UnknownWorkload,
                    format!("node {node_id} does not serve model {model}"),
                ));
            }
        }
        SessionKind::Game(p) => {
            if !node.workloads.games.iter().any(|g| g == &p.title) {
                return Err((
                    RefuseCode::UnknownWorkload,
                    format!("node {node_id} does not serve game {}", p.title),
                ));
            }
            if !node.encodes(p.codec) {
                return Err((
                    RefuseCode::UnknownWorkload,
                    format!("node {node_id} does not encode {}", p.codec),
                ));
            }
        }
    }
    let accepting = {
        let d = node.dynamic();
        d.state == NodeState::Active && !d.slow
    };
    if !accepting || node.conn.close_reason().is_some() || node.revocation().is_some() {
        return Err((
            RefuseCode::Busy,
            format!("node {node_id} is not accepting sessions"),
        ));
    }
    Ok(())
}

/// A model as live peers' nodes serve it ([`Trunk::remote_models`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteModel {
    /// The gateways holding a node that serves it.
    pub gateways: std::collections::BTreeSet<String>,
    /// The union of what those nodes declare for it.
    pub caps: ModelCaps,
}

/// Game sessions peers run on this gateway's nodes through the trunk (`game_route = "trunk"`,
/// B side): each session id with the node serving it and the peer connection it came over.
/// The node's frames and audio for such a session go to that peer connection, and the peer's
/// input datagrams for it go to that node, only when both match: a node cannot send into
/// another session, and a peer cannot steer a session it did not open.
#[derive(Default)]
pub struct TrunkGames {
    by_session: Mutex<HashMap<u64, TrunkGame>>,
}

/// One peer's game session on one of our nodes.
#[derive(Clone)]
struct TrunkGame {
    node: NodeLink,
    peer: quinn::Connection,
}

impl TrunkGames {
    /// The peer connection of session `session_id` if node connection `node_conn` serves it.
    pub fn peer_for(&self, session_id: u64, node_conn: usize) -> Option<quinn::Connection> {
        lock(&self.by_session)
            .get(&session_id)
            .filter(|g| g.node.stable_id() == node_conn)
            .map(|g| g.peer.clone())
    }

    /// The node serving session `session_id` if peer connection `peer_conn` opened it.
    pub fn node_for(&self, session_id: u64, peer_conn: usize) -> Option<NodeLink> {
        lock(&self.by_session)
            .get(&session_id)
            .filter(|g| g.peer.stable_id() == peer_conn)
            .map(|g| g.node.clone())
    }

    /// How many sessions peers run here through the trunk now.
    pub fn len(&self) -> usize {
        lock(&self.by_session).len()
    }

    /// Whether no peer runs a session here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A registered trunk game session: removed from the table when dropped.
struct TrunkGameGuard<'a> {
    games: &'a TrunkGames,
    session_id: u64,
    _id: crate::session_id::SessionId,
}

impl Drop for TrunkGameGuard<'_> {
    fn drop(&mut self) {
        lock(&self.games.by_session).remove(&self.session_id);
    }
}

/// What the trunk needs of the game relay, which sits above it: given at assembly when game
/// sessions travel over the trunk.
pub struct GameLink {
    /// The gateway's live session ids: a peer's session holds its id here too, so that it
    /// can never name (and steer) one of this gateway's own sessions.
    pub ids: crate::session_id::SessionIds,
    /// Runs the frame and audio loops on a trunk connection this gateway dialled: the peer
    /// sends the frames of our sessions on its nodes on it.
    pub on_dial: Box<dyn Fn(quinn::Connection) + Send + Sync>,
}

/// A remote node as the router and the inference driver see it.
struct Remote {
    entry: Arc<NodeEntry>,
    dir: NodeDirEntry,
}

/// The last directory read.
struct Snapshot {
    gateways: Vec<GatewayRecord>,
    /// By (gateway id, node id).
    remote: HashMap<(String, String), Remote>,
    by_key: HashMap<NodeId, (Arc<NodeEntry>, u64)>,
    index: RouterIndex,
}

/// Turns the GPU classes a node was admitted with into the geofence's class ids (as the
/// node front end does at registration). Built at assembly from the gateway's policy.
pub type Classify = Arc<dyn Fn(&[String]) -> Vec<(String, ClassId)> + Send + Sync>;

/// The trunk: this gateway's peers, their connections, and the remote nodes they hold.
pub struct Trunk {
    self_id: String,
    config: FederationConfig,
    params: RouteParams,
    source: Arc<dyn FleetSource>,
    registry: Arc<Registry>,
    clock: SharedClock,
    classify: Classify,
    dialer: Arc<Dialer>,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    snapshot: Mutex<Snapshot>,
    /// Peer connections we accepted, by peer id: closed when the peer's lease expires.
    accepted: Mutex<Vec<(String, quinn::Connection)>>,
    next_key: AtomicUsize,
    /// When the directories were last applied (Unix ms): an unknown pin triggers a fresh read
    /// only if the last one is older than the refresh interval, so strangers cannot make the
    /// gateway read the store per handshake.
    applied_at_ms: std::sync::atomic::AtomicU64,
    /// Peers' game sessions on our nodes (B side).
    games: Arc<TrunkGames>,
}

/// What dialing a peer needs: our endpoint (set once it is bound) and our certificate.
struct Dialer {
    endpoint: OnceLock<quinn::Endpoint>,
    cert: CertPair,
    transport: TransportOptions,
    /// The game relay's hooks, when games travel over the trunk.
    games: OnceLock<Arc<GameLink>>,
}

/// One peer gateway and our connection to it.
#[derive(Debug)]
struct Peer {
    id: String,
    record: Mutex<GatewayRecord>,
    /// The connection in use; dialled under this lock so that concurrent sessions share one.
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    /// The same connection, readable without waiting (close reason, RTT).
    current: Mutex<Option<quinn::Connection>>,
    dialer: Arc<DialerHandle>,
    link_id: usize,
}

/// The dialer behind `Arc` with a `Debug` impl (links must be `Debug`).
struct DialerHandle(Arc<Dialer>, SharedClock);

impl std::fmt::Debug for DialerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dialer")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ids of remote links, far from quinn's connection ids and the detached links' ids.
static NEXT_LINK: AtomicUsize = AtomicUsize::new(usize::MAX / 4);

impl Peer {
    /// The connection to the peer: the one in use while it is open, else a new one.
    async fn connection(&self) -> Result<quinn::Connection, ConnectionError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let record = lock(&self.record).clone();
        let DialerHandle(dialer, clock) = &*self.dialer;
        if !record.is_live(clock.unix_ms()) {
            debug!(peer = %self.id, "not dialling a peer whose lease expired");
            return Err(ConnectionError::LocallyClosed);
        }
        let conn = dialer.dial(&record).await.inspect_err(|e| {
            warn!(peer = %self.id, address = %record.quic_address, error = %e, "trunk dial failed");
        })?;
        info!(peer = %self.id, address = %record.quic_address, "trunk connected");
        if let Some(g) = dialer.games.get() {
            (g.on_dial)(conn.clone());
        }
        *slot = Some(conn.clone());
        *lock(&self.current) = Some(conn.clone());
        Ok(conn)
    }
}

impl Dialer {
    async fn dial(&self, peer: &GatewayRecord) -> Result<quinn::Connection, ConnectionError> {
        let endpoint = self.endpoint.get().ok_or(ConnectionError::LocallyClosed)?;
        let pin =
            parse_sha256_hex(&peer.cert_sha256).map_err(|_| ConnectionError::LocallyClosed)?;
        let addr = resolve(&peer.quic_address)
            .await
            .ok_or(ConnectionError::LocallyClosed)?;
        let config = nearpath_protocol::tls::client_config_with_identity(
            pin,
            &[ALPN_PEER],
            &self.transport,
            self.cert.chain.clone(),
            self.cert.key.clone_key(),
        )
        .map_err(|e| {
            warn!(error = %e, "trunk client configuration");
            ConnectionError::LocallyClosed
        })?;
        // The pin is the trust decision, so the server name is only a label.
        let connecting = endpoint
            .connect_with(config, addr, "nearpath-peer")
            .map_err(|_| ConnectionError::LocallyClosed)?;
        connecting.await
    }
}

async fn resolve(address: &str) -> Option<SocketAddr> {
    if let Ok(a) = address.parse() {
        return Some(a);
    }
    tokio::net::lookup_host(address).await.ok()?.next()
}

/// A remote node's link: trunk streams to the peer, addressed to the node.
#[derive(Debug)]
struct PeerLink {
    peer: Arc<Peer>,
    node_id: String,
    addr: SocketAddr,
}

impl RemoteLink for PeerLink {
    fn open_bi(&self) -> RemoteOpen<'_> {
        Box::pin(async move {
            let conn = self.peer.connection().await?;
            let (mut tx, rx) = conn.open_bi().await?;
            let open = Message::PeerOpen(PeerOpen {
                protocol_version: PROTOCOL_VERSION,
                node_id: self.node_id.clone(),
            });
            if send(&mut tx, &open).await.is_err() {
                let _ = tx.reset(STREAM_CANCELLED);
                return Err(conn
                    .close_reason()
                    .unwrap_or(ConnectionError::LocallyClosed));
            }
            Ok((tx, rx))
        })
    }

    fn close_reason(&self) -> Option<ConnectionError> {
        lock(&self.peer.current)
            .as_ref()
            .and_then(quinn::Connection::close_reason)
    }

    fn rtt(&self) -> Duration {
        lock(&self.peer.current)
            .as_ref()
            .map_or(Duration::ZERO, quinn::Connection::rtt)
    }

    fn remote_address(&self) -> SocketAddr {
        self.addr
    }

    fn stable_id(&self) -> usize {
        self.peer.link_id
    }

    fn send_datagram(&self, data: bytes::Bytes) -> Result<(), quinn::SendDatagramError> {
        match lock(&self.peer.current).as_ref() {
            Some(c) => c.send_datagram(data),
            None => Err(quinn::SendDatagramError::ConnectionLost(
                ConnectionError::LocallyClosed,
            )),
        }
    }

    fn carries(&self, conn: &quinn::Connection) -> bool {
        lock(&self.peer.current)
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
    }
}

impl Trunk {
    /// The trunk of gateway `self_id`. `cert` is presented to peers as our client certificate.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        self_id: String,
        config: FederationConfig,
        params: RouteParams,
        source: Arc<dyn FleetSource>,
        registry: Arc<Registry>,
        clock: SharedClock,
        classify: Classify,
        cert: CertPair,
    ) -> Result<Trunk, crate::router::RouterError> {
        // The trunk notices a dead peer as a node notices a dead gateway: keep-alive at the
        // directory's heartbeat and the connection gone after a lease of silence (the smaller
        // idle timeout of both ends applies, so ours governs both).
        let transport = TransportOptions {
            keep_alive: Some(Duration::from_millis(config.heartbeat_ms)),
            idle_timeout: Duration::from_millis(config.lease_ms),
            ..Default::default()
        };
        Ok(Trunk {
            self_id,
            params,
            snapshot: Mutex::new(Snapshot {
                gateways: Vec::new(),
                remote: HashMap::new(),
                by_key: HashMap::new(),
                index: RouterIndex::new(params)?,
            }),
            config,
            source,
            registry,
            clock: clock.clone(),
            classify,
            dialer: Arc::new(Dialer {
                endpoint: OnceLock::new(),
                cert,
                transport,
                games: OnceLock::new(),
            }),
            peers: Mutex::new(HashMap::new()),
            accepted: Mutex::new(Vec::new()),
            next_key: AtomicUsize::new(1),
            applied_at_ms: std::sync::atomic::AtomicU64::new(0),
            games: Arc::new(TrunkGames::default()),
        })
    }
}

/// Great-circle distance in km.
fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().min(1.0).asin()
}

/// Whether two publications of a node describe the same node (only load figures differ): then
/// its entry, and the count of our sessions on it, is kept.
fn same_node(a: &NodeDirEntry, b: &NodeDirEntry) -> bool {
    a.operator_id == b.operator_id
        && a.country == b.country
        && a.subdivision == b.subdivision
        && a.lat == b.lat
        && a.lon == b.lon
        && a.gpu_classes == b.gpu_classes
        && a.models == b.models
        && a.model_caps == b.model_caps
        && a.games == b.games
        && a.inference_slots == b.inference_slots
        && a.game_slots == b.game_slots
        && a.encoders == b.encoders
}

impl Trunk {
    /// This gateway's id in the federation.
    pub fn self_id(&self) -> &str {
        &self.self_id
    }

    /// Gives the trunk the gateway's QUIC endpoint: peers are dialled from the same socket.
    pub fn set_endpoint(&self, endpoint: quinn::Endpoint) {
        let _ = self.dialer.endpoint.set(endpoint);
    }

    /// Lets game sessions travel over the trunk (`game_route = "trunk"`): peers may open them
    /// on our nodes, and the trunk connections we dial carry our sessions' frames back.
    pub fn set_games(&self, link: GameLink) {
        let _ = self.dialer.games.set(Arc::new(link));
    }

    /// Whether game sessions travel over the trunk.
    pub fn carries_games(&self) -> bool {
        self.dialer.games.get().is_some()
    }

    /// Peers' game sessions on our nodes (B side), for the frame, audio and input relays.
    pub fn games(&self) -> &Arc<TrunkGames> {
        &self.games
    }

    /// Reads both directories (off the async threads) and applies them.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let source = self.source.clone();
        let (gateways, nodes) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((source.gateways()?, source.node_directory()?))
        })
        .await
        .map_err(|e| StoreError::Unavailable {
            message: e.to_string(),
        })??;
        self.apply(self.clock.unix_ms(), gateways, nodes);
        Ok(())
    }

    /// Re-reads the directories every `node_directory_interval_ms` until `shutdown`.
    pub async fn refresh_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.config.node_directory_interval_ms.max(1));
        // A failing read is logged when it starts failing (or fails differently), not every
        // interval.
        let mut failing: Option<String> = None;
        loop {
            match self.refresh().await {
                Ok(()) => {
                    if failing.take().is_some() {
                        info!("reading the federation directories works again");
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    if failing.as_deref() != Some(message.as_str()) {
                        warn!(error = %message, "reading the federation directories failed; keeping the last read");
                    }
                    failing = Some(message);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Applies a directory read made at `now_ms`: peers are added or updated, connections of
    /// peers whose lease expired are closed (their sessions fail over), and the remote nodes of
    /// live peers are indexed for routing. A node this gateway holds itself is never remote.
    pub fn apply(&self, now_ms: u64, gateways: Vec<GatewayRecord>, nodes: Vec<NodeDirEntry>) {
        let live: HashMap<&str, &GatewayRecord> = gateways
            .iter()
            .filter(|g| g.is_live(now_ms) && g.id != self.self_id)
            .map(|g| (g.id.as_str(), g))
            .collect();
        let peers: HashMap<String, Arc<Peer>> = {
            let mut peers = lock(&self.peers);
            for g in gateways.iter().filter(|g| g.id != self.self_id) {
                let peer = peers.entry(g.id.clone()).or_insert_with(|| {
                    Arc::new(Peer {
                        id: g.id.clone(),
                        record: Mutex::new(g.clone()),
                        conn: tokio::sync::Mutex::new(None),
                        current: Mutex::new(None),
                        dialer: Arc::new(DialerHandle(self.dialer.clone(), self.clock.clone())),
                        link_id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
                    })
                });
                *lock(&peer.record) = g.clone();
            }
            for (id, p) in peers.iter() {
                if live.contains_key(id.as_str()) {
                    continue;
                }
                if let Some(c) = lock(&p.current).as_ref() {
                    if c.close_reason().is_none() {
                        info!(peer = %id, "closing the trunk to a peer whose lease expired");
                        c.close(CLOSE_PEER_REFUSED, PeerRefusal::Expired.as_str().as_bytes());
                    }
                }
            }
            peers.clone()
        };
        lock(&self.accepted).retain(|(id, c)| {
            if c.close_reason().is_some() {
                return false;
            }
            if !live.contains_key(id.as_str()) {
                info!(peer = %id, "closing a peer's trunk: its lease expired");
                c.close(CLOSE_PEER_REFUSED, PeerRefusal::Expired.as_str().as_bytes());
                return false;
            }
            true
        });

        let mut snap = lock(&self.snapshot);
        let keys: Vec<NodeId> = snap.by_key.keys().copied().collect();
        for k in keys {
            snap.index.remove(k);
        }
        snap.by_key.clear();
        let mut old = std::mem::take(&mut snap.remote);
        // The shared reading of the directory: live peers' nodes, rows checked again.
        for (n, gw) in live_remote_nodes(&gateways, &nodes, &self.self_id, now_ms) {
            let n = n.clone();
            if self.registry.get(&n.node_id).is_some() {
                continue;
            }
            let Some(peer) = peers.get(&n.gateway_id) else {
                continue;
            };
            let id = (n.gateway_id.clone(), n.node_id.clone());
            let entry = match old.remove(&id) {
                Some(r) if same_node(&r.dir, &n) => r.entry,
                _ => Arc::new(self.remote_entry(&n, peer, now_ms)),
            };
            let rtt_ms = match lock(&peer.current).as_ref() {
                Some(c) if c.close_reason().is_none() => c.rtt().as_secs_f64() * 1000.0,
                // Not dialled yet: the great-circle estimate between the gateways.
                _ => {
                    distance_km((self.config.lat, self.config.lon), (gw.lat, gw.lon))
                        / self.params.km_per_ms
                        * self.params.path_stretch
                }
            };
            let slots = n.inference_slots.max(1) as f32;
            let info = NodeRouteInfo {
                location: n.lat.zip(n.lon).and_then(|(a, o)| LatLon::new(a, o).ok()),
                games: n.games.clone(),
                models: n.models.clone(),
                state: RouteState {
                    game_slots_free: n.game_free.min(n.game_slots),
                    inference_free: n.inference_free.min(n.inference_slots),
                    load: (1.0 - n.inference_free.min(n.inference_slots) as f32 / slots)
                        .clamp(0.0, 1.0),
                    draining: !n.accepting,
                    gateway_rtt_ms: rtt_ms,
                    penalty_events_recent: 0,
                    operator_flagged: false,
                    // The node's own gateway checks it; a remote node is taken as its
                    // gateway published it.
                    check_penalty_ms: 0.0,
                },
            };
            snap.index.upsert(entry.key, info);
            snap.by_key
                .insert(entry.key, (entry.clone(), gw.expires_at_ms));
            snap.remote.insert(id, Remote { entry, dir: n });
        }
        snap.gateways = gateways;
        self.applied_at_ms.store(now_ms, Ordering::Relaxed);
    }

    fn remote_entry(&self, n: &NodeDirEntry, peer: &Arc<Peer>, now_ms: u64) -> NodeEntry {
        let record = lock(&peer.record).clone();
        let addr = record
            .quic_address
            .parse()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let link = PeerLink {
            peer: peer.clone(),
            node_id: n.node_id.clone(),
            addr,
        };
        // A remote node has no control loop here: nothing reads its commands.
        let (commands, _) = tokio::sync::mpsc::channel(1);
        let mut entry = NodeEntry::new(
            n.node_id.clone(),
            n.operator_id.clone(),
            addr,
            remote_location(n),
            Vec::new(),
            (self.classify)(&n.gpu_classes),
            Workloads {
                games: n.games.clone(),
                models: n.models.clone(),
                // As the node's gateway published them: a request needing a capability is
                // routed to a remote node that declares it.
                model_caps: n
                    .model_caps
                    .iter()
                    .map(|b| ModelCaps::from_bits(u64::from(*b)))
                    .collect(),
            },
            Capacity {
                game_sessions: n.game_slots,
                inference_concurrency: n.inference_slots,
            },
            String::new(),
            now_ms,
            NodeLink::remote(Arc::new(link)),
            commands,
            NodeDynamic::admitted(now_ms, 0.0, 0),
        );
        // The encoders its gateway published: a game session over the trunk is routed only to
        // a remote node that encodes its codec.
        let encoders: Vec<nearpath_protocol::message::NodeEncoder> = n
            .encoders
            .iter()
            .filter_map(|e| {
                Some(nearpath_protocol::message::NodeEncoder {
                    codec: nearpath_protocol::message::VideoCodec::from_name(&e.codec)?,
                    implementation: e.implementation.clone(),
                })
            })
            .collect();
        entry.set_encoders(&encoders);
        entry.key = NodeId(REMOTE_KEY_BIT | self.next_key.fetch_add(1, Ordering::Relaxed) as u64);
        entry
    }

    /// Ranks the remote nodes for `workload` as the registry ranks local ones; `allow` is the
    /// geofence (and capability) check per node, which this gateway applies to remote nodes as
    /// to its own. Nodes of a peer whose lease expired since the last read are skipped.
    pub fn route<F>(
        &self,
        client: Option<LatLon>,
        workload: Workload<'_>,
        mut allow: F,
    ) -> (RouteOutcome, Vec<Arc<NodeEntry>>)
    where
        F: FnMut(&NodeEntry) -> Result<(), Deny>,
    {
        let now_ms = self.clock.unix_ms();
        let snap = lock(&self.snapshot);
        let by_key = &snap.by_key;
        let outcome = snap
            .index
            .route(client, workload, |key| match by_key.get(&key) {
                Some((_, expires)) if now_ms >= *expires => Err(Deny {
                    rule: "registry".into(),
                    reason: "the node's gateway is gone".into(),
                }),
                Some((e, _)) => allow(e),
                None => Err(Deny {
                    rule: "registry".into(),
                    reason: "node left".into(),
                }),
            });
        let nodes = outcome
            .candidates
            .iter()
            .filter_map(|c| by_key.get(&c.node).map(|(e, _)| e.clone()))
            .collect();
        (outcome, nodes)
    }

    /// The models that nodes of live peers serve (per the last directory read), each with the
    /// ids of the gateways holding such a node and the union of what those nodes declare, for
    /// the fleet-wide `GET /v1/models`. `allow` is the listing's geofence check: a node the
    /// client may not use lists nothing. Nodes of a peer whose lease expired since the read
    /// are left out.
    pub fn remote_models(
        &self,
        mut allow: impl FnMut(&NodeEntry) -> bool,
    ) -> std::collections::BTreeMap<String, RemoteModel> {
        let now_ms = self.clock.unix_ms();
        let snap = lock(&self.snapshot);
        let mut out: std::collections::BTreeMap<String, RemoteModel> = Default::default();
        for ((gateway, _), r) in &snap.remote {
            let live = snap
                .by_key
                .get(&r.entry.key)
                .is_some_and(|(_, expires)| now_ms < *expires);
            if !live || !allow(&r.entry) {
                continue;
            }
            for m in &r.dir.models {
                let e = out.entry(m.clone()).or_default();
                e.gateways.insert(gateway.clone());
                e.caps = e.caps.with(r.entry.model_caps(m).unwrap_or_default());
            }
        }
        out
    }

    /// The union of the capabilities live peers' nodes declare for `model` (per the last
    /// directory read); `None` when no such node serves it.
    pub fn remote_model_caps(&self, model: &str) -> Option<ModelCaps> {
        let now_ms = self.clock.unix_ms();
        let snap = lock(&self.snapshot);
        snap.remote
            .values()
            .filter(|r| {
                snap.by_key
                    .get(&r.entry.key)
                    .is_some_and(|(_, expires)| now_ms < *expires)
            })
            .filter_map(|r| r.entry.model_caps(model))
            .reduce(ModelCaps::with)
    }

    /// The live peer holding the remote node `key` (one [`Trunk::route`] handed out), with the
    /// node's id there: where an inference redirect sends the client.
    pub fn holder(&self, key: NodeId) -> Option<(GatewayRecord, String)> {
        let now_ms = self.clock.unix_ms();
        let snap = lock(&self.snapshot);
        let ((gateway, node_id), _) = snap.remote.iter().find(|(_, r)| r.entry.key == key)?;
        let record = snap
            .gateways
            .iter()
            .find(|g| &g.id == gateway && g.is_live(now_ms))?;
        Some((record.clone(), node_id.clone()))
    }

    /// Whether a remote node serves `model` (per the last directory read).
    pub fn serves_model(&self, model: &str) -> bool {
        lock(&self.snapshot)
            .remote
            .values()
            .any(|r| r.dir.models.iter().any(|m| m == model))
    }

    /// Serves a peer's trunk connection (ALPN `nearpath-peer/1`): admits it by its pin, then
    /// relays each of its streams to the node it names until the connection ends.
    pub async fn serve_peer(
        self: Arc<Self>,
        conn: quinn::Connection,
        gate: Arc<crate::conn_guard::QuicGate>,
        shutdown: CancellationToken,
    ) {
        let pin = peer_cert_sha256(&conn);
        let mut verdict = self.admit_peer(pin);
        let stale = self
            .clock
            .unix_ms()
            .saturating_sub(self.applied_at_ms.load(Ordering::Relaxed))
            >= self.config.node_directory_interval_ms;
        if stale && matches!(verdict, Err(PeerRefusal::UnknownPin | PeerRefusal::Expired)) {
            // A peer that joined (or renewed) since our last read: read again once.
            if let Err(e) = self.refresh().await {
                debug!(error = %e, "re-reading the gateway directory for a peer");
            }
            verdict = self.admit_peer(pin);
        }
        let peer_id = match verdict {
            Ok(id) => id,
            Err(r) => {
                warn!(peer = %conn.remote_address(), reason = r.as_str(), "trunk connection refused");
                conn.close(CLOSE_PEER_REFUSED, r.as_str().as_bytes());
                return;
            }
        };
        if gate.authenticated(conn.stable_id()) {
            conn.set_max_concurrent_bi_streams(PEER_BIDI_STREAMS.into());
            conn.set_receive_window(PEER_RECEIVE_WINDOW.into());
        }
        info!(peer = %peer_id, address = %conn.remote_address(), "peer gateway connected over the trunk");
        lock(&self.accepted).push((peer_id.clone(), conn.clone()));
        // The peer's players' input for the game sessions it runs on our nodes.
        if self.carries_games() {
            tokio::spawn(peer_input_loop(self.games.clone(), conn.clone()));
        }
        loop {
            let (tx, rx) = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = conn.accept_bi() => match s {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(peer = %peer_id, error = %e, "trunk connection ended");
                        return;
                    }
                },
            };
            if !self.peer_live(&peer_id) {
                conn.close(CLOSE_PEER_REFUSED, PeerRefusal::Expired.as_str().as_bytes());
                return;
            }
            let this = self.clone();
            let peer_id = peer_id.clone();
            let conn = conn.clone();
            tokio::spawn(async move { this.serve_stream(&peer_id, &conn, tx, rx).await });
        }
    }

    /// The id of the live peer gateway pinning `pin`, per the last directory read.
    fn admit_peer(&self, pin: Option<[u8; 32]>) -> Result<String, PeerRefusal> {
        let snap = lock(&self.snapshot);
        check_peer(pin, &snap.gateways, &self.self_id, self.clock.unix_ms()).map(|g| g.id.clone())
    }

    fn peer_live(&self, peer_id: &str) -> bool {
        let now_ms = self.clock.unix_ms();
        lock(&self.snapshot)
            .gateways
            .iter()
            .any(|g| g.id == peer_id && g.is_live(now_ms))
    }

    /// One trunk stream: `PeerOpen`, then `Open`, checked ([`check_open`]), then relayed to the
    /// node. A refusal is a `Refused` the peer treats as the node's own (it tries its next
    /// candidate); a protocol violation resets the stream.
    async fn serve_stream(
        &self,
        peer_id: &str,
        peer: &quinn::Connection,
        mut tx: SendStream,
        rx: RecvStream,
    ) {
        let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
        // `PeerOpen` first (anything else is refused at once), then the session's `Open`.
        let node_id = match tokio::time::timeout(OPEN_TIMEOUT, framed.next()).await {
            Ok(Ok(Some(Message::PeerOpen(p)))) => Some(p.node_id),
            _ => None,
        };
        let open = match node_id {
            Some(_) => match tokio::time::timeout(OPEN_TIMEOUT, framed.next()).await {
                Ok(Ok(Some(Message::Open(o)))) => Some(o),
                _ => None,
            },
            None => None,
        };
        let (Some(node_id), Some(open)) = (node_id, open) else {
            debug!(peer = %peer_id, "trunk stream without PeerOpen and Open");
            let _ = tx.reset(STREAM_REFUSED);
            let _ = framed.get_mut().stop(STREAM_REFUSED);
            return;
        };
        let node = self.registry.get(&node_id);
        let game = matches!(open.kind, SessionKind::Game(_));
        let games = self.dialer.games.get();
        let kind = if game {
            SlotKind::Game
        } else {
            SlotKind::Inference
        };
        let checked = match games {
            // Without `game_route = "trunk"` games are redirected, never relayed.
            None if game => Err((
                RefuseCode::UnknownWorkload,
                "game sessions do not travel over this gateway's trunk (they are redirected)"
                    .to_string(),
            )),
            _ => check_open(&node_id, node.as_deref(), &open.kind),
        }
        .and_then(|()| {
            node.as_ref()
                .and_then(|n| self.registry.acquire(n, kind))
                .ok_or((RefuseCode::Busy, format!("node {node_id} has no free slot")))
        });
        // A game session holds its id among ours (a peer naming one of our live sessions, or
        // one it already runs here, is refused) and is entered in the table the frame, audio
        // and input relays read, before the node can send its first frame.
        let checked = checked.and_then(|slot| match games {
            Some(g) if game => {
                let id = g.ids.claim(open.session_id).ok_or((
                    RefuseCode::Busy,
                    format!("session id {} is in use here", open.session_id),
                ))?;
                lock(&self.games.by_session).insert(
                    open.session_id,
                    TrunkGame {
                        node: slot.node.conn.clone(),
                        peer: peer.clone(),
                    },
                );
                Ok((
                    slot,
                    Some(TrunkGameGuard {
                        games: &self.games,
                        session_id: open.session_id,
                        _id: id,
                    }),
                ))
            }
            _ => Ok((slot, None)),
        });
        let (slot, _registered) = match checked {
            Ok(slot) => slot,
            Err((code, reason)) => {
                debug!(peer = %peer_id, node = %node_id, %reason, "trunk stream refused");
                let refused = Message::Refused(Refused { code, reason });
                if send(&mut tx, &refused).await.is_ok() {
                    let _ = tx.finish();
                }
                return;
            }
        };
        let node = slot.node.clone();
        let (mut node_tx, node_rx) = match node.conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                let refused = Message::Refused(Refused {
                    code: RefuseCode::Busy,
                    reason: format!("node {node_id} is unreachable: {e}"),
                });
                if send(&mut tx, &refused).await.is_ok() {
                    let _ = tx.finish();
                }
                return;
            }
        };
        if send(&mut node_tx, &Message::Open(open)).await.is_err() {
            let _ = node_tx.reset(STREAM_CANCELLED);
            let _ = tx.reset(STREAM_CANCELLED);
            return;
        }
        debug!(peer = %peer_id, node = %node_id, "trunk stream relayed to the node");
        relay(tx, framed, node_tx, node_rx).await;
        drop(slot);
    }
}

/// Relays a trunk stream and the node's stream until either side ends: the node's bytes go
/// to the peer as they come (no decoding: the peer reads them as the node's own stream), the
/// peer's messages after `Open` go to the node. The node finishing finishes the trunk stream; a
/// reset on either side is passed on (`STREAM_CANCELLED` from the peer aborts the backend
/// request, the node's code reaches the peer).
async fn relay(
    mut tx: SendStream,
    mut from_peer: FramedRecv,
    mut node_tx: SendStream,
    mut node_rx: RecvStream,
) {
    let completed = {
        let down = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                // A game's node says little on its session stream (its frames travel apart),
                // so the peer stopping its side must be noticed while the node is silent.
                let read = tokio::select! {
                    r = node_rx.read(&mut buf) => r,
                    _ = tx.stopped() => return Err(STREAM_CANCELLED),
                };
                match read {
                    Ok(Some(n)) => {
                        if tx.write_all(&buf[..n]).await.is_err() {
                            // The peer stopped reading: its client went away.
                            return Err(STREAM_CANCELLED);
                        }
                    }
                    Ok(None) => {
                        let _ = tx.finish();
                        return Ok(());
                    }
                    Err(quinn::ReadError::Reset(code)) => {
                        let _ = tx.reset(code);
                        return Ok(());
                    }
                    Err(_) => {
                        let _ = tx.reset(STREAM_CANCELLED);
                        return Ok(());
                    }
                }
            }
        };
        let up = async {
            loop {
                match from_peer.next().await {
                    Ok(Some(msg)) => {
                        if send(&mut node_tx, &msg).await.is_err() {
                            return;
                        }
                    }
                    // The peer finished its side: nothing more for the node, which keeps streaming.
                    Ok(None) => std::future::pending::<()>().await,
                    Err(_) => return,
                }
            }
        };
        tokio::select! {
            r = down => r.is_ok(),
            // The peer reset its side (its client went away) or broke the protocol.
            () = up => false,
        }
    };
    if !completed {
        let _ = node_rx.stop(STREAM_CANCELLED);
        let _ = node_tx.reset(STREAM_CANCELLED);
    }
}

/// Forwards a peer's input datagrams to the nodes serving the game sessions that peer runs
/// here through the trunk; a datagram that is malformed or names a session this peer
/// connection did not open is dropped. Runs once per admitted peer connection.
async fn peer_input_loop(games: Arc<TrunkGames>, conn: quinn::Connection) {
    while let Ok(dgram) = conn.read_datagram().await {
        let Ok(input) = nearpath_protocol::InputDatagram::decode(&dgram) else {
            continue;
        };
        if let Some(node) = games.node_for(input.session_id, conn.stable_id()) {
            let _ = node.send_datagram(dgram);
        }
    }
}

/// Forwards one frame stream of a node serving a peer's game session to that peer as a uni
/// stream on the trunk, header first, within `within` (late frames are the peer's relay's
/// to judge, but one stuck stream must not be held for ever).
pub async fn forward_frame(
    recv: RecvStream,
    header: &nearpath_protocol::FrameHeader,
    peer: &quinn::Connection,
    within: Duration,
) -> bool {
    let write_by = tokio::time::Instant::now() + within;
    matches!(
        nearpath_protocol::stream::relay_frame_by(
            recv,
            header,
            peer,
            nearpath_protocol::MAX_VIDEO_FRAME,
            write_by,
            write_by + peer.rtt(),
        )
        .await,
        Ok(nearpath_protocol::stream::Relayed::Delivered(_))
    )
}

/// Merges the ranking of this gateway's nodes with that of the remote nodes into one, as if one
/// router had ranked them all: candidates by score (best first, at most `max_candidates`), the
/// counts added up, the first denial kept (a local one first). Each list's entries are those of
/// its candidates.
pub fn merge_routes(
    local: (RouteOutcome, Vec<Arc<NodeEntry>>),
    remote: (RouteOutcome, Vec<Arc<NodeEntry>>),
    max_candidates: usize,
) -> (RouteOutcome, Vec<Arc<NodeEntry>>) {
    let (mut a, a_nodes) = local;
    let (b, b_nodes) = remote;
    if b.serving == 0 {
        return (a, a_nodes);
    }
    let mut candidates = a.candidates;
    candidates.extend(b.candidates);
    candidates.sort_by(|x, y| x.score_ms.total_cmp(&y.score_ms));
    candidates.truncate(max_candidates.max(1));
    let nodes = candidates
        .iter()
        .filter_map(|c| {
            a_nodes
                .iter()
                .chain(b_nodes.iter())
                .find(|n| n.key == c.node)
                .cloned()
        })
        .collect();
    a.candidates = candidates;
    a.serving += b.serving;
    a.full += b.full;
    a.draining += b.draining;
    a.denied = a.denied.or(b.denied);
    a.denied_count += b.denied_count;
    a.examined += b.examined;
    (a, nodes)
}

/// The geofence's class ids for the GPU classes a node was admitted with, as the node front end
/// derives them at registration: an unclassified GPU is every class the geofence names
/// (`restricted`), a node without GPUs is `cpu`.
pub fn classes_of(
    policy: &nearpath_geo::Policy,
    restricted: &[ClassId],
    names: &[String],
) -> Vec<(String, ClassId)> {
    let cpu = [crate::gpu_class::CPU.to_string()];
    let names = if names.is_empty() { &cpu[..] } else { names };
    let mut out: Vec<(String, ClassId)> = Vec::new();
    for name in names {
        if out.iter().any(|(n, _)| n == name) {
            continue;
        }
        if name == crate::gpu_class::UNCLASSIFIED {
            out.extend(restricted.iter().map(|id| (name.clone(), *id)));
        } else {
            out.push((name.clone(), policy.class_id(name)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use nearpath_geo::{Location, Subdivision};
    use nearpath_protocol::message::GameParams;
    use nearpath_protocol::openai::Endpoint;

    const T0: u64 = 1_000_000;

    fn record(id: &str, pin: [u8; 32], expires_at_ms: u64) -> GatewayRecord {
        GatewayRecord {
            id: id.into(),
            region: "r".into(),
            lat: 50.0,
            lon: 8.0,
            quic_address: "127.0.0.1:4433".into(),
            http_url: "http://127.0.0.1:8080".into(),
            cert_sha256: nearpath_protocol::tls::sha256_hex(&pin),
            version: "0.1.0".into(),
            started_at_ms: 0,
            heartbeat_at_ms: expires_at_ms.saturating_sub(3_000),
            expires_at_ms,
        }
    }

    fn dir_node(id: &str, gateway: &str, models: &[&str]) -> NodeDirEntry {
        NodeDirEntry {
            node_id: id.into(),
            operator_id: "op".into(),
            gateway_id: gateway.into(),
            country: Some("DE".into()),
            lat: Some(52.5),
            lon: Some(13.4),
            gpu_classes: vec![],
            models: models.iter().map(|m| m.to_string()).collect(),
            games: vec![],
            inference_slots: 4,
            inference_free: 4,
            game_slots: 0,
            game_free: 0,
            accepting: true,
            verification: "unverified".into(),
            updated_at_ms: T0,
            encoders: Vec::new(),
            model_caps: Vec::new(),
            subdivision: None,
        }
    }

    #[test]
    fn a_peer_is_admitted_only_by_the_pin_of_a_live_gateway_other_than_itself() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let gws = vec![
            record("gw-a", a, T0 + 3_000),
            record("gw-b", b, T0 + 3_000),
            record("gw-old", c, T0 - 1),
        ];
        assert_eq!(
            check_peer(Some(b), &gws, "gw-a", T0).map(|g| g.id.as_str()),
            Ok("gw-b")
        );
        assert_eq!(
            check_peer(None, &gws, "gw-a", T0).err(),
            Some(PeerRefusal::NoCertificate)
        );
        assert_eq!(
            check_peer(Some([9u8; 32]), &gws, "gw-a", T0).err(),
            Some(PeerRefusal::UnknownPin)
        );
        assert_eq!(
            check_peer(Some(c), &gws, "gw-a", T0).err(),
            Some(PeerRefusal::Expired)
        );
        assert_eq!(
            check_peer(Some(a), &gws, "gw-a", T0).err(),
            Some(PeerRefusal::IsSelf)
        );
        // The lease ends exactly at `expires_at_ms`.
        assert_eq!(
            check_peer(Some(b), &gws, "gw-a", T0 + 3_000).err(),
            Some(PeerRefusal::Expired)
        );
    }

    #[test]
    fn a_live_entry_wins_over_an_expired_one_with_the_same_pin() {
        let pin = [7u8; 32];
        let gws = vec![
            record("gw-b-old", pin, T0 - 10),
            record("gw-b", pin, T0 + 10),
        ];
        assert_eq!(
            check_peer(Some(pin), &gws, "gw-a", T0).map(|g| g.id.as_str()),
            Ok("gw-b")
        );
    }

    #[test]
    fn refusal_reasons_are_the_documented_close_reasons() {
        let doc = include_str!("../../protocol/PROTOCOL.md");
        for r in [
            PeerRefusal::NoCertificate,
            PeerRefusal::UnknownPin,
            PeerRefusal::Expired,
            PeerRefusal::IsSelf,
        ] {
            assert!(doc.contains(&format!("`{}`", r.as_str())), "{}", r.as_str());
        }
    }

    fn inference(model: &str) -> SessionKind {
        SessionKind::Inference {
            model: model.into(),
            endpoint: Endpoint::Chat,
            request_json: "{}".into(),
            request_id: "req_1".into(),
            traceparent: None,
        }
    }

    fn local_node(id: &str, models: &[&str]) -> NodeEntry {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        NodeEntry::new(
            id.into(),
            "op".into(),
            "127.0.0.1:1".parse().unwrap(),
            Location::default(),
            vec![],
            vec![],
            Workloads {
                games: vec!["tetris".into()],
                models: models.iter().map(|m| m.to_string()).collect(),
                model_caps: vec![],
            },
            Capacity {
                game_sessions: 1,
                inference_concurrency: 2,
            },
            "1.0.0".into(),
            T0,
            NodeLink::detached("127.0.0.1:1".parse().unwrap()),
            tx,
            NodeDynamic::admitted(T0, 0.0, 0),
        )
    }

    fn game_params(kind: &SessionKind) -> GameParams {
        match kind {
            SessionKind::Game(p) => p.clone(),
            SessionKind::Inference { .. } => unreachable!("a game"),
        }
    }

    #[test]
    fn a_trunk_open_naming_a_node_not_attached_here_is_refused() {
        let err = check_open("ghost", None, &inference("m")).unwrap_err();
        assert_eq!(err.0, RefuseCode::UnknownWorkload);
        assert!(err.1.contains("not attached"), "{}", err.1);
    }

    #[test]
    fn a_trunk_open_is_refused_for_a_model_or_game_the_node_lacks_or_a_node_not_accepting() {
        let n = local_node("n1", &["m"]);
        assert_eq!(check_open("n1", Some(&n), &inference("m")), Ok(()));
        assert_eq!(
            check_open("n1", Some(&n), &inference("other"))
                .unwrap_err()
                .0,
            RefuseCode::UnknownWorkload
        );
        let game = SessionKind::Game(GameParams {
            title: "tetris".into(),
            width: 640,
            height: 360,
            fps: 30,
            bitrate_kbps: 1_000,
            codec: Default::default(),
            traceparent: None,
        });
        // A game the node serves, in a codec it encodes, travels (`game_route = "trunk"`);
        // another title or codec does not.
        assert_eq!(check_open("n1", Some(&n), &game), Ok(()));
        let other_title = SessionKind::Game(GameParams {
            title: "chess".into(),
            ..game_params(&game)
        });
        assert_eq!(
            check_open("n1", Some(&n), &other_title).unwrap_err().0,
            RefuseCode::UnknownWorkload
        );
        let hevc = SessionKind::Game(GameParams {
            codec: nearpath_protocol::message::VideoCodec::Hevc,
            ..game_params(&game)
        });
        assert_eq!(
            check_open("n1", Some(&n), &hevc).unwrap_err().0,
            RefuseCode::UnknownWorkload
        );
        n.dynamic().state = NodeState::Draining;
        assert_eq!(
            check_open("n1", Some(&n), &inference("m")).unwrap_err().0,
            RefuseCode::Busy
        );
        let gone = local_node("n2", &["m"]);
        gone.conn
            .close(nearpath_protocol::app_code::CLOSE_NORMAL, b"bye");
        assert_eq!(
            check_open("n2", Some(&gone), &inference("m"))
                .unwrap_err()
                .0,
            RefuseCode::Busy
        );
    }

    struct NoFleet;

    impl FleetSource for NoFleet {
        fn gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
            Ok(Vec::new())
        }
        fn node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
            Ok(Vec::new())
        }
    }

    fn trunk(clock: &Arc<ManualClock>, registry: Arc<Registry>) -> Trunk {
        let config = FederationConfig {
            gateway_id: Some("gw-a".into()),
            ..Default::default()
        };
        let policy =
            nearpath_geo::Policy::compile(&nearpath_config::GeofenceConfig::default()).unwrap();
        let classify: Classify = Arc::new(move |names: &[String]| classes_of(&policy, &[], names));
        Trunk::new(
            "gw-a".into(),
            config,
            RouteParams::default(),
            Arc::new(NoFleet),
            registry,
            clock.clone(),
            classify,
            crate::tls::self_signed(&["localhost"]).unwrap(),
        )
        .unwrap()
    }

    fn routed(t: &Trunk, model: &str) -> Vec<String> {
        let client = LatLon::new(48.85, 2.35).ok();
        t.route(client, Workload::Model(model), |_| Ok(()))
            .1
            .iter()
            .map(|n| n.id.clone())
            .collect()
    }

    #[test]
    fn remote_nodes_of_live_peers_are_routed_and_those_of_expired_peers_are_not() {
        let clock = ManualClock::new(T0);
        let registry = Arc::new(Registry::new(RouteParams::default()).unwrap());
        let t = trunk(&clock, registry);
        t.apply(
            T0,
            vec![
                record("gw-a", [1; 32], T0 + 3_000),
                record("gw-b", [2; 32], T0 + 3_000),
                record("gw-c", [3; 32], T0 - 1),
            ],
            vec![
                dir_node("b1", "gw-b", &["m"]),
                dir_node("c1", "gw-c", &["m"]),
                // Our own publication is never a remote node.
                dir_node("a1", "gw-a", &["m"]),
            ],
        );
        assert_eq!(routed(&t, "m"), vec!["b1".to_string()]);
        assert!(routed(&t, "other").is_empty());
        let (_, nodes) = t.route(None, Workload::Model("m"), |_| Ok(()));
        assert!(nodes[0].conn.is_remote());
        assert!(
            nodes[0].key.0 & REMOTE_KEY_BIT != 0,
            "remote keys never meet local ones"
        );
        // B's lease runs out before the next directory read: its nodes stop being routed at once.
        clock.advance(Duration::from_millis(3_000));
        assert!(routed(&t, "m").is_empty());
    }

    #[test]
    fn remote_models_list_each_model_once_with_the_live_peers_serving_it() {
        let clock = ManualClock::new(T0);
        let registry = Arc::new(Registry::new(RouteParams::default()).unwrap());
        let t = trunk(&clock, registry);
        t.apply(
            T0,
            vec![
                record("gw-a", [1; 32], T0 + 3_000),
                record("gw-b", [2; 32], T0 + 3_000),
                record("gw-c", [3; 32], T0 + 6_000),
                record("gw-d", [4; 32], T0 - 1),
            ],
            vec![
                dir_node("b1", "gw-b", &["m", "only-b"]),
                dir_node("b2", "gw-b", &["m"]),
                dir_node("c1", "gw-c", &["m", "denied"]),
                dir_node("d1", "gw-d", &["dead"]),
                dir_node("a1", "gw-a", &["ours"]),
            ],
        );
        let listed = |t: &Trunk| -> Vec<(String, Vec<String>)> {
            t.remote_models(|n| n.id != "c1" || !n.workloads.models.contains(&"denied".into()))
                .into_iter()
                .map(|(m, g)| (m, g.gateways.into_iter().collect()))
                .collect()
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // Not our own node's model, not an expired peer's; a node the check refuses lists
        // nothing (here c1, so `m` is B's only).
        assert_eq!(
            listed(&t),
            vec![
                ("m".to_string(), s(&["gw-b"])),
                ("only-b".to_string(), s(&["gw-b"]))
            ]
        );
        let all: Vec<String> = t.remote_models(|_| true).into_keys().collect();
        assert_eq!(all, s(&["denied", "m", "only-b"]));
        assert_eq!(
            t.remote_models(|_| true)["m"]
                .gateways
                .iter()
                .cloned()
                .collect::<Vec<_>>(),
            s(&["gw-b", "gw-c"])
        );
        // B's lease runs out before the next read: its models leave the listing at once.
        clock.advance(Duration::from_millis(3_000));
        let all: Vec<String> = t.remote_models(|_| true).into_keys().collect();
        assert_eq!(all, s(&["denied", "m"]));
    }

    #[test]
    fn remote_nodes_carry_the_model_capabilities_their_gateway_published() {
        let clock = ManualClock::new(T0);
        let registry = Arc::new(Registry::new(RouteParams::default()).unwrap());
        let t = trunk(&clock, registry);
        let mut tools = dir_node("b1", "gw-b", &["m", "plain"]);
        tools.model_caps = vec![ModelCaps::TOOLS.bits() | (1 << 20)];
        t.apply(
            T0,
            vec![record("gw-b", [2; 32], T0 + 3_000)],
            vec![tools, dir_node("b2", "gw-b", &["m"])],
        );
        // The union over the nodes serving it; unknown bits dropped; a model past the end of
        // the list declares nothing.
        assert_eq!(t.remote_model_caps("m"), Some(ModelCaps::TOOLS));
        assert_eq!(t.remote_model_caps("plain"), Some(ModelCaps::NONE));
        assert_eq!(t.remote_model_caps("other"), None);
        // Routing sees them as the node's own: only b1 passes a check that needs tools.
        let (_, nodes) = t.route(None, Workload::Model("m"), |n| {
            if n.model_caps("m")
                .is_some_and(|c| c.contains(ModelCaps::TOOLS))
            {
                Ok(())
            } else {
                Err(Deny {
                    rule: "caps".into(),
                    reason: "no tools".into(),
                })
            }
        });
        let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["b1"]);
        clock.advance(Duration::from_millis(3_000));
        assert_eq!(t.remote_model_caps("m"), None, "B's lease ended");
    }

    /// Regression (issue 13): the trunk built a remote node's location from its country only,
    /// so a geofence rule naming a subdivision never matched a node another gateway holds.
    #[test]
    fn a_subdivision_rule_judges_remote_nodes_by_their_published_subdivision() {
        let clock = ManualClock::new(T0);
        let registry = Arc::new(Registry::new(RouteParams::default()).unwrap());
        let t = trunk(&clock, registry);
        let at = |id: &str, sub: Option<&str>| NodeDirEntry {
            country: Some("UA".into()),
            subdivision: sub.map(str::to_string),
            ..dir_node(id, "gw-b", &["m"])
        };
        // A forged row (a subdivision of another country) is not believed: the store drops the
        // value on read, and a row carrying it anyway fails the reader's checks and is skipped.
        let forged = NodeDirEntry {
            country: Some("PL".into()),
            subdivision: Some("UA-43".into()),
            ..dir_node("forged", "gw-b", &["m"])
        };
        t.apply(
            T0,
            vec![record("gw-b", [2; 32], T0 + 3_000)],
            vec![
                at("crimea", Some("UA-43")),
                at("kyiv", Some("UA-30")),
                forged,
            ],
        );
        let config = nearpath_config::GeofenceConfig {
            rules: vec![nearpath_config::GeofenceRule {
                name: "no-crimea".into(),
                enabled: true,
                reason: None,
                gpu_classes: vec![],
                workloads: vec![],
                deny_client_countries: vec![],
                deny_node_countries: vec!["UA-43".into()],
                residency_client_countries: vec![],
                residency_node_countries: vec![],
                unknown_location: nearpath_config::UnknownPolicy::Allow,
            }],
            ..Default::default()
        };
        let policy = nearpath_geo::Policy::compile(&config).unwrap();
        let sub = Subdivision::parse("UA-30").unwrap();
        let client = Location {
            subdivision: Some(sub),
            ..Location::from_country(sub.country())
        };
        // The check inference applies to every candidate, local or remote.
        let (_, nodes) = t.route(None, Workload::Model("m"), |n| {
            match policy.check_serve(
                &client,
                &n.location(),
                policy.class_id("cpu"),
                nearpath_config::WorkloadKind::Inference,
            ) {
                nearpath_geo::Decision::Deny { rule, reason, .. } => Err(Deny {
                    rule: rule.to_string(),
                    reason: reason.to_string(),
                }),
                _ => Ok(()),
            }
        });
        let mut ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["kyiv"]);
        // Without the rule, both published nodes are candidates.
        let (_, all) = t.route(None, Workload::Model("m"), |_| Ok(()));
        let mut ids: Vec<&str> = all.iter().map(|n| n.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["crimea", "kyiv"]);
    }

    #[test]
    fn a_node_this_gateway_holds_is_never_routed_as_remote() {
        let clock = ManualClock::new(T0);
        let registry = Arc::new(Registry::new(RouteParams::default()).unwrap());
        registry.insert(local_node("b1", &["m"]), 1_000).unwrap();
        let t = trunk(&clock, registry);
        t.apply(
            T0,
            vec![record("gw-b", [2; 32], T0 + 3_000)],
            vec![dir_node("b1", "gw-b", &["m"])],
        );
        assert!(routed(&t, "m").is_empty());
    }

    #[test]
    fn a_remote_node_that_is_full_or_not_accepting_is_not_a_candidate() {
        let clock = ManualClock::new(T0);
        let t = trunk(
            &clock,
            Arc::new(Registry::new(RouteParams::default()).unwrap()),
        );
        let mut full = dir_node("b1", "gw-b", &["m"]);
        full.inference_free = 0;
        let mut draining = dir_node("b2", "gw-b", &["m"]);
        draining.accepting = false;
        t.apply(
            T0,
            vec![record("gw-b", [2; 32], T0 + 3_000)],
            vec![full, draining],
        );
        let (outcome, nodes) = t.route(None, Workload::Model("m"), |_| Ok(()));
        assert!(nodes.is_empty());
        assert_eq!((outcome.serving, outcome.full, outcome.draining), (2, 1, 1));
    }

    #[test]
    fn the_geofence_is_applied_to_remote_nodes_with_their_published_country() {
        let clock = ManualClock::new(T0);
        let t = trunk(
            &clock,
            Arc::new(Registry::new(RouteParams::default()).unwrap()),
        );
        t.apply(
            T0,
            vec![record("gw-b", [2; 32], T0 + 3_000)],
            vec![dir_node("b1", "gw-b", &["m"])],
        );
        let mut seen = Vec::new();
        let (outcome, nodes) = t.route(None, Workload::Model("m"), |n| {
            seen.push(n.location().country.map(|c| c.as_str().to_string()));
            Err(Deny {
                rule: "no_de".into(),
                reason: "denied".into(),
            })
        });
        assert!(nodes.is_empty());
        assert_eq!(seen, vec![Some("DE".to_string())]);
        assert_eq!(outcome.denied.map(|d| d.rule), Some("no_de".to_string()));
    }

    #[test]
    fn a_republished_node_keeps_its_entry_and_the_count_of_our_sessions_on_it() {
        let clock = ManualClock::new(T0);
        let registry = Arc::new(Registry::new(RouteParams::default()).unwrap());
        let t = trunk(&clock, registry.clone());
        let gws = vec![record("gw-b", [2; 32], T0 + 3_000)];
        t.apply(T0, gws.clone(), vec![dir_node("b1", "gw-b", &["m"])]);
        let (_, first) = t.route(None, Workload::Model("m"), |_| Ok(()));
        let slot = registry.acquire(&first[0], SlotKind::Inference).unwrap();
        let mut again = dir_node("b1", "gw-b", &["m"]);
        again.inference_free = 3;
        t.apply(T0 + 500, gws, vec![again]);
        let (_, second) = t.route(None, Workload::Model("m"), |_| Ok(()));
        assert!(Arc::ptr_eq(&first[0], &second[0]));
        assert_eq!(second[0].sessions_in_use(), 1);
        drop(slot);
    }

    #[test]
    fn merged_routes_rank_local_and_remote_nodes_by_one_score() {
        use crate::router::Candidate;
        let n = |id: &str, key: u64| {
            let mut e = local_node(id, &["m"]);
            e.key = NodeId(key);
            Arc::new(e)
        };
        let outcome = |c: &[(u64, f64)]| RouteOutcome {
            candidates: c
                .iter()
                .map(|(k, s)| Candidate {
                    node: NodeId(*k),
                    score_ms: *s,
                    est_client_rtt_ms: 0.0,
                })
                .collect(),
            serving: c.len(),
            full: 0,
            draining: 0,
            denied: None,
            denied_count: 0,
            examined: c.len(),
        };
        let local = (
            outcome(&[(1, 30.0), (2, 90.0)]),
            vec![n("l1", 1), n("l2", 2)],
        );
        let remote = (
            outcome(&[(REMOTE_KEY_BIT | 1, 50.0)]),
            vec![n("r1", REMOTE_KEY_BIT | 1)],
        );
        let (o, nodes) = merge_routes(local, remote, 3);
        let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["l1", "r1", "l2"]);
        assert_eq!(o.serving, 3);
        // No local node at all: the remote ones are the route.
        let none = (outcome(&[]), vec![]);
        let remote = (
            outcome(&[(REMOTE_KEY_BIT | 1, 50.0)]),
            vec![n("r1", REMOTE_KEY_BIT | 1)],
        );
        let (o, nodes) = merge_routes(none, remote, 3);
        assert!(o.failure().is_none());
        assert_eq!(nodes[0].id, "r1");
        // At most `max_candidates`.
        let local = (
            outcome(&[(1, 30.0), (2, 90.0)]),
            vec![n("l1", 1), n("l2", 2)],
        );
        let remote = (
            outcome(&[(REMOTE_KEY_BIT | 1, 50.0)]),
            vec![n("r1", REMOTE_KEY_BIT | 1)],
        );
        assert_eq!(merge_routes(local, remote, 2).1.len(), 2);
    }

    #[test]
    fn unclassified_gpus_count_as_every_restricted_class_and_no_gpu_as_cpu() {
        let policy =
            nearpath_geo::Policy::compile(&nearpath_config::GeofenceConfig::default()).unwrap();
        let restricted = [policy.class_id("h100"), policy.class_id("a100")];
        let c = classes_of(&policy, &restricted, &["unclassified".to_string()]);
        assert_eq!(c.len(), 2);
        let c = classes_of(&policy, &restricted, &[]);
        assert_eq!(c, vec![("cpu".to_string(), policy.class_id("cpu"))]);
    }
}
