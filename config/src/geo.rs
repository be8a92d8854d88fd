//! The `[geo]` and `[geofence]` sections of the gateway config.
//!
//! These are plain data: the `geo` crate compiles them into a lookup-ready database and policy.
//! Validation (country codes, CIDRs, set references, duplicate names) happens once in
//! [`crate::validate`], so everything downstream may assume well-formed values.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `[geo]`: where location answers come from.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
    /// MaxMind DB file: GeoIP2/GeoLite2 City or Country, or the flat `{country_code}` schema.
    /// Default: none, which means the database embedded in the binary (NRO WHOIS country data).
    pub database: Option<PathBuf>,
    /// Optional GeoIP2 Anonymous-IP database. Default: none (no address is treated as anonymous).
    pub anonymous_ip_database: Option<PathBuf>,
    /// How often the gateway checks the database files for replacement, in seconds; 0 disables
    /// the check (a reload can still be requested through the admin API). Default: 30.
    pub reload_check_interval_s: u64,
    /// Static answers checked before the database, for loopback/private ranges and tests.
    /// Overlapping prefixes are refused at load.
    pub overrides: Vec<GeoOverride>,
}

impl Default for GeoConfig {
    fn default() -> Self {
        Self {
            database: None,
            anonymous_ip_database: None,
            reload_check_interval_s: 30,
            overrides: Vec::new(),
        }
    }
}

/// One `[[geo.overrides]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GeoOverride {
    /// The prefix this answer covers, e.g. `127.0.0.2/32` or `10.0.0.0/8`.
    pub cidr: IpNet,
    /// ISO 3166-1 alpha-2 country code, upper case.
    pub country: String,
    /// ISO 3166-2 subdivision, with the country prefix (`UA-43`). Optional.
    #[serde(default)]
    pub subdivision: Option<String>,
    /// Latitude in degrees. When both `lat` and `lon` are absent the country centroid is used.
    #[serde(default)]
    pub lat: Option<f64>,
    /// Longitude in degrees.
    #[serde(default)]
    pub lon: Option<f64>,
}

/// What to do with a request or node whose location is unknown (no record, no country).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownPolicy {
    /// Treat the location as allowed by every country rule.
    Allow,
    /// Deny.
    Deny,
}

/// What to do with an address the Anonymous-IP database flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnonymousPolicy {
    /// Ignore the flags.
    Allow,
    /// Deny controlled GPU classes only (their location cannot be trusted).
    DenyControlled,
    /// Deny everything.
    Deny,
}

/// One Anonymous-IP flag, named as in the GeoIP2 database without the `is_` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnonymousFlag {
    Anonymous,
    AnonymousVpn,
    HostingProvider,
    PublicProxy,
    ResidentialProxy,
    TorExitNode,
}

/// A workload kind a rule may be limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    Game,
    Inference,
}

/// `[geofence]`: rules are data, evaluated in order; the first rule that denies decides.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeofenceConfig {
    /// GPU classes subject to export control (ECCN 3A090/4A090). Rules refer to this list as
    /// `@controlled` in `gpu_classes`, and the unknown-location and anonymous policies use it.
    /// Default: the reviewed list in [`default_controlled_gpu_classes`].
    pub controlled_gpu_classes: Vec<String>,
    /// Unknown location, for controlled GPU classes. Default: deny.
    pub unknown_location_controlled: UnknownPolicy,
    /// Unknown location, for everything else. Default: allow.
    pub unknown_location_uncontrolled: UnknownPolicy,
    /// Anonymous-IP handling (only with `geo.anonymous_ip_database`). Default: deny_controlled.
    pub anonymous: AnonymousPolicy,
    /// Which flags count as anonymous. Default: all six.
    pub anonymous_flags: Vec<AnonymousFlag>,
    /// Named country sets, referred to as `@name`. Members are ISO 3166-1 alpha-2 codes,
    /// ISO 3166-2 subdivisions (`UA-43`), or other sets (`@ofac`). Defaults: `ofac`,
    /// `export_controlled`, `eu` (see [`default_country_sets`]); an operator's set with the same
    /// name replaces the default one.
    pub country_sets: BTreeMap<String, Vec<String>>,
    /// The rules, in order. Default: [`default_rules`].
    pub rules: Vec<GeofenceRule>,
}

/// One `[[geofence.rules]]` entry.
///
/// A rule *applies* to a (client, node) pair when the node's GPU class is in `gpu_classes`
/// (empty: every class) and the workload is in `workloads` (empty: every kind). An applying rule
/// denies when the client is in `deny_client_countries`, or the node is in
/// `deny_node_countries`, or (residency) the client is in `residency_client_countries` and the node
/// is not in `residency_node_countries`. Onboarding a node checks `deny_node_countries` only.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GeofenceRule {
    /// Unique name, reported in every decision this rule makes.
    pub name: String,
    /// Off rules are kept in the file but not evaluated. Default: true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Human-readable reason given to the denied party. Default: derived from the rule.
    #[serde(default)]
    pub reason: Option<String>,
    /// GPU classes this rule applies to; `@controlled` stands for `controlled_gpu_classes`.
    /// Empty: all classes.
    #[serde(default)]
    pub gpu_classes: Vec<String>,
    /// Workload kinds this rule applies to. Empty: all.
    #[serde(default)]
    pub workloads: Vec<WorkloadKind>,
    /// Clients located here are denied.
    #[serde(default)]
    pub deny_client_countries: Vec<String>,
    /// Nodes located here are denied: they are refused at onboarding and never serve.
    #[serde(default)]
    pub deny_node_countries: Vec<String>,
    /// Residency: clients located here ...
    #[serde(default)]
    pub residency_client_countries: Vec<String>,
    /// ... may only be served by nodes located here.
    #[serde(default)]
    pub residency_node_countries: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for GeofenceConfig {
    fn default() -> Self {
        Self {
            controlled_gpu_classes: default_controlled_gpu_classes(),
            unknown_location_controlled: UnknownPolicy::Deny,
            unknown_location_uncontrolled: UnknownPolicy::Allow,
            anonymous: AnonymousPolicy::DenyControlled,
            anonymous_flags: vec![
                AnonymousFlag::Anonymous,
                AnonymousFlag::AnonymousVpn,
                AnonymousFlag::HostingProvider,
                AnonymousFlag::PublicProxy,
                AnonymousFlag::ResidentialProxy,
                AnonymousFlag::TorExitNode,
            ],
            country_sets: default_country_sets(),
            rules: default_rules(),
        }
    }
}

/// GPU classes subject to export control by default: ECCN 3A090/4A090 (total processing
/// performance >= 4800, or >= 1600 with high performance density). Reviewed list; consumer cards
/// below the threshold (rtx3080, rtx4080, ...) and `cpu` are deliberately absent.
pub fn default_controlled_gpu_classes() -> Vec<String> {
    [
        "a100", "a800", "h100", "h800", "h20", "h200", "b100", "b200", "gb200", "l40", "l40s",
        "rtx4090", "mi250", "mi300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The default named country sets.
pub fn default_country_sets() -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    // OFAC comprehensive sanctions: Cuba, Iran, North Korea, and the occupied regions of Ukraine
    // (Crimea UA-43, Sevastopol UA-40, Donetsk UA-14, Luhansk UA-09). Syria's comprehensive
    // programme was lifted in 2025; add it back here if policy requires.
    m.insert(
        "ofac".to_string(),
        s(&["CU", "IR", "KP", "UA-43", "UA-40", "UA-14", "UA-09"]),
    );
    // Destinations for export-controlled accelerators: the named list plus Country Group D:5
    // (US EAR Supplement No. 1 to part 740, arms-embargoed countries). Reviewed list.
    m.insert(
        "export_controlled".to_string(),
        s(&[
            "CN", "HK", "MO", "RU", "BY", "IR", "KP", "CU", "SY", "VE", // named in policy
            "AF", "CF", "CD", "ER", "HT", "IQ", "LB", "LY", "MM", "NI", "SO", "SS", "SD", "ZW",
            // D:5 remainder
        ]),
    );
    m.insert(
        "eu".to_string(),
        s(&[
            "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE",
            "IT", "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE",
        ]),
    );
    m
}

/// The default rules: sanctions deny everything both ways; controlled GPUs neither serve
/// `@export_controlled` clients nor onboard from there; EU residency is present but off.
pub fn default_rules() -> Vec<GeofenceRule> {
    let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    vec![
        GeofenceRule {
            name: "sanctions".into(),
            enabled: true,
            reason: Some("service is not available in comprehensively sanctioned places".into()),
            gpu_classes: vec![],
            workloads: vec![],
            deny_client_countries: s(&["@ofac"]),
            deny_node_countries: s(&["@ofac"]),
            residency_client_countries: vec![],
            residency_node_countries: vec![],
        },
        GeofenceRule {
            name: "export-control".into(),
            enabled: true,
            reason: Some("export-controlled GPU classes are not available in this country".into()),
            gpu_classes: s(&["@controlled"]),
            workloads: vec![],
            deny_client_countries: s(&["@export_controlled"]),
            deny_node_countries: s(&["@export_controlled"]),
            residency_client_countries: vec![],
            residency_node_countries: vec![],
        },
        GeofenceRule {
            name: "eu-residency".into(),
            enabled: false,
            reason: Some("EU clients are served only from EU nodes".into()),
            gpu_classes: vec![],
            workloads: vec![],
            deny_client_countries: vec![],
            deny_node_countries: vec![],
            residency_client_countries: s(&["@eu"]),
            residency_node_countries: s(&["@eu"]),
        },
    ]
}
