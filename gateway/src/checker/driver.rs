//! The checker's driver: feeds the sans-IO [`Checker`] from the live gateway (nodes joining and
//! leaving, their inventories, their RTT, what real sessions delivered, the probes it runs) and
//! applies its verdicts (the registry's [`NodeCheck`], the geofence on a reclassified node,
//! durable check records, SLA events, metrics).
//!
//! Probe sessions are ordinary sessions on the wire (an inference `Open` with a chat request
//! streamed back as tokens or, for a node that serves only games, a game `Open` whose frames
//! are relayed like a player's), started at random times the core draws; the gateway runs them
//! itself, so no API key is charged and no usage is recorded: they never reach the meter.

use super::geoproof::{Proximity, RttConstraint};
use super::physics::{is_impossible, Tolerance};
use super::schedule::{Action, Checker, CheckerParams, NodeFacts, ProbeId, Sample};
use super::verdict::{GatewayVote, Verification, VerificationState};
use crate::clock::SharedClock;
use crate::components::{Placement, Sessions};
use crate::metrics::{labels, Metrics};
use crate::registry::{CheckEvent, NodeCheck, NodeEntry, Registry, Revocation, SlotKind};
use crate::store::Store;
use nearpath_config::{CheckerConfig, GatewayConfig};
use nearpath_geo::Coords;
use nearpath_protocol::message::{Message, Open, SessionKind};
use nearpath_protocol::openai::Endpoint;
use nearpath_protocol::stream::{send, FramedRecv};
use nearpath_protocol::MAX_REQUEST_FRAME;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

/// How many events may wait for the driver before new ones are dropped.
const EVENT_QUEUE: usize = 4096;
/// How often the driver looks at every node (idle or busy, RTT, lost events).
const SWEEP: Duration = Duration::from_secs(1);

/// What the driver is built from.
pub struct CheckerParts {
    pub config: CheckerConfig,
    /// Where this gateway is (see [`GatewayConfig::checker_position`]).
    pub position: Option<(f64, f64)>,
    /// This gateway's id in check records and RTT constraints (`federation.gateway_id`, or
    /// `standalone`).
    pub gateway_id: String,
    /// In a federation: other gateways' votes and RTT constraints are read from the store.
    pub federated: bool,
    /// How often gateways publish their nodes to the node directory, in ms
    /// (`federation.node_directory_interval_ms`): how stale its view of other gateways is.
    pub directory_interval_ms: u64,
    pub registry: Arc<Registry>,
    pub placement: Arc<Placement>,
    pub sessions: Arc<Sessions>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    /// What a game probe asks for: `game.default_width`, `default_height`, `default_fps` and
    /// `default_bitrate_kbps`, the size a player who asks for nothing gets.
    pub game_probe_size: (u32, u32, u32, u32),
    /// How long a node connection of this gateway must have been silent (no registration or
    /// heartbeat) before a node of the same operator reporting its GPUs takes them over, in
    /// ms: two heartbeat intervals, the rule by which a restarted node takes over its own id
    /// (`control::admission::id_takeover_after_ms`, `registry::holds_id`).
    pub gpu_takeover_after_ms: u64,
}

impl CheckerParts {
    /// The parts from a gateway's configuration and components.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &GatewayConfig,
        registry: Arc<Registry>,
        placement: Arc<Placement>,
        sessions: Arc<Sessions>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
    ) -> CheckerParts {
        CheckerParts {
            config: config.checker.clone(),
            position: config.checker_position(),
            gateway_id: crate::federation::directory::gateway_id(config),
            federated: config.federation.gateway_id.is_some(),
            directory_interval_ms: config.federation.node_directory_interval_ms,
            registry,
            placement,
            sessions,
            store,
            metrics,
            clock,
            game_probe_size: (
                config.game.default_width,
                config.game.default_height,
                config.game.default_fps,
                config.game.default_bitrate_kbps,
            ),
            gpu_takeover_after_ms: config.nodes.heartbeat_ms.saturating_mul(2),
        }
    }
}

/// Starts the checker (when `[checker] enabled`): the registry sends it events from now on.
pub fn start(
    parts: CheckerParts,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if !parts.config.enabled {
        info!("checker: off ([checker] enabled = false): nodes stay unverified");
        return None;
    }
    if parts.position.is_none() {
        info!(
            "checker: this gateway has no position (checker.lat_deg/lon_deg or a federation \
             position): node locations are not checked, and controlled-class nodes are not \
             required to prove proximity"
        );
    }
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    parts.registry.set_check_events(tx);
    let seed = parts.config.seed.unwrap_or_else(rand::random);
    let mut params = params_of(&parts.config);
    params.gateway_id = parts.gateway_id.clone();
    let core = Checker::new(params, seed);
    let driver = Driver {
        parts,
        core,
        nodes: HashMap::new(),
        probes: JoinSet::new(),
        probe_nodes: HashMap::new(),
        sweeps: 0,
        identity_swept_ms: 0,
    };
    Some(tokio::spawn(
        driver
            .run(rx, shutdown)
            .instrument(tracing::info_span!("checker")),
    ))
}

fn params_of(c: &CheckerConfig) -> CheckerParams {
    CheckerParams {
        registration_delay_max_ms: c.registration_probe_delay_max_ms,
        idle_interval_mean_ms: c.standby_probe_interval_mean_ms,
        probe_timeout_ms: c.probe_timeout_ms,
        demote_after: c.demote_after_probes,
        vote_max_age_ms: c.vote_max_age_ms,
        tolerance: Tolerance {
            decode_over: c.decode_tolerance,
            encode_over: c.encode_tolerance,
            far_below_ratio: c.far_below_ratio,
        },
        slack_km: c.location_slack_km,
        gateway_id: String::new(),
    }
}

/// A node the driver follows.
struct Tracked {
    entry: Arc<NodeEntry>,
    /// Registered with the core (after its inventory, or after waiting for one).
    announced: bool,
    joined_ms: u64,
    idle: Option<bool>,
    /// The smallest RTT seen on the node's connection, in ms (queueing only adds delay).
    min_rtt_ms: f64,
    /// The RTT last given to the core.
    told_rtt_ms: f64,
    /// What the store remembered of the node's last verdict, until a new one.
    prior: Option<(String, String)>,
    /// RTT constraints other gateways of the federation measured on this node (it was
    /// attached to them before), given to the core with the node's facts.
    foreign: Vec<RttConstraint>,
    /// GPU UUIDs already reported to the core as held by another node.
    dups: std::collections::HashSet<String>,
    /// The impossible claim of this connection is on the operator's SLA record already.
    impossible_recorded: bool,
    /// The node's hardware encode counters as read at the last sweeps (ms, frames, pixels),
    /// oldest first, spanning at least `checker.encode_window_ms`.
    encode_marks: std::collections::VecDeque<(u64, u64, u64)>,
    /// The node's GPUs moved to another node of its operator while its connection was
    /// silent: it is being disconnected, and no longer checked.
    gpus_moved: bool,
}

/// The revocation code of a silent node whose GPUs registered again under another id.
const GPU_MOVED: &str = "gpu_moved";

struct Driver {
    parts: CheckerParts,
    core: Checker,
    nodes: HashMap<String, Tracked>,
    probes: JoinSet<(ProbeId, Result<Sample, String>)>,
    probe_nodes: HashMap<ProbeId, String>,
    sweeps: u64,
    /// When the GPU identities were last renewed (ms on the clock; 0 before the first time).
    identity_swept_ms: u64,
}

/// Every this many sweeps (an hour) old records are pruned.
const PRUNE_SWEEPS: u64 = 3_600;
/// Check records are kept at least this long, in ms (30 days).
const CHECK_RETENTION_MS: u64 = 30 * 86_400_000;
/// GPU identities not renewed for this long are dropped, in ms (7 days).
const GPU_RETENTION_MS: u64 = 7 * 86_400_000;
/// A GPU identity another gateway recorded or renewed less than this long ago (in ms) is never
/// taken as moved: its node may be live there and not in the node directory yet.
const MOVE_MIN_AGE_MS: u64 = 5_000;

impl Driver {
    /// How long a GPU identity counts as live after it was last renewed, in ms: three renewals
    /// (`checker.identity_sweep_interval_ms`, which the gateways of a federation share).
    fn identity_live_ms(&self) -> u64 {
        self.parts
            .config
            .identity_sweep_interval_ms
            .saturating_mul(3)
    }

    /// How old a released GPU identity looks, in ms: past the live window, with as much again
    /// to spare for clocks of other gateways running behind this one's.
    fn released_age_ms(&self) -> u64 {
        self.identity_live_ms().saturating_mul(2)
    }

    async fn run(mut self, mut events: mpsc::Receiver<CheckEvent>, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = self.parts.clock.unix_ms();
            while let Some(action) = self.core.poll(now) {
                self.apply(now, action).await;
            }
            let wait = self
                .core
                .poll_timeout()
                .map(|t| t.saturating_sub(now))
                .unwrap_or(60_000)
                .min(60_000);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => break,
                },
                Some(done) = self.probes.join_next(), if !self.probes.is_empty() => {
                    if let Ok((id, result)) = done {
                        self.on_probe_done(id, result);
                    }
                }
                _ = sweep.tick() => self.sweep().await,
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
        self.probes.abort_all();
    }

    async fn on_event(&mut self, ev: CheckEvent) {
        let now = self.parts.clock.unix_ms();
        match ev {
            CheckEvent::Joined(entry) => self.on_joined(now, entry).await,
            CheckEvent::Left(entry) => {
                // A replaced entry's departure must not forget its successor.
                let same = self
                    .nodes
                    .get(&entry.id)
                    .is_some_and(|t| Arc::ptr_eq(&t.entry, &entry));
                if same {
                    self.nodes.remove(&entry.id);
                    self.core.handle_left(now, &entry.id);
                    self.release_identity(now, &entry.id).await;
                }
            }
            CheckEvent::Inventory(entry) => {
                let known = self
                    .nodes
                    .get(&entry.id)
                    .is_some_and(|t| Arc::ptr_eq(&t.entry, &entry));
                if !known {
                    self.on_joined(now, entry.clone()).await;
                }
                self.announce(now, &entry, true).await;
            }
            CheckEvent::Decode {
                node,
                model,
                tokens_per_s,
                ttft_ms,
            } => {
                if self.nodes.contains_key(&node.id) {
                    self.core.handle_sample(
                        now,
                        &node.id,
                        Sample::Decode {
                            model,
                            tokens_per_s,
                            ttft_ms,
                            from_probe: false,
                        },
                    );
                }
            }
        }
    }

    async fn on_joined(&mut self, now: u64, entry: Arc<NodeEntry>) {
        let id = entry.id.clone();
        let store = self.parts.store.clone();
        let key = id.clone();
        let prior = tokio::task::spawn_blocking(move || store.load_verification(&key))
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| warn!(error = %e, "checker: could not read the node's last verdict"))
                    .ok()
            })
            .flatten()
            .map(|snap| (snap.state, snap.reasons_json));
        // Not verified yet: ranked behind verified nodes. A node whose last verdict was against
        // it also serves no controlled class until its registration check says otherwise (a
        // reconnect must not launder a verdict).
        let mut check = entry.check();
        check.penalty_ms = self.parts.config.unverified_penalty_ms;
        let policy = &self.parts.placement.policy;
        let controlled = entry
            .classes_now()
            .iter()
            .any(|(_, c)| policy.is_controlled(*c));
        let gate = match prior.as_ref() {
            Some((state, reasons)) if state == "quarantined" || state == "impossible_claim" => {
                ControlledGate::barred(
                    format!("its last verdict was {state} ({reasons}); re-checking"),
                    controlled,
                )
            }
            _ => ControlledGate::pending(controlled, self.proximity_rule()),
        };
        check.controlled_block = gate.blocked_by.clone().filter(|_| controlled);
        gate.show_in(&mut check.view);
        self.parts.registry.set_check(&entry, check);
        let foreign = if self.parts.federated {
            self.foreign_constraints(now, &entry.id).await
        } else {
            Vec::new()
        };
        let rtt = rtt_ms(&entry);
        self.nodes.insert(
            id,
            Tracked {
                entry,
                announced: false,
                joined_ms: now,
                idle: None,
                min_rtt_ms: rtt,
                told_rtt_ms: f64::NAN,
                prior,
                foreign,
                dups: Default::default(),
                impossible_recorded: false,
                encode_marks: Default::default(),
                gpus_moved: false,
            },
        );
    }

    /// Registers a node with the core, with its inventory when it has one.
    async fn announce(&mut self, now: u64, entry: &Arc<NodeEntry>, with_inventory: bool) {
        let Some(t) = self.nodes.get(&entry.id) else {
            return;
        };
        if t.announced && !with_inventory {
            return;
        }
        let inventory = if with_inventory {
            entry.inventory.get().map(|n| n.inventory.clone())
        } else {
            None
        };
        let mut facts = self.facts_of(entry, inventory.as_ref());
        let mut duplicates = Vec::new();
        if let Some(inv) = &inventory {
            let (changed, dups) = self.identity(now, entry, inv).await;
            facts.gpu_set_changed = changed;
            duplicates = dups;
        }
        // Silent nodes whose GPUs this node took over leave the core before it hears of this
        // one, so that their GPUs are not counted twice while their connections close.
        let moved: Vec<String> = self
            .nodes
            .iter()
            .filter(|(id, t)| {
                *id != &entry.id
                    && !t.gpus_moved
                    && t.entry.revocation().is_some_and(|r| r.code == GPU_MOVED)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in moved {
            if let Some(t) = self.nodes.get_mut(&id) {
                t.gpus_moved = true;
            }
            self.core.handle_left(now, &id);
        }
        self.core.handle_registered(now, &entry.id, facts);
        let foreign = self
            .nodes
            .get(&entry.id)
            .map(|t| t.foreign.clone())
            .unwrap_or_default();
        for c in foreign {
            self.core.handle_rtt(now, &entry.id, c);
        }
        for uuid in duplicates {
            if let Some(t) = self.nodes.get_mut(&entry.id) {
                t.dups.insert(uuid.to_ascii_lowercase());
            }
            self.core.handle_duplicate_uuid(now, &entry.id, &uuid);
        }
        if let Some(t) = self.nodes.get_mut(&entry.id) {
            t.announced = true;
        }
        self.feed_rtt(now, &entry.id);
    }

    /// `None` when a controlled-class node must prove proximity on this gateway; else why not.
    fn proximity_rule(&self) -> Option<&'static str> {
        if self.parts.position.is_none() {
            Some("this gateway has no position (checker.lat_deg/lon_deg or a federation position)")
        } else if !self.parts.config.controlled_requires_proximity {
            Some("[checker] controlled_requires_proximity is false")
        } else {
            None
        }
    }

    fn facts_of(
        &self,
        entry: &NodeEntry,
        inventory: Option<&nearpath_protocol::message::Inventory>,
    ) -> NodeFacts {
        let policy = &self.parts.placement.policy;
        let gpu_classes: Vec<String> = entry.gpus.iter().map(|g| g.class.clone()).collect();
        let known: HashMap<&str, u64> = self
            .parts
            .config
            .known_models
            .iter()
            .map(|m| (m.name.as_str(), m.weights_bytes))
            .collect();
        let mut models: Vec<(String, u64)> = entry
            .workloads
            .models
            .iter()
            .map(|m| (m.clone(), known.get(m.as_str()).copied().unwrap_or(0)))
            .collect();
        if let Some(inv) = inventory {
            for w in &inv.models {
                if let Some(m) = models.iter_mut().find(|m| m.0 == w.name) {
                    m.1 = super::physics::weights_floor(
                        w.weights_bytes,
                        known.get(w.name.as_str()).copied(),
                    );
                }
            }
        }
        NodeFacts {
            gpu_classes,
            models,
            gpu_uuids: inventory
                .map(|i| i.gpus.iter().map(|g| g.uuid.clone()).collect())
                .unwrap_or_default(),
            gpu_set_changed: false,
            hardware_encoder: entry
                .encoders
                .iter()
                .any(|e| crate::registry::is_hardware_encoder(&e.implementation))
                || inventory.is_some_and(|i| crate::registry::is_hardware_encoder(&i.encoder)),
            claimed_location: entry.location().coords.map(|c| Coords {
                lat: c.lat,
                lon: c.lon,
            }),
            controlled: entry.classes.iter().any(|(_, c)| policy.is_controlled(*c)),
            games: entry.workloads.games.clone(),
        }
    }

    /// Records the node's GPU identities and finds the UUIDs another live node also holds.
    async fn identity(
        &self,
        now: u64,
        entry: &NodeEntry,
        inv: &nearpath_protocol::message::Inventory,
    ) -> (bool, Vec<String>) {
        // One node reporting the same UUID for two GPUs is as suspicious as two nodes sharing
        // one; the store keeps each UUID once per node.
        let mut seen = std::collections::HashSet::new();
        let mut own_dups: Vec<String> = Vec::new();
        for g in &inv.gpus {
            if !seen.insert(g.uuid.to_ascii_lowercase()) {
                own_dups.push(g.uuid.clone());
            }
        }
        let mut kept = std::collections::HashSet::new();
        let rows: Vec<crate::store::GpuIdentityRow> = inv
            .gpus
            .iter()
            .filter(|g| kept.insert(g.uuid.to_ascii_lowercase()))
            .map(|g| crate::store::GpuIdentityRow {
                uuid: g.uuid.clone(),
                pci_device_id: g.pci_device_id,
                driver_version: g.driver_version.clone(),
                model: entry
                    .gpus
                    .get(g.index as usize)
                    .map(|x| x.model.clone())
                    .unwrap_or_default(),
            })
            .collect();
        let uuids: Vec<String> = rows.iter().map(|r| r.uuid.clone()).collect();
        let store = self.parts.store.clone();
        let (node, gw) = (entry.id.clone(), self.parts.gateway_id.clone());
        let since = now.saturating_sub(self.identity_live_ms());
        let res = tokio::task::spawn_blocking(move || {
            let change = store.record_node_gpus(&node, &gw, &rows, now)?;
            let holders = store.gpu_uuid_holders(&uuids, since)?;
            Ok::<_, crate::store::StoreError>((change, holders))
        })
        .await;
        match res {
            Ok(Ok((change, holders))) => {
                let others = holders
                    .into_iter()
                    .filter(|h| h.node_id != entry.id)
                    .collect();
                let mut dups: Vec<String> = self
                    .live_duplicates(now, &entry.operator_id, others)
                    .await
                    .into_iter()
                    .map(|h| {
                        warn!(node = %entry.id, other = %h.node_id, other_gateway = %h.gateway_id, uuid = %h.uuid, "checker: a GPU UUID is reported by two live nodes");
                        h.uuid
                    })
                    .collect();
                dups.extend(own_dups);
                dups.sort();
                dups.dedup();
                (change.changed && !change.first_seen, dups)
            }
            Ok(Err(e)) => {
                warn!(node = %entry.id, error = %e, "checker: could not record the node's GPU identities");
                (false, own_dups)
            }
            Err(_) => (false, own_dups),
        }
    }

    /// Of the other nodes recorded with one of a node's GPU UUIDs (live within
    /// `identity_live_ms`), those that make the node a duplicate.
    ///
    /// A holder with a live connection anywhere (on this gateway, or published in the node
    /// directory by another live gateway) is a duplicate, whoever its operator: two live nodes
    /// with one GPU are both quarantined. So is a holder of another operator, live or not. A
    /// holder of the same operator with no live connection anywhere is the node's previous
    /// self (the operator renamed it, or it restarted under a new id, before its identity
    /// expired): the GPUs moved, so the holder's identities are released, not flagged. When
    /// the store cannot say, every such holder counts as a duplicate, and so does a holder
    /// that another gateway recorded or renewed within [`MOVE_MIN_AGE_MS`] (or two directory
    /// publish intervals), which may be live there although the directory does not list it yet.
    async fn live_duplicates(
        &self,
        now: u64,
        operator: &str,
        holders: Vec<crate::store::GpuHolder>,
    ) -> Vec<crate::store::GpuHolder> {
        // A holder another gateway recorded this recently may be live there without being
        // published yet (the node directory is up to a publish interval old): a duplicate.
        let fresh_since = now.saturating_sub(
            MOVE_MIN_AGE_MS.max(self.parts.directory_interval_ms.saturating_mul(2)),
        );
        let own_gw = &self.parts.gateway_id;
        let takeover = self.parts.gpu_takeover_after_ms;
        let (mut dups, unsure): (Vec<_>, Vec<_>) = holders.into_iter().partition(|h| {
            // A connection of the same operator that has been silent past the id takeover
            // window is a node killed and restarted under a new id before the gateway declared
            // it gone: its GPUs may move (below), as its id could. Another operator's holder
            // never loses its GPUs this way, and a slow node that still delivers holds them.
            let live_here = self.parts.registry.get(&h.node_id).is_some_and(|e| {
                e.conn.close_reason().is_none()
                    && (e.operator_id != operator || crate::registry::holds_id(&e, now, takeover))
            });
            live_here || (&h.gateway_id != own_gw && h.seen_at_ms >= fresh_since)
        });
        if unsure.is_empty() {
            return dups;
        }
        let store = self.parts.store.clone();
        let own = self.parts.gateway_id.clone();
        let op = operator.to_string();
        let release_to = now.saturating_sub(self.released_age_ms());
        let query = unsure.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut dup = Vec::new();
            let mut moved = Vec::new();
            // Read once, and only when a holder of the same operator needs it.
            let mut live_elsewhere: Option<std::collections::HashSet<String>> = None;
            for h in query {
                if store.node_owner(&h.node_id)?.as_deref() != Some(op.as_str()) {
                    dup.push(h);
                    continue;
                }
                if live_elsewhere.is_none() {
                    let gateways: std::collections::HashSet<String> = store
                        .list_gateways()?
                        .into_iter()
                        .filter(|g| g.is_live(now) && g.id != own)
                        .map(|g| g.id)
                        .collect();
                    // This gateway's own entries are not read: its registry is the truth here.
                    live_elsewhere = Some(
                        store
                            .list_node_directory()?
                            .into_iter()
                            .filter(|n| gateways.contains(&n.gateway_id))
                            .map(|n| n.node_id)
                            .collect(),
                    );
                }
                if live_elsewhere
                    .as_ref()
                    .is_some_and(|l| l.contains(&h.node_id))
                {
                    dup.push(h);
                } else {
                    moved.push(h);
                }
            }
            for h in &moved {
                store.release_node_gpus(&h.node_id, &h.gateway_id, release_to)?;
            }
            Ok::<_, crate::store::StoreError>((dup, moved))
        })
        .await;
        match res {
            Ok(Ok((dup, moved))) => {
                for h in moved {
                    info!(from = %h.node_id, from_gateway = %h.gateway_id, uuid = %h.uuid, "checker: a GPU moved from an offline node of the same operator (renamed or restarted); not a duplicate");
                    // The silent connection it moved from is a dead node's: it is closed now
                    // rather than when it times out, so that one GPU never serves two nodes.
                    if let Some(e) = self.parts.registry.get(&h.node_id) {
                        if e.conn.close_reason().is_none() && e.revocation().is_none() {
                            warn!(node = %e.id, uuid = %h.uuid, "checker: disconnecting a silent node whose GPU re-registered under another id");
                            e.revoke(Revocation {
                                code: GPU_MOVED,
                                detail: format!(
                                    "its GPU {} registered again with another node of the same \
                                     operator while this connection was silent",
                                    h.uuid
                                ),
                            });
                        }
                    }
                }
                dups.extend(dup);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "checker: could not tell whether a GPU moved; counting it as a duplicate");
                dups.extend(unsure);
            }
            Err(_) => dups.extend(unsure),
        }
        dups
    }

    /// A node left this gateway: its GPU identities stop counting as live at once (if this
    /// gateway recorded them), so that the node that takes its GPUs over next is not taken for
    /// a clone of it.
    async fn release_identity(&self, now: u64, node_id: &str) {
        let store = self.parts.store.clone();
        let (node, gw) = (node_id.to_string(), self.parts.gateway_id.clone());
        let to = now.saturating_sub(self.released_age_ms());
        match tokio::task::spawn_blocking(move || store.release_node_gpus(&node, &gw, to)).await {
            Ok(Ok(true)) => debug!(node = %node_id, "checker: GPU identities released"),
            Ok(Ok(false)) | Err(_) => {}
            Ok(Err(e)) => {
                warn!(node = %node_id, error = %e, "checker: could not release the node's GPU identities")
            }
        }
    }

    /// The newest RTT constraint each other gateway recorded on the node, within
    /// `vote_max_age_ms`.
    async fn foreign_constraints(&self, now: u64, node_id: &str) -> Vec<RttConstraint> {
        let store = self.parts.store.clone();
        let id = node_id.to_string();
        let rows = match tokio::task::spawn_blocking(move || store.checks_of(&id, 200)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                warn!(node = %node_id, error = %e, "checker: could not read other gateways' checks");
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
        let oldest = now.saturating_sub(self.parts.config.vote_max_age_ms);
        let mut out: Vec<RttConstraint> = Vec::new();
        // Newest first: the first row of each gateway wins.
        for row in rows {
            if row.gateway_id == self.parts.gateway_id
                || row.at_ms < oldest
                || out.iter().any(|c| c.gateway_id == row.gateway_id)
            {
                continue;
            }
            let Ok(detail) = serde_json::from_str::<serde_json::Value>(&row.detail_json) else {
                continue;
            };
            let c = &detail["rtt_constraint"];
            let (Some(lat), Some(lon), Some(rtt_ms)) =
                (c["lat"].as_f64(), c["lon"].as_f64(), c["rtt_ms"].as_f64())
            else {
                continue;
            };
            let constraint = RttConstraint {
                gateway_id: row.gateway_id.clone(),
                at: Coords { lat, lon },
                rtt_ms,
                measured_at_ms: row.at_ms,
            };
            // Peer gateways are trusted, but a damaged row must not become a constraint.
            if constraint.is_valid() {
                out.push(constraint);
            }
        }
        out
    }

    fn feed_rtt(&mut self, now: u64, id: &str) {
        let Some((lat, lon)) = self.parts.position else {
            return;
        };
        let at = Coords { lat, lon };
        let Some(t) = self.nodes.get_mut(id) else {
            return;
        };
        let rtt = t.min_rtt_ms.min(rtt_ms(&t.entry));
        t.min_rtt_ms = rtt;
        // The core only needs to hear of a better (smaller) RTT.
        if t.told_rtt_ms.is_nan() || rtt < t.told_rtt_ms - 0.05 {
            t.told_rtt_ms = rtt;
            self.core.handle_rtt(
                now,
                id,
                RttConstraint {
                    gateway_id: self.parts.gateway_id.clone(),
                    at,
                    rtt_ms: rtt,
                    measured_at_ms: now,
                },
            );
        }
    }

    /// Gives the core the node's hardware encode throughput over the last
    /// [`ENCODE_WINDOW_MS`] (all its game sessions together), from the counters the game relay
    /// keeps as the node's frames arrive. The core keeps the best window.
    fn feed_encode(&mut self, now: u64, id: &str) {
        let Some(t) = self.nodes.get_mut(id) else {
            return;
        };
        let frames = t.entry.hw_encoded_frames.load(Ordering::Relaxed);
        let pixels = t.entry.hw_encoded_pixels.load(Ordering::Relaxed);
        t.encode_marks.push_back((now, frames, pixels));
        // Keep the newest mark at least a window old as the window's start.
        while t.encode_marks.len() > 2
            && t.encode_marks[1].0 <= now.saturating_sub(self.parts.config.encode_window_ms)
        {
            t.encode_marks.pop_front();
        }
        let Some(&(at, f0, p0)) = t.encode_marks.front() else {
            return;
        };
        let span_ms = now.saturating_sub(at);
        if span_ms < self.parts.config.encode_window_ms || !t.announced || pixels <= p0 {
            return;
        }
        let secs = span_ms as f64 / 1000.0;
        let sample = Sample::Encode {
            pixels_per_s: (pixels - p0) as f64 / secs,
            fps: frames.saturating_sub(f0) as f64 / secs,
            width: 0,
            height: 0,
        };
        self.core.handle_sample(now, id, sample);
    }

    async fn sweep(&mut self) {
        let now = self.parts.clock.unix_ms();
        // Events can be dropped when the queue is full: pick up joins and departures here.
        let live = self.parts.registry.list();
        for e in &live {
            let known = self
                .nodes
                .get(&e.id)
                .is_some_and(|t| Arc::ptr_eq(&t.entry, e));
            if !known {
                self.on_joined(now, e.clone()).await;
            }
        }
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(id, t)| {
                !live
                    .iter()
                    .any(|e| &e.id == *id && Arc::ptr_eq(e, &t.entry))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.nodes.remove(&id);
            self.core.handle_left(now, &id);
            self.release_identity(now, &id).await;
        }
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for id in ids {
            let Some(t) = self.nodes.get(&id) else {
                continue;
            };
            let entry = t.entry.clone();
            if t.gpus_moved {
                continue;
            }
            if !t.announced {
                if entry.inventory.get().is_some() {
                    self.announce(now, &entry, true).await;
                } else if now.saturating_sub(t.joined_ms) >= self.parts.config.inventory_wait_ms {
                    debug!(node = %id, "checker: no inventory from the node; checking without one");
                    self.announce(now, &entry, false).await;
                }
            }
            let idle = entry.in_use(SlotKind::Inference) == 0 && entry.in_use(SlotKind::Game) == 0;
            if let Some(t) = self.nodes.get_mut(&id) {
                if t.announced && t.idle != Some(idle) {
                    t.idle = Some(idle);
                    self.core.handle_idle(now, &id, idle);
                }
            }
            self.feed_rtt(now, &id);
            self.feed_encode(now, &id);
            *counts.entry(entry.check().state).or_default() += 1;
        }
        self.sweeps += 1;
        if now.saturating_sub(self.identity_swept_ms)
            >= self.parts.config.identity_sweep_interval_ms
        {
            self.identity_swept_ms = now;
            self.identity_sweep(now).await;
        }
        if self.sweeps % PRUNE_SWEEPS == 1 {
            self.prune(now);
        }
        for state in crate::metrics::label_values::VERIFICATION_STATES {
            self.parts
                .metrics
                .node_verification
                .get_or_create(&labels([("state", state)]))
                .set(counts.get(state).copied().unwrap_or(0));
        }
    }

    /// Renews this gateway's nodes' GPU identities and flags those whose UUIDs another live
    /// node holds, wherever it is attached (the check at registration only sees the nodes that
    /// were there before).
    async fn identity_sweep(&mut self, now: u64) {
        let mine: Vec<(String, Vec<String>)> = self
            .nodes
            .iter()
            .filter(|(_, t)| !t.gpus_moved)
            .filter_map(|(id, t)| {
                let inv = &t.entry.inventory.get()?.inventory;
                Some((
                    id.clone(),
                    inv.gpus.iter().map(|g| g.uuid.clone()).collect(),
                ))
            })
            .collect();
        if mine.is_empty() {
            return;
        }
        let store = self.parts.store.clone();
        let since = now.saturating_sub(self.identity_live_ms());
        let query = mine.clone();
        let res = tokio::task::spawn_blocking(move || {
            for (id, _) in &query {
                store.touch_node_gpus(id, now)?;
            }
            let uuids: Vec<String> = query.iter().flat_map(|(_, u)| u.iter().cloned()).collect();
            store.gpu_uuid_holders(&uuids, since)
        })
        .await;
        let holders = match res {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                warn!(error = %e, "checker: could not renew GPU identities");
                return;
            }
            Err(_) => return,
        };
        for (id, uuids) in mine {
            let Some(t) = self.nodes.get(&id) else {
                continue;
            };
            let operator = t.entry.operator_id.clone();
            // Other holders of this node's UUIDs not reported to the core yet.
            let others: Vec<crate::store::GpuHolder> = holders
                .iter()
                .filter(|h| {
                    h.node_id != id
                        && uuids.iter().any(|u| u.eq_ignore_ascii_case(&h.uuid))
                        && !t.dups.contains(&h.uuid.to_ascii_lowercase())
                })
                .cloned()
                .collect();
            if others.is_empty() {
                continue;
            }
            for h in self.live_duplicates(now, &operator, others).await {
                let new = self
                    .nodes
                    .get_mut(&id)
                    .is_some_and(|t| t.dups.insert(h.uuid.to_ascii_lowercase()));
                if new {
                    self.core.handle_duplicate_uuid(now, &id, &h.uuid);
                }
            }
        }
    }

    /// Drops check records older than the votes they could be (and a month at least), and GPU
    /// identities not renewed for a week (nodes that never came back), in the background.
    fn prune(&self, now: u64) {
        let store = self.parts.store.clone();
        let checks_before =
            now.saturating_sub(self.parts.config.vote_max_age_ms.max(CHECK_RETENTION_MS));
        let gpus_before = now.saturating_sub(GPU_RETENTION_MS);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.prune_checks(checks_before) {
                warn!(error = %e, "checker: could not prune old check records");
            }
            if let Err(e) = store.prune_node_gpus(gpus_before) {
                warn!(error = %e, "checker: could not prune old GPU identities");
            }
        });
    }

    fn on_probe_done(&mut self, id: ProbeId, result: Result<Sample, String>) {
        let now = self.parts.clock.unix_ms();
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) if e == BUSY || e == BUSY_GAME => "busy",
            Err(_) => "failed",
        };
        self.parts
            .metrics
            .checker_probes
            .get_or_create(&labels([("outcome", outcome)]))
            .inc();
        if let Some(node) = self.probe_nodes.remove(&id) {
            debug!(%node, outcome, "checker: probe finished");
        }
        self.core.handle_probe_done(now, id, result);
    }

    async fn apply(&mut self, now: u64, action: Action) {
        match action {
            Action::StartProbe {
                id,
                node_id,
                model,
                game: true,
            } => {
                let Some(t) = self.nodes.get(&node_id) else {
                    self.core
                        .handle_probe_done(now, id, Err("the node left".into()));
                    return;
                };
                let entry = t.entry.clone();
                let registry = self.parts.registry.clone();
                let sessions = self.parts.sessions.clone();
                let clock = self.parts.clock.clone();
                let c = &self.parts.config;
                let plan = GameProbePlan {
                    size: self.parts.game_probe_size,
                    duration_ms: (c.game_probe_duration_min_ms, c.game_probe_duration_max_ms),
                    min_fps_percent: c.game_probe_min_fps_percent,
                    input_interval_mean_ms: c.game_probe_input_interval_mean_ms,
                };
                let timeout = Duration::from_millis(self.parts.config.probe_timeout_ms);
                self.probe_nodes.insert(id, node_id.clone());
                self.probes.spawn(
                    async move {
                        // A node that stalls the probe holds it no longer than the timeout.
                        let r = tokio::time::timeout(
                            timeout,
                            game_probe(&registry, &sessions, &clock, entry, &model, plan),
                        )
                        .await
                        .unwrap_or_else(|_| Err("the game probe timed out".into()));
                        (id, r)
                    }
                    .instrument(tracing::debug_span!("game_probe", node = %node_id)),
                );
            }
            Action::StartProbe {
                id, node_id, model, ..
            } => {
                let Some(t) = self.nodes.get(&node_id) else {
                    self.core
                        .handle_probe_done(now, id, Err("the node left".into()));
                    return;
                };
                let entry = t.entry.clone();
                let registry = self.parts.registry.clone();
                let sessions = self.parts.sessions.clone();
                let max_tokens = self.parts.config.probe_max_tokens;
                let timeout = Duration::from_millis(self.parts.config.probe_timeout_ms);
                self.probe_nodes.insert(id, node_id.clone());
                self.probes.spawn(
                    async move {
                        let r = tokio::time::timeout(
                            timeout,
                            probe(&registry, &sessions, entry, &model, max_tokens),
                        )
                        .await
                        .unwrap_or_else(|_| Err("the probe timed out".into()));
                        (id, r)
                    }
                    .instrument(tracing::debug_span!("probe", node = %node_id)),
                );
            }
            Action::Verdict {
                node_id,
                verification,
                record,
            } => self.on_verdict(now, &node_id, verification, record).await,
        }
    }

    async fn on_verdict(
        &mut self,
        now: u64,
        node_id: &str,
        verification: Verification,
        record: super::schedule::CheckRecord,
    ) {
        let Some(t) = self.nodes.get_mut(node_id) else {
            return;
        };
        t.prior = None;
        let entry = t.entry.clone();
        let policy = &self.parts.placement.policy;
        let before = entry.check();
        let reclassified = verification.reclassified_to.as_ref().map(|class| {
            let id = policy.class_id(class);
            vec![(class.clone(), id); entry.gpus.len().max(1)]
        });
        let classes_after = reclassified
            .clone()
            .unwrap_or_else(|| entry.classes.clone());
        let controlled = classes_after.iter().any(|(_, c)| policy.is_controlled(*c));
        let state = verification.state;
        let reasons = verification.reasons.join("; ");
        let quarantine = (state == VerificationState::Quarantined).then(|| reasons.clone());
        // The gate is worked out for every node (the admin view shows what it would be), and
        // applied to the nodes that have a controlled class.
        let gate = ControlledGate::of(
            &verification,
            &reasons,
            quarantine.as_deref(),
            self.proximity_rule(),
            controlled,
        );
        let controlled_block = gate.blocked_by.clone().filter(|_| controlled);
        let penalty_ms = if verification.demoted {
            self.parts.config.demoted_penalty_ms
        } else if state == VerificationState::Verified {
            0.0
        } else {
            self.parts.config.unverified_penalty_ms
        };
        let mut view = serde_json::to_value(&verification).unwrap_or_default();
        gate.show_in(&mut view);
        let check = NodeCheck {
            state: state.as_str(),
            checked: verification.checks > 0,
            reclassified: reclassified.clone(),
            controlled_block,
            quarantine,
            penalty_ms,
            view,
        };
        self.parts.registry.set_check(&entry, check);
        self.parts
            .metrics
            .checker_checks
            .get_or_create(&labels([("kind", record.kind), ("state", state.as_str())]))
            .inc();
        if before.state != state.as_str() {
            info!(node = %node_id, from = before.state, to = state.as_str(), %reasons, "checker: verification changed");
        }
        let newly_reclassified = reclassified.is_some() && before.reclassified != reclassified;
        if newly_reclassified {
            self.reclassify(&entry, &classes_after, &reasons).await;
        }
        // An impossible claim is an SLA event whether a class explains it (reclassified) or
        // none does (quarantined): one per connection, since more evidence may move the class
        // again (weights first, then a probe's speed), but the operator lied once.
        let impossible = verification.findings.iter().any(is_impossible)
            && matches!(
                state,
                VerificationState::ImpossibleClaim | VerificationState::Quarantined
            );
        let first_lie = self
            .nodes
            .get_mut(node_id)
            .is_some_and(|t| impossible && !std::mem::replace(&mut t.impossible_recorded, true));
        if first_lie {
            self.impossible_claim_event(now, &entry, &reasons).await;
        }
        // Durable: the record of this check and the node's state, then the votes of every
        // gateway that checked the node.
        let store = self.parts.store.clone();
        // The record carries this gateway's RTT constraint on the node, so that the gateway
        // the node attaches to next can intersect it with its own.
        let constraint = self.nodes.get(node_id).and_then(|t| {
            let (lat, lon) = self.parts.position?;
            t.told_rtt_ms
                .is_finite()
                .then(|| serde_json::json!({"lat": lat, "lon": lon, "rtt_ms": t.told_rtt_ms}))
        });
        let row = crate::store::CheckRecordRow {
            node_id: node_id.to_string(),
            gateway_id: self.parts.gateway_id.clone(),
            kind: record.kind.to_string(),
            // This gateway's own finding: its vote (the node's state is saved below).
            state: record.state.as_str().to_string(),
            detail_json: serde_json::json!({"record": record, "rtt_constraint": constraint})
                .to_string(),
            at_ms: now,
        };
        let reasons_json = serde_json::to_string(&verification.reasons).unwrap_or_default();
        let id = node_id.to_string();
        let federated = self.parts.federated;
        let votes = tokio::task::spawn_blocking(move || {
            store.record_check(&row)?;
            store.save_verification(&id, state.as_str(), &reasons_json, now)?;
            if federated {
                store.latest_votes(&id)
            } else {
                Ok(Vec::new())
            }
        })
        .await;
        match votes {
            Ok(Ok(v)) if federated => {
                let votes: Vec<GatewayVote> = v
                    .into_iter()
                    .filter_map(|v| {
                        Some(GatewayVote {
                            state: VerificationState::from_name(&v.state)?,
                            gateway_id: v.gateway_id,
                            at_ms: v.at_ms,
                        })
                    })
                    .collect();
                // Only other gateways' votes are news; the core knows its own verdict.
                if votes.iter().any(|v| v.gateway_id != self.parts.gateway_id) {
                    self.core.handle_votes(now, node_id, votes);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(node = %node_id, error = %e, "checker: could not record the check"),
            Err(_) => {}
        }
    }

    /// A node whose claimed classes are impossible is taken as the class it showed: the
    /// onboarding geofence runs again on it, which disconnects a node that could not have
    /// registered as that class from where it is.
    async fn reclassify(
        &self,
        entry: &Arc<NodeEntry>,
        classes: &[(String, nearpath_geo::ClassId)],
        reasons: &str,
    ) {
        self.parts.metrics.checker_reclassifications.inc();
        let names: Vec<&str> = classes.iter().map(|c| c.0.as_str()).collect();
        warn!(node = %entry.id, claimed = ?entry.classes.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), found = ?names, %reasons, "checker: impossible claim; node reclassified");
        let location = entry.location();
        for (name, id) in classes {
            let decision = self.parts.placement.policy.check_onboard(&location, *id);
            self.parts.placement.count_decision("node", &decision);
            if let nearpath_geo::Decision::Deny { rule, reason, .. } = decision {
                warn!(node = %entry.id, %rule, "checker: the reclassified node may not be onboarded where it is; disconnecting");
                entry.revoke(Revocation {
                    code: "reclassified",
                    detail: format!(
                        "the node delivered what no {} can ({reasons}); as class {name} it is \
                         refused by geofence rule {rule}: {reason}",
                        entry
                            .classes
                            .first()
                            .map(|c| c.0.as_str())
                            .unwrap_or("claimed class")
                    ),
                });
                break;
            }
        }
    }

    /// Records an impossible claim against the node's operator: a penalty event and, with it,
    /// the node's SLA `penalty_events` (one transaction, in either store).
    async fn impossible_claim_event(&self, now: u64, entry: &Arc<NodeEntry>, reasons: &str) {
        self.parts
            .metrics
            .penalties
            .get_or_create(&labels([("kind", "impossible_claim")]))
            .inc();
        let store = self.parts.store.clone();
        let (id, op) = (entry.id.clone(), entry.operator_id.clone());
        let active = entry.sessions_in_use();
        let detail = format!("impossible claim: {reasons}");
        let res = tokio::task::spawn_blocking(move || {
            store.record_penalty(&id, &op, now, "impossible_claim", active, &detail)
        })
        .await;
        if let Ok(Err(e)) = res {
            warn!(node = %entry.id, error = %e, "checker: could not record the SLA event");
        }
    }
}

/// The gate the gateway applies to a node's controlled GPU classes (`NodeCheck.controlled_block`),
/// as `GET /admin/nodes/{id}` shows it: `verification.controlled_eligible` is `eligible`, and
/// `verification.controlled_gate` says why. It is worked out for every node; it only bars the
/// nodes that have a controlled class (`applies`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ControlledGate {
    /// Whether the gateway lets the node serve controlled classes now.
    pub eligible: bool,
    /// Whether the node has a controlled class (after any reclassification).
    pub applies: bool,
    /// `passed` (verified, or reclassified to the class it showed), `pending` (no check has
    /// completed yet: the node may serve until its registration check says otherwise), or
    /// `failed`.
    pub verification: &'static str,
    /// `proven`, `not_proven`, `not_measured` (no RTT or no claimed place yet: not held
    /// against the node) or `not_required`.
    pub proximity: &'static str,
    /// Why proximity is not required, when it is not.
    pub proximity_note: Option<&'static str>,
    /// What bars the node, when it is barred.
    pub blocked_by: Option<String>,
}

impl ControlledGate {
    /// The gate after a verdict. `proximity_rule` is `None` when proximity is required, else
    /// why it is not ([`Driver::proximity_rule`]).
    pub fn of(
        v: &Verification,
        reasons: &str,
        quarantine: Option<&str>,
        proximity_rule: Option<&'static str>,
        applies: bool,
    ) -> ControlledGate {
        let (verification, mut blocked_by) = match v.state {
            VerificationState::Verified | VerificationState::ImpossibleClaim => ("passed", None),
            VerificationState::Unverified if v.checks == 0 => ("pending", None),
            other => (
                "failed",
                Some(format!("verification is {}: {reasons}", other.as_str())),
            ),
        };
        let proximity = match (proximity_rule, &v.proximity) {
            (Some(_), _) => "not_required",
            (None, Some(Proximity::Proven { .. })) => "proven",
            (None, Some(Proximity::NotProven { why, .. })) => {
                blocked_by
                    .get_or_insert_with(|| format!("not proven near its claimed location: {why}"));
                "not_proven"
            }
            (None, Some(Proximity::NoEvidence) | None) => "not_measured",
        };
        if let Some(q) = quarantine {
            blocked_by.get_or_insert_with(|| format!("quarantined: {q}"));
        }
        ControlledGate {
            eligible: blocked_by.is_none(),
            applies,
            verification,
            proximity,
            proximity_note: proximity_rule,
            blocked_by,
        }
    }

    /// The gate of a node that just registered, before any verdict on this connection.
    fn pending(applies: bool, proximity_rule: Option<&'static str>) -> ControlledGate {
        ControlledGate {
            eligible: true,
            applies,
            verification: "pending",
            proximity: if proximity_rule.is_some() {
                "not_required"
            } else {
                "not_measured"
            },
            proximity_note: proximity_rule,
            blocked_by: None,
        }
    }

    /// The gate of a node whose last verdict (remembered by the store) was against it: barred
    /// until its registration check says otherwise, so that a reconnect cannot launder a verdict.
    fn barred(why: String, applies: bool) -> ControlledGate {
        ControlledGate {
            eligible: false,
            applies,
            verification: "pending",
            proximity: "not_measured",
            proximity_note: None,
            blocked_by: Some(why),
        }
    }

    /// Puts the gate into a verification view: `controlled_eligible` becomes the gate (the
    /// core's own flag, verified *and* proven, is stricter than what the gateway applies when
    /// proximity is not required), and `controlled_gate` explains it.
    fn show_in(&self, view: &mut serde_json::Value) {
        if let Some(o) = view.as_object_mut() {
            o.insert("controlled_eligible".into(), self.eligible.into());
            o.insert(
                "controlled_gate".into(),
                serde_json::to_value(self).unwrap_or_default(),
            );
        }
    }
}

/// The error text of a probe that found no free slot (not held against the node).
const BUSY: &str = "no free inference slot";
const BUSY_GAME: &str = "no free game slot";
/// How a game probe runs (from `[checker]`).
#[derive(Debug, Clone, Copy)]
struct GameProbePlan {
    /// The session's size: width, height, frames per second, bitrate in kbit/s.
    size: (u32, u32, u32, u32),
    /// A probe lasts a random time in this range, in ms (players' sessions are longer, but
    /// their first seconds look the same).
    duration_ms: (u64, u64),
    /// A probe that delivers less than this share of the asked frame rate, in percent, failed.
    min_fps_percent: u32,
    /// Mean gap between the probe's input events, in ms (0: none).
    input_interval_mean_ms: u64,
}

/// Player-like input for a game probe: random, exponentially spaced events, mostly small mouse
/// motions with key and button presses that are released again, as a person at a keyboard
/// and mouse sends them. A node watching for input sees a player, not a silent probe.
struct ProbeInput {
    mean_ms: f64,
    seq: u64,
    /// A key or button held down, released by a later event.
    held: Option<nearpath_protocol::InputEvent>,
}

impl ProbeInput {
    /// Keys a player of a typical title presses (USB HID usages: W, A, S, D, space, shift).
    const KEYS: [u16; 6] = [0x1a, 0x04, 0x16, 0x07, 0x2c, 0xe1];

    fn new(mean_ms: u64) -> Self {
        ProbeInput {
            mean_ms: mean_ms as f64,
            seq: 0,
            held: None,
        }
    }

    /// The wait before the next event: exponential around the mean, within [mean/10, 10 x mean],
    /// so no two probes share a rhythm and none is silent for long.
    fn gap(&self, rng: &mut impl rand::Rng) -> Duration {
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        let ms = (-u.ln() * self.mean_ms).clamp(self.mean_ms / 10.0, self.mean_ms * 10.0);
        Duration::from_secs_f64(ms.max(1.0) / 1000.0)
    }

    /// The next event and its seq.
    fn next(&mut self, rng: &mut impl rand::Rng) -> (u64, nearpath_protocol::InputEvent) {
        use nearpath_protocol::InputEvent;
        self.seq += 1;
        let release = match self.held {
            Some(InputEvent::Key { code, .. }) => Some(InputEvent::Key { code, down: false }),
            Some(InputEvent::MouseButton { button, .. }) => Some(InputEvent::MouseButton {
                button,
                down: false,
            }),
            _ => None,
        };
        let roll = rng.random_range(0..100u32);
        let event = match release {
            // A press lasts a few events of motion, then is released.
            Some(up) if roll < 30 => {
                self.held = None;
                up
            }
            _ if roll < 80 || self.held.is_some() => InputEvent::MouseMove {
                dx: rng.random_range(-12..=12),
                dy: rng.random_range(-8..=8),
            },
            _ if roll < 95 => {
                let code = Self::KEYS[rng.random_range(0..Self::KEYS.len())];
                let down = InputEvent::Key { code, down: true };
                self.held = Some(down);
                down
            }
            _ => {
                let down = InputEvent::MouseButton {
                    button: 0,
                    down: true,
                };
                self.held = Some(down);
                down
            }
        };
        (self.seq, event)
    }
}

/// Frees a probe's session id from the relay table when the probe ends, however it ends.
struct ProbeRelay<'a> {
    sessions: &'a Sessions,
    session_id: u64,
}

impl Drop for ProbeRelay<'_> {
    fn drop(&mut self) {
        self.sessions.games.remove_probe(self.session_id);
    }
}

/// A game probe: a short session of `title` on the node, opened and relayed exactly as a
/// player's (the same `Open`, a fresh random session id, frames on the node's frame streams
/// through the relay and its frame budget), but not listed with the players' sessions, not
/// billed and not an SLA event. Measures the frames per second delivered and the mean frame
/// latency (capture on the node to arrival at the gateway). Unbounded here: the caller bounds
/// it with the probe timeout.
async fn game_probe(
    registry: &Arc<Registry>,
    sessions: &Sessions,
    clock: &SharedClock,
    node: Arc<NodeEntry>,
    title: &str,
    plan: GameProbePlan,
) -> Result<Sample, String> {
    let (width, height, fps, bitrate_kbps) = plan.size;
    use crate::relay::{FrameSink, Relay, RelayOrigin};
    use nearpath_protocol::message::{Close, GameParams, VideoCodec};
    let Some(_slot) = registry.acquire(&node, SlotKind::Game) else {
        return Err(BUSY_GAME.into());
    };
    let codec = if node.encodes(VideoCodec::H264) {
        VideoCodec::H264
    } else {
        node.encoders
            .first()
            .map(|e| e.codec)
            .unwrap_or(VideoCodec::H264)
    };
    let params = GameParams {
        title: title.to_string(),
        width,
        height,
        fps,
        bitrate_kbps,
        codec,
        // A player's `Open` always carries a trace context (the player's, or one the gateway
        // starts), so a probe's carries a fresh one too: its absence would give probes away.
        traceparent: Some(crate::access::TraceParent::continue_or_start(None).header()),
    };
    let session = sessions.ids.mint();
    let session_id = session.get();
    let (frames_tx, mut frames_rx) = mpsc::channel(64);
    let (audio_tx, _audio_rx) = mpsc::channel(16);
    let (events_tx, _events_rx) = mpsc::channel(1);
    let relay = Arc::new(Relay::new(
        session,
        FrameSink::Channel {
            frames: frames_tx,
            audio: audio_tx,
        },
        node.clone(),
        &params,
        events_tx.downgrade(),
        RelayOrigin {
            client_addr: String::new(),
            transport: "probe",
            tenant: String::new(),
            started: Instant::now(),
        },
    ));
    sessions.games.insert_probe(relay.clone());
    let _unlist = ProbeRelay {
        sessions,
        session_id,
    };
    let (mut tx, rx) = node
        .conn
        .open_bi()
        .await
        .map_err(|e| format!("could not open a stream: {e}"))?;
    let open = Message::Open(Open {
        session_id,
        kind: SessionKind::Game(params),
    });
    send(&mut tx, &open)
        .await
        .map_err(|e| format!("could not send Open: {e}"))?;
    let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
    match framed.next().await {
        Ok(Some(Message::Accepted(_))) => {}
        Ok(Some(Message::Refused(r))) => {
            return Err(format!("the node refused the game probe: {}", r.reason))
        }
        Ok(Some(other)) => return Err(format!("unexpected {} on a game probe", other.name())),
        Ok(None) => return Err("the node closed the game probe stream".into()),
        Err(e) => return Err(format!("game probe stream: {e}")),
    }
    let span_ms = {
        use rand::Rng;
        let (lo, hi) = plan.duration_ms;
        rand::rng().random_range(lo..=hi.max(lo))
    };
    let start = Instant::now();
    let until = tokio::time::Instant::now() + Duration::from_millis(span_ms);
    let mut frames: u64 = 0;
    let mut latency_ms_sum = 0.0;
    let mut ended = None;
    let mut input = ProbeInput::new(plan.input_interval_mean_ms);
    let next_input_at = |input: &ProbeInput| {
        let mut rng = rand::rng();
        tokio::time::Instant::now() + input.gap(&mut rng)
    };
    let mut input_at = next_input_at(&input);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            // Input like a player's, through the relay as a player's datagrams go.
            _ = tokio::time::sleep_until(input_at), if plan.input_interval_mean_ms > 0 => {
                let (seq, event) = input.next(&mut rand::rng());
                relay.send_input(seq, clock.unix_us(), event);
                input_at = next_input_at(&input);
            }
            f = frames_rx.recv() => match f {
                Some((header, _payload)) => {
                    frames += 1;
                    // A node clock ahead of ours reads as latency 0, as in the relay.
                    let age_us = clock.unix_us().saturating_sub(header.capture_ts_us);
                    latency_ms_sum += age_us as f64 / 1000.0;
                }
                None => break,
            },
            m = framed.next() => match m {
                // The node's other session messages (rumble, video changes) are ignored.
                Ok(Some(Message::Ended(e))) => {
                    ended = Some(e.reason);
                    break;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    ended = Some("the node closed the session stream".into());
                    break;
                }
            },
        }
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-3);
    // Ended as a player leaving would end it.
    let _ = send(
        &mut tx,
        &Message::Close(Close {
            reason: "client left".into(),
        }),
    )
    .await;
    let _ = tx.finish();
    let delivered = frames as f64 / elapsed;
    if frames == 0 {
        return Err(match ended {
            Some(why) => format!("no frames (the session ended: {why})"),
            None => format!("no frames in {elapsed:.1} s"),
        });
    }
    if delivered < f64::from(fps) * f64::from(plan.min_fps_percent) / 100.0 {
        return Err(format!(
            "delivered {delivered:.1} fps of the {fps} asked ({frames} frames in {elapsed:.1} s)"
        ));
    }
    Ok(Sample::Game {
        title: title.to_string(),
        fps: delivered,
        frame_latency_ms: latency_ms_sum / frames as f64,
        frames,
    })
}

fn rtt_ms(entry: &NodeEntry) -> f64 {
    let ms = entry.conn.rtt().as_secs_f64() * 1000.0;
    if ms.is_finite() && ms >= 0.0 {
        ms
    } else {
        f64::INFINITY
    }
}

/// Words the probe prompts are drawn from, so that probes do not all look alike.
const PROBE_TOPICS: &[&str] = &[
    "the history of the bicycle",
    "how tides work",
    "a recipe for lentil soup",
    "why the sky is blue",
    "the rules of chess",
    "how a compiler works",
    "a short poem about rain",
    "the water cycle",
    "how to plant tomatoes",
    "what a neutron star is",
];

/// Runs one probe: an inference session that looks like a client's, streamed and timed here.
/// Its decode rate counts from the first token to the last, so the time to first token (queue,
/// prompt processing) does not dilute it.
async fn probe(
    registry: &Arc<Registry>,
    sessions: &Sessions,
    node: Arc<NodeEntry>,
    model: &str,
    max_tokens: u32,
) -> Result<Sample, String> {
    let Some(_slot) = registry.acquire(&node, SlotKind::Inference) else {
        return Err(BUSY.into());
    };
    let session = sessions.ids.mint();
    let (topic, tokens) = {
        use rand::Rng;
        let mut rng = rand::rng();
        let topic = PROBE_TOPICS[rng.random_range(0..PROBE_TOPICS.len())];
        let spread = (max_tokens / 4).max(1);
        let tokens = max_tokens - spread / 2 + rng.random_range(0..spread);
        (topic, tokens.max(1))
    };
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("Tell me about {topic}.")}],
        "max_tokens": tokens,
        "stream": true,
    });
    let (mut tx, rx) = node
        .conn
        .open_bi()
        .await
        .map_err(|e| format!("could not open a stream: {e}"))?;
    let open = Message::Open(Open {
        session_id: session.get(),
        kind: SessionKind::Inference {
            model: model.to_string(),
            endpoint: Endpoint::Chat,
            request_json: body.to_string(),
            request_id: crate::access::new_request_id(),
            // As for game probes: every real request's `Open` carries a trace context.
            traceparent: Some(crate::access::TraceParent::continue_or_start(None).header()),
        },
    });
    send(&mut tx, &open)
        .await
        .map_err(|e| format!("could not send Open: {e}"))?;
    let mut framed = FramedRecv::new(rx, MAX_REQUEST_FRAME);
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = start;
    let mut pieces: u32 = 0;
    loop {
        match framed.next().await {
            Ok(Some(Message::Accepted(_))) => {}
            Ok(Some(Message::Refused(r))) => {
                return Err(format!("the node refused the probe: {}", r.reason))
            }
            Ok(Some(Message::Token(_))) | Ok(Some(Message::Chunk(_))) => {
                let at = Instant::now();
                first.get_or_insert(at);
                last = at;
                pieces = pieces.saturating_add(1);
            }
            Ok(Some(Message::Done(_))) => break,
            Ok(Some(Message::Error(e))) => {
                return Err(format!("the node failed the probe: {}", e.message))
            }
            Ok(Some(other)) => return Err(format!("unexpected {} on a probe", other.name())),
            Ok(None) => return Err("the node closed the probe stream early".into()),
            Err(e) => return Err(format!("probe stream: {e}")),
        }
    }
    let _ = tx.finish();
    let first = first.ok_or("the probe produced no tokens")?;
    let ttft_ms = first.duration_since(start).as_secs_f64() * 1000.0;
    let span = last.duration_since(first).as_secs_f64();
    // Pieces after the first, over the time they took: each piece is at least one token, so
    // this never overstates the rate of an honest node.
    if pieces < 2 || span <= 0.0 {
        return Err("too few tokens to time".into());
    }
    Ok(Sample::Decode {
        model: model.to_string(),
        tokens_per_s: f64::from(pieces - 1) / span,
        ttft_ms,
        from_probe: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::verdict::{decide, DecideInput};

    const NO_POSITION: Option<&str> = Some("this gateway has no position");

    fn proven() -> Proximity {
        Proximity::Proven {
            gateway_id: "g".into(),
            rtt_ms: 1.0,
            radius_km: 100.0,
            distance_km: 10.0,
        }
    }

    fn not_proven() -> Proximity {
        Proximity::NotProven {
            gateway_id: "g".into(),
            rtt_ms: 20.0,
            radius_km: 2000.0,
            distance_km: 10.0,
            why: "2,000 km of slack".into(),
        }
    }

    /// A verified H100 with the given proximity evidence.
    fn verified(proximity: Option<Proximity>) -> Verification {
        let v = decide(&DecideInput {
            gpu_classes: vec!["h100".into()],
            checks: 1,
            proximity,
            ..DecideInput::default()
        });
        assert_eq!(v.state, VerificationState::Verified);
        v
    }

    /// Regression (issue 14, review): on a gateway with no position a verified node is eligible
    /// for controlled classes, which is what the gateway applies, although the core's strict
    /// flag (verified *and* proven) says no.
    #[test]
    fn a_gateway_without_a_position_shows_its_open_gate_not_the_cores_flag() {
        let v = verified(None);
        assert!(!v.controlled_eligible, "the core's flag is strict");
        let g = ControlledGate::of(&v, "", None, NO_POSITION, true);
        assert!(g.eligible && g.blocked_by.is_none(), "{g:?}");
        assert_eq!((g.verification, g.proximity), ("passed", "not_required"));
        assert_eq!(g.proximity_note, NO_POSITION);
        let mut view = serde_json::to_value(&v).unwrap();
        g.show_in(&mut view);
        assert_eq!(view["controlled_eligible"], true);
        assert_eq!(view["controlled_gate"]["proximity"], "not_required");
        // Even unproven proximity is not held against a node when it is not required.
        let g = ControlledGate::of(&verified(Some(not_proven())), "", None, NO_POSITION, true);
        assert!(g.eligible, "{g:?}");
    }

    /// Issue 15's encoder names: NVENC and VA-API (and the other vendors' engines) are
    /// hardware, the software encoders are not.
    /// Probe realism: the probe's input mixes motion with presses, releases every press
    /// before the next, numbers events in order, and spaces them randomly within bounds.
    #[test]
    fn probe_input_is_varied_released_and_randomly_spaced() {
        use nearpath_protocol::InputEvent;
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut input = ProbeInput::new(40);
        let mut held: Option<InputEvent> = None;
        let (mut moves, mut presses) = (0, 0);
        for want in 1..=2_000u64 {
            let (seq, e) = input.next(&mut rng);
            assert_eq!(seq, want);
            match e {
                InputEvent::MouseMove { .. } => moves += 1,
                InputEvent::Key { down: true, .. } | InputEvent::MouseButton { down: true, .. } => {
                    assert!(held.is_none(), "a second press before a release");
                    presses += 1;
                    held = Some(e);
                }
                InputEvent::Key { code, down: false } => {
                    assert_eq!(held.take(), Some(InputEvent::Key { code, down: true }));
                }
                InputEvent::MouseButton {
                    button,
                    down: false,
                } => {
                    assert_eq!(
                        held.take(),
                        Some(InputEvent::MouseButton { button, down: true })
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            moves > 1_000 && presses > 100,
            "{moves} moves, {presses} presses"
        );
        let gaps: Vec<Duration> = (0..1_000).map(|_| input.gap(&mut rng)).collect();
        assert!(gaps
            .iter()
            .all(|g| *g >= Duration::from_millis(4) && *g <= Duration::from_millis(400)));
        let mean = gaps.iter().sum::<Duration>().as_secs_f64() / 1_000.0;
        assert!((0.030..0.050).contains(&mean), "mean gap {mean}");
    }

    #[test]
    fn hardware_encoders_are_told_from_software_ones() {
        use crate::registry::is_hardware_encoder as hw;
        for name in [
            "nvenc",
            "h264_nvenc",
            "hevc_nvenc",
            "av1_nvenc",
            "vaapi",
            "h264_vaapi",
        ] {
            assert!(hw(name), "{name}");
        }
        for name in [
            "x264",
            "libx264",
            "openh264",
            "x265",
            "libaom",
            "libaom-av1",
            "",
        ] {
            assert!(!hw(name), "{name}");
        }
    }

    #[test]
    fn with_a_position_the_gate_needs_proven_proximity() {
        let g = ControlledGate::of(&verified(Some(proven())), "", None, None, true);
        assert!(g.eligible, "{g:?}");
        assert_eq!((g.verification, g.proximity), ("passed", "proven"));
        let g = ControlledGate::of(&verified(Some(not_proven())), "", None, None, true);
        assert!(!g.eligible);
        assert_eq!(g.proximity, "not_proven");
        assert!(g.blocked_by.unwrap().contains("2,000 km of slack"));
        // No RTT yet: not held against the node (the registration check decides).
        let g = ControlledGate::of(&verified(None), "", None, None, true);
        assert!(g.eligible);
        assert_eq!(g.proximity, "not_measured");
    }

    #[test]
    fn a_failed_or_quarantined_verification_closes_the_gate_and_says_why() {
        let mislocated = Verification {
            state: VerificationState::Mislocated,
            ..verified(Some(proven()))
        };
        let g = ControlledGate::of(&mislocated, "far away", None, NO_POSITION, true);
        assert!(!g.eligible);
        assert_eq!(g.verification, "failed");
        assert_eq!(
            g.blocked_by.as_deref(),
            Some("verification is mislocated: far away")
        );
        let pending = Verification {
            state: VerificationState::Unverified,
            checks: 0,
            ..verified(None)
        };
        let g = ControlledGate::of(&pending, "", None, None, false);
        assert!(g.eligible && !g.applies);
        assert_eq!(g.verification, "pending");
        let quarantined = Verification {
            state: VerificationState::Quarantined,
            ..verified(None)
        };
        let g = ControlledGate::of(&quarantined, "a clone", Some("a clone"), NO_POSITION, true);
        assert!(!g.eligible);
        let barred = ControlledGate::barred("its last verdict was quarantined".into(), true);
        assert!(!barred.eligible && barred.blocked_by.is_some());
    }
}
