//! Node selection: which edge node should serve a new session, and in which failover order.
//!
//! The router is pure: no I/O, no clocks, no async. The gateway feeds it what it learns from node
//! registrations and heartbeats ([`RouterIndex::upsert`], [`RouterIndex::update`] and the small
//! setters) and asks it for a ranked list of candidates ([`RouterIndex::route`]).
//!
//! # Score
//! Lower is better. For a client at `c` and a node `n`:
//!
//! ```text
//! score = est_client_rtt(c, n)                      great-circle km / km_per_ms * path_stretch
//!       + gateway_rtt_ms(n)                         measured on the node's QUIC connection
//!       + load_penalty_ms * load(n)                 load in 0..=1
//!       + reliability_penalty_ms * penalty_events(n)
//!       + suspended_penalty_ms                      only if the node's operator is flagged
//! ```
//!
//! When the client's location is unknown the first term is 0 for every node, so the ranking is by
//! the node-side terms alone. When the client's location is known but a node's is not, the first
//! term is [`RouteParams::unknown_location_rtt_ms`] (a pessimistic guess, so located nodes win
//! unless they are much worse on the other terms). Ties are broken by lower load, then by lower
//! [`NodeId`], so results are deterministic.
//!
//! # Eligibility
//! A node is a candidate when it is registered (not removed), not draining, serves the workload
//! (game title or model name), has free capacity of that workload's kind (game slots or inference
//! concurrency), and the caller's geofence callback allows it. The geofence is a closure so the
//! router does not depend on policy details; it is called only for nodes that would otherwise enter
//! the current top `max_candidates`, so a route over 10,000 nodes typically calls it a handful of
//! times. When every capacity-eligible node is denied the callback is called for each of them,
//! which is O(nodes): callers should reject clients that are denied everywhere (client-only rules)
//! before routing.
//!
//! # Index
//! Each workload has its own quadtree over latitude/longitude (leaf buckets of up to
//! `LEAF_CAPACITY` nodes, split on overflow, merged back when they empty out). Leaves hold copies
//! of what a route reads (unit vector, cost, load, id), so a route never leaves the tree. Every
//! cell keeps the minimum node-side cost (`gateway_rtt + load + reliability` terms) over its
//! eligible nodes, with ineligible (draining or full) nodes counted as +inf. A route is a
//! best-first search over cells ordered by a lower bound on the score of anything inside: a lower
//! bound on the great-circle distance from the client to the nearest point of the cell (the nearest
//! point is found exactly, across the antimeridian and at the poles; its angle is bounded from below
//! without `acos`), converted to milliseconds, plus the cell's minimum node-side cost. The search
//! stops when `max_candidates` nodes are kept and the next cell's bound exceeds the worst kept
//! score, so the result is the same as an exhaustive scan ([`RouterIndex::route_linear`]) but
//! touches only the nodes near the answer. Load, capacity and drain updates are O(depth + bucket)
//! and never move a node; only a change of location or workloads re-indexes it.
//!
//! The bound ignores the node-side terms' geography: if the gateway RTT grows with a node's
//! distance from the gateway (one gateway for the whole world), the best node for a far client
//! lies along the client-gateway path and the search visits more cells (see `benches/route.rs`).

use nearpath_config::RoutingConfig;
// The mean Earth radius is shared with `nearpath_geo::distance_km`. The router computes the same
// haversine quantity from precomputed unit vectors (`2R·asin(chord/2)` equals haversine exactly in
// real arithmetic; the tests check it against `distance_km`), so that a route needs at most one
// `asin` per examined node instead of five trigonometric calls.
use nearpath_geo::{Coords, EARTH_RADIUS_KM};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

/// A leaf splits into four when it holds more nodes than this (unless it is at `MAX_DEPTH`).
const LEAF_CAPACITY: usize = 16;

/// Depth at which leaves stop splitting: 180° / 2^24 is about 1 m of longitude, so deeper cells
/// would only separate nodes that report the same coordinates (several machines in one site).
const MAX_DEPTH: u8 = 24;

/// An inner cell whose subtree holds this few nodes or fewer is merged back into one leaf, so the
/// tree does not keep empty cells after nodes churn.
const MERGE_AT: u32 = (LEAF_CAPACITY / 2) as u32;

/// Slack subtracted from every cell's distance bound. The bound goes through `cos d` (the
/// spherical law of cosines), whose rounding near 0 is about 0.2 m, while nodes use the chord
/// form; a metre of slack keeps the bound below every node's computed distance despite that.
const BOUND_SLACK_KM: f64 = 1e-3;

/// Upper clamp for a reported gateway RTT; larger or infinite values mean "unreachable-ish" and
/// are clamped so that arithmetic stays finite (infinity is reserved for "not eligible").
const MAX_RTT_MS: f64 = 600_000.0;

const ROOT: u32 = 0;
const UNLOCATED: u32 = 1;
const NO_PARENT: u32 = u32::MAX;

/// A node, as the gateway numbers them. The router does not interpret it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node#{}", self.0)
    }
}

/// A validated position in degrees: latitude in [-90, 90], longitude normalised to [-180, 180).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatLon {
    lat: f64,
    lon: f64,
}

impl LatLon {
    /// Validates and normalises a position. Any finite longitude is accepted (it is wrapped);
    /// latitude must be finite and within [-90, 90].
    pub fn new(lat: f64, lon: f64) -> Result<Self, RouterError> {
        if !lat.is_finite() || !lon.is_finite() || !(-90.0..=90.0).contains(&lat) {
            return Err(RouterError::InvalidCoordinates { lat, lon });
        }
        let lon = (lon + 180.0).rem_euclid(360.0) - 180.0;
        // `rem_euclid` can return exactly 360.0 for tiny negative inputs through rounding.
        let lon = if lon >= 180.0 { lon - 360.0 } else { lon };
        Ok(Self { lat, lon })
    }

    pub fn lat(&self) -> f64 {
        self.lat
    }

    pub fn lon(&self) -> f64 {
        self.lon
    }

    pub fn coords(&self) -> Coords {
        Coords {
            lat: self.lat,
            lon: self.lon,
        }
    }

    fn unit_vector(&self) -> [f64; 3] {
        let (sin_lat, cos_lat) = self.lat.to_radians().sin_cos();
        let (sin_lon, cos_lon) = self.lon.to_radians().sin_cos();
        [cos_lat * cos_lon, cos_lat * sin_lon, sin_lat]
    }
}

impl TryFrom<Coords> for LatLon {
    type Error = RouterError;

    fn try_from(c: Coords) -> Result<Self, RouterError> {
        Self::new(c.lat, c.lon)
    }
}

impl From<LatLon> for Coords {
    fn from(l: LatLon) -> Self {
        l.coords()
    }
}

/// What a session asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Workload<'a> {
    /// A game title; needs a free game slot.
    Game(&'a str),
    /// An inference model name; needs free inference concurrency.
    Model(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Game,
    Model,
}

/// The routing knobs. See the module docs for the formula.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteParams {
    /// Signal speed in fibre, km per ms of RTT (DESIGN.md: ~1 ms RTT per 100 km). Must be > 0.
    pub km_per_ms: f64,
    /// How much longer real paths are than the great circle. Must be > 0.
    pub path_stretch: f64,
    /// Added per unit of load (load is 0..=1). Must be >= 0.
    pub load_penalty_ms: f64,
    /// Added per recent penalty event (disconnects with active sessions). Must be >= 0.
    pub reliability_penalty_ms: f64,
    /// Added when the node's operator is flagged (e.g. suspended pending review). Must be >= 0.
    pub suspended_penalty_ms: f64,
    /// How many candidates `route` returns at most (the first plus the failover order). >= 1.
    pub max_candidates: usize,
    /// Client-RTT estimate for a node whose location is unknown while the client's is known.
    /// Must be >= 0.
    pub unknown_location_rtt_ms: f64,
}

impl Default for RouteParams {
    /// The `[routing]` config defaults.
    fn default() -> Self {
        Self::from(&RoutingConfig::default())
    }
}

/// About the RTT to a random point on Earth (10,000 km at 100 km/ms, stretch 1.5): a node of
/// unknown location is assumed to be as far as a random one.
const DEFAULT_UNKNOWN_LOCATION_RTT_MS: f64 = 150.0;

impl From<&RoutingConfig> for RouteParams {
    /// Takes the values as they are; `RouterIndex::new`/`set_params` validate them.
    fn from(c: &RoutingConfig) -> Self {
        Self {
            km_per_ms: c.km_per_ms,
            path_stretch: c.path_stretch,
            load_penalty_ms: c.load_penalty_ms,
            reliability_penalty_ms: c.reliability_penalty_ms,
            suspended_penalty_ms: c.suspended_penalty_ms,
            max_candidates: c.max_candidates,
            // TODO(lead): not in `[routing]` yet; add a config field if operators should tune it.
            unknown_location_rtt_ms: DEFAULT_UNKNOWN_LOCATION_RTT_MS,
        }
    }
}

impl RouteParams {
    /// Checks the values the search relies on: negative penalties would break its lower bound.
    pub fn validate(&self) -> Result<(), RouterError> {
        let positive = [
            ("km_per_ms", self.km_per_ms),
            ("path_stretch", self.path_stretch),
        ];
        for (name, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(RouterError::InvalidParam {
                    name,
                    value,
                    expected: "finite and > 0",
                });
            }
        }
        let non_negative = [
            ("load_penalty_ms", self.load_penalty_ms),
            ("reliability_penalty_ms", self.reliability_penalty_ms),
            ("suspended_penalty_ms", self.suspended_penalty_ms),
            ("unknown_location_rtt_ms", self.unknown_location_rtt_ms),
        ];
        for (name, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(RouterError::InvalidParam {
                    name,
                    value,
                    expected: "finite and >= 0",
                });
            }
        }
        if self.max_candidates == 0 {
            return Err(RouterError::InvalidParam {
                name: "max_candidates",
                value: 0.0,
                expected: ">= 1",
            });
        }
        Ok(())
    }

    fn ms_per_km(&self) -> f64 {
        self.path_stretch / self.km_per_ms
    }
}

/// Why the router refused a value. Nothing here is retryable as is: the caller must change input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouterError {
    /// A routing parameter (from the gateway's `[routing]` config) is out of range.
    #[error("routing parameter `{name}` is {value}, but it must be {expected}; fix the [routing] config")]
    InvalidParam {
        name: &'static str,
        value: f64,
        expected: &'static str,
    },
    /// A position that is not on Earth (NaN, infinite, or latitude beyond ±90°).
    #[error("coordinates lat={lat}, lon={lon} are invalid: latitude must be within [-90, 90] and both finite")]
    InvalidCoordinates { lat: f64, lon: f64 },
    /// An update named a node the router does not know (never registered, or already removed
    /// because it disconnected). Register it with `upsert` first.
    #[error("{0} is not registered with the router (never registered or already removed)")]
    UnknownNode(NodeId),
}

/// The per-node values that change without moving the node in the index (heartbeats, drain,
/// SLA updates).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NodeState {
    /// Free game sessions right now.
    pub game_slots_free: u32,
    /// Free inference concurrency right now.
    pub inference_free: u32,
    /// Load in 0..=1 (clamped; NaN counts as fully loaded).
    pub load: f32,
    /// Draining nodes take no new sessions.
    pub draining: bool,
    /// Smoothed RTT of the node's QUIC connection to this gateway, in ms (NaN or negative count
    /// as 0; clamped to 600 s).
    pub gateway_rtt_ms: f64,
    /// Penalty events in the SLA window (disconnects with active sessions, not drained).
    pub penalty_events_recent: u32,
    /// The node's operator is flagged (e.g. suspended while under review).
    pub operator_flagged: bool,
    /// What the checker adds to the node's score, in milliseconds: a penalty for a node not
    /// verified yet, a larger one for a node demoted for delivering far below its claimed class
    /// (`[checker]`). NaN, negative and infinite values count as 0 / the clamp.
    pub check_penalty_ms: f64,
}

impl NodeState {
    fn sanitized(mut self) -> Self {
        self.load = if self.load.is_nan() {
            1.0
        } else {
            self.load.clamp(0.0, 1.0)
        };
        self.gateway_rtt_ms = if self.gateway_rtt_ms.is_nan() {
            0.0
        } else {
            self.gateway_rtt_ms.clamp(0.0, MAX_RTT_MS)
        };
        self.check_penalty_ms = if self.check_penalty_ms.is_nan() {
            0.0
        } else {
            self.check_penalty_ms.clamp(0.0, MAX_RTT_MS)
        };
        self
    }

    fn free(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Game => self.game_slots_free,
            Kind::Model => self.inference_free,
        }
    }

    fn category(&self, kind: Kind) -> Category {
        if self.draining {
            Category::Draining
        } else if self.free(kind) == 0 {
            Category::Full
        } else {
            Category::Available
        }
    }
}

/// Everything the router needs to know about a node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeRouteInfo {
    /// Where the node is (from GeoIP of the address it connects from); `None` if unknown.
    pub location: Option<LatLon>,
    /// Game titles it serves.
    pub games: Vec<String>,
    /// Model names it serves.
    pub models: Vec<String>,
    /// Capacity, load, drain and reliability.
    pub state: NodeState,
}

/// What the caller's geofence returns for a denied node: the rule that matched and why. Callers
/// may use their own type instead (`route` is generic over it); this one is a convenient default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    pub rule: String,
    pub reason: String,
}

/// One ranked node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub node: NodeId,
    /// The full score (lower is better), in ms.
    pub score_ms: f64,
    /// The estimated client->node RTT part of the score, in ms (0 when the client's location is
    /// unknown; `unknown_location_rtt_ms` when only the node's is).
    pub est_client_rtt_ms: f64,
}

/// The answer to one `route` call.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOutcome<D = Deny> {
    /// Best first, at most `max_candidates`. The first is used; the rest are the failover order.
    pub candidates: Vec<Candidate>,
    /// Registered nodes serving the workload (any state).
    pub serving: usize,
    /// Of those, not draining but without free capacity for this workload's kind.
    pub full: usize,
    /// Of those, draining.
    pub draining: usize,
    /// The first geofence denial the search saw (the search runs roughly best-first, so this is
    /// usually the denial of the node that would have been chosen).
    pub denied: Option<D>,
    /// How many geofence denials the search saw.
    pub denied_count: usize,
    /// How many nodes the search scored (a diagnostic for tuning and benchmarks).
    pub examined: usize,
}

/// Why a route found no candidate, in the order the HTTP layer should report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute<'a, D> {
    /// No registered node serves this game or model (503 "no eligible node").
    NotServed,
    /// Every node that had capacity was denied by the geofence (403, with the rule).
    Denied(&'a D),
    /// Nodes serve it but none has free capacity (429 with Retry-After).
    Saturated,
    /// Every node serving it is draining (503).
    Draining,
}

impl<D> RouteOutcome<D> {
    fn empty(serving: usize, full: usize, draining: usize) -> Self {
        Self {
            candidates: Vec::new(),
            serving,
            full,
            draining,
            denied: None,
            denied_count: 0,
            examined: 0,
        }
    }

    /// The node to use, if any.
    pub fn best(&self) -> Option<&Candidate> {
        self.candidates.first()
    }

    /// `None` when there is a candidate; otherwise why not. A geofence denial outranks
    /// saturation: full nodes are not shown to the geofence, and a client denied by policy should
    /// not be told to retry.
    pub fn failure(&self) -> Option<NoRoute<'_, D>> {
        if !self.candidates.is_empty() {
            return None;
        }
        Some(if self.serving == 0 {
            NoRoute::NotServed
        } else if let Some(deny) = &self.denied {
            NoRoute::Denied(deny)
        } else if self.full > 0 {
            NoRoute::Saturated
        } else {
            NoRoute::Draining
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    Available,
    Full,
    Draining,
}

#[derive(Debug)]
struct NodeEntry {
    id: NodeId,
    location: Option<LatLon>,
    /// Unit vector of `location` (zero when unknown).
    xyz: [f64; 3],
    /// Sorted, deduplicated names, kept to detect "same registration" cheaply.
    games: Vec<String>,
    models: Vec<String>,
    /// Interned workload ids (indices into `RouterIndex::trees`).
    workloads: Vec<u32>,
    state: NodeState,
    /// The node-side score terms, precomputed from `state` and the params.
    static_ms: f64,
}

impl NodeEntry {
    /// The node-side cost for a workload of `kind`, or +inf when the node cannot take it.
    fn cost(&self, kind: Kind) -> f64 {
        if self.state.category(kind) == Category::Available {
            self.static_ms
        } else {
            f64::INFINITY
        }
    }
}

fn static_cost(state: &NodeState, p: &RouteParams) -> f64 {
    let flagged = if state.operator_flagged {
        p.suspended_penalty_ms
    } else {
        0.0
    };
    state.gateway_rtt_ms
        + p.load_penalty_ms * f64::from(state.load)
        + p.reliability_penalty_ms * f64::from(state.penalty_events_recent)
        + flagged
        + state.check_penalty_ms
}

/// Trigonometric values of a cell's edges, precomputed so that a bound needs no `sin`/`cos`.
#[derive(Debug, Clone, Copy)]
struct CellGeo {
    lat0_r: f64,
    lat1_r: f64,
    sin_lat0: f64,
    cos_lat0: f64,
    sin_lat1: f64,
    cos_lat1: f64,
    tan_lat0: f64,
    tan_lat1: f64,
    sin_lon0: f64,
    cos_lon0: f64,
    sin_lon1: f64,
    cos_lon1: f64,
}

/// What a leaf holds per node: everything a route reads, so that it never touches the node
/// table (one cache line per node instead of a pointer chase).
#[derive(Debug, Clone, Copy)]
struct LeafEntry {
    xyz: [f64; 3],
    /// `NodeEntry::cost` for this tree's workload kind.
    cost: f64,
    id: NodeId,
    load: f32,
    slot: u32,
}

impl LeafEntry {
    fn new(slot: u32, entry: &NodeEntry, kind: Kind) -> Self {
        Self {
            xyz: entry.xyz,
            cost: entry.cost(kind),
            id: entry.id,
            load: entry.state.load,
            slot,
        }
    }
}

#[derive(Debug)]
enum Content {
    Leaf(Vec<LeafEntry>),
    Inner([u32; 4]),
}

#[derive(Debug)]
struct Cell {
    lat0: f64,
    lat1: f64,
    lon0: f64,
    lon1: f64,
    geo: CellGeo,
    /// Minimum of `NodeEntry::cost` over the subtree (+inf when nothing in it is eligible).
    min_cost: f64,
    /// Nodes in the subtree, eligible or not.
    count: u32,
    parent: u32,
    depth: u8,
    content: Content,
}

impl Cell {
    fn new(lat0: f64, lat1: f64, lon0: f64, lon1: f64, parent: u32, depth: u8) -> Self {
        let (lat0_r, lat1_r) = (lat0.to_radians(), lat1.to_radians());
        let (sin_lat0, cos_lat0) = lat0_r.sin_cos();
        let (sin_lat1, cos_lat1) = lat1_r.sin_cos();
        let (sin_lon0, cos_lon0) = lon0.to_radians().sin_cos();
        let (sin_lon1, cos_lon1) = lon1.to_radians().sin_cos();
        Self {
            lat0,
            lat1,
            lon0,
            lon1,
            geo: CellGeo {
                lat0_r,
                lat1_r,
                sin_lat0,
                cos_lat0,
                sin_lat1,
                cos_lat1,
                tan_lat0: lat0_r.tan(),
                tan_lat1: lat1_r.tan(),
                sin_lon0,
                cos_lon0,
                sin_lon1,
                cos_lon1,
            },
            min_cost: f64::INFINITY,
            count: 0,
            parent,
            depth,
            content: Content::Leaf(Vec::new()),
        }
    }

    fn quadrant(&self, at: LatLon) -> usize {
        let mid_lat = 0.5 * (self.lat0 + self.lat1);
        let mid_lon = 0.5 * (self.lon0 + self.lon1);
        usize::from(at.lat >= mid_lat) * 2 + usize::from(at.lon >= mid_lon)
    }

    /// A lower bound on the great-circle distance (km) from the client to any point of the cell.
    /// The nearest point is found exactly; its angle is then bounded from below by a series.
    ///
    /// If the client's meridian crosses the cell's longitude span, the nearest point is on that
    /// meridian and the distance is the latitude gap (exact: two points are never closer than
    /// their latitude difference). Otherwise the nearest point is on the boundary; along a
    /// parallel edge the distance only grows with the longitude gap, so its minimum is a corner,
    /// and along a meridian edge `cos d = sinφc·sinφ + cosφc·cosΔλ·cosφ` peaks at
    /// `tan φ = tanφc / cosΔλ` (when `cosΔλ > 0`), so that point counts if it lies within the
    /// edge. Longitudes enter only through `cos Δλ`, so the antimeridian needs no special case,
    /// and a pole is just a corner shared by the edges that meet there.
    fn distance_bound_km(&self, c: &ClientGeo) -> f64 {
        let g = &self.geo;
        // Longitudes are within [-180, 180], so one conditional add replaces a (slow) `fmod`.
        let mut east_of_lon0 = c.lon - self.lon0;
        if east_of_lon0 < 0.0 {
            east_of_lon0 += 360.0;
        }
        let angle = if east_of_lon0 <= self.lon1 - self.lon0 {
            if c.lat_r < g.lat0_r {
                g.lat0_r - c.lat_r
            } else if c.lat_r > g.lat1_r {
                c.lat_r - g.lat1_r
            } else {
                0.0
            }
        } else {
            let cos_dlon0 = c.cos_lon * g.cos_lon0 + c.sin_lon * g.sin_lon0;
            let cos_dlon1 = c.cos_lon * g.cos_lon1 + c.sin_lon * g.sin_lon1;
            let corner = |sin_lat: f64, cos_lat: f64, cos_dlon: f64| {
                c.sin_lat * sin_lat + c.cos_lat * cos_lat * cos_dlon
            };
            let mut best = corner(g.sin_lat0, g.cos_lat0, cos_dlon0)
                .max(corner(g.sin_lat1, g.cos_lat1, cos_dlon0))
                .max(corner(g.sin_lat0, g.cos_lat0, cos_dlon1))
                .max(corner(g.sin_lat1, g.cos_lat1, cos_dlon1));
            for cos_dlon in [cos_dlon0, cos_dlon1] {
                let a = c.sin_lat;
                let b = c.cos_lat * cos_dlon;
                if b > 0.0 && b * g.tan_lat0 <= a && a <= b * g.tan_lat1 {
                    best = best.max((a * a + b * b).sqrt());
                }
            }
            // Half the chord to the nearest point: chord² = 2 - 2·cos d.
            angle_lower_bound((0.5 * (1.0 - best)).max(0.0).sqrt())
        };
        (angle * EARTH_RADIUS_KM - BOUND_SLACK_KM).max(0.0)
    }
}

/// The client's position in the forms the bound and the node distance need.
#[derive(Debug, Clone, Copy)]
struct ClientGeo {
    lat_r: f64,
    lon: f64,
    sin_lat: f64,
    cos_lat: f64,
    sin_lon: f64,
    cos_lon: f64,
    xyz: [f64; 3],
}

impl ClientGeo {
    fn new(at: LatLon) -> Self {
        let lat_r = at.lat.to_radians();
        let (sin_lat, cos_lat) = lat_r.sin_cos();
        let (sin_lon, cos_lon) = at.lon.to_radians().sin_cos();
        Self {
            lat_r,
            lon: at.lon,
            sin_lat,
            cos_lat,
            sin_lon,
            cos_lon,
            xyz: [cos_lat * cos_lon, cos_lat * sin_lon, sin_lat],
        }
    }
}

/// Half the chord between two unit vectors, `sin(θ/2)`; haversine's `hav(θ)` is its square.
fn half_chord(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    let dx = a[0] - b[0];
    let dy = a[1] - b[1];
    let dz = a[2] - b[2];
    (0.5 * (dx * dx + dy * dy + dz * dz).sqrt()).min(1.0)
}

/// The central angle for a half chord `h = sin(θ/2)`: `θ = 2·asin(h)`, the haversine formula,
/// accurate for small and large distances alike.
fn angle_exact(h: f64) -> f64 {
    2.0 * h.asin()
}

/// A cheap lower bound on [`angle_exact`]: the first six terms of the Maclaurin series of
/// `asin`, whose coefficients are all positive, so every truncation is below `asin` for `h >= 0`.
/// Within 0.1% up to 10,000 km and 18% at the antipode; shaved by 1e-9 so that rounding can
/// never lift it above the exact value.
fn angle_lower_bound(h: f64) -> f64 {
    let h2 = h * h;
    let series = h
        * (1.0
            + h2 * (1.0 / 6.0
                + h2 * (3.0 / 40.0
                    + h2 * (5.0 / 112.0 + h2 * (35.0 / 1152.0 + h2 * (63.0 / 2816.0))))));
    2.0 * series * (1.0 - 1e-9)
}

/// One workload's spatial index. `cells[ROOT]` covers the globe; `cells[UNLOCATED]` is a leaf
/// that never splits and holds the nodes without a location.
#[derive(Debug)]
struct WorkloadTree {
    kind: Kind,
    name: String,
    cells: Vec<Cell>,
    free_cells: Vec<u32>,
    serving: usize,
    full: usize,
    draining: usize,
}

type Nodes = [Option<NodeEntry>];

fn entry_at(nodes: &Nodes, slot: u32) -> Option<&NodeEntry> {
    nodes.get(slot as usize).and_then(Option::as_ref)
}

impl WorkloadTree {
    fn new(kind: Kind, name: String) -> Self {
        Self {
            kind,
            name,
            cells: vec![
                Cell::new(-90.0, 90.0, -180.0, 180.0, NO_PARENT, 0),
                Cell::new(0.0, 0.0, 0.0, 0.0, NO_PARENT, 0),
            ],
            free_cells: Vec::new(),
            serving: 0,
            full: 0,
            draining: 0,
        }
    }

    fn counter(&mut self, category: Category) -> Option<&mut usize> {
        match category {
            Category::Available => None,
            Category::Full => Some(&mut self.full),
            Category::Draining => Some(&mut self.draining),
        }
    }

    fn alloc(&mut self, cell: Cell) -> u32 {
        match self.free_cells.pop() {
            Some(idx) => {
                self.cells[idx as usize] = cell;
                idx
            }
            None => {
                self.cells.push(cell);
                // The arena cannot outgrow u32: each cell holds or covers at least one node, and
                // node slots are u32 themselves.
                u32::try_from(self.cells.len() - 1).unwrap_or(u32::MAX)
            }
        }
    }

    /// The leaf that holds (or would hold) a node at `at`.
    fn leaf_for(&self, at: Option<LatLon>) -> u32 {
        let Some(at) = at else { return UNLOCATED };
        let mut idx = ROOT;
        while let Content::Inner(children) = &self.cells[idx as usize].content {
            idx = children[self.cells[idx as usize].quadrant(at)];
        }
        idx
    }

    fn insert(&mut self, slot: u32, nodes: &Nodes) {
        let Some(entry) = entry_at(nodes, slot) else {
            return;
        };
        self.serving += 1;
        if let Some(counter) = self.counter(entry.state.category(self.kind)) {
            *counter += 1;
        }
        let leaf = self.leaf_for(entry.location);
        let mut up = leaf;
        while up != NO_PARENT {
            self.cells[up as usize].count += 1;
            up = self.cells[up as usize].parent;
        }
        let new = LeafEntry::new(slot, entry, self.kind);
        if let Content::Leaf(bucket) = &mut self.cells[leaf as usize].content {
            bucket.push(new);
        }
        if leaf != UNLOCATED {
            self.split_if_needed(leaf, nodes);
        }
        self.refresh_up(leaf);
    }

    fn split_if_needed(&mut self, idx: u32, nodes: &Nodes) {
        let cell = &self.cells[idx as usize];
        let over = matches!(&cell.content, Content::Leaf(b) if b.len() > LEAF_CAPACITY);
        if !over || cell.depth >= MAX_DEPTH {
            return;
        }
        let (lat0, lat1, lon0, lon1, depth) =
            (cell.lat0, cell.lat1, cell.lon0, cell.lon1, cell.depth);
        let (mid_lat, mid_lon) = (0.5 * (lat0 + lat1), 0.5 * (lon0 + lon1));
        let bucket = match std::mem::replace(
            &mut self.cells[idx as usize].content,
            Content::Inner([0; 4]),
        ) {
            Content::Leaf(bucket) => bucket,
            Content::Inner(_) => return,
        };
        let bounds = [
            (lat0, mid_lat, lon0, mid_lon),
            (lat0, mid_lat, mid_lon, lon1),
            (mid_lat, lat1, lon0, mid_lon),
            (mid_lat, lat1, mid_lon, lon1),
        ];
        let mut children = [0u32; 4];
        for (q, (a, b, c, d)) in bounds.into_iter().enumerate() {
            children[q] = self.alloc(Cell::new(a, b, c, d, idx, depth + 1));
        }
        for item in bucket {
            // Leaves hold only located nodes; the location decides the quadrant exactly as
            // `leaf_for` will when the node is looked up again.
            let Some(at) = entry_at(nodes, item.slot).and_then(|e| e.location) else {
                continue;
            };
            let child = children[self.cells[idx as usize].quadrant(at)];
            let cell = &mut self.cells[child as usize];
            cell.count += 1;
            if let Content::Leaf(b) = &mut cell.content {
                b.push(item);
            }
        }
        self.cells[idx as usize].content = Content::Inner(children);
        for child in children {
            self.cells[child as usize].min_cost = self.compute_min(child);
            self.split_if_needed(child, nodes);
        }
    }

    fn remove(&mut self, slot: u32, entry: &NodeEntry) {
        let leaf = self.leaf_for(entry.location);
        let found = match &mut self.cells[leaf as usize].content {
            Content::Leaf(bucket) => match bucket.iter().position(|e| e.slot == slot) {
                Some(pos) => {
                    bucket.swap_remove(pos);
                    true
                }
                None => false,
            },
            Content::Inner(_) => false,
        };
        if !found {
            return;
        }
        self.serving = self.serving.saturating_sub(1);
        if let Some(counter) = self.counter(entry.state.category(self.kind)) {
            *counter = counter.saturating_sub(1);
        }
        let mut merge = None;
        let mut up = leaf;
        while up != NO_PARENT {
            let cell = &mut self.cells[up as usize];
            cell.count = cell.count.saturating_sub(1);
            if up != leaf && cell.count <= MERGE_AT {
                merge = Some(up);
            }
            up = cell.parent;
        }
        match merge {
            Some(top) => {
                self.merge(top);
                self.refresh_up(top);
            }
            None => self.refresh_up(leaf),
        }
    }

    /// Copies a node's new cost and load into its leaf entry and fixes the minima above it.
    fn update(&mut self, slot: u32, entry: &NodeEntry) {
        let leaf = self.leaf_for(entry.location);
        let cost = entry.cost(self.kind);
        let mut cost_changed = false;
        if let Content::Leaf(bucket) = &mut self.cells[leaf as usize].content {
            if let Some(item) = bucket.iter_mut().find(|e| e.slot == slot) {
                cost_changed = item.cost != cost;
                item.cost = cost;
                item.load = entry.state.load;
            }
        }
        if cost_changed {
            self.refresh_up(leaf);
        }
    }

    /// Turns an inner cell back into one leaf holding its whole subtree.
    fn merge(&mut self, top: u32) {
        let mut items = Vec::new();
        let mut stack = match &self.cells[top as usize].content {
            Content::Inner(children) => children.to_vec(),
            Content::Leaf(_) => return,
        };
        while let Some(idx) = stack.pop() {
            let content = std::mem::replace(
                &mut self.cells[idx as usize].content,
                Content::Leaf(Vec::new()),
            );
            match content {
                Content::Leaf(bucket) => items.extend(bucket),
                Content::Inner(children) => stack.extend(children),
            }
            self.free_cells.push(idx);
        }
        self.cells[top as usize].content = Content::Leaf(items);
    }

    fn compute_min(&self, idx: u32) -> f64 {
        match &self.cells[idx as usize].content {
            Content::Leaf(bucket) => bucket.iter().map(|e| e.cost).fold(f64::INFINITY, f64::min),
            Content::Inner(children) => children
                .iter()
                .map(|&c| self.cells[c as usize].min_cost)
                .fold(f64::INFINITY, f64::min),
        }
    }

    /// Re-reads every leaf entry's cost and recomputes every cell's minimum (after the params
    /// changed every node's cost).
    fn recompute_all(&mut self, nodes: &Nodes) {
        // A pre-order walk lists parents before children; reversed, children come first.
        let mut order = Vec::new();
        let mut stack = vec![ROOT, UNLOCATED];
        while let Some(idx) = stack.pop() {
            order.push(idx);
            if let Content::Inner(children) = &self.cells[idx as usize].content {
                stack.extend_from_slice(children);
            }
        }
        for idx in order.into_iter().rev() {
            let kind = self.kind;
            if let Content::Leaf(bucket) = &mut self.cells[idx as usize].content {
                for item in bucket.iter_mut() {
                    if let Some(entry) = entry_at(nodes, item.slot) {
                        item.cost = entry.cost(kind);
                    }
                }
            }
            self.cells[idx as usize].min_cost = self.compute_min(idx);
        }
    }

    /// Recomputes `min_cost` from `idx` up to the root, stopping once a cell is unchanged (its
    /// ancestors then already hold the right value).
    fn refresh_up(&mut self, mut idx: u32) {
        while idx != NO_PARENT {
            let min = self.compute_min(idx);
            let cell = &mut self.cells[idx as usize];
            if cell.min_cost == min {
                return;
            }
            cell.min_cost = min;
            idx = cell.parent;
        }
    }
}

/// A kept candidate with its tie-break fields.
#[derive(Debug, Clone, Copy)]
struct Kept {
    score: f64,
    load: f32,
    id: NodeId,
    est: f64,
}

impl Kept {
    fn key_cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(self.load.total_cmp(&other.load))
            .then(self.id.cmp(&other.id))
    }
}

/// The best `k` so far, sorted best first.
struct TopK {
    k: usize,
    kept: Vec<Kept>,
    /// The worst kept score once `k` are kept, +inf before: what a cell must beat (or tie).
    threshold: f64,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            kept: Vec::with_capacity(k + 1),
            threshold: f64::INFINITY,
        }
    }

    fn would_keep(&self, cand: &Kept) -> bool {
        self.kept.len() < self.k
            || self
                .kept
                .last()
                .is_some_and(|w| cand.key_cmp(w) == Ordering::Less)
    }

    fn push(&mut self, cand: Kept) {
        let pos = self
            .kept
            .iter()
            .position(|k| cand.key_cmp(k) == Ordering::Less)
            .unwrap_or(self.kept.len());
        self.kept.insert(pos, cand);
        self.kept.truncate(self.k);
        if self.kept.len() == self.k {
            self.threshold = self.kept.last().map_or(f64::INFINITY, |w| w.score);
        }
    }

    fn into_candidates(self) -> Vec<Candidate> {
        self.kept
            .into_iter()
            .map(|k| Candidate {
                node: k.id,
                score_ms: k.score,
                est_client_rtt_ms: k.est,
            })
            .collect()
    }
}

/// A cell waiting in the best-first queue; ordered so that `BinaryHeap` pops the lowest bound.
#[derive(Debug, Clone, Copy)]
struct Pending {
    bound: f64,
    cell: u32,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        other.bound.total_cmp(&self.bound)
    }
}

/// Per-route scoring context shared by the indexed and the linear search.
struct Scorer<'a, D, F> {
    client: Option<ClientGeo>,
    ms_per_km: f64,
    unknown_location_rtt_ms: f64,
    top: TopK,
    geofence: &'a mut F,
    denied: Option<D>,
    denied_count: usize,
    examined: usize,
}

impl<D, F: FnMut(NodeId) -> Result<(), D>> Scorer<'_, D, F> {
    /// Scores one node (`located`: whether `item.xyz` is a real position) and keeps it if it
    /// beats the current top k and the geofence allows it.
    fn consider(&mut self, item: &LeafEntry, located: bool) {
        let threshold = self.top.threshold;
        if item.cost > threshold {
            // Also skips ineligible nodes, whose cost is +inf.
            return;
        }
        if item.cost == f64::INFINITY {
            return;
        }
        self.examined += 1;
        let est = match (&self.client, located) {
            (None, _) => 0.0,
            (Some(_), false) => self.unknown_location_rtt_ms,
            (Some(c), true) => {
                let h = half_chord(&c.xyz, &item.xyz);
                // Most nodes in a visited leaf lose: rule them out before paying for `asin`.
                let cheap = angle_lower_bound(h) * EARTH_RADIUS_KM * self.ms_per_km;
                if cheap + item.cost > threshold {
                    return;
                }
                angle_exact(h) * EARTH_RADIUS_KM * self.ms_per_km
            }
        };
        let cand = Kept {
            score: est + item.cost,
            load: item.load,
            id: item.id,
            est,
        };
        if !self.top.would_keep(&cand) {
            return;
        }
        match (self.geofence)(item.id) {
            Ok(()) => self.top.push(cand),
            Err(deny) => {
                self.denied_count += 1;
                if self.denied.is_none() {
                    self.denied = Some(deny);
                }
            }
        }
    }

    fn finish(self, tree: &WorkloadTree) -> RouteOutcome<D> {
        RouteOutcome {
            candidates: self.top.into_candidates(),
            serving: tree.serving,
            full: tree.full,
            draining: tree.draining,
            denied: self.denied,
            denied_count: self.denied_count,
            examined: self.examined,
        }
    }
}

/// The router's state: every registered node, indexed per workload. Not internally synchronised;
/// the gateway wraps it (e.g. in a lock or a copy-on-write snapshot).
#[derive(Debug)]
pub struct RouterIndex {
    params: RouteParams,
    nodes: Vec<Option<NodeEntry>>,
    free_slots: Vec<u32>,
    by_id: HashMap<NodeId, u32>,
    trees: Vec<Option<WorkloadTree>>,
    free_trees: Vec<u32>,
    games: HashMap<String, u32>,
    models: HashMap<String, u32>,
}

impl RouterIndex {
    /// An empty index. Fails if `params` are out of range.
    pub fn new(params: RouteParams) -> Result<Self, RouterError> {
        params.validate()?;
        Ok(Self {
            params,
            nodes: Vec::new(),
            free_slots: Vec::new(),
            by_id: HashMap::new(),
            trees: Vec::new(),
            free_trees: Vec::new(),
            games: HashMap::new(),
            models: HashMap::new(),
        })
    }

    pub fn params(&self) -> &RouteParams {
        &self.params
    }

    /// Replaces the parameters (config reload). O(nodes): every node's cost is recomputed.
    pub fn set_params(&mut self, params: RouteParams) -> Result<(), RouterError> {
        params.validate()?;
        self.params = params;
        for entry in self.nodes.iter_mut().flatten() {
            entry.static_ms = static_cost(&entry.state, &params);
        }
        let nodes = &self.nodes;
        for tree in self.trees.iter_mut().flatten() {
            tree.recompute_all(nodes);
        }
        Ok(())
    }

    /// Registered nodes.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.by_id.contains_key(&node)
    }

    /// The node's current (sanitised) state.
    pub fn state(&self, node: NodeId) -> Option<&NodeState> {
        let slot = *self.by_id.get(&node)?;
        entry_at(&self.nodes, slot).map(|e| &e.state)
    }

    /// Registers a node or replaces its registration. When the location and workloads are
    /// unchanged this is a state update (no re-indexing).
    pub fn upsert(&mut self, node: NodeId, info: NodeRouteInfo) {
        let NodeRouteInfo {
            location,
            mut games,
            mut models,
            state,
        } = info;
        games.sort_unstable();
        games.dedup();
        models.sort_unstable();
        models.dedup();
        if let Some(&slot) = self.by_id.get(&node) {
            let same = entry_at(&self.nodes, slot)
                .is_some_and(|e| e.location == location && e.games == games && e.models == models);
            if same {
                self.apply_state(slot, state);
                return;
            }
            self.remove(node);
        }
        let state = state.sanitized();
        let mut workloads = Vec::with_capacity(games.len() + models.len());
        for name in &games {
            workloads.push(self.intern(Kind::Game, name));
        }
        for name in &models {
            workloads.push(self.intern(Kind::Model, name));
        }
        let entry = NodeEntry {
            id: node,
            location,
            xyz: location.map_or([0.0; 3], |l| l.unit_vector()),
            games,
            models,
            workloads,
            static_ms: static_cost(&state, &self.params),
            state,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = Some(entry);
                slot
            }
            None => {
                self.nodes.push(Some(entry));
                u32::try_from(self.nodes.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.by_id.insert(node, slot);
        let nodes = &self.nodes;
        if let Some(entry) = entry_at(nodes, slot) {
            for &w in &entry.workloads {
                if let Some(tree) = self.trees.get_mut(w as usize).and_then(Option::as_mut) {
                    tree.insert(slot, nodes);
                }
            }
        }
    }

    /// Forgets a node (disconnected). Returns whether it was registered.
    pub fn remove(&mut self, node: NodeId) -> bool {
        let Some(slot) = self.by_id.remove(&node) else {
            return false;
        };
        let nodes = &self.nodes;
        let mut emptied = Vec::new();
        if let Some(entry) = entry_at(nodes, slot) {
            for &w in &entry.workloads {
                if let Some(tree) = self.trees.get_mut(w as usize).and_then(Option::as_mut) {
                    tree.remove(slot, entry);
                    if tree.serving == 0 {
                        emptied.push(w);
                    }
                }
            }
        }
        // Names interned for workloads nobody serves any more are dropped, so nodes registering
        // ever-new names cannot grow the index without bound.
        for w in emptied {
            if let Some(tree) = self.trees.get_mut(w as usize).and_then(Option::take) {
                match tree.kind {
                    Kind::Game => self.games.remove(&tree.name),
                    Kind::Model => self.models.remove(&tree.name),
                };
                self.free_trees.push(w);
            }
        }
        self.nodes[slot as usize] = None;
        self.free_slots.push(slot);
        true
    }

    /// Changes a node's state in place (heartbeat, drain, SLA). O(workloads × depth).
    pub fn update(
        &mut self,
        node: NodeId,
        change: impl FnOnce(&mut NodeState),
    ) -> Result<(), RouterError> {
        let slot = *self
            .by_id
            .get(&node)
            .ok_or(RouterError::UnknownNode(node))?;
        let mut state = entry_at(&self.nodes, slot)
            .ok_or(RouterError::UnknownNode(node))?
            .state;
        change(&mut state);
        self.apply_state(slot, state);
        Ok(())
    }

    /// Heartbeat load (0..=1).
    pub fn set_load(&mut self, node: NodeId, load: f32) -> Result<(), RouterError> {
        self.update(node, |s| s.load = load)
    }

    /// Drain started (`true`) or cancelled (`false`).
    pub fn set_draining(&mut self, node: NodeId, draining: bool) -> Result<(), RouterError> {
        self.update(node, |s| s.draining = draining)
    }

    /// Free capacity after a session opened or closed, or from a heartbeat.
    pub fn set_capacity(
        &mut self,
        node: NodeId,
        game_slots_free: u32,
        inference_free: u32,
    ) -> Result<(), RouterError> {
        self.update(node, |s| {
            s.game_slots_free = game_slots_free;
            s.inference_free = inference_free;
        })
    }

    /// A new smoothed RTT measured on the node's connection.
    pub fn set_gateway_rtt(&mut self, node: NodeId, rtt_ms: f64) -> Result<(), RouterError> {
        self.update(node, |s| s.gateway_rtt_ms = rtt_ms)
    }

    /// SLA inputs: recent penalty events and whether the operator is flagged.
    pub fn set_reliability(
        &mut self,
        node: NodeId,
        penalty_events_recent: u32,
        operator_flagged: bool,
    ) -> Result<(), RouterError> {
        self.update(node, |s| {
            s.penalty_events_recent = penalty_events_recent;
            s.operator_flagged = operator_flagged;
        })
    }

    fn apply_state(&mut self, slot: u32, state: NodeState) {
        let state = state.sanitized();
        let static_ms = static_cost(&state, &self.params);
        let Some(entry) = self.nodes.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let old = entry.state;
        entry.state = state;
        entry.static_ms = static_ms;
        let Some(entry) = entry_at(&self.nodes, slot) else {
            return;
        };
        for &w in &entry.workloads {
            let Some(tree) = self.trees.get_mut(w as usize).and_then(Option::as_mut) else {
                continue;
            };
            let (before, after) = (old.category(tree.kind), state.category(tree.kind));
            if before != after {
                if let Some(c) = tree.counter(before) {
                    *c = c.saturating_sub(1);
                }
                if let Some(c) = tree.counter(after) {
                    *c += 1;
                }
            }
            tree.update(slot, entry);
        }
    }

    fn intern(&mut self, kind: Kind, name: &str) -> u32 {
        let map = match kind {
            Kind::Game => &mut self.games,
            Kind::Model => &mut self.models,
        };
        if let Some(&id) = map.get(name) {
            return id;
        }
        let tree = WorkloadTree::new(kind, name.to_owned());
        let id = match self.free_trees.pop() {
            Some(id) => {
                self.trees[id as usize] = Some(tree);
                id
            }
            None => {
                self.trees.push(Some(tree));
                u32::try_from(self.trees.len() - 1).unwrap_or(u32::MAX)
            }
        };
        map.insert(name.to_owned(), id);
        id
    }

    /// Whether some indexed node serves `workload` (names nobody serves are not interned).
    pub fn serves(&self, workload: Workload<'_>) -> bool {
        self.tree(workload).is_some()
    }

    fn tree(&self, workload: Workload<'_>) -> Option<&WorkloadTree> {
        let id = match workload {
            Workload::Game(name) => self.games.get(name),
            Workload::Model(name) => self.models.get(name),
        }?;
        self.trees.get(*id as usize)?.as_ref()
    }

    fn scorer<'a, D, F>(&self, client: Option<LatLon>, geofence: &'a mut F) -> Scorer<'a, D, F> {
        Scorer {
            client: client.map(ClientGeo::new),
            ms_per_km: self.params.ms_per_km(),
            unknown_location_rtt_ms: self.params.unknown_location_rtt_ms,
            top: TopK::new(self.params.max_candidates),
            geofence,
            denied: None,
            denied_count: 0,
            examined: 0,
        }
    }

    /// Ranks the eligible nodes for a session of `workload` from a client at `client` (`None`
    /// when its location is unknown). `geofence` says whether the session may use a node; it is
    /// called only for nodes that would enter the current top `max_candidates`.
    pub fn route<D, F>(
        &self,
        client: Option<LatLon>,
        workload: Workload<'_>,
        mut geofence: F,
    ) -> RouteOutcome<D>
    where
        F: FnMut(NodeId) -> Result<(), D>,
    {
        let Some(tree) = self.tree(workload) else {
            return RouteOutcome::empty(0, 0, 0);
        };
        let mut s = self.scorer(client, &mut geofence);
        let ms_per_km = s.ms_per_km;
        let bound = |idx: u32, cell: &Cell, client: &Option<ClientGeo>| match client {
            None => cell.min_cost,
            Some(_) if idx == UNLOCATED => self.params.unknown_location_rtt_ms + cell.min_cost,
            Some(c) => cell.distance_bound_km(c) * ms_per_km + cell.min_cost,
        };
        let mut queue = BinaryHeap::with_capacity(64);
        for idx in [ROOT, UNLOCATED] {
            let cell = &tree.cells[idx as usize];
            if cell.min_cost < f64::INFINITY {
                queue.push(Pending {
                    bound: bound(idx, cell, &s.client),
                    cell: idx,
                });
            }
        }
        while let Some(Pending { bound: b, cell }) = queue.pop() {
            // Strictly greater: a cell whose bound ties the worst kept score may still hold a
            // node that wins the tie on load.
            if b > s.top.threshold {
                break;
            }
            match &tree.cells[cell as usize].content {
                Content::Inner(children) => {
                    for &child in children {
                        let c = &tree.cells[child as usize];
                        let threshold = s.top.threshold;
                        if c.min_cost == f64::INFINITY || c.min_cost > threshold {
                            continue;
                        }
                        let b = bound(child, c, &s.client);
                        if b <= threshold {
                            queue.push(Pending {
                                bound: b,
                                cell: child,
                            });
                        }
                    }
                }
                Content::Leaf(bucket) => {
                    for item in bucket {
                        s.consider(item, cell != UNLOCATED);
                    }
                }
            }
        }
        s.finish(tree)
    }

    /// The same answer as [`route`](Self::route) (same candidates in the same order; `denied`
    /// may differ because nodes are visited in another order) by scoring every node. O(nodes):
    /// kept for verification and as the benchmark baseline.
    pub fn route_linear<D, F>(
        &self,
        client: Option<LatLon>,
        workload: Workload<'_>,
        mut geofence: F,
    ) -> RouteOutcome<D>
    where
        F: FnMut(NodeId) -> Result<(), D>,
    {
        let id = match workload {
            Workload::Game(name) => self.games.get(name),
            Workload::Model(name) => self.models.get(name),
        };
        let (Some(&id), Some(tree)) = (id, self.tree(workload)) else {
            return RouteOutcome::empty(0, 0, 0);
        };
        let mut s = self.scorer(client, &mut geofence);
        for (slot, entry) in self.nodes.iter().enumerate() {
            let Some(entry) = entry else { continue };
            if entry.workloads.contains(&id) {
                let item = LeafEntry::new(slot as u32, entry, tree.kind);
                s.consider(&item, entry.location.is_some());
            }
        }
        s.finish(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn at(lat: f64, lon: f64) -> Option<LatLon> {
        Some(LatLon::new(lat, lon).expect("test coordinates are valid"))
    }

    fn open_state() -> NodeState {
        NodeState {
            game_slots_free: 4,
            inference_free: 4,
            ..NodeState::default()
        }
    }

    fn node_at(lat: f64, lon: f64) -> NodeRouteInfo {
        NodeRouteInfo {
            location: at(lat, lon),
            games: vec!["doom".into()],
            models: vec!["llama".into()],
            state: open_state(),
        }
    }

    fn index() -> RouterIndex {
        RouterIndex::new(RouteParams::default()).expect("default params are valid")
    }

    fn allow(_: NodeId) -> Result<(), Deny> {
        Ok(())
    }

    fn ids<D>(outcome: &RouteOutcome<D>) -> Vec<u64> {
        outcome.candidates.iter().map(|c| c.node.0).collect()
    }

    const DOOM: Workload<'static> = Workload::Game("doom");
    const LLAMA: Workload<'static> = Workload::Model("llama");

    /// Independent reference: the geo crate's trigonometric haversine.
    fn haversine_km(a: LatLon, b: LatLon) -> f64 {
        nearpath_geo::distance_km(a.coords(), b.coords())
    }

    #[test]
    fn nearest_wins_and_failover_order_follows_distance() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(48.85, 2.35)); // Paris
        r.upsert(NodeId(2), node_at(52.52, 13.40)); // Berlin
        r.upsert(NodeId(3), node_at(40.71, -74.01)); // New York
        r.upsert(NodeId(4), node_at(35.68, 139.69)); // Tokyo
        let out = r.route(at(50.85, 4.35), DOOM, allow); // Brussels
        assert_eq!(ids(&out), vec![1, 2, 3]);
        let paris = haversine_km(at(50.85, 4.35).unwrap(), at(48.85, 2.35).unwrap());
        let expected = paris / 100.0 * 1.5;
        assert!((out.candidates[0].est_client_rtt_ms - expected).abs() < 1e-9);
        assert!((out.candidates[0].score_ms - expected).abs() < 1e-9);
        assert_eq!(out.serving, 4);
        assert_eq!(out.failure(), None);
        let tokyo_client = r.route(at(37.57, 126.98), DOOM, allow); // Seoul
        assert_eq!(ids(&tokyo_client)[0], 4);
    }

    #[test]
    fn geofence_excludes_and_reports_first_denial() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(48.85, 2.35));
        r.upsert(NodeId(2), node_at(52.52, 13.40));
        r.upsert(NodeId(3), node_at(40.71, -74.01));
        let mut asked = Vec::new();
        let out = r.route(at(48.0, 2.0), DOOM, |n: NodeId| {
            asked.push(n.0);
            if n == NodeId(1) {
                Err(Deny {
                    rule: "eu-residency".into(),
                    reason: "node outside the EU".into(),
                })
            } else {
                Ok(())
            }
        });
        assert_eq!(ids(&out), vec![2, 3]);
        assert_eq!(
            out.denied.as_ref().map(|d| d.rule.as_str()),
            Some("eu-residency")
        );
        assert_eq!(out.denied_count, 1);
        assert_eq!(
            asked.len(),
            3,
            "each examined node is asked once: {asked:?}"
        );

        // Everything denied: the first denial is the nearest node's and the failure says 403.
        let out = r.route(at(48.0, 2.0), DOOM, |n: NodeId| {
            Err(Deny {
                rule: format!("rule-{}", n.0),
                reason: "sanctioned".into(),
            })
        });
        assert!(out.candidates.is_empty());
        assert_eq!(out.denied_count, 3);
        match out.failure() {
            Some(NoRoute::Denied(d)) => assert_eq!(d.rule, "rule-1"),
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn geofence_is_consulted_only_near_the_answer() {
        let mut r = index();
        let mut rng = StdRng::seed_from_u64(7);
        for i in 0..5000 {
            let info = node_at(
                rng.random_range(-50.0..70.0),
                rng.random_range(-180.0..180.0),
            );
            r.upsert(NodeId(i), info);
        }
        let mut calls = 0;
        let out = r.route(at(45.0, 7.0), DOOM, |_| -> Result<(), Deny> {
            calls += 1;
            Ok(())
        });
        assert_eq!(out.candidates.len(), 3);
        assert!(
            calls <= out.examined && out.examined < 200,
            "calls {calls}, examined {}",
            out.examined
        );
    }

    #[test]
    fn full_nodes_are_excluded_per_workload_kind() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(48.85, 2.35));
        r.upsert(NodeId(2), node_at(40.71, -74.01));
        r.set_capacity(NodeId(1), 0, 3).unwrap();
        let game = r.route(at(48.0, 2.0), DOOM, allow);
        assert_eq!(ids(&game), vec![2]);
        assert_eq!(game.full, 1);
        // Inference capacity is separate: the same node still takes model sessions.
        let model = r.route(at(48.0, 2.0), LLAMA, allow);
        assert_eq!(ids(&model), vec![1, 2]);
        assert_eq!(model.full, 0);

        r.set_capacity(NodeId(2), 0, 3).unwrap();
        let game = r.route(at(48.0, 2.0), DOOM, allow);
        assert!(game.candidates.is_empty());
        assert_eq!((game.serving, game.full, game.draining), (2, 2, 0));
        assert_eq!(game.failure(), Some(NoRoute::Saturated));

        // Capacity coming back makes it eligible again without re-registering.
        r.set_capacity(NodeId(1), 1, 3).unwrap();
        assert_eq!(ids(&r.route(at(48.0, 2.0), DOOM, allow)), vec![1]);
    }

    #[test]
    fn draining_nodes_are_excluded() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(48.85, 2.35));
        r.upsert(NodeId(2), node_at(40.71, -74.01));
        r.set_draining(NodeId(1), true).unwrap();
        let out = r.route(at(48.0, 2.0), DOOM, allow);
        assert_eq!(ids(&out), vec![2]);
        assert_eq!(out.draining, 1);
        r.set_draining(NodeId(2), true).unwrap();
        let out = r.route(at(48.0, 2.0), LLAMA, allow);
        assert!(out.candidates.is_empty());
        assert_eq!(out.failure(), Some(NoRoute::Draining));
        r.set_draining(NodeId(1), false).unwrap();
        let out = r.route(at(48.0, 2.0), DOOM, allow);
        assert_eq!((ids(&out), out.draining), (vec![1], 1));
    }

    #[test]
    fn ties_are_broken_by_load_then_id() {
        let params = RouteParams {
            load_penalty_ms: 0.0,
            ..RouteParams::default()
        };
        let mut r = RouterIndex::new(params).unwrap();
        for (id, load) in [(1, 0.7), (2, 0.2), (3, 0.2), (4, 0.9)] {
            let mut info = node_at(10.0, 10.0);
            info.state.load = load;
            r.upsert(NodeId(id), info);
        }
        let out = r.route(at(11.0, 11.0), DOOM, allow);
        assert_eq!(ids(&out), vec![2, 3, 1]);
        assert_eq!(out.candidates[0].score_ms, out.candidates[2].score_ms);
    }

    #[test]
    fn ties_across_cells_are_broken_by_load() {
        // Without a client location every cell's bound equals its nodes' cost exactly, so the
        // search must not stop at a cell whose bound merely ties the worst kept score.
        let params = RouteParams {
            load_penalty_ms: 0.0,
            max_candidates: 2,
            ..RouteParams::default()
        };
        for seed in 0..20 {
            let mut r = RouterIndex::new(params).unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut loads = Vec::new();
            for id in 0..200 {
                let (lat, lon) = (
                    rng.random_range(-80.0..80.0),
                    rng.random_range(-180.0..180.0),
                );
                let mut info = node_at(lat, lon);
                info.state.gateway_rtt_ms = 5.0;
                info.state.load = rng.random_range(0.0..1.0);
                loads.push((info.state.load, id));
                r.upsert(NodeId(id), info);
            }
            loads.sort_by(|a, b| a.0.total_cmp(&b.0));
            let out = r.route(None, DOOM, allow);
            assert_eq!(ids(&out), vec![loads[0].1, loads[1].1], "seed {seed}");
        }
    }

    #[test]
    fn gateway_rtt_and_penalties_shift_the_ranking() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(48.85, 2.35)); // Paris, ~1.7 ms from the client
        r.upsert(NodeId(2), node_at(52.52, 13.40)); // Berlin, ~13 ms from the client
        let client = at(48.9, 2.4);
        assert_eq!(ids(&r.route(client, DOOM, allow)), vec![1, 2]);
        r.set_gateway_rtt(NodeId(1), 30.0).unwrap();
        let out = r.route(client, DOOM, allow);
        assert_eq!(ids(&out), vec![2, 1]);
        assert!(
            (out.candidates[1].score_ms - out.candidates[1].est_client_rtt_ms - 30.0).abs() < 1e-9
        );

        r.set_gateway_rtt(NodeId(1), 0.0).unwrap();
        r.set_reliability(NodeId(1), 2, false).unwrap(); // +50 ms
        assert_eq!(ids(&r.route(client, DOOM, allow)), vec![2, 1]);
        r.set_reliability(NodeId(1), 0, true).unwrap(); // +1000 ms
        assert_eq!(ids(&r.route(client, DOOM, allow)), vec![2, 1]);
        r.set_reliability(NodeId(1), 0, false).unwrap();
        r.set_load(NodeId(1), 1.0).unwrap(); // +20 ms
        assert_eq!(ids(&r.route(client, DOOM, allow)), vec![2, 1]);
        r.set_load(NodeId(1), 0.0).unwrap();
        assert_eq!(ids(&r.route(client, DOOM, allow)), vec![1, 2]);
    }

    #[test]
    fn unknown_client_location_ranks_by_node_side_terms() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(48.85, 2.35));
        r.upsert(NodeId(2), node_at(-33.87, 151.21));
        r.upsert(NodeId(3), node_at(40.71, -74.01));
        r.set_gateway_rtt(NodeId(1), 40.0).unwrap();
        r.set_gateway_rtt(NodeId(2), 5.0).unwrap();
        r.set_gateway_rtt(NodeId(3), 12.0).unwrap();
        let out = r.route(None, DOOM, allow);
        assert_eq!(ids(&out), vec![2, 3, 1]);
        assert!(out.candidates.iter().all(|c| c.est_client_rtt_ms == 0.0));
        assert_eq!(out.candidates[0].score_ms, 5.0);
    }

    #[test]
    fn unlocated_nodes_get_the_pessimistic_estimate() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(-33.87, 151.21)); // Sydney: ~250 ms from Paris
        let mut unlocated = node_at(0.0, 0.0);
        unlocated.location = None;
        r.upsert(NodeId(2), unlocated);
        r.upsert(NodeId(3), node_at(48.0, 3.0));
        let out = r.route(at(48.85, 2.35), DOOM, allow);
        assert_eq!(ids(&out), vec![3, 2, 1]);
        assert_eq!(out.candidates[1].est_client_rtt_ms, 150.0);
        // Without a client location every node is at distance 0; ties go to the lower id.
        assert_eq!(ids(&r.route(None, DOOM, allow)), vec![1, 2, 3]);
    }

    #[test]
    fn antimeridian_neighbours_are_near() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(0.0, -179.9));
        r.upsert(NodeId(2), node_at(0.0, 170.0));
        r.upsert(NodeId(3), node_at(0.0, -172.0));
        let out = r.route(at(0.0, 179.9), DOOM, allow);
        assert_eq!(ids(&out), vec![1, 3, 2]);
        // 0.2° of longitude at the equator is ~22.2 km: 0.33 ms with stretch 1.5.
        let est = out.candidates[0].est_client_rtt_ms;
        assert!((est - 0.3336).abs() < 1e-3, "{est}");
        // Longitudes outside [-180, 180) are wrapped rather than rejected.
        assert_eq!(LatLon::new(0.0, 180.0).unwrap().lon(), -180.0);
        assert_eq!(LatLon::new(0.0, 539.0).unwrap().lon(), 179.0);
    }

    #[test]
    fn poles_are_handled() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(89.9, -120.0));
        r.upsert(NodeId(2), node_at(80.0, 60.0));
        r.upsert(NodeId(3), node_at(-89.0, 0.0));
        let out = r.route(at(89.95, 60.0), DOOM, allow);
        assert_eq!(ids(&out), vec![1, 2, 3]);
        let out = r.route(at(-90.0, 0.0), DOOM, allow);
        assert_eq!(ids(&out)[0], 3);
    }

    #[test]
    fn invalid_input_is_rejected_with_data() {
        assert_eq!(
            LatLon::new(91.0, 0.0),
            Err(RouterError::InvalidCoordinates {
                lat: 91.0,
                lon: 0.0
            })
        );
        assert!(LatLon::new(f64::NAN, 0.0).is_err());
        assert!(LatLon::new(0.0, f64::INFINITY).is_err());
        let bad = RouteParams {
            load_penalty_ms: -1.0,
            ..RouteParams::default()
        };
        match RouterIndex::new(bad) {
            Err(RouterError::InvalidParam { name, value, .. }) => {
                assert_eq!((name, value), ("load_penalty_ms", -1.0))
            }
            other => panic!("expected InvalidParam, got {other:?}"),
        }
        let zero = RouteParams {
            max_candidates: 0,
            ..RouteParams::default()
        };
        assert!(RouterIndex::new(zero).is_err());
        let mut r = index();
        assert_eq!(
            r.set_load(NodeId(9), 0.5),
            Err(RouterError::UnknownNode(NodeId(9)))
        );
    }

    #[test]
    fn hostile_state_values_are_sanitised() {
        let mut r = index();
        let mut info = node_at(0.0, 0.0);
        info.state.load = f32::NAN;
        info.state.gateway_rtt_ms = -5.0;
        r.upsert(NodeId(1), info);
        let s = *r.state(NodeId(1)).unwrap();
        assert_eq!((s.load, s.gateway_rtt_ms), (1.0, 0.0));
        r.set_gateway_rtt(NodeId(1), f64::INFINITY).unwrap();
        r.set_load(NodeId(1), 7.0).unwrap();
        let out = r.route(at(0.0, 0.0), DOOM, allow);
        assert_eq!(out.candidates[0].score_ms, MAX_RTT_MS + 20.0);
    }

    #[test]
    fn upsert_reindexes_only_on_change_and_remove_forgets() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(48.85, 2.35));
        r.upsert(NodeId(2), node_at(40.71, -74.01));
        // Same registration with a new state: no move, new load.
        let mut again = node_at(48.85, 2.35);
        again.games = vec!["doom".into(), "doom".into()];
        again.state.load = 0.5;
        r.upsert(NodeId(1), again);
        assert_eq!(r.state(NodeId(1)).unwrap().load, 0.5);
        assert_eq!(r.len(), 2);
        // Moving node 1 to Sydney re-indexes it.
        r.upsert(NodeId(1), node_at(-33.87, 151.21));
        assert_eq!(ids(&r.route(at(48.0, 2.0), DOOM, allow)), vec![2, 1]);
        // Dropping the game: node 1 no longer serves doom.
        let mut model_only = node_at(-33.87, 151.21);
        model_only.games.clear();
        r.upsert(NodeId(1), model_only);
        assert_eq!(ids(&r.route(at(48.0, 2.0), DOOM, allow)), vec![2]);
        assert!(r.remove(NodeId(2)));
        assert!(!r.remove(NodeId(2)));
        let out = r.route(at(48.0, 2.0), DOOM, allow);
        assert_eq!(out.failure(), Some(NoRoute::NotServed));
        assert!(r.games.is_empty(), "the unused title is no longer interned");
        assert_eq!(ids(&r.route(at(48.0, 2.0), LLAMA, allow)), vec![1]);
        let unknown = r.route(at(48.0, 2.0), Workload::Game("quake"), allow);
        assert_eq!(unknown.failure(), Some(NoRoute::NotServed));
    }

    #[test]
    fn params_come_from_the_routing_config() {
        let config = RoutingConfig {
            km_per_ms: 90.0,
            path_stretch: 1.25,
            load_penalty_ms: 7.0,
            reliability_penalty_ms: 11.0,
            suspended_penalty_ms: 500.0,
            max_candidates: 5,
        };
        let p = RouteParams::from(&config);
        assert_eq!(
            (
                p.km_per_ms,
                p.path_stretch,
                p.load_penalty_ms,
                p.reliability_penalty_ms
            ),
            (90.0, 1.25, 7.0, 11.0)
        );
        assert_eq!((p.suspended_penalty_ms, p.max_candidates), (500.0, 5));
        assert_eq!(
            RouteParams::default(),
            RouteParams::from(&RoutingConfig::default())
        );
        let mut r = RouterIndex::new(p).unwrap();
        for i in 0..8u8 {
            r.upsert(NodeId(u64::from(i)), node_at(f64::from(i), 0.0));
        }
        let out = r.route(at(0.0, 0.0), DOOM, allow);
        assert_eq!(out.candidates.len(), 5);
        // 1° of latitude is ~111.2 km: at 90 km/ms and stretch 1.25 that is ~1.544 ms.
        assert!((out.candidates[1].est_client_rtt_ms - 1.5443).abs() < 1e-3);
    }

    #[test]
    fn set_params_rescores_every_node() {
        let mut r = index();
        r.upsert(NodeId(1), node_at(48.85, 2.35));
        r.upsert(NodeId(2), node_at(52.52, 13.40));
        r.set_reliability(NodeId(1), 2, false).unwrap(); // +50 ms: Berlin (13 ms) wins
        assert_eq!(ids(&r.route(at(48.9, 2.4), DOOM, allow)), vec![2, 1]);
        let lenient = RouteParams {
            reliability_penalty_ms: 1.0,
            ..RouteParams::default()
        };
        r.set_params(lenient).unwrap();
        assert_eq!(ids(&r.route(at(48.9, 2.4), DOOM, allow)), vec![1, 2]);
    }

    /// The cell bound must never exceed the distance to any point inside the cell, and must be
    /// close to the true minimum (so it cannot pass by being trivially 0).
    #[test]
    fn cell_bound_is_a_tight_lower_bound() {
        let mut rng = StdRng::seed_from_u64(42);
        for round in 0..4000 {
            let lat0: f64 = rng.random_range(-90.0..90.0);
            let lat1 = if round % 10 == 0 {
                90.0
            } else {
                rng.random_range(lat0..=90.0f64).min(lat0 + 45.0)
            };
            let lon0: f64 = rng.random_range(-180.0..180.0);
            let width = if round % 7 == 0 {
                180.0
            } else {
                rng.random_range(0.01..90.0)
            };
            let cell = Cell::new(lat0, lat1, lon0, lon0 + width, NO_PARENT, 1);
            let client_lat = if round % 13 == 0 {
                90.0
            } else {
                rng.random_range(-90.0..=90.0)
            };
            let client = LatLon::new(client_lat, rng.random_range(-180.0..180.0)).unwrap();
            let bound = cell.distance_bound_km(&ClientGeo::new(client));
            let mut min_seen = f64::INFINITY;
            for i in 0..=40 {
                for j in 0..=40 {
                    let lat = (lat0 + (lat1 - lat0) * f64::from(i) / 40.0).min(90.0);
                    let lon = lon0 + width * f64::from(j) / 40.0;
                    let d = haversine_km(client, LatLon::new(lat, lon).unwrap());
                    assert!(
                        bound <= d + 1e-9,
                        "bound {bound} > {d} for cell {lat0}..{lat1} x {lon0}+{width}, client {client:?}, point {lat},{lon}"
                    );
                    min_seen = min_seen.min(d);
                }
            }
            // The grid misses the true minimum by at most a grid step's diagonal, and the series
            // behind the bound gives up at most 0.1% below 10,000 km (18% at the antipode).
            let step = ((lat1 - lat0).max(width) / 40.0).to_radians() * EARTH_RADIUS_KM * 1.5;
            let slack = if min_seen < 10_000.0 { 0.001 } else { 0.19 };
            assert!(
                bound >= (min_seen - step) * (1.0 - slack) - 0.01,
                "loose bound {bound} vs {min_seen} for cell {lat0}..{lat1} x {lon0}+{width}, client {client:?}"
            );
        }
    }

    #[test]
    fn angle_series_bounds_asin_from_below() {
        for i in 0..=10_000 {
            let h = f64::from(i) / 10_000.0;
            let (lower, exact) = (angle_lower_bound(h), angle_exact(h));
            assert!(lower <= exact, "h={h}: {lower} > {exact}");
            if h <= 0.71 {
                assert!(
                    lower >= exact * 0.999,
                    "h={h}: {lower} too far below {exact}"
                );
            }
        }
    }

    #[derive(Clone)]
    struct RefNode {
        id: u64,
        info: NodeRouteInfo,
    }

    /// An independent brute-force ranking (trigonometric haversine, its own scoring).
    fn reference(
        nodes: &[RefNode],
        p: &RouteParams,
        client: Option<LatLon>,
        workload: Workload<'_>,
        denied: &dyn Fn(u64) -> bool,
    ) -> Vec<(u64, f64)> {
        let mut all: Vec<(f64, f32, u64)> = Vec::new();
        for n in nodes {
            let s = n.info.state.sanitized();
            let (serves, free) = match workload {
                Workload::Game(g) => (n.info.games.iter().any(|x| x == g), s.game_slots_free),
                Workload::Model(m) => (n.info.models.iter().any(|x| x == m), s.inference_free),
            };
            if !serves || s.draining || free == 0 || denied(n.id) {
                continue;
            }
            let est = match (client, n.info.location) {
                (None, _) => 0.0,
                (Some(_), None) => p.unknown_location_rtt_ms,
                (Some(c), Some(l)) => haversine_km(c, l) / p.km_per_ms * p.path_stretch,
            };
            let mut score = est
                + s.gateway_rtt_ms
                + p.load_penalty_ms * f64::from(s.load)
                + p.reliability_penalty_ms * f64::from(s.penalty_events_recent);
            if s.operator_flagged {
                score += p.suspended_penalty_ms;
            }
            score += s.check_penalty_ms;
            all.push((score, s.load, n.id));
        }
        all.sort_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then(a.1.total_cmp(&b.1))
                .then(a.2.cmp(&b.2))
        });
        all.truncate(p.max_candidates);
        all.into_iter().map(|(s, _, id)| (id, s)).collect()
    }

    fn random_info(rng: &mut StdRng, sites: &[(f64, f64)]) -> NodeRouteInfo {
        let location = match rng.random_range(0..100) {
            0..4 => None,
            // Many nodes in the same few sites force deep splits and max-depth buckets.
            4..20 => {
                let (lat, lon) = sites[rng.random_range(0..sites.len())];
                at(lat, lon)
            }
            _ => at(
                rng.random_range(-90.0..=90.0),
                rng.random_range(-180.0..180.0),
            ),
        };
        let games = ["doom", "quake", "tetris"]
            .iter()
            .filter(|_| rng.random_bool(0.5))
            .map(|s| s.to_string())
            .collect();
        let models = ["llama", "qwen"]
            .iter()
            .filter(|_| rng.random_bool(0.5))
            .map(|s| s.to_string())
            .collect();
        NodeRouteInfo {
            location,
            games,
            models,
            state: NodeState {
                game_slots_free: rng.random_range(0..4),
                inference_free: rng.random_range(0..4),
                load: rng.random_range(0.0..1.0),
                draining: rng.random_bool(0.08),
                gateway_rtt_ms: rng.random_range(0.0..40.0),
                penalty_events_recent: if rng.random_bool(0.1) {
                    rng.random_range(1..4)
                } else {
                    0
                },
                operator_flagged: rng.random_bool(0.02),
                check_penalty_ms: if rng.random_bool(0.1) {
                    rng.random_range(0.0..600.0)
                } else {
                    0.0
                },
            },
        }
    }

    fn check_against_reference(
        r: &RouterIndex,
        nodes: &[RefNode],
        rng: &mut StdRng,
        clients: usize,
    ) {
        let workloads = [
            Workload::Game("doom"),
            Workload::Game("quake"),
            Workload::Game("tetris"),
            Workload::Model("llama"),
            Workload::Model("qwen"),
        ];
        let denied = |id: u64| id % 11 == 3;
        for i in 0..clients {
            let client = match i % 10 {
                0 => None,
                1 => at(
                    if i % 20 == 1 { 90.0 } else { -90.0 },
                    rng.random_range(-180.0..180.0),
                ),
                2 => at(
                    rng.random_range(-60.0..60.0),
                    if i % 20 == 2 { 179.99 } else { -179.99 },
                ),
                _ => at(
                    rng.random_range(-90.0..=90.0),
                    rng.random_range(-180.0..180.0),
                ),
            };
            let w = workloads[i % workloads.len()];
            let gate = |n: NodeId| {
                if denied(n.0) {
                    Err(Deny {
                        rule: "r".into(),
                        reason: String::new(),
                    })
                } else {
                    Ok(())
                }
            };
            let got = r.route(client, w, gate);
            let linear = r.route_linear(client, w, gate);
            let want = reference(nodes, r.params(), client, w, &denied);
            assert_eq!(
                ids(&got),
                ids(&linear),
                "indexed vs linear, client {client:?} {w:?}"
            );
            assert_eq!(got.candidates.len(), want.len(), "client {client:?} {w:?}");
            for (k, (c, (id, score))) in got.candidates.iter().zip(&want).enumerate() {
                assert!(
                    (c.score_ms - score).abs() < 1e-7,
                    "#{k}: {} vs {score} ({client:?} {w:?})",
                    c.score_ms
                );
                // Ids must match unless the reference has a near-tie around this rank.
                let near_tie = want
                    .iter()
                    .enumerate()
                    .any(|(j, (_, s))| j != k && (s - score).abs() < 1e-6);
                if !near_tie {
                    assert_eq!(c.node.0, *id, "#{k} for {client:?} {w:?}");
                }
            }
            if want.is_empty() && got.serving > 0 && got.full + got.draining < got.serving {
                assert!(
                    got.denied.is_some(),
                    "eligible nodes exist but none reported denied"
                );
            }
        }
    }

    #[test]
    fn indexed_route_matches_brute_force() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let params = RouteParams {
            max_candidates: 4,
            ..RouteParams::default()
        };
        let mut r = RouterIndex::new(params).unwrap();
        let sites: Vec<(f64, f64)> = (0..6)
            .map(|_| {
                (
                    rng.random_range(-60.0..70.0),
                    rng.random_range(-180.0..180.0),
                )
            })
            .chain([(0.0, 179.999), (89.99, 0.0)])
            .collect();
        let mut nodes: Vec<RefNode> = Vec::new();
        for id in 0..4000 {
            let info = random_info(&mut rng, &sites);
            r.upsert(NodeId(id), info.clone());
            nodes.push(RefNode { id, info });
        }
        check_against_reference(&r, &nodes, &mut rng, 1500);

        // Churn: state updates, moves, re-registrations and removals, then compare again.
        for _ in 0..6000 {
            let pick = rng.random_range(0..nodes.len());
            let id = NodeId(nodes[pick].id);
            match rng.random_range(0..6) {
                0 => {
                    let load = rng.random_range(0.0..1.0);
                    r.set_load(id, load).unwrap();
                    nodes[pick].info.state.load = load;
                }
                1 => {
                    let (g, m) = (rng.random_range(0..3), rng.random_range(0..3));
                    r.set_capacity(id, g, m).unwrap();
                    nodes[pick].info.state.game_slots_free = g;
                    nodes[pick].info.state.inference_free = m;
                }
                2 => {
                    let d = rng.random_bool(0.2);
                    r.set_draining(id, d).unwrap();
                    nodes[pick].info.state.draining = d;
                }
                3 => {
                    let rtt = rng.random_range(0.0..40.0);
                    r.set_gateway_rtt(id, rtt).unwrap();
                    nodes[pick].info.state.gateway_rtt_ms = rtt;
                }
                4 => {
                    let info = random_info(&mut rng, &sites);
                    r.upsert(id, info.clone());
                    nodes[pick].info = info;
                }
                _ => {
                    assert!(r.remove(id));
                    nodes.swap_remove(pick);
                }
            }
        }
        assert_eq!(r.len(), nodes.len());
        check_against_reference(&r, &nodes, &mut rng, 1500);

        // Removing almost everything merges the trees back; what is left still routes right.
        while nodes.len() > 30 {
            let n = nodes.swap_remove(rng.random_range(0..nodes.len()));
            assert!(r.remove(NodeId(n.id)));
        }
        check_against_reference(&r, &nodes, &mut rng, 300);
        let tree = r.tree(DOOM).unwrap();
        let live = tree.cells.len() - tree.free_cells.len();
        assert!(live < 40, "{live} cells kept for {} nodes", tree.serving);
    }
}
