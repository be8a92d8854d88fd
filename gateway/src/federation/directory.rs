//! The gateway directory and the node directory, from one gateway's side.
//!
//! Every gateway (a standalone one too: a federation of one, with id `standalone`) keeps an
//! entry in the store's gateway directory: it joins at start, renews its lease every
//! `federation.heartbeat_ms` (the entry expires `federation.lease_ms` after the last renewal)
//! and leaves on orderly shutdown. A gateway that dies without leaving is dead to its peers once
//! its lease runs out, and readers ignore the nodes it published.
//!
//! It also publishes its live nodes (workloads, GPU classes, slots, location, verification) to
//! the node directory at a bounded rate: every `federation.node_directory_interval_ms`, and
//! sooner when a node registers, leaves or stops accepting, but never more often than a quarter
//! of that interval. Load figures in the directory are therefore up to one interval old.
//!
//! [`FleetView`] caches both directories (refreshed at the publish interval) for the code that
//! needs the rest of the federation without a store round trip per request: routing across
//! regions, `GET /v1/gateways`, the admin node listing.
//!
//! The timing rules are the sans-IO [`DirectorySchedule`]; [`run`] drives it with the store.
//! Store failures are logged and retried; they never stop the gateway serving.
//!
//! Leases compare wall-clock times written by different gateways, so their clocks must agree
//! to well within `lease_ms` (NTP is enough for the default 3 s).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nearpath_config::GatewayConfig;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::registry::{NodeEntry, NodeState, Registry, SlotKind};
use crate::store::directory::{live_remote_nodes, DirectorySource};
use crate::store::{DirEncoder, GatewayRecord, NodeDirEntry, Store, StoreError};

/// The id of a gateway without `federation.gateway_id`.
pub const STANDALONE_ID: &str = "standalone";

/// The verification state of a node no check has run on (`checker/`); what a directory entry
/// says when its gateway's checker is off.
pub const UNVERIFIED: &str = "unverified";

/// This gateway's id: `federation.gateway_id`, or [`STANDALONE_ID`].
pub fn gateway_id(cfg: &GatewayConfig) -> String {
    cfg.federation
        .gateway_id
        .clone()
        .unwrap_or_else(|| STANDALONE_ID.to_string())
}

/// The directory settings of `[federation]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectoryTiming {
    /// `federation.gateway_id` is set: joining refuses a live holder of the id with another
    /// certificate pin (a standalone gateway just takes its `standalone` entry).
    pub guard_id: bool,
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub publish_ms: u64,
}

impl DirectoryTiming {
    pub fn from_config(cfg: &GatewayConfig) -> DirectoryTiming {
        let f = &cfg.federation;
        DirectoryTiming {
            guard_id: f.gateway_id.is_some(),
            heartbeat_ms: f.heartbeat_ms,
            lease_ms: f.lease_ms,
            publish_ms: f.node_directory_interval_ms,
        }
    }
}

/// What this gateway writes about itself, fixed once its listeners are bound.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfInfo {
    pub id: String,
    pub region: String,
    pub lat: f64,
    pub lon: f64,
    pub quic_address: String,
    pub http_url: String,
    pub cert_sha256: String,
    pub version: String,
    pub started_at_ms: u64,
}

impl SelfInfo {
    /// From `[federation]` and the bound listeners: the public addresses when configured, else
    /// the bound QUIC address and `http://` + the bound HTTP address.
    pub fn new(
        cfg: &GatewayConfig,
        quic: SocketAddr,
        http: SocketAddr,
        cert_sha256: String,
        started_at_ms: u64,
    ) -> SelfInfo {
        let id = gateway_id(cfg);
        let cfg = &cfg.federation;
        SelfInfo {
            id,
            region: cfg.region.clone(),
            lat: cfg.lat,
            lon: cfg.lon,
            quic_address: cfg
                .public_quic_address
                .clone()
                .unwrap_or_else(|| quic.to_string()),
            http_url: cfg
                .public_http_url
                .clone()
                .map(|u| u.trim_end_matches('/').to_string())
                .unwrap_or_else(|| format!("http://{http}")),
            cert_sha256,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms,
        }
    }

    /// The directory entry renewed at `now_ms`, valid for `lease_ms`.
    pub fn record(&self, now_ms: u64, lease_ms: u64) -> GatewayRecord {
        GatewayRecord {
            id: self.id.clone(),
            region: self.region.clone(),
            lat: self.lat,
            lon: self.lon,
            quic_address: self.quic_address.clone(),
            http_url: self.http_url.clone(),
            cert_sha256: self.cert_sha256.clone(),
            version: self.version.clone(),
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(lease_ms),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The schedule (sans-IO).

/// What the directory task should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirAction {
    /// Renew this gateway's entry (expires `lease_ms` from now).
    Heartbeat,
    /// Replace this gateway's set of nodes in the node directory.
    Publish,
    /// Re-read both directories into the [`FleetView`].
    Refresh,
}

/// When to renew, publish and refresh: `handle_*(now, ..)` in, [`DirectorySchedule::poll`] out.
#[derive(Debug, Clone)]
pub struct DirectorySchedule {
    heartbeat_ms: u64,
    publish_ms: u64,
    /// The shortest gap between two publications (a quarter of the interval): node churn
    /// publishes at once, but a flapping node cannot turn that into a write per heartbeat.
    min_publish_gap_ms: u64,
    /// How soon a failed store call is tried again.
    retry_ms: u64,
    next_heartbeat_ms: u64,
    next_publish_ms: u64,
    next_refresh_ms: u64,
    last_publish_ms: Option<u64>,
    membership_changed: bool,
}

impl DirectorySchedule {
    /// Everything is due at `now_ms` (join, first publication, first refresh).
    pub fn new(now_ms: u64, heartbeat_ms: u64, publish_ms: u64) -> DirectorySchedule {
        let heartbeat_ms = heartbeat_ms.max(1);
        let publish_ms = publish_ms.max(1);
        DirectorySchedule {
            heartbeat_ms,
            publish_ms,
            min_publish_gap_ms: (publish_ms / 4).max(1),
            retry_ms: (heartbeat_ms.min(publish_ms) / 4).max(1),
            next_heartbeat_ms: now_ms,
            next_publish_ms: now_ms,
            next_refresh_ms: now_ms,
            last_publish_ms: None,
            membership_changed: false,
        }
    }

    /// From `[federation]`.
    pub fn from_timing(now_ms: u64, t: &DirectoryTiming) -> DirectorySchedule {
        Self::new(now_ms, t.heartbeat_ms, t.publish_ms)
    }

    /// The shortest gap between two publications, in milliseconds.
    pub fn min_publish_gap_ms(&self) -> u64 {
        self.min_publish_gap_ms
    }

    /// A renewal finished at `now_ms`; a failed one is retried soon (the lease may still hold).
    pub fn handle_heartbeat_done(&mut self, now_ms: u64, ok: bool) {
        self.next_heartbeat_ms = now_ms + if ok { self.heartbeat_ms } else { self.retry_ms };
    }

    /// A publication finished at `now_ms`.
    pub fn handle_publish_done(&mut self, now_ms: u64, ok: bool) {
        self.last_publish_ms = Some(now_ms);
        if ok {
            self.membership_changed = false;
            self.next_publish_ms = now_ms + self.publish_ms;
        } else {
            self.next_publish_ms = now_ms + self.retry_ms.max(self.min_publish_gap_ms);
        }
    }

    /// A refresh of the fleet view finished at `now_ms`.
    pub fn handle_refresh_done(&mut self, now_ms: u64, ok: bool) {
        self.next_refresh_ms = now_ms + if ok { self.publish_ms } else { self.retry_ms };
    }

    /// A node registered, left or changed whether it accepts sessions.
    pub fn handle_membership_changed(&mut self, _now_ms: u64) {
        self.membership_changed = true;
    }

    /// When the next publication is due.
    fn publish_due_ms(&self) -> u64 {
        match (self.membership_changed, self.last_publish_ms) {
            (true, Some(last)) => self.next_publish_ms.min(last + self.min_publish_gap_ms),
            // Never published yet: at once.
            (true, None) => 0,
            (false, _) => self.next_publish_ms,
        }
    }

    /// The next thing to do at `now_ms`, most urgent first: the lease, then the publication,
    /// then the refresh. Call again after handling it.
    pub fn poll(&self, now_ms: u64) -> Option<DirAction> {
        if now_ms >= self.next_heartbeat_ms {
            Some(DirAction::Heartbeat)
        } else if now_ms >= self.publish_due_ms() {
            Some(DirAction::Publish)
        } else if now_ms >= self.next_refresh_ms {
            Some(DirAction::Refresh)
        } else {
            None
        }
    }

    /// When [`DirectorySchedule::poll`] next has something to do.
    pub fn next_wake_ms(&self) -> u64 {
        self.next_heartbeat_ms
            .min(self.publish_due_ms())
            .min(self.next_refresh_ms)
    }
}

// ---------------------------------------------------------------------------------------------
// Liveness and the fleet view.

/// A directory entry as the admin API shows it, with its liveness at the time of asking.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GatewayStatus {
    #[serde(flatten)]
    pub record: GatewayRecord,
    pub live: bool,
    /// Until the lease ends; negative once it has.
    pub expires_in_ms: i64,
    /// Since the last renewal.
    pub heartbeat_age_ms: u64,
    /// Nodes it has in the node directory.
    pub nodes: usize,
}

fn signed_diff(a: u64, b: u64) -> i64 {
    let d = i128::from(a) - i128::from(b);
    d.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

impl GatewayStatus {
    pub fn of(record: GatewayRecord, now_ms: u64, nodes: usize) -> GatewayStatus {
        GatewayStatus {
            live: record.is_live(now_ms),
            expires_in_ms: signed_diff(record.expires_at_ms, now_ms),
            heartbeat_age_ms: now_ms.saturating_sub(record.heartbeat_at_ms),
            nodes,
            record,
        }
    }
}

/// Each gateway's status at `now_ms`, ordered by id, with its node count.
pub fn statuses(
    gateways: Vec<GatewayRecord>,
    nodes: &[NodeDirEntry],
    now_ms: u64,
) -> Vec<GatewayStatus> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for n in nodes {
        *counts.entry(n.gateway_id.as_str()).or_default() += 1;
    }
    let mut out: Vec<GatewayStatus> = gateways
        .into_iter()
        .map(|g| {
            let n = counts.get(g.id.as_str()).copied().unwrap_or(0);
            GatewayStatus::of(g, now_ms, n)
        })
        .collect();
    out.sort_by(|a, b| a.record.id.cmp(&b.record.id));
    out
}

/// The nodes of `nodes` held by a gateway other than `self_id` whose lease holds at `now_ms`
/// (the shared reading, [`live_remote_nodes`]: rows that fail the store's checks are left out).
pub fn remote_live_nodes(
    gateways: &[GatewayRecord],
    nodes: &[NodeDirEntry],
    self_id: &str,
    now_ms: u64,
) -> Vec<NodeDirEntry> {
    live_remote_nodes(gateways, nodes, self_id, now_ms)
        .map(|(n, _)| n.clone())
        .collect()
}

#[derive(Default)]
struct Snapshot {
    gateways: Vec<GatewayRecord>,
    nodes: Vec<NodeDirEntry>,
    refreshed_at_ms: Option<u64>,
}

/// The rest of the federation as this gateway last read it from the store (every
/// `federation.node_directory_interval_ms`), for code that must not wait on the store per
/// request. Held in [`crate::server::Shared::fleet`].
///
/// Readers judge liveness at the time they ask: a gateway whose lease ran out since the last
/// refresh is already dead to [`FleetView::remote_nodes`] and [`FleetView::live_gateways`].
pub struct FleetView {
    self_id: String,
    me: RwLock<Option<SelfInfo>>,
    snapshot: RwLock<Snapshot>,
}

impl FleetView {
    /// An empty view for the gateway `self_id` (filled by the directory task).
    pub fn new(self_id: String) -> FleetView {
        FleetView {
            self_id,
            me: RwLock::new(None),
            snapshot: RwLock::new(Snapshot::default()),
        }
    }

    /// This gateway's id in the federation (`standalone` without `federation.gateway_id`).
    pub fn self_id(&self) -> &str {
        &self.self_id
    }

    /// Nodes attached to other gateways whose lease holds at `now_ms`, ordered by node id:
    /// the candidates for cross-region routing (check `accepting` and the free slots; they
    /// are up to one publish interval old).
    pub fn remote_nodes(&self, now_ms: u64) -> Vec<NodeDirEntry> {
        let s = self.read();
        remote_live_nodes(&s.gateways, &s.nodes, &self.self_id, now_ms)
    }

    /// The directory entry of gateway `id` as last read, live or not (check
    /// [`GatewayRecord::is_live`]): its QUIC address, HTTP URL and certificate pin.
    pub fn gateway(&self, id: &str) -> Option<GatewayRecord> {
        self.read().gateways.iter().find(|g| g.id == id).cloned()
    }

    /// Gateways whose lease holds at `now_ms`, ordered by id. This gateway is always among
    /// them once it has started, even while the store cannot be read.
    pub fn live_gateways(&self, now_ms: u64) -> Vec<GatewayRecord> {
        let mut out: Vec<GatewayRecord> = self
            .read()
            .gateways
            .iter()
            .filter(|g| g.is_live(now_ms))
            .cloned()
            .collect();
        if !out.iter().any(|g| g.id == self.self_id) {
            let me = self.me.read().unwrap_or_else(|p| p.into_inner());
            if let Some(me) = me.as_ref() {
                // The lease is as good as the one it is renewing; shown live because it serves.
                out.push(me.record(now_ms, 1));
                out.sort_by(|a, b| a.id.cmp(&b.id));
            }
        }
        out
    }

    /// When the view was last refreshed from the store (`None`: never yet).
    pub fn refreshed_at_ms(&self) -> Option<u64> {
        self.read().refreshed_at_ms
    }

    /// Records what this gateway writes about itself (at start).
    pub fn set_self(&self, me: SelfInfo) {
        *self.me.write().unwrap_or_else(|p| p.into_inner()) = Some(me);
    }

    /// Replaces the view with what was just read from the store.
    pub fn apply(&self, gateways: Vec<GatewayRecord>, nodes: Vec<NodeDirEntry>, now_ms: u64) {
        let mut s = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        *s = Snapshot {
            gateways,
            nodes,
            refreshed_at_ms: Some(now_ms),
        };
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fleet view is the directory every other reader of this gateway reads (the trunk, game
/// redirects): the store is read once per `federation.node_directory_interval_ms`, by the
/// directory task, whatever the number of readers or of requests.
impl DirectorySource for FleetView {
    fn gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        Ok(self.read().gateways.clone())
    }

    fn node_directory(&self) -> Result<Vec<NodeDirEntry>, StoreError> {
        Ok(self.read().nodes.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// What this gateway publishes.

/// Whether a node takes new sessions: active, not slow, admission not withdrawn, not
/// quarantined by the checker. A node the checker bars from controlled classes is published
/// as not accepting either: peers check the geofence against the published classes only, and
/// refusing all of a peer's sessions is the safe side of not telling them why.
fn accepting(n: &NodeEntry) -> bool {
    let live = {
        let d = n.dynamic();
        d.state == NodeState::Active && !d.slow && n.revocation().is_none()
    };
    let check = n.check();
    live && check.quarantine.is_none() && check.controlled_block.is_none()
}

/// The node directory entry of a live local node.
pub fn dir_entry(n: &NodeEntry, gateway_id: &str, now_ms: u64) -> NodeDirEntry {
    let loc = n.location();
    let classes_now = n.classes_now();
    let classes: std::collections::BTreeSet<&str> =
        classes_now.iter().map(|c| c.0.as_str()).collect();
    let inference_slots = n.capacity.inference_concurrency;
    let game_slots = n.capacity.game_sessions;
    NodeDirEntry {
        node_id: n.id.clone(),
        operator_id: n.operator_id.clone(),
        gateway_id: gateway_id.to_string(),
        country: loc.country.map(|c| c.as_str().to_string()),
        lat: loc.coords.map(|c| c.lat),
        lon: loc.coords.map(|c| c.lon),
        gpu_classes: classes.into_iter().map(str::to_string).collect(),
        models: n.workloads.models.clone(),
        games: n.workloads.games.clone(),
        inference_slots,
        inference_free: inference_slots.saturating_sub(n.in_use(SlotKind::Inference)),
        game_slots,
        game_free: game_slots.saturating_sub(n.in_use(SlotKind::Game)),
        accepting: accepting(n),
        verification: n.check().state.to_string(),
        updated_at_ms: now_ms,
        encoders: dir_encoders(&n.encoders),
        // Registration keeps at most one set per model; each is the wire's bits.
        model_caps: n
            .workloads
            .model_caps
            .iter()
            .take(n.workloads.models.len())
            .map(|c| c.bits())
            .collect(),
        // Published so that other gateways judge the node by subdivision rules as this one does.
        subdivision: crate::store::directory::publishable_subdivision(&loc),
    }
}

/// A node's encoders as the directory holds them. The registry keeps one encoder per codec, of
/// the codecs this build knows, with names within the wire's bounds; a control character in an
/// implementation name (the wire allows it; the directory does not) becomes `?`, since the
/// name is only shown and the codec must stay. Anything the directory would still refuse is
/// left out rather than stopping the gateway's whole publication.
fn dir_encoders(list: &[nearpath_protocol::message::NodeEncoder]) -> Vec<DirEncoder> {
    list.iter()
        .map(|e| DirEncoder {
            codec: e.codec.as_str().to_string(),
            implementation: e
                .implementation
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        })
        .filter(crate::store::directory::encoder_ok)
        .take(nearpath_protocol::message::MAX_ENCODERS)
        .collect()
}

/// The live (not gone) nodes of the registry as directory entries.
pub fn local_entries(registry: &Registry, gateway_id: &str, now_ms: u64) -> Vec<NodeDirEntry> {
    registry
        .list()
        .iter()
        .filter(|n| n.dynamic().state != NodeState::Gone)
        .map(|n| dir_entry(n, gateway_id, now_ms))
        .collect()
}

/// Which nodes are live and whether each accepts: a change publishes early.
fn membership(registry: &Registry) -> Vec<(String, bool)> {
    registry
        .list()
        .iter()
        .filter(|n| n.dynamic().state != NodeState::Gone)
        .map(|n| (n.id.clone(), accepting(n)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The task.

/// What the directory task works with.
pub struct DirectoryParts {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub fleet: Arc<FleetView>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    pub timing: DirectoryTiming,
    pub me: SelfInfo,
}

/// Why this gateway may not join the federation.
#[derive(Debug, thiserror::Error)]
#[error(
    "federation.gateway_id {id:?} is held by another live gateway (certificate {holder_cert_sha256}, QUIC {holder_quic_address}, lease for {expires_in_ms} ms more); give this gateway another id or stop the other one"
)]
pub struct DuplicateGatewayId {
    pub id: String,
    pub holder_cert_sha256: String,
    pub holder_quic_address: String,
    pub expires_in_ms: i64,
}

/// Puts this gateway in the directory, synchronously, before it serves. With
/// `federation.gateway_id` set, refuses when another live gateway holds the id with a different
/// certificate pin; a standalone gateway simply takes its entry. A store failure is logged and
/// left to the task's retries (it never stops the gateway from serving).
pub fn join(
    store: &dyn Store,
    timing: &DirectoryTiming,
    me: &SelfInfo,
    now_ms: u64,
) -> Result<(), DuplicateGatewayId> {
    let record = me.record(now_ms, timing.lease_ms);
    let outcome = if timing.guard_id {
        store.gateway_join(&record, now_ms)
    } else {
        store.gateway_heartbeat(&record).map(|()| None)
    };
    match outcome {
        Ok(None) => {
            info!(gateway = %me.id, region = %me.region, quic = %me.quic_address, http = %me.http_url, "joined the gateway directory");
            Ok(())
        }
        Ok(Some(holder)) => Err(DuplicateGatewayId {
            id: holder.id.clone(),
            expires_in_ms: signed_diff(holder.expires_at_ms, now_ms),
            holder_cert_sha256: holder.cert_sha256,
            holder_quic_address: holder.quic_address,
        }),
        Err(StoreError::NotSupported { .. }) => Ok(()),
        Err(e) => {
            warn!(gateway = %me.id, error = %e, "could not join the gateway directory; retrying in the background");
            Ok(())
        }
    }
}

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Unavailable {
                message: format!("directory task: {e}"),
            })
        })
}

/// Renews the lease, publishes the nodes and refreshes the fleet view until `shutdown`, then
/// leaves the directory (its entry and its nodes go at once rather than when the lease ends).
pub async fn run(parts: DirectoryParts, shutdown: CancellationToken) {
    let DirectoryParts {
        store,
        registry,
        fleet,
        metrics,
        clock,
        timing,
        me,
    } = parts;
    let id = me.id.clone();
    let mut schedule = DirectorySchedule::from_timing(clock.unix_ms(), &timing);
    let poll_ms = schedule.min_publish_gap_ms();
    let mut members = membership(&registry);
    // Failures are logged when they start and when they end, not on every retry.
    let mut failing: BTreeMap<&'static str, bool> = BTreeMap::new();
    let mut note = |what: &'static str, r: &Result<(), StoreError>| {
        let was = failing.insert(what, r.is_err()).unwrap_or(false);
        match r {
            Err(e) if !was => {
                warn!(gateway = %id, op = what, error = %e, "gateway directory: store call failed; retrying")
            }
            Err(e) => {
                debug!(gateway = %id, op = what, error = %e, "gateway directory: still failing")
            }
            Ok(()) if was => {
                info!(gateway = %id, op = what, "gateway directory: store reachable again")
            }
            Ok(()) => {}
        }
    };
    loop {
        let now = clock.unix_ms();
        let current = membership(&registry);
        if current != members {
            members = current;
            schedule.handle_membership_changed(now);
        }
        while let Some(action) = schedule.poll(clock.unix_ms()) {
            let now = clock.unix_ms();
            match action {
                DirAction::Heartbeat => {
                    let record = me.record(now, timing.lease_ms);
                    let joined = timing.guard_id;
                    let r = blocking(&store, move |s| {
                        if joined {
                            s.gateway_join(&record, now)
                        } else {
                            s.gateway_heartbeat(&record).map(|()| None)
                        }
                    })
                    .await;
                    let r = match r {
                        Ok(Some(holder)) => {
                            // Our lease lapsed (a long store outage) and another gateway took
                            // the id: keep serving, but say so loudly until it is resolved.
                            error!(gateway = %me.id, holder_cert = %holder.cert_sha256, holder_quic = %holder.quic_address, "another gateway holds this gateway id; not renewing");
                            Ok(())
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    };
                    if matches!(r, Err(StoreError::NotSupported { .. })) {
                        info!("the store has no gateway directory; this gateway stays out of it");
                        return;
                    }
                    note("heartbeat", &r);
                    schedule.handle_heartbeat_done(clock.unix_ms(), r.is_ok());
                }
                DirAction::Publish => {
                    let nodes = local_entries(&registry, &me.id, now);
                    let gid = me.id.clone();
                    let r = blocking(&store, move |s| s.publish_nodes(&gid, &nodes)).await;
                    note("publish_nodes", &r);
                    schedule.handle_publish_done(clock.unix_ms(), r.is_ok());
                }
                DirAction::Refresh => {
                    let r = blocking(&store, |s| {
                        Ok((s.list_gateways()?, s.list_node_directory()?))
                    })
                    .await;
                    let at = clock.unix_ms();
                    let r = r.map(|(gateways, nodes)| {
                        let live = gateways.iter().filter(|g| g.is_live(at)).count();
                        metrics.federation_gateways_live.set(live as i64);
                        fleet.apply(gateways, nodes, at);
                    });
                    note("refresh", &r);
                    schedule.handle_refresh_done(at, r.is_ok());
                }
            }
        }
        let now = clock.unix_ms();
        let wait = schedule
            .next_wake_ms()
            .saturating_sub(now)
            .min(poll_ms)
            .max(1);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
    let gid = me.id.clone();
    match blocking(&store, move |s| s.gateway_leave(&gid)).await {
        Ok(()) => info!(gateway = %me.id, "left the gateway directory"),
        Err(e) => {
            warn!(gateway = %me.id, error = %e, "could not leave the gateway directory; the entry expires with its lease")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: u64 = 1_000;
    const LEASE: u64 = 3_000;
    const PUBLISH: u64 = 1_000;

    fn me() -> SelfInfo {
        SelfInfo {
            id: "eu-1".into(),
            region: "eu-central".into(),
            lat: 50.1,
            lon: 8.7,
            quic_address: "127.0.0.1:4433".into(),
            http_url: "http://127.0.0.1:8080".into(),
            cert_sha256: "a".repeat(64),
            version: "0.1.0".into(),
            started_at_ms: 0,
        }
    }

    /// Drives the schedule on a virtual clock from `from` to `to` in 1 ms steps, doing what it
    /// asks against an in-memory directory (a map of records), every call succeeding when `ok`.
    fn drive(
        s: &mut DirectorySchedule,
        dir: &mut BTreeMap<String, GatewayRecord>,
        from: u64,
        to: u64,
        ok: bool,
    ) -> Vec<(u64, DirAction)> {
        let mut log = Vec::new();
        for now in from..to {
            while let Some(a) = s.poll(now) {
                log.push((now, a));
                match a {
                    DirAction::Heartbeat => {
                        if ok {
                            let r = me().record(now, LEASE);
                            dir.insert(r.id.clone(), r);
                        }
                        s.handle_heartbeat_done(now, ok)
                    }
                    DirAction::Publish => s.handle_publish_done(now, ok),
                    DirAction::Refresh => s.handle_refresh_done(now, ok),
                }
            }
        }
        log
    }

    fn count(log: &[(u64, DirAction)], a: DirAction) -> usize {
        log.iter().filter(|(_, x)| *x == a).count()
    }

    #[test]
    fn everything_is_due_at_start_then_each_at_its_interval() {
        let mut s = DirectorySchedule::new(0, HB, PUBLISH);
        let mut dir = BTreeMap::new();
        let log = drive(&mut s, &mut dir, 0, 10_000, true);
        assert_eq!(
            &log[..3],
            &[
                (0, DirAction::Heartbeat),
                (0, DirAction::Publish),
                (0, DirAction::Refresh)
            ]
        );
        assert_eq!(count(&log, DirAction::Heartbeat), 10, "0, 1000, .. 9000");
        assert_eq!(count(&log, DirAction::Publish), 10);
        assert_eq!(count(&log, DirAction::Refresh), 10);
    }

    #[test]
    fn a_gateway_that_stops_heartbeating_is_dead_after_lease_ms() {
        let mut s = DirectorySchedule::new(0, HB, PUBLISH);
        let mut dir = BTreeMap::new();
        drive(&mut s, &mut dir, 0, 5_500, true);
        // The last renewal was at 5000; then the gateway stops (killed, or cut off).
        let last = dir["eu-1"].heartbeat_at_ms;
        assert_eq!(last, 5_000);
        let at = |now| GatewayStatus::of(dir["eu-1"].clone(), now, 0);
        assert!(at(last + LEASE - 1).live, "live until the lease ends");
        assert_eq!(at(last + LEASE - 1).expires_in_ms, 1);
        let dead = at(last + LEASE);
        assert!(!dead.live, "dead from lease_ms after the last renewal");
        assert_eq!(dead.heartbeat_age_ms, LEASE);
        assert_eq!(at(last + LEASE + 500).expires_in_ms, -500);
        // While it renews, it never is dead between renewals (lease_ms > heartbeat_ms).
        let mut s = DirectorySchedule::new(0, HB, PUBLISH);
        let mut dir = BTreeMap::new();
        for now in 0..20_000 {
            drive(&mut s, &mut dir, now, now + 1, true);
            assert!(dir["eu-1"].is_live(now), "at {now}");
        }
    }

    #[test]
    fn a_failing_store_is_retried_soon_and_never_stops_the_schedule() {
        let mut s = DirectorySchedule::new(0, HB, PUBLISH);
        let mut dir = BTreeMap::new();
        let log = drive(&mut s, &mut dir, 0, 1_000, false);
        // Retries every heartbeat_ms / 4 rather than waiting a whole interval.
        assert_eq!(count(&log, DirAction::Heartbeat), 4);
        assert!(dir.is_empty());
        // The store comes back: the next retry renews.
        let log = drive(&mut s, &mut dir, 1_000, 1_300, true);
        assert_eq!(log.first(), Some(&(1_000, DirAction::Heartbeat)));
        assert!(dir["eu-1"].is_live(1_300));
    }

    #[test]
    fn node_churn_publishes_at_once_but_at_most_once_per_quarter_interval() {
        let mut s = DirectorySchedule::new(0, HB, PUBLISH);
        let mut dir = BTreeMap::new();
        drive(&mut s, &mut dir, 0, 100, true); // published at 0
        s.handle_membership_changed(100);
        assert_eq!(
            s.poll(249),
            None,
            "within a quarter interval of the last publication"
        );
        assert_eq!(s.poll(250), Some(DirAction::Publish));
        s.handle_publish_done(250, true);
        // A node flapping every millisecond still costs one publication per 250 ms.
        let mut publishes = 0;
        for now in 251..2_251 {
            s.handle_membership_changed(now);
            while let Some(a) = s.poll(now) {
                match a {
                    DirAction::Publish => {
                        publishes += 1;
                        s.handle_publish_done(now, true)
                    }
                    DirAction::Heartbeat => s.handle_heartbeat_done(now, true),
                    DirAction::Refresh => s.handle_refresh_done(now, true),
                }
            }
        }
        assert_eq!(publishes, 8, "2000 ms of churn / 250 ms");
        // Without churn, only the interval.
        let next = s.next_wake_ms();
        assert!(next <= 2_251 + PUBLISH);
    }

    fn entry(node: &str, gateway: &str) -> NodeDirEntry {
        NodeDirEntry {
            node_id: node.into(),
            operator_id: "op".into(),
            gateway_id: gateway.into(),
            country: None,
            lat: None,
            lon: None,
            gpu_classes: vec![],
            models: vec!["m".into()],
            games: vec![],
            inference_slots: 1,
            inference_free: 1,
            game_slots: 0,
            game_free: 0,
            accepting: true,
            verification: UNVERIFIED.into(),
            updated_at_ms: 0,
            encoders: Vec::new(),
            model_caps: Vec::new(),
            subdivision: None,
        }
    }

    fn record(id: &str, expires_at_ms: u64) -> GatewayRecord {
        GatewayRecord {
            id: id.into(),
            expires_at_ms,
            heartbeat_at_ms: expires_at_ms.saturating_sub(LEASE),
            ..me().record(0, 0)
        }
    }

    #[test]
    fn remote_nodes_are_those_of_other_live_gateways() {
        let fleet = FleetView::new("eu-1".into());
        fleet.apply(
            vec![
                record("eu-1", 10_000),
                record("us-1", 10_000),
                record("ap-1", 5_000),
            ],
            vec![
                entry("a", "eu-1"),
                entry("b", "us-1"),
                entry("c", "ap-1"),
                entry("d", "gone-1"),
            ],
            4_000,
        );
        let ids = |v: Vec<NodeDirEntry>| v.into_iter().map(|n| n.node_id).collect::<Vec<_>>();
        assert_eq!(
            ids(fleet.remote_nodes(4_000)),
            ["b", "c"],
            "not our own, not an unknown gateway's"
        );
        assert_eq!(
            ids(fleet.remote_nodes(5_000)),
            ["b"],
            "ap-1's lease ended at 5000"
        );
        assert_eq!(fleet.gateway("ap-1").map(|g| g.expires_at_ms), Some(5_000));
        assert_eq!(fleet.gateway("nope"), None);
        let live: Vec<String> = fleet
            .live_gateways(5_000)
            .into_iter()
            .map(|g| g.id)
            .collect();
        assert_eq!(live, ["eu-1", "us-1"]);
    }

    #[test]
    fn the_fleet_view_is_the_directory_source_other_readers_share() {
        let fleet = Arc::new(FleetView::new("eu-1".into()));
        let source: Arc<dyn DirectorySource> = fleet.clone();
        assert!(source.gateways().unwrap().is_empty(), "nothing read yet");
        let mut bogus = entry("bogus", "us-1");
        bogus.inference_free = 9;
        fleet.apply(
            vec![record("eu-1", 10_000), record("us-1", 10_000)],
            vec![entry("a", "eu-1"), entry("b", "us-1"), bogus],
            4_000,
        );
        // Readers get what the directory task last read, as read (each applies the shared
        // reading itself, which leaves out our own node and the malformed row).
        assert_eq!(source.gateways().unwrap().len(), 2);
        assert_eq!(source.node_directory().unwrap().len(), 3);
        let ids: Vec<String> = fleet
            .remote_nodes(4_000)
            .into_iter()
            .map(|n| n.node_id)
            .collect();
        assert_eq!(ids, ["b"]);
    }

    #[test]
    fn a_nodes_odd_encoder_names_are_published_safely_and_keep_their_codec() {
        use nearpath_protocol::message::{NodeEncoder, VideoCodec, MAX_ENCODER_NAME_BYTES};
        let enc = |codec, implementation: &str| NodeEncoder {
            codec,
            implementation: implementation.into(),
        };
        let out = dir_encoders(&[
            enc(VideoCodec::Av1, "av1\u{1b}[31m\u{85}"),
            enc(VideoCodec::Hevc, ""),
            enc(VideoCodec::H264, &"x".repeat(MAX_ENCODER_NAME_BYTES + 1)),
        ]);
        let shown: Vec<(&str, &str)> = out
            .iter()
            .map(|e| (e.codec.as_str(), e.implementation.as_str()))
            .collect();
        // The over-long name cannot come from the wire; were it to, it is left out.
        assert_eq!(shown, [("av1", "av1?[31m?"), ("hevc", "")]);
        crate::store::directory::check_encoders(&out).expect("what is published passes");
    }

    /// Regression (issue 13): the directory published a node's country and coordinates but not
    /// its subdivision, so other gateways judged it as if it had none.
    #[test]
    fn a_local_nodes_subdivision_is_published_and_read_back_as_its_location() {
        use crate::registry::NodeDynamic;
        use crate::store::{SqliteStore, Store};
        use nearpath_geo::{Location, Subdivision};
        use nearpath_protocol::message::{Capacity, Workloads};
        let sub = Subdivision::parse("UA-43").unwrap();
        let location = Location {
            subdivision: Some(sub),
            ..Location::from_country(sub.country())
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let node = NodeEntry::new(
            "n1".into(),
            "op".into(),
            "127.0.0.1:1".parse().unwrap(),
            location,
            vec![],
            vec![],
            Workloads {
                games: vec!["arena".into()],
                models: vec![],
                model_caps: vec![],
            },
            Capacity {
                game_sessions: 1,
                inference_concurrency: 0,
            },
            "1.0.0".into(),
            0,
            crate::node_link::NodeLink::detached("127.0.0.1:1".parse().unwrap()),
            tx,
            NodeDynamic::admitted(0, 0.0, 0),
        );
        let entry = dir_entry(&node, "eu-1", 10);
        assert_eq!(entry.country.as_deref(), Some("UA"));
        assert_eq!(entry.subdivision.as_deref(), Some("UA-43"));
        let store = SqliteStore::open_in_memory().unwrap();
        store.publish_nodes("eu-1", &[entry]).unwrap();
        let read = store.list_node_directory().unwrap();
        let remote = crate::store::directory::remote_location(&read[0]);
        assert_eq!(remote.country, location.country);
        assert_eq!(remote.subdivision, Some(sub));
        assert_eq!(remote.coords, location.coords);
    }

    #[test]
    fn this_gateway_is_listed_even_before_the_first_refresh() {
        let fleet = FleetView::new("eu-1".into());
        assert!(fleet.live_gateways(0).is_empty(), "not started");
        fleet.set_self(me());
        let live = fleet.live_gateways(7);
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, "eu-1");
        assert!(live[0].is_live(7));
    }

    #[test]
    fn statuses_count_nodes_and_sort_by_id() {
        let st = statuses(
            vec![record("us-1", 10_000), record("eu-1", 1_000)],
            &[entry("a", "eu-1"), entry("b", "eu-1"), entry("c", "us-1")],
            2_000,
        );
        assert_eq!(st[0].record.id, "eu-1");
        assert_eq!(
            (st[0].live, st[0].nodes, st[0].expires_in_ms),
            (false, 2, -1_000)
        );
        assert_eq!((st[1].live, st[1].nodes), (true, 1));
    }

    #[test]
    fn the_self_record_uses_public_addresses_when_configured() {
        let mut cfg = GatewayConfig::default();
        let quic: SocketAddr = "10.0.0.1:4433".parse().unwrap();
        let http: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let s = SelfInfo::new(&cfg, quic, http, "b".repeat(64), 5);
        assert_eq!(
            (s.id.as_str(), s.quic_address.as_str(), s.http_url.as_str()),
            ("standalone", "10.0.0.1:4433", "http://10.0.0.1:8080")
        );
        cfg.federation.gateway_id = Some("eu-1".into());
        cfg.federation.public_quic_address = Some("gw-eu.example.com:443".into());
        cfg.federation.public_http_url = Some("https://gw-eu.example.com/".into());
        let s = SelfInfo::new(&cfg, quic, http, "b".repeat(64), 5);
        assert_eq!(
            (s.id.as_str(), s.quic_address.as_str(), s.http_url.as_str()),
            ("eu-1", "gw-eu.example.com:443", "https://gw-eu.example.com")
        );
        let r = s.record(100, 3_000);
        assert_eq!(
            (r.heartbeat_at_ms, r.expires_at_ms, r.started_at_ms),
            (100, 3_100, 5)
        );
        crate::store::directory::check_gateway_record(&r)
            .expect("what a gateway writes passes the store's checks");
    }
}
