//! The `[geo]` and `[geofence]` sections of the gateway config.
//!
//! These are plain data: the `geo` crate compiles them into a lookup-ready database and policy.
//! Validation (country codes, CIDRs, set references, duplicate names) happens once, when the
//! gateway configuration is validated ([`crate::GatewayConfig::validate`], which every loader
//! runs), so everything downstream may assume well-formed values.
//!
//! Regions below country level (`UA-43`) can only be seen with a City database that carries
//! subdivisions; with a country-only database (the embedded one included) a subdivision entry
//! never matches, and only the country-level entries of a rule take effect.

use crate::error::Problems;
use crate::iso::{country_problem, is_iso_country, subdivision_problem};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, BTreeSet};
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
    /// Overlapping prefixes are refused at load. An IPv6 address that embeds an IPv4 address
    /// (see `nat64_prefixes`) is matched by its IPv4 address, here as in the database.
    pub overrides: Vec<GeoOverride>,
    /// NAT64 prefixes of your network (RFC 6052 network-specific prefixes, e.g.
    /// `64:ff9b:1::/96`), whose addresses are located by the IPv4 address they embed. Lengths
    /// 32, 40, 48, 56, 64 and 96 are allowed (the RFC 6052 layouts, bits 64..71 skipped).
    /// The well-known prefix `64:ff9b::/96`, 6to4 (`2002::/16`), Teredo (`2001::/32`),
    /// IPv4-mapped and IPv4-compatible addresses are always located by their IPv4 address and
    /// need no entry. Default: [].
    pub nat64_prefixes: Vec<IpNet>,
}

/// Prefix lengths RFC 6052 defines for an IPv4-embedded IPv6 address.
pub const NAT64_PREFIX_LENGTHS: [u8; 6] = [32, 40, 48, 56, 64, 96];

/// IPv6 ranges whose addresses always embed an IPv4 address (see [`GeoConfig::nat64_prefixes`]);
/// a configured NAT64 prefix must not overlap them.
pub const BUILTIN_IPV4_EMBEDDING_PREFIXES: [&str; 6] = [
    "::/96",
    "::ffff:0:0/96",
    "::ffff:0:0:0/96",
    "64:ff9b::/96",
    "2001::/32",
    "2002::/16",
];

impl Default for GeoConfig {
    fn default() -> Self {
        Self {
            database: None,
            anonymous_ip_database: None,
            reload_check_interval_s: 30,
            overrides: Vec::new(),
            nat64_prefixes: Vec::new(),
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
    /// ISO 3166-2 subdivision, with the country prefix (`UA-43`), which must be `country`'s.
    /// Default: none.
    #[serde(default)]
    pub subdivision: Option<String>,
    /// Latitude in degrees, in [-90, 90]. Give both `lat` and `lon` or neither; when both are
    /// absent the country centroid is used. Default: none.
    #[serde(default)]
    pub lat: Option<f64>,
    /// Longitude in degrees, in [-180, 180]. Default: none.
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
    /// `is_anonymous`: any of the other flags.
    Anonymous,
    /// `is_anonymous_vpn`: a VPN provider's exit.
    AnonymousVpn,
    /// `is_hosting_provider`: a hosting or cloud provider's range.
    HostingProvider,
    /// `is_public_proxy`: an open proxy.
    PublicProxy,
    /// `is_residential_proxy`: a proxy on a residential network.
    ResidentialProxy,
    /// `is_tor_exit_node`: a Tor exit.
    TorExitNode,
}

/// A workload kind a rule may be limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// A streamed game session.
    Game,
    /// An inference request.
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
    /// `export_controlled`, `eu` (see [`default_country_sets`]). Sets given in the file are
    /// added to the defaults, and one with a default's name replaces that default; a default set
    /// cannot be removed, only emptied (`eu = []`). Names are lower-case letters, digits, `_` and
    /// `-`; `controlled` is reserved for the GPU class set.
    #[serde(deserialize_with = "merge_default_country_sets")]
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
    /// Unique name, reported in every decision this rule makes (and so in logs and metric labels):
    /// 1 to 64 characters of `A-Z a-z 0-9 . _ -`. Required.
    pub name: String,
    /// Off rules are kept in the file but not evaluated. Default: true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Human-readable reason given to the denied party. Default: derived from the rule.
    #[serde(default)]
    pub reason: Option<String>,
    /// GPU classes this rule applies to; `@controlled` stands for `controlled_gpu_classes`.
    /// Empty: all classes. Default: [].
    #[serde(default)]
    pub gpu_classes: Vec<String>,
    /// Workload kinds this rule applies to (`game`, `inference`). Empty: all. Default: [].
    #[serde(default)]
    pub workloads: Vec<WorkloadKind>,
    /// Clients located here are denied. Entries: country codes, subdivisions, `@set`s. Default: [].
    #[serde(default)]
    pub deny_client_countries: Vec<String>,
    /// Nodes located here are denied: they are refused at onboarding and never serve. Default: [].
    #[serde(default)]
    pub deny_node_countries: Vec<String>,
    /// Residency: clients located here ... (set both residency lists or neither). Default: [].
    #[serde(default)]
    pub residency_client_countries: Vec<String>,
    /// ... may only be served by nodes located here. Default: [].
    #[serde(default)]
    pub residency_node_countries: Vec<String>,
    /// What this rule does with a side whose location is unknown (no country). `allow`: an
    /// unknown location is in none of the rule's lists, so the rule never denies it (the
    /// `unknown_location_*` policies then decide). `deny`: the rule assumes the worst, so an
    /// unknown location is in every deny list and residency client list and in no residency
    /// node list, and the rule denies it under its own name. Default: `allow`.
    #[serde(default = "unknown_allow")]
    pub unknown_location: UnknownPolicy,
}

fn unknown_allow() -> UnknownPolicy {
    UnknownPolicy::Allow
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
            "AF", "CF", "CD", "ER", "HT", "IQ", "LB", "LY", "MM", "NI", "SO", "SS", "SD",
            "ZW",
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
            unknown_location: UnknownPolicy::Allow,
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
            unknown_location: UnknownPolicy::Allow,
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
            unknown_location: UnknownPolicy::Allow,
        },
    ]
}

/// Reads `geofence.country_sets` from a file: the file's sets on top of the defaults, so that a
/// file adding one set does not silently drop `@ofac` (which the default rules refer to).
fn merge_default_country_sets<'de, D>(d: D) -> Result<BTreeMap<String, Vec<String>>, D::Error>
where
    D: Deserializer<'de>,
{
    let given = BTreeMap::<String, Vec<String>>::deserialize(d)?;
    let mut sets = default_country_sets();
    sets.extend(given);
    Ok(sets)
}

/// The name `@controlled` stands for in a rule's `gpu_classes`.
pub const CONTROLLED_SET: &str = "controlled";

/// A list of countries, subdivisions and `@set`s, with every set expanded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpandedCountries {
    /// ISO 3166-1 alpha-2 codes (`CN`).
    pub countries: BTreeSet<String>,
    /// ISO 3166-2 codes with the country prefix (`UA-43`).
    pub subdivisions: BTreeSet<String>,
}

impl ExpandedCountries {
    /// Whether a location is covered: its country is listed, or its subdivision (`UA-43`) is.
    pub fn contains(&self, country: &str, subdivision: Option<&str>) -> bool {
        self.countries.contains(country)
            || subdivision.is_some_and(|s| self.subdivisions.contains(s))
    }

    /// Whether nothing is listed.
    pub fn is_empty(&self) -> bool {
        self.countries.is_empty() && self.subdivisions.is_empty()
    }
}

impl GeofenceConfig {
    /// Expands a country list such as `["@ofac", "CN", "UA-43"]` into countries and
    /// subdivisions, following set references recursively.
    ///
    /// Errors (a message naming the bad entry) on an unknown set, `@controlled`, a reference
    /// cycle or a malformed code; a validated configuration has none.
    pub fn expand_countries(&self, list: &[String]) -> Result<ExpandedCountries, String> {
        let mut out = ExpandedCountries::default();
        let mut stack = Vec::new();
        self.expand_into(list, &mut out, &mut stack)?;
        Ok(out)
    }

    fn expand_into<'a>(
        &'a self,
        list: &'a [String],
        out: &mut ExpandedCountries,
        stack: &mut Vec<&'a str>,
    ) -> Result<(), String> {
        for entry in list {
            if let Some(name) = entry.strip_prefix('@') {
                let members = self.country_set(name)?;
                if let Some(pos) = stack.iter().position(|s| *s == name) {
                    return Err(cycle_message(&stack[pos..], name));
                }
                stack.push(name);
                self.expand_into(members, out, stack)?;
                stack.pop();
            } else if entry.contains('-') {
                if let Some(problem) = subdivision_problem(entry) {
                    return Err(problem);
                }
                out.subdivisions.insert(entry.clone());
            } else if is_iso_country(entry) {
                out.countries.insert(entry.clone());
            } else {
                return Err(country_problem(entry));
            }
        }
        Ok(())
    }

    /// The members of country set `name` (without the `@`).
    fn country_set(&self, name: &str) -> Result<&[String], String> {
        if name == CONTROLLED_SET {
            return Err(format!(
                "\"@{CONTROLLED_SET}\" is the set of controlled GPU classes; it belongs in \
                 gpu_classes, not in a country list"
            ));
        }
        self.country_sets
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("unknown country set \"@{name}\""))
    }

    /// Expands a rule's `gpu_classes`: `@controlled` becomes `controlled_gpu_classes`, every
    /// other entry is taken as a class name. An empty result from an empty list means "every
    /// class" to the rule; callers must keep that distinction.
    pub fn expand_gpu_classes(&self, list: &[String]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for entry in list {
            if entry.strip_prefix('@') == Some(CONTROLLED_SET) {
                out.extend(self.controlled_gpu_classes.iter().cloned());
            } else {
                out.insert(entry.clone());
            }
        }
        out
    }

    /// Whether `class` is subject to export control (in `controlled_gpu_classes`).
    pub fn is_controlled(&self, class: &str) -> bool {
        self.controlled_gpu_classes.iter().any(|c| c == class)
    }

    /// The rules that are evaluated (`enabled = true`), in order.
    pub fn enabled_rules(&self) -> impl Iterator<Item = &GeofenceRule> {
        self.rules.iter().filter(|r| r.enabled)
    }
}

fn cycle_message(stack: &[&str], back_to: &str) -> String {
    let mut chain: Vec<String> = stack.iter().map(|s| format!("@{s}")).collect();
    chain.push(format!("@{back_to}"));
    format!(
        "country sets refer to each other in a cycle: {}",
        chain.join(" -> ")
    )
}

/// Whether `name` is a GPU class name: non-empty, lower-case ASCII letters, digits and `_`.
pub fn is_gpu_class_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

pub(crate) fn gpu_class_name_problem(name: &str) -> String {
    format!("{name:?} is not a GPU class name (lower-case letters, digits and _)")
}

fn is_set_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// 1 to 64 characters of `A-Z a-z 0-9 . _ -`: the shape of names that end up in logs, metric
/// labels and (for nodes) the wire protocol.
pub(crate) fn is_label(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl GeoConfig {
    pub(crate) fn check(&self, p: &mut Problems) {
        for (field, path) in [
            ("geo.database", &self.database),
            ("geo.anonymous_ip_database", &self.anonymous_ip_database),
        ] {
            if path.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
                p.push(field, "must not be empty (leave it out instead)");
            }
        }
        for (i, o) in self.overrides.iter().enumerate() {
            let at = format!("geo.overrides[{i}]");
            if o.cidr != o.cidr.trunc() {
                p.push(
                    format!("{at}.cidr"),
                    format!(
                        "{} has host bits set (did you mean {}?)",
                        o.cidr,
                        o.cidr.trunc()
                    ),
                );
            }
            if !is_iso_country(&o.country) {
                p.push(format!("{at}.country"), country_problem(&o.country));
            }
            if let Some(sub) = &o.subdivision {
                if let Some(problem) = subdivision_problem(sub) {
                    p.push(format!("{at}.subdivision"), problem);
                } else if sub.split_once('-').map(|(c, _)| c) != Some(o.country.as_str()) {
                    p.push(
                        format!("{at}.subdivision"),
                        format!("{sub:?} is not a subdivision of {:?}", o.country),
                    );
                }
            }
            match (o.lat, o.lon) {
                (Some(_), None) => p.push(format!("{at}.lon"), "required when lat is set"),
                (None, Some(_)) => p.push(format!("{at}.lat"), "required when lon is set"),
                _ => {}
            }
            if let Some(lat) = o.lat {
                if !(-90.0..=90.0).contains(&lat) {
                    p.push(format!("{at}.lat"), format!("{lat} is outside [-90, 90]"));
                }
            }
            if let Some(lon) = o.lon {
                if !(-180.0..=180.0).contains(&lon) {
                    p.push(format!("{at}.lon"), format!("{lon} is outside [-180, 180]"));
                }
            }
            // Overlaps make the answer depend on lookup order, so they are refused; each entry
            // is reported once, against the first earlier entry it overlaps.
            let (net, first) = (o.cidr.trunc(), o.cidr.trunc().network());
            if let Some((j, other)) = self.overrides[..i].iter().enumerate().find(|(_, e)| {
                let e_net = e.cidr.trunc();
                e_net.contains(&first) || net.contains(&e_net.network())
            }) {
                p.push(
                    format!("{at}.cidr"),
                    format!("{} overlaps geo.overrides[{j}].cidr {}", o.cidr, other.cidr),
                );
            }
        }
        self.check_nat64_prefixes(p);
    }

    fn check_nat64_prefixes(&self, p: &mut Problems) {
        let overlaps = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
        for (i, net) in self.nat64_prefixes.iter().enumerate() {
            let at = format!("geo.nat64_prefixes[{i}]");
            if !matches!(net, IpNet::V6(_)) {
                p.push(at, format!("{net} is not an IPv6 prefix"));
                continue;
            }
            if !NAT64_PREFIX_LENGTHS.contains(&net.prefix_len()) {
                p.push(
                    at,
                    format!("{net}: RFC 6052 allows prefix lengths 32, 40, 48, 56, 64 and 96 only"),
                );
                continue;
            }
            if *net != net.trunc() {
                p.push(
                    at,
                    format!("{net} has host bits set (did you mean {}?)", net.trunc()),
                );
                continue;
            }
            if let Some(builtin) = BUILTIN_IPV4_EMBEDDING_PREFIXES
                .iter()
                .filter_map(|b| b.parse::<IpNet>().ok())
                .find(|b| overlaps(b, net))
            {
                p.push(
                    at,
                    format!(
                        "{net} overlaps {builtin}, whose addresses are already located by the \
                         IPv4 address they embed"
                    ),
                );
                continue;
            }
            if let Some((j, other)) = self.nat64_prefixes[..i]
                .iter()
                .enumerate()
                .find(|(_, e)| overlaps(e, net))
            {
                p.push(
                    at,
                    format!("{net} overlaps geo.nat64_prefixes[{j}] {other}"),
                );
            }
        }
    }
}

impl GeofenceConfig {
    pub(crate) fn check(&self, p: &mut Problems) {
        for (i, class) in self.controlled_gpu_classes.iter().enumerate() {
            if !is_gpu_class_name(class) {
                p.push(
                    format!("geofence.controlled_gpu_classes[{i}]"),
                    gpu_class_name_problem(class),
                );
            }
        }
        for (name, members) in &self.country_sets {
            let at = format!("geofence.country_sets.{name}");
            if name == CONTROLLED_SET {
                p.push(
                    &at,
                    format!(
                        "\"{CONTROLLED_SET}\" is reserved: @{CONTROLLED_SET} names the \
                         controlled GPU classes"
                    ),
                );
                continue;
            }
            if !is_set_name(name) {
                p.push(
                    &at,
                    format!(
                        "{name:?} is not a country set name (lower-case letters, digits, _ and -)"
                    ),
                );
            }
            self.check_country_list(&at, members, p);
        }
        self.check_cycles(p);

        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("geofence.rules[{i}]");
            if !is_label(&rule.name) {
                p.push(
                    format!("{at}.name"),
                    format!(
                        "{:?} is not a rule name (1 to 64 characters of A-Z a-z 0-9 . _ -)",
                        rule.name
                    ),
                );
            }
            if let Some(&first) = seen.get(rule.name.as_str()) {
                p.push(
                    format!("{at}.name"),
                    format!(
                        "{:?} is already the name of geofence.rules[{first}]",
                        rule.name
                    ),
                );
            } else {
                seen.insert(&rule.name, i);
            }
            if rule.reason.as_deref().is_some_and(|r| r.trim().is_empty()) {
                p.push(
                    format!("{at}.reason"),
                    "must not be blank (leave it out instead)",
                );
            }
            for (j, class) in rule.gpu_classes.iter().enumerate() {
                let path = format!("{at}.gpu_classes[{j}]");
                match class.strip_prefix('@') {
                    Some(CONTROLLED_SET) => {}
                    Some(_) => p.push(
                        path,
                        format!(
                            "unknown GPU class set {class:?} (the only one is @{CONTROLLED_SET})"
                        ),
                    ),
                    None if !is_gpu_class_name(class) => {
                        p.push(path, gpu_class_name_problem(class))
                    }
                    None => {}
                }
            }
            for (field, list) in [
                ("deny_client_countries", &rule.deny_client_countries),
                ("deny_node_countries", &rule.deny_node_countries),
                (
                    "residency_client_countries",
                    &rule.residency_client_countries,
                ),
                ("residency_node_countries", &rule.residency_node_countries),
            ] {
                self.check_country_list(&format!("{at}.{field}"), list, p);
            }
            let residency_client = !rule.residency_client_countries.is_empty();
            let residency_node = !rule.residency_node_countries.is_empty();
            if residency_client && !residency_node {
                p.push(
                    format!("{at}.residency_node_countries"),
                    "required when residency_client_countries is set",
                );
            } else if residency_node && !residency_client {
                p.push(
                    format!("{at}.residency_client_countries"),
                    "required when residency_node_countries is set",
                );
            } else if !residency_client
                && rule.deny_client_countries.is_empty()
                && rule.deny_node_countries.is_empty()
            {
                p.push(
                    &at,
                    format!(
                        "rule {:?} can never deny: it has no deny_client_countries, \
                         deny_node_countries or residency lists",
                        rule.name
                    ),
                );
            }
        }
    }

    /// Checks each entry of one country list on its own (set references only for existence;
    /// cycles are reported once, by [`Self::check_cycles`]).
    fn check_country_list(&self, at: &str, list: &[String], p: &mut Problems) {
        for (i, entry) in list.iter().enumerate() {
            let problem = if let Some(name) = entry.strip_prefix('@') {
                self.country_set(name).err()
            } else if entry.contains('-') {
                subdivision_problem(entry)
            } else if !is_iso_country(entry) {
                Some(country_problem(entry))
            } else {
                None
            };
            if let Some(problem) = problem {
                p.push(format!("{at}[{i}]"), problem);
            }
        }
    }

    /// Reports every reference cycle among country sets once, at the set where the depth-first
    /// search (in name order) first closes it.
    fn check_cycles(&self, p: &mut Problems) {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            OnStack,
            Done,
        }
        fn visit<'a>(
            cfg: &'a GeofenceConfig,
            name: &'a str,
            marks: &mut BTreeMap<&'a str, Mark>,
            stack: &mut Vec<&'a str>,
            p: &mut Problems,
        ) {
            marks.insert(name, Mark::OnStack);
            stack.push(name);
            let members = cfg.country_sets.get(name).map(Vec::as_slice).unwrap_or(&[]);
            for entry in members {
                let Some(next) = entry.strip_prefix('@') else {
                    continue;
                };
                if !cfg.country_sets.contains_key(next) {
                    continue; // reported as an unknown set by the list check
                }
                match marks.get(next) {
                    Some(Mark::OnStack) => {
                        let from = stack.iter().position(|s| *s == next).unwrap_or(0);
                        p.push(
                            format!("geofence.country_sets.{name}"),
                            cycle_message(&stack[from..], next),
                        );
                    }
                    Some(Mark::Done) => {}
                    None => visit(cfg, next, marks, stack, p),
                }
            }
            stack.pop();
            marks.insert(name, Mark::Done);
        }
        let mut marks = BTreeMap::new();
        for name in self.country_sets.keys() {
            if !marks.contains_key(name.as_str()) {
                visit(self, name, &mut marks, &mut Vec::new(), p);
            }
        }
    }
}
