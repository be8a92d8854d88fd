//! The sans-IO scheduler: when to probe which node, and what the evidence adds up to.
//!
//! The driver feeds events (`handle_*(now, ..)`) and applies what [`Checker::poll`] returns:
//! start a probe session, or record and apply a verdict. Time is the `now` argument (ms on any
//! monotonic clock); randomness comes from a seeded [`StdRng`], so a schedule is reproducible in
//! tests and unpredictable to nodes (which do not know the seed).
//!
//! Rules:
//! - At registration every model is probed once (the [`MAX_PROBES_PER_CHECK`] largest), in
//!   random order, the first at a random time within `registration_delay_max_ms` and each next
//!   one a random time within it after the previous one ends. One probe runs per node at a time,
//!   so probes do not slow each other down and measure single streams.
//! - While a node is idle (and only then) it gets a probe of a random model at exponentially
//!   distributed intervals (mean `idle_interval_mean_ms`): a node cannot tell probes from users
//!   by their timing.
//! - A node that serves games and no models is probed by a game session instead (one title
//!   at random, at registration and while idle): delivering it is a completed check; failing
//!   it counts toward demotion like a failed inference probe.
//! - A probe that does not finish within `probe_timeout_ms` has failed: a failed probe counts
//!   toward demotion (like one far below the claim), never toward impossibility.
//! - Samples from real sessions count for the physics bounds (the best single-stream rate), but
//!   only probes count for demotion: real sessions may be batch-loaded.
//! - The same GPU UUID on two live nodes quarantines both; a changed GPU set discards the
//!   evidence and runs a full check again.
//! - A verdict is emitted when the verification changes (state, reasons, class, eligibility,
//!   demotion) or a check completes, each with a [`CheckRecord`] the driver stores.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use nearpath_geo::Coords;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::geoproof::{check_location, prove_proximity, RttConstraint};
use super::physics::{check_claim, Evidence, Finding, ModelEvidence, Tolerance};
use super::verdict::{
    decide, DecideInput, GatewayVote, Verification, VerificationState, MAX_VOTES,
};

/// Models kept per node (the largest by weight: they give the tightest bounds, and a node cannot
/// hide a big model behind many small ones).
pub const MAX_MODELS_PER_NODE: usize = 64;
/// Probes per full check (registration or changed GPU set).
pub const MAX_PROBES_PER_CHECK: usize = 16;
/// GPU entries and GPU UUIDs kept per node.
pub const MAX_GPUS_PER_NODE: usize = 64;
/// Gateways whose RTT is kept per node (the tightest).
pub const MAX_RTT_GATEWAYS: usize = 64;
/// Characters kept of a failed probe's error text.
const MAX_DETAIL_CHARS: usize = 200;

/// The checker's parameters (the driver maps `[checker]` config onto them).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckerParams {
    /// Random delay before the first registration probe, and between registration probes
    /// (default 2000 ms), so that probes do not look scheduled.
    pub registration_delay_max_ms: u64,
    /// Mean interval between standby probes of an idle node (default 600000 ms, exponential).
    pub idle_interval_mean_ms: u64,
    /// A probe not done after this long has failed (default 30000 ms).
    pub probe_timeout_ms: u64,
    /// Consecutive probes far below the claim (or failed) that demote a node (default 3).
    pub demote_after: u32,
    /// Votes of other gateways older than this are ignored (default 3600000 ms).
    pub vote_max_age_ms: u64,
    pub tolerance: Tolerance,
    /// Slack of the location checks, km (default 1000).
    pub slack_km: f64,
    /// This gateway's id in votes (default `local`): a vote from outside that claims this id
    /// is forged and ignored.
    pub gateway_id: String,
}

impl Default for CheckerParams {
    fn default() -> Self {
        Self {
            registration_delay_max_ms: 2000,
            idle_interval_mean_ms: 600_000,
            probe_timeout_ms: 30_000,
            demote_after: 3,
            vote_max_age_ms: 3_600_000,
            tolerance: Tolerance::default(),
            slack_km: 1000.0,
            gateway_id: "local".to_string(),
        }
    }
}

/// What a node claims when it registers (classes already derived by the gateway).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    /// One class per GPU.
    pub gpu_classes: Vec<String>,
    /// (model name, weight bytes with the driver's floor applied).
    pub models: Vec<(String, u64)>,
    pub gpu_uuids: Vec<String>,
    /// The GPU set differs from the node's previous registration (kept durably by the driver).
    pub gpu_set_changed: bool,
    pub hardware_encoder: bool,
    /// The GeoIP location of the address the node connects from.
    pub claimed_location: Option<Coords>,
    /// Whether the node's class is controlled (proximity then matters; the reasons say so).
    pub controlled: bool,
    /// The game titles the node serves. A node that serves games and no models is checked by
    /// game probes (a short session of one of its titles).
    pub games: Vec<String>,
}

/// A probe's id, unique per checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ProbeId(pub u64);

/// One measurement of a node, from a real session or a probe.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// One stream's decode rate and time to first token.
    Decode {
        model: String,
        tokens_per_s: f64,
        ttft_ms: f64,
        /// Measured on a probe session (counts toward demotion).
        from_probe: bool,
    },
    /// What a game probe delivered: frames per second (after the first frame) and the mean
    /// frame latency (capture to arrival at the gateway).
    Game {
        title: String,
        fps: f64,
        frame_latency_ms: f64,
        frames: u64,
    },
    /// The node's aggregate encode throughput (all its sessions).
    Encode {
        pixels_per_s: f64,
        fps: f64,
        width: u32,
        height: u32,
    },
}

/// A durable record of one check (the driver stores it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckRecord {
    pub node_id: String,
    /// `registration`, `standby`, `session`, `identity`, `location` or `majority`.
    pub kind: &'static str,
    /// What this gateway's own checks found: its vote in a federation. The node's state after
    /// the other gateways' votes is the verdict's `Verification::state`. A vote that echoed
    /// the majority would be counted again by the next gateway: a verdict once adopted could
    /// then never be outvoted by fresh checks.
    pub state: VerificationState,
    pub findings: Vec<Finding>,
    pub detail: String,
    pub at_ms: u64,
}

/// What the driver must do.
// A verdict is much larger than a probe start, but actions live only between `poll` and the
// driver, a few at a time: boxing would cost an allocation per verdict for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open a probe session of `model` on the node, looking like a real one; report its outcome
    /// with [`Checker::handle_probe_done`].
    StartProbe {
        id: ProbeId,
        node_id: String,
        /// The model to probe, or with `game` the game title.
        model: String,
        /// A game probe (the node serves games and no models): a short game session.
        game: bool,
    },
    /// Store `record` and apply `verification` (routing, geofence re-run on a new class).
    Verdict {
        node_id: String,
        verification: Verification,
        record: CheckRecord,
    },
}

struct Probe {
    node_id: String,
    model: String,
    game: bool,
    kind: &'static str,
    deadline: u64,
}

#[derive(Default)]
struct Node {
    facts: NodeFacts,
    idle: bool,
    /// Models of the running full check still to probe.
    queue: Vec<String>,
    next_start_at: Option<u64>,
    next_idle_at: Option<u64>,
    in_flight: Option<ProbeId>,
    best_tps: BTreeMap<String, f64>,
    best_encode: Option<f64>,
    rtt: BTreeMap<String, RttConstraint>,
    far_below_streak: u32,
    dup_uuids: BTreeSet<String>,
    checks: u32,
    checked_at: Option<u64>,
    votes: BTreeMap<String, GatewayVote>,
    last: Option<Verification>,
    /// This gateway's own finding in the last verdict (its vote).
    last_own: Option<VerificationState>,
}

/// The checker's state machine (see the module docs).
pub struct Checker {
    params: CheckerParams,
    rng: StdRng,
    nodes: BTreeMap<String, Node>,
    probes: BTreeMap<ProbeId, Probe>,
    uuid_owners: BTreeMap<String, BTreeSet<String>>,
    out: VecDeque<Action>,
    next_id: u64,
}

/// What a probe measured.
enum Measured {
    Tps(f64),
    Encode,
    /// A game probe delivered; what it measured, for the record.
    Game(String),
}

/// Whether the node has anything to probe: models, or (a game-only node) games.
fn has_targets(f: &NodeFacts) -> bool {
    !f.models.is_empty() || !f.games.is_empty()
}

fn valid_measure(v: f64) -> Option<f64> {
    (v.is_finite() && v >= 0.0).then_some(v)
}

fn truncate(s: &str) -> String {
    s.chars().take(MAX_DETAIL_CHARS).collect()
}

/// Keeps the largest weight per model name, the [`MAX_MODELS_PER_NODE`] largest models, at most
/// [`MAX_GPUS_PER_NODE`] GPU entries and distinct non-empty UUIDs.
fn sanitize(mut f: NodeFacts) -> NodeFacts {
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    for (name, w) in f.models.drain(..) {
        let e = by_name.entry(name).or_insert(0);
        *e = (*e).max(w);
    }
    let mut models: Vec<(String, u64)> = by_name.into_iter().collect();
    models.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    models.truncate(MAX_MODELS_PER_NODE);
    f.models = models;
    f.gpu_classes.truncate(MAX_GPUS_PER_NODE);
    let games: BTreeSet<String> = f.games.drain(..).filter(|g| !g.is_empty()).collect();
    f.games = games.into_iter().take(MAX_MODELS_PER_NODE).collect();
    let uuids: BTreeSet<String> = f.gpu_uuids.drain(..).filter(|u| !u.is_empty()).collect();
    f.gpu_uuids = uuids.into_iter().take(MAX_GPUS_PER_NODE).collect();
    f
}

impl Checker {
    pub fn new(params: CheckerParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            nodes: BTreeMap::new(),
            probes: BTreeMap::new(),
            uuid_owners: BTreeMap::new(),
            out: VecDeque::new(),
            next_id: 0,
        }
    }

    /// The last verification emitted for a node.
    pub fn verification(&self, node_id: &str) -> Option<&Verification> {
        self.nodes.get(node_id).and_then(|n| n.last.as_ref())
    }

    fn jitter(&mut self, now: u64) -> u64 {
        now.saturating_add(
            self.rng
                .random_range(0..=self.params.registration_delay_max_ms),
        )
    }

    fn idle_delay(&mut self, now: u64) -> u64 {
        let mean = self.params.idle_interval_mean_ms.max(1) as f64;
        let u: f64 = self.rng.random();
        // Exponential spacing, capped at ten means so that one draw cannot park a node forever.
        let d = (-mean * (1.0 - u).ln()).clamp(1.0, 10.0 * mean);
        now.saturating_add(d as u64)
    }

    /// A node registered (or registered again). Schedules a full check of its models.
    pub fn handle_registered(&mut self, now: u64, node_id: &str, facts: NodeFacts) {
        let facts = sanitize(facts);
        self.release_uuids(node_id);
        let mut node = self.nodes.remove(node_id).unwrap_or_default();
        if let Some(id) = node.in_flight.take() {
            self.probes.remove(&id);
        }
        if facts.gpu_set_changed || node.facts.gpu_classes != facts.gpu_classes {
            // Evidence measured on other GPUs says nothing about these.
            node.best_tps.clear();
            node.best_encode = None;
            node.far_below_streak = 0;
            node.checks = 0;
            node.checked_at = None;
        }
        // The probes: the largest models, in random order.
        let mut queue: Vec<String> = facts
            .models
            .iter()
            .take(MAX_PROBES_PER_CHECK)
            .map(|(m, _)| m.clone())
            .collect();
        queue.shuffle(&mut self.rng);
        // A game-only node: one game probe, of a title drawn at random.
        if queue.is_empty() && !facts.games.is_empty() {
            let i = self.rng.random_range(0..facts.games.len());
            queue.push(facts.games[i].clone());
        }
        node.next_start_at = (!queue.is_empty()).then(|| self.jitter(now));
        node.queue = queue;
        node.next_idle_at = None;
        node.facts = facts;
        let n_probes = node.queue.len();
        let detail = format!(
            "registered with {} GPU(s) and {} model(s); {} probe(s) scheduled{}",
            node.facts.gpu_classes.len(),
            node.facts.models.len(),
            n_probes,
            if node.facts.gpu_set_changed {
                "; the GPU set changed"
            } else {
                ""
            }
        );
        // Identity: a UUID another live node holds flags both.
        let mut others = BTreeSet::new();
        for u in &node.facts.gpu_uuids {
            let owners = self.uuid_owners.entry(u.clone()).or_default();
            if !owners.is_empty() {
                node.dup_uuids.insert(u.clone());
                for o in owners.iter() {
                    others.insert((o.clone(), u.clone()));
                }
            }
            owners.insert(node_id.to_string());
        }
        self.nodes.insert(node_id.to_string(), node);
        for (other, uuid) in &others {
            if let Some(n) = self.nodes.get_mut(other) {
                n.dup_uuids.insert(uuid.clone());
            }
            let d = format!("GPU UUID {uuid} also reported by node {node_id}");
            self.emit(now, other, "identity", d, true);
        }
        let kind = if others.is_empty() {
            "registration"
        } else {
            "identity"
        };
        self.emit(now, node_id, kind, detail, true);
    }

    fn release_uuids(&mut self, node_id: &str) {
        if let Some(n) = self.nodes.get(node_id) {
            for u in &n.facts.gpu_uuids {
                if let Some(owners) = self.uuid_owners.get_mut(u) {
                    owners.remove(node_id);
                    if owners.is_empty() {
                        self.uuid_owners.remove(u);
                    }
                }
            }
        }
    }

    /// A node left: its state and probes are dropped (a late probe result is ignored). A flag
    /// it caused on another node stays: a clone seen once is evidence.
    pub fn handle_left(&mut self, _now: u64, node_id: &str) {
        self.release_uuids(node_id);
        if let Some(n) = self.nodes.remove(node_id) {
            if let Some(id) = n.in_flight {
                self.probes.remove(&id);
            }
        }
    }

    /// Whether a node is idle (no user sessions): standby probes run only while it is.
    pub fn handle_idle(&mut self, now: u64, node_id: &str, idle: bool) {
        let Some(n) = self.nodes.get(node_id) else {
            return;
        };
        let schedule = idle && n.next_idle_at.is_none() && has_targets(&n.facts);
        let at = schedule.then(|| self.idle_delay(now));
        let n = self.nodes.get_mut(node_id).expect("checked above");
        n.idle = idle;
        if !idle {
            n.next_idle_at = None;
        } else if at.is_some() {
            n.next_idle_at = at;
        }
    }

    /// An RTT measurement from a gateway (this one or a peer). Invalid ones are ignored; the
    /// minimum per gateway is kept.
    pub fn handle_rtt(&mut self, now: u64, node_id: &str, c: RttConstraint) {
        if !c.is_valid() {
            return;
        }
        let Some(n) = self.nodes.get_mut(node_id) else {
            return;
        };
        let e = n
            .rtt
            .entry(c.gateway_id.clone())
            .or_insert_with(|| c.clone());
        if c.rtt_ms < e.rtt_ms || e.at != c.at {
            *e = c;
        }
        if n.rtt.len() > MAX_RTT_GATEWAYS {
            let loosest = n
                .rtt
                .iter()
                .max_by(|a, b| a.1.rtt_ms.total_cmp(&b.1.rtt_ms))
                .map(|(k, _)| k.clone())
                .expect("not empty");
            n.rtt.remove(&loosest);
        }
        self.emit(
            now,
            node_id,
            "location",
            "RTT constraint updated".into(),
            false,
        );
    }

    /// A measurement from a real session (or a probe, with `from_probe`).
    pub fn handle_sample(&mut self, now: u64, node_id: &str, sample: Sample) {
        let Some(n) = self.nodes.get_mut(node_id) else {
            return;
        };
        match sample {
            // A game probe's result comes back through `handle_probe_done` only.
            Sample::Game { .. } => return,
            Sample::Decode {
                model,
                tokens_per_s,
                from_probe,
                ..
            } => {
                let Some(tps) = valid_measure(tokens_per_s) else {
                    return;
                };
                if !n.facts.models.iter().any(|(m, _)| *m == model) {
                    return;
                }
                let best = n.best_tps.entry(model.clone()).or_insert(tps);
                *best = best.max(tps);
                if from_probe {
                    let far = self.far_below(node_id, &model, tps);
                    let n = self.nodes.get_mut(node_id).expect("present");
                    n.far_below_streak = if far { n.far_below_streak + 1 } else { 0 };
                }
            }
            Sample::Encode {
                pixels_per_s,
                fps,
                width,
                height,
            } => {
                let px = valid_measure(pixels_per_s)
                    .or_else(|| valid_measure(fps * f64::from(width) * f64::from(height)));
                // Nothing encoded is no measurement (and no evidence of anything).
                let Some(px) = px.filter(|p| *p > 0.0) else {
                    return;
                };
                let first = n.best_encode.is_none();
                n.best_encode = Some(n.best_encode.unwrap_or(0.0).max(px));
                if first {
                    // The first measurement is recorded (and shown) even when it changes
                    // nothing; later ones only when they change the verdict.
                    let d = format!("encode measured on game sessions: {px:.0} pixels/s");
                    self.emit(now, node_id, "session", d, true);
                    return;
                }
            }
        }
        self.emit(now, node_id, "session", "session measurement".into(), false);
    }

    /// Whether `tps` of `model` is far below what the node's claimed GPUs deliver.
    fn far_below(&self, node_id: &str, model: &str, tps: f64) -> bool {
        let Some(n) = self.nodes.get(node_id) else {
            return false;
        };
        let Some((_, w)) = n.facts.models.iter().find(|(m, _)| m == model) else {
            return false;
        };
        let classes: Vec<&str> = n.facts.gpu_classes.iter().map(String::as_str).collect();
        let ev = Evidence {
            models: vec![ModelEvidence {
                model: model.to_string(),
                weights_bytes: *w,
                decode_tokens_per_s: Some(tps),
            }],
            ..Evidence::default()
        };
        check_claim(&classes, &ev, &self.params.tolerance)
            .iter()
            .any(|f| matches!(f, Finding::FarBelowClaim { .. }))
    }

    /// A probe ended: its measurement, or why it failed. Unknown (or timed-out) ids are ignored.
    pub fn handle_probe_done(&mut self, now: u64, id: ProbeId, result: Result<Sample, String>) {
        let Some(p) = self.probes.remove(&id) else {
            return;
        };
        self.finish_probe(now, id, p, result);
    }

    fn finish_probe(&mut self, now: u64, id: ProbeId, p: Probe, result: Result<Sample, String>) {
        let Some(n) = self.nodes.get_mut(&p.node_id) else {
            return;
        };
        if n.in_flight == Some(id) {
            n.in_flight = None;
        }
        let measured = match result {
            Ok(Sample::Decode { tokens_per_s, .. }) if !p.game => {
                match valid_measure(tokens_per_s) {
                    // The probe's model is the one the gateway asked for, whatever the node says.
                    Some(tps) => Ok(Measured::Tps(tps)),
                    None => Err("the probe returned an invalid rate".to_string()),
                }
            }
            Ok(Sample::Game {
                fps,
                frame_latency_ms,
                frames,
                ..
            }) if p.game => match (valid_measure(fps), valid_measure(frame_latency_ms)) {
                (Some(fps), Some(lat)) => Ok(Measured::Game(format!(
                    "{frames} frames, {fps:.1} fps, frame latency {lat:.1} ms"
                ))),
                _ => Err("the game probe returned invalid numbers".to_string()),
            },
            Ok(Sample::Encode {
                pixels_per_s,
                fps,
                width,
                height,
            }) => {
                let px = valid_measure(pixels_per_s)
                    .or_else(|| valid_measure(fps * f64::from(width) * f64::from(height)));
                match px {
                    Some(px) => {
                        n.best_encode = Some(n.best_encode.unwrap_or(0.0).max(px));
                        Ok(Measured::Encode)
                    }
                    None => Err("the probe returned an invalid rate".to_string()),
                }
            }
            Ok(_) => Err("the probe returned a measurement of another kind".to_string()),
            Err(e) => Err(truncate(&e)),
        };
        let detail = match measured {
            Ok(Measured::Tps(tps)) => {
                let known = n.facts.models.iter().any(|(m, _)| *m == p.model);
                if known {
                    let best = n.best_tps.entry(p.model.clone()).or_insert(tps);
                    *best = best.max(tps);
                }
                n.checks = n.checks.saturating_add(1);
                n.checked_at = Some(now);
                let far = self.far_below(&p.node_id, &p.model, tps);
                let n = self.nodes.get_mut(&p.node_id).expect("present");
                n.far_below_streak = if far {
                    n.far_below_streak.saturating_add(1)
                } else {
                    0
                };
                format!("probe of {}: {tps:.1} tokens/s", p.model)
            }
            Ok(Measured::Game(what)) => {
                // The node delivered the session a player would have had: checked.
                n.checks = n.checks.saturating_add(1);
                n.checked_at = Some(now);
                n.far_below_streak = 0;
                format!("game probe of {}: {what}", truncate(&p.model))
            }
            Ok(Measured::Encode) => {
                n.checks = n.checks.saturating_add(1);
                n.checked_at = Some(now);
                format!("probe of {}: encode measured", p.model)
            }
            Err(e) if p.game => {
                n.far_below_streak = n.far_below_streak.saturating_add(1);
                format!("game probe of {} failed: {e}", truncate(&p.model))
            }
            Err(e) => {
                n.far_below_streak = n.far_below_streak.saturating_add(1);
                format!("probe of {} failed: {e}", p.model)
            }
        };
        // What comes next: the rest of the full check, or the next standby probe.
        let n = self.nodes.get(&p.node_id).expect("present");
        let (more, idle) = (!n.queue.is_empty(), n.idle);
        let next_start = more.then(|| self.jitter(now));
        let next_idle = (!more && idle).then(|| self.idle_delay(now));
        let n = self.nodes.get_mut(&p.node_id).expect("present");
        n.next_start_at = next_start;
        if next_idle.is_some() {
            n.next_idle_at = next_idle;
        }
        self.emit(now, &p.node_id.clone(), p.kind, detail, true);
    }

    /// Other gateways' votes on a node. A vote claiming this gateway's id is forged and ignored.
    pub fn handle_votes(&mut self, now: u64, node_id: &str, votes: Vec<GatewayVote>) {
        let max_age = self.params.vote_max_age_ms;
        let me = self.params.gateway_id.clone();
        let Some(n) = self.nodes.get_mut(node_id) else {
            return;
        };
        let mut all: Vec<GatewayVote> = n.votes.values().cloned().collect();
        all.extend(votes.into_iter().filter(|v| v.gateway_id != me));
        n.votes = super::verdict::fresh_votes(&all, now, max_age)
            .into_iter()
            .take(MAX_VOTES)
            .map(|v| (v.gateway_id.clone(), v))
            .collect();
        self.emit(
            now,
            node_id,
            "majority",
            "votes of other gateways".into(),
            false,
        );
    }

    /// The driver learnt that a GPU UUID of this node is held by another node elsewhere (for
    /// example at another gateway of the federation).
    pub fn handle_duplicate_uuid(&mut self, now: u64, node_id: &str, uuid: &str) {
        let Some(n) = self.nodes.get_mut(node_id) else {
            return;
        };
        if n.dup_uuids.len() >= MAX_GPUS_PER_NODE && !n.dup_uuids.contains(uuid) {
            return;
        }
        n.dup_uuids.insert(truncate(uuid));
        let d = format!("GPU UUID {} also reported by another node", truncate(uuid));
        self.emit(now, node_id, "identity", d, true);
    }

    /// Recomputes a node's verification; queues a verdict when it changed or `force`.
    fn emit(&mut self, now: u64, node_id: &str, kind: &'static str, detail: String, force: bool) {
        let p = &self.params;
        let Some(n) = self.nodes.get_mut(node_id) else {
            return;
        };
        let constraints: Vec<RttConstraint> = n.rtt.values().cloned().collect();
        let claimed = n.facts.claimed_location;
        let location =
            (!constraints.is_empty()).then(|| check_location(claimed, &constraints, p.slack_km));
        let proximity = match (claimed, constraints.is_empty()) {
            (Some(c), false) => Some(prove_proximity(c, &constraints, p.slack_km)),
            _ => None,
        };
        let mut input = DecideInput {
            gpu_classes: n.facts.gpu_classes.clone(),
            evidence: Evidence {
                models: n
                    .facts
                    .models
                    .iter()
                    .map(|(m, w)| ModelEvidence {
                        model: m.clone(),
                        weights_bytes: *w,
                        decode_tokens_per_s: n.best_tps.get(m).copied(),
                    })
                    .collect(),
                encode_pixels_per_s: n.best_encode,
                hardware_encoder: n.facts.hardware_encoder,
            },
            tolerance: p.tolerance,
            location,
            proximity,
            duplicate_gpu_uuids: n.dup_uuids.iter().cloned().collect(),
            gpu_set_changed: n.facts.gpu_set_changed,
            far_below_streak: n.far_below_streak,
            demote_after: p.demote_after,
            checks: n.checks,
            checked_at_ms: n.checked_at,
            votes: Vec::new(),
            now_ms: now,
            vote_max_age_ms: p.vote_max_age_ms,
            controlled: n.facts.controlled,
        };
        // This gateway's own vote is its local decision; the others' are added to it.
        let mut v = decide(&input);
        let own = v.state;
        if !n.votes.is_empty() {
            input.votes = n.votes.values().cloned().collect();
            input.votes.push(GatewayVote {
                gateway_id: p.gateway_id.clone(),
                state: v.state,
                at_ms: now,
            });
            v = decide(&input);
        }
        // A changed vote is news for the other gateways even when the majority hides it here.
        let changed = n.last.as_ref().is_none_or(|l| v.differs_from(l)) || n.last_own != Some(own);
        n.last_own = Some(own);
        if !(changed || force) {
            n.last = Some(v);
            return;
        }
        let record = CheckRecord {
            node_id: node_id.to_string(),
            kind,
            state: own,
            findings: v.findings.clone(),
            detail,
            at_ms: now,
        };
        n.last = Some(v.clone());
        self.out.push_back(Action::Verdict {
            node_id: node_id.to_string(),
            verification: v,
            record,
        });
    }

    /// Runs what is due at `now` (probe timeouts, probe starts) and returns the next action.
    pub fn poll(&mut self, now: u64) -> Option<Action> {
        let timed_out: Vec<ProbeId> = self
            .probes
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in timed_out {
            if let Some(p) = self.probes.remove(&id) {
                self.finish_probe(now, id, p, Err("timed out".to_string()));
            }
        }
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        for node_id in ids {
            self.start_due(now, &node_id);
        }
        self.out.pop_front()
    }

    fn start_due(&mut self, now: u64, node_id: &str) {
        let Some(n) = self.nodes.get_mut(node_id) else {
            return;
        };
        if n.in_flight.is_some() {
            return;
        }
        let (model, kind) = if n.next_start_at.is_some_and(|t| t <= now) && !n.queue.is_empty() {
            n.next_start_at = None;
            (n.queue.pop().expect("not empty"), "registration")
        } else if n.next_idle_at.is_some_and(|t| t <= now) && n.queue.is_empty() {
            n.next_idle_at = None;
            if !n.idle || !has_targets(&n.facts) {
                return;
            }
            let target = if n.facts.models.is_empty() {
                let i = self.rng.random_range(0..n.facts.games.len());
                n.facts.games[i].clone()
            } else {
                let i = self.rng.random_range(0..n.facts.models.len());
                n.facts.models[i].0.clone()
            };
            (target, "standby")
        } else {
            return;
        };
        // A node that serves models is probed through them; one that serves only games, by a
        // game session.
        let game = n.facts.models.is_empty();
        let id = ProbeId(self.next_id);
        self.next_id += 1;
        n.in_flight = Some(id);
        self.probes.insert(
            id,
            Probe {
                node_id: node_id.to_string(),
                model: model.clone(),
                game,
                kind,
                deadline: now.saturating_add(self.params.probe_timeout_ms),
            },
        );
        self.out.push_back(Action::StartProbe {
            id,
            node_id: node_id.to_string(),
            model,
            game,
        });
    }

    /// The next time [`Checker::poll`] has something to do (0 when an action is already queued).
    pub fn poll_timeout(&self) -> Option<u64> {
        if !self.out.is_empty() {
            return Some(0);
        }
        let probes = self.probes.values().map(|p| p.deadline);
        let nodes = self
            .nodes
            .values()
            .filter(|n| n.in_flight.is_none())
            .flat_map(|n| {
                let start = n.next_start_at.filter(|_| !n.queue.is_empty());
                let idle = n.next_idle_at.filter(|_| n.queue.is_empty());
                start.into_iter().chain(idle)
            });
        probes.chain(nodes).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::geoproof::Proximity;
    use VerificationState::*;

    const GB: u64 = 1_000_000_000;
    const FRANKFURT: Coords = Coords {
        lat: 50.11,
        lon: 8.68,
    };

    fn facts(classes: &[&str], models: &[(&str, u64)]) -> NodeFacts {
        NodeFacts {
            gpu_classes: classes.iter().map(|s| s.to_string()).collect(),
            models: models.iter().map(|(m, w)| (m.to_string(), *w)).collect(),
            ..NodeFacts::default()
        }
    }

    /// Drains every action due at `now`.
    fn drain(c: &mut Checker, now: u64) -> Vec<Action> {
        std::iter::from_fn(|| c.poll(now)).collect()
    }

    fn starts(actions: &[Action]) -> Vec<(ProbeId, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::StartProbe { id, model, .. } => Some((*id, model.clone())),
                _ => None,
            })
            .collect()
    }

    fn verdicts(actions: &[Action]) -> Vec<(Verification, CheckRecord)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Verdict {
                    verification,
                    record,
                    ..
                } => Some((verification.clone(), record.clone())),
                _ => None,
            })
            .collect()
    }

    fn decode(tps: f64) -> Result<Sample, String> {
        Ok(Sample::Decode {
            model: "ignored".into(),
            tokens_per_s: tps,
            ttft_ms: 100.0,
            from_probe: true,
        })
    }

    /// Probe starts (time, model), the verdicts seen, and the time the run ended.
    type Run = (Vec<(u64, String)>, Vec<(Verification, CheckRecord)>, u64);

    /// Runs every probe the checker starts to completion with `answer`, each taking 100 ms,
    /// until nothing is scheduled before `until`; returns (start time, model) of each probe.
    fn run(
        c: &mut Checker,
        mut now: u64,
        until: u64,
        answer: impl Fn(&str) -> Result<Sample, String>,
    ) -> Run {
        let (mut log, mut vs) = (Vec::new(), Vec::new());
        loop {
            let acts = drain(c, now);
            vs.extend(verdicts(&acts));
            for (id, model) in starts(&acts) {
                log.push((now, model.clone()));
                now += 100;
                c.handle_probe_done(now, id, answer(&model));
                vs.extend(verdicts(&drain(c, now)));
            }
            match c.poll_timeout() {
                Some(t) if t < until => now = now.max(t),
                _ => return (log, vs, now),
            }
        }
    }

    fn five_models() -> NodeFacts {
        facts(
            &["l40s"],
            &[
                ("a", 2 * GB),
                ("b", 4 * GB),
                ("c", 6 * GB),
                ("d", 8 * GB),
                ("e", 10 * GB),
            ],
        )
    }

    #[test]
    fn registration_schedule_is_deterministic_for_a_seed_and_differs_for_another() {
        let schedule = |seed| {
            let mut c = Checker::new(CheckerParams::default(), seed);
            c.handle_registered(1_000, "n1", five_models());
            run(&mut c, 1_000, u64::MAX / 2, |_| decode(50.0)).0
        };
        let a = schedule(1);
        assert_eq!(a, schedule(1));
        assert_ne!(a, schedule(2));
        // Every model once, the first within the registration delay, none idle-scheduled.
        let mut models: Vec<_> = a.iter().map(|(_, m)| m.as_str()).collect();
        models.sort_unstable();
        assert_eq!(models, ["a", "b", "c", "d", "e"]);
        assert!(a[0].0 <= 1_000 + 2_000, "{a:?}");
        for w in a.windows(2) {
            assert!(w[1].0 - (w[0].0 + 100) <= 2_000, "{a:?}");
        }
    }

    #[test]
    fn standby_probes_run_only_while_idle_at_random_intervals() {
        let mut c = Checker::new(CheckerParams::default(), 7);
        c.handle_registered(0, "n1", facts(&["l4"], &[("m", 2 * GB)]));
        let (_, _, now) = run(&mut c, 0, u64::MAX / 2, |_| decode(50.0));
        assert_eq!(c.poll_timeout(), None, "not idle: nothing scheduled");
        c.handle_idle(now, "n1", true);
        let day = 86_400_000;
        let (log, _, now) = run(&mut c, now, now + day, |_| decode(50.0));
        // About 144 probes in a day at a mean of 10 minutes; the spacing varies.
        assert!((80..=220).contains(&log.len()), "{}", log.len());
        let gaps: BTreeSet<u64> = log.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(gaps.len() > log.len() / 2, "intervals look scheduled");
        c.handle_idle(now, "n1", false);
        assert_eq!(c.poll_timeout(), None, "busy: standby probes stop");
        assert!(starts(&drain(&mut c, now + day)).is_empty());
    }

    #[test]
    fn a_probe_that_times_out_fails_counts_toward_demotion_and_a_late_answer_is_ignored() {
        let mut c = Checker::new(CheckerParams::default(), 3);
        c.handle_registered(0, "n1", facts(&["h100"], &[("m", 14 * GB)]));
        drain(&mut c, 0);
        let mut now = c.poll_timeout().unwrap();
        let (id, _) = starts(&drain(&mut c, now))[0].clone();
        now = c.poll_timeout().unwrap();
        assert!((30_000..=32_000).contains(&now), "{now}");
        let vs = verdicts(&drain(&mut c, now));
        assert_eq!(vs.len(), 1);
        assert!(vs[0].1.detail.contains("timed out"), "{:?}", vs[0].1);
        assert_eq!(vs[0].0.state, Unverified, "a failed probe proves nothing");
        c.handle_probe_done(now + 1, id, decode(1e9));
        assert!(drain(&mut c, now + 1).is_empty(), "late answer ignored");
        // Two more failures (standby probes) demote the node.
        c.handle_idle(now, "n1", true);
        let (_, vs, _) = run(
            &mut c,
            now,
            now + 86_400_000,
            |_| Err("stream reset".into()),
        );
        assert!(vs.iter().any(|(v, _)| v.demoted), "{vs:?}");
    }

    #[test]
    fn under_declared_node_is_reclassified_to_a_controlled_class() {
        // Claims an RTX 3080, serves 40 GB of weights at 50 tokens/s.
        let mut c = Checker::new(CheckerParams::default(), 11);
        c.handle_registered(0, "n1", facts(&["rtx3080"], &[("llama-70b-q4", 40 * GB)]));
        let (_, vs, _) = run(&mut c, 0, u64::MAX / 2, |_| decode(50.0));
        let (v, rec) = vs.last().unwrap();
        assert_eq!(v.state, ImpossibleClaim);
        let class = v.reclassified_to.as_deref().unwrap();
        assert_eq!(class, "a100");
        assert!(nearpath_config::default_controlled_gpu_classes()
            .iter()
            .any(|c| c == class));
        assert_eq!(rec.kind, "registration");
        assert!(rec
            .findings
            .iter()
            .any(|f| matches!(f, Finding::WeightsDoNotFit { .. })));
        assert!(rec
            .findings
            .iter()
            .any(|f| matches!(f, Finding::DecodeTooFast { .. })));
    }

    #[test]
    fn over_declared_node_is_demoted_after_three_slow_probes_but_not_by_sessions() {
        let mut c = Checker::new(CheckerParams::default(), 5);
        c.handle_registered(0, "n1", facts(&["h100"], &[("m", 14 * GB)]));
        // Real sessions far below the claim do not demote (they may be batch-loaded).
        for t in 0..10 {
            c.handle_sample(
                t,
                "n1",
                Sample::Decode {
                    model: "m".into(),
                    tokens_per_s: 1.0,
                    ttft_ms: 10.0,
                    from_probe: false,
                },
            );
        }
        let (_, vs, now) = run(&mut c, 10, u64::MAX / 2, |_| decode(1.0));
        assert!(!vs.last().unwrap().0.demoted);
        c.handle_idle(now, "n1", true);
        let (log, vs, _) = run(&mut c, now, now + 86_400_000, |_| decode(1.0));
        let first_demoted = vs.iter().position(|(v, _)| v.demoted).expect("demoted");
        assert_eq!(vs[first_demoted].0.checks, 3);
        assert!(log.len() >= 2);
        assert_eq!(vs[first_demoted].0.state, Verified);
    }

    #[test]
    fn a_good_probe_resets_the_demotion_streak() {
        let mut c = Checker::new(CheckerParams::default(), 5);
        c.handle_registered(0, "n1", facts(&["h100"], &[("a", 14 * GB), ("b", 14 * GB)]));
        let (_, vs, _) = run(&mut c, 0, u64::MAX / 2, |m| {
            decode(if m == "a" { 1.0 } else { 200.0 })
        });
        assert!(vs.iter().all(|(v, _)| !v.demoted));
    }

    #[test]
    fn a_duplicated_gpu_uuid_quarantines_both_nodes() {
        let mut c = Checker::new(CheckerParams::default(), 1);
        let mut f = facts(&["l4"], &[("m", GB)]);
        f.gpu_uuids = vec!["GPU-1234".into()];
        c.handle_registered(0, "n1", f.clone());
        drain(&mut c, 0);
        c.handle_registered(5, "n2", f);
        let vs: Vec<(String, VerificationState)> = drain(&mut c, 5)
            .into_iter()
            .filter_map(|a| match a {
                Action::Verdict {
                    node_id,
                    verification,
                    record,
                } => {
                    assert_eq!(record.kind, "identity");
                    Some((node_id, verification.state))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            vs,
            [
                ("n1".to_string(), Quarantined),
                ("n2".to_string(), Quarantined)
            ]
        );
        // A UUID reported elsewhere in the federation flags a third node.
        c.handle_registered(6, "n3", facts(&["l4"], &[("m", GB)]));
        c.handle_duplicate_uuid(7, "n3", "GPU-9");
        assert_eq!(c.verification("n3").unwrap().state, Quarantined);
        // After n1 leaves, its UUIDs are free; a new node with other UUIDs is clean.
        c.handle_left(8, "n1");
        let mut g = facts(&["l4"], &[("m", GB)]);
        g.gpu_uuids = vec!["GPU-other".into()];
        c.handle_registered(9, "n4", g);
        assert_eq!(c.verification("n4").unwrap().state, Unverified);
    }

    #[test]
    fn a_changed_gpu_set_discards_the_evidence_and_checks_again() {
        let mut c = Checker::new(CheckerParams::default(), 1);
        c.handle_registered(0, "n1", facts(&["rtx3080"], &[("m", 40 * GB)]));
        let (_, _, now) = run(&mut c, 0, u64::MAX / 2, |_| decode(50.0));
        assert_eq!(c.verification("n1").unwrap().state, ImpossibleClaim);
        let mut f = facts(&["a100"], &[("m", 40 * GB)]);
        f.gpu_set_changed = true;
        c.handle_registered(now, "n1", f);
        let v = c.verification("n1").unwrap();
        assert_eq!((v.state, v.checks), (Unverified, 0));
        assert!(v.reasons.iter().any(|r| r.contains("GPU set changed")));
        let (log, _, _) = run(&mut c, now, u64::MAX / 2, |_| decode(50.0));
        assert_eq!(log.len(), 1, "a full check again");
        assert_eq!(c.verification("n1").unwrap().state, Verified);
    }

    #[test]
    fn a_node_2000_km_from_its_claim_by_rtt_is_not_controlled_eligible() {
        let mut c = Checker::new(CheckerParams::default(), 1);
        let mut f = facts(&["l40s"], &[("m", 14 * GB)]);
        f.claimed_location = Some(FRANKFURT);
        f.controlled = true;
        c.handle_registered(0, "n1", f);
        let (_, _, now) = run(&mut c, 0, u64::MAX / 2, |_| decode(50.0));
        let rtt = |ms: f64| RttConstraint {
            gateway_id: "fra".into(),
            at: FRANKFURT,
            rtt_ms: ms,
            measured_at_ms: now,
        };
        // 20 ms of RTT from the gateway next to the claim: up to 2000 km away.
        c.handle_rtt(now, "n1", rtt(20.0));
        let vs = verdicts(&drain(&mut c, now));
        let v = &vs.last().expect("eligibility changed: a verdict").0;
        assert_eq!(v.state, Verified);
        assert!(!v.controlled_eligible);
        assert!(matches!(v.proximity, Some(Proximity::NotProven { .. })));
        assert!(
            v.reasons.iter().any(|r| r.contains("proximity")),
            "{:?}",
            v.reasons
        );
        // A faster answer later proves proximity (the minimum RTT counts).
        c.handle_rtt(now + 1, "n1", rtt(2.0));
        let vs = verdicts(&drain(&mut c, now + 1));
        assert!(vs.last().unwrap().0.controlled_eligible);
        assert_eq!(vs.last().unwrap().1.kind, "location");
        // A slower sample does not undo it; the same state emits nothing new.
        c.handle_rtt(now + 2, "n1", rtt(50.0));
        assert!(drain(&mut c, now + 2).is_empty());
    }

    #[test]
    fn a_majority_of_gateways_decides_and_a_forged_vote_for_this_gateway_is_ignored() {
        let mut c = Checker::new(CheckerParams::default(), 1);
        c.handle_registered(0, "n1", facts(&["l4"], &[("m", GB)]));
        let (_, _, now) = run(&mut c, 0, u64::MAX / 2, |_| decode(50.0));
        assert_eq!(c.verification("n1").unwrap().state, Verified);
        let vote = |gw: &str, s| GatewayVote {
            gateway_id: gw.into(),
            state: s,
            at_ms: now,
        };
        // One peer disagrees: a tie of two is disputed, never better than unverified.
        c.handle_votes(now, "n1", vec![vote("g2", Mislocated)]);
        let v = c.verification("n1").unwrap();
        assert_eq!(v.state, Unverified);
        assert_eq!(v.votes.len(), 2);
        // A forged vote in this gateway's name changes nothing.
        c.handle_votes(now, "n1", vec![vote("local", Mislocated)]);
        assert_eq!(c.verification("n1").unwrap().votes.len(), 2);
        // Two of three: mislocated.
        drain(&mut c, now);
        c.handle_votes(now, "n1", vec![vote("g3", Mislocated)]);
        assert_eq!(c.verification("n1").unwrap().state, Mislocated);
        // Regression (issue 14, federation): the record (this gateway's vote) says what this
        // gateway found, not the majority it adopted; an echoed vote would be counted again by
        // the next gateway, and fresh checks could never outvote it.
        let vs = verdicts(&drain(&mut c, now));
        let (v, record) = vs.last().expect("a verdict for the new majority");
        assert_eq!((v.state, record.state), (Mislocated, Verified));
        // Stale votes stop counting: back to this gateway's own verdict.
        c.handle_votes(now + 3_600_001, "n1", vec![]);
        assert_eq!(c.verification("n1").unwrap().state, Verified);
    }

    /// Issue 14, "Game and encode probes": the first encode measurement of a game node is
    /// recorded and shown; one beyond the claimed engines is impossible and reclassifies the
    /// node; a software encoder is never held to the NVENC bound; bad numbers are ignored.
    #[test]
    fn encode_samples_are_recorded_once_and_checked_against_the_claimed_engines() {
        let encode = |px: f64| Sample::Encode {
            pixels_per_s: px,
            fps: 0.0,
            width: 0,
            height: 0,
        };
        let mut c = Checker::new(CheckerParams::default(), 1);
        let mut f = facts(&["rtxa1000"], &[]);
        f.hardware_encoder = true;
        c.handle_registered(0, "g", f.clone());
        drain(&mut c, 0);
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            c.handle_sample(1, "g", encode(bad));
        }
        assert!(drain(&mut c, 1).is_empty(), "bad numbers change nothing");
        c.handle_sample(2, "g", encode(1.0e9));
        let v = verdicts(&drain(&mut c, 2));
        assert_eq!(v.len(), 1, "the first measurement is recorded");
        assert_eq!(v[0].0.encode_pixels_per_s, Some(1.0e9));
        assert!(v[0].0.findings.is_empty(), "{:?}", v[0].0.findings);
        c.handle_sample(3, "g", encode(1.1e9));
        assert!(
            drain(&mut c, 3).is_empty(),
            "a new number alone is no verdict"
        );
        // One A1000 engine: 2.07 Gpx/s, 2.59 with the tolerance.
        c.handle_sample(4, "g", encode(5.0e9));
        let v = verdicts(&drain(&mut c, 4));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0.state, ImpossibleClaim);
        assert!(v[0].0.reclassified_to.is_some());
        assert!(v[0]
            .0
            .findings
            .iter()
            .any(|f| matches!(f, Finding::EncodeTooFast { .. })));
        // The same with a software encoder: measured, never impossible.
        f.hardware_encoder = false;
        c.handle_registered(10, "s", f);
        drain(&mut c, 10);
        c.handle_sample(11, "s", encode(5.0e9));
        let v = verdicts(&drain(&mut c, 11));
        assert_eq!(v.len(), 1);
        assert_ne!(v[0].0.state, ImpossibleClaim);
    }

    fn game(fps: f64) -> Result<Sample, String> {
        Ok(Sample::Game {
            title: "arena".into(),
            fps,
            frame_latency_ms: 12.0,
            frames: 90,
        })
    }

    /// Issue 14, "Game and encode probes": a node that serves games and no models gets a game
    /// probe at registration (and standby ones while idle); delivering it verifies the node,
    /// failing it is recorded and counts toward demotion; a node that serves models is probed
    /// through them, never by games.
    #[test]
    fn game_only_nodes_get_game_probes_and_are_verified_by_them() {
        let mut c = Checker::new(CheckerParams::default(), 3);
        let mut f = facts(&["l4"], &[]);
        f.games = vec!["arena".into(), "kart".into(), String::new()];
        c.handle_registered(0, "g", f.clone());
        let a = drain(&mut c, 10_000);
        let probes: Vec<_> = a
            .iter()
            .filter_map(|a| match a {
                Action::StartProbe {
                    id, model, game, ..
                } => Some((*id, model.clone(), *game)),
                _ => None,
            })
            .collect();
        assert_eq!(probes.len(), 1, "one game probe per check: {probes:?}");
        let (id, title, is_game) = probes[0].clone();
        assert!(is_game && (title == "arena" || title == "kart"), "{title}");
        // A node cannot pass a game probe with an inference answer.
        c.handle_probe_done(10_001, id, decode(500.0));
        let v = verdicts(&drain(&mut c, 10_001));
        assert_eq!(v.last().unwrap().0.checks, 0);
        assert!(v.last().unwrap().1.detail.contains("failed"), "{v:?}");
        // The next one (standby, while idle) delivers.
        c.handle_idle(10_002, "g", true);
        let id = starts(&drain(&mut c, 10_002 + 6_000_000))[0].0;
        c.handle_probe_done(6_010_003, id, game(29.5));
        let v = verdicts(&drain(&mut c, 6_010_003));
        let (v, r) = v.last().unwrap();
        assert_eq!((v.state, v.checks), (Verified, 1), "{v:?}");
        assert!(r.detail.starts_with("game probe of "), "{}", r.detail);
        assert!(r.detail.contains("29.5 fps"), "{}", r.detail);
        // Three failures in a row demote it, as failed inference probes do.
        let mut now = 6_010_004;
        for _ in 0..3 {
            let id = starts(&drain(&mut c, now + 6_000_000))[0].0;
            now += 6_000_001;
            c.handle_probe_done(now, id, Err("no frames".into()));
            drain(&mut c, now);
        }
        assert!(c.verification("g").unwrap().demoted);
        // A node with a model is probed through it.
        let mut f = facts(&["l4"], &[("m", GB)]);
        f.games = vec!["arena".into()];
        c.handle_registered(0, "both", f);
        let a = drain(&mut c, 10_000);
        assert!(a.iter().all(
            |a| !matches!(a, Action::StartProbe { node_id, game: true, .. } if node_id == "both")
        ));
    }

    #[test]
    fn hostile_numbers_are_ignored() {
        let mut c = Checker::new(CheckerParams::default(), 1);
        let mut f = facts(&["l4"], &[("m", GB), ("zero", 0)]);
        f.claimed_location = Some(FRANKFURT);
        c.handle_registered(0, "n1", f);
        drain(&mut c, 0);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0] {
            c.handle_rtt(
                1,
                "n1",
                RttConstraint {
                    gateway_id: "fra".into(),
                    at: FRANKFURT,
                    rtt_ms: bad,
                    measured_at_ms: 1,
                },
            );
            for model in ["m", "zero", "unknown-model"] {
                c.handle_sample(
                    1,
                    "n1",
                    Sample::Decode {
                        model: model.into(),
                        tokens_per_s: bad,
                        ttft_ms: bad,
                        from_probe: true,
                    },
                );
            }
            c.handle_sample(
                1,
                "n1",
                Sample::Encode {
                    pixels_per_s: bad,
                    fps: bad,
                    width: u32::MAX,
                    height: u32::MAX,
                },
            );
        }
        assert!(verdicts(&drain(&mut c, 1)).is_empty(), "nothing changed");
        let v = c.verification("n1").unwrap();
        assert!(v.location.is_none() && v.findings.is_empty());
        // A probe answering NaN has failed; zero-weight models bound nothing.
        let (_, vs, _) = run(&mut c, 1, u64::MAX / 2, |_| decode(f64::NAN));
        assert!(vs.iter().all(|(v, _)| v.state == Unverified));
        assert!(vs.iter().any(|(_, r)| r.detail.contains("invalid")));
        // Events for nodes that do not exist are ignored.
        c.handle_rtt(
            2,
            "ghost",
            RttConstraint {
                gateway_id: "fra".into(),
                at: FRANKFURT,
                rtt_ms: 1.0,
                measured_at_ms: 2,
            },
        );
        c.handle_idle(2, "ghost", true);
        c.handle_votes(2, "ghost", vec![]);
        c.handle_duplicate_uuid(2, "ghost", "u");
        c.handle_probe_done(2, ProbeId(999), decode(1.0));
        c.handle_left(2, "ghost");
        assert!(drain(&mut c, 2).is_empty());
    }

    #[test]
    fn ten_thousand_models_cost_bounded_probes_and_findings() {
        let mut c = Checker::new(CheckerParams::default(), 1);
        let mut f = facts(&["rtx3080"], &[]);
        f.models = (0..10_000)
            .map(|i| (format!("m{i}"), 100 * GB + i))
            .collect();
        f.gpu_uuids = (0..10_000).map(|i| format!("GPU-{i}")).collect();
        c.handle_registered(0, "n1", f);
        let (log, vs, _) = run(&mut c, 0, u64::MAX / 2, |_| decode(1.0));
        assert_eq!(log.len(), MAX_PROBES_PER_CHECK);
        let v = &vs.last().unwrap().0;
        assert!(v.findings.len() <= crate::checker::physics::MAX_FINDINGS);
        // The largest models are the ones kept.
        assert!(log.iter().all(|(_, m)| m.as_str() >= "m9984"), "{log:?}");
        // Huge error strings are truncated in records.
        let mut c = Checker::new(CheckerParams::default(), 1);
        c.handle_registered(0, "n1", facts(&["l4"], &[("m", GB)]));
        let (_, vs, _) = run(&mut c, 0, u64::MAX / 2, |_| Err("x".repeat(1_000_000)));
        assert!(vs.iter().all(|(_, r)| r.detail.len() < 400));
    }

    #[test]
    fn unknown_classes_are_verified_by_probes_but_say_they_cannot_be_checked() {
        let mut c = Checker::new(CheckerParams::default(), 1);
        c.handle_registered(0, "n1", facts(&["unclassified"], &[("m", 900 * GB)]));
        let (_, vs, _) = run(&mut c, 0, u64::MAX / 2, |_| decode(1e6));
        let v = &vs.last().unwrap().0;
        assert_eq!(v.state, Verified);
        assert!(v.findings.is_empty());
        assert!(
            v.reasons.iter().any(|r| r.contains("no physics")),
            "{:?}",
            v.reasons
        );
    }

    #[test]
    fn verifications_and_records_serialise_for_the_admin_api() {
        let mut c = Checker::new(CheckerParams::default(), 1);
        c.handle_registered(0, "n1", facts(&["rtx3080"], &[("m", 40 * GB)]));
        let (_, vs, _) = run(&mut c, 0, u64::MAX / 2, |_| decode(50.0));
        let (v, r) = vs.last().unwrap();
        let j = serde_json::to_value(v).unwrap();
        assert_eq!(j["state"], "impossible_claim");
        assert_eq!(j["reclassified_to"], "a100");
        assert_eq!(j["findings"][0]["kind"], "weights_do_not_fit");
        let j = serde_json::to_value(r).unwrap();
        assert_eq!(j["kind"], "registration");
    }
}
