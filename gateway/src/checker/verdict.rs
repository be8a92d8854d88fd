//! Outcomes: the verification state of a node, its reasons, and the majority rule across
//! gateways.

use serde::{Deserialize, Serialize};

use super::geoproof::{LocationCheck, LocationVerdict, Proximity};
use super::physics::{
    check_claim, is_impossible, least_consistent_class, Evidence, Finding, Tolerance,
};

/// A node's verification state, from least to most severe (see [`VerificationState::severity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationState {
    /// No check has completed yet.
    Unverified,
    /// Checks completed and found nothing impossible.
    Verified,
    /// The RTTs put the node outside its claimed (GeoIP) location.
    Mislocated,
    /// The node delivered what its claimed GPUs cannot; it is reclassified.
    ImpossibleClaim,
    /// Cloned identity, or beyond any known class: serve nothing until an admin looks.
    Quarantined,
}

impl VerificationState {
    /// Every state, for metric labels.
    pub const ALL: [VerificationState; 5] = [
        VerificationState::Unverified,
        VerificationState::Verified,
        VerificationState::Mislocated,
        VerificationState::ImpossibleClaim,
        VerificationState::Quarantined,
    ];

    /// The state named `name` ([`Self::as_str`]), as stored in check records and votes.
    pub fn from_name(name: &str) -> Option<VerificationState> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VerificationState::Unverified => "unverified",
            VerificationState::Verified => "verified",
            VerificationState::Mislocated => "mislocated",
            VerificationState::ImpossibleClaim => "impossible_claim",
            VerificationState::Quarantined => "quarantined",
        }
    }

    /// How bad the state is: verified 0, unverified 1, mislocated 2, impossible claim 3,
    /// quarantined 4. When gateways disagree, the more severe of the local state and
    /// `unverified` holds.
    pub fn severity(self) -> u8 {
        match self {
            VerificationState::Verified => 0,
            VerificationState::Unverified => 1,
            VerificationState::Mislocated => 2,
            VerificationState::ImpossibleClaim => 3,
            VerificationState::Quarantined => 4,
        }
    }
}

/// One gateway's verdict on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayVote {
    pub gateway_id: String,
    pub state: VerificationState,
    pub at_ms: u64,
}

/// At most this many gateways' votes are counted (the newest), so a flood of forged gateway ids
/// costs bounded work.
pub const MAX_VOTES: usize = 64;

/// The latest vote per gateway not older than `max_age_ms` (a vote from the future counts as
/// now), the newest [`MAX_VOTES`], sorted by gateway id.
pub fn fresh_votes(votes: &[GatewayVote], now_ms: u64, max_age_ms: u64) -> Vec<GatewayVote> {
    let mut latest: std::collections::BTreeMap<&str, &GatewayVote> = Default::default();
    for v in votes {
        if now_ms.saturating_sub(v.at_ms) > max_age_ms {
            continue;
        }
        let e = latest.entry(v.gateway_id.as_str()).or_insert(v);
        if v.at_ms > e.at_ms {
            *e = v;
        }
    }
    let mut out: Vec<GatewayVote> = latest.into_values().cloned().collect();
    if out.len() > MAX_VOTES {
        out.sort_by(|a, b| b.at_ms.cmp(&a.at_ms).then(a.gateway_id.cmp(&b.gateway_id)));
        out.truncate(MAX_VOTES);
        out.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
    }
    out
}

/// The state more than half of the gateways agree on (each gateway's latest fresh vote counts
/// once); `None` when there is no such majority (disputed) or no fresh vote.
pub fn majority(votes: &[GatewayVote], now_ms: u64, max_age_ms: u64) -> Option<VerificationState> {
    let fresh = fresh_votes(votes, now_ms, max_age_ms);
    VerificationState::ALL.into_iter().find(|s| {
        let n = fresh.iter().filter(|v| v.state == *s).count();
        n * 2 > fresh.len()
    })
}

/// What `GET /admin/nodes/{id}` shows as `verification`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    pub state: VerificationState,
    /// Sentences that explain the state, with numbers.
    pub reasons: Vec<String>,
    /// The class the node is taken to have after an impossible claim (the geofence is re-run on it).
    pub reclassified_to: Option<String>,
    /// Whether the node may serve controlled GPU classes.
    pub controlled_eligible: bool,
    /// Whether the node delivered far below its class on consecutive probes (routing demotes it).
    pub demoted: bool,
    pub proximity: Option<Proximity>,
    pub location: Option<LocationCheck>,
    pub findings: Vec<Finding>,
    pub checked_at_ms: Option<u64>,
    /// Completed checks (probes) since the node registered (or changed its GPUs).
    pub checks: u32,
    /// The fresh votes the state was decided with (empty without a federation).
    pub votes: Vec<GatewayVote>,
    /// The best hardware encode throughput measured on the node's game sessions, pixels per
    /// second (what the NVENC bound is checked against); `None` before any was measured.
    pub encode_pixels_per_s: Option<f64>,
}

impl Verification {
    /// Whether the outcome differs from `other` in what the driver acts on (state, reasons,
    /// class, eligibility, demotion); new numbers alone are not a change.
    pub fn differs_from(&self, other: &Verification) -> bool {
        self.state != other.state
            || self.reasons != other.reasons
            || self.reclassified_to != other.reclassified_to
            || self.controlled_eligible != other.controlled_eligible
            || self.demoted != other.demoted
    }
}

/// Everything [`decide`] combines.
#[derive(Debug, Clone, Default)]
pub struct DecideInput {
    /// The claimed class of each GPU.
    pub gpu_classes: Vec<String>,
    pub evidence: Evidence,
    pub tolerance: Tolerance,
    pub location: Option<LocationCheck>,
    pub proximity: Option<Proximity>,
    /// GPU UUIDs this node shares with another live node.
    pub duplicate_gpu_uuids: Vec<String>,
    /// The GPU set differs from the node's previous registration.
    pub gpu_set_changed: bool,
    /// Consecutive probes that came back far below the claim (or failed).
    pub far_below_streak: u32,
    /// Streak at which the node is demoted (0 never demotes).
    pub demote_after: u32,
    pub checks: u32,
    pub checked_at_ms: Option<u64>,
    /// Votes of every gateway, this one's included (the checker adds its own).
    pub votes: Vec<GatewayVote>,
    pub now_ms: u64,
    pub vote_max_age_ms: u64,
    /// Whether the node's class is controlled: only then does unproven proximity make a reason.
    pub controlled: bool,
}

/// The local state before votes, and what explains it.
fn local_state(
    inp: &DecideInput,
    findings: &[Finding],
    reasons: &mut Vec<String>,
) -> (VerificationState, Option<String>) {
    if !inp.duplicate_gpu_uuids.is_empty() {
        reasons.push(format!(
            "GPU UUID(s) {} also reported by another live node",
            inp.duplicate_gpu_uuids.join(", ")
        ));
        return (VerificationState::Quarantined, None);
    }
    if findings.iter().any(is_impossible) {
        let n_gpus = inp.gpu_classes.len();
        return match least_consistent_class(n_gpus, &inp.evidence, &inp.tolerance) {
            Some(c) => {
                reasons.push(format!(
                    "reclassified to {c}: the least powerful class consistent with what it delivered"
                ));
                (VerificationState::ImpossibleClaim, Some(c.to_string()))
            }
            None => {
                reasons.push("what it delivered is beyond any known GPU class".to_string());
                (VerificationState::Quarantined, None)
            }
        };
    }
    if let Some(LocationCheck {
        verdict:
            LocationVerdict::Mislocated {
                estimate,
                radius_km,
            },
        ..
    }) = &inp.location
    {
        reasons.push(format!(
            "RTT places the node within {radius_km:.0} km of ({:.2}, {:.2}), outside its claimed location",
            estimate.lat, estimate.lon
        ));
        return (VerificationState::Mislocated, None);
    }
    if inp.checks > 0 {
        (VerificationState::Verified, None)
    } else {
        reasons.push("no check has completed yet".to_string());
        (VerificationState::Unverified, None)
    }
}

/// Combines the physics findings, the location check, proximity, identity flags and the votes
/// into one verification: a duplicate GPU UUID quarantines; an impossible finding makes an
/// impossible claim, reclassified to [`least_consistent_class`] (quarantined when no class
/// fits); a claim outside an RTT disk is mislocated; otherwise verified once a check completed.
/// With votes, the majority of the gateways that checked decides; when they disagree, the more
/// severe of the local state and unverified holds.
pub fn decide(inp: &DecideInput) -> Verification {
    let classes: Vec<&str> = inp.gpu_classes.iter().map(String::as_str).collect();
    let findings = check_claim(&classes, &inp.evidence, &inp.tolerance);
    let mut reasons: Vec<String> = findings.iter().map(ToString::to_string).collect();
    let (local, reclassified_to) = local_state(inp, &findings, &mut reasons);
    let unknown: std::collections::BTreeSet<&str> = classes
        .iter()
        .copied()
        .filter(|c| super::physics::physics_of(c).is_none())
        .collect();
    for c in unknown {
        reasons.push(format!(
            "class {c} has no physics row: its claims cannot be checked"
        ));
    }
    if inp.gpu_set_changed {
        reasons.push("the GPU set changed since the previous registration: full check".to_string());
    }
    if let Some(LocationCheck {
        verdict: LocationVerdict::Inconsistent,
        ..
    }) = &inp.location
    {
        reasons.push("the RTTs of the gateways are not consistent with one place".to_string());
    }
    let votes = fresh_votes(&inp.votes, inp.now_ms, inp.vote_max_age_ms);
    let state = if votes.len() <= 1 {
        local
    } else {
        match majority(&votes, inp.now_ms, inp.vote_max_age_ms) {
            Some(s) => {
                if s != local {
                    reasons.push(format!(
                        "a majority of {} gateways found it {}",
                        votes.len(),
                        s.as_str()
                    ));
                }
                s
            }
            None => {
                reasons.push(format!(
                    "the {} gateways that checked disagree",
                    votes.len()
                ));
                if local.severity() >= VerificationState::Unverified.severity() {
                    local
                } else {
                    VerificationState::Unverified
                }
            }
        }
    };
    let reclassified_to = reclassified_to.filter(|_| state == VerificationState::ImpossibleClaim);
    let proven = inp.proximity.as_ref().is_some_and(Proximity::is_proven);
    if let (true, Some(Proximity::NotProven { why, .. })) = (inp.controlled, &inp.proximity) {
        reasons.push(format!("proximity not proven: {why}"));
    }
    let controlled_eligible = proven
        && (state == VerificationState::Verified
            || (state == VerificationState::ImpossibleClaim && reclassified_to.is_some()));
    let demoted = inp.demote_after > 0 && inp.far_below_streak >= inp.demote_after;
    if demoted {
        reasons.push(format!(
            "delivered far below its class on {} consecutive probes: demoted",
            inp.far_below_streak
        ));
    }
    Verification {
        state,
        reasons,
        reclassified_to,
        controlled_eligible,
        demoted,
        proximity: inp.proximity.clone(),
        location: inp.location.clone(),
        findings,
        checked_at_ms: inp.checked_at_ms,
        checks: inp.checks,
        votes,
        encode_pixels_per_s: inp.evidence.encode_pixels_per_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::physics::ModelEvidence;
    use VerificationState::*;

    fn vote(gw: &str, state: VerificationState, at_ms: u64) -> GatewayVote {
        GatewayVote {
            gateway_id: gw.into(),
            state,
            at_ms,
        }
    }

    const AGE: u64 = 1000;

    #[test]
    fn majority_needs_more_than_half_of_the_gateways() {
        assert_eq!(majority(&[], 0, AGE), None);
        assert_eq!(majority(&[vote("a", Verified, 0)], 0, AGE), Some(Verified));
        // A tie is disputed.
        let v = [vote("a", Verified, 0), vote("b", Mislocated, 0)];
        assert_eq!(majority(&v, 0, AGE), None);
        let v = [
            vote("a", Verified, 0),
            vote("b", Mislocated, 0),
            vote("c", Verified, 0),
        ];
        assert_eq!(majority(&v, 0, AGE), Some(Verified));
        // Three different opinions: no majority.
        let v = [
            vote("a", Verified, 0),
            vote("b", Mislocated, 0),
            vote("c", Quarantined, 0),
        ];
        assert_eq!(majority(&v, 0, AGE), None);
    }

    #[test]
    fn majority_ignores_stale_votes_and_keeps_each_gateways_latest() {
        let v = [
            vote("a", Mislocated, 0),
            vote("b", Mislocated, 0),
            vote("c", Verified, 5000),
        ];
        // a and b are stale at 5000: c alone decides.
        assert_eq!(majority(&v, 5000, AGE), Some(Verified));
        // a's newer vote replaces its older one.
        let v = [
            vote("a", Mislocated, 10),
            vote("a", Verified, 20),
            vote("b", Verified, 20),
        ];
        assert_eq!(majority(&v, 20, AGE), Some(Verified));
    }

    #[test]
    fn forged_duplicate_votes_from_one_gateway_count_once() {
        let mut v = vec![vote("honest1", Verified, 5), vote("honest2", Verified, 5)];
        for _ in 0..100 {
            v.push(vote("liar", Quarantined, 5));
        }
        assert_eq!(majority(&v, 5, AGE), Some(Verified));
        // A flood of invented gateway ids is bounded.
        let flood: Vec<_> = (0..10_000)
            .map(|i| vote(&format!("g{i}"), Quarantined, 5))
            .collect();
        assert_eq!(fresh_votes(&flood, 5, AGE).len(), MAX_VOTES);
    }

    #[test]
    fn the_metrics_label_list_is_the_states_and_names_parse_back() {
        // `metrics` sits below the checker and keeps its own list for the zero series.
        let names: Vec<_> = VerificationState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, crate::metrics::label_values::VERIFICATION_STATES);
        for s in VerificationState::ALL {
            assert_eq!(VerificationState::from_name(s.as_str()), Some(s));
        }
        assert_eq!(VerificationState::from_name("trusted"), None);
    }

    #[test]
    fn states_have_labels_and_a_severity_order() {
        let labels: Vec<_> = VerificationState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            labels,
            [
                "unverified",
                "verified",
                "mislocated",
                "impossible_claim",
                "quarantined"
            ]
        );
        for s in VerificationState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!(Verified.severity() < Unverified.severity());
        assert!(Mislocated.severity() < ImpossibleClaim.severity());
        assert!(ImpossibleClaim.severity() < Quarantined.severity());
    }

    fn input(classes: &[&str], weights: u64, tps: Option<f64>) -> DecideInput {
        DecideInput {
            gpu_classes: classes.iter().map(|s| s.to_string()).collect(),
            evidence: Evidence {
                models: vec![ModelEvidence {
                    model: "m".into(),
                    weights_bytes: weights,
                    decode_tokens_per_s: tps,
                }],
                ..Evidence::default()
            },
            checks: 1,
            demote_after: 3,
            vote_max_age_ms: AGE,
            proximity: Some(Proximity::Proven {
                gateway_id: "g".into(),
                rtt_ms: 1.0,
                radius_km: 100.0,
                distance_km: 100.0,
            }),
            ..DecideInput::default()
        }
    }

    #[test]
    fn decide_orders_identity_physics_location() {
        let gb = 1_000_000_000;
        let v = decide(&input(&["l4"], 14 * gb, Some(10.0)));
        assert_eq!(v.state, Verified);
        assert!(v.controlled_eligible);
        let mut i = input(&["l4"], 14 * gb, Some(10.0));
        i.checks = 0;
        assert_eq!(decide(&i).state, Unverified);
        assert!(!decide(&i).controlled_eligible);
        let v = decide(&input(&["rtx3080"], 40 * gb, Some(50.0)));
        assert_eq!(v.state, ImpossibleClaim);
        assert_eq!(v.reclassified_to.as_deref(), Some("a100"));
        assert!(
            v.controlled_eligible,
            "eligibility then depends on the geofence"
        );
        let v = decide(&input(&["rtx3080"], 100_000 * gb, None));
        assert_eq!(v.state, Quarantined);
        let mut i = input(&["l4"], 14 * gb, Some(10.0));
        i.duplicate_gpu_uuids = vec!["GPU-1".into()];
        let v = decide(&i);
        assert_eq!(v.state, Quarantined);
        assert!(!v.controlled_eligible);
        assert!(
            v.reasons.iter().any(|r| r.contains("GPU-1")),
            "{:?}",
            v.reasons
        );
    }

    #[test]
    fn unproven_proximity_removes_controlled_eligibility() {
        let mut i = input(&["l4"], 1_000_000_000, Some(10.0));
        i.proximity = Some(Proximity::NotProven {
            gateway_id: "g".into(),
            rtt_ms: 20.0,
            radius_km: 2000.0,
            distance_km: 0.0,
            why: "far".into(),
        });
        let v = decide(&i);
        assert_eq!(v.state, Verified);
        assert!(!v.controlled_eligible);
        i.proximity = None;
        assert!(!decide(&i).controlled_eligible);
    }

    #[test]
    fn votes_decide_and_a_dispute_is_never_better_than_unverified() {
        let mut i = input(&["l4"], 1_000_000_000, Some(10.0));
        i.votes = vec![
            vote("a", Verified, 0),
            vote("b", Mislocated, 0),
            vote("c", Mislocated, 0),
        ];
        assert_eq!(decide(&i).state, Mislocated);
        i.votes = vec![vote("a", Verified, 0), vote("b", Mislocated, 0)];
        let v = decide(&i);
        assert_eq!(v.state, Unverified);
        assert!(!v.controlled_eligible);
    }

    #[test]
    fn demotion_needs_the_configured_streak() {
        let mut i = input(&["h100"], 14_000_000_000, Some(1.0));
        i.far_below_streak = 2;
        assert!(!decide(&i).demoted);
        i.far_below_streak = 3;
        let v = decide(&i);
        assert!(v.demoted);
        assert_eq!(v.state, Verified, "far below is not impossible");
    }
}
