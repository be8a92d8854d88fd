//! The registry of live edge nodes: who is connected, where they are, what they serve, how
//! loaded they are, and the routing index over them.
//!
//! One mutex guards the maps and the router index together so a route never sees a node that is
//! half inserted; every operation under it is O(1) or a bounded index search (no I/O, no await).

use crate::clock::SharedClock;
use crate::node_link::NodeLink;
use crate::outliers::{OutlierRules, OutlierView, Outliers};
use crate::recent_models::RecentModels;
use crate::router::{
    Deny, LatLon, NodeId, NodeRouteInfo, NodeState as RouteState, RouteOutcome, RouteParams,
    RouterError, RouterIndex, Workload,
};
use crate::slot_queue::SlotQueue;
use crate::store::KycStatus;
use nearpath_geo::{ClassId, Location};
use nearpath_protocol::message::{Capacity, Gpu, Inventory, NodeEncoder, VideoCodec, Workloads};
use nearpath_protocol::ModelCaps;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// What a node reported in its `Inventory`, checked against its registration
/// (`control::inventory::sanitise`): the gateway checker's input. Self-reported, never a root of
/// trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInventory {
    /// The entries that match the registration: GPU indexes below `gpus.len()` (one identity
    /// each), models among `workloads.models` (one size each).
    pub inventory: Inventory,
    /// When it arrived (unix ms).
    pub received_at_ms: u64,
    /// Non-empty UUIDs reported for more than one of the node's GPUs (sorted).
    pub duplicate_uuids: Vec<String>,
    /// Why entries were dropped (the first few).
    pub dropped: Vec<String>,
    /// How many entries were dropped in all.
    pub dropped_count: u32,
}

impl NodeInventory {
    /// The admin view's `hardware` object.
    pub fn view(&self) -> serde_json::Value {
        let inv = &self.inventory;
        serde_json::json!({
            "gpus": inv.gpus.iter().map(|g| serde_json::json!({
                "index": g.index,
                "uuid": g.uuid,
                "pci_device_id": g.pci_device_id,
                "driver_version": g.driver_version,
            })).collect::<Vec<_>>(),
            "encoder": inv.encoder,
            "models": inv.models.iter().map(|m| serde_json::json!({
                "name": m.name,
                "weights_bytes": m.weights_bytes,
                "source": m.source.as_str(),
            })).collect::<Vec<_>>(),
            "received_at_ms": self.received_at_ms,
            "duplicate_uuids": self.duplicate_uuids,
            "dropped": self.dropped,
            "dropped_count": self.dropped_count,
        })
    }
}

/// Lifecycle of a registered node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Active,
    /// Finishing its sessions; no new ones are routed to it.
    Draining,
    /// Disconnected or silent; kept only until removed from the registry.
    Gone,
    /// Only reported (metrics, admin view), never stored: an active or draining node whose
    /// heartbeats are late while its connection is alive (`NodeDynamic::slow`).
    Slow,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Gone => "gone",
            NodeState::Slow => "slow",
        }
    }
}

/// Commands the admin API and session code send to a node's control loop.
#[derive(Debug)]
pub enum ControlCmd {
    Drain { deadline_ms: u64 },
    Shutdown { reason: String },
}

/// What changes while a node is registered.
#[derive(Debug, Clone, Serialize)]
pub struct NodeDynamic {
    pub state: NodeState,
    pub load: f32,
    /// Sessions the node says it runs (its last heartbeat).
    pub reported_sessions: u32,
    pub queue_depth: u32,
    pub gpu_util: Option<f32>,
    pub encoder_ms_p50: Option<f32>,
    pub last_heartbeat_ms: u64,
    pub rtt_ms: f64,
    pub heartbeat_misses: u64,
    /// Heartbeats are late but the connection still delivers datagrams (see `liveness`): the
    /// node keeps its sessions and gets no new ones until a heartbeat arrives.
    pub slow: bool,
    pub recent_penalties: u32,
    pub operator_flagged: bool,
}

impl NodeDynamic {
    /// A node just admitted at `now_ms`: active, idle, heard from now.
    pub fn admitted(now_ms: u64, rtt_ms: f64, recent_penalties: u32) -> NodeDynamic {
        NodeDynamic {
            state: NodeState::Active,
            load: 0.0,
            reported_sessions: 0,
            queue_depth: 0,
            gpu_util: None,
            encoder_ms_p50: None,
            last_heartbeat_ms: now_ms,
            rtt_ms,
            heartbeat_misses: 0,
            slow: false,
            recent_penalties,
            operator_flagged: false,
        }
    }

    /// The state metrics and the admin view show: `slow` for a live node that is slow.
    pub fn reported_state(&self) -> NodeState {
        if self.slow && self.state != NodeState::Gone {
            NodeState::Slow
        } else {
            self.state
        }
    }
}

/// How long telling a revoked node why may take before its connection is closed regardless: a
/// node that stops reading its control stream must not keep its admission.
pub const REVOKE_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// Why the gateway withdrew a node's admission: a reason code the node is told (in `Shutdown`
/// and as the connection's close reason) and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// `token_revoked`, `operator_suspended` or `operator_unverified`.
    pub code: &'static str,
    pub detail: String,
}

impl Revocation {
    /// The revocation of a node admitted under an operator whose KYC status is now `status`;
    /// none while the operator is verified.
    pub fn of_operator(operator_id: &str, status: KycStatus) -> Option<Revocation> {
        let code = match status {
            KycStatus::Verified => return None,
            KycStatus::Suspended => "operator_suspended",
            KycStatus::Pending => "operator_unverified",
        };
        Some(Revocation {
            code,
            detail: format!("operator {operator_id} is {}", status.as_str()),
        })
    }

    /// The revocation of a node whose enrolment token was revoked.
    pub fn token_revoked(detail: String) -> Revocation {
        Revocation {
            code: "token_revoked",
            detail,
        }
    }
}

/// Which capacity pool a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotKind {
    Game,
    Inference,
}

/// Where a node's connection comes from: it changes when the node migrates its QUIC connection
/// (and the new address passed the onboarding geofence).
#[derive(Debug, Clone, Copy)]
pub struct NodePath {
    pub addr: SocketAddr,
    pub location: Location,
}

/// A registered node. Immutable facts plus interior-mutable counters.
pub struct NodeEntry {
    pub key: NodeId,
    pub id: String,
    pub operator_id: String,
    path: Mutex<NodePath>,
    /// The GPUs as reported, with `class` replaced by the class the gateway derived from the
    /// model name (the node's own class string is kept in `gpu_class_hints`).
    pub gpus: Vec<Gpu>,
    /// The class each GPU's node claimed (a hint only; same order as `gpus`).
    pub gpu_class_hints: Vec<String>,
    /// Every GPU class the geofence checks for the node; all of them must be allowed. An
    /// unclassified GPU contributes every class the geofence names.
    pub classes: Vec<(String, ClassId)>,
    pub workloads: Workloads,
    /// The video encoders the node registered, one per codec (the first of each codec kept);
    /// set with [`NodeEntry::set_encoders`]. Empty: the node encodes H.264 only.
    pub encoders: Vec<NodeEncoder>,
    pub capacity: Capacity,
    pub software_version: String,
    pub registered_at_ms: u64,
    /// The handle sessions reach the node through (its connection).
    pub conn: NodeLink,
    pub commands: mpsc::Sender<ControlCmd>,
    /// Cancelled to disconnect the node (credentials revoked, replaced by a newer connection).
    pub kick: CancellationToken,
    /// Id (never the secret) of the enrolment token the node was admitted with: revoking that
    /// token disconnects the node.
    pub enrolment_token_id: String,
    /// Set, once, when the node's credentials were withdrawn; the control loop tells the node.
    revoked: OnceLock<Revocation>,
    /// The node's `Inventory`, set once by the control loop when it arrives (a node that sends
    /// none, or an old node, leaves it empty: unreported).
    pub inventory: OnceLock<NodeInventory>,
    pub dynamic: Mutex<NodeDynamic>,
    /// What the checker (`checker/`) decided about the node; set only by its driver.
    check: Mutex<NodeCheck>,
    games_in_use: AtomicU32,
    inference_in_use: AtomicU32,
    /// Slots released after the node's connection had closed: sessions that ended because the
    /// node left (their tasks may see the dead connection before the control loop does).
    sessions_cut: AtomicU32,
    /// Video the node has encoded in hardware for its game sessions: frames, and pixels at
    /// the size in force of each frame's session (counted by the game relay as frames arrive
    /// from the serving node, dropped or not). The checker turns them into the node's encode
    /// throughput, which the claimed GPUs' NVENC engines bound.
    pub hw_encoded_frames: AtomicU64,
    pub hw_encoded_pixels: AtomicU64,
}

/// Whether an encoder implementation (`h264_nvenc`, `vaapi`, `openh264`, ...) is a hardware
/// encoder (issue 15): NVENC, VA-API, Quick Sync, AMF, VideoToolbox and V4L2 M2M are; x264,
/// openh264, x265, libaom and anything unknown are not (a software encoder proves nothing
/// about the GPU).
pub fn is_hardware_encoder(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["nvenc", "vaapi", "qsv", "amf", "videotoolbox", "v4l2"]
        .iter()
        .any(|h| n.contains(h))
}

impl NodeEntry {
    /// Whether the node encodes `codec` in hardware: the implementation it registered for the
    /// codec, or (a node that listed no encoders encodes H.264) the encoder of its inventory.
    pub fn encodes_in_hardware(&self, codec: VideoCodec) -> bool {
        match self.encoders.iter().find(|e| e.codec == codec) {
            Some(e) => is_hardware_encoder(&e.implementation),
            None if self.encoders.is_empty() && codec == VideoCodec::H264 => self
                .inventory
                .get()
                .is_some_and(|i| is_hardware_encoder(&i.inventory.encoder)),
            None => false,
        }
    }

    /// Whether the node offers any hardware encoder (registered, or in its inventory).
    pub fn has_hardware_encoder(&self) -> bool {
        self.encoders
            .iter()
            .any(|e| is_hardware_encoder(&e.implementation))
            || self
                .inventory
                .get()
                .is_some_and(|i| is_hardware_encoder(&i.inventory.encoder))
    }

    /// What the node declares `model` can do, or `None` when it does not serve the model.
    pub fn model_caps(&self, model: &str) -> Option<ModelCaps> {
        let i = self.workloads.models.iter().position(|m| m == model)?;
        Some(self.workloads.caps_of(i))
    }

    /// Records the encoders a node registered, one per codec (a repeated codec keeps its first
    /// entry, so a node cannot grow the list past the codecs there are).
    pub fn set_encoders(&mut self, encoders: &[NodeEncoder]) {
        self.encoders.clear();
        for e in encoders {
            if !self.encoders.iter().any(|k| k.codec == e.codec) {
                self.encoders.push(e.clone());
            }
        }
    }

    /// Whether the node encodes `codec` (a node that listed no encoders encodes H.264).
    pub fn encodes(&self, codec: VideoCodec) -> bool {
        if self.encoders.is_empty() {
            return codec == VideoCodec::H264;
        }
        self.encoders.iter().any(|e| e.codec == codec)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        operator_id: String,
        addr: SocketAddr,
        location: Location,
        gpus: Vec<Gpu>,
        classes: Vec<(String, ClassId)>,
        workloads: Workloads,
        capacity: Capacity,
        software_version: String,
        registered_at_ms: u64,
        conn: NodeLink,
        commands: mpsc::Sender<ControlCmd>,
        dynamic: NodeDynamic,
    ) -> Self {
        NodeEntry {
            key: NodeId(0),
            id,
            operator_id,
            path: Mutex::new(NodePath { addr, location }),
            gpus,
            gpu_class_hints: Vec::new(),
            classes,
            workloads,
            encoders: Vec::new(),
            capacity,
            software_version,
            registered_at_ms,
            conn,
            commands,
            kick: CancellationToken::new(),
            enrolment_token_id: String::new(),
            revoked: OnceLock::new(),
            inventory: OnceLock::new(),
            dynamic: Mutex::new(dynamic),
            check: Mutex::new(NodeCheck::default()),
            games_in_use: AtomicU32::new(0),
            inference_in_use: AtomicU32::new(0),
            sessions_cut: AtomicU32::new(0),
            hw_encoded_frames: AtomicU64::new(0),
            hw_encoded_pixels: AtomicU64::new(0),
        }
    }

    /// Withdraws the node's admission: its control loop sends `Shutdown` with the reason and
    /// closes the connection with `CLOSE_REVOKED`. The first revocation's reason is kept.
    pub fn revoke(&self, revocation: Revocation) {
        let _ = self.revoked.set(revocation);
        self.kick.cancel();
    }

    /// Why the node's admission was withdrawn, if it was.
    pub fn revocation(&self) -> Option<&Revocation> {
        self.revoked.get()
    }

    pub fn dynamic(&self) -> MutexGuard<'_, NodeDynamic> {
        self.dynamic.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the checker decided about the node (a copy).
    pub fn check(&self) -> NodeCheck {
        self.check.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What the geofence reads of the checker's state, without cloning the rest:
    /// [`NodeEntry::check`] copies the checker's JSON view too, which cost thousands of
    /// instructions on every candidate of every routed request. The classes are borrowed
    /// unless the checker reclassified the node.
    pub fn gate_state(&self) -> GateState<'_> {
        let c = self.check.lock().unwrap_or_else(|p| p.into_inner());
        GateState {
            quarantine: c.quarantine.clone(),
            controlled_block: c.controlled_block.clone(),
            classes: match &c.reclassified {
                Some(r) => std::borrow::Cow::Owned(r.clone()),
                None => std::borrow::Cow::Borrowed(&self.classes),
            },
        }
    }

    /// The GPU classes the geofence checks for the node now: the checker's reclassification
    /// when it found the claimed classes impossible, else the classes derived at registration.
    pub fn classes_now(&self) -> Vec<(String, ClassId)> {
        let c = self.check.lock().unwrap_or_else(|p| p.into_inner());
        c.reclassified
            .clone()
            .unwrap_or_else(|| self.classes.clone())
    }

    /// The address the node's connection comes from now and GeoIP's location of it.
    pub fn path(&self) -> NodePath {
        *self.path.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node's current address.
    pub fn addr(&self) -> SocketAddr {
        self.path().addr
    }

    /// GeoIP's location of the node's current address (never a claim of the node).
    pub fn location(&self) -> Location {
        self.path().location
    }

    /// Sessions the gateway itself has open on this node.
    pub fn sessions_in_use(&self) -> u32 {
        self.games_in_use.load(Ordering::Relaxed) + self.inference_in_use.load(Ordering::Relaxed)
    }

    /// Sessions whose slots were released after the node's connection had closed.
    pub fn sessions_cut(&self) -> u32 {
        self.sessions_cut.load(Ordering::Relaxed)
    }

    fn pool(&self, kind: SlotKind) -> (&AtomicU32, u32) {
        match kind {
            SlotKind::Game => (&self.games_in_use, self.capacity.game_sessions),
            SlotKind::Inference => (&self.inference_in_use, self.capacity.inference_concurrency),
        }
    }

    fn route_info(&self) -> NodeRouteInfo {
        NodeRouteInfo {
            location: self
                .location()
                .coords
                .and_then(|c| LatLon::new(c.lat, c.lon).ok()),
            games: self.workloads.games.clone(),
            models: self.workloads.models.clone(),
            state: self.route_state(),
        }
    }

    fn route_state(&self) -> RouteState {
        let d = self.dynamic();
        RouteState {
            game_slots_free: self
                .capacity
                .game_sessions
                .saturating_sub(self.games_in_use.load(Ordering::Relaxed)),
            inference_free: self
                .capacity
                .inference_concurrency
                .saturating_sub(self.inference_in_use.load(Ordering::Relaxed)),
            load: d.load,
            // A slow node gets no new sessions: its control messages are late, so a session
            // opened now would start late, and more video would only load its congested path.
            draining: d.state != NodeState::Active || d.slow,
            gateway_rtt_ms: d.rtt_ms,
            penalty_events_recent: d.recent_penalties,
            operator_flagged: d.operator_flagged,
            check_penalty_ms: self
                .check
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .penalty_ms,
        }
    }

    /// A JSON view for the admin API.
    pub fn view(&self) -> serde_json::Value {
        let d = self.dynamic().clone();
        serde_json::json!({
            "id": self.id,
            "operator_id": self.operator_id,
            "address": self.addr().to_string(),
            "location": self.location(),
            "gpus": self.gpus.iter().enumerate().map(|(i, g)| serde_json::json!({"model": g.model, "class": g.class, "class_hint": self.gpu_class_hints.get(i), "vram_mib": g.vram_mib})).collect::<Vec<_>>(),
            "classes": self.classes_now().iter().map(|c| c.0.clone()).collect::<std::collections::BTreeSet<_>>(),
            "claimed_classes": self.classes.iter().map(|c| c.0.as_str()).collect::<std::collections::BTreeSet<_>>(),
            "verification": self.check().view,
            "workloads": {"games": self.workloads.games, "models": self.workloads.models,
                "model_capabilities": (0..self.workloads.models.len()).map(|i| self.workloads.caps_of(i).names()).collect::<Vec<_>>()},
            // What `encodes` decides by: an empty list from a games node means H.264 only.
            "encoders": self.encoders.iter().map(|e| serde_json::json!({"codec": e.codec.as_str(), "implementation": e.implementation})).collect::<Vec<_>>(),
            "capacity": {"game_sessions": self.capacity.game_sessions, "inference_concurrency": self.capacity.inference_concurrency},
            "in_use": {"game_sessions": self.games_in_use.load(Ordering::Relaxed), "inference": self.inference_in_use.load(Ordering::Relaxed)},
            "software_version": self.software_version,
            "registered_at_ms": self.registered_at_ms,
            "state": d.reported_state(),
            "slow": d.slow,
            "load": d.load,
            "reported_sessions": d.reported_sessions,
            "queue_depth": d.queue_depth,
            "gpu_util": d.gpu_util,
            "encoder_ms_p50": d.encoder_ms_p50,
            "last_heartbeat_ms": d.last_heartbeat_ms,
            "rtt_ms": d.rtt_ms,
            "heartbeat_misses": d.heartbeat_misses,
            "recent_penalties": d.recent_penalties,
            "hardware": self.inventory.get().map(NodeInventory::view),
        })
    }

    /// Slots of `kind` the gateway has in use on this node (what the node directory publishes
    /// as capacity minus free).
    pub fn in_use(&self, kind: SlotKind) -> u32 {
        self.pool(kind).0.load(Ordering::Relaxed)
    }
}

/// The checker's verdicts the geofence applies to a node ([`NodeEntry::gate_state`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GateState<'a> {
    /// Why the node may serve nothing now (quarantined), if so.
    pub quarantine: Option<String>,
    /// Why the node may not serve controlled GPU classes now, if it may not.
    pub controlled_block: Option<String>,
    /// The classes the geofence checks: the checker's reclassification, else the claimed ones.
    pub classes: std::borrow::Cow<'a, [(String, ClassId)]>,
}

/// What the checker decided about a node, as the rest of the gateway uses it (the checker's
/// own types live above the registry; this is their effect).
#[derive(Debug, Clone)]
pub struct NodeCheck {
    /// The verification state's name (`unverified`, `verified`, `mislocated`,
    /// `impossible_claim`, `quarantined`).
    pub state: &'static str,
    /// At least one check has completed.
    pub checked: bool,
    /// The classes the checker found the node to be, replacing the claimed ones for the
    /// geofence (an impossible claim).
    pub reclassified: Option<Vec<(String, ClassId)>>,
    /// Why the node may not serve controlled GPU classes now, if it may not.
    pub controlled_block: Option<String>,
    /// Why the node may serve nothing now (quarantined), if so.
    pub quarantine: Option<String>,
    /// Added to the node's routing score, in milliseconds.
    pub penalty_ms: f64,
    /// The checker's verification as JSON, for `GET /admin/nodes/{id}` (`verification`).
    pub view: serde_json::Value,
}

impl Default for NodeCheck {
    fn default() -> Self {
        NodeCheck {
            state: "unverified",
            checked: false,
            reclassified: None,
            controlled_block: None,
            quarantine: None,
            penalty_ms: 0.0,
            // Nothing bars the node until the checker says so (it is off, or has not seen the
            // node yet): the view shows the gate the gateway applies.
            view: serde_json::json!({"state": "unverified", "reasons": [], "checks": 0,
                "controlled_eligible": true,
                "controlled_gate": {"eligible": true, "blocked_by": null,
                    "note": "no verdict from the checker (off, or not run yet)"}}),
        }
    }
}

/// Why a registration could not be inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertError {
    /// A node with this id is connected under another operator.
    Duplicate { existing_operator: String },
    /// A node with this id (same operator) is connected and live ([`holds_id`]): a second
    /// instance running with the same id, or a restart before the old connection went quiet.
    Live {
        /// Since the live connection was last heard from (registration or heartbeat), in ms.
        last_heard_ms_ago: u64,
    },
}

/// Whether a registered node still holds its id against a new registration of the same id:
/// its connection is open and it was heard from (registered or heartbeat) less than
/// `stale_after_ms` before `now_ms`. A live holder is never displaced (the newcomer is refused
/// with `Duplicate`); a silent one is taken over once by the newcomer (a restarted node whose old
/// connection the gateway has not yet declared gone). Kept in one place so the liveness rule
/// can change here alone.
pub fn holds_id(old: &NodeEntry, now_ms: u64, stale_after_ms: u64) -> bool {
    let d = old.dynamic();
    // A slow node's heartbeats are late but its connection still delivers: it is alive, and
    // a second registration of its id is another instance, not its restart.
    if d.slow && d.state != NodeState::Gone && old.conn.close_reason().is_none() {
        return true;
    }
    id_held(
        old.conn.close_reason().is_some() || d.state == NodeState::Gone,
        d.last_heartbeat_ms,
        now_ms,
        stale_after_ms,
    )
}

/// [`holds_id`] on plain values.
pub fn id_held(closed: bool, last_heard_ms: u64, now_ms: u64, stale_after_ms: u64) -> bool {
    !closed && now_ms.saturating_sub(last_heard_ms) < stale_after_ms
}

/// Where a model name stands for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelAvailability {
    /// Some registered node serves it.
    Served,
    /// No node serves it now, but one did until `since_ms` (within `inference.model_grace_s`).
    Gone { since_ms: u64 },
    /// No node served it within the window (or ever).
    Unknown,
}

struct Inner {
    by_id: HashMap<String, Arc<NodeEntry>>,
    by_key: HashMap<NodeId, Arc<NodeEntry>>,
    router: RouterIndex,
    next_key: u64,
    /// Models whose last node left recently.
    recent: RecentModels,
}

/// The live-node registry.
pub struct Registry {
    inner: Mutex<Inner>,
    /// Bumped when a node may have become eligible for a session it was not before (it
    /// registered, freed a slot, stopped being slow), so that paused sessions wait on it
    /// instead of polling.
    changed: tokio::sync::watch::Sender<u64>,
    /// `inference.model_grace_s` in ms: how long a model is remembered after its last node left.
    model_grace_ms: AtomicU64,
    /// Bumped whenever a node registers, so that requests waiting for a node wake up.
    joined: watch::Sender<u64>,
    /// When a node left, for the models it served.
    clock: SharedClock,
    /// Inference requests waiting for a slot: woken here as slots free.
    queue: Arc<SlotQueue>,
    /// Nodes failing inference requests, and which are ejected from routing.
    outliers: Mutex<Outliers>,
    /// Where the checker's driver hears of nodes joining and leaving, of their inventories
    /// and of what real sessions delivered (none when the checker is off).
    check_events: OnceLock<mpsc::Sender<CheckEvent>>,
}

/// What the checker's driver is told by the registry and the session front ends. Sent with
/// `try_send`: a full queue drops the event (samples are advisory; a lost join is recovered by
/// the driver's periodic sweep of the registry), so no session ever waits on the checker.
#[derive(Clone)]
pub enum CheckEvent {
    /// A node registered (inserted in the registry).
    Joined(Arc<NodeEntry>),
    /// A node left the registry.
    Left(Arc<NodeEntry>),
    /// A node reported its hardware inventory.
    Inventory(Arc<NodeEntry>),
    /// A real inference session on the node finished: its single-stream decode rate.
    Decode {
        node: Arc<NodeEntry>,
        model: String,
        tokens_per_s: f64,
        ttft_ms: f64,
    },
}

/// A reserved session slot on a node; released (and the router told) on drop.
pub struct SlotGuard {
    registry: Arc<Registry>,
    pub node: Arc<NodeEntry>,
    kind: SlotKind,
    /// Whether releasing the slot wakes a queued inference request (see
    /// [`SlotGuard::release_quietly`]).
    wake: bool,
}

impl SlotGuard {
    /// The node refused the work as busy: the slot is released without waking a queued
    /// request, which would only be refused the same way (and, woken by its own refusal, a
    /// request would spin against the node).
    pub fn release_quietly(mut self) {
        self.wake = false;
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.node.conn.close_reason().is_some() {
            self.node.sessions_cut.fetch_add(1, Ordering::Relaxed);
        }
        let (counter, _) = self.node.pool(self.kind);
        counter.fetch_sub(1, Ordering::AcqRel);
        self.registry.refresh(&self.node);
        if self.kind == SlotKind::Inference && self.wake {
            // Exactly one queued request may take the slot.
            self.registry.queue.wake(&self.node.workloads.models, 1);
        }
        self.registry.notify_changed();
    }
}

impl Registry {
    pub fn new(params: RouteParams) -> Result<Registry, RouterError> {
        Ok(Registry {
            inner: Mutex::new(Inner {
                by_id: HashMap::new(),
                by_key: HashMap::new(),
                router: RouterIndex::new(params)?,
                next_key: 0,
                recent: RecentModels::default(),
            }),
            changed: tokio::sync::watch::channel(0).0,
            model_grace_ms: AtomicU64::new(600_000),
            joined: watch::Sender::new(0),
            clock: crate::clock::system(),
            queue: Arc::new(SlotQueue::new()),
            outliers: Mutex::new(Outliers::new(
                OutlierRules::default(),
                std::time::Instant::now(),
            )),
            check_events: OnceLock::new(),
        })
    }

    /// Sends the checker's events to `tx` from now on (set once, at assembly).
    pub fn set_check_events(&self, tx: mpsc::Sender<CheckEvent>) {
        let _ = self.check_events.set(tx);
    }

    /// Tells the checker, if there is one; never waits (see [`CheckEvent`]).
    pub fn check_event(&self, ev: CheckEvent) {
        if let Some(tx) = self.check_events.get() {
            let _ = tx.try_send(ev);
        }
    }

    /// Reads time from `clock` (the gateway's one clock; a virtual one in tests).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the outlier detection rules (`[inference.outlier]`).
    pub fn with_outlier_rules(self, rules: OutlierRules) -> Self {
        *self.outliers.lock().unwrap_or_else(|p| p.into_inner()) =
            Outliers::new(rules, self.clock.now());
        self
    }

    fn outliers(&self) -> MutexGuard<'_, Outliers> {
        self.outliers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records how an inference request ended on `node` (`ok`: served; otherwise a failure of
    /// the node). Returns the end of the node's ejection if this ejected it.
    pub fn record_inference_result(
        &self,
        node: &NodeEntry,
        ok: bool,
    ) -> Option<std::time::Instant> {
        // The nodes serving each of its models, for the cap on ejected shares.
        let peer_sets: Vec<Vec<String>> = if ok {
            Vec::new()
        } else {
            let inner = self.lock();
            node.workloads
                .models
                .iter()
                .map(|m| {
                    inner
                        .by_id
                        .values()
                        .filter(|e| e.workloads.models.contains(m))
                        .map(|e| e.id.clone())
                        .collect()
                })
                .collect()
        };
        let now = self.clock.now();
        let mut o = self.outliers();
        o.prune(now);
        o.handle_result(now, &node.id, ok, &peer_sets)
    }

    /// Whether the node with id `node` is ejected from inference routing now.
    pub fn is_ejected(&self, node: &str) -> bool {
        self.outliers().is_ejected(self.clock.now(), node)
    }

    /// The node's ejection state: when its ejection ends (unix ms), if it is ejected, and how
    /// many times it was ejected.
    pub fn outlier_view(&self, node: &str) -> (Option<u64>, u32) {
        let now = self.clock.now();
        let OutlierView {
            ejected_until,
            ejections,
        } = self.outliers().view(node);
        let until_ms = ejected_until
            .filter(|t| *t > now)
            .map(|t| self.clock.unix_ms() + (t - now).as_millis() as u64);
        (until_ms, ejections)
    }

    /// The admin view of a node ([`NodeEntry::view`]) with its outlier state:
    /// `ejected_until_ms` (unix ms, null unless ejected now) and `ejections`.
    pub fn node_view(&self, node: &NodeEntry) -> serde_json::Value {
        let mut v = node.view();
        let (until_ms, ejections) = self.outlier_view(&node.id);
        if let Some(o) = v.as_object_mut() {
            o.insert("ejected_until_ms".into(), until_ms.into());
            o.insert("ejections".into(), ejections.into());
        }
        v
    }

    /// Whether some registered node serves `model` and is not ejected.
    pub fn serves_unejected(&self, model: &str) -> bool {
        let serving: Vec<String> = self
            .lock()
            .by_id
            .values()
            .filter(|e| e.workloads.models.iter().any(|m| m == model))
            .map(|e| e.id.clone())
            .collect();
        let now = self.clock.now();
        let o = self.outliers();
        serving.iter().any(|id| !o.is_ejected(now, id))
    }

    /// Nodes ejected from inference routing now.
    pub fn ejected_count(&self) -> usize {
        self.outliers().ejected_count(self.clock.now())
    }

    /// Sets how long a model is remembered after its last node left (`inference.model_grace_s`).
    pub fn with_model_grace(self, grace: std::time::Duration) -> Self {
        self.model_grace_ms
            .store(grace.as_millis() as u64, Ordering::Relaxed);
        self
    }

    fn model_grace_ms(&self) -> u64 {
        self.model_grace_ms.load(Ordering::Relaxed)
    }

    /// A receiver that changes whenever a node registers (it never says which).
    pub fn joins(&self) -> watch::Receiver<u64> {
        self.joined.subscribe()
    }

    /// Whether `model` is served now, was served within the grace window, or is unknown.
    pub fn model_availability(&self, model: &str, now_ms: u64) -> ModelAvailability {
        let inner = self.lock();
        if inner.router.serves(Workload::Model(model)) {
            return ModelAvailability::Served;
        }
        match inner
            .recent
            .gone_since(model, now_ms, self.model_grace_ms())
        {
            Some(since_ms) => ModelAvailability::Gone { since_ms },
            None => ModelAvailability::Unknown,
        }
    }

    /// Models no node serves now that one served within the grace window, sorted.
    pub fn recently_served_models(&self, now_ms: u64) -> Vec<String> {
        self.lock().recent.names(now_ms, self.model_grace_ms())
    }

    /// Forgets `entry`'s models as served by it, remembering those no other node serves.
    fn note_left(&self, inner: &mut Inner, entry: &NodeEntry, now_ms: u64) {
        let Inner { router, recent, .. } = inner;
        recent.node_left(
            &entry.workloads.models,
            |m| router.serves(Workload::Model(m)),
            now_ms,
            self.model_grace_ms(),
        );
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a freshly registered node. Another operator's node with the same id is refused;
    /// so is the same operator's while it is live ([`holds_id`] with `stale_after_ms`, checked
    /// at the entry's `registered_at_ms`). A silent one is replaced (returned so the caller can
    /// disconnect it): one takeover, after which the newcomer is the live holder.
    pub fn insert(
        &self,
        mut entry: NodeEntry,
        stale_after_ms: u64,
    ) -> Result<(Arc<NodeEntry>, Option<Arc<NodeEntry>>), InsertError> {
        let mut inner = self.lock();
        let now_ms = entry.registered_at_ms;
        let replaced = match inner.by_id.get(&entry.id) {
            Some(old) if old.operator_id != entry.operator_id => {
                return Err(InsertError::Duplicate {
                    existing_operator: old.operator_id.clone(),
                })
            }
            Some(old) if holds_id(old, now_ms, stale_after_ms) => {
                return Err(InsertError::Live {
                    last_heard_ms_ago: now_ms.saturating_sub(old.dynamic().last_heartbeat_ms),
                })
            }
            Some(old) => Some(old.clone()),
            None => None,
        };
        if let Some(old) = &replaced {
            inner.by_key.remove(&old.key);
            inner.router.remove(old.key);
        }
        inner.next_key += 1;
        entry.key = NodeId(inner.next_key);
        let entry = Arc::new(entry);
        inner.by_id.insert(entry.id.clone(), entry.clone());
        inner.by_key.insert(entry.key, entry.clone());
        let info = entry.route_info();
        inner.router.upsert(entry.key, info);
        inner.recent.node_joined(&entry.workloads.models);
        if let Some(old) = &replaced {
            self.note_left(&mut inner, old, now_ms);
        }
        drop(inner);
        self.joined.send_modify(|n| *n = n.wrapping_add(1));
        self.wake_queued(&entry);
        self.notify_changed();
        if let Some(old) = &replaced {
            self.check_event(CheckEvent::Left(old.clone()));
        }
        self.check_event(CheckEvent::Joined(entry.clone()));
        Ok((entry, replaced))
    }

    /// The wait queues of inference requests that found no free slot.
    pub fn slot_queue(&self) -> &Arc<SlotQueue> {
        &self.queue
    }

    /// `entry` may take new inference requests (it registered, or came back from being slow):
    /// as many queued requests as it has free slots are woken.
    pub fn wake_queued(&self, entry: &NodeEntry) {
        let (counter, cap) = entry.pool(SlotKind::Inference);
        let free = cap.saturating_sub(counter.load(Ordering::Acquire));
        self.queue.wake(&entry.workloads.models, free);
    }

    /// Tells the sessions waiting for a node (see [`Registry::subscribe`]) to look again.
    pub fn notify_changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Follows changes that may make a node newly eligible: registrations, freed slots, slow
    /// nodes recovering.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Removes the node if `entry` is still the registered one (a replaced entry's late removal
    /// must not remove its successor).
    pub fn remove(&self, entry: &NodeEntry) {
        let mut inner = self.lock();
        if let Some(removed) = inner.by_key.remove(&entry.key) {
            inner.router.remove(entry.key);
            if inner.by_id.get(&entry.id).map(|e| e.key) == Some(entry.key) {
                inner.by_id.remove(&entry.id);
            }
            self.note_left(&mut inner, entry, self.clock.unix_ms());
            drop(inner);
            self.check_event(CheckEvent::Left(removed));
        }
    }

    /// Moves a node to a new address and location (after its connection migrated and the new
    /// location passed the onboarding geofence), re-indexing it for routing.
    pub fn relocate(&self, entry: &NodeEntry, path: NodePath) {
        *entry.path.lock().unwrap_or_else(|p| p.into_inner()) = path;
        let mut inner = self.lock();
        if inner.by_key.contains_key(&entry.key) {
            let info = entry.route_info();
            inner.router.upsert(entry.key, info);
        }
    }

    /// Sets what the checker decided about a node and re-reads it into the router index.
    pub fn set_check(&self, entry: &NodeEntry, check: NodeCheck) {
        *entry.check.lock().unwrap_or_else(|p| p.into_inner()) = check;
        self.refresh(entry);
        self.notify_changed();
    }

    /// Re-reads a node's dynamic state into the router index (cheap: no re-indexing).
    pub fn refresh(&self, entry: &NodeEntry) {
        let state = entry.route_state();
        let mut inner = self.lock();
        if inner.by_key.contains_key(&entry.key) {
            let _ = inner.router.update(entry.key, |s| *s = state);
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<NodeEntry>> {
        self.lock().by_id.get(id).cloned()
    }

    pub fn by_key(&self, key: NodeId) -> Option<Arc<NodeEntry>> {
        self.lock().by_key.get(&key).cloned()
    }

    pub fn list(&self) -> Vec<Arc<NodeEntry>> {
        let mut v: Vec<_> = self.lock().by_id.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Nodes of one operator (for suspension).
    pub fn of_operator(&self, operator_id: &str) -> Vec<Arc<NodeEntry>> {
        self.lock()
            .by_id
            .values()
            .filter(|e| e.operator_id == operator_id)
            .cloned()
            .collect()
    }

    /// Nodes admitted with one enrolment token (for token revocation).
    pub fn of_enrolment_token(&self, token_id: &str) -> Vec<Arc<NodeEntry>> {
        self.lock()
            .by_id
            .values()
            .filter(|e| e.enrolment_token_id == token_id)
            .cloned()
            .collect()
    }

    /// Ranks candidates for a workload; `allow` is the geofence check per node.
    pub fn route<F>(
        &self,
        client: Option<LatLon>,
        workload: Workload<'_>,
        mut allow: F,
    ) -> (RouteOutcome, Vec<Arc<NodeEntry>>)
    where
        F: FnMut(&NodeEntry) -> Result<(), Deny>,
    {
        let inner = self.lock();
        let by_key = &inner.by_key;
        let outcome = inner
            .router
            .route(client, workload, |key| match by_key.get(&key) {
                Some(e) => allow(e),
                None => Err(Deny {
                    rule: "registry".into(),
                    reason: "node left".into(),
                }),
            });
        let nodes = outcome
            .candidates
            .iter()
            .filter_map(|c| by_key.get(&c.node).cloned())
            .collect();
        (outcome, nodes)
    }

    /// How many candidates a route returns at most (`routing.max_candidates`).
    pub fn max_candidates(&self) -> usize {
        self.lock().router.params().max_candidates
    }

    /// Reserves a slot of `kind` on `node` if it has one free.
    pub fn acquire(self: &Arc<Self>, node: &Arc<NodeEntry>, kind: SlotKind) -> Option<SlotGuard> {
        let (counter, cap) = node.pool(kind);
        let mut cur = counter.load(Ordering::Acquire);
        loop {
            if cur >= cap {
                return None;
            }
            match counter.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(c) => cur = c,
            }
        }
        self.refresh(node);
        Some(SlotGuard {
            registry: self.clone(),
            node: node.clone(),
            kind,
            wake: true,
        })
    }

    /// Withdraws the admission of `nodes` (token revoked, operator suspended): each node's
    /// session sends `Shutdown{reason}` and closes its connection with `CLOSE_REVOKED`, which
    /// ends its sessions. A node that does not take the `Shutdown` within [`REVOKE_GRACE`] is
    /// closed all the same.
    pub fn revoke(&self, nodes: Vec<Arc<NodeEntry>>, revocation: Revocation) {
        for node in nodes {
            tracing::warn!(node = %node.id, operator = %node.operator_id, code = revocation.code, "disconnecting node: {}", revocation.detail);
            node.revoke(revocation.clone());
            tokio::spawn(async move {
                if tokio::time::timeout(REVOKE_GRACE * 2, node.conn.closed())
                    .await
                    .is_err()
                {
                    if let Some(r) = node.revocation() {
                        node.conn.close(
                            nearpath_protocol::app_code::CLOSE_REVOKED,
                            r.code.as_bytes(),
                        );
                    }
                }
            });
        }
    }

    /// The union of what the registered nodes serving `model` declare it can do, or `None` when
    /// no node serves it. A scan of the nodes: called only for requests that need a capability.
    pub fn model_caps(&self, model: &str) -> Option<ModelCaps> {
        self.lock()
            .by_id
            .values()
            .filter_map(|e| e.model_caps(model))
            .reduce(ModelCaps::with)
    }

    /// [`Registry::model_caps`] of every served model, in one pass (for `/v1/models`).
    pub fn all_model_caps(&self) -> HashMap<String, ModelCaps> {
        let mut out: HashMap<String, ModelCaps> = HashMap::new();
        for e in self.lock().by_id.values() {
            for (i, m) in e.workloads.models.iter().enumerate() {
                let caps = e.workloads.caps_of(i);
                out.entry(m.clone())
                    .and_modify(|c| *c = c.with(caps))
                    .or_insert(caps);
            }
        }
        out
    }

    /// Whether some registered node serves model `name`.
    pub fn serves_model(&self, name: &str) -> bool {
        self.lock().router.serves(Workload::Model(name))
    }

    /// Counts of live nodes by (state, country, first class), for metrics.
    pub fn census(&self) -> HashMap<(NodeState, String, String), u64> {
        let mut m = HashMap::new();
        for e in self.lock().by_id.values() {
            let state = e.dynamic().reported_state();
            let country = e
                .location()
                .country
                .map(|c| c.as_str().to_string())
                .unwrap_or_else(|| "unknown".into());
            let class = e
                .classes_now()
                .first()
                .map(|c| c.0.clone())
                .unwrap_or_default();
            *m.entry((state, country, class)).or_insert(0) += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use std::time::Duration;

    const STALE_MS: u64 = 1_000;

    fn registry(clock: &Arc<ManualClock>) -> Arc<Registry> {
        Arc::new(
            Registry::new(RouteParams::default())
                .unwrap()
                .with_model_grace(Duration::from_secs(60))
                .with_clock(clock.clone()),
        )
    }

    /// A node of `operator` serving `models`, with one game and two inference slots,
    /// registered (and last heard from) at `at_ms`.
    fn node(id: &str, operator: &str, models: &[&str], at_ms: u64) -> NodeEntry {
        let (tx, _rx) = mpsc::channel(1);
        NodeEntry::new(
            id.into(),
            operator.into(),
            "127.0.0.1:4433".parse().unwrap(),
            Location::default(),
            vec![],
            vec![],
            Workloads {
                games: vec!["tetris".into()],
                models: models.iter().map(|m| m.to_string()).collect(),
                model_caps: Vec::new(),
            },
            Capacity {
                game_sessions: 1,
                inference_concurrency: 2,
            },
            "1.0.0".into(),
            at_ms,
            NodeLink::detached("127.0.0.1:4433".parse().unwrap()),
            tx,
            NodeDynamic::admitted(at_ms, 0.0, 0),
        )
    }

    #[test]
    fn a_node_encodes_what_it_registered_once_per_codec_and_h264_when_silent() {
        let enc = |codec, implementation: &str| NodeEncoder {
            codec,
            implementation: implementation.into(),
        };
        let mut n = node("n", "op", &[], 0);
        // A node that lists nothing (a games node of an older build) encodes H.264.
        assert!(n.encodes(VideoCodec::H264));
        assert!(!n.encodes(VideoCodec::Hevc));
        // Repeats of a codec keep the first entry: the list cannot outgrow the codecs.
        let mut listed = vec![enc(VideoCodec::Hevc, "hevc_nvenc")];
        listed.extend((0..15).map(|i| enc(VideoCodec::Hevc, &format!("fake{i}"))));
        listed.push(enc(VideoCodec::Av1, "av1_nvenc"));
        n.set_encoders(&listed);
        assert_eq!(
            n.encoders,
            vec![
                enc(VideoCodec::Hevc, "hevc_nvenc"),
                enc(VideoCodec::Av1, "av1_nvenc")
            ]
        );
        // A node that lists encoders encodes exactly those: no H.264 here.
        assert!(n.encodes(VideoCodec::Hevc) && n.encodes(VideoCodec::Av1));
        assert!(!n.encodes(VideoCodec::H264));
    }

    #[test]
    fn a_node_id_connected_under_one_operator_is_refused_to_another() {
        let r = registry(&ManualClock::new(0));
        r.insert(node("n1", "op_a", &[], 10_000), STALE_MS).unwrap();
        assert_eq!(
            r.insert(node("n1", "op_b", &[], 99_000), STALE_MS).err(),
            Some(InsertError::Duplicate {
                existing_operator: "op_a".into()
            })
        );
        assert_eq!(r.get("n1").unwrap().operator_id, "op_a");
    }

    #[test]
    fn a_live_holder_keeps_its_id_and_a_silent_one_is_taken_over_once() {
        let r = registry(&ManualClock::new(0));
        let (old, _) = r.insert(node("n1", "op_a", &[], 10_000), STALE_MS).unwrap();
        assert_eq!(
            r.insert(node("n1", "op_a", &[], 10_400), STALE_MS).err(),
            Some(InsertError::Live {
                last_heard_ms_ago: 400
            })
        );
        let (new, replaced) = r.insert(node("n1", "op_a", &[], 11_000), STALE_MS).unwrap();
        assert_eq!(replaced.map(|e| e.key), Some(old.key));
        assert_eq!(r.get("n1").unwrap().key, new.key);
        assert!(r.by_key(old.key).is_none());
        assert_eq!(r.len(), 1);
        // The newcomer is now the live holder: a third registration right after is refused.
        assert!(matches!(
            r.insert(node("n1", "op_a", &[], 11_100), STALE_MS),
            Err(InsertError::Live { .. })
        ));
    }

    #[test]
    fn a_holder_whose_connection_closed_is_taken_over_at_once() {
        let r = registry(&ManualClock::new(0));
        let (old, _) = r.insert(node("n1", "op_a", &[], 10_000), STALE_MS).unwrap();
        old.conn
            .close(nearpath_protocol::app_code::CLOSE_NORMAL, b"gone");
        assert!(!holds_id(&old, 10_001, STALE_MS));
        let (_, replaced) = r.insert(node("n1", "op_a", &[], 10_001), STALE_MS).unwrap();
        assert!(replaced.is_some());
    }

    #[test]
    fn a_slow_holder_with_an_open_connection_keeps_its_id_however_late() {
        let r = registry(&ManualClock::new(0));
        let (old, _) = r.insert(node("n1", "op_a", &[], 10_000), STALE_MS).unwrap();
        old.dynamic().slow = true;
        assert!(holds_id(&old, 60_000, STALE_MS));
        assert!(matches!(
            r.insert(node("n1", "op_a", &[], 60_000), STALE_MS),
            Err(InsertError::Live { .. })
        ));
    }

    #[test]
    fn removing_a_replaced_entry_does_not_remove_its_successor() {
        let r = registry(&ManualClock::new(0));
        let (old, _) = r.insert(node("n1", "op_a", &[], 10_000), STALE_MS).unwrap();
        let (new, _) = r.insert(node("n1", "op_a", &[], 20_000), STALE_MS).unwrap();
        r.remove(&old);
        assert_eq!(r.get("n1").map(|e| e.key), Some(new.key));
        r.remove(&new);
        assert!(r.is_empty());
    }

    #[test]
    fn slots_are_bounded_by_capacity_and_freed_on_drop() {
        let r = registry(&ManualClock::new(0));
        let (n, _) = r.insert(node("n1", "op_a", &[], 0), STALE_MS).unwrap();
        let game = r.acquire(&n, SlotKind::Game).expect("one game slot");
        assert!(
            r.acquire(&n, SlotKind::Game).is_none(),
            "capacity is one game"
        );
        let a = r.acquire(&n, SlotKind::Inference).unwrap();
        let b = r.acquire(&n, SlotKind::Inference).unwrap();
        assert!(r.acquire(&n, SlotKind::Inference).is_none());
        assert_eq!(n.sessions_in_use(), 3);
        drop((game, a));
        assert_eq!(n.sessions_in_use(), 1);
        assert!(r.acquire(&n, SlotKind::Game).is_some());
        drop(b);
        // Slots released while the connection was open are not sessions cut by the node.
        assert_eq!(n.sessions_cut(), 0);
    }

    #[test]
    fn a_slot_released_after_the_connection_closed_counts_as_cut() {
        let r = registry(&ManualClock::new(0));
        let (n, _) = r.insert(node("n1", "op_a", &[], 0), STALE_MS).unwrap();
        let slot = r.acquire(&n, SlotKind::Inference).unwrap();
        n.conn
            .close(nearpath_protocol::app_code::CLOSE_NORMAL, b"died");
        drop(slot);
        assert_eq!((n.sessions_in_use(), n.sessions_cut()), (0, 1));
    }

    #[test]
    fn a_model_whose_last_node_left_is_gone_for_the_grace_then_unknown() {
        let clock = ManualClock::new(1_000_000);
        let r = registry(&clock);
        assert_eq!(
            r.model_availability("m", clock.unix_ms()),
            ModelAvailability::Unknown
        );
        let (a, _) = r.insert(node("a", "op", &["m"], 0), STALE_MS).unwrap();
        let (b, _) = r.insert(node("b", "op", &["m"], 0), STALE_MS).unwrap();
        assert!(r.serves_model("m"));
        r.remove(&a);
        // Another node still serves it.
        assert_eq!(
            r.model_availability("m", clock.unix_ms()),
            ModelAvailability::Served
        );
        clock.advance(Duration::from_secs(5));
        let left = clock.unix_ms();
        r.remove(&b);
        assert_eq!(
            r.model_availability("m", left + 59_000),
            ModelAvailability::Gone { since_ms: left }
        );
        assert_eq!(r.recently_served_models(left + 59_000), ["m"]);
        assert_eq!(
            r.model_availability("m", left + 61_000),
            ModelAvailability::Unknown
        );
        // A node that serves it again makes it served at once.
        r.insert(node("c", "op", &["m"], 0), STALE_MS).unwrap();
        assert_eq!(
            r.model_availability("m", left + 61_000),
            ModelAvailability::Served
        );
    }

    #[test]
    fn nodes_are_found_by_operator_and_by_enrolment_token() {
        let r = registry(&ManualClock::new(0));
        for (id, op, tok) in [
            ("a1", "op_a", "t1"),
            ("a2", "op_a", "t2"),
            ("b1", "op_b", "t1"),
        ] {
            let mut e = node(id, op, &[], 0);
            e.enrolment_token_id = tok.into();
            r.insert(e, STALE_MS).unwrap();
        }
        let ids = |v: Vec<Arc<NodeEntry>>| {
            let mut v: Vec<String> = v.iter().map(|e| e.id.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(ids(r.of_operator("op_a")), ["a1", "a2"]);
        assert_eq!(ids(r.of_operator("op_c")), Vec::<String>::new());
        assert_eq!(ids(r.of_enrolment_token("t1")), ["a1", "b1"]);
    }

    #[tokio::test]
    async fn revoking_withdraws_admission_once_with_the_first_reason() {
        let r = registry(&ManualClock::new(0));
        let (n, _) = r.insert(node("n1", "op_a", &[], 0), STALE_MS).unwrap();
        let first = Revocation {
            code: "token_revoked",
            detail: "t".into(),
        };
        r.revoke(r.of_operator("op_a"), first.clone());
        assert!(n.kick.is_cancelled(), "the node's session is told to leave");
        n.revoke(Revocation {
            code: "operator_suspended",
            detail: "later".into(),
        });
        assert_eq!(n.revocation(), Some(&first));
        // The session closes the connection; the fallback close has nothing left to do.
        n.conn
            .close(nearpath_protocol::app_code::CLOSE_REVOKED, b"token_revoked");
    }

    #[test]
    fn a_verified_operator_keeps_its_nodes_and_any_other_status_revokes_them() {
        assert_eq!(Revocation::of_operator("op", KycStatus::Verified), None);
        let r = Revocation::of_operator("op", KycStatus::Suspended).unwrap();
        assert_eq!(
            (r.code, r.detail.as_str()),
            ("operator_suspended", "operator op is suspended")
        );
        let r = Revocation::of_operator("op", KycStatus::Pending).unwrap();
        assert_eq!(
            (r.code, r.detail.as_str()),
            ("operator_unverified", "operator op is pending")
        );
    }

    #[test]
    fn a_draining_or_slow_node_is_not_routed_new_sessions() {
        let r = registry(&ManualClock::new(0));
        let (n, _) = r.insert(node("n1", "op_a", &["m"], 0), STALE_MS).unwrap();
        let routed = |r: &Registry| !r.route(None, Workload::Model("m"), |_| Ok(())).1.is_empty();
        assert!(routed(&r));
        n.dynamic().slow = true;
        r.refresh(&n);
        assert!(!routed(&r));
        n.dynamic().slow = false;
        n.dynamic().state = NodeState::Draining;
        r.refresh(&n);
        assert!(!routed(&r));
    }

    #[test]
    fn a_live_node_holds_its_id_until_it_is_silent_for_the_takeover_interval() {
        // Heard from at 10 s; takeover after 1 s of silence.
        assert!(id_held(false, 10_000, 10_000, 1_000));
        assert!(id_held(false, 10_000, 10_999, 1_000));
        assert!(!id_held(false, 10_000, 11_000, 1_000));
        // A closed connection holds nothing, however recent.
        assert!(!id_held(true, 10_000, 10_000, 1_000));
        // A clock that went backwards does not make a live node stale.
        assert!(id_held(false, 10_000, 9_000, 1_000));
    }

    #[test]
    fn model_caps_are_the_union_over_the_nodes_serving_the_model() {
        let r = registry(&ManualClock::new(0));
        let with_caps = |id: &str, caps: Vec<ModelCaps>| {
            let mut n = node(id, "op", &["m", "e"], 0);
            n.workloads.model_caps = caps;
            n
        };
        assert_eq!(r.model_caps("m"), None, "nobody serves it");
        r.insert(with_caps("a", vec![ModelCaps::TOOLS]), STALE_MS)
            .unwrap();
        // A node sending fewer caps than models declares nothing for the rest.
        r.insert(
            with_caps("b", vec![ModelCaps::LOGPROBS.with(ModelCaps::TOOLS)]),
            STALE_MS,
        )
        .unwrap();
        let (c, _) = r
            .insert(
                with_caps("c", vec![ModelCaps::NONE, ModelCaps::EMBEDDINGS]),
                STALE_MS,
            )
            .unwrap();
        assert_eq!(c.model_caps("e"), Some(ModelCaps::EMBEDDINGS));
        assert_eq!(c.model_caps("x"), None);
        assert_eq!(
            r.model_caps("m"),
            Some(ModelCaps::TOOLS.with(ModelCaps::LOGPROBS))
        );
        assert_eq!(r.model_caps("e"), Some(ModelCaps::EMBEDDINGS));
        let all = r.all_model_caps();
        assert_eq!(all.get("m"), r.model_caps("m").as_ref());
        assert_eq!(all.get("e"), Some(&ModelCaps::EMBEDDINGS));
        assert_eq!(all.len(), 2);
        // A node sending more caps than models: the extra ones name no model and are ignored.
        let mut d = node("d", "op", &["z"], 0);
        d.workloads.model_caps = vec![ModelCaps::VISION; 1000];
        r.insert(d, STALE_MS).unwrap();
        assert_eq!(r.model_caps("z"), Some(ModelCaps::VISION));
        assert_eq!(r.all_model_caps().len(), 3);
    }

    #[tokio::test]
    async fn a_freed_inference_slot_wakes_one_queued_request_and_a_busy_refusal_none() {
        let clock = ManualClock::new(0);
        let r = registry(&clock);
        let (n, _) = r.insert(node("n1", "op", &["m"], 0), STALE_MS).unwrap();
        let a = r.acquire(&n, SlotKind::Inference).unwrap();
        let b = r.acquire(&n, SlotKind::Inference).unwrap();
        let q = r.slot_queue().clone();
        let w1 = q.enqueue("m", "k1", 10, q.epoch()).unwrap();
        let w2 = q.enqueue("m", "k2", 10, q.epoch()).unwrap();
        // Refused as busy: nobody is woken (they would be refused the same way).
        a.release_quietly();
        assert!(w1.is_queued() && w2.is_queued());
        // A slot freed by a finished request: exactly one waiter.
        drop(b);
        w1.woken().await;
        assert!(!w1.is_queued());
        assert!(w2.is_queued());
        // A game slot is another pool: no inference waiter is woken.
        let g = r.acquire(&n, SlotKind::Game).unwrap();
        drop(g);
        assert!(w2.is_queued());
    }

    #[test]
    fn outcomes_eject_a_failing_node_but_never_the_last_of_a_model() {
        let clock = ManualClock::new(0);
        let r = registry(&clock);
        let (n1, _) = r.insert(node("n1", "op", &["m"], 0), STALE_MS).unwrap();
        for _ in 0..10 {
            assert_eq!(r.record_inference_result(&n1, false), None);
        }
        assert!(!r.is_ejected("n1"));
        let (n2, _) = r.insert(node("n2", "op", &["m"], 0), STALE_MS).unwrap();
        let until = (0..5).find_map(|_| r.record_inference_result(&n2, false));
        assert!(until.is_some());
        assert!(r.is_ejected("n2"));
        assert_eq!(r.ejected_count(), 1);
        let v = r.node_view(&n2);
        assert_eq!(v["ejections"], 1);
        assert!(v["ejected_until_ms"].as_u64().is_some());
        assert_eq!(
            r.node_view(&n1)["ejected_until_ms"],
            serde_json::Value::Null
        );
        assert!(r.serves_unejected("m"));
        assert!(!r.serves_unejected("nothing"));
        // Its ejection ends on the clock.
        clock.advance(Duration::from_secs(30));
        assert!(!r.is_ejected("n2"));
    }
}
