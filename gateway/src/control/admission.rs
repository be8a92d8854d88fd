//! Node admission as pure decisions over facts the driver gathered (the `Register` message, the
//! store's answer about the enrolment token, GeoIP's location, the GPU classes derived from the
//! model names, who owns the node id). Each check returns a typed [`Rejection`] whose
//! [`Rejection::code`] is the `RejectCode` the node is told: no code is chosen by matching
//! error strings.
//!
//! The checks are staged because the facts are: the store is asked about the token only after
//! the message itself passed, and the node id is claimed (a durable write) only after every
//! other check passed, so that a rejected registration never takes an id away from anyone.

use crate::gpu_class;
use crate::registry::InsertError;
use crate::store::KycStatus;
use nearpath_geo::{ClassId, Decision, Location, Policy};
use nearpath_protocol::codec::DecodeError;
use nearpath_protocol::message::{Register, RejectCode};
use nearpath_protocol::stream::StreamError;
use nearpath_protocol::PROTOCOL_VERSION;

/// Longest node id, in bytes.
pub const MAX_NODE_ID_BYTES: usize = 64;

/// Why a registration was refused. `Display` is the reason the node is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("expected Register, got {0}")]
    NotRegister(&'static str),
    #[error("no Register within 5 s")]
    RegisterTimeout,
    /// The first message did not decode; `version` when only its protocol version is wrong.
    #[error("bad Register: {detail}")]
    Malformed { version: bool, detail: String },
    #[error("protocol version {got} is not supported (this gateway speaks {PROTOCOL_VERSION})")]
    ProtocolVersion { got: u16 },
    #[error("software version {got} is older than the minimum {min}")]
    SoftwareTooOld { got: String, min: String },
    #[error("{0}")]
    BadNodeId(String),
    #[error("unknown or revoked enrolment token")]
    BadToken,
    #[error("operator {0} has not passed KYC")]
    OperatorNotVerified(String),
    #[error("operator {0} is suspended")]
    OperatorSuspended(String),
    #[error("rule {rule}: {reason} (GPU class {class}, node located in {place})")]
    Geofence {
        rule: String,
        reason: String,
        class: String,
        place: String,
    },
    #[error(
        "node id {0} belongs to another operator; node ids are never reused across operators, \
         choose another id"
    )]
    IdOfAnotherOperator(String),
    #[error("node id {node_id} is already registered by operator {existing_operator}")]
    IdConnectedElsewhere {
        node_id: String,
        existing_operator: String,
    },
    #[error(
        "node id {node_id} is already connected and live (heard from {last_heard_ms_ago} ms ago); \
         is a second instance running with the same id? A restarted node takes over once the old \
         connection has been silent for {stale_after_ms} ms"
    )]
    IdLive {
        node_id: String,
        last_heard_ms_ago: u64,
        stale_after_ms: u64,
    },
    #[error("store unavailable: {0}")]
    Store(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Rejection {
    /// The code the node is told in `Rejected` (and the metric label).
    pub fn code(&self) -> RejectCode {
        match self {
            Rejection::ProtocolVersion { .. } | Rejection::SoftwareTooOld { .. } => {
                RejectCode::Version
            }
            Rejection::Malformed { version: true, .. } => RejectCode::Version,
            Rejection::BadToken => RejectCode::BadToken,
            Rejection::OperatorNotVerified(_) => RejectCode::OperatorNotVerified,
            Rejection::OperatorSuspended(_) => RejectCode::OperatorSuspended,
            Rejection::Geofence { .. } => RejectCode::Geofence,
            Rejection::IdOfAnotherOperator(_)
            | Rejection::IdConnectedElsewhere { .. }
            | Rejection::IdLive { .. } => RejectCode::Duplicate,
            Rejection::NotRegister(_)
            | Rejection::RegisterTimeout
            | Rejection::Malformed { version: false, .. }
            | Rejection::BadNodeId(_)
            | Rejection::Store(_)
            | Rejection::Internal(_) => RejectCode::Other,
        }
    }

    /// A first message that did not decode: a protocol version this build does not speak is a
    /// version rejection (the node must upgrade), anything else is malformed.
    pub fn from_stream(e: &StreamError) -> Rejection {
        Rejection::Malformed {
            version: matches!(
                e,
                StreamError::Decode(DecodeError::UnsupportedVersion { .. })
            ),
            detail: e.to_string(),
        }
    }

    /// A registry insert that found the id taken.
    pub fn from_insert(e: InsertError, node_id: &str, stale_after_ms: u64) -> Rejection {
        match e {
            InsertError::Duplicate { existing_operator } => Rejection::IdConnectedElsewhere {
                node_id: node_id.to_string(),
                existing_operator,
            },
            InsertError::Live { last_heard_ms_ago } => Rejection::IdLive {
                node_id: node_id.to_string(),
                last_heard_ms_ago,
                stale_after_ms,
            },
        }
    }
}

/// Checks a node id: 1..=64 bytes of `A-Z a-z 0-9 . _ -`. Ids appear in logs, admin URLs and
/// the store, and one id must not pass for another (no spaces, no look-alike Unicode).
pub fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_NODE_ID_BYTES {
        return Err(format!(
            "node id must be 1 to {MAX_NODE_ID_BYTES} bytes (got {})",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "node id {:?} contains {c:?}; only A-Z a-z 0-9 . _ - are allowed",
            id.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// Whether version `a` is older than `b` (`x.y.z`, suffixes ignored, as the config validates
/// them). A version that does not parse counts as older than any: it cannot prove it is new enough.
pub fn version_less(a: &str, b: &str) -> bool {
    let parse = |s| nearpath_config::parse_version(s).unwrap_or((0, 0, 0));
    parse(a) < parse(b)
}

/// What the message alone decides: protocol version, minimum software version, node id.
pub fn check_register(reg: &Register, min_software_version: Option<&str>) -> Result<(), Rejection> {
    if reg.protocol_version != PROTOCOL_VERSION {
        return Err(Rejection::ProtocolVersion {
            got: reg.protocol_version,
        });
    }
    if let Some(min) = min_software_version {
        if version_less(&reg.software_version, min) {
            return Err(Rejection::SoftwareTooOld {
                got: reg.software_version.clone(),
                min: min.to_string(),
            });
        }
    }
    check_node_id(&reg.node_id).map_err(Rejection::BadNodeId)
}

/// What the enrolment token decides: `operator` is the store's answer (`None`: unknown or
/// revoked token), as the operator's id and KYC status.
pub fn check_operator(operator: Option<(&str, KycStatus)>) -> Result<(), Rejection> {
    match operator {
        None => Err(Rejection::BadToken),
        Some((_, KycStatus::Verified)) => Ok(()),
        Some((id, KycStatus::Pending)) => Err(Rejection::OperatorNotVerified(id.to_string())),
        Some((id, KycStatus::Suspended)) => Err(Rejection::OperatorSuspended(id.to_string())),
    }
}

/// Every class the geofence names (`controlled_gpu_classes` and the enabled rules'
/// `gpu_classes`): an unclassified GPU is checked as all of them, so it is as restricted as the
/// most restricted.
pub fn restricted_class_ids(
    geofence: &nearpath_config::GeofenceConfig,
    policy: &Policy,
) -> Vec<ClassId> {
    let mut ids: Vec<ClassId> = Vec::new();
    let named = geofence.controlled_gpu_classes.iter().chain(
        geofence
            .rules
            .iter()
            .filter(|r| r.enabled)
            .flat_map(|r| r.gpu_classes.iter())
            .filter(|c| !c.starts_with('@')),
    );
    for name in named {
        let id = policy.class_id(name);
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        ids.push(policy.class_id(gpu_class::UNCLASSIFIED));
    }
    ids
}

/// Where a location is, for reasons.
pub fn place(location: &Location) -> String {
    location
        .country
        .map(|c| c.as_str().to_string())
        .unwrap_or_else(|| "an unknown location".into())
}

/// The onboarding geofence over the node's GPU classes (as the gateway derived them; a node
/// without GPUs is `cpu`) at its location. Every class must be allowed; the classes checked are
/// returned. `count` sees every decision (for the metric).
pub fn check_onboarding(
    policy: &Policy,
    restricted: &[ClassId],
    location: &Location,
    class_names: &[String],
    mut count: impl FnMut(&Decision),
) -> Result<Vec<(String, ClassId)>, Rejection> {
    let cpu = [gpu_class::CPU.to_string()];
    let names = if class_names.is_empty() {
        &cpu[..]
    } else {
        class_names
    };
    let mut classes: Vec<(String, ClassId)> = Vec::new();
    for name in names {
        if classes.iter().any(|(n, _)| n == name) {
            continue;
        }
        let ids = if name == gpu_class::UNCLASSIFIED {
            restricted.to_vec()
        } else {
            vec![policy.class_id(name)]
        };
        for id in ids {
            let decision = policy.check_onboard(location, id);
            count(&decision);
            if let Decision::Deny { rule, reason, .. } = decision {
                return Err(Rejection::Geofence {
                    rule: rule.to_string(),
                    reason: reason.to_string(),
                    class: name.clone(),
                    place: place(location),
                });
            }
            classes.push((name.clone(), id));
        }
    }
    Ok(classes)
}

/// Who owns the node id after the claim: an id belongs to its first operator forever.
pub fn check_claim(node_id: &str, owner: &str, operator_id: &str) -> Result<(), Rejection> {
    if owner == operator_id {
        Ok(())
    } else {
        Err(Rejection::IdOfAnotherOperator(node_id.to_string()))
    }
}

/// How long a registered node must have been silent before another registration of its id
/// takes it over: two heartbeat intervals. Shorter would let a slow but live node be displaced;
/// longer keeps a restarted node out for longer (it is refused with `Duplicate` until then and
/// retries with backoff).
pub fn id_takeover_after_ms(heartbeat_ms: u64) -> u64 {
    heartbeat_ms.saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearpath_config::{GeofenceConfig, GeofenceRule, UnknownPolicy};
    use nearpath_geo::Country;
    use nearpath_protocol::message::{Capacity, Workloads};

    fn reg() -> Register {
        Register {
            protocol_version: PROTOCOL_VERSION,
            node_id: "acme-1".into(),
            enrolment_token: "tok".into(),
            software_version: "1.2.3".into(),
            gpus: vec![],
            workloads: Workloads::default(),
            capacity: Capacity::default(),
            encoders: vec![],
        }
    }

    #[test]
    fn node_ids_are_validated() {
        for ok in ["acme-gpu-1", "a", "node_7.eu-west", &"x".repeat(64)] {
            assert!(check_node_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "acme gpu",
            "acme/gpu",
            "ａcme",
            "acme\u{200b}-gpu-1",
            "node\n",
            "../etc",
        ] {
            assert!(check_node_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_less("0.1.9", "0.1.10"));
        assert!(!version_less("1.0.0", "0.9.9"));
        assert!(!version_less("1.2.3", "1.2.3"));
        assert!(version_less("garbage", "0.0.1"));
    }

    #[test]
    fn a_software_version_below_the_minimum_is_rejected_with_version() {
        let e = check_register(&reg(), Some("1.3.0")).unwrap_err();
        assert_eq!(e.code(), RejectCode::Version);
        assert!(check_register(&reg(), Some("1.2.3")).is_ok());
        assert!(check_register(&reg(), None).is_ok());
    }

    #[test]
    fn another_protocol_version_is_rejected_with_version() {
        let mut r = reg();
        r.protocol_version = PROTOCOL_VERSION + 1;
        assert_eq!(
            check_register(&r, None).unwrap_err().code(),
            RejectCode::Version
        );
    }

    #[test]
    fn an_undecodable_version_is_a_version_rejection_and_other_garbage_is_other() {
        let v = StreamError::Decode(DecodeError::UnsupportedVersion {
            message: "Register",
            got: 99,
            supported: PROTOCOL_VERSION,
        });
        assert_eq!(Rejection::from_stream(&v).code(), RejectCode::Version);
        // A message whose text mentions "version" is not a version rejection.
        let other = StreamError::Decode(DecodeError::Truncated {
            field: "Register.software_version",
        });
        assert_eq!(Rejection::from_stream(&other).code(), RejectCode::Other);
    }

    #[test]
    fn a_bad_node_id_is_rejected_with_other() {
        let mut r = reg();
        r.node_id = "no spaces".into();
        assert_eq!(
            check_register(&r, None).unwrap_err().code(),
            RejectCode::Other
        );
    }

    #[test]
    fn kyc_decides_admission() {
        assert_eq!(
            check_operator(None).unwrap_err().code(),
            RejectCode::BadToken
        );
        assert_eq!(
            check_operator(Some(("op", KycStatus::Pending)))
                .unwrap_err()
                .code(),
            RejectCode::OperatorNotVerified
        );
        assert_eq!(
            check_operator(Some(("op", KycStatus::Suspended)))
                .unwrap_err()
                .code(),
            RejectCode::OperatorSuspended
        );
        assert!(check_operator(Some(("op", KycStatus::Verified))).is_ok());
    }

    fn deny_nodes_in(cc: &str, classes: &[&str]) -> GeofenceConfig {
        GeofenceConfig {
            controlled_gpu_classes: classes.iter().map(|c| c.to_string()).collect(),
            rules: vec![GeofenceRule {
                name: "no-nodes-there".into(),
                enabled: true,
                reason: None,
                gpu_classes: classes.iter().map(|c| c.to_string()).collect(),
                workloads: vec![],
                deny_client_countries: vec![],
                deny_node_countries: vec![cc.to_string()],
                residency_client_countries: vec![],
                residency_node_countries: vec![],
                unknown_location: UnknownPolicy::Allow,
            }],
            ..GeofenceConfig::default()
        }
    }

    #[test]
    fn a_geofence_denial_is_rejected_with_geofence() {
        let cfg = deny_nodes_in("CU", &["h100"]);
        let policy = Policy::compile(&cfg).unwrap();
        let restricted = restricted_class_ids(&cfg, &policy);
        let cu = Location::from_country(Country::parse("CU").unwrap());
        let fr = Location::from_country(Country::parse("FR").unwrap());
        let mut decisions = 0;
        let e = check_onboarding(&policy, &restricted, &cu, &["h100".into()], |_| {
            decisions += 1
        })
        .unwrap_err();
        assert_eq!(e.code(), RejectCode::Geofence);
        assert_eq!(decisions, 1);
        assert!(e.to_string().contains("node located in CU"), "{e}");
        // Elsewhere, and other classes there, pass.
        let ok = check_onboarding(&policy, &restricted, &fr, &["h100".into()], |_| {}).unwrap();
        assert_eq!(ok.len(), 1);
        assert!(check_onboarding(&policy, &restricted, &cu, &["l4".into()], |_| {}).is_ok());
    }

    #[test]
    fn an_unclassified_gpu_is_as_restricted_as_the_most_restricted_class() {
        let cfg = deny_nodes_in("CU", &["h100"]);
        let policy = Policy::compile(&cfg).unwrap();
        let restricted = restricted_class_ids(&cfg, &policy);
        let cu = Location::from_country(Country::parse("CU").unwrap());
        let e = check_onboarding(
            &policy,
            &restricted,
            &cu,
            &[gpu_class::UNCLASSIFIED.to_string()],
            |_| {},
        )
        .unwrap_err();
        assert_eq!(e.code(), RejectCode::Geofence);
    }

    #[test]
    fn a_node_without_gpus_is_checked_as_cpu() {
        let cfg = deny_nodes_in("CU", &["cpu"]);
        let policy = Policy::compile(&cfg).unwrap();
        let cu = Location::from_country(Country::parse("CU").unwrap());
        assert_eq!(
            check_onboarding(&policy, &[], &cu, &[], |_| {})
                .unwrap_err()
                .code(),
            RejectCode::Geofence
        );
    }

    #[test]
    fn an_id_owned_or_held_by_someone_else_is_a_duplicate() {
        assert!(check_claim("n", "op_a", "op_a").is_ok());
        assert_eq!(
            check_claim("n", "op_a", "op_b").unwrap_err().code(),
            RejectCode::Duplicate
        );
        for e in [
            InsertError::Duplicate {
                existing_operator: "op_a".into(),
            },
            InsertError::Live {
                last_heard_ms_ago: 10,
            },
        ] {
            assert_eq!(
                Rejection::from_insert(e, "n", 1_000).code(),
                RejectCode::Duplicate
            );
        }
    }

    #[test]
    fn a_restarted_node_takes_its_id_over_after_two_heartbeat_intervals() {
        assert_eq!(id_takeover_after_ms(500), 1_000);
    }
}
