//! The checker: the gateway verifies what nodes claim (GPU class, capacity, location) against
//! physics, so that the geofence acts on what was verified rather than on a node's word.
//!
//! This module is the pure core (no I/O, no clock reads, no tokio): time is a `now_ms`
//! argument and randomness a seeded generator. An async driver feeds it from live connections,
//! probes, the store and the registry, and applies what it returns.
//!
//! - [`physics`]: a table per GPU class of memory, memory bandwidth and NVENC throughput (sources
//!   in `GPU_TABLE.md`), and the checks a claim cannot beat: weights must fit in the claimed
//!   GPUs' memory; a single stream cannot decode faster than bandwidth / weight bytes (plus a
//!   tolerance); hardware encoding cannot exceed the claimed engines. An impossible claim is
//!   reclassified to the least powerful class consistent with what the node delivered (which
//!   may be a controlled class: the driver re-runs the geofence on it). Delivering far below
//!   the class on consecutive probes demotes the node instead (not impossible, just poor).
//! - [`geoproof`]: RTT bounds the node within `rtt / 2 * 200 km` of each gateway. A GeoIP
//!   location outside such a disk is impossible (mislocated; the disks' intersection locates
//!   the node). Controlled classes also need *proximity*: the RTT to the gateway nearest the
//!   claim must fit the claim within a slack.
//! - [`verdict`]: the verification state (unverified, verified, mislocated, impossible claim,
//!   quarantined) with reasons, what `GET /admin/nodes/{id}` shows, and the majority rule
//!   across the gateways of a federation.
//! - [`schedule`]: the sans-IO [`Checker`]: probes at registration (every model, random order
//!   and timing), at random exponential intervals while a node is idle, and samples from real
//!   sessions; GPU UUID cross-checks; a verdict and a durable [`CheckRecord`] per check.
//! - Game nodes: the driver feeds the encode bound from the game relay's per-node hardware
//!   encode counters (pixels per second over 3 s windows), and a node that serves games and no
//!   models is probed by a short game session (delivered fps and frame latency) instead.
//!
//! # Honest limits
//!
//! - **Physics bounds are one-sided.** They prove a node has *at least* some capability (it
//!   delivered it); they never prove it has *no more*. A node that throttles itself looks like
//!   a smaller GPU: that is why the geofence also uses the declared class, and why delivering
//!   far below a claim only demotes.
//! - **Tolerances.** Speculative decoding and quantisation beat the naive bandwidth bound (hence
//!   +50 % by default); a node can under-report weight sizes (hence the driver's floor per model
//!   name, [`physics::weights_floor`]); batching does not speed up one stream, so the evidence
//!   is the best single-stream rate. A software encoder proves nothing about the GPU.
//!   Host-memory offload can serve a model that does not fit the claimed GPUs (slowly): it is
//!   still reported as not fitting.
//! - **RTT proves "near X", never "far from Y".** Delay can be added, never removed: a node
//!   can look farther than it is, never nearer. Proximity is a test a node must pass to serve
//!   controlled classes, and a mislocation is only found when the node is nearer a gateway
//!   than GeoIP says.
//! - **Hardware identity is self-reported.** GPU UUIDs come from the node's NVML; they are
//!   cross-checked (the same UUID on two live nodes quarantines both) but are not a root of
//!   trust: a node can invent UUIDs. They catch careless cloning, not a determined liar.
//!   A node that leaves releases its identities, and a GPU recorded for an offline node of the
//!   same operator moves to the node that reports it (a rename is not a clone); the node
//!   directory decides "offline" for other gateways, so a holder another gateway recorded in
//!   the last few seconds (not published yet) still counts as live.
//! - **Game probes play like a bot, not a person.** A probe session is opened and relayed like
//!   a player's, and sends player-like input (mouse motion, key and button presses released
//!   again, at random exponential gaps, `game_probe_input_interval_mean_ms`) through the relay.
//!   Its input does not react to the picture, and it asks for no keyframes: a node that models
//!   players closely enough could still tell. The encode count trusts the session's size, not
//!   the frames' content: sending more frames than it encoded only makes a node look faster.
//! - **Classes without physics.** An `unclassified` GPU (or one an admin added) has no row:
//!   nothing about it can be checked, and its verification says so. The geofence already
//!   treats it as the most restricted class.
//! - **Votes.** With several gateways a state counts when more than half of the gateways with a
//!   fresh vote agree; a disagreement is never better than unverified. A gateway is trusted
//!   to vote honestly (gateways are operated by one party); forged duplicate votes from one
//!   gateway id count once.

pub mod driver;
pub mod geoproof;
pub mod physics;
pub mod schedule;
pub mod verdict;

pub use geoproof::{
    check_location, prove_proximity, ConstraintView, LocationCheck, LocationVerdict, Proximity,
    RttConstraint, FIBRE_KM_PER_MS,
};
pub use physics::{
    check_claim, is_impossible, least_consistent_class, physics_of, weights_floor, ClassPhysics,
    Evidence, Finding, ModelEvidence, Tolerance, CLASS_TABLE,
};
pub use schedule::{Action, CheckRecord, Checker, CheckerParams, NodeFacts, ProbeId, Sample};
pub use verdict::{decide, majority, DecideInput, GatewayVote, Verification, VerificationState};
