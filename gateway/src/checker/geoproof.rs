//! Location against the speed of light.
//!
//! Light in fibre covers about [`FIBRE_KM_PER_MS`] km per millisecond one way, so a round trip
//! of `r` ms between a gateway and a node bounds the node within `r / 2 * 200` km of that
//! gateway: a disk. The minimum RTT seen is the one that counts (queueing only adds delay).
//!
//! - [`check_location`] tests the claimed (GeoIP) location against every disk. A claim outside
//!   a disk is impossible: the node is *nearer* that gateway than GeoIP says, and it is located
//!   by intersecting the disks (constraint-based geolocation, a small deterministic search).
//!   Disks that do not intersect mean the RTTs cannot come from one place.
//! - [`prove_proximity`] asks the converse for controlled GPU classes: the RTT to the gateway
//!   nearest the claim must fit the claim within a slack. A node behind a distant VPN exit has a
//!   large RTT and fails.
//!
//! # Honest limit
//!
//! Delay can be added, never removed: RTT proves "near X", never "far from Y". A node can always
//! look farther away than it is (by delaying its answers), so a disk never shows that a node is
//! *outside* a region; what it shows is that the node is inside the disk. Proximity is therefore
//! a requirement a node must pass, not an accusation, and a node that fails it is only not
//! eligible for controlled classes until it passes.

use nearpath_geo::{distance_km, Coords};
use serde::Serialize;

/// How far light travels in fibre per millisecond, one way (about two thirds of c).
pub const FIBRE_KM_PER_MS: f64 = 200.0;

/// At most this many constraints are used (the tightest), so the search work is bounded.
pub const MAX_CONSTRAINTS: usize = 64;

/// Half the Earth's circumference: a disk this large covers the whole planet.
const HALF_CIRCUMFERENCE_KM: f64 = std::f64::consts::PI * nearpath_geo::EARTH_RADIUS_KM;

/// One gateway's RTT to a node: the node lies within [`RttConstraint::radius_km`] of `at`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RttConstraint {
    pub gateway_id: String,
    /// Where the measuring gateway is.
    pub at: Coords,
    /// The minimum RTT seen, ms.
    pub rtt_ms: f64,
    /// When that RTT was measured (ms on the checker's clock).
    pub measured_at_ms: u64,
}

impl RttConstraint {
    /// How far from the gateway the node can be: half the RTT at fibre speed.
    pub fn radius_km(&self) -> f64 {
        self.rtt_ms / 2.0 * FIBRE_KM_PER_MS
    }

    /// Whether the constraint can be used: a finite, non-negative RTT and a valid position.
    pub fn is_valid(&self) -> bool {
        self.rtt_ms.is_finite() && self.rtt_ms >= 0.0 && valid_coords(self.at)
    }
}

/// Whether a position is finite with a latitude in [-90, 90].
pub fn valid_coords(c: Coords) -> bool {
    c.lat.is_finite() && c.lon.is_finite() && (-90.0..=90.0).contains(&c.lat)
}

/// One constraint as a decision shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConstraintView {
    pub gateway_id: String,
    pub rtt_ms: f64,
    pub radius_km: f64,
    /// Distance from the claimed location to the gateway; `None` without a claim.
    pub distance_km: Option<f64>,
    /// Whether the claim lies inside the disk (within the slack); `None` without a claim.
    pub satisfied: Option<bool>,
}

/// What the RTTs say of the claimed location.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum LocationVerdict {
    /// No usable constraint, or no claimed location to test.
    NoEvidence,
    /// The claim lies inside every disk.
    Consistent,
    /// The claim lies outside a disk; the node is within `radius_km` of `estimate`.
    Mislocated { estimate: Coords, radius_km: f64 },
    /// The disks do not intersect (within the slack): the RTTs are not consistent with one place.
    Inconsistent,
}

/// The location check and the constraints it used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocationCheck {
    pub verdict: LocationVerdict,
    pub constraints: Vec<ConstraintView>,
}

/// Whether the node proved it is near its claimed location.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Proximity {
    Proven {
        gateway_id: String,
        rtt_ms: f64,
        radius_km: f64,
        distance_km: f64,
    },
    NotProven {
        gateway_id: String,
        rtt_ms: f64,
        radius_km: f64,
        distance_km: f64,
        why: String,
    },
    NoEvidence,
}

impl Proximity {
    pub fn is_proven(&self) -> bool {
        matches!(self, Proximity::Proven { .. })
    }
}

/// The usable constraints: valid ones, the minimum RTT per gateway, the tightest
/// [`MAX_CONSTRAINTS`].
fn usable(constraints: &[RttConstraint]) -> Vec<&RttConstraint> {
    let mut best: std::collections::BTreeMap<&str, &RttConstraint> = Default::default();
    for c in constraints.iter().filter(|c| c.is_valid()) {
        let e = best.entry(c.gateway_id.as_str()).or_insert(c);
        if c.rtt_ms < e.rtt_ms {
            *e = c;
        }
    }
    let mut v: Vec<&RttConstraint> = best.into_values().collect();
    v.sort_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms));
    v.truncate(MAX_CONSTRAINTS);
    v
}

/// The point `d_km` from `p` along `bearing` (radians), on the sphere.
fn destination(p: Coords, bearing: f64, d_km: f64) -> Coords {
    let delta = d_km / nearpath_geo::EARTH_RADIUS_KM;
    let (lat1, lon1) = (p.lat.to_radians(), p.lon.to_radians());
    let lat2 = (lat1.sin() * delta.cos() + lat1.cos() * delta.sin() * bearing.cos())
        .clamp(-1.0, 1.0)
        .asin();
    let lon2 = lon1
        + (bearing.sin() * delta.sin() * lat1.cos()).atan2(delta.cos() - lat1.sin() * lat2.sin());
    let lon = (lon2.to_degrees() + 180.0).rem_euclid(360.0) - 180.0;
    Coords {
        lat: lat2.to_degrees().clamp(-90.0, 90.0),
        lon,
    }
}

/// How far outside the farthest disk `p` lies (negative: inside all of them).
fn violation(p: Coords, cs: &[&RttConstraint]) -> f64 {
    cs.iter()
        .map(|c| distance_km(p, c.at) - c.radius_km().min(HALF_CIRCUMFERENCE_KM))
        .fold(f64::NEG_INFINITY, f64::max)
}

/// A point that minimises the largest violation: a point of the disks' intersection when they
/// intersect. Deterministic pattern search (eight bearings, halving steps down to 1 km) from the
/// three best of the gateways' positions (and `hint`).
fn intersect(cs: &[&RttConstraint], hint: Option<Coords>) -> (Coords, f64) {
    let mut starts: Vec<(Coords, f64)> = cs
        .iter()
        .map(|c| c.at)
        .chain(hint)
        .map(|p| (p, violation(p, cs)))
        .collect();
    starts.sort_by(|a, b| a.1.total_cmp(&b.1));
    starts.truncate(3);
    let mut best = starts[0];
    for &(start, v0) in &starts {
        let (mut p, mut v) = (start, v0);
        let mut step = 2000.0;
        let mut moves = 0;
        while step >= 1.0 && moves < 2000 {
            moves += 1;
            let next = (0..8)
                .map(|k| destination(p, k as f64 * std::f64::consts::FRAC_PI_4, step))
                .map(|q| (q, violation(q, cs)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .expect("eight bearings");
            if next.1 < v {
                (p, v) = next;
            } else {
                step /= 2.0;
            }
            if v <= -step {
                // Deep inside every disk: further steps cannot change the verdict.
                break;
            }
        }
        if v < best.1 {
            best = (p, v);
        }
    }
    best
}

/// Tests a claimed location against the RTT constraints (see the module docs). `slack_km`
/// absorbs measurement and position error: a claim up to that far outside a disk still
/// satisfies it, and disks that miss each other by less still intersect.
pub fn check_location(
    claimed: Option<Coords>,
    constraints: &[RttConstraint],
    slack_km: f64,
) -> LocationCheck {
    let slack = if slack_km.is_finite() && slack_km >= 0.0 {
        slack_km
    } else {
        0.0
    };
    let claimed = claimed.filter(|c| valid_coords(*c));
    let cs = usable(constraints);
    let views: Vec<ConstraintView> = cs
        .iter()
        .map(|c| {
            let d = claimed.map(|p| distance_km(p, c.at));
            ConstraintView {
                gateway_id: c.gateway_id.clone(),
                rtt_ms: c.rtt_ms,
                radius_km: c.radius_km(),
                distance_km: d,
                satisfied: d.map(|d| d <= c.radius_km() + slack),
            }
        })
        .collect();
    if cs.is_empty() {
        return LocationCheck {
            verdict: LocationVerdict::NoEvidence,
            constraints: views,
        };
    }
    let (estimate, worst) = intersect(&cs, claimed);
    let verdict = if worst > slack {
        LocationVerdict::Inconsistent
    } else {
        match claimed {
            None => LocationVerdict::NoEvidence,
            Some(_) if views.iter().all(|v| v.satisfied == Some(true)) => {
                LocationVerdict::Consistent
            }
            Some(_) => {
                // Any point of disk i is within distance(estimate, gateway i) + radius i of the
                // estimate; the smallest such bound is the uncertainty.
                let radius_km = cs
                    .iter()
                    .map(|c| distance_km(estimate, c.at) + c.radius_km())
                    .fold(f64::INFINITY, f64::min);
                LocationVerdict::Mislocated {
                    estimate,
                    radius_km,
                }
            }
        }
    };
    LocationCheck {
        verdict,
        constraints: views,
    }
}

/// Whether the RTT from the gateway nearest the claim fits the claim: proven iff that
/// constraint's radius is at most the claim's distance to the gateway plus `slack_km`.
pub fn prove_proximity(claimed: Coords, constraints: &[RttConstraint], slack_km: f64) -> Proximity {
    if !valid_coords(claimed) {
        return Proximity::NoEvidence;
    }
    let slack = if slack_km.is_finite() && slack_km >= 0.0 {
        slack_km
    } else {
        0.0
    };
    let nearest = usable(constraints)
        .into_iter()
        .map(|c| (distance_km(claimed, c.at), c))
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.rtt_ms.total_cmp(&b.1.rtt_ms)));
    let Some((distance_km, c)) = nearest else {
        return Proximity::NoEvidence;
    };
    let radius_km = c.radius_km();
    if radius_km <= distance_km + slack {
        Proximity::Proven {
            gateway_id: c.gateway_id.clone(),
            rtt_ms: c.rtt_ms,
            radius_km,
            distance_km,
        }
    } else {
        Proximity::NotProven {
            gateway_id: c.gateway_id.clone(),
            rtt_ms: c.rtt_ms,
            radius_km,
            distance_km,
            why: format!(
                "an RTT of {:.1} ms to {} allows {radius_km:.0} km, more than the claimed \
                 location's {distance_km:.0} km plus {slack:.0} km of slack",
                c.rtt_ms, c.gateway_id
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lat: f64, lon: f64) -> Coords {
        Coords { lat, lon }
    }

    fn c(gw: &str, p: Coords, rtt_ms: f64) -> RttConstraint {
        RttConstraint {
            gateway_id: gw.into(),
            at: p,
            rtt_ms,
            measured_at_ms: 0,
        }
    }

    const FRANKFURT: Coords = Coords {
        lat: 50.11,
        lon: 8.68,
    };
    const LONDON: Coords = Coords {
        lat: 51.51,
        lon: -0.13,
    };
    const MADRID: Coords = Coords {
        lat: 40.42,
        lon: -3.70,
    };
    const SINGAPORE: Coords = Coords {
        lat: 1.35,
        lon: 103.82,
    };

    #[test]
    fn radius_is_half_the_rtt_at_fibre_speed() {
        assert_eq!(c("g", FRANKFURT, 10.0).radius_km(), 1000.0);
    }

    #[test]
    fn a_claim_inside_every_disk_is_consistent() {
        // A node in Paris: ~480 km from Frankfurt, ~340 km from London.
        let cs = [c("fra", FRANKFURT, 6.0), c("lon", LONDON, 5.0)];
        let r = check_location(Some(at(48.86, 2.35)), &cs, 50.0);
        assert_eq!(r.verdict, LocationVerdict::Consistent, "{r:?}");
        assert!(r.constraints.iter().all(|v| v.satisfied == Some(true)));
    }

    #[test]
    fn a_claim_outside_a_disk_is_mislocated_and_located_by_the_intersection() {
        // GeoIP says Singapore, but the node answers Frankfurt in 2 ms and London in 8 ms.
        let cs = [c("fra", FRANKFURT, 2.0), c("lon", LONDON, 8.0)];
        let r = check_location(Some(SINGAPORE), &cs, 100.0);
        match r.verdict {
            LocationVerdict::Mislocated {
                estimate,
                radius_km,
            } => {
                assert!(distance_km(estimate, FRANKFURT) <= 201.0, "{estimate:?}");
                assert!(distance_km(estimate, LONDON) <= 801.0, "{estimate:?}");
                assert!(radius_km <= 400.0 + 1.0, "{radius_km}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.constraints[0].satisfied, Some(false));
    }

    #[test]
    fn disks_that_do_not_intersect_are_inconsistent() {
        // 1 ms from Frankfurt and 1 ms from Madrid cannot both hold (1450 km apart).
        let cs = [c("fra", FRANKFURT, 1.0), c("mad", MADRID, 1.0)];
        let r = check_location(Some(FRANKFURT), &cs, 10.0);
        assert_eq!(r.verdict, LocationVerdict::Inconsistent);
    }

    #[test]
    fn hostile_rtts_and_positions_are_ignored() {
        let cs = [
            c("nan", FRANKFURT, f64::NAN),
            c("inf", FRANKFURT, f64::INFINITY),
            c("neg", FRANKFURT, -3.0),
            c("bad", at(f64::NAN, 0.0), 1.0),
            c("pole", at(91.0, 0.0), 1.0),
        ];
        let r = check_location(Some(SINGAPORE), &cs, 0.0);
        assert_eq!(r.verdict, LocationVerdict::NoEvidence);
        assert!(r.constraints.is_empty());
        assert_eq!(prove_proximity(SINGAPORE, &cs, 0.0), Proximity::NoEvidence);
        assert_eq!(
            prove_proximity(at(f64::NAN, 1.0), &[c("fra", FRANKFURT, 1.0)], 0.0),
            Proximity::NoEvidence
        );
        // A NaN claim is no claim.
        let r = check_location(Some(at(f64::NAN, 0.0)), &[c("fra", FRANKFURT, 1.0)], 0.0);
        assert_eq!(r.verdict, LocationVerdict::NoEvidence);
    }

    #[test]
    fn the_minimum_rtt_per_gateway_counts_and_work_is_bounded() {
        let mut cs = vec![c("fra", FRANKFURT, 50.0), c("fra", FRANKFURT, 2.0)];
        for i in 0..10_000 {
            cs.push(c(
                &format!("g{i}"),
                at(0.0, (i % 360) as f64 - 180.0),
                400.0,
            ));
        }
        let r = check_location(Some(SINGAPORE), &cs, 0.0);
        assert_eq!(r.constraints.len(), MAX_CONSTRAINTS);
        assert_eq!(r.constraints[0].rtt_ms, 2.0);
        assert!(matches!(r.verdict, LocationVerdict::Mislocated { .. }));
    }

    #[test]
    fn proximity_is_decided_by_the_gateway_nearest_the_claim() {
        // Claimed Frankfurt, 1 ms from the Frankfurt gateway: proven.
        let cs = [c("fra", FRANKFURT, 1.0), c("sin", SINGAPORE, 300.0)];
        let p = prove_proximity(FRANKFURT, &cs, 200.0);
        assert!(
            matches!(&p, Proximity::Proven { gateway_id, .. } if gateway_id == "fra"),
            "{p:?}"
        );
        // Claimed Frankfurt through a VPN exit, really 2000 km away: 20 ms of RTT at least.
        let cs = [c("fra", FRANKFURT, 20.0)];
        let p = prove_proximity(FRANKFURT, &cs, 1000.0);
        assert!(
            matches!(&p, Proximity::NotProven { radius_km, .. } if *radius_km == 2000.0),
            "{p:?}"
        );
        assert!(!p.is_proven());
        assert_eq!(prove_proximity(FRANKFURT, &[], 0.0), Proximity::NoEvidence);
    }

    #[test]
    fn serialised_views_name_their_verdict() {
        let r = check_location(Some(FRANKFURT), &[c("fra", FRANKFURT, 1.0)], 0.0);
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["verdict"]["verdict"], "consistent");
        assert_eq!(j["constraints"][0]["gateway_id"], "fra");
    }
}
